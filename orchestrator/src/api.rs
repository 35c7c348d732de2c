//! The `WorkflowService` gRPC handlers: validate, call the store, map errors.
//! Handlers stay thin; the state machine lives in `state`.

use crate::errors::ApiError;
use crate::state::WorkflowStore;
use crate::validation::{page_size, validate_cursor, validate_start};
use crate::watch::{WatchHub, watch};
use nexus_pipeline::ids::WorkflowId;
use nexus_proto::v1::workflow_service_server::WorkflowService;
use nexus_proto::v1::{
    CancelWorkflowRequest, GetWorkflowRequest, ListWorkflowsRequest, ListWorkflowsResponse, StartWorkflowRequest,
    StartWorkflowResponse, WatchWorkflowRequest, Workflow, WorkflowEvent,
};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct WorkflowApi {
    pub store: WorkflowStore,
    pub hub: Arc<WatchHub>,
    pub max_plan_bytes: usize,
}

impl WorkflowApi {
    fn parse_id(&self, text: &str) -> Result<WorkflowId, ApiError> {
        let id = WorkflowId::parse(text)?;
        if id.shard() >= self.store.shards() {
            return Err(ApiError::NotFound(text.to_string()));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl WorkflowService for WorkflowApi {
    async fn start_workflow(
        &self,
        request: Request<StartWorkflowRequest>,
    ) -> Result<Response<StartWorkflowResponse>, Status> {
        let request = request.into_inner();
        let valid = validate_start(&request, self.max_plan_bytes)?;
        let started = self.store.start(valid).await?;
        if started.created {
            crate::metrics::METRICS.workflows_started.inc();
        }
        tracing::info!(workflow_id = %started.workflow_id, created = started.created, "workflow accepted");
        Ok(Response::new(StartWorkflowResponse {
            workflow_id: started.workflow_id,
            created: started.created,
        }))
    }

    type WatchWorkflowStream = ReceiverStream<Result<WorkflowEvent, Status>>;

    async fn watch_workflow(
        &self,
        request: Request<WatchWorkflowRequest>,
    ) -> Result<Response<Self::WatchWorkflowStream>, Status> {
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        validate_cursor(&request.after_cursor)?;
        let events = watch(self.hub.clone(), self.store.connection(), id, request.after_cursor).await?;
        Ok(Response::new(ReceiverStream::new(events)))
    }

    async fn get_workflow(&self, request: Request<GetWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        let id = self.parse_id(&request.into_inner().workflow_id)?;
        Ok(Response::new(self.store.get(&id).await?))
    }

    async fn list_workflows(
        &self,
        request: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let (workflows, next_page_token) = self.store.list(size, &request.page_token).await?;
        Ok(Response::new(ListWorkflowsResponse {
            workflows,
            next_page_token,
        }))
    }

    async fn cancel_workflow(&self, request: Request<CancelWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        if request.reason.len() > 1024 {
            return Err(ApiError::InvalidArgument("reason must be at most 1024 bytes".into()).into());
        }
        Ok(Response::new(self.store.cancel(&id, &request.reason).await?))
    }
}
