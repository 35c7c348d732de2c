//! Consuming phase results.
//!
//! Every replica reads every shard's result stream through the shared
//! `orchestrators` group, so each result goes to one replica. Results left
//! unacknowledged by a replica that died are claimed after an idle time and
//! applied here; applying is fenced, so a result applied twice changes
//! nothing the second time. A result that still cannot be applied after
//! `max_deliveries` deliveries goes to the shard's result dead-letter stream
//! and fails its workflow with the reason; one that cannot even be decoded
//! goes there at once.

use crate::errors::ApiError;
use crate::metrics::{METRICS, StatusLabel};
use crate::state::{ApplyOutcome, WorkflowStore};
use nexus_pipeline::connection::{Connection, RedisArgs};
use nexus_pipeline::keys::ShardKeys;
use nexus_pipeline::stream::{Entry, ORCHESTRATORS_GROUP, ensure_group, entry_of, read_new};
use nexus_proto::internal::PhaseResult;
use prost::Message;
use redis::streams::StreamClaimReply;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Results read per round trip.
const BATCH: usize = 128;

pub struct ResultConsumer {
    pub store: WorkflowStore,
    pub redis: RedisArgs,
    pub consumer: String,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
}

impl ResultConsumer {
    /// Runs one loop per shard until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = std::sync::Arc::new(self);
        let loops: Vec<_> = (0..this.store.shards())
            .map(|shard| {
                let this = this.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { this.consume_shard(shard, shutdown).await })
            })
            .collect();
        futures::future::join_all(loops).await;
    }

    async fn consume_shard(&self, shard: u16, shutdown: CancellationToken) {
        let shard = ShardKeys::new(shard);
        let stream = shard.results();
        let mut last_claim = tokio::time::Instant::now();
        let mut quiet = nexus_pipeline::connection::LogBackoff::default();
        while !shutdown.is_cancelled() {
            let Ok(mut blocking) = self.redis.connect_patiently(true).await else {
                continue;
            };
            if let Err(error) = ensure_group(&mut blocking, &stream, ORCHESTRATORS_GROUP).await {
                tracing::warn!(%error, %stream, "cannot create results group; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                if last_claim.elapsed() >= self.claim_idle / 2 {
                    last_claim = tokio::time::Instant::now();
                    if let Err(error) = self.claim_abandoned(&mut blocking, &shard).await
                        && quiet.should_log()
                    {
                        tracing::warn!(%error, "claiming abandoned results failed");
                    }
                }
                let read = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    read = read_new(&mut blocking, &stream, ORCHESTRATORS_GROUP, &self.consumer, BATCH) => read,
                };
                match read {
                    Ok(entries) => {
                        quiet.reset();
                        self.apply_all(&shard, entries).await
                    }
                    Err(error) => {
                        if quiet.should_log() {
                            tracing::warn!(%error, %stream, "reading results failed; reconnecting");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Takes over results that were read but never applied (a replica
    /// died, or applying failed), giving up on those delivered too often.
    async fn claim_abandoned(&self, conn: &mut Connection, shard: &ShardKeys) -> redis::RedisResult<()> {
        let stream = &shard.results();
        let idle_ms = self.claim_idle.as_millis() as u64;
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(ORCHESTRATORS_GROUP)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("-")
            .arg("+")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        for (entry_id, previous_owner, _idle, deliveries) in pending {
            let claimed: StreamClaimReply = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(ORCHESTRATORS_GROUP)
                .arg(&self.consumer)
                .arg(idle_ms)
                .arg(&entry_id)
                .query_async(conn)
                .await?;
            for entry in claimed.ids.into_iter().map(entry_of) {
                let deliveries = deliveries + 1;
                tracing::info!(entry = %entry.id, %previous_owner, deliveries, %stream, "claimed a result that was not applied");
                if deliveries > self.max_deliveries {
                    self.give_up(shard, &entry, deliveries).await;
                } else {
                    self.apply(shard, &entry).await;
                }
            }
        }
        Ok(())
    }

    /// Dead-letters a result delivered too often and fails its workflow.
    async fn give_up(&self, shard: &ShardKeys, entry: &Entry, deliveries: u64) {
        let Ok(result) = PhaseResult::decode(entry.payload.as_slice()) else {
            return self.dead_letter_undecodable(shard, entry, "undecodable result").await;
        };
        if result.version > nexus_proto::STREAM_MESSAGE_VERSION {
            // Not ours to judge: a newer replica will apply it (rolling upgrade).
            tracing::warn!(entry = %entry.id, version = result.version, "result from a newer build keeps waiting for a newer orchestrator");
            return;
        }
        let Ok(id) = nexus_pipeline::ids::WorkflowId::parse(&result.workflow_id) else {
            return self
                .dead_letter_undecodable(shard, entry, "result names no valid workflow")
                .await;
        };
        let reason = format!(
            "the result of phase {} could not be applied after {deliveries} deliveries (see the orchestrators' logs); it was moved to the result dead-letter stream",
            result.phase_index + 1
        );
        tracing::error!(workflow_id = %id, entry = %entry.id, deliveries, "giving up on a result; failing the workflow");
        match self
            .store
            .fail_unapplicable(&id, &result, &entry.id, &entry.payload, deliveries, &reason)
            .await
        {
            Ok(outcome) => tracing::info!(workflow_id = %id, %outcome, "unapplicable result dead-lettered"),
            Err(error) => tracing::warn!(%error, "dead-lettering a result failed; will retry"),
        }
    }

    async fn apply_all(&self, shard: &ShardKeys, entries: Vec<Entry>) {
        futures::future::join_all(entries.iter().map(|entry| self.apply(shard, entry))).await;
    }

    /// Moves an entry no orchestrator can read to the result dead-letter
    /// stream of its shard (kept for inspection, out of the way).
    async fn dead_letter_undecodable(&self, shard: &ShardKeys, entry: &Entry, why: &str) {
        let stream = &shard.results();
        tracing::error!(entry = %entry.id, %why, %stream, "moving a result entry to the dead-letter stream");
        let dead_letter = shard.results_dead_letter();
        let moved: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(&dead_letter)
            .arg("*")
            .arg(nexus_pipeline::stream::PAYLOAD_FIELD)
            .arg(&entry.payload)
            .arg("result_id")
            .arg(&entry.id)
            .arg("reason")
            .arg(why)
            .ignore()
            .xack(stream, ORCHESTRATORS_GROUP, &[&entry.id])
            .ignore()
            .xdel(stream, &[&entry.id])
            .ignore()
            .query_async(&mut self.store.connection())
            .await;
        if let Err(error) = moved {
            tracing::warn!(%error, "dead-lettering a result failed; will retry");
        }
    }

    async fn apply(&self, shard: &ShardKeys, entry: &Entry) {
        let result = match PhaseResult::decode(entry.payload.as_slice()) {
            Ok(result) if result.version <= nexus_proto::STREAM_MESSAGE_VERSION => result,
            Ok(result) => {
                tracing::error!(entry = %entry.id, version = result.version, "result from a newer build; leaving it for a newer orchestrator");
                return;
            }
            Err(error) => {
                return self
                    .dead_letter_undecodable(shard, entry, &format!("undecodable result: {error}"))
                    .await;
            }
        };
        let span = tracing::info_span!("apply_result", workflow_id = %result.workflow_id, phase = result.phase_index);
        nexus_runtime::telemetry::join_trace(&span, &result.traceparent);
        let applied = self.store.apply_result(&entry.id, &result).instrument(span).await;
        count(&applied);
        match applied {
            Ok(ApplyOutcome::Applied(kind)) => {
                tracing::debug!(workflow_id = %result.workflow_id, phase = result.phase_index, kind, "result applied")
            }
            Ok(ApplyOutcome::Stale(why)) => tracing::info!(
                workflow_id = %result.workflow_id, phase = result.phase_index, attempt = result.attempt, %why,
                "ignored a stale or duplicate phase result"
            ),
            Ok(ApplyOutcome::Missing) => {
                tracing::warn!(workflow_id = %result.workflow_id, "result for a workflow that no longer exists")
            }
            Err(error) => {
                tracing::warn!(workflow_id = %result.workflow_id, %error, "applying result failed; it will be retried")
            }
        }
    }
}

/// Counts what applying a result did.
fn count(applied: &Result<ApplyOutcome, ApiError>) {
    let (result, finished) = match applied {
        Ok(ApplyOutcome::Applied("complete")) => ("applied", Some("completed")),
        Ok(ApplyOutcome::Applied("fail")) => ("applied", Some("failed")),
        Ok(ApplyOutcome::Applied(_)) => ("applied", None),
        Ok(ApplyOutcome::Stale(_)) => ("stale", None),
        Ok(ApplyOutcome::Missing) => ("missing", None),
        Err(_) => ("error", None),
    };
    METRICS.results.get_or_create(&StatusLabel { status: result }).inc();
    if let Some(status) = finished {
        METRICS.workflows_finished.get_or_create(&StatusLabel { status }).inc();
    }
}
