//! What the handlers share: the config, the fault queue and the request log. Locks are plain
//! mutexes held for a few instructions and never across an `.await`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use serde::Serialize;

use crate::PlainListener;
use crate::config::StandInConfig;
use crate::faults::{Fault, FaultQueue, FaultSpec};
use crate::tls::TlsListener;

/// One chat request as the control API reports it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RequestRecord {
    pub seq: u64,
    pub model: String,
    pub stream: bool,
    pub structured: bool,
    pub prompt_excerpt: String,
    /// The end of the system prompt (where per-run instructions go).
    pub system_tail: String,
    pub outcome: String,
    /// When the request arrived, in milliseconds since the Unix epoch, so
    /// tests can check pacing and back-off across workers.
    pub received_ms: u64,
    /// The same in microseconds, and when the answer was fully sent (0 until
    /// then), for the benchmark's hop latency.
    pub received_us: u64,
    pub finished_us: u64,
    /// The `traceparent` header, which names the workflow's trace.
    pub traceparent: String,
    /// The request's HTTP version as the server saw it: "HTTP/1.1" or "HTTP/2.0".
    pub http_version: String,
    /// The connection it came over (see [`ConnectionId`]); 0 when unknown.
    pub connection: u64,
}

/// Which connection a request came over, numbered from 1 in the order connections were
/// accepted, so the ledger shows how clients spread their calls over connections (many
/// HTTP/2 streams share one; HTTP/1.1 needs a connection per call in flight). Routers hosted
/// without [`axum::Router::into_make_service_with_connect_info`] record 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionId(pub u64);

impl ConnectionId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Plain HTTP: the listener of [`crate::serve`].
impl Connected<IncomingStream<'_, PlainListener>> for ConnectionId {
    fn connect_info(_stream: IncomingStream<'_, PlainListener>) -> Self {
        Self::next()
    }
}

/// HTTPS: the listener of [`crate::serve_tls`].
impl Connected<IncomingStream<'_, TlsListener>> for ConnectionId {
    fn connect_info(_stream: IncomingStream<'_, TlsListener>) -> Self {
        Self::next()
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or_default()
}

#[derive(Clone)]
pub(crate) struct Shared(Arc<Inner>);

struct Inner {
    config: StandInConfig,
    faults: Mutex<FaultQueue>,
    log: Mutex<RequestLog>,
    next_seq: AtomicU64,
}

/// The request log, indexed by `seq - first_seq` so settling a request is
/// O(1) even after a benchmark's hundreds of thousands of requests.
#[derive(Default)]
struct RequestLog {
    first_seq: u64,
    records: Vec<RequestRecord>,
    /// Chat requests received and not yet ended, and the most there have been at once:
    /// what a benchmark divides a client's memory by to get its cost per call in flight.
    open: u64,
    peak_open: u64,
}

/// The request log's counts, as the control API reports them.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct RequestCounts {
    pub open: u64,
    pub peak_open: u64,
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

    pub(crate) fn take_fault(&self, model: &str, structured: bool) -> Option<Fault> {
        lock(&self.0.faults).take(model, structured)
    }

    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.0.log).records.clone()
    }

    pub(crate) fn clear_requests(&self) -> usize {
        let mut log = lock(&self.0.log);
        log.first_seq = self.0.next_seq.load(Ordering::Relaxed);
        log.peak_open = log.open;
        std::mem::take(&mut log.records).len()
    }

    pub(crate) fn request_counts(&self) -> RequestCounts {
        let log = lock(&self.0.log);
        RequestCounts {
            open: log.open,
            peak_open: log.peak_open,
        }
    }

    /// Logs a request as in progress; the returned guard records how it ended.
    pub(crate) fn record(&self, mut record: RequestRecord) -> Outcome {
        record.outcome = "in_progress".into();
        record.received_us = now_us();
        record.received_ms = record.received_us / 1000;
        let mut log = lock(&self.0.log);
        // Numbered under the lock, so records sit in seq order and the
        // index `seq - first_seq` finds each one when its outcome comes in
        // (numbered outside it, two requests racing could swap places and
        // one outcome would be lost, leaving a finished call "in_progress").
        record.seq = self.0.next_seq.fetch_add(1, Ordering::Relaxed);
        let seq = record.seq;
        if log.records.is_empty() {
            log.first_seq = record.seq;
        }
        log.records.push(record);
        log.open += 1;
        log.peak_open = log.peak_open.max(log.open);
        Outcome {
            shared: self.clone(),
            seq,
            settled: false,
        }
    }

    fn set_outcome(&self, seq: u64, outcome: String) {
        tracing::debug!(seq, %outcome, "chat request finished");
        let mut log = lock(&self.0.log);
        log.open = log.open.saturating_sub(1);
        let index = seq.checked_sub(log.first_seq).map(|i| i as usize);
        if let Some(record) = index.and_then(|i| log.records.get_mut(i)).filter(|r| r.seq == seq) {
            record.outcome = outcome;
            record.finished_us = now_us();
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
