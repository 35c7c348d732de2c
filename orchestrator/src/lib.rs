//! The Nexus orchestrator.
//!
//! - [`api`]: the `WorkflowService` gRPC handlers, thin.
//! - [`operations`]: the `OperationsService` for operators: dead letters
//!   (list, requeue as forks) and queue depth per shard.
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
//! - [`tenants`]: bearer tokens mapped to tenants (reloaded on change),
//!   and the per-tenant limits.
//! - [`config`]: flags and environment.
//! - [`tls`]: TLS and mutual TLS on the gRPC port, from certificate files
//!   reloaded on change.
//! - [`web`]: the optional web tracker page, and gRPC-Web for it.
//!
//! Replicas are interchangeable: all state is in Redis, and any replica can
//! serve any call or watcher.

pub mod api;
pub mod catalog;
pub mod config;
pub mod errors;
pub mod housekeeping;
pub mod metrics;
pub mod operations;
pub mod state;
pub mod tenants;
pub mod tls;
pub mod validation;
pub mod watch;
pub mod web;

use anyhow::Context;
use catalog::PipelineCatalog;
use config::Config;
use nexus_proto::v1::operations_service_server::OperationsServiceServer;
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
    let tokens = tenants::Tokens::load(config.tokens_file.clone(), config.api_token.clone())?;
    refuse_open_beyond_loopback(&config, &tokens)?;
    tokio::spawn(tokens.clone().reload(shutdown.clone()));
    let tls = tls::TlsFiles::from_settings(
        config.tls_cert.clone(),
        config.tls_key.clone(),
        config.tls_client_ca.clone(),
    )?
    .map(|files| tls::ReloadingTls::load(files, config.web))
    .transpose()
    .context("loading the TLS certificate")?;
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().reload(shutdown.clone()));
    }
    let conn = config
        .redis
        .connect_patiently(false)
        .await
        .context("connecting to redis")?;
    let store = WorkflowStore::new(conn, config.redis.shards, config.retention_secs, &catalog);
    let hub = Arc::new(watch::WatchHub::new(shutdown.clone()));
    tokio::spawn(hub.clone().listen(config.redis.clone(), store.connection()));
    tokio::spawn(state::expire_gates(store.clone(), shutdown.clone()));
    tokio::spawn(housekeeping::run(
        store.connection(),
        config.redis.shards,
        config.retention_secs,
        shutdown.clone(),
    ));
    serve(&config, store, hub, catalog, tokens, tls, shutdown).await
}

/// Serving without any token is for a developer's machine: beyond loopback
/// it takes `--allow-unauthenticated`.
fn refuse_open_beyond_loopback(config: &Config, tokens: &tenants::Tokens) -> anyhow::Result<()> {
    if tokens.is_open() && !config.listen.ip().is_loopback() && !config.allow_unauthenticated {
        anyhow::bail!(
            "refusing to serve {} without authentication: set NEXUS_API_TOKEN or NEXUS_TOKENS_FILE, \
             or NEXUS_ALLOW_UNAUTHENTICATED=true to run open on purpose",
            config.listen
        );
    }
    if tokens.is_open() {
        tracing::warn!(listen = %config.listen, "serving without authentication: every caller sees every workflow");
    }
    Ok(())
}

async fn serve(
    config: &Config,
    store: WorkflowStore,
    hub: Arc<watch::WatchHub>,
    catalog: Arc<PipelineCatalog>,
    tokens: tenants::Tokens,
    tls: Option<tls::ReloadingTls>,
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
        limits: tenants::Limits {
            watches_per_tenant: config.tenant_max_watches,
            watchers_total: config.max_watchers,
            starts_per_minute: config.tenant_starts_per_minute,
            running_per_tenant: config.tenant_max_running,
        },
        watches: Arc::default(),
    };
    let operations = operations::OperationsApi {
        store: api.store.clone(),
        catalog: api.catalog.clone(),
        cost_caps: api.cost_caps,
    };
    let workflow_service = WorkflowServiceServer::new(api)
        // The largest request is a plan or a person's edit of an output.
        .max_decoding_message_size((config.max_plan_bytes * 2).max(state::MAX_EDITED_OUTPUT_BYTES) + 64 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkflowServiceServer<api::WorkflowApi>>()
        .await;
    health_reporter
        .set_serving::<OperationsServiceServer<operations::OperationsApi>>()
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
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Plaintext prints the bare address, as scripts expect; TLS says so.
    let shown = if tls.is_some() {
        format!("{scheme}://{address}")
    } else {
        address.to_string()
    };
    println!("orchestrator listening on {shown}");
    let client_certificates = tls
        .as_ref()
        .is_some_and(tls::ReloadingTls::requires_client_certificates);
    tracing::info!(%address, tls = tls.is_some(), client_certificates, "gRPC server listening");
    let admins = tokens.clone();
    let operations_service = tonic::service::interceptor::InterceptedService::new(
        OperationsServiceServer::new(operations),
        move |request| admins.check_admin(request),
    );
    let workflow_service =
        tonic::service::interceptor::InterceptedService::new(workflow_service, move |request| tokens.check(request));
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health_service)
        .add_service(operations_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    let routes = if config.web {
        // gRPC-Web outside the interceptor, so the token check sees the
        // translated call like any other.
        routes.add_service(web::grpc_web(workflow_service));
        println!("web tracker on {scheme}://{address}/");
        web::with_page(routes.routes())
    } else {
        routes.add_service(workflow_service);
        routes.routes()
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(config.max_streams_per_connection)
        .accept_http1(config.web)
        .add_routes(routes);
    match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown.cancelled_owned())
                .await?
        }
        None => {
            // Our own listener (to learn the port when it is 0), so the
            // builder's `tcp_nodelay` does not reach the accepted sockets:
            // set it here. With Nagle on, a response's frames wait for the
            // client's delayed ACK, and a unary call can take 40 ms instead
            // of well under one.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?
        }
    }
    Ok(())
}
