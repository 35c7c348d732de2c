//! The settings every Nexus process takes (metrics endpoint, config file,
//! log format), and how a binary's configuration is read: the optional
//! config file first, then flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct ProcessArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks one;
    /// the address is printed as "metrics listening on ADDR"). Unset: off.
    #[arg(long, env = "NEXUS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// A file of KEY=VALUE lines with any of these settings (environment
    /// variable names). The environment overrides the file; flags override
    /// both.
    #[arg(long, env = "NEXUS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format: "text" for people, "json" for log pipelines. Filter with
    /// RUST_LOG (default "info"). Traces go over OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set (standard OTEL_* variables apply).
    #[arg(long, env = "NEXUS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Threads of the async runtime: 0 for one per CPU core; 1 runs
    /// everything on one thread (no work stealing, no cross-thread wake-ups:
    /// the cheapest per request, for a process sharing a small machine, or
    /// for many small replicas instead of one large one).
    #[arg(long, env = "NEXUS_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl ProcessArgs {
    /// The async runtime these settings ask for.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            0 => tokio::runtime::Builder::new_multi_thread(),
            threads => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(threads);
                builder
            }
        };
        builder.enable_all().build()
    }
}

/// Reads the optional config file into the environment, then parses flags
/// and environment into `C`. A config file that cannot be read ends the
/// process with a message, before anything starts.
pub fn read_config<C: clap::Parser>() -> C {
    if let Err(error) = crate::config_file::load_from_args() {
        eprintln!("{error}");
        std::process::exit(2);
    }
    C::parse()
}

/// A consumer-group name unique to this process: kind, host, process id and
/// a random suffix, so a restarted process never takes over a dead one's
/// name (and its pending entries are reclaimed, not silently inherited).
pub fn unique_consumer_name(kind: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        & 0xffff;
    format!("{kind}-{host}-{}-{suffix:04x}", std::process::id())
}
