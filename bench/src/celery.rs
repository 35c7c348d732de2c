//! The Celery peer (bench/celery_peer/): a Celery 5 chain of six no-op
//! tasks, intermediate results ignored and the last one stored, on a Redis
//! of its own with Nexus's settings; one prefork worker, concurrency =
//! cores; Celery's default acks (on task start) or `task_acks_late`. Its
//! venv is set up from PyPI on first use.

use crate::peer::{self, PeerProcess, WarmPeer};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

fn bench_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn peer_dir() -> PathBuf {
    bench_dir().join("celery_peer")
}

/// Creates or checks bench/.venv; Err says why the peer cannot run.
pub async fn setup() -> anyhow::Result<()> {
    peer::setup(peer_dir().join("setup.sh")).await
}

/// Starts the driver (which starts the worker) for `chains` chains against
/// `redis_url` and waits until its `warmup` untimed chains are done.
pub async fn start(redis_url: &str, chains: usize, warmup: usize, acks_late: bool) -> anyhow::Result<WarmPeer> {
    let mut command = Command::new(bench_dir().join(".venv/bin/python"));
    command.arg(peer_dir().join("peer.py")).args([
        "--redis-url",
        redis_url,
        "--chains",
        &chains.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--handshake",
    ]);
    if acks_late {
        command.arg("--acks-late");
    }
    let name = if acks_late { "celery-acks-late" } else { "celery" };
    let mut driver = PeerProcess::spawn(name, command)?;
    let warm = driver.next_json(Duration::from_secs(300)).await?;
    let worker = warm["worker_pid"].as_u64().context("no worker_pid in the warm line")? as u32;
    Ok(WarmPeer {
        driver,
        worker_pids: vec![worker],
        workers: Vec::new(),
        about: Default::default(),
    })
}
