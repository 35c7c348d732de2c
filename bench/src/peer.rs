//! A peer's process (a Celery driver, a BullMQ worker or driver) that talks
//! in JSON lines on stdout and takes its cues on stdin, so the bench can read
//! CPU and Redis counters around exactly the peer's timed window. Its stderr
//! goes to a log file whose last lines are quoted when it fails.

use anyhow::Context;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub struct PeerProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl PeerProcess {
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Self> {
        let log = log_path(name);
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = command.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_string(),
            child,
            stdin,
            stdout,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// The next stdout line that is a JSON object (other lines are skipped).
    pub async fn next_json(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => {
                    if let Ok(value @ Value::Object(_)) = serde_json::from_str(&line) {
                        return Ok(value);
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                    let status = match status {
                        Ok(Ok(status)) => status.to_string(),
                        _ => "still running".into(),
                    };
                    anyhow::bail!("{} ended its output ({status}): {}", self.name, self.log_tail());
                }
                Err(_) => anyhow::bail!(
                    "{} printed nothing expected within {timeout:?}: {}",
                    self.name,
                    self.log_tail()
                ),
            }
        }
    }

    /// Writes one line to its stdin.
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Closes its stdin and waits up to `grace` for it to exit by itself;
    /// then SIGTERM, and SIGKILL if that does not do it either.
    pub async fn finish(mut self, grace: Duration) {
        self.stdin = None;
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return;
        }
        self.stop().await;
    }

    /// SIGTERM (a Celery driver stops its worker, a BullMQ worker closes),
    /// SIGKILL after 20 s.
    pub async fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        terminate(self.pid());
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// The last lines of its stderr, on one line.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
        format!("{tail} (log: {})", self.log.display())
    }
}

impl Drop for PeerProcess {
    /// A peer dropped on an error path still gets SIGTERM, so a Celery
    /// driver stops its worker rather than leaving it behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            terminate(self.pid());
        }
    }
}

fn terminate(pid: u32) {
    if pid != 0 {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// target/<profile>/bench-logs/<name>-<bench pid>-<n>.log
fn log_path(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("bench-logs")))
        .unwrap_or_else(std::env::temp_dir);
    let _ = std::fs::create_dir_all(&dir);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{name}-{}-{n}.log", std::process::id()))
}

/// Runs a peer's setup script; Err carries the reason to print in the skip
/// line (its last stderr line).
pub async fn setup(script: PathBuf) -> anyhow::Result<()> {
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no output");
    anyhow::bail!("{} failed ({}): {reason}", script.display(), output.status)
}

/// A peer past its warm-up, waiting for the cue to start its timed run.
pub struct WarmPeer {
    /// The load driver: its CPU is not the peer's.
    pub driver: PeerProcess,
    /// The processes doing the peer's work (with their descendants): its CPU.
    pub worker_pids: Vec<u32>,
    /// Worker processes the bench started and stops (BullMQ's).
    pub workers: Vec<PeerProcess>,
    /// Settings worth recording beside the driver's own report.
    pub about: serde_json::Map<String, Value>,
}

impl WarmPeer {
    /// Lets the driver go (the end of its stdin), stops the workers.
    pub async fn finish(self) {
        self.driver.finish(Duration::from_secs(30)).await;
        for mut worker in self.workers {
            worker.stop().await;
        }
    }
}
