//! `nexus-bench`: measures the real stack — Redis, orchestrator, workers and
//! the stand-in model as separate processes on loopback — through the public
//! gRPC API, and prints one line per figure plus a JSON file.
//!
//! Figures (see bench/README.md for what each means and the targets):
//! hop overhead, throughput against BullMQ and Celery (with CPU and Redis
//! commands per phase), in-flight capacity, watcher fan-out, scaling with
//! workers and Redis cost per workflow. `--quick` runs every figure with
//! small counts, as CI's smoke test; it asserts nothing about timing.

mod bullmq;
mod celery;
mod drive;
mod figures;
mod measure;
mod peer;
mod throughput;

use clap::Parser;
use serde_json::{Map, Value};

#[derive(Parser, Clone)]
#[command(name = "nexus-bench", about = "Benchmarks the real Nexus stack on loopback.")]
pub struct Args {
    /// Small counts and one run per throughput mode: a smoke test that the
    /// bench and its peers work (CI runs it in the debug build).
    #[arg(long)]
    pub quick: bool,
    /// Run only these figures (hop, throughput, inflight, watchers, scaling).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip the Celery comparison (it needs python3 and PyPI for its venv).
    #[arg(long)]
    pub skip_celery: bool,
    /// Skip the BullMQ comparison (it needs node >= 20 and the npm registry
    /// for its packages).
    #[arg(long)]
    pub skip_bullmq: bool,
    /// Runs of the throughput figure per fsync mode; every number printed
    /// is the median (default 3, 1 with --quick).
    #[arg(long)]
    pub repeat: Option<usize>,
    /// Workflows in flight while hop overhead is measured: enough to keep
    /// every process busy, few enough that the figure is the engine's
    /// latency rather than queueing (a saturated pipeline's hop is queueing
    /// time; see the throughput figure).
    #[arg(long, default_value_t = 4)]
    pub hop_concurrency: usize,
    /// Redis's AOF fsync policies, a comma list: "always" (Nexus's default
    /// promise: nothing acknowledged is lost) and/or "everysec" (at most one
    /// second of writes lost on a crash, fewer fsyncs). The throughput
    /// figure runs in each; the other figures in the first.
    #[arg(long, value_delimiter = ',', default_value = "always,everysec",
          value_parser = ["always", "everysec", "no"])]
    pub fsync: Vec<String>,
    /// Workflows (chains) per timed throughput run, instead of 2,000 (60
    /// with --quick): a longer run to profile the stack under (`perf`).
    #[arg(long)]
    pub workflows: Option<usize>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench-results.json")]
    pub out: std::path::PathBuf,
}

impl Args {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only == figure)
    }

    /// `full` normally, `quick` with --quick.
    pub fn count(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    pub fn repeat(&self) -> usize {
        self.repeat.unwrap_or(self.count(3, 1)).max(1)
    }

    /// The fsync policy of the figures that run in one mode.
    pub fn primary_fsync(&self) -> &str {
        self.fsync.first().map(String::as_str).unwrap_or("always")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "nexus-bench: redis appendfsync {} for throughput, {} for the other figures; {} cores",
        args.fsync.join(" and "),
        args.primary_fsync(),
        std::thread::available_parallelism().map(usize::from).unwrap_or(1)
    );
    let mut results = Map::new();
    let figures: [(&str, figures::Figure); 5] = [
        ("hop", figures::hop_overhead),
        ("throughput", throughput::throughput),
        ("inflight", figures::in_flight),
        ("watchers", figures::watchers),
        ("scaling", figures::scaling),
    ];
    for (name, figure) in figures {
        if args.wants(name) {
            results.insert(name.to_string(), figure(args.clone()).await?);
        }
    }
    if let Some(folder) = args.out.parent() {
        std::fs::create_dir_all(folder)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    println!("results written to {}", args.out.display());
    Ok(())
}
