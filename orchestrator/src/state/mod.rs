//! The orchestrator's side of the workflow state machine: creating a run
//! (with its first phase task) and cancelling one, each one Lua script under
//! `lua/`, atomic and readable on its own; and reading runs back. The rest of
//! the machine (a phase's result recorded, the next phase queued, the run
//! completed or failed) is `nexus_pipeline::transition`, applied by the
//! worker that holds the result. A workflow is `pending` until a worker
//! starts its first phase (the worker's fenced event append moves it to
//! `running`).

mod compare;
mod events;
mod fork;
mod gates;
mod scripts;
mod tenancy;
mod view;

pub use gates::{Approval, MAX_EDITED_OUTPUT_BYTES, expire_gates};

pub use events::{event, is_terminal, open_watch};

use crate::catalog::PipelineCatalog;
use crate::errors::ApiError;
use crate::validation::{ValidStart, plan_as_text};
use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::{WorkflowId, shard_for};
use nexus_pipeline::keys::{CANCEL_CHANNEL, WorkflowKeys};
use nexus_pipeline::transition::{PipelineCache, phase_task, start_template};
use nexus_proto::v1::{Workflow, WorkflowAccepted, WorkflowCancelled, workflow_event::Kind};
use prost::Message;
use std::sync::Arc;
use tracing::Instrument;

/// An idempotency key as stored: within its tenant's namespace, so two
/// tenants' equal keys name two runs.
pub fn scoped_key(tenant: &str, key: &str) -> String {
    if tenant.is_empty() || key.is_empty() {
        key.to_string()
    } else {
        format!("{tenant}/{key}")
    }
}

#[derive(Clone)]
pub struct WorkflowStore {
    conn: Connection,
    shards: u16,
    retention_secs: u64,
    pipelines: Arc<PipelineCache>,
}

/// What `start` did.
pub struct Started {
    pub workflow_id: String,
    pub created: bool,
}

impl WorkflowStore {
    /// A store that knows the catalog's pipelines without asking Redis.
    pub fn new(conn: Connection, shards: u16, retention_secs: u64, catalog: &PipelineCatalog) -> Self {
        let pipelines = PipelineCache::default();
        for chosen in catalog.plain_pipelines() {
            pipelines.insert(&chosen.fingerprint, chosen.snapshot.clone());
        }
        Self {
            conn,
            shards,
            retention_secs,
            pipelines: Arc::new(pipelines),
        }
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// The id a new workflow gets: on the shard of its idempotency key
    /// (empty for none; scoped to its tenant with [`scoped_key`]), so a
    /// retry lands where the key is stored.
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
        let pipeline = &request.pipeline;
        let snapshot = &pipeline.snapshot;
        let accepted = event(Kind::Accepted(WorkflowAccepted {
            plan_name: request.plan.name.trim().to_string(),
            pipeline: snapshot.name.clone(),
            phases: view::planned_phases(snapshot),
        }));
        let traceparent = nexus_runtime::telemetry::current_traceparent().unwrap_or_else(|| id.traceparent());
        let seed = &request.seed;
        let first = seed.first_phase;
        let first_task = phase_task(
            &id,
            first,
            &snapshot.phases[first as usize],
            &pipeline.fingerprint,
            traceparent,
        );
        let mut invocation = scripts::CREATE_WORKFLOW.key(keys.state());
        invocation
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.index())
            .key(keys.shard.tasks())
            .key(
                keys.shard
                    .idempotency(&scoped_key(&request.tenant, request.idempotency_key.unwrap_or("-"))),
            )
            .key(keys.shard.pipeline(&pipeline.fingerprint))
            .arg(id.to_string())
            .arg(if request.idempotency_key.is_some() { "1" } else { "0" })
            .arg(&request.fingerprint)
            .arg(nexus_pipeline::now_ms())
            .arg(plan_bytes)
            .arg(plan_as_text(request.plan))
            .arg(&pipeline.fingerprint)
            .arg(snapshot.encode_to_vec())
            .arg(accepted.encode_to_vec())
            .arg(first_task.encode_to_vec())
            .arg(request.idempotency_key.unwrap_or_default())
            .arg(self.retention_secs)
            .arg(pipeline.choices.encode_to_vec())
            .arg(pipeline.choices.max_cost_usd)
            .arg(start_template(&first_task, &snapshot.phases[first as usize]))
            .arg(seed.state.len() + usize::from(!request.tenant.is_empty()));
        for (name, value) in &seed.state {
            invocation.arg(name).arg(value);
        }
        if !request.tenant.is_empty() {
            invocation.arg(nexus_pipeline::keys::field::TENANT).arg(&request.tenant);
        }
        invocation.arg(seed.outputs.len());
        for (name, text) in &seed.outputs {
            invocation.arg(name).arg(text);
        }
        invocation.arg(seed.events.len());
        for event in &seed.events {
            invocation.arg(event);
        }
        let reply: Vec<String> = invocation.invoke_async(&mut self.conn.clone()).await?;
        if reply.first().is_some_and(|created| created == "1") {
            self.pipelines.insert(&pipeline.fingerprint, snapshot.clone());
        }
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

    /// Cancels a pending, running or waiting workflow; returns it as it then stands.
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
            .key(keys.shard.gates())
            .arg(nexus_pipeline::now_ms())
            .arg(cancelled.encode_to_vec())
            .arg(reason)
            .arg(self.retention_secs)
            .arg(keys.channel())
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
