//! Claiming tasks: one read loop and one reclaim loop per shard.
//!
//! The read loop takes new tasks through the `workers` consumer group, never
//! more than this worker has free slots for. The reclaim loop takes over
//! tasks whose worker stopped heartbeating (it died, or lost Redis for longer
//! than the visibility timeout) and sends a task that keeps coming back to the
//! dead-letter stream, which fails its workflow with a reason.

use crate::runner::{RunnerContext, dead_letter_reason, run_task};
use crate::task_lifecycle::{Continuation, Started, Takeover, TaskHandle, dead_letter_entry};
use nexus_pipeline::connection::Connection;
use nexus_pipeline::connection::RedisArgs;
use nexus_pipeline::keys::ShardKeys;
use nexus_pipeline::stream::{Entry, WORKERS_GROUP, ensure_group, entry_of, prune_stale_consumers, read_new};
use nexus_proto::internal::PhaseTask;
use prost::Message;
use redis::streams::StreamRangeReply;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often departed workers' consumer names are cleaned from the group.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How long the reclaim loop waits for a free slot before leaving abandoned
/// tasks to a less busy worker (or its own next round).
const RECLAIM_SLOT_WAIT: Duration = Duration::from_secs(10);

/// Most tasks taken in one read.
const BATCH: usize = 64;

pub struct TaskConsumer {
    pub ctx: Arc<RunnerContext>,
    pub conn: Connection,
    pub redis: RedisArgs,
    pub consumer: Arc<str>,
    pub slots: Arc<Semaphore>,
    pub visibility_timeout: Duration,
    pub max_deliveries: u64,
    /// Task entries this worker is running now, which its reclaim loop must
    /// not take over from itself.
    pub running: Mutex<HashSet<String>>,
}

impl TaskConsumer {
    /// Reads new tasks from one shard until `stop` is cancelled. Slots are
    /// reserved before reading, so this worker never claims a task it has no
    /// room to run: tasks it cannot take stay in the stream for others,
    /// instead of idling unheartbeated in its pending list until reclaimed.
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
                let Some(mut slots) = self.reserve_slots(&stop).await else {
                    return;
                };
                let count = slots.num_permits();
                let read = tokio::select! {
                    _ = stop.cancelled() => return,
                    read = read_new(&mut blocking, &stream, WORKERS_GROUP, &self.consumer, count) => read,
                };
                match read {
                    Ok(entries) => {
                        for entry in entries {
                            let slot = slots.split(1).expect("one reserved slot per entry read");
                            self.clone().spawn_new(entry, shard, slot);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, %stream, "reading tasks failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Waits for at least one free slot, then takes every free one up to a
    /// batch. `None` when stopping.
    async fn reserve_slots(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let mut slots = tokio::select! {
            _ = stop.cancelled() => return None,
            slot = self.slots.clone().acquire_owned() => slot.ok()?,
        };
        let more = self.slots.available_permits().min(BATCH - 1);
        if let Ok(extra) = self.slots.clone().try_acquire_many_owned(more as u32) {
            slots.merge(extra);
        }
        Some(slots)
    }

    /// Runs a newly read entry, as the task's own attempt, first delivery.
    /// Decoded before spawning, so the task holds the decoded task and not
    /// the entry, and its cell holds only the boxed run: a spawned future is
    /// moved a few times on its way into its task (a box is moved once), and
    /// the cell keeps its size for as long as the call stays open.
    fn spawn_new(self: Arc<Self>, entry: Entry, shard: u16, slot: OwnedSemaphorePermit) {
        match self.decode_entry(&entry) {
            Decoded::Task(handle, task) => {
                tokio::spawn(Box::pin(self.run(Arc::new(handle), task, 1, slot)));
            }
            Decoded::Newer => {}
            Decoded::Unrunnable(why) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    self.dead_letter_undecodable(&entry, shard, &why).await
                });
            }
        }
    }

