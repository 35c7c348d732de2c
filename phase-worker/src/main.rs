//! `phase-worker` binary: parse configuration, set up logging, run until
//! SIGINT or SIGTERM, then drain in-flight calls.

use clap::Parser;
use phase_worker::config::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(&config.log_format);
    tracing::info!(?config, "starting phase worker");
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    phase_worker::run(config, stop).await
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight calls");
    stop.cancel();
}
