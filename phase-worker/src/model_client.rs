//! The one place that talks HTTP to the model: OpenRouter, or anything that speaks its
//! OpenAI-style chat completions API (the stand-in model in tests and the offline demo).
//!
//! Every call streams, because streaming is the only way to show progress, to notice a stalled
//! provider early and to see errors that arrive after the `200` status has gone out. A call is a
//! series of tries: each try either yields a complete answer (text, usage from the last chunk,
//! generation id) or fails with a [`ModelError`] that says whether trying again can help. The
//! retry policy (exponential backoff with full jitter, `Retry-After` as a floor) lives here so
//! the worker only sees deltas, retry notices and one final outcome. Wire facts follow
//! `/work/shared/OPENROUTER.md`.
//!
//! The body is parsed as server-sent events, never as lines: events may arrive split across
//! reads (even inside a UTF-8 character), with CRLF line ends, as several `data:` lines, and
//! with `:` comments between them. Reasoning deltas (`delta.reasoning`) are not part of the
//! answer, but they are the model's first tokens: they stop the first-token clock. Their count
//! comes with the usage chunk.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const CHAT_PATH: &str = "/api/v1/chat/completions";
const GENERATION_ID_HEADER: &str = "x-generation-id";
const DONE_MARKER: &str = "[DONE]";
/// Code assumed when an error chunk carries none we can read: OpenRouter's "model down".
const UNKNOWN_ERROR_CODE: u16 = 502;
const EXCERPT_CHARS: usize = 120;
/// Most of an error response's body that is read; the rest is dropped unread.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;
/// Longest provider message carried into reasons, events and logs.
const MAX_MESSAGE_CHARS: usize = 500;
/// The shortest wait a `Retry-After` can impose, whatever it says.
const MIN_WAIT: Duration = Duration::from_millis(10);
/// Pacer waits shorter than this are not announced as events.
const ANNOUNCED_WAIT: Duration = Duration::from_millis(100);

/// reqwest is built without a default TLS crypto provider; this installs ring's. Safe to call
/// any number of times: "already installed" is not an error.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// Where the model lives and how patient to be with it.
#[derive(Clone)]
pub struct ModelClientConfig {
    /// Server root such as `https://openrouter.ai`; the chat path is appended.
    pub base_url: String,
    /// Sent as a bearer token when set. `Debug` prints it redacted.
    pub api_key: Option<SecretString>,
    /// OpenRouter attribution: sent as `HTTP-Referer`.
    pub http_referer: Option<String>,
    /// OpenRouter attribution: sent as `X-Title`.
    pub app_title: Option<String>,
    pub connect_timeout: Duration,
    /// From sending the request to the first token, content or reasoning: a thinking model
    /// that streams reasoning is making progress, while keep-alive comments do not count, so a
    /// provider that only says "processing" still times out.
    pub first_token_timeout: Duration,
    /// Longest silence between two pieces of the body, comments included.
    pub idle_timeout: Duration,
    /// Ceiling on one whole try.
    pub total_timeout: Duration,
    pub max_tries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A server's `Retry-After` is honoured up to this long.
    pub max_retry_after: Duration,
    /// Total time one call may spend waiting out `Retry-After` and the
    /// shared rate limit. Waits are not tries: they have this budget instead.
    pub max_total_wait: Duration,
    /// A PEM file of root certificates to trust besides the system's: a
    /// private gateway's CA, or the stand-in model's certificate (`--tls`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for ModelClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelClientConfig")
            .field("base_url", &redact_url_text(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("http_referer", &self.http_referer)
            .field("app_title", &self.app_title)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("total_timeout", &self.total_timeout)
            .field("max_tries", &self.max_tries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("max_retry_after", &self.max_retry_after)
            .field("max_total_wait", &self.max_total_wait)
            .finish()
    }
}

/// A URL as text with any credentials, query and fragment removed; text that
/// is no URL is replaced whole, since it may be anything.
pub fn redact_url_text(text: &str) -> String {
    reqwest::Url::parse(text).map_or_else(|_| "<not a URL>".to_string(), |url| redact_url(&url))
}

impl Default for ModelClientConfig {
    fn default() -> Self {
        Self {
            base_url: "https://openrouter.ai".into(),
            api_key: None,
            http_referer: None,
            app_title: None,
            connect_timeout: Duration::from_secs(10),
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(300),
            max_tries: 3,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
            max_total_wait: Duration::from_secs(300),
            ca_file: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What to ask. `response_format` is passed through as is (e.g. a `json_schema` object).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub response_format: Option<Value>,
    /// W3C trace context of the span the call belongs to. Each try is a
    /// `model_request` span, its child, and its `traceparent` header names
    /// that span; when spans are not exported, the header is this value.
    /// Either way the provider (and the stand-in) can tell calls apart.
    pub traceparent: Option<String>,
    /// Accept an answer cut short (`finish_reason` "length" or
    /// "content_filter"); otherwise it is a failed try.
    pub accept_truncated: bool,
}

/// A request ready to send: encoded once, sent on every try.
#[derive(Clone)]
struct Prepared {
    body: bytes::Bytes,
    headers: HeaderMap,
}

impl Prepared {
    /// The request as the try of `span` sends it: its `traceparent` header
    /// names that span (kept as prepared when spans are not exported).
    fn for_try(&self, span: &tracing::Span) -> Prepared {
        let mut this = self.clone();
        if let Some(value) = nexus_runtime::telemetry::traceparent_of(span).and_then(|v| HeaderValue::from_str(&v).ok())
        {
            this.headers.insert(HeaderName::from_static("traceparent"), value);
        }
        this
    }
}

/// The span of one HTTP try of a call: a child of the span the call
/// belongs to.
fn model_request_span(request: &ChatRequest, try_number: u32) -> tracing::Span {
    let span = tracing::info_span!(
        "model_request",
        otel.kind = "client",
        model = %request.model,
        try_number,
        http.request.method = "POST",
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(traceparent) = &request.traceparent {
        nexus_runtime::telemetry::join_trace(&span, traceparent);
    }
    span
}

/// Marks a try's span as failed with `error` (already redacted).
fn record_failed_try(span: &tracing::Span, error: &ModelError) {
    span.record("otel.status_code", "error");
    span.record("otel.status_description", error.to_string());
}

/// Token counts and cost as the provider reported them in the stream's last chunk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    pub cached_prompt_tokens: u64,
    pub reasoning_tokens: u64,
}

/// A finished answer from the try that succeeded.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub usage: Usage,
    pub generation_id: Option<String>,
    pub finish_reason: Option<String>,
    /// Tries it took, counting the successful one.
    pub tries: u32,
}

/// Progress reported while a call runs. Deltas of a failed try have already been sent when
/// its `Retrying` arrives; `try_number` tells the tries apart.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelEvent {
    Delta {
        try_number: u32,
        text: String,
    },
    Retrying {
        failed_try: u32,
        reason: String,
        delay: Duration,
    },
    /// The call waits before its next request (the provider's `Retry-After`
    /// or the shared rate limit); not a failed try.
    Waiting {
        reason: String,
        wait: Duration,
        waited_total: Duration,
    },
}

/// Checks the final text of a try (e.g. that structured output parses); an `Err` makes the
/// try fail and be retried.
pub type OutputValidator = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Which clock ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    Connect,
    FirstToken,
    Total,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::Connect => "connecting to the model server",
            TimeoutKind::FirstToken => "the first token",
            TimeoutKind::Total => "the whole try",
        })
    }
}

