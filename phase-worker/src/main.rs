//! `phase-worker` binary: read the optional config file, parse flags, set up
//! logs and traces, run until SIGINT or SIGTERM, then drain in-flight calls.

/// mimalloc instead of glibc malloc: a profile of the worker under load
/// showed a quarter of its CPU in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use phase_worker::config::Config;

fn main() -> anyhow::Result<()> {
    let config: Config = nexus_runtime::process::read_config();
    config.process.runtime()?.block_on(async {
        let _telemetry = nexus_runtime::telemetry::init("nexus-phase-worker", &config.process.log_format);
        tracing::info!(?config, "starting phase worker");
        phase_worker::run(config, nexus_runtime::shutdown::on_signal()).await
    })
}
