//! The workflow state machine. This module is the only writer of workflow
//! state; every transition is one Lua script under `lua/`, so it is atomic and
//! can be read (and tested) on its own:
//!
//! ```text
//!            create_workflow          apply_result (next)
//!  (none) ──────────────────▶ pending ───────────────────▶ running ──┐
//!                                │                            ▲      │ apply_result (next)
//!                                │                            └──────┘
//!                                ├── apply_result (complete) ──▶ completed
//!                                ├── apply_result (fail) ──────▶ failed
//!                                └── cancel_workflow ──────────▶ cancelled
//! ```
//!
//! A workflow is `pending` until a worker starts its first phase (the
//! worker's fenced event append moves it to `running`).

mod events;
mod pipelines;
mod scripts;
mod transitions;
mod view;

pub use events::{event, is_terminal};
pub use transitions::ApplyOutcome;

use crate::errors::ApiError;
use crate::validation::{ValidStart, plan_as_text, plan_fingerprint};
use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::{WorkflowId, shard_for};
use nexus_pipeline::keys::{CANCEL_CHANNEL, EVENTS_CHANNEL, WorkflowKeys};
use nexus_proto::internal::{PhaseSpec, PhaseTask, PipelineSnapshot};
use nexus_proto::v1::{Workflow, WorkflowAccepted, WorkflowCancelled, workflow_event::Kind};
use pipelines::PipelineCache;
use prost::Message;
use std::sync::Arc;
use tracing::Instrument;

/// The orchestrator's configured pipeline, resolved once at start-up.
pub struct CurrentPipeline {
    pub fingerprint: String,
    pub snapshot: Arc<PipelineSnapshot>,
}

#[derive(Clone)]
pub struct WorkflowStore {
    conn: Connection,
    shards: u16,
    retention_secs: u64,
    pipelines: Arc<PipelineCache>,
    current: Arc<CurrentPipeline>,
}

/// The task message for one phase of a workflow. Its trace context names
/// the current span, the one scheduling the phase (`create_workflow` or
/// `apply_result`), so the worker's span of the phase is that span's child.
fn phase_task(id: &WorkflowId, phase_index: u32, spec: &PhaseSpec, pipeline_id: &str) -> PhaseTask {
    PhaseTask {
        version: nexus_proto::STREAM_MESSAGE_VERSION,
        workflow_id: id.to_string(),
        phase_index,
        attempt: 1,
        spec: Some(spec.clone()),
        traceparent: nexus_runtime::telemetry::current_traceparent().unwrap_or_else(|| id.traceparent()),
        enqueued_at_ms: nexus_pipeline::now_ms(),
        pipeline_id: pipeline_id.to_string(),
    }
}

/// What `start` did.
pub struct Started {
    pub workflow_id: String,
    pub created: bool,
}

