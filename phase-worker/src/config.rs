//! The phase worker's configuration: flags with environment fallbacks.

use crate::model::ModelClientConfig;
use clap::Parser;
use nexus_pipeline::connection::RedisArgs;
use secrecy::SecretString;
use std::time::Duration;

#[derive(Parser, Clone)]
#[command(
    name = "phase-worker",
    version,
    about = "Claims Nexus phase tasks from Redis Streams, calls the model through OpenRouter (streaming) and publishes deltas and results.",
    long_about = "Claims Nexus phase tasks from Redis Streams, calls the model through OpenRouter's chat completions API (streaming) and publishes output deltas and the result. Stateless: run as many as you like; a task held by a worker that dies is reclaimed by another after the visibility timeout."
)]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Base URL of OpenRouter or any OpenAI-compatible server (a local model
    /// server, the stand-in). Requests go to {base}/api/v1/chat/completions.
    #[arg(long, env = "OPENROUTER_BASE_URL", default_value = "https://openrouter.ai")]
    pub openrouter_base_url: String,

    /// A PEM file of root certificates to trust for the model server, besides
    /// the system's: a private gateway's CA, or the stand-in model's
    /// certificate (stand-in-model --tls --cert-out PATH). Unset or empty: none.
    #[arg(long, env = "NEXUS_MODEL_CA_FILE", value_parser = any_path())]
    pub model_ca_file: Option<std::path::PathBuf>,

    /// OpenRouter API key, sent as a bearer token. Never logged.
    #[arg(long, env = "OPENROUTER_API_KEY", hide_env_values = true)]
    pub openrouter_api_key: Option<String>,

    /// Sent as HTTP-Referer (OpenRouter's app attribution). Empty: not sent.
    #[arg(
        long,
        env = "NEXUS_HTTP_REFERER",
        default_value = "https://github.com/nexus-workflows/nexus"
    )]
    pub http_referer: String,

    /// Sent as X-Title (OpenRouter's app attribution). Empty: not sent.
    #[arg(long, env = "NEXUS_APP_TITLE", default_value = "Nexus")]
    pub app_title: String,

    /// Model calls this worker runs at once. A call mostly waits, so this can
    /// be in the thousands.
    #[arg(long, env = "NEXUS_WORKER_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub max_in_flight: usize,

    /// A task not heartbeated for this long is presumed lost with its worker
    /// and reclaimed by another, in milliseconds. Live workers heartbeat
    /// every third of it.
    #[arg(long, env = "NEXUS_VISIBILITY_TIMEOUT_MS", default_value_t = 30_000)]
    pub visibility_timeout_ms: u64,

    /// A task started this many times without finishing (it crashes or
    /// stalls whoever runs it) goes to the dead-letter stream and its
    /// workflow fails. Takeovers by workers that died before starting it do
    /// not count, up to four times this many deliveries.
    #[arg(long, env = "NEXUS_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,

    /// On SIGTERM, how long in-flight calls may finish before they are
    /// aborted and their tasks handed back to the stream for other workers,
    /// in milliseconds.
    #[arg(long, env = "NEXUS_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Model call: TCP/TLS connect timeout, in milliseconds.
    #[arg(long, env = "NEXUS_MODEL_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,

    /// Model call: longest wait for the first token, in milliseconds.
    #[arg(long, env = "NEXUS_MODEL_FIRST_TOKEN_TIMEOUT_MS", default_value_t = 120_000)]
    pub first_token_timeout_ms: u64,

    /// Model call: longest silence (not even a keep-alive comment) on an open
    /// stream, in milliseconds.
    #[arg(long, env = "NEXUS_MODEL_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// Model call: longest duration of one try, in milliseconds.
    #[arg(long, env = "NEXUS_MODEL_TOTAL_TIMEOUT_MS", default_value_t = 600_000)]
    pub total_timeout_ms: u64,

    /// Model call: tries per phase (retryable errors only).
    #[arg(long, env = "NEXUS_MODEL_MAX_TRIES", default_value_t = 3)]
    pub max_tries: u32,

    /// Model call: first backoff before a retry, in milliseconds; doubles per
    /// try, with full jitter. A Retry-After from the provider wins if longer.
    #[arg(long, env = "NEXUS_MODEL_BACKOFF_BASE_MS", default_value_t = 500)]
    pub backoff_base_ms: u64,

    /// Model call: longest backoff between tries, in milliseconds.
    #[arg(long, env = "NEXUS_MODEL_BACKOFF_MAX_MS", default_value_t = 10_000)]
    pub backoff_max_ms: u64,

    /// Model call: longest single wait a provider's Retry-After (seconds or
    /// HTTP-date) can impose, in milliseconds; larger values are capped.
    #[arg(long, env = "NEXUS_MODEL_MAX_RETRY_AFTER_MS", default_value_t = 60_000)]
    pub max_retry_after_ms: u64,

    /// Model call: total time one phase may spend waiting out Retry-After and
    /// the shared rate limit, in milliseconds. Waiting is not a failed try,
    /// so it has this budget of its own; past it the phase fails.
    #[arg(long, env = "NEXUS_MODEL_MAX_TOTAL_WAIT_MS", default_value_t = 300_000)]
    pub max_total_wait_ms: u64,

    /// Publishing a finished answer is retried this long while Redis is
    /// unreachable, in milliseconds, before the task is left to be redelivered
    /// (which calls the model again).
    #[arg(long, env = "NEXUS_RESULT_PUBLISH_PATIENCE_MS", default_value_t = 60_000)]
    pub result_publish_patience_ms: u64,

    /// Shared per-model rate limits, as "model=N/s,model=N/min,*=N/s" ("*":
    /// every other model) for requests and "model=N tok/min" for tokens; a
    /// model may have both. Calls are spaced evenly (at most one per 1/N s)
    /// across all workers, and no minute's calls reserve more than N tokens
    /// (prompt plus answer, estimated), through Redis. Empty: no limit. A
    /// provider's Retry-After always holds off all workers for that model.
    #[arg(long, env = "NEXUS_MODEL_RATE_LIMITS", default_value = "", value_parser = crate::pacing::RateLimits::parse)]
    pub model_rate_limits: crate::pacing::RateLimits,

    /// How long a model's finished answer is kept to answer an identical
    /// request (same model, messages and parameters) without a call, in
    /// seconds. 0 turns the response cache off for this worker.
    #[arg(long, env = "NEXUS_CACHE_TTL_SECS", default_value_t = 24 * 3600)]
    pub cache_ttl_secs: u64,

    /// Model prices in USD per million tokens, as "model=input/output,...",
    /// to estimate a call's cost against its run's cost cap. A model without
    /// a price is only stopped once its run has spent the cap.
    #[arg(long, env = "NEXUS_MODEL_PRICES", default_value = crate::model::budget::DEFAULT_MODEL_PRICES)]
    pub model_prices: crate::model::budget::ModelPrices,

    /// Tokens a call's answer is assumed to use under a tokens-per-minute
    /// limit (`NEXUS_MODEL_RATE_LIMITS` with `tok/min`) when its phase sets
    /// no `max_tokens`.
    #[arg(long, env = "NEXUS_MODEL_ANSWER_TOKENS", default_value_t = 1000)]
    pub answer_token_allowance: u64,

    /// Most connections to the model server the calls are spread over.
    /// Default: one per `NEXUS_MODEL_STREAMS_PER_CONNECTION` calls in flight
    /// (`NEXUS_WORKER_MAX_IN_FLIGHT`), because an HTTP/2 server allows only
    /// so many concurrent streams per connection and makes the rest wait.
    /// A connection is opened when the ones before it are full, so a worker
    /// holds as many as its calls need.
    #[arg(long, env = "NEXUS_MODEL_CONNECTIONS")]
    pub model_connections: Option<usize>,

    /// Calls one connection to the model server carries before the next is
    /// used: below what the server allows (HTTP/2 servers commonly allow 100
    /// to 256 concurrent streams).
    #[arg(long, env = "NEXUS_MODEL_STREAMS_PER_CONNECTION", default_value_t = crate::model::DEFAULT_STREAMS_PER_CONNECTION)]
    pub model_streams_per_connection: usize,

    /// This worker's consumer name. Default: host, pid and a random suffix.
    #[arg(long, env = "NEXUS_CONSUMER_NAME")]
    pub consumer_name: Option<String>,

    #[command(flatten)]
    pub process: nexus_runtime::process::ProcessArgs,
}

