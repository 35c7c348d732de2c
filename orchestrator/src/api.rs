//! The `WorkflowService` gRPC handlers: validate, call the store, map errors.
//! Handlers stay thin; the state machine lives in `state`.

use crate::catalog::PipelineCatalog;
use crate::errors::ApiError;
use crate::state::WorkflowStore;
use crate::validation::{CostCaps, page_size, validate_cursor, validate_start};
use crate::watch::{WatchHub, watch};
use nexus_pipeline::ids::WorkflowId;
use nexus_proto::v1::workflow_service_server::WorkflowService;
use nexus_proto::v1::{
    CancelWorkflowRequest, GetWorkflowRequest, ListPipelinesRequest, ListPipelinesResponse, ListWorkflowsRequest,
    ListWorkflowsResponse, StartWorkflowRequest, StartWorkflowResponse, WatchWorkflowRequest, Workflow, WorkflowEvent,
};
use nexus_runtime::telemetry;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub struct WorkflowApi {
    pub store: WorkflowStore,
    pub hub: Arc<WatchHub>,
    pub catalog: Arc<PipelineCatalog>,
    pub max_plan_bytes: usize,
    pub cost_caps: CostCaps,
}

impl WorkflowApi {
    async fn start(&self, id: WorkflowId, request: &StartWorkflowRequest) -> Result<StartWorkflowResponse, Status> {
        let valid = validate_start(request, self.max_plan_bytes, &self.catalog, self.cost_caps)?;
        let started = self.store.start(id, valid).await?;
        if started.created {
            crate::metrics::METRICS.workflows_started.inc();
        }
        tracing::Span::current().record("workflow_id", started.workflow_id.as_str());
        tracing::info!(workflow_id = %started.workflow_id, created = started.created, "workflow accepted");
        Ok(StartWorkflowResponse {
            workflow_id: started.workflow_id,
            created: started.created,
        })
    }

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
        let client_span = client_traceparent(request.metadata());
        let request = request.into_inner();
        // The id comes first: without a client span, the trace is named by it.
        let id = self.store.new_id(&request.idempotency_key);
        let span = start_workflow_span(client_span.as_deref(), &id);
        let started = self.start(id, &request).instrument(span.clone()).await;
        record_outcome(&span, &started);
        Ok(Response::new(started?))
    }

    type WatchWorkflowStream = ReceiverStream<Result<WorkflowEvent, Status>>;

    async fn watch_workflow(
        &self,
        request: Request<WatchWorkflowRequest>,
    ) -> Result<Response<Self::WatchWorkflowStream>, Status> {
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        validate_cursor(&request.after_cursor)?;
        let events = watch(
            self.hub.clone(),
            self.store.connection(),
            id,
            request.after_cursor,
            request.skip_reasoning,
        )
        .await?;
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

    async fn list_pipelines(
        &self,
        _request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        Ok(Response::new(ListPipelinesResponse {
            pipelines: self.catalog.describe(),
        }))
    }
}

/// The W3C `traceparent` the client sent as metadata, if any.
fn client_traceparent(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("traceparent")?.to_str().ok()?;
    Some(value.to_string())
}

/// The server span of a `StartWorkflow` call, the root of the workflow's
/// tree: a child of the client's span when the client sent one (the
/// workflow then lives in the client's trace), else the root of a new
/// trace named by the workflow's UUID.
fn start_workflow_span(client_span: Option<&str>, id: &WorkflowId) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "StartWorkflow",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "nexus.v1.WorkflowService",
        rpc.method = "StartWorkflow",
        workflow_id = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let joined = client_span.is_some_and(|traceparent| telemetry::join_trace(&span, traceparent));
    if !joined {
        telemetry::start_trace(&span, &id.trace_id());
    }
    span
}

/// Records the call's gRPC status on its span.
fn record_outcome<T>(span: &tracing::Span, outcome: &Result<T, Status>) {
    let code = outcome.as_ref().err().map_or(tonic::Code::Ok, Status::code);
    span.record("rpc.grpc.status_code", code as i64);
    if let Err(status) = outcome {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", status.message());
    }
}
