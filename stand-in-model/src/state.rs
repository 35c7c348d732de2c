//! What the handlers share: the config, the fault queue and the request log. Locks are plain
//! mutexes held for a few instructions and never across an `.await`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::config::StandInConfig;
use crate::faults::{Fault, FaultQueue, FaultSpec};

/// One chat request as the control API reports it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RequestRecord {
    pub seq: u64,
    pub model: String,
    pub stream: bool,
    pub structured: bool,
    pub prompt_excerpt: String,
    pub outcome: String,
    /// When the request arrived, in milliseconds since the Unix epoch, so
    /// tests can check pacing and back-off across workers.
    pub received_ms: u64,
}

#[derive(Clone)]
pub(crate) struct Shared(Arc<Inner>);

struct Inner {
    config: StandInConfig,
    faults: Mutex<FaultQueue>,
    log: Mutex<Vec<RequestRecord>>,
    next_seq: AtomicU64,
}

/// Poisoning only means another handler panicked mid-update; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn new(config: StandInConfig) -> Self {
        Self(Arc::new(Inner {
            config,
            faults: Mutex::default(),
            log: Mutex::default(),
            next_seq: AtomicU64::new(1),
        }))
    }

    pub(crate) fn config(&self) -> &StandInConfig {
        &self.0.config
    }

    pub(crate) fn queue_faults(&self, specs: Vec<FaultSpec>) {
        lock(&self.0.faults).extend(specs);
    }

    pub(crate) fn clear_faults(&self) -> usize {
        lock(&self.0.faults).clear()
    }

    pub(crate) fn pending_faults(&self) -> Vec<FaultSpec> {
        lock(&self.0.faults).pending()
    }

    pub(crate) fn take_fault(&self, model: &str) -> Option<Fault> {
        lock(&self.0.faults).take(model)
    }

    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.0.log).clone()
    }

    pub(crate) fn clear_requests(&self) -> usize {
        std::mem::take(&mut *lock(&self.0.log)).len()
    }

    /// Logs a request as in progress; the returned guard records how it ended.
    pub(crate) fn record(&self, mut record: RequestRecord) -> Outcome {
        record.seq = self.0.next_seq.fetch_add(1, Ordering::Relaxed);
        record.outcome = "in_progress".into();
        record.received_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or_default();
        let seq = record.seq;
        lock(&self.0.log).push(record);
        Outcome {
            shared: self.clone(),
            seq,
            settled: false,
        }
    }

    fn set_outcome(&self, seq: u64, outcome: String) {
        tracing::info!(seq, %outcome, "chat request finished");
        if let Some(record) = lock(&self.0.log).iter_mut().find(|r| r.seq == seq) {
            record.outcome = outcome;
        }
    }
}

/// How a logged request ended. Dropping it unsettled means the server stopped serving the
/// request early, which only happens when the client hung up.
pub(crate) struct Outcome {
    shared: Shared,
    seq: u64,
    settled: bool,
}

impl Outcome {
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn settle(mut self, outcome: impl Into<String>) {
        self.settled = true;
        self.shared.set_outcome(self.seq, outcome.into());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.set_outcome(self.seq, "client_disconnected".into());
        }
    }
}
