//! Aborting in-flight model calls of cancelled workflows.
//!
//! Each running task registers a token under its workflow id. One pub/sub
//! connection per worker listens on the cancel channel and cancels the
//! tokens of the named workflow, which aborts the HTTP request within
//! milliseconds. A task registers before its start is fenced, so a cancel
//! that lands between the claim and the start is seen by the fence, and one
//! after it by the token. A task started by the script that claimed it
//! registers just after its start: a cancel heard in between is remembered
//! for a while ([`REMEMBER_CANCELS`]) and cancels the token as it registers.
//! Messages published while the subscription was
//! down are lost, so every (re)subscription re-checks the status of every
//! registered workflow. The heartbeat and every event append re-check the
//! workflow too, as a last resort.

use futures::StreamExt;
use nexus_pipeline::connection::{Connection, RedisArgs};
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{CANCEL_CHANNEL, WorkflowKeys, field, status};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a cancellation is remembered for tasks that register after it.
const REMEMBER_CANCELS: Duration = Duration::from_secs(30);

/// Keyed by the parsed id, so a registration allocates no key of its own,
/// and each workflow's tokens are a short list (usually of one): a task in
/// flight keeps its entry for its whole call (a map of strings to maps kept
/// about 250 bytes per call in flight, heaptrack).
#[derive(Default)]
pub struct CancelRegistry {
    running: Mutex<HashMap<WorkflowId, Vec<(u64, CancellationToken)>>>,
    /// Workflows cancelled lately, and when this worker heard it.
    recent: Mutex<HashMap<WorkflowId, Instant>>,
    next_id: AtomicU64,
}

/// Removes its token from the registry when the task ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    workflow: WorkflowId,
    id: u64,
    pub token: CancellationToken,
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, workflow: WorkflowId, parent: &CancellationToken) -> Registration {
        let token = parent.child_token();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // `recent` is read with `running` held: a cancel records the
        // workflow in `recent` before it looks in `running`, so it lands
        // either before this check or after the token is in (checked first
        // and inserted after, a cancel in between reached neither).
        let mut running = self.running.lock().expect("cancel registry lock");
        if self
            .recent
            .lock()
            .expect("cancel registry lock")
            .contains_key(&workflow)
        {
            token.cancel();
        }
        running.entry(workflow).or_default().push((id, token.clone()));
        Registration {
            registry: self.clone(),
            workflow,
            id,
            token,
        }
    }

    fn cancel(&self, workflow: WorkflowId) {
        {
            let mut recent = self.recent.lock().expect("cancel registry lock");
            let now = Instant::now();
            recent.retain(|_, heard| now.duration_since(*heard) < REMEMBER_CANCELS);
            recent.insert(workflow, now);
        }
        let running = self.running.lock().expect("cancel registry lock");
        if let Some(tokens) = running.get(&workflow) {
            tracing::info!(workflow_id = %workflow, calls = tokens.len(), "workflow cancelled; aborting its model calls");
            tokens.iter().for_each(|(_, token)| token.cancel());
        }
    }

    /// Listens for cancellations until the process ends.
    pub async fn listen(self: Arc<Self>, redis: RedisArgs, conn: Connection) {
        nexus_pipeline::connection::listen_forever("cancel notifications", || self.listen_once(&redis, &conn)).await
    }

    async fn listen_once(&self, redis: &RedisArgs, conn: &Connection) -> redis::RedisResult<()> {
        let client = redis.pubsub_client()?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CANCEL_CHANNEL).await?;
        self.recheck_all(conn.clone()).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            // A payload that is not an id (nothing of ours publishes one) names no call to stop.
            let workflow = message
                .get_payload::<String>()
                .ok()
                .and_then(|id| WorkflowId::parse(&id).ok());
            if let Some(workflow) = workflow {
                self.cancel(workflow);
            }
        }
        Ok(())
    }
}

impl CancelRegistry {
    /// Cancels the calls of every registered workflow that has ended: the
    /// cancellations published while this worker was not subscribed.
    async fn recheck_all(&self, mut conn: Connection) -> redis::RedisResult<()> {
        let workflows: Vec<WorkflowId> = self
            .running
            .lock()
            .expect("cancel registry lock")
            .keys()
            .copied()
            .collect();
        for workflow in workflows {
            let status: Option<String> =
                redis::AsyncCommands::hget(&mut conn, WorkflowKeys::new(&workflow).state(), field::STATUS).await?;
            if status.is_none_or(|status| status::is_terminal(&status)) {
                self.cancel(workflow);
            }
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.registry.running.lock().expect("cancel registry lock");
        if let Some(tokens) = running.get_mut(&self.workflow) {
            tokens.retain(|(id, _)| *id != self.id);
            if tokens.is_empty() {
                running.remove(&self.workflow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_heard_before_a_task_registers_cancels_it_on_registering() {
        let registry = Arc::new(CancelRegistry::default());
        let parent = CancellationToken::new();
        let (cancelled, other) = (WorkflowId::new(0), WorkflowId::new(0));
        let before = registry.register(cancelled, &parent);
        registry.cancel(cancelled);
        assert!(before.token.is_cancelled());
        let after = registry.register(cancelled, &parent);
        assert!(after.token.is_cancelled(), "registered after the cancel was heard");
        let other = registry.register(other, &parent);
        assert!(!other.token.is_cancelled());
    }

    #[test]
    fn a_registration_leaves_when_its_task_ends_and_takes_only_its_own_token() {
        let registry = Arc::new(CancelRegistry::default());
        let parent = CancellationToken::new();
        let workflow = WorkflowId::new(0);
        let first = registry.register(workflow, &parent);
        let second = registry.register(workflow, &parent);
        drop(first);
        registry.cancel(workflow);
        assert!(second.token.is_cancelled(), "the task still running was reached");
        drop(second);
        assert!(registry.running.lock().unwrap().is_empty());
    }
}