/// Why a call or a try failed. Messages carry what the provider said and never the API key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model client misconfigured: {0}")]
    Config(String),
    #[error("could not encode the request: {0}")]
    Request(String),
    #[error("{status} from provider (not retried): {message}")]
    Rejected { status: u16, message: String },
    #[error("{status} from provider: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("provider failed mid-stream ({code}): {message}")]
    MidStream { code: u16, message: String },
    #[error("timed out after {after:.1?} waiting for {which}")]
    Timeout { which: TimeoutKind, after: Duration },
    #[error("stream stalled: no bytes for {0:.1?}")]
    Stalled(Duration),
    #[error("transport error: {0}")]
    Transport(String),
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("model output rejected: {0}")]
    InvalidOutput(String),
    #[error("the answer was cut short (finish_reason {0:?}); the pipeline does not accept truncated answers")]
    Truncated(String),
    #[error(
        "waited {waited:.1?} in total for the provider and the rate limit, over this phase's limit of {limit:.1?}; last: {last}"
    )]
    WaitedTooLong {
        waited: Duration,
        limit: Duration,
        last: String,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("gave up after {tries} {}; last error: {last}", tries_word(*tries))]
    Exhausted { tries: u32, last: Box<ModelError> },
}

impl ModelError {
    /// Whether another try can plausibly succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ModelError::Status { .. }
            | ModelError::Timeout { .. }
            | ModelError::Stalled(_)
            | ModelError::Transport(_)
            | ModelError::Malformed(_)
            | ModelError::InvalidOutput(_)
            | ModelError::Truncated(_) => true,
            ModelError::MidStream { code, .. } => !is_permanent_code(*code),
            ModelError::Config(_)
            | ModelError::Request(_)
            | ModelError::Rejected { .. }
            | ModelError::Cancelled
            | ModelError::WaitedTooLong { .. }
            | ModelError::Exhausted { .. } => false,
        }
    }

    /// The same error with every occurrence of `secret` in its messages
    /// replaced, for providers that echo the key back in an error body.
    pub fn redact(self, secret: &str) -> ModelError {
        if secret.is_empty() {
            return self;
        }
        let clean = |text: String| text.replace(secret, "[redacted]");
        match self {
            ModelError::Rejected { status, message } => ModelError::Rejected {
                status,
                message: clean(message),
            },
            ModelError::Status {
                status,
                message,
                retry_after,
            } => ModelError::Status {
                status,
                message: clean(message),
                retry_after,
            },
            ModelError::MidStream { code, message } => ModelError::MidStream {
                code,
                message: clean(message),
            },
            ModelError::Transport(message) => ModelError::Transport(clean(message)),
            ModelError::Malformed(message) => ModelError::Malformed(clean(message)),
            ModelError::InvalidOutput(message) => ModelError::InvalidOutput(clean(message)),
            ModelError::Exhausted { tries, last } => ModelError::Exhausted {
                tries,
                last: Box::new(last.redact(secret)),
            },
            ModelError::WaitedTooLong { waited, limit, last } => ModelError::WaitedTooLong {
                waited,
                limit,
                last: clean(last),
            },
            other => other,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ModelError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn tries_word(tries: u32) -> &'static str {
    if tries == 1 { "try" } else { "tries" }
}

/// Bad request, bad key, no credits, moderation: the same request will fail the same way.
fn is_permanent_code(code: u16) -> bool {
    (400..=403).contains(&code)
}

fn is_retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// A boxed future, so [`Pacer`] stays object-safe.
pub type PacerFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides when a try may start, shared by every caller of a model (the
/// worker's implementation keeps its state in Redis, so all workers share
/// one rate limit and one provider back-off per model). Waiting for the pacer
/// is not a try.
pub trait Pacer: Send + Sync {
    /// How long to wait before a try of `model` may start; zero means go now
    /// (and the slot is taken).
    fn reserve<'a>(&'a self, model: &'a str) -> PacerFuture<'a, Duration>;
    /// The provider asked callers of `model` to wait `wait` (a `Retry-After`).
    fn back_off<'a>(&'a self, model: &'a str, wait: Duration) -> PacerFuture<'a, ()>;
}

/// A configured connection to the model server. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    endpoint: String,
    headers: HeaderMap,
    config: ModelClientConfig,
    pacer: Option<Arc<dyn Pacer>>,
}

impl fmt::Debug for ModelClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelClient")
            .field("endpoint", &redact_url_text(&self.endpoint))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ModelClient {
    pub fn new(config: ModelClientConfig) -> Result<Self, ModelError> {
        install_crypto_provider();
        // Over TLS, ALPN picks HTTP/2 when the server offers it (OpenRouter
        // does), and then every call of this client is a stream on one shared
        // connection. One connection that died silently (a dropped NAT entry,
        // a vanished peer) would take every call with it until the TCP
        // retransmission timeout, minutes later; pings find it within
        // interval + timeout, close it, and the failed tries retry on a new one.
        const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
        const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
        let endpoint = endpoint(&config.base_url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(H2_PING_INTERVAL)
            .http2_keep_alive_timeout(H2_PING_TIMEOUT)
            .http2_keep_alive_while_idle(true);
        if let Some(path) = &config.ca_file {
            let unusable = |why: String| ModelError::Config(format!("model CA file {}: {why}", path.display()));
            let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| unusable(describe_reqwest_error(e)))?;
            if roots.is_empty() {
                return Err(unusable("no PEM certificate in it".into()));
            }
            builder = builder.tls_certs_merge(roots);
        }
        let http = builder
            .build()
            .map_err(|e| ModelError::Config(describe_reqwest_error(e)))?;
        Ok(Self {
            http,
            endpoint,
            headers: request_headers(&config)?,
            config,
            pacer: None,
        })
    }

    fn prepare(&self, request: &ChatRequest) -> Result<Prepared, ModelError> {
        let mut headers = self.headers.clone();
        if let Some(value) = request
            .traceparent
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            headers.insert(HeaderName::from_static("traceparent"), value);
        }
        Ok(Prepared {
            body: encode_request(request)?.into(),
            headers,
        })
    }

    /// Paces every try through `pacer` (rate limits, shared back-off).
    pub fn with_pacer(mut self, pacer: Arc<dyn Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Waits until the pacer lets a try of `model` start; the wait counts
    /// against the call's wait budget, not its tries.
    async fn wait_turn(
        &self,
        model: &str,
        waits: &mut WaitBudget,
        events: &mpsc::Sender<ModelEvent>,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        let Some(pacer) = &self.pacer else { return Ok(()) };
        loop {
            let wait = pacer.reserve(model).await;
            if wait.is_zero() {
                return Ok(());
            }
            let reason = format!("the shared rate limit of {model} is used up");
            self.wait_out(wait, reason, waits, events, cancel).await?;
        }
    }

    /// Sleeps `wait` unless that would pass the call's total wait budget;
    /// announces waits worth telling a watcher about.
    async fn wait_out(
        &self,
        wait: Duration,
        reason: String,
        waits: &mut WaitBudget,
        events: &mpsc::Sender<ModelEvent>,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        let waited_total = waits.spend(wait, &reason)?;
        tracing::debug!(?wait, ?waited_total, %reason, "model call waiting");
        with_cancel(cancel, async {
            if wait >= ANNOUNCED_WAIT {
                let event = ModelEvent::Waiting {
                    reason,
                    wait,
                    waited_total,
                };
                let _receiver_gone = events.send(event).await;
            }
            tokio::time::sleep(wait).await;
            Ok(())
        })
        .await
    }

    /// Removes the API key from a text a provider sent.
    fn redact_text(&self, text: String) -> String {
        match &self.config.api_key {
            Some(key) if !key.expose_secret().is_empty() => text.replace(key.expose_secret(), "[redacted]"),
            _ => text,
        }
    }

    /// Removes the API key from an error's messages.
    fn redact(&self, error: ModelError) -> ModelError {
        match &self.config.api_key {
            Some(key) => error.redact(key.expose_secret()),
            None => error,
        }
    }

    /// Asks the model, retrying failed tries per the config. Deltas and retry notices go to
    /// `events` as they happen; a slow receiver slows the stream down rather than losing text.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        validator: Option<&OutputValidator>,
        events: &mpsc::Sender<ModelEvent>,
        cancel: &CancellationToken,
    ) -> Result<Completion, ModelError> {
        let prepared = self.prepare(request)?;
        let mut waits = WaitBudget::new(self.config.max_total_wait);
        let mut try_number = 1;
        loop {
            self.wait_turn(&request.model, &mut waits, events, cancel)
                .await
                .map_err(|e| self.redact(e))?;
            let span = model_request_span(request, try_number);
            let tried = self
                .try_once(
                    &prepared.for_try(&span),
                    try_number,
                    request.accept_truncated,
                    validator,
                    events,
                    cancel,
                )
                .instrument(span.clone())
                .await;
            let error = match tried {
                Ok(completion) => {
                    return Ok(Completion {
                        tries: try_number,
                        ..completion
                    });
                }
                Err(error) => self.redact(error),
            };
            record_failed_try(&span, &error);
            if let Some(asked) = error.retry_after() {
                // The provider said when to come back: waiting is not a failed
                // try, so it spends the wait budget and the try number stays.
                // Never less than the first backoff: a `Retry-After: 0` (or a
                // date already past) must not become a tight loop.
                let shortest = self.config.backoff_base.max(MIN_WAIT);
                let wait = asked.clamp(shortest, self.config.max_retry_after.max(shortest));
                if let Some(pacer) = &self.pacer {
                    pacer.back_off(&request.model, wait).await;
                }
                let reason = format!("{error}; the provider asked to wait {asked:.1?}");
                self.wait_out(wait, reason, &mut waits, events, cancel).await?;
                continue;
            }
            self.wait_before_retry(error, try_number, events, cancel).await?;
            try_number += 1;
        }
    }

    /// Gives up with `error` unless it is retryable and tries remain; otherwise reports the
    /// retry and sleeps out the backoff.
    async fn wait_before_retry(
        &self,
        error: ModelError,
        failed_try: u32,
        events: &mpsc::Sender<ModelEvent>,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        if !error.is_retryable() {
            return Err(error);
        }
        if failed_try >= self.config.max_tries.max(1) {
            let last = Box::new(error);
            return Err(ModelError::Exhausted {
                tries: failed_try,
                last,
            });
        }
        let delay = self.backoff().delay(failed_try, error.retry_after(), rand::random());
        let reason = format!("{error}; retrying in {delay:.1?}");
        tracing::warn!(failed_try, %reason, "model try failed");
        let event = ModelEvent::Retrying {
            failed_try,
            reason,
            delay,
        };
        with_cancel(cancel, async {
            let _receiver_gone = events.send(event).await;
            tokio::time::sleep(delay).await;
            Ok(())
        })
        .await
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.config.backoff_base,
            max: self.config.backoff_max,
            max_retry_after: self.config.max_retry_after,
        }
    }

    /// One try under the total timeout and the cancel token, then the validator.
    async fn try_once(
        &self,
        prepared: &Prepared,
        try_number: u32,
        accept_truncated: bool,
        validator: Option<&OutputValidator>,
        events: &mpsc::Sender<ModelEvent>,
        cancel: &CancellationToken,
    ) -> Result<Completion, ModelError> {
        tracing::debug!(try_number, endpoint = %redact_url_text(&self.endpoint), "model try starting");
        let total = self.config.total_timeout;
        let attempt = tokio::time::timeout(total, self.stream_once(prepared, try_number, events));
        let completion = with_cancel(cancel, async {
            attempt.await.unwrap_or(Err(ModelError::Timeout {
                which: TimeoutKind::Total,
                after: total,
            }))
        })
        .await?;
        if let Some(reason) = completion.finish_reason.as_deref().filter(|r| is_truncation(r))
            && !accept_truncated
        {
            return Err(ModelError::Truncated(reason.to_string()));
        }
        if let Some(validate) = validator {
            validate(&completion.text).map_err(ModelError::InvalidOutput)?;
        }
        Ok(completion)
    }

    async fn stream_once(
        &self,
        prepared: &Prepared,
        try_number: u32,
        events: &mpsc::Sender<ModelEvent>,
    ) -> Result<Completion, ModelError> {
        let first_token_due = Instant::now() + self.config.first_token_timeout;
        let response = self.send(prepared, first_token_due).await?;
        let generation_id = response
            .headers()
            .get(GENERATION_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let reply = self.read_reply(response, try_number, first_token_due, events).await?;
        reply.finish(generation_id)
    }

    /// Reads the SSE body, forwarding each delta as it arrives.
    async fn read_reply(
        &self,
        response: reqwest::Response,
        try_number: u32,
        first_token_due: Instant,
        events: &mpsc::Sender<ModelEvent>,
    ) -> Result<Reply, ModelError> {
        let bytes = idle_guarded(response.bytes_stream(), self.config.idle_timeout);
        let mut sse = Box::pin(bytes.eventsource());
        let mut reply = Reply::default();
        while let Some(event) = self.next_event(&mut sse, reply.started, first_token_due).await? {
            // A failed parse quotes the provider's text: quote it scrubbed.
            let data = parse_data(&event.data).or_else(|_| parse_data(&self.redact_text(event.data.clone())))?;
            let Data::Chunk(chunk) = data else {
                reply.done = true;
                break;
            };
            if let Some(text) = reply.apply(chunk) {
                let _receiver_gone = events.send(ModelEvent::Delta { try_number, text }).await;
            }
        }
        Ok(reply)
    }

    /// Sends the request; a non-2xx answer becomes the matching error.
    async fn send(&self, prepared: &Prepared, first_token_due: Instant) -> Result<reqwest::Response, ModelError> {
        let request = self
            .http
            .post(&self.endpoint)
            .headers(prepared.headers.clone())
            .body(prepared.body.clone())
            .send();
        let response = tokio::time::timeout_at(first_token_due, request)
            .await
            .map_err(|_| self.first_token_timeout())?
            .map_err(|e| self.transport_error(e))?;
        tracing::Span::current().record("http.response.status_code", response.status().as_u16());
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.error_from_response(response).await)
    }

    async fn error_from_response(&self, response: reqwest::Response) -> ModelError {
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers(), std::time::SystemTime::now());
        let body = tokio::time::timeout(self.config.idle_timeout, read_bounded(response, MAX_ERROR_BODY_BYTES))
            .await
            .unwrap_or_default();
        // Scrubbed before any excerpt is cut, so no part of a key survives.
        http_error(status, &self.redact_text(body), retry_after)
    }

    /// The next SSE event; until the first token (content or reasoning) arrives, also bounded
    /// by its deadline.
    async fn next_event<S>(
        &self,
        sse: &mut S,
        started: bool,
        first_token_due: Instant,
    ) -> Result<Option<Event>, ModelError>
    where
        S: Stream<Item = Result<Event, EventStreamError<BodyError>>> + Unpin,
    {
        let next = if started {
            sse.next().await
        } else {
            tokio::time::timeout_at(first_token_due, sse.next())
                .await
                .map_err(|_| self.first_token_timeout())?
        };
        next.transpose().map_err(|e| self.stream_error(e))
    }

    fn first_token_timeout(&self) -> ModelError {
        ModelError::Timeout {
            which: TimeoutKind::FirstToken,
            after: self.config.first_token_timeout,
        }
    }

    fn transport_error(&self, error: reqwest::Error) -> ModelError {
        if error.is_connect() && error.is_timeout() {
            let after = self.config.connect_timeout;
            return ModelError::Timeout {
                which: TimeoutKind::Connect,
                after,
            };
        }
        ModelError::Transport(describe_reqwest_error(error))
    }

    fn stream_error(&self, error: EventStreamError<BodyError>) -> ModelError {
        match error {
            EventStreamError::Transport(BodyError::Idle) => ModelError::Stalled(self.config.idle_timeout),
            EventStreamError::Transport(BodyError::Transport(e)) => self.transport_error(e),
            EventStreamError::Utf8(e) => ModelError::Malformed(format!("stream is not UTF-8: {e}")),
            EventStreamError::Parser(_) => ModelError::Malformed("stream is not valid server-sent events".into()),
        }
    }
}

