//! [`ModelClientConfig`]: where the model lives and how patient to be with it.
//!
//! Plain data with defaults for OpenRouter; the worker fills it from its flags. It holds the API
//! key, so its `Debug` is written by hand to never print it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use super::error::redact_url_text;

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
    /// Tokens a try's answer is assumed to take under a tokens-per-minute
    /// limit when the request sets no `max_tokens`.
    pub answer_token_allowance: u64,
    /// HTTP clients (each with its own connection to the server) the calls
    /// are spread over, so no HTTP/2 connection carries more streams than
    /// its server allows.
    pub connections: usize,
    /// Calls one connection carries before the next client's is used.
    pub streams_per_connection: usize,
    /// A PEM file of root certificates to trust besides the system's: a
    /// private gateway's CA, or the stand-in model's certificate (`--tls`).
    pub ca_file: Option<PathBuf>,
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
            .field("answer_token_allowance", &self.answer_token_allowance)
            .field("connections", &self.connections)
            .field("streams_per_connection", &self.streams_per_connection)
            .finish()
    }
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
            answer_token_allowance: 1000,
            connections: 1,
            streams_per_connection: super::lanes::DEFAULT_STREAMS_PER_CONNECTION,
            ca_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_key_and_the_url_credentials() {
        let config = ModelClientConfig {
            base_url: "https://user:pw@example.com/?key=sk-in-url".into(),
            api_key: Some("sk-or-TESTSECRET".into()),
            ..ModelClientConfig::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("TESTSECRET"), "{printed}");
        assert!(!printed.contains("sk-in-url") && !printed.contains("pw@"), "{printed}");
        assert!(printed.contains("<set>"), "{printed}");
    }
}
