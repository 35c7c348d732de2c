//! The Nexus orchestrator.
//!
//! - [`api`]: the `WorkflowService` gRPC handlers, thin.
//! - [`validation`]: what a request must satisfy before it touches Redis.
//! - [`catalog`]: the pipelines a run can choose, and a run's choices
//!   (pipeline, model per role, instructions) resolved to a snapshot.
//! - [`state`]: the orchestrator's transitions of the workflow state machine
//!   (create, cancel) and reading workflows back. Phase results are applied
//!   by the worker that has them (`nexus_pipeline::transition`).
//! - [`watch`]: serves `WatchWorkflow` from the per-workflow event stream,
//!   woken by one pub/sub connection per replica.
//! - [`housekeeping`]: trims what TTLs cannot (index entries, departed
//!   consumers).
//! - [`metrics`]: Prometheus metrics of this replica.
//! - [`errors`]: error types and their mapping to gRPC statuses.
//! - [`auth`]: the optional bearer-token interceptor.
//! - [`config`]: flags and environment.
//!
//! Replicas are interchangeable: all state is in Redis, and any replica can
//! serve any call or watcher.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod errors;
pub mod housekeeping;
pub mod metrics;
pub mod state;
pub mod validation;
pub mod watch;

use anyhow::Context;
use catalog::PipelineCatalog;
use config::Config;
use nexus_proto::v1::workflow_service_server::WorkflowServiceServer;
use state::WorkflowStore;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Resolves the configured pipeline (file or built-in) with the configured
/// models. Fails at start-up, not mid-run, when either is wrong.
/// Runs the orchestrator until `shutdown` is cancelled, then stops within
/// the configured grace period whatever Redis does.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tokio::select! {
        result = run_until_stopped(config, shutdown.clone()) => result,
        () = nexus_runtime::shutdown::deadline(shutdown, grace) => Ok(()),
    }
}

async fn run_until_stopped(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let catalog = Arc::new(PipelineCatalog::load(&config)?);
    if let Some(address) = config.process.metrics_listen {
        nexus_runtime::metrics::serve(address, metrics::registry())
            .await
            .context("serving metrics")?;
    }
    for pipeline in catalog.describe() {
        tracing::info!(pipeline = %pipeline.name, default = pipeline.is_default, phases = pipeline.phases.len(), "pipeline offered");
    }
    let conn = config
        .redis
        .connect_patiently(false)
        .await
        .context("connecting to redis")?;
    let store = WorkflowStore::new(conn, config.redis.shards, config.retention_secs, &catalog);
    let hub = Arc::new(watch::WatchHub::new(shutdown.clone()));
    tokio::spawn(hub.clone().listen(config.redis.clone()));
    tokio::spawn(state::expire_gates(store.clone(), shutdown.clone()));
    tokio::spawn(housekeeping::run(
        store.connection(),
        config.redis.shards,
        config.retention_secs,
        shutdown.clone(),
    ));
    serve(&config, store, hub, catalog, shutdown).await
}

async fn serve(
    config: &Config,
    store: WorkflowStore,
    hub: Arc<watch::WatchHub>,
    catalog: Arc<PipelineCatalog>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let api = api::WorkflowApi {
        store,
        hub,
        catalog,
        max_plan_bytes: config.max_plan_bytes,
        cost_caps: validation::CostCaps {
            default_usd: config.default_max_cost_usd,
            max_usd: config.max_cost_usd,
        },
    };
    let auth = auth::BearerToken::new(config.api_token.clone());
    let workflow_service = WorkflowServiceServer::new(api)
        .max_decoding_message_size(config.max_plan_bytes * 2 + 64 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkflowServiceServer<api::WorkflowApi>>()
        .await;
    // Both reflection versions: grpcurl before 1.9 and many generated tools
    // only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nexus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    println!("orchestrator listening on {address}");
    tracing::info!(%address, "gRPC server listening");
    // Our own listener (to learn the port when it is 0), so the builder's
    // `tcp_nodelay` does not reach the accepted sockets: set it here. With
    // Nagle on, a response's frames wait for the client's delayed ACK, and a
    // unary call can take 40 ms instead of well under one.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(config.max_streams_per_connection)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            workflow_service,
            move |request| auth.check(request),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