fn endpoint(base_url: &str) -> Result<String, ModelError> {
    let endpoint = format!("{}{CHAT_PATH}", base_url.trim_end_matches('/'));
    reqwest::Url::parse(&endpoint)
        .map_err(|e| ModelError::Config(format!("model base URL is not a valid URL: {e}")))?;
    Ok(endpoint)
}

fn request_headers(config: &ModelClientConfig) -> Result<HeaderMap, ModelError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    if let Some(key) = &config.api_key {
        let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose_secret()))
            .map_err(|_| ModelError::Config("the API key has characters not allowed in a header".into()))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let optional = [("http-referer", &config.http_referer), ("x-title", &config.app_title)];
    for (name, value) in optional {
        if let Some(value) = value {
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|_| ModelError::Config(format!("{name} is not a valid header value")))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(headers)
}

/// The OpenAI-style body; always streaming.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a Value>,
}

fn encode_request(request: &ChatRequest) -> Result<Vec<u8>, ModelError> {
    let wire = WireRequest {
        model: &request.model,
        messages: &request.messages,
        stream: true,
        temperature: request.temperature,
        max_tokens: request.max_tokens,
        response_format: request.response_format.as_ref(),
    };
    serde_json::to_vec(&wire).map_err(|e| ModelError::Request(e.to_string()))
}