    /// Runs a task, keeping its entry in the running set (so this worker's
    /// reclaim loop leaves it alone) and its slot until it ends; then, in the
    /// same slot, the task its settling claimed (often the same workflow's
    /// next phase), and so on.
    ///
    /// The task's future is this one, spawned as it is: wrapped in an
    /// `async` block it would keep the arguments twice (rust-lang/rust#62958).
    fn run(
        self: Arc<Self>,
        handle: Arc<TaskHandle>,
        task: Box<PhaseTask>,
        delivery: u64,
        slot: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> {
        async move {
            // Named here, so the block owns the slot until the runs end (an
            // argument a block never names is dropped when it is built).
            let _slot = slot;
            let shard = handle.workflow.shard();
            let mut next = {
                let _running = RunningGuard::new(&self.running, &handle.entry_id);
                run_task(&self.ctx, handle, task, delivery, None).await
            };
            // `let … else` and `match`, not `while let` and a local: a
            // temporary there would keep its room in this future through every
            // call that follows (224 bytes, print-type-sizes).
            loop {
                let Some(continuation) = next.take() else {
                    return;
                };
                // Moved whole into the decode, not taken apart here: a local
                // taken apart or borrowed keeps its room to the end of its
                // scope, and so through the call.
                let (_running, handle, task, started) = match self.decode_continuation(continuation, shard).await {
                    Some(decoded) => decoded,
                    None => continue,
                };
                next = run_task(&self.ctx, Arc::new(handle), task, 1, started).await;
            }
        }
    }

    /// The task a settle claimed, decoded, in the running set from before
    /// its decode; `None` when it is not to be run (see [`Self::decode`]).
    async fn decode_continuation(
        &self,
        continuation: Continuation,
        shard: u16,
    ) -> Option<(RunningGuard<'_>, TaskHandle, Box<PhaseTask>, Option<Box<Started>>)> {
        let Continuation { entry, started } = continuation;
        let running = RunningGuard::new(&self.running, &entry.id);
        let (handle, task) = self.decode(&entry, shard).await?;
        Some((running, handle, task, started))
    }

    /// Decodes a task entry; one that cannot be decoded, or names no valid
    /// workflow, goes to the dead-letter stream at once (no delivery can fix
    /// it). A task from a newer build is left for a newer worker. The
    /// dead-letter path is boxed: it is rare, and a run awaits this decode
    /// for each task it continues with, so inline it would make every run's
    /// state larger (1.3 KB, when it was measured).
    async fn decode(&self, entry: &Entry, shard: u16) -> Option<(TaskHandle, Box<PhaseTask>)> {
        match self.decode_entry(entry) {
            Decoded::Task(handle, task) => Some((handle, task)),
            Decoded::Newer => None,
            Decoded::Unrunnable(why) => {
                Box::pin(self.dead_letter_undecodable(entry, shard, &why)).await;
                None
            }
        }
    }

    /// What an entry holds. The task is boxed: each future it passes
    /// through keeps a slot for it (344 bytes) for the whole call.
    fn decode_entry(&self, entry: &Entry) -> Decoded {
        let task = match PhaseTask::decode(entry.payload.as_slice()) {
            Ok(task) if task.version <= nexus_proto::STREAM_MESSAGE_VERSION => Box::new(task),
            Ok(task) => {
                tracing::error!(entry = %entry.id, version = task.version, "task from a newer build; leaving it for a newer worker");
                return Decoded::Newer;
            }
            Err(error) => return Decoded::Unrunnable(format!("undecodable task: {error}")),
        };
        match TaskHandle::new(self.conn.clone(), entry.id.clone(), self.consumer.clone(), &task) {
            Ok(handle) => Decoded::Task(handle, task),
            Err(error) => Decoded::Unrunnable(format!("task names no valid workflow: {error}")),
        }
    }

    async fn dead_letter_undecodable(&self, entry: &Entry, shard: u16, why: &str) {
        tracing::error!(entry = %entry.id, %why, "moving the task entry to the dead-letter stream");
        crate::metrics::METRICS.tasks_dead_lettered.inc();
        let shard = ShardKeys::new(shard);
        let moved = dead_letter_entry(&mut self.conn.clone(), &shard, &entry.id, &entry.payload, why).await;
        if let Err(error) = moved {
            tracing::warn!(%error, "dead-lettering failed; will retry");
        }
    }

    /// Takes over tasks of dead workers from one shard until `stop`.
    pub async fn reclaim_loop(self: Arc<Self>, shard: u16, stop: CancellationToken) {
        let stream = ShardKeys::new(shard).tasks();
        let every = (self.visibility_timeout / 4).max(Duration::from_millis(100));
        let mut last_prune = tokio::time::Instant::now();
        let mut hold_until: Option<tokio::time::Instant> = None;
        let mut quiet = nexus_pipeline::connection::LogBackoff::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if hold_until.is_some_and(|until| tokio::time::Instant::now() < until) {
                continue;
            }
            match self.redis_just_restarted().await {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    // Redis was away: every task's idle time now includes the
                    // outage, and live workers have not heartbeated yet.
                    // Give them one visibility timeout to reassert their
                    // claims before taking anything over.
                    hold_until = Some(tokio::time::Instant::now() + self.visibility_timeout);
                    continue;
                }
            }
            match self.reclaim(shard, &stream).await {
                Ok(()) => quiet.reset(),
                Err(error) => {
                    hold_until = Some(tokio::time::Instant::now() + self.visibility_timeout);
                    if quiet.should_log() {
                        tracing::warn!(%error, %stream, "reclaiming tasks failed; will retry");
                    }
                }
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

    /// Whether the Redis server started less than a visibility timeout ago
    /// (so its pending entries' idle times include its downtime). Known for a
    /// single server; on a cluster, node restarts are noticed through the
    /// errors they cause instead.
    async fn redis_just_restarted(&self) -> redis::RedisResult<bool> {
        if self.redis.redis_cluster {
            return Ok(false);
        }
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn.clone())
            .await?;
        let uptime_secs: u64 = info
            .lines()
            .find_map(|line| line.strip_prefix("uptime_in_seconds:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(u64::MAX);
        Ok(Duration::from_secs(uptime_secs) < self.visibility_timeout)
    }

    /// Takes over idle tasks, each as a new attempt, as far as free slots
    /// allow; dead-letters those delivered too often.
    async fn reclaim(self: &Arc<Self>, shard: u16, stream: &str) -> redis::RedisResult<()> {
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
        for (entry_id, previous_owner, _idle, _deliveries) in pending {
            if self.is_running(&entry_id) {
                continue;
            }
            // Queue for a slot like the read loops do (the semaphore is
            // fair): a worker with few slots must still get to take over
            // tasks of a dead one. Full for a while: another worker may.
            let Ok(Ok(slot)) = tokio::time::timeout(RECLAIM_SLOT_WAIT, self.slots.clone().acquire_owned()).await else {
                return Ok(());
            };
            let Some(entry) = self.read_entry(stream, &entry_id).await? else {
                // Deleted but still pending (settled by a script that died
                // half-way is impossible; a manual XDEL is not): drop it.
                let _: i64 =
                    redis::AsyncCommands::xack(&mut self.conn.clone(), stream, WORKERS_GROUP, &[&entry_id]).await?;
                continue;
            };
            let Some((mut handle, task)) = self.decode(&entry, shard).await else {
                continue;
            };
            match handle.take_over(idle_ms).await? {
                Takeover::Claimed {
                    attempt,
                    deliveries,
                    starts,
                } => {
                    tracing::info!(entry = %entry.id, %previous_owner, attempt, deliveries, starts, "took over a task from an unresponsive worker");
                    crate::metrics::METRICS.tasks_reclaimed.inc();
                    if is_poison(starts, deliveries, self.max_deliveries) {
                        self.dead_letter(&handle, &task, &entry, starts.max(deliveries.saturating_sub(1)))
                            .await;
                    } else {
                        tokio::spawn(Box::pin(self.clone().run(Arc::new(handle), task, deliveries, slot)));
                    }
                }
                Takeover::Stale => {
                    tracing::info!(entry = %entry.id, "dropped an abandoned task the workflow no longer needs")
                }
                Takeover::Gone => {}
            }
        }
        Ok(())
    }

    /// One task entry by id; `None` when it was deleted meanwhile.
    async fn read_entry(&self, stream: &str, entry_id: &str) -> redis::RedisResult<Option<Entry>> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(reply.ids.into_iter().next().map(entry_of))
    }

    fn is_running(&self, entry_id: &str) -> bool {
        self.running.lock().expect("running set lock").contains(entry_id)
    }

    async fn dead_letter(&self, handle: &TaskHandle, task: &PhaseTask, entry: &Entry, deliveries: u64) {
        tracing::warn!(workflow_id = %handle.workflow, phase = task.phase_index, deliveries, "task delivered too often; dead-lettering it");
        crate::metrics::METRICS.tasks_dead_lettered.inc();
        let phase = nexus_pipeline::transition::task_phase_name(task);
        let reason = format!("phase {phase} failed: {}", dead_letter_reason(deliveries));
        match handle.dead_letter(&entry.payload, phase, deliveries, &reason).await {
            Ok(true) => crate::metrics::record_applied(nexus_pipeline::transition::Step::Fail),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "dead-lettering failed; will retry"),
        }
    }
}

/// Whether a task taken over is poison: it was started `max` times and
/// never finished (it crashes or stalls whoever runs it). Takeovers by
/// workers that died before they started it do not count: under heavy churn
/// a newly started worker takes over many abandoned tasks at once, and if it
/// dies too, those tasks did nothing wrong. Past four times `max` deliveries
/// a task is given up on all the same (it cannot even be started).
fn is_poison(starts: u64, deliveries: u64, max: u64) -> bool {
    starts >= max || deliveries > max.saturating_mul(4)
}

/// A task entry, decoded.
enum Decoded {
    Task(TaskHandle, Box<PhaseTask>),
    /// From a newer build: left for a newer worker.
    Newer,
    /// Undecodable, or naming no valid workflow: no delivery can fix it.
    Unrunnable(String),
}

/// Keeps an entry in the running set while its task runs.
struct RunningGuard<'a> {
    running: &'a Mutex<HashSet<String>>,
    entry_id: String,
}

impl<'a> RunningGuard<'a> {
    fn new(running: &'a Mutex<HashSet<String>>, entry_id: &str) -> Self {
        running.lock().expect("running set lock").insert(entry_id.to_string());
        Self {
            running,
            entry_id: entry_id.to_string(),
        }
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.running.lock().expect("running set lock").remove(&self.entry_id);
    }
}

#[cfg(test)]
mod tests {
    use super::is_poison;

    #[test]
    fn only_tasks_started_and_never_finished_are_poison() {
        assert!(is_poison(5, 6, 5), "started five times");
        assert!(!is_poison(1, 6, 5), "taken over often, started once: churn, not poison");
        assert!(is_poison(0, 21, 5), "never even started in 20 deliveries");
    }
}
