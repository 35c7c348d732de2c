//! Keeping the claims of a worker's running tasks.
//!
//! A task entry that stays unacknowledged longer than the visibility
//! timeout is taken over by another worker, so a live worker renews the
//! claim of each task it runs (`heartbeat.lua`, which also answers whether
//! the task is still this worker's and still current). The renewals are one
//! loop for the whole worker, on one timer, as BullMQ extends the locks of
//! all of a worker's active jobs at once: a timer in each task's future cost
//! room in every call held open (184 bytes, print-type-sizes) and a timer
//! registered and removed in every phase. A task is held here from before
//! its start is fenced until its run has settled it (or handed it back);
//! one found lost has its stop token cancelled, which aborts its model
//! call. The keeper's first renewal of a task comes at its next round,
//! within one interval of the hold, as a task's own timer's did.

use crate::task_lifecycle::TaskHandle;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How many renewals are on the way to Redis at once. More make a round's
/// buffers the worker's peak: with 10,000 calls held, 1,024 at once read
/// 10.0, 11.7 and 17.6 KB of RSS per held call, 256 at once 8.9, 9.5 and 9.1.
const RENEWALS_AT_ONCE: usize = 256;
/// The shortest interval between rounds (a zero one would spin).
const SHORTEST_INTERVAL: Duration = Duration::from_millis(10);

/// The tasks whose claims this worker renews.
pub struct ClaimKeeper {
    held: Mutex<HashMap<u64, HeldTask>>,
    next_id: AtomicU64,
    /// What `HeldTask::held_at` counts from.
    epoch: Instant,
}

impl Default for ClaimKeeper {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            next_id: AtomicU64::default(),
            epoch: Instant::now(),
        }
    }
}

struct HeldTask {
    handle: Arc<TaskHandle>,
    /// Cancelled when the task turns out not to be ours any more.
    stop: CancellationToken,
    /// When it was first held, in milliseconds from the keeper's epoch.
    held_at: u64,
}

/// A task's place among the renewed claims; it leaves when this drops.
pub struct HeldClaim<'a> {
    keeper: &'a ClaimKeeper,
    id: u64,
}

impl ClaimKeeper {
    /// Renews `handle`'s claim until the returned guard drops; `stop` is
    /// cancelled if a renewal finds the task lost.
    pub fn hold(&self, handle: Arc<TaskHandle>, stop: CancellationToken) -> HeldClaim<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let held_at = self.millis_now();
        self.lock().insert(id, HeldTask { handle, stop, held_at });
        HeldClaim { keeper: self, id }
    }

    /// Renews every held claim each `every`, until the process ends. A round
    /// that takes longer than `every` delays the next rather than crowding
    /// it; a renewal gets half of `every`, so one slow node of a cluster
    /// holds up the others' renewals by that at most, and not by its
    /// client's whole timeout.
    pub async fn renew_forever(self: Arc<Self>, every: Duration) {
        let every = every.max(SHORTEST_INTERVAL);
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.renew_all(every).await;
        }
    }

    /// Renews the claims held for at least half an interval: a younger one
    /// was claimed so lately that it will still be young enough at the next
    /// round (at most one and a half intervals old, where a claim lasts
    /// three), and most calls end before then. So a worker with 10,000
    /// one-second calls in flight sends no renewals at all, as when each
    /// task had a timer of its own.
    async fn renew_all(&self, every: Duration) {
        let old_enough = self.millis_now().saturating_sub(every.as_millis() as u64 / 2);
        let patience = every / 2;
        let held: Vec<(Arc<TaskHandle>, CancellationToken)> = self
            .lock()
            .values()
            .filter(|task| task.held_at <= old_enough)
            .map(|task| (task.handle.clone(), task.stop.clone()))
            .collect();
        futures::stream::iter(held)
            .for_each_concurrent(RENEWALS_AT_ONCE, |(handle, stop)| async move {
                if tokio::time::timeout(patience, renew(&handle, &stop)).await.is_err() {
                    tracing::warn!(workflow_id = %handle.workflow, "heartbeat took too long; will retry");
                }
            })
            .await;
    }

    fn millis_now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HeldTask>> {
        self.held.lock().expect("claim keeper lock")
    }
}

/// One renewal. A task this worker is acknowledging is renewed (a settle
/// that retries through a Redis outage still needs its claim) but not
/// reported lost: once its entry is acknowledged, the script finds it gone.
/// A task already stopping is left alone.
async fn renew(handle: &TaskHandle, stop: &CancellationToken) {
    if stop.is_cancelled() {
        return;
    }
    match handle.heartbeat().await {
        Ok(true) => {}
        Ok(false) if !handle.is_ending() && !stop.is_cancelled() => {
            tracing::info!(workflow_id = %handle.workflow, "task no longer ours or current; aborting the model call");
            stop.cancel();
        }
        Ok(false) => {}
        Err(error) => tracing::warn!(workflow_id = %handle.workflow, %error, "heartbeat failed; will retry"),
    }
}

impl Drop for HeldClaim<'_> {
    fn drop(&mut self) {
        self.keeper.lock().remove(&self.id);
    }
}
