//! The BullMQ peer (bench/bullmq_peer/): six-step chains as FlowProducer
//! trees of depth 6, every job `removeOnComplete`, two worker processes with
//! a no-op processor, on a Redis of its own with Nexus's settings. Its
//! packages are installed with `npm ci` on first use.

use crate::peer::{self, PeerProcess, WarmPeer};
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Command;

/// Worker processes, one per core on the 2-core machines the figures are for.
pub const WORKERS: usize = 2;
/// Jobs each worker runs at once: enough that the no-op processor never
/// waits on a free slot while Redis answers the others.
pub const CONCURRENCY: usize = 50;

fn peer_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bullmq_peer")
}

/// Installs or checks node_modules; Err says why the peer cannot run.
pub async fn setup() -> anyhow::Result<()> {
    peer::setup(peer_dir().join("setup.sh")).await
}

/// Starts the workers, then the driver for `chains` chains against
/// `redis_url`, and waits until its `warmup` untimed chains are done.
pub async fn start(redis_url: &str, chains: usize, warmup: usize) -> anyhow::Result<WarmPeer> {
    let mut workers = Vec::new();
    for n in 0..WORKERS {
        let mut command = Command::new("node");
        command.arg(peer_dir().join("worker.js")).args([
            "--redis-url",
            redis_url,
            "--concurrency",
            &CONCURRENCY.to_string(),
        ]);
        let mut worker = PeerProcess::spawn(&format!("bullmq-worker-{n}"), command)?;
        worker.next_json(Duration::from_secs(60)).await?;
        workers.push(worker);
    }
    let mut command = Command::new("node");
    command.arg(peer_dir().join("driver.js")).args([
        "--redis-url",
        redis_url,
        "--chains",
        &chains.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--handshake",
    ]);
    let mut driver = PeerProcess::spawn("bullmq-driver", command)?;
    driver.next_json(Duration::from_secs(300)).await?;
    Ok(WarmPeer {
        driver,
        worker_pids: workers.iter().map(PeerProcess::pid).collect(),
        workers,
        about: [("workers", WORKERS), ("concurrency", CONCURRENCY)]
            .into_iter()
            .map(|(key, value)| (key.to_string(), value.into()))
            .collect(),
    })
}
