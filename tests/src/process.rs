//! Starting and killing the real processes a test needs.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where cargo put the project's binaries: the folder of the running
/// executable, or its parent when that is a test's `deps/` folder. The
/// benchmark (in `target/release/`) finds the release binaries the same way.
pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (scripts/test.sh runs `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A free loopback port (bound then released; good enough on loopback).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed with SIGKILL on drop.
pub struct Process {
    pub name: String,
    /// Its stderr (where it logs), kept under target/test-logs.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Spawns and waits until a stdout line contains `ready_marker`; returns
    /// the process and that line.
    pub fn spawn(name: &str, command: Command, ready_marker: &str) -> (Self, String) {
        let (process, mut lines) = Self::spawn_collecting(name, command, ready_marker);
        (process, lines.pop().unwrap_or_default())
    }

    /// Like [`Process::spawn`], returning every stdout line up to and
    /// including the ready line.
    pub fn spawn_collecting(name: &str, mut command: Command, ready_marker: &str) -> (Self, Vec<String>) {
        let log = log_path(name);
        command.stdout(Stdio::piped()).stderr(log_file(&log));
        let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (lines, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let process = Self {
            name: name.to_string(),
            log: log.clone(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match ready.recv_timeout(left) {
                Ok(line) => {
                    let is_ready = line.contains(ready_marker);
                    seen.push(line);
                    if is_ready {
                        return (process, seen);
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "{name} did not print {ready_marker:?} within 30 s (log: {})",
            log.display()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs, like a crash or an OOM kill.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal by name ("TERM", "STOP", "CONT") with `kill`.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill on PATH");
        assert!(sent.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// What the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Each process logs to a file of its own under target/test-logs, kept for
/// debugging and read by tests that check what a process logged.
fn log_path(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = binary_dir().join("test-logs");
    std::fs::create_dir_all(&dir).ok();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{name}-{}-{n}.log", std::process::id()))
}

fn log_file(path: &std::path::Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable folder");
    if dir.ends_with("deps") {
        dir.parent().expect("target profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn address_in(line: &str) -> SocketAddr {
    let text = line
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    text.parse().unwrap_or_else(|_| panic!("no address in {line:?}"))
}

/// A real `redis-server` with AOF `appendfsync always`.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    process: Option<Process>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (e.g. cluster mode).
    pub fn start_with(extra_args: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("nexus-test-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra_args = extra_args.iter().map(|arg| arg.to_string()).collect();
        let mut server = Self {
            port,
            dir,
            extra_args,
            process: None,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
        ]);
        command
            .args(["--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .args(&self.extra_args);
        let (process, _) = Process::spawn(&format!("redis-{}", self.port), command, "Ready to accept connections");
        self.process = Some(process);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs Redis (what is not fsynced is lost; with `always`, nothing).
    pub fn kill_hard(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill_hard();
        }
    }

    /// Starts Redis again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill_hard();
        self.launch();
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill_hard();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` real servers on loopback, no replicas,
/// created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        let nodes: Vec<_> = (0..masters)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)));
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = create.output().expect("redis-cli on PATH");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok();
        cluster
    }

    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                let mut conn = node.client().get_connection().unwrap();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The seed list the binaries take as REDIS_URL in cluster mode.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }
}

/// The stand-in model server.
pub struct StandIn {
    pub address: SocketAddr,
    pub process: Process,
}

impl StandIn {
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(binary("stand-in-model"));
        command.args(["--listen", "127.0.0.1:0"]).args(args);
        let (process, line) = Process::spawn("stand-in-model", command, "listening on");
        Self {
            address: address_in(&line),
            process,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Serving HTTPS (HTTP/2 or HTTP/1.1 by ALPN) on a certificate it makes
    /// at start, written to a file clients trust.
    pub fn start_tls(args: &[&str]) -> TlsStandIn {
        let cert = std::env::temp_dir().join(format!(
            "nexus-test-stand-in-{}-{}.pem",
            std::process::id(),
            free_port()
        ));
        let cert_arg = cert.to_str().expect("temporary path is UTF-8");
        let mut all_args = vec!["--tls", "--cert-out", cert_arg];
        all_args.extend_from_slice(args);
        let stand_in = Self::start(&all_args);
        TlsStandIn { stand_in, cert }
    }
}

/// The stand-in model over TLS, and its certificate (removed on drop).
pub struct TlsStandIn {
    pub stand_in: StandIn,
    /// The certificate's PEM file, for NEXUS_MODEL_CA_FILE.
    pub cert: PathBuf,
}

impl TlsStandIn {
    pub fn base_url(&self) -> String {
        format!("https://{}", self.stand_in.address)
    }
}

impl Drop for TlsStandIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
    }
}