/// Runs `work` unless and until `cancel` fires first.
async fn with_cancel<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = Result<T, ModelError>>,
) -> Result<T, ModelError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ModelError::Cancelled),
        result = work => result,
    }
}

/// Exponential backoff with full jitter; a server's `Retry-After` is a floor, itself capped.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    max_retry_after: Duration,
}

impl Backoff {
    /// `jitter` in `[0, 1]` picks the point between zero and the exponential ceiling.
    fn delay(&self, failed_try: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let jittered = self.ceiling(failed_try).mul_f64(jitter.clamp(0.0, 1.0));
        let floor = retry_after.map_or(Duration::ZERO, |wait| wait.min(self.max_retry_after));
        jittered.max(floor)
    }

    fn ceiling(&self, failed_try: u32) -> Duration {
        let doublings = failed_try.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }
}

/// Whether a `finish_reason` says the answer was cut short.
fn is_truncation(finish_reason: &str) -> bool {
    matches!(finish_reason, "length" | "content_filter")
}

/// Up to `limit` bytes of a response body, as text; the rest is not read.
async fn read_bounded(response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// `Retry-After` as seconds (integer or decimal) or as an HTTP-date (the
/// wait until then, zero if it has passed).
fn parse_retry_after(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        // Absurdly large values are kept (the caller caps them), not dropped.
        return (seconds >= 0.0).then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The total a call may spend waiting (Retry-After, rate limit).
struct WaitBudget {
    limit: Duration,
    spent: Duration,
}

impl WaitBudget {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            spent: Duration::ZERO,
        }
    }

    /// Books `wait` and returns the total so far, or fails when it would pass
    /// the limit.
    fn spend(&mut self, wait: Duration, reason: &str) -> Result<Duration, ModelError> {
        let total = self.spent + wait;
        if total > self.limit {
            return Err(ModelError::WaitedTooLong {
                waited: self.spent,
                limit: self.limit,
                last: reason.to_string(),
            });
        }
        self.spent = total;
        Ok(total)
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    code: Value,
    #[serde(default)]
    message: String,
}

impl WireError {
    fn code(&self) -> Option<u16> {
        let code = match &self.code {
            Value::String(text) => text.parse().ok(),
            other => other.as_u64(),
        };
        code.and_then(|c| u16::try_from(c).ok())
    }
}

/// A non-2xx response as an error, with the provider's own message when it sent one.
fn http_error(status: u16, body: &str, retry_after: Option<Duration>) -> ModelError {
    let message = serde_json::from_str::<ErrorBody>(body)
        .map(|b| bounded_message(&b.error.message))
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| fallback_message(status, body));
    if is_retryable_status(status) {
        ModelError::Status {
            status,
            message,
            retry_after,
        }
    } else {
        ModelError::Rejected { status, message }
    }
}

