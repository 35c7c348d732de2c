//! Consuming phase results.
//!
//! Every replica reads every shard's result stream through the shared
//! `orchestrators` group, so each result goes to one replica. Results left
//! unacknowledged by a replica that died are claimed after an idle time and
//! applied here; applying is fenced, so a result applied twice changes
//! nothing the second time.

use crate::errors::ApiError;
use crate::metrics::{METRICS, StatusLabel};
use crate::state::{ApplyOutcome, WorkflowStore};
use nexus_pipeline::connection::{Connection, RedisArgs};
use nexus_pipeline::keys::ShardKeys;
use nexus_pipeline::stream::{Entry, ORCHESTRATORS_GROUP, ensure_group, entry_of, read_new};
use nexus_proto::internal::PhaseResult;
use prost::Message;
use redis::streams::StreamAutoClaimReply;
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
        let stream = ShardKeys::new(shard).results();
        let mut last_claim = tokio::time::Instant::now();
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
                    if let Err(error) = self.claim_abandoned(&mut blocking, &stream).await {
                        tracing::warn!(%error, "claiming abandoned results failed");
                    }
                }
                let read = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    read = read_new(&mut blocking, &stream, ORCHESTRATORS_GROUP, &self.consumer, BATCH) => read,
                };
                match read {
                    Ok(entries) => self.apply_all(&stream, entries).await,
                    Err(error) => {
                        tracing::warn!(%error, %stream, "reading results failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Takes over results that another replica read but never applied.
    async fn claim_abandoned(&self, conn: &mut Connection, stream: &str) -> redis::RedisResult<()> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(ORCHESTRATORS_GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        if !reply.claimed.is_empty() {
            tracing::info!(count = reply.claimed.len(), %stream, "claimed results abandoned by another orchestrator");
        }
        self.apply_all(stream, reply.claimed.into_iter().map(entry_of).collect())
            .await;
        Ok(())
    }

    async fn apply_all(&self, stream: &str, entries: Vec<Entry>) {
        futures::future::join_all(entries.iter().map(|entry| self.apply(stream, entry))).await;
    }

    async fn discard(&self, stream: &str, entry: &Entry) {
        let discarded: redis::RedisResult<()> = redis::pipe()
            .xack(stream, ORCHESTRATORS_GROUP, &[&entry.id])
            .xdel(stream, &[&entry.id])
            .query_async(&mut self.store.connection())
            .await;
        if let Err(error) = discarded {
            tracing::warn!(%error, "discarding a result failed");
        }
    }

    async fn apply(&self, stream: &str, entry: &Entry) {
        let result = match PhaseResult::decode(entry.payload.as_slice()) {
            Ok(result) if result.version <= nexus_proto::STREAM_MESSAGE_VERSION => result,
            Ok(result) => {
                tracing::error!(entry = %entry.id, version = result.version, "result from a newer build; leaving it for a newer orchestrator");
                return;
            }
            Err(error) => {
                tracing::error!(entry = %entry.id, %error, "undecodable result; discarding it");
                return self.discard(stream, entry).await;
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
