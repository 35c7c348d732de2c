//! Claiming tasks: one read loop and one reclaim loop per shard.
//!
//! The read loop takes new tasks through the `workers` consumer group, never
//! more than this worker has free slots for. The reclaim loop takes over
//! tasks whose worker stopped heartbeating (it died, or lost Redis for longer
//! than the visibility timeout) and sends a task that keeps coming back to the
//! dead-letter stream, which fails its workflow with a reason.

use crate::runner::{RunnerContext, dead_letter_result, run_task};
use crate::task_lifecycle::TaskHandle;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::connection::RedisArgs;
use nexus_pipeline::keys::ShardKeys;
use nexus_pipeline::stream::{Entry, WORKERS_GROUP, ensure_group, entry_of, prune_stale_consumers, read_new};
use nexus_proto::internal::PhaseTask;
use prost::Message;
use redis::streams::StreamClaimReply;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How often departed workers' consumer names are cleaned from the group.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Most tasks taken in one read.
const BATCH: usize = 64;

pub struct TaskConsumer {
    pub ctx: Arc<RunnerContext>,
    pub conn: Connection,
    pub redis: RedisArgs,
    pub consumer: String,
    pub slots: Arc<Semaphore>,
    pub visibility_timeout: Duration,
    pub max_deliveries: u64,
}

impl TaskConsumer {
    /// Reads new tasks from one shard until `stop` is cancelled.
    pub async fn read_loop(self: Arc<Self>, shard: u16, stop: CancellationToken) {
        let stream = ShardKeys::new(shard).tasks();
        while !stop.is_cancelled() {
            let Ok(mut blocking) = self.redis.connect_patiently(true).await else {
                continue;
            };
            if let Err(error) = ensure_group(&mut blocking, &stream, WORKERS_GROUP).await {
                tracing::warn!(%error, %stream, "cannot create workers group; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            while !stop.is_cancelled() {
                let free = self.wait_for_free_slot(&stop).await;
                let read = tokio::select! {
                    _ = stop.cancelled() => return,
                    read = read_new(&mut blocking, &stream, WORKERS_GROUP, &self.consumer, free.max(1)) => read,
                };
                match read {
                    Ok(entries) => entries.into_iter().for_each(|entry| self.clone().spawn_task(entry, 1)),
                    Err(error) => {
                        tracing::warn!(%error, %stream, "reading tasks failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    async fn wait_for_free_slot(&self, stop: &CancellationToken) -> usize {
        loop {
            let free = self.slots.available_permits();
            if free > 0 {
                return free.min(BATCH);
            }
            tokio::select! {
                _ = stop.cancelled() => return 0,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    fn spawn_task(self: Arc<Self>, entry: Entry, delivery: u64) {
        tokio::spawn(async move {
            let Ok(_slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            let Some((handle, task)) = self.decode(&entry).await else {
                return;
            };
            run_task(&self.ctx, handle, task, delivery).await;
        });
    }

    async fn decode(&self, entry: &Entry) -> Option<(TaskHandle, PhaseTask)> {
        let task = match PhaseTask::decode(entry.payload.as_slice()) {
            Ok(task) if task.version <= nexus_proto::STREAM_MESSAGE_VERSION => task,
            Ok(task) => {
                tracing::error!(entry = %entry.id, version = task.version, "task from a newer build; leaving it for a newer worker");
                return None;
            }
            Err(error) => {
                tracing::error!(entry = %entry.id, %error, "undecodable task; it will end in the dead-letter stream");
                return None;
            }
        };
        match TaskHandle::new(self.conn.clone(), entry.id.clone(), self.consumer.clone(), &task) {
            Ok(handle) => Some((handle, task)),
            Err(error) => {
                tracing::error!(entry = %entry.id, %error, "task names no valid workflow");
                None
            }
        }
    }

    /// Takes over tasks of dead workers from one shard until `stop`.
    pub async fn reclaim_loop(self: Arc<Self>, shard: u16, stop: CancellationToken) {
        let stream = ShardKeys::new(shard).tasks();
        let every = (self.visibility_timeout / 4).max(Duration::from_millis(100));
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(error) = self.reclaim(&stream).await {
                tracing::warn!(%error, %stream, "reclaiming tasks failed; will retry");
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                match prune_stale_consumers(&mut self.conn.clone(), &stream, WORKERS_GROUP).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, %stream, "removed consumers of long-gone workers"),
                    Err(error) => tracing::warn!(%error, "pruning stale consumers failed"),
                }
            }
        }
    }

    async fn reclaim(self: &Arc<Self>, stream: &str) -> redis::RedisResult<()> {
        let idle_ms = self.visibility_timeout.as_millis() as u64;
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(WORKERS_GROUP)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("-")
            .arg("+")
            .arg(BATCH)
            .query_async(&mut self.conn.clone())
            .await?;
        for (entry_id, previous_owner, _idle, deliveries) in pending {
            let claimed: StreamClaimReply = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(WORKERS_GROUP)
                .arg(&self.consumer)
                .arg(idle_ms)
                .arg(&entry_id)
                .query_async(&mut self.conn.clone())
                .await?;
            for entry in claimed.ids.into_iter().map(entry_of) {
                tracing::info!(entry = %entry.id, %previous_owner, deliveries, "reclaimed a task from an unresponsive worker");
                crate::metrics::METRICS.tasks_reclaimed.inc();
                if deliveries >= self.max_deliveries {
                    self.dead_letter(&entry, deliveries + 1).await;
                } else {
                    self.clone().spawn_task(entry, deliveries + 1);
                }
            }
        }
        Ok(())
    }

    async fn dead_letter(&self, entry: &Entry, deliveries: u64) {
        let task = PhaseTask::decode(entry.payload.as_slice()).unwrap_or_default();
        let handle = match TaskHandle::new(self.conn.clone(), entry.id.clone(), self.consumer.clone(), &task) {
            Ok(handle) => handle,
            Err(error) => {
                tracing::error!(entry = %entry.id, %error, "poison task names no valid workflow; leaving it pending");
                return;
            }
        };
        let failure = dead_letter_result(&handle, &task, deliveries);
        tracing::warn!(workflow_id = %handle.workflow, phase = task.phase_index, deliveries, "task delivered too often; dead-lettering it");
        crate::metrics::METRICS.tasks_dead_lettered.inc();
        if let Err(error) = handle.dead_letter(&entry.payload, &failure, deliveries).await {
            tracing::warn!(%error, "dead-lettering failed; will retry");
        }
    }
}
