//! Approval gates: a run that finished a phase marked `await_approval`
//! waits (status `awaiting_approval`, its next task kept in the state hash,
//! no worker held) until a person approves, with or without an edit, or
//! rejects; or until the gate's deadline, when the orchestrators' gate
//! sweeper does what the pipeline says. Every way out is one script fenced
//! on "waits at this phase", so a late timeout, a double click or a cancel
//! racing an approval changes the run once.

use super::view::load_stored;
use super::{WorkflowStore, event, scripts};
use crate::errors::ApiError;
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{ShardKeys, WorkflowKeys, field};
use nexus_pipeline::transition::INLINE_OUTPUT_MAX_BYTES;
use nexus_proto::v1::{Phase, PhaseApproved, Workflow, WorkflowFailed, workflow_event::Kind};
use prost::Message;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest edited output a person may send, in bytes.
pub const MAX_EDITED_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// How often the gate sweeper looks for gates past their deadline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Gates one sweep handles per shard; the rest wait a second.
const SWEEP_BATCH: isize = 100;

/// How a gate is opened.
pub struct Approval {
    pub edited_output: Option<String>,
    pub comment: String,
    /// The gate's timeout approved it, not a person.
    pub timed_out: bool,
}

impl WorkflowStore {
    /// Opens the gate at phase `index`; see the module doc.
    pub async fn approve(&self, id: &WorkflowId, index: u32, approval: Approval) -> Result<Workflow, ApiError> {
        let keys = WorkflowKeys::new(id);
        let (name, edited_record) = self.gated_phase(id, index, approval.edited_output.as_deref()).await?;
        let edited = approval.edited_output.as_deref();
        let approved = event(Kind::PhaseApproved(PhaseApproved {
            index,
            phase: name.clone(),
            edited_output: edited
                .filter(|text| text.len() <= INLINE_OUTPUT_MAX_BYTES)
                .map(str::to_string),
            edited_bytes: edited.map_or(0, |text| text.len() as u64),
            comment: approval.comment,
            timed_out: approval.timed_out,
        }));
        let outcome: String = scripts::APPROVE_STEP
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.tasks())
            .key(keys.shard.gates())
            .arg(index)
            .arg(nexus_pipeline::now_ms())
            .arg(approved.encode_to_vec())
            .arg(keys.channel())
            .arg(id.to_string())
            .arg(if edited_record.is_some() { "1" } else { "0" })
            .arg(&name)
            .arg(approval.edited_output.unwrap_or_default())
            .arg(edited_record.unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        gate_outcome(id, index, &outcome, "approved")?;
        tracing::info!(workflow_id = %id, phase = %name, timed_out = approval.timed_out, "approval gate opened");
        self.get(id).await
    }

    /// Fails the run waiting at phase `index`, with `reason`.
    pub async fn reject(&self, id: &WorkflowId, index: u32, reason: &str) -> Result<Workflow, ApiError> {
        let keys = WorkflowKeys::new(id);
        let (name, _) = self.gated_phase(id, index, None).await?;
        let reason = match reason.trim() {
            "" => format!("phase {name} was rejected at its approval gate"),
            why => format!("phase {name} was rejected at its approval gate: {why}"),
        };
        let failed = event(Kind::Failed(WorkflowFailed {
            reason: reason.clone(),
            phase: name.clone(),
        }));
        let outcome: String = scripts::REJECT_STEP
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.gates())
            .arg(index)
            .arg(nexus_pipeline::now_ms())
            .arg(failed.encode_to_vec())
            .arg(&reason)
            .arg(self.retention_secs)
            .arg(keys.channel())
            .arg(id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        gate_outcome(id, index, &outcome, "rejected")?;
        let status = crate::metrics::StatusLabel { status: "failed" };
        crate::metrics::METRICS.workflows_finished.get_or_create(&status).inc();
        tracing::info!(workflow_id = %id, phase = %name, "approval gate rejected");
        self.get(id).await
    }

    /// The gated phase's name and, for an edit, its record marked as edited
    /// by a person. The script checks again that the run waits there.
    async fn gated_phase(
        &self,
        id: &WorkflowId,
        index: u32,
        edited_output: Option<&str>,
    ) -> Result<(String, Option<Vec<u8>>), ApiError> {
        let mut conn = self.conn.clone();
        let stored = load_stored(&mut conn, id, false)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        let pipeline = self.pipelines.get(&mut conn, id.shard(), &stored.pipeline_id()).await?;
        let name = pipeline
            .phases
            .get(index as usize)
            .map(|spec| spec.name.clone())
            .ok_or_else(|| ApiError::InvalidArgument(format!("phase_index {index}: the run has no such phase")))?;
        let Some(edited) = edited_output else {
            return Ok((name, None));
        };
        let record = stored
            .phase_records()?
            .into_iter()
            .find(|record| record.index == index)
            .ok_or_else(|| ApiError::FailedPrecondition(format!("workflow {id} has not completed phase {name}")))?;
        let edited_record = Phase {
            human_edit: true,
            output_bytes: edited.len() as u64,
            ..record
        };
        Ok((name, Some(edited_record.encode_to_vec())))
    }

    /// Settles every gate of `shard` past its deadline as its pipeline says.
    async fn expire_shard_gates(&self, shard: u16) -> Result<(), ApiError> {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(ShardKeys::new(shard).gates())
            .arg("-inf")
            .arg(nexus_pipeline::now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_BATCH)
            .query_async(&mut self.conn.clone())
            .await?;
        for id in due.iter().filter_map(|id| WorkflowId::parse(id).ok()) {
            let (gate, on_timeout): (Option<u32>, Option<String>) = redis::cmd("HMGET")
                .arg(WorkflowKeys::new(&id).state())
                .arg(&[field::GATE, field::GATE_ON_TIMEOUT])
                .query_async(&mut self.conn.clone())
                .await?;
            let Some(index) = gate else {
                // Settled meanwhile, or expired: nothing waits any more.
                let _: () =
                    redis::AsyncCommands::zrem(&mut self.conn.clone(), ShardKeys::new(shard).gates(), id.to_string())
                        .await?;
                continue;
            };
            let settled = if on_timeout.as_deref() == Some("approve") {
                let approval = Approval {
                    edited_output: None,
                    comment: "approved when the gate timed out".into(),
                    timed_out: true,
                };
                self.approve(&id, index, approval).await.map(drop)
            } else {
                self.reject(&id, index, "nobody approved it before the gate timed out")
                    .await
                    .map(drop)
            };
            match settled {
                Ok(()) | Err(ApiError::FailedPrecondition(_) | ApiError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// Settles gates past their deadline until `shutdown`; every replica runs
/// it, and the scripts' fence makes each gate settle once.
pub async fn expire_gates(store: WorkflowStore, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        for shard in 0..store.shards {
            if let Err(error) = store.expire_shard_gates(shard).await {
                tracing::warn!(%error, shard, "could not settle timed-out approval gates; will retry");
            }
        }
    }
}

/// What a gate script's reply means for the caller.
fn gate_outcome(id: &WorkflowId, index: u32, outcome: &str, done: &str) -> Result<(), ApiError> {
    if outcome == done {
        return Ok(());
    }
    if outcome == "missing" {
        return Err(ApiError::NotFound(id.to_string()));
    }
    if let Some(waiting_at) = outcome.strip_prefix("awaiting_approval:") {
        return Err(ApiError::FailedPrecondition(format!(
            "workflow {id} waits for approval at phase {waiting_at}, not at phase {index}"
        )));
    }
    Err(ApiError::FailedPrecondition(format!(
        "workflow {id} is {outcome}; it does not wait for approval"
    )))
}
