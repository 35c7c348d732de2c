//! The Nexus phase worker: stateless, horizontally scaled.
//!
//! - [`consumer`]: claims tasks from each shard's task stream and reclaims
//!   those of dead workers; dead-letters poison tasks.
//! - [`runner`]: runs one task: prompt, streaming model call, deltas,
//!   and applying the result (next phase queued, or the run
//!   ended) as `nexus_pipeline::transition` says.
//! - [`progress`]: a call's progress (text, reasoning, retries, waits,
//!   fallbacks) written into the event log as it happens.
//! - [`task_lifecycle`]: the task's Redis side (fenced appends, heartbeat,
//!   acknowledgement with the result applied), one Lua script per atomic
//!   step.
//! - [`metrics`]: Prometheus metrics: calls, latency, tokens and cost per
//!   model; tasks in flight, reclaimed, dead-lettered.
//! - [`model`]: the only code that talks HTTP to OpenRouter.
//! - [`pacing`]: per-model rate limits and provider back-off shared by all
//!   workers through Redis.
//! - [`rating`]: the rating phase's JSON schema and validation.
//! - [`cancellation`]: aborts in-flight calls of cancelled workflows.
//! - [`claims`]: renews the claims of all running tasks, on one timer.
//! - [`config`]: flags and environment.
//!
//! Everything a task needs travels in the task or sits in Redis, so any
//! worker can run any task and a worker can die at any moment.
//!
//! The functions a call in flight passes through are plain functions that
//! return an `async move` block, not `async fn`s: an `async fn` keeps each
//! argument twice in its future (rust-lang/rust#62958), and a worker holds
//! one such future for every open call.
#![allow(clippy::manual_async_fn)]

pub mod cancellation;
pub mod claims;
pub mod config;
pub mod consumer;
pub mod metrics;
pub mod model;
pub mod pacing;
pub mod progress;
pub mod rating;
pub mod runner;
pub mod task_lifecycle;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long aborted calls get to hand their tasks back.
const HAND_BACK_GRACE: Duration = Duration::from_millis(1500);

/// Runs the worker until `stop` is cancelled, then drains; exits within the
/// drain grace plus a little even when Redis is down.
pub async fn run(config: config::Config, stop: CancellationToken) -> anyhow::Result<()> {
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tokio::select! {
        result = run_until_stopped(config, stop.clone()) => result,
        () = nexus_runtime::shutdown::deadline(stop, grace + HAND_BACK_GRACE + Duration::from_millis(500)) => Ok(()),
    }
}

async fn run_until_stopped(config: config::Config, stop: CancellationToken) -> anyhow::Result<()> {
    model::install_crypto_provider();
    if let Some(address) = config.process.metrics_listen {
        nexus_runtime::metrics::serve(address, metrics::registry())
            .await
            .context("serving metrics")?;
    }
    let conn = config
        .redis
        .connect_patiently(false)
        .await
        .context("connecting to redis")?;
    let pacer = Arc::new(pacing::RedisPacer::new(conn.clone(), config.model_rate_limits.clone()));
    tokio::spawn(pacer.clone().listen(config.redis.clone()));
    let client = model::ModelClient::new(config.model_client())
        .context("building the model client")?
        .with_pacer(pacer);
    let abort_calls = CancellationToken::new();
    let cancels = Arc::new(cancellation::CancelRegistry::default());
    tokio::spawn(cancels.clone().listen(config.redis.clone(), conn.clone()));
    let claims = Arc::new(claims::ClaimKeeper::default());
    let claim_keeper = tokio::spawn(claims.clone().renew_forever(config.visibility_timeout() / 3));
    let ctx = Arc::new(runner::RunnerContext {
        client,
        cancels,
        shutdown: abort_calls.clone(),
        stopping: stop.clone(),
        claims,
        publish_patience: Duration::from_millis(config.result_publish_patience_ms),
        pipelines: Default::default(),
        cache: model::cache::ResponseCache::new(conn.clone(), Duration::from_secs(config.cache_ttl_secs)),
        prices: config.model_prices.clone(),
    });
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let consumer = Arc::new(consumer::TaskConsumer {
        ctx,
        conn,
        redis: config.redis.clone(),
        consumer: config
            .consumer_name
            .clone()
            .unwrap_or_else(|| nexus_runtime::process::unique_consumer_name("worker"))
            .into(),
        slots: slots.clone(),
        visibility_timeout: config.visibility_timeout(),
        max_deliveries: config.max_deliveries.max(1),
        running: Default::default(),
    });
    tracing::info!(consumer = %consumer.consumer, "phase worker ready");
    println!("phase-worker ready as {}", consumer.consumer);
    for shard in 0..config.redis.shards {
        tokio::spawn(consumer.clone().read_loop(shard, stop.clone()));
        tokio::spawn(consumer.clone().reclaim_loop(shard, stop.clone()));
    }
    // Without its claim keeper a worker would keep running tasks whose
    // claims lapse: it exits instead, and its tasks are reclaimed.
    tokio::select! {
        () = stop.cancelled() => {}
        ended = claim_keeper => anyhow::bail!("the claim keeper stopped ({ended:?}); exiting so that this worker's tasks are reclaimed"),
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    drain(&slots, config.max_in_flight.max(1), grace, abort_calls).await;
    Ok(())
}

/// Lets in-flight calls finish for `grace`; then aborts the rest, whose
/// tasks are handed back to the stream, and gives that a moment.
async fn drain(slots: &Semaphore, capacity: usize, grace: Duration, abort_calls: CancellationToken) {
    let all_free = || async {
        while slots.available_permits() < capacity {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(grace, all_free()).await.is_ok() {
        return;
    }
    tracing::warn!("in-flight calls did not finish in time; aborting them and handing their tasks back");
    abort_calls.cancel();
    let _ = tokio::time::timeout(HAND_BACK_GRACE, all_free()).await;
}
