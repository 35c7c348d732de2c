//! The worker's Prometheus metrics, the seed's "cost monitoring": model
//! calls, their latency, tokens and cost per model; tasks in flight,
//! reclaimed and dead-lettered; results applied and the runs they ended.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

pub struct Metrics {
    pub model_calls: Family<CallLabels, Counter>,
    pub model_call_seconds: Family<ModelLabel, Histogram>,
    pub model_retries: Family<ModelLabel, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Family<ModelLabel, Counter<f64, AtomicU64>>,
    pub tasks_in_flight: Gauge,
    pub tasks_reclaimed: Counter,
    pub tasks_dead_lettered: Counter,
    pub phase_results: Family<StatusLabel, Counter>,
    pub workflows_finished: Family<StatusLabel, Counter>,
    pub cache_hits: Family<ModelLabel, Counter>,
    pub cache_saved_usd: Family<ModelLabel, Counter<f64, AtomicU64>>,
    pub budget_stops: Family<ModelLabel, Counter>,
    pub pipeline_cost_usd: Family<PipelineLabel, Counter<f64, AtomicU64>>,
    pub tenant_cost_usd: Family<TenantLabel, Counter<f64, AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabel {
    pub pipeline: String,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    model_calls: Family::default(),
    model_call_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.05, 2.0, 14))),
    model_retries: Family::default(),
    tokens: Family::default(),
    cost_usd: Family::default(),
    tasks_in_flight: Gauge::default(),
    tasks_reclaimed: Counter::default(),
    tasks_dead_lettered: Counter::default(),
    phase_results: Family::default(),
    workflows_finished: Family::default(),
    cache_hits: Family::default(),
    cache_saved_usd: Family::default(),
    budget_stops: Family::default(),
    pipeline_cost_usd: Family::default(),
    tenant_cost_usd: Family::default(),
});

/// A registry holding every worker metric, prefixed `nexus_`.
/// The counter of `model`'s failed tries.
pub fn retries_counter(model: &str) -> Counter {
    METRICS
        .model_retries
        .get_or_create(&ModelLabel {
            model: model.to_string(),
        })
        .clone()
}

pub fn registry() -> Registry {
    let mut registry = Registry::with_prefix("nexus");
    let m = &*METRICS;
    registry.register(
        "model_calls",
        "Model calls (a phase's accepted answer or its final failure) by model and outcome",
        m.model_calls.clone(),
    );
    registry.register(
        "model_call_seconds",
        "Duration of a phase's model call, all tries included",
        m.model_call_seconds.clone(),
    );
    registry.register(
        "model_retries",
        "Failed tries that were retried",
        m.model_retries.clone(),
    );
    registry.register(
        "model_tokens",
        "Tokens by model and kind (prompt, completion)",
        m.tokens.clone(),
    );
    registry.register(
        "model_cost_usd",
        "Cost reported by the provider, in USD",
        m.cost_usd.clone(),
    );
    registry.register(
        "tasks_in_flight",
        "Phase tasks this worker is running",
        m.tasks_in_flight.clone(),
    );
    registry.register(
        "tasks_reclaimed",
        "Tasks taken over from unresponsive workers",
        m.tasks_reclaimed.clone(),
    );
    registry.register(
        "tasks_dead_lettered",
        "Tasks moved to the dead-letter stream",
        m.tasks_dead_lettered.clone(),
    );
    registry.register(
        "phase_results",
        "Phase results by what applying them did: applied, or stale (the run had moved on)",
        m.phase_results.clone(),
    );
    registry.register(
        "cache_hits",
        "Phases answered from the response cache, by model",
        m.cache_hits.clone(),
    );
    registry.register(
        "cache_saved_usd",
        "What the cached answers cost when they were made: spend avoided, in USD",
        m.cache_saved_usd.clone(),
    );
    registry.register(
        "budget_stops",
        "Runs stopped before a call that would pass their cost cap",
        m.budget_stops.clone(),
    );
    registry.register(
        "pipeline_cost_usd",
        "Cost of completed phases by pipeline, in USD",
        m.pipeline_cost_usd.clone(),
    );
    registry.register(
        "tenant_cost_usd",
        "What model calls cost, by the tenant whose run made them, in USD",
        m.tenant_cost_usd.clone(),
    );
    registry.register(
        "workflows_finished",
        "Runs this worker ended, by status (completed, failed); cancels are counted by the orchestrator",
        m.workflows_finished.clone(),
    );
    registry
}

/// Counts an applied result and the run it ended, if it did.
pub fn record_applied(step: nexus_pipeline::transition::Step) {
    use nexus_pipeline::transition::Step;
    let m = &*METRICS;
    m.phase_results.get_or_create(&StatusLabel { status: "applied" }).inc();
    let finished = match step {
        Step::Next | Step::Await => return,
        Step::Complete => "completed",
        Step::Fail => "failed",
    };
    m.workflows_finished
        .get_or_create(&StatusLabel { status: finished })
        .inc();
}

/// Counts a phase answered from the cache and what it saved.
pub fn record_cache_hit(model: &str, saved_usd: f64) {
    let label = ModelLabel {
        model: model.to_string(),
    };
    METRICS.cache_hits.get_or_create(&label).inc();
    METRICS.cache_saved_usd.get_or_create(&label).inc_by(saved_usd);
}

/// Counts a run stopped at its cost cap.
pub fn record_budget_stop(model: &str) {
    METRICS
        .budget_stops
        .get_or_create(&ModelLabel {
            model: model.to_string(),
        })
        .inc();
}

/// Adds a completed phase's cost to its pipeline's.
pub fn record_pipeline_cost(pipeline: &str, cost_usd: f64) {
    METRICS
        .pipeline_cost_usd
        .get_or_create(&PipelineLabel {
            pipeline: pipeline.to_string(),
        })
        .inc_by(cost_usd);
}

/// Counts a result the run no longer waited for.
pub fn record_stale() {
    METRICS
        .phase_results
        .get_or_create(&StatusLabel { status: "stale" })
        .inc();
}

/// Records one finished model call.
pub fn record_call(model: &str, outcome: &'static str, seconds: f64, usage: Option<&nexus_proto::v1::Usage>) {
    let m = &*METRICS;
    m.model_calls
        .get_or_create(&CallLabels {
            model: model.to_string(),
            outcome,
        })
        .inc();
    m.model_call_seconds
        .get_or_create(&ModelLabel {
            model: model.to_string(),
        })
        .observe(seconds);
    let Some(usage) = usage else { return };
    for (kind, count) in [("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)] {
        m.tokens
            .get_or_create(&TokenLabels {
                model: model.to_string(),
                kind,
            })
            .inc_by(count);
    }
    m.cost_usd
        .get_or_create(&ModelLabel {
            model: model.to_string(),
        })
        .inc_by(usage.cost_usd);
}

/// Adds a call's cost to its run's tenant, when the run has one.
pub fn record_tenant_cost(tenant: &str, cost_usd: f64) {
    if tenant.is_empty() || cost_usd <= 0.0 {
        return;
    }
    let label = TenantLabel {
        tenant: tenant.to_string(),
    };
    METRICS.tenant_cost_usd.get_or_create(&label).inc_by(cost_usd);
}
