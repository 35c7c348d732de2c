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

#[derive(Default)]
pub struct CancelRegistry {
    running: Mutex<HashMap<String, HashMap<u64, CancellationToken>>>,
    /// Workflows cancelled lately, and when this worker heard it.
    recent: Mutex<HashMap<String, Instant>>,
    next_id: AtomicU64,
}

/// Removes its token from the registry when the task ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    workflow_id: String,
    id: u64,
    pub token: CancellationToken,
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, workflow_id: &str, parent: &CancellationToken) -> Registration {
        let token = parent.child_token();
        if self
            .recent
            .lock()
            .expect("cancel registry lock")
            .contains_key(workflow_id)
        {
            token.cancel();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut running = self.running.lock().expect("cancel registry lock");
        running
            .entry(workflow_id.to_string())
            .or_default()
            .insert(id, token.clone());
        Registration {
            registry: self.clone(),
            workflow_id: workflow_id.to_string(),
            id,
            token,
        }
    }

    fn cancel(&self, workflow_id: &str) {
        {
            let mut recent = self.recent.lock().expect("cancel registry lock");
            let now = Instant::now();
            recent.retain(|_, heard| now.duration_since(*heard) < REMEMBER_CANCELS);
            recent.insert(workflow_id.to_string(), now);
        }
        let running = self.running.lock().expect("cancel registry lock");
        if let Some(tokens) = running.get(workflow_id) {
            tracing::info!(%workflow_id, calls = tokens.len(), "workflow cancelled; aborting its model calls");
            tokens.values().for_each(CancellationToken::cancel);
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
            if let Ok(workflow_id) = message.get_payload::<String>() {
                self.cancel(&workflow_id);
            }
        }
        Ok(())
    }
}

impl CancelRegistry {
    /// Cancels the calls of every registered workflow that has ended: the
    /// cancellations published while this worker was not subscribed.
    async fn recheck_all(&self, mut conn: Connection) -> redis::RedisResult<()> {
        let workflows: Vec<String> = self
            .running
            .lock()
            .expect("cancel registry lock")
            .keys()
            .cloned()
            .collect();
        for workflow_id in workflows {
            let Ok(id) = WorkflowId::parse(&workflow_id) else {
                continue;
            };
            let status: Option<String> =
                redis::AsyncCommands::hget(&mut conn, WorkflowKeys::new(&id).state(), field::STATUS).await?;
            if status.is_none_or(|status| status::is_terminal(&status)) {
                self.cancel(&workflow_id);
            }
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.registry.running.lock().expect("cancel registry lock");
        if let Some(tokens) = running.get_mut(&self.workflow_id) {
            tokens.remove(&self.id);
            if tokens.is_empty() {
                running.remove(&self.workflow_id);
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
        let before = registry.register("wf_0_a", &parent);
        registry.cancel("wf_0_a");
        assert!(before.token.is_cancelled());
        let after = registry.register("wf_0_a", &parent);
        assert!(after.token.is_cancelled(), "registered after the cancel was heard");
        let other = registry.register("wf_0_b", &parent);
        assert!(!other.token.is_cancelled());
    }
}