impl WorkflowStore {
    pub fn new(conn: Connection, shards: u16, retention_secs: u64, current: CurrentPipeline) -> Self {
        let pipelines = PipelineCache::default();
        pipelines.insert(&current.fingerprint, current.snapshot.clone());
        Self {
            conn,
            shards,
            retention_secs,
            pipelines: Arc::new(pipelines),
            current: Arc::new(current),
        }
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// The id a new workflow gets: on the shard of its idempotency key
    /// (empty for none), so a retry lands where the key is stored.
    pub fn new_id(&self, idempotency_key: &str) -> WorkflowId {
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        WorkflowId::new(shard_for(key, self.shards))
    }

    /// Stores a new workflow under `id` (from [`Self::new_id`]) and queues
    /// its first phase, atomically, in a `create_workflow` span.
    pub async fn start(&self, id: WorkflowId, request: ValidStart<'_>) -> Result<Started, ApiError> {
        let span = tracing::info_span!("create_workflow", workflow_id = %id);
        self.create(id, request).instrument(span).await
    }

    async fn create(&self, id: WorkflowId, request: ValidStart<'_>) -> Result<Started, ApiError> {
        let keys = WorkflowKeys::new(&id);
        let plan_bytes = request.plan.encode_to_vec();
        let plan_fingerprint = plan_fingerprint(request.plan);
        let snapshot = &self.current.snapshot;
        let accepted = event(Kind::Accepted(WorkflowAccepted {
            plan_name: request.plan.name.trim().to_string(),
            pipeline: snapshot.name.clone(),
            phases: view::planned_phases(snapshot),
        }));
        let first_task = phase_task(&id, 0, &snapshot.phases[0], &self.current.fingerprint);
        let reply: Vec<String> = scripts::CREATE_WORKFLOW
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.index())
            .key(keys.shard.tasks())
            .key(keys.shard.idempotency(request.idempotency_key.unwrap_or("-")))
            .key(keys.shard.pipeline(&self.current.fingerprint))
            .arg(id.to_string())
            .arg(if request.idempotency_key.is_some() { "1" } else { "0" })
            .arg(&plan_fingerprint)
            .arg(nexus_pipeline::now_ms())
            .arg(plan_bytes)
            .arg(plan_as_text(request.plan))
            .arg(&self.current.fingerprint)
            .arg(snapshot.encode_to_vec())
            .arg(accepted.encode_to_vec())
            .arg(first_task.encode_to_vec())
            .arg(request.idempotency_key.unwrap_or_default())
            .arg(self.retention_secs)
            .arg(EVENTS_CHANNEL)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [created, workflow_id] if created == "1" => Ok(Started {
                workflow_id: workflow_id.clone(),
                created: true,
            }),
            [_, workflow_id, matched] if matched == "match" => Ok(Started {
                workflow_id: workflow_id.clone(),
                created: false,
            }),
            [_, workflow_id, _] => Err(ApiError::IdempotencyMismatch {
                key: request.idempotency_key.unwrap_or_default().to_string(),
                workflow_id: workflow_id.clone(),
            }),
            other => Err(ApiError::Corrupt(format!("create_workflow replied {other:?}"))),
        }
    }

    /// Gives up on a result that could not be applied after `deliveries`
    /// deliveries: moves it to the shard's result dead-letter stream and
    /// fails its workflow with the reason. Returns what the script did.
    pub async fn fail_unapplicable(
        &self,
        id: &WorkflowId,
        result: &nexus_proto::internal::PhaseResult,
        entry_id: &str,
        payload: &[u8],
        deliveries: u64,
        reason: &str,
    ) -> Result<String, ApiError> {
        let keys = WorkflowKeys::new(id);
        let failed = event(Kind::Failed(nexus_proto::v1::WorkflowFailed {
            reason: reason.to_string(),
            phase: String::new(),
        }));
        Ok(scripts::FAIL_WORKFLOW
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.results())
            .key(keys.shard.results_dead_letter())
            .arg(nexus_pipeline::now_ms())
            .arg(failed.encode_to_vec())
            .arg(reason)
            .arg(self.retention_secs)
            .arg(EVENTS_CHANNEL)
            .arg(id.to_string())
            .arg(entry_id)
            .arg(nexus_pipeline::stream::ORCHESTRATORS_GROUP)
            .arg(payload)
            .arg(deliveries)
            .arg(result.phase_index)
            .arg(result.attempt)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Cancels a pending or running workflow; returns it as it then stands.
    pub async fn cancel(&self, id: &WorkflowId, reason: &str) -> Result<Workflow, ApiError> {
        let keys = WorkflowKeys::new(id);
        let reason = if reason.trim().is_empty() {
            "cancelled by request"
        } else {
            reason.trim()
        };
        let cancelled = event(Kind::Cancelled(WorkflowCancelled {
            reason: reason.to_string(),
        }));
        let outcome: String = scripts::CANCEL_WORKFLOW
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .arg(nexus_pipeline::now_ms())
            .arg(cancelled.encode_to_vec())
            .arg(reason)
            .arg(self.retention_secs)
            .arg(EVENTS_CHANNEL)
            .arg(CANCEL_CHANNEL)
            .arg(id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if outcome == "cancelled" {
            let status = crate::metrics::StatusLabel { status: "cancelled" };
            crate::metrics::METRICS.workflows_finished.get_or_create(&status).inc();
        }
        if outcome == "missing" {
            return Err(ApiError::NotFound(id.to_string()));
        }
        tracing::info!(workflow_id = %id, %outcome, "cancel requested");
        self.get(id).await
    }
}
