//! `orchestrator` binary: read the optional config file, parse flags, set up
//! logs and traces, run until SIGINT or SIGTERM.

/// mimalloc instead of glibc malloc: a profile of the worker under load
/// showed a quarter of its CPU in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use orchestrator::config::Config;

fn main() -> anyhow::Result<()> {
    let config: Config = nexus_runtime::process::read_config();
    config.process.runtime()?.block_on(async {
        let _telemetry = nexus_runtime::telemetry::init("nexus-orchestrator", &config.process.log_format);
        tracing::info!(?config, "starting orchestrator");
        orchestrator::run(config, nexus_runtime::shutdown::on_signal()).await
    })
}
