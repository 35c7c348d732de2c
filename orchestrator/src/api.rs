//! The `WorkflowService` gRPC handlers: validate, call the store, map errors.
//! Handlers stay thin; the state machine lives in `state`.

use crate::catalog::PipelineCatalog;
use crate::errors::ApiError;
use crate::state::{Approval, MAX_EDITED_OUTPUT_BYTES, WorkflowStore, scoped_key};
use crate::tenants::{Limits, Tenant, WatchCounts};
use crate::validation::{CostCaps, page_size, validate_cursor, validate_start};
use crate::watch::{WatchHub, watch};
use nexus_pipeline::ids::WorkflowId;
use nexus_proto::v1::workflow_service_server::WorkflowService;
use nexus_proto::v1::{
    ApproveStepRequest, ApproveStepResponse, CancelWorkflowRequest, CompareWorkflowsRequest, CompareWorkflowsResponse,
    ForkWorkflowRequest, ForkWorkflowResponse, GetWorkflowRequest, ListPipelinesRequest, ListPipelinesResponse,
    ListWorkflowsRequest, ListWorkflowsResponse, RejectStepRequest, RejectStepResponse, StartWorkflowRequest,
    StartWorkflowResponse, WatchWorkflowRequest, Workflow, WorkflowEvent,
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
    pub limits: Limits,
    /// Open watches on this replica, for the watch limits.
    pub watches: Arc<WatchCounts>,
}

impl WorkflowApi {
    async fn start(
        &self,
        id: WorkflowId,
        request: &StartWorkflowRequest,
        caller: &Tenant,
    ) -> Result<StartWorkflowResponse, Status> {
        let mut valid = validate_start(request, self.max_plan_bytes, &self.catalog, self.cost_caps)?;
        valid.tenant = caller.owner().to_string();
        self.store.admit_start(caller, self.limits).await?;
        let started = self.store.start(id, valid).await?;
        if started.created {
            crate::metrics::record_start(caller.owner());
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
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        // The id comes first: without a client span, the trace is named by it.
        let id = self.store.new_id(&scoped_key(caller.owner(), &request.idempotency_key));
        let span = start_workflow_span(client_span.as_deref(), &id);
        let started = self.start(id, &request, &caller).instrument(span.clone()).await;
        record_outcome(&span, &started);
        Ok(Response::new(started?))
    }

    type WatchWorkflowStream = ReceiverStream<Result<WorkflowEvent, Status>>;

    async fn watch_workflow(
        &self,
        request: Request<WatchWorkflowRequest>,
    ) -> Result<Response<Self::WatchWorkflowStream>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        validate_cursor(&request.after_cursor)?;
        self.store.authorize(&caller, &id).await?;
        let slot = self.watches.admit(&caller, self.limits)?;
        let events = watch(
            self.hub.clone(),
            self.store.connection(),
            id,
            request.after_cursor,
            request.skip_reasoning,
            slot,
        )
        .await?;
        Ok(Response::new(ReceiverStream::new(events)))
    }

    async fn get_workflow(&self, request: Request<GetWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        self.store.authorize(&caller, &id).await?;
        Ok(Response::new(self.store.get_with(&id, !request.omit_outputs).await?))
    }

    async fn list_workflows(
        &self,
        request: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let tenant = (!caller.admin).then(|| caller.owner());
        let parent = match request.parent_workflow_id.trim() {
            "" => None,
            parent => Some(self.parse_id(parent)?.to_string()),
        };
        let (workflows, next_page_token) = self
            .store
            .list(size, &request.page_token, parent.as_deref(), tenant)
            .await?;
        Ok(Response::new(ListWorkflowsResponse {
            workflows,
            next_page_token,
        }))
    }

    async fn cancel_workflow(&self, request: Request<CancelWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        self.store.authorize(&caller, &id).await?;
        check_note("reason", &request.reason)?;
        Ok(Response::new(self.store.cancel(&id, &request.reason).await?))
    }

    async fn approve_step(
        &self,
        request: Request<ApproveStepRequest>,
    ) -> Result<Response<ApproveStepResponse>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        self.store.authorize(&caller, &id).await?;
        let edited = request.edited_output.as_deref().unwrap_or_default();
        if edited.len() > MAX_EDITED_OUTPUT_BYTES {
            return Err(ApiError::TooLarge(format!(
                "edited_output is {} bytes; the limit is {MAX_EDITED_OUTPUT_BYTES}",
                edited.len()
            ))
            .into());
        }
        if request
            .edited_output
            .as_ref()
            .is_some_and(|text| text.trim().is_empty())
        {
            return Err(
                ApiError::InvalidArgument("edited_output is empty: leave it unset to approve as is".into()).into(),
            );
        }
        check_note("comment", &request.comment)?;
        let approval = Approval {
            edited_output: request.edited_output,
            comment: request.comment,
            timed_out: false,
        };
        let workflow = self.store.approve(&id, request.phase_index, approval).await?;
        Ok(Response::new(ApproveStepResponse {
            workflow: Some(workflow),
        }))
    }

    async fn reject_step(&self, request: Request<RejectStepRequest>) -> Result<Response<RejectStepResponse>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let id = self.parse_id(&request.workflow_id)?;
        self.store.authorize(&caller, &id).await?;
        check_note("reason", &request.reason)?;
        let workflow = self.store.reject(&id, request.phase_index, &request.reason).await?;
        Ok(Response::new(RejectStepResponse {
            workflow: Some(workflow),
        }))
    }

    async fn fork_workflow(
        &self,
        request: Request<ForkWorkflowRequest>,
    ) -> Result<Response<ForkWorkflowResponse>, Status> {
        let caller = Tenant::of(&request);
        let request = request.into_inner();
        let parent = self.parse_id(&request.workflow_id)?;
        self.store.authorize(&caller, &parent).await?;
        self.store.admit_start(&caller, self.limits).await?;
        let started = self
            .store
            .fork(&parent, &request, &self.catalog, self.cost_caps, caller.owner())
            .await?;
        if started.created {
            crate::metrics::record_start(caller.owner());
        }
        tracing::info!(workflow_id = %started.workflow_id, parent = %parent, from_phase = %request.from_phase, created = started.created, "fork accepted");
        Ok(Response::new(ForkWorkflowResponse {
            workflow_id: started.workflow_id,
            created: started.created,
        }))
    }

    async fn compare_workflows(
        &self,
        request: Request<CompareWorkflowsRequest>,
    ) -> Result<Response<CompareWorkflowsResponse>, Status> {
        let caller = Tenant::of(&request);
        let ids = request
            .into_inner()
            .workflow_ids
            .iter()
            .map(|id| self.parse_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        for id in &ids {
            self.store.authorize(&caller, id).await?;
        }
        Ok(Response::new(self.store.compare(&ids).await?))
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

/// A person's note (a reason, a comment): bounded.
fn check_note(name: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > 1024 {
        return Err(ApiError::InvalidArgument(format!("{name} must be at most 1024 bytes")));
    }
    Ok(())
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