/// A path, the empty one included (clap's own refuses it), so that an empty
/// variable means "unset" as it does for the other settings.
fn any_path() -> impl clap::builder::TypedValueParser<Value = std::path::PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().map(std::path::PathBuf::from)
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("redis", &self.redis)
            .field(
                "openrouter_base_url",
                &crate::model::redact_url_text(&self.openrouter_base_url),
            )
            .field("openrouter_api_key", &self.openrouter_api_key.as_ref().map(|_| "<set>"))
            .field("model_ca_file", &self.model_ca_file)
            .field("max_in_flight", &self.max_in_flight)
            .field("visibility_timeout_ms", &self.visibility_timeout_ms)
            .field("max_deliveries", &self.max_deliveries)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("first_token_timeout_ms", &self.first_token_timeout_ms)
            .field("total_timeout_ms", &self.total_timeout_ms)
            .field("max_tries", &self.max_tries)
            .field("model_rate_limits", &self.model_rate_limits)
            .field("cache_ttl_secs", &self.cache_ttl_secs)
            .field("answer_token_allowance", &self.answer_token_allowance)
            .field("model_connections", &self.model_connections)
            .field("model_streams_per_connection", &self.model_streams_per_connection)
            .field("model_prices", &self.model_prices)
            .field("consumer_name", &self.consumer_name)
            .finish()
    }
}

impl Config {
    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_millis(self.visibility_timeout_ms)
    }

    pub fn model_client(&self) -> ModelClientConfig {
        let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_string());
        let streams_per_connection = self.model_streams_per_connection.max(1);
        ModelClientConfig {
            base_url: self.openrouter_base_url.clone(),
            api_key: self
                .openrouter_api_key
                .clone()
                .filter(|key| !key.is_empty())
                .map(SecretString::from),
            http_referer: non_empty(&self.http_referer),
            app_title: non_empty(&self.app_title),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            first_token_timeout: Duration::from_millis(self.first_token_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            total_timeout: Duration::from_millis(self.total_timeout_ms),
            max_tries: self.max_tries.max(1),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            max_retry_after: Duration::from_millis(self.max_retry_after_ms),
            max_total_wait: Duration::from_millis(self.max_total_wait_ms),
            ca_file: self.model_ca_file.clone().filter(|path| !path.as_os_str().is_empty()),
            answer_token_allowance: self.answer_token_allowance,
            connections: self
                .model_connections
                .unwrap_or_else(|| self.max_in_flight.div_ceil(streams_per_connection))
                .max(1),
            streams_per_connection,
        }
    }
}
