//! The orchestrator's Prometheus metrics: workflows accepted and cancelled,
//! live watchers. (Runs that complete or fail are counted by the worker that
//! applied their last result.)

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Default)]
pub struct Metrics {
    pub workflows_started: Counter,
    /// Started runs per tenant (runs without tenants are not counted here).
    pub tenant_workflows_started: Family<TenantLabel, Counter>,
    pub workflows_finished: Family<StatusLabel, Counter>,
    pub watchers: Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// A registry holding every orchestrator metric, prefixed `nexus_`.
pub fn registry() -> Registry {
    let mut registry = Registry::with_prefix("nexus");
    let m = &*METRICS;
    registry.register(
        "workflows_started",
        "Workflows accepted by StartWorkflow",
        m.workflows_started.clone(),
    );
    registry.register(
        "workflows_finished",
        "Workflows this replica ended, by status (cancelled); workers count completed and failed",
        m.workflows_finished.clone(),
    );
    registry.register(
        "tenant_workflows_started",
        "Workflows (starts and forks) accepted per tenant",
        m.tenant_workflows_started.clone(),
    );
    registry.register(
        "watchers",
        "WatchWorkflow streams open on this replica",
        m.watchers.clone(),
    );
    registry
}

/// Counts an accepted start or fork, per tenant too when there is one.
pub fn record_start(tenant: &str) {
    METRICS.workflows_started.inc();
    if !tenant.is_empty() {
        let label = TenantLabel {
            tenant: tenant.to_string(),
        };
        METRICS.tenant_workflows_started.get_or_create(&label).inc();
    }
}
