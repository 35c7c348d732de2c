//! `phase-worker` binary: read the optional config file, parse flags, set up
//! logs and traces, run until SIGINT or SIGTERM, then drain in-flight calls.

use clap::Parser;
use phase_worker::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Err(error) = nexus_runtime::config_file::load_from_args() {
        eprintln!("{error}");
        std::process::exit(2);
    }
    let config = Config::parse();
    let _telemetry = nexus_runtime::telemetry::init("nexus-phase-worker", &config.log_format);
    tracing::info!(?config, "starting phase worker");
    phase_worker::run(config, nexus_runtime::shutdown::on_signal()).await
}