/// The address of a process's metrics endpoint, if it printed one.
fn metrics_address(lines: &[String]) -> Option<SocketAddr> {
    lines
        .iter()
        .find(|line| line.starts_with("metrics listening on"))
        .map(|line| address_in(line))
}

/// An orchestrator replica.
pub struct Orchestrator {
    pub address: SocketAddr,
    /// Set when started with NEXUS_METRICS_LISTEN.
    pub metrics: Option<SocketAddr>,
    pub process: Process,
}

impl Orchestrator {
    pub fn start(redis_url: &str, env: &[(&str, &str)]) -> Self {
        Self::start_on("127.0.0.1:0", redis_url, env)
    }

    /// On a given address, e.g. to come back on the same port after a kill.
    pub fn start_on(listen: &str, redis_url: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary("orchestrator"));
        command
            .args(["--listen", listen, "--redis-url", redis_url])
            .envs(env.iter().copied());
        let (process, lines) = Process::spawn_collecting("orchestrator", command, "orchestrator listening on");
        Self {
            address: address_in(lines.last().unwrap()),
            metrics: metrics_address(&lines),
            process,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// A phase worker.
pub struct Worker {
    pub name: String,
    /// Set when started with NEXUS_METRICS_LISTEN.
    pub metrics: Option<SocketAddr>,
    pub process: Process,
}

impl Worker {
    pub fn start(redis_url: &str, model_base_url: &str, env: &[(&str, &str)]) -> Self {
        let name = format!("test-worker-{}", free_port());
        let mut command = Command::new(binary("phase-worker"));
        command
            .args([
                "--redis-url",
                redis_url,
                "--openrouter-base-url",
                model_base_url,
                "--consumer-name",
                &name,
            ])
            .env("OPENROUTER_API_KEY", "sk-or-test-not-a-real-key")
            .env("NEXUS_MODEL_BACKOFF_BASE_MS", "50")
            .env("NEXUS_VISIBILITY_TIMEOUT_MS", "3000")
            // Off unless a test turns it on: the stand-in's short answers make
            // later phases of different runs identical requests, and most
            // tests count the calls their runs make.
            .env("NEXUS_CACHE_TTL_SECS", "0")
            .envs(env.iter().copied());
        let (process, lines) = Process::spawn_collecting("phase-worker", command, "phase-worker ready");
        Self {
            name,
            metrics: metrics_address(&lines),
            process,
        }
    }
}

/// Stand-in arguments for a model that answers 30 words almost at once.
pub const FAST_MODEL: &[&str] = &[
    "--first-token-latency-ms",
    "5",
    "--tokens-per-second",
    "2000",
    "--reply-words",
    "30",
];

/// Stand-in arguments for a model that streams 40 words over about two
/// seconds, so a test can act in the middle of a phase.
pub const SLOW_MODEL: &[&str] = &[
    "--first-token-latency-ms",
    "50",
    "--tokens-per-second",
    "20",
    "--reply-words",
    "40",
];

/// Redis, the stand-in model, orchestrators and workers.
pub struct Stack {
    pub redis: RedisServer,
    pub model: StandIn,
    pub orchestrators: Vec<Orchestrator>,
    pub workers: Vec<Worker>,
}

impl Stack {
    /// One orchestrator and `workers` workers, the stand-in answering fast.
    pub fn start(workers: usize) -> Self {
        Self::start_with(1, workers, FAST_MODEL)
    }

    pub fn start_with(orchestrators: usize, workers: usize, model_args: &[&str]) -> Self {
        let redis = RedisServer::start();
        let model = StandIn::start(model_args);
        let orchestrators = (0..orchestrators)
            .map(|_| Orchestrator::start(&redis.url(), &[]))
            .collect();
        let workers = (0..workers)
            .map(|_| Worker::start(&redis.url(), &model.base_url(), &[]))
            .collect();
        Self {
            redis,
            model,
            orchestrators,
            workers,
        }
    }

    pub fn endpoint(&self) -> String {
        self.orchestrators[0].endpoint()
    }
}