fn fallback_message(status: u16, body: &str) -> String {
    let body = excerpt(body.trim());
    if body.is_empty() {
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason());
        reason.unwrap_or("no error message").to_owned()
    } else {
        body
    }
}

/// A provider's message, cut to [`MAX_MESSAGE_CHARS`].
fn bounded_message(text: &str) -> String {
    let mut message: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if message.len() < text.len() {
        message.push('…');
    }
    message
}

fn excerpt(text: &str) -> String {
    let mut excerpt: String = text.chars().take(EXCERPT_CHARS).collect();
    if excerpt.len() < text.len() {
        excerpt.push('…');
    }
    excerpt
}

/// reqwest's message plus its causes (the useful part, e.g. "connection refused"), with the
/// URL reduced to scheme, host and path so no query string can leak.
fn describe_reqwest_error(error: reqwest::Error) -> String {
    let url = error.url().map(redact_url);
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if let Some(url) = url {
        text.push_str(&format!(" ({url})"));
    }
    text
}

fn redact_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// What can interrupt the byte stream before SSE parsing.
#[derive(Debug)]
enum BodyError {
    Idle,
    Transport(reqwest::Error),
}

/// The body's bytes, failing with [`BodyError::Idle`] when none arrive for `idle`. It sits
/// below the SSE parser so keep-alive comments count as activity.
fn idle_guarded<B>(
    bytes: impl Stream<Item = reqwest::Result<B>> + Send + 'static,
    idle: Duration,
) -> impl Stream<Item = Result<B, BodyError>> {
    futures::stream::unfold(Some(Box::pin(bytes)), move |state| async move {
        let mut bytes = state?;
        match tokio::time::timeout(idle, bytes.next()).await {
            Err(_) => Some((Err(BodyError::Idle), None)),
            Ok(None) => None,
            Ok(Some(item)) => Some((item.map_err(BodyError::Transport), Some(bytes))),
        }
    })
}

