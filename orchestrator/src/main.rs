//! `orchestrator` binary: read the optional config file, parse flags, set up
//! logs and traces, run until SIGINT or SIGTERM.

use clap::Parser;
use orchestrator::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Err(error) = nexus_runtime::config_file::load_from_args() {
        eprintln!("{error}");
        std::process::exit(2);
    }
    let config = Config::parse();
    let _telemetry = nexus_runtime::telemetry::init("nexus-orchestrator", &config.log_format);
    tracing::info!(?config, "starting orchestrator");
    orchestrator::run(config, nexus_runtime::shutdown::on_signal()).await
}
