//! `orchestrator` binary: read the optional config file, parse flags, set up
//! logs and traces, run until SIGINT or SIGTERM.

use orchestrator::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = nexus_runtime::process::read_config();
    let _telemetry = nexus_runtime::telemetry::init("nexus-orchestrator", &config.process.log_format);
    tracing::info!(?config, "starting orchestrator");
    orchestrator::run(config, nexus_runtime::shutdown::on_signal()).await
}