/// What one SSE `data:` payload says.
#[derive(Debug, PartialEq)]
enum Data {
    Done,
    Chunk(Chunk),
}

#[derive(Debug, Default, PartialEq)]
struct Chunk {
    content: Option<String>,
    /// The chunk carried reasoning: the model is thinking, not silent.
    reasoning: bool,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    /// Structured reasoning; only whether there is any matters here.
    #[serde(default)]
    reasoning_details: Option<Value>,
}

impl WireDelta {
    fn has_reasoning(&self) -> bool {
        let text = self.reasoning.as_deref().is_some_and(|text| !text.is_empty());
        let details = match &self.reasoning_details {
            Some(Value::Array(items)) => !items.is_empty(),
            Some(Value::Null) | None => false,
            Some(_) => true,
        };
        text || details
    }
}

/// Lenient on purpose: providers omit or null fields they do not track.
#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cost: Option<f64>,
    prompt_tokens_details: Option<WirePromptDetails>,
    completion_tokens_details: Option<WireCompletionDetails>,
}

#[derive(Deserialize)]
struct WirePromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireCompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(wire: WireUsage) -> Self {
        let prompt_tokens = wire.prompt_tokens.unwrap_or(0);
        let completion_tokens = wire.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: wire.total_tokens.unwrap_or(prompt_tokens + completion_tokens),
            cost_usd: wire.cost.unwrap_or(0.0),
            cached_prompt_tokens: wire.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            reasoning_tokens: wire
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// Parses one `data:` payload. An `error` object is a failed try even though the HTTP status
/// was 200: OpenRouter reports failures after the stream started this way.
fn parse_data(data: &str) -> Result<Data, ModelError> {
    if data.trim() == DONE_MARKER {
        return Ok(Data::Done);
    }
    let wire: WireChunk = serde_json::from_str(data)
        .map_err(|e| ModelError::Malformed(format!("chunk is not valid JSON ({e}): {}", excerpt(data))))?;
    if let Some(error) = wire.error {
        let code = error.code().unwrap_or(UNKNOWN_ERROR_CODE);
        return Err(ModelError::MidStream {
            code,
            message: bounded_message(&error.message),
        });
    }
    let choice = wire.choices.into_iter().next();
    let (delta, finish_reason) = choice.map_or((None, None), |c| (c.delta, c.finish_reason));
    Ok(Data::Chunk(Chunk {
        reasoning: delta.as_ref().is_some_and(WireDelta::has_reasoning),
        content: delta.and_then(|d| d.content).filter(|text| !text.is_empty()),
        finish_reason,
        usage: wire.usage.map(Usage::from),
    }))
}

/// The answer as it accumulates during one try.
#[derive(Debug, Default)]
struct Reply {
    text: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    /// A first token, content or reasoning, has arrived: the first-token clock has stopped.
    started: bool,
    done: bool,
}

impl Reply {
    /// Folds a chunk in and returns its new answer text, if any; reasoning is not answer text.
    fn apply(&mut self, chunk: Chunk) -> Option<String> {
        self.started |= chunk.reasoning;
        if chunk.finish_reason.is_some() {
            self.finish_reason = chunk.finish_reason;
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let text = chunk.content?;
        self.started = true;
        self.text.push_str(&text);
        Some(text)
    }

    /// A try counts as complete only if the stream said so: `[DONE]` or the usage chunk.
    fn finish(self, generation_id: Option<String>) -> Result<Completion, ModelError> {
        if !self.done && self.usage.is_none() {
            return Err(ModelError::Malformed("stream ended before [DONE]".into()));
        }
        if self.finish_reason.as_deref() == Some("error") {
            let message = "finish_reason \"error\" without error details".into();
            return Err(ModelError::MidStream {
                code: UNKNOWN_ERROR_CODE,
                message,
            });
        }
        Ok(Completion {
            text: self.text,
            usage: self.usage.unwrap_or_default(),
            generation_id,
            finish_reason: self.finish_reason,
            tries: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(60),
    };

    fn chunk(data: &str) -> Chunk {
        match parse_data(data).expect("chunk parses") {
            Data::Chunk(chunk) => chunk,
            Data::Done => panic!("expected a chunk, got [DONE]"),
        }
    }

    #[test]
    fn backoff_ceiling_doubles_per_try_and_stops_at_the_max() {
        assert_eq!(BACKOFF.delay(1, None, 1.0), Duration::from_millis(500));
        assert_eq!(BACKOFF.delay(2, None, 1.0), Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(3, None, 1.0), Duration::from_secs(2));
        assert_eq!(BACKOFF.delay(10, None, 1.0), Duration::from_secs(10));
        assert_eq!(BACKOFF.delay(u32::MAX, None, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(BACKOFF.delay(2, None, 0.0), Duration::ZERO);
        assert_eq!(BACKOFF.delay(2, None, 0.25), Duration::from_millis(250));
        assert_eq!(BACKOFF.delay(2, None, 7.0), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_floor_capped_by_max_retry_after() {
        let one = Some(Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(1, one, 0.0), Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(5, one, 1.0), Duration::from_secs(8));
        let huge = Some(Duration::from_secs(3600));
        assert_eq!(BACKOFF.delay(1, huge, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn retry_after_header_accepts_integer_and_decimal_seconds() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let parse = |text: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(text).unwrap());
            parse_retry_after(&headers, now)
        };
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 1.5 "), Some(Duration::from_millis(1500)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:03 GMT"), Some(Duration::from_secs(3)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("1e400"), Some(Duration::MAX), "capped later, not ignored");
        assert_eq!(parse("NaN"), None);
        assert_eq!(parse("soon"), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn content_chunk_yields_text_and_finish_reason() {
        let parsed = chunk(
            r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}"#,
        );
        assert_eq!(parsed.content.as_deref(), Some("Hi"));
        assert_eq!(parsed.finish_reason.as_deref(), Some("stop"));
        assert_eq!(parsed.usage, None);
    }

    #[test]
    fn reasoning_is_progress_but_not_answer_text() {
        let thinking = chunk(
            r#"{"choices":[{"delta":{"role":"assistant","content":null,"reasoning":"Let me think",
                "reasoning_details":[{"type":"reasoning.text","text":"Let me think"}]}}]}"#,
        );
        assert!(thinking.reasoning);
        assert_eq!(thinking.content, None);
        let details_only =
            chunk(r#"{"choices":[{"delta":{"content":"","reasoning_details":[{"type":"reasoning.encrypted"}]}}]}"#);
        assert!(details_only.reasoning);
        let empty = chunk(r#"{"choices":[{"delta":{"content":"Hi","reasoning":"","reasoning_details":null}}]}"#);
        assert!(!empty.reasoning);

        let mut reply = Reply::default();
        assert_eq!(reply.apply(thinking), None);
        assert!(reply.started, "reasoning stops the first-token clock");
        assert_eq!(reply.text, "");
    }

    #[test]
    fn empty_or_null_delta_yields_no_text() {
        assert_eq!(chunk(r#"{"choices":[{"delta":{"content":""}}]}"#).content, None);
        assert_eq!(chunk(r#"{"choices":[{"delta":null}]}"#).content, None);
        assert_eq!(chunk(r#"{"choices":[]}"#), Chunk::default());
    }

    #[test]
    fn usage_chunk_reads_cost_and_token_details() {
        let parsed = chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
                "cost":0.00042,"cost_details":{"upstream_inference_cost":0.00042},
                "prompt_tokens_details":{"cached_tokens":4},
                "completion_tokens_details":{"reasoning_tokens":2}}}"#,
        );
        let usage = parsed.usage.expect("usage present");
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            (10, 5, 15)
        );
        assert_eq!(usage.cost_usd, 0.00042);
        assert_eq!((usage.cached_prompt_tokens, usage.reasoning_tokens), (4, 2));
    }

    #[test]
    fn done_marker_ends_the_stream() {
        assert_eq!(parse_data("[DONE]").unwrap(), Data::Done);
    }

    #[test]
    fn error_chunk_is_a_failed_try_retryable_by_code() {
        let provider_down = parse_data(
            r#"{"error":{"code":502,"message":"Provider disconnected"},"choices":[{"delta":{"content":""},"finish_reason":"error"}]}"#,
        )
        .unwrap_err();
        assert!(matches!(provider_down, ModelError::MidStream { code: 502, .. }));
        assert!(provider_down.is_retryable());
        let moderated = parse_data(r#"{"error":{"code":"403","message":"flagged"}}"#).unwrap_err();
        assert!(!moderated.is_retryable());
        assert!(moderated.to_string().contains("flagged"));
    }

    #[test]
    fn non_json_chunk_is_a_retryable_malformed_error() {
        let error = parse_data("{this is not json").unwrap_err();
        assert!(matches!(error, ModelError::Malformed(_)));
        assert!(error.is_retryable());
    }

    #[test]
    fn stream_without_done_or_usage_is_not_a_completion() {
        let mut reply = Reply::default();
        reply.apply(Chunk {
            content: Some("partial".into()),
            ..Chunk::default()
        });
        assert!(matches!(reply.finish(None), Err(ModelError::Malformed(_))));
    }

    #[test]
    fn finished_stream_keeps_text_usage_and_finish_reason() {
        let mut reply = Reply::default();
        reply.apply(Chunk {
            content: Some("a".into()),
            ..Chunk::default()
        });
        reply.apply(Chunk {
            content: Some("b".into()),
            finish_reason: Some("stop".into()),
            ..Chunk::default()
        });
        reply.apply(Chunk {
            usage: Some(Usage {
                total_tokens: 3,
                ..Usage::default()
            }),
            ..Chunk::default()
        });
        let completion = reply.finish(Some("gen-1".into())).unwrap();
        assert_eq!(completion.text, "ab");
        assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
        assert_eq!(completion.usage.total_tokens, 3);
        assert_eq!(completion.generation_id.as_deref(), Some("gen-1"));
    }

    #[test]
    fn http_errors_split_into_rejected_and_retryable() {
        let body = r#"{"error":{"code":402,"message":"Insufficient credits"}}"#;
        let error = http_error(402, body, None);
        assert!(matches!(error, ModelError::Rejected { status: 402, .. }));
        assert!(error.to_string().contains("Insufficient credits"));
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(http_error(status, "", None).is_retryable(), "{status}");
        }
        for status in [400, 401, 402, 403, 404] {
            assert!(!http_error(status, "", None).is_retryable(), "{status}");
        }
        assert!(http_error(503, "", None).to_string().contains("Service Unavailable"));
    }

    #[test]
    fn errors_lose_an_echoed_key_and_long_messages_are_cut() {
        let body = format!(
            r#"{{"error":{{"code":401,"message":"bad key sk-or-ECHO {}"}}}}"#,
            "x".repeat(5000)
        );
        let error = http_error(401, &body, None).redact("sk-or-ECHO");
        let text = error.to_string();
        assert!(!text.contains("sk-or-ECHO") && text.contains("[redacted]"), "{text}");
        assert!(text.len() < MAX_MESSAGE_CHARS + 100, "{} bytes", text.len());
    }

    #[test]
    fn waits_have_their_own_budget() {
        let mut budget = WaitBudget::new(Duration::from_secs(3));
        assert_eq!(
            budget.spend(Duration::from_secs(1), "a").unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            budget.spend(Duration::from_secs(2), "b").unwrap(),
            Duration::from_secs(3)
        );
        assert!(matches!(
            budget.spend(Duration::from_millis(1), "c"),
            Err(ModelError::WaitedTooLong { .. })
        ));
    }

    #[test]
    fn urls_in_errors_lose_query_and_credentials() {
        let url = reqwest::Url::parse("https://user:pw@example.com/api/v1/x?key=sk-secret#f").unwrap();
        assert_eq!(redact_url(&url), "https://example.com/api/v1/x");
    }

    #[test]
    fn headers_carry_the_key_only_when_set_and_config_debug_hides_it() {
        let anonymous = ModelClientConfig::default();
        assert!(request_headers(&anonymous).unwrap().get(AUTHORIZATION).is_none());
        let config = ModelClientConfig {
            api_key: Some("sk-or-TESTSECRET".into()),
            app_title: Some("Nexus".into()),
            ..ModelClientConfig::default()
        };
        let headers = request_headers(&config).unwrap();
        assert!(headers[AUTHORIZATION].is_sensitive());
        assert_eq!(headers["x-title"], "Nexus");
        assert!(!format!("{config:?}").contains("TESTSECRET"));
    }

    #[test]
    fn endpoint_appends_the_chat_path_once() {
        let expected = "http://127.0.0.1:1/api/v1/chat/completions";
        assert_eq!(endpoint("http://127.0.0.1:1/").unwrap(), expected);
        assert!(matches!(endpoint("not a url"), Err(ModelError::Config(_))));
    }

    #[test]
    fn request_body_always_streams_and_omits_unset_options() {
        let request = ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage::new("user", "hi")],
            ..ChatRequest::default()
        };
        let body: Value = serde_json::from_slice(&encode_request(&request).unwrap()).unwrap();
        assert_eq!(body["stream"], true);
        assert!(body.get("temperature").is_none());
        assert_eq!(body["messages"][0]["content"], "hi");
    }
}
