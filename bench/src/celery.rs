//! The Celery peer: a Celery 5 chain of six no-op tasks on the same Redis,
//! prefork pool with concurrency = cores (bench/celery_peer/). Its venv is
//! set up from PyPI on first use.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Deserialize)]
pub struct CeleryRun {
    pub chains: usize,
    pub seconds: f64,
    pub chains_per_second: f64,
    pub concurrency: usize,
    pub celery: String,
}

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("celery_peer")
}

/// Runs `chains` chains against `redis_url` (a database of its own).
pub fn run(redis_url: &str, chains: usize) -> anyhow::Result<CeleryRun> {
    let setup = Command::new("bash").arg(peer_dir().join("setup.sh")).status()?;
    anyhow::ensure!(setup.success(), "celery peer setup failed");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let output = Command::new(python)
        .arg(peer_dir().join("peer.py"))
        .args(["--redis-url", redis_url, "--chains", &chains.to_string()])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "celery peer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout)?;
    Ok(serde_json::from_str(line.lines().last().unwrap_or_default())?)
}
