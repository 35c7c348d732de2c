//! The orchestrator's configuration: flags with environment fallbacks, so the
//! same binary runs from a shell, a process script, compose or Kubernetes.

use clap::Parser;
use nexus_pipeline::connection::RedisArgs;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Clone)]
#[command(
    name = "orchestrator",
    version,
    about = "Serves the Nexus gRPC API, keeps workflow state in Redis and drives phases over Redis Streams.",
    long_about = "Serves the Nexus gRPC API (WorkflowService, gRPC health and server reflection), keeps workflow state in Redis and drives phases over Redis Streams. Run as many replicas as you like against the same Redis: they share the work through consumer groups."
)]
pub struct Config {
    /// Address the gRPC server listens on. Port 0 picks a free port; the
    /// chosen address is printed as "orchestrator listening on ADDR".
    #[arg(long, env = "NEXUS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub redis: RedisArgs,

    /// Pipeline definition file (TOML): the default pipeline, for runs that
    /// name none. Without it the built-in six-phase "enterprise-plan" is.
    #[arg(long, env = "NEXUS_PIPELINE_FILE")]
    pub pipeline_file: Option<PathBuf>,

    /// A directory of pipeline files (every *.toml), offered to runs by
    /// their `name` beside the built-in "enterprise-plan" and
    /// "quick-review" (a file may replace a built-in by using its name).
    #[arg(long, env = "NEXUS_PIPELINES_DIR")]
    pub pipelines_dir: Option<PathBuf>,

    /// OpenRouter model id for each role the pipeline uses, as
    /// "role=model,role=model".
    #[arg(
        long,
        env = "NEXUS_MODELS",
        default_value = "primary=anthropic/claude-sonnet-4.5,reviewer=google/gemini-3-pro-preview",
        value_parser = parse_models
    )]
    pub models: BTreeMap<String, String>,

    /// Largest accepted plan (description plus fields), in bytes.
    #[arg(long, env = "NEXUS_MAX_PLAN_BYTES", default_value_t = 64 * 1024)]
    pub max_plan_bytes: usize,

    /// Cost cap in USD for runs that set none (`max_cost_usd` 0); 0 for no
    /// cap.
    #[arg(long, env = "NEXUS_DEFAULT_MAX_COST_USD", default_value_t = 0.0)]
    pub default_max_cost_usd: f64,

    /// The highest cost cap a run may ask for, in USD; with it set, every run
    /// has a cap (this one when it asks for none). 0: no limit.
    #[arg(long, env = "NEXUS_MAX_COST_USD", default_value_t = 0.0)]
    pub max_cost_usd: f64,

    /// How long a finished workflow (state, events, outputs) is kept, in
    /// seconds. Idempotency keys are kept as long.
    #[arg(long, env = "NEXUS_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,

    /// Most concurrent gRPC streams (watchers, calls) on one HTTP/2
    /// connection. Clients multiplex many watchers over few connections.
    #[arg(long, env = "NEXUS_MAX_STREAMS_PER_CONNECTION", default_value_t = 10_000)]
    pub max_streams_per_connection: u32,

    /// Require "authorization: Bearer <token>" on WorkflowService calls.
    /// Health and reflection stay open. This token is tenant "default",
    /// with admin rights; NEXUS_TOKENS_FILE gives more.
    #[arg(long, env = "NEXUS_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Tokens and their tenants, one per line: "<tenant> <token> [admin]".
    /// A tenant sees only its own workflows; admin tokens see all and may
    /// use the operators' service. Re-read when the file changes.
    #[arg(long, env = "NEXUS_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Serve without any token on an address beyond loopback. Without it,
    /// an orchestrator with no token configured refuses to listen on
    /// anything but 127.0.0.1 or ::1: running open must be a choice.
    #[arg(long, env = "NEXUS_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Most watch streams one tenant may have open on this replica (0: no limit).
    #[arg(long, env = "NEXUS_TENANT_MAX_WATCHES", default_value_t = 0)]
    pub tenant_max_watches: usize,

    /// Most watch streams this replica serves in all (0: no limit).
    #[arg(long, env = "NEXUS_MAX_WATCHERS", default_value_t = 0)]
    pub max_watchers: usize,

    /// Most StartWorkflow/ForkWorkflow calls one tenant may make per minute,
    /// across replicas (0: no limit).
    #[arg(long, env = "NEXUS_TENANT_STARTS_PER_MINUTE", default_value_t = 0)]
    pub tenant_starts_per_minute: u64,

    /// Most runs of one tenant in flight (not yet completed, failed or
    /// cancelled), across replicas (0: no limit).
    #[arg(long, env = "NEXUS_TENANT_MAX_RUNNING", default_value_t = 0)]
    pub tenant_max_running: u64,

    /// Serve the web tracker on the gRPC port: the page at "http://ADDR/"
    /// and the API to it over gRPC-Web (HTTP/1.1 accepted beside HTTP/2),
    /// behind the same token as gRPC.
    #[arg(long, env = "NEXUS_WEB", value_parser = clap::builder::BoolishValueParser::new())]
    pub web: bool,

    /// Certificate chain (PEM) the gRPC port presents: with NEXUS_TLS_KEY,
    /// the port speaks TLS only (and the web tracker is served over https).
    /// Both files are re-read when they change: new connections get the new
    /// certificate, open ones keep theirs.
    #[arg(long, env = "NEXUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of NEXUS_TLS_CERT.
    #[arg(long, env = "NEXUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM): with TLS on, require a client certificate
    /// signed by one of them (mutual TLS). Re-read when it changes.
    #[arg(long, env = "NEXUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// On SIGTERM, how long to let calls and loops finish before exiting
    /// anyway (even with Redis down), in milliseconds. Open watch streams end
    /// at once with UNAVAILABLE, so their clients resume on another replica.
    #[arg(long, env = "NEXUS_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    #[command(flatten)]
    pub process: nexus_runtime::process::ProcessArgs,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("redis", &self.redis)
            .field("pipeline_file", &self.pipeline_file)
            .field("pipelines_dir", &self.pipelines_dir)
            .field("models", &self.models)
            .field("max_plan_bytes", &self.max_plan_bytes)
            .field("retention_secs", &self.retention_secs)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
            .field("tokens_file", &self.tokens_file)
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("web", &self.web)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .finish()
    }
}

fn parse_models(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (role, model) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not role=model"))?;
            Ok((role.trim().to_string(), model.trim().to_string()))
        })
        .collect()
}
