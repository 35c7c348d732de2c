//! [`ModelError`]: why a call or a try failed, and whether another try can help.
//!
//! Also what turns a provider's answer into an error (HTTP status, error body) and what keeps
//! secrets out of error text: provider messages are cut to a bounded length, an API key a
//! provider echoes back is replaced, and URLs lose credentials, query and fragment. Everything
//! that builds error text lives here so that scrubbing cannot be forgotten in one place.

use std::fmt;
use std::time::Duration;

use super::wire::ErrorBody;

/// Code assumed when an error chunk carries none we can read: OpenRouter's "model down".
pub(super) const UNKNOWN_ERROR_CODE: u16 = 502;
/// Longest excerpt of a body or chunk quoted in an error.
const EXCERPT_CHARS: usize = 120;
/// Longest provider message carried into reasons, events and logs.
const MAX_MESSAGE_CHARS: usize = 500;
/// What replaces a secret in error text.
const REDACTED: &str = "[redacted]";

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
    /// Whether another model might succeed where this one failed: its
    /// tries ran out, it does not exist (404), or the provider kept it
    /// waiting past the budget. A bad request, key or balance would fail on
    /// any model.
    pub fn warrants_fallback(&self) -> bool {
        matches!(
            self,
            ModelError::Exhausted { .. } | ModelError::WaitedTooLong { .. } | ModelError::Rejected { status: 404, .. }
        )
    }

    /// How many tries the failed call made.
    pub fn tries_made(&self) -> u32 {
        match self {
            ModelError::Exhausted { tries, .. } => *tries,
            _ => 1,
        }
    }

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
        let clean = |text: String| redact_secret(text, secret);
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

    /// The wait the provider asked for with this error, if it asked.
    pub(super) fn retry_after(&self) -> Option<Duration> {
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

/// A non-2xx response as an error, with the provider's own message when it sent one.
pub(super) fn http_error(status: u16, body: &str, retry_after: Option<Duration>) -> ModelError {
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
pub(super) fn bounded_message(text: &str) -> String {
    cut_to(text, MAX_MESSAGE_CHARS)
}

/// The start of a body or chunk, cut to [`EXCERPT_CHARS`], for quoting in an error.
pub(super) fn excerpt(text: &str) -> String {
    cut_to(text, EXCERPT_CHARS)
}

/// The first `max_chars` characters of `text`, with `…` when something was cut.
fn cut_to(text: &str, max_chars: usize) -> String {
    let mut cut: String = text.chars().take(max_chars).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// `text` with every occurrence of `secret` replaced; `secret` must not be empty.
pub(super) fn redact_secret(text: String, secret: &str) -> String {
    text.replace(secret, REDACTED)
}

/// reqwest's message plus its causes (the useful part, e.g. "connection refused"), with the
/// URL reduced to scheme, host and path so no query string can leak.
pub(super) fn describe_reqwest_error(error: reqwest::Error) -> String {
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

/// A URL as text with any credentials, query and fragment removed; text that
/// is no URL is replaced whole, since it may be anything.
pub fn redact_url_text(text: &str) -> String {
    reqwest::Url::parse(text).map_or_else(|_| "<not a URL>".to_string(), |url| redact_url(&url))
}

fn redact_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn urls_in_errors_lose_query_and_credentials() {
        let url = reqwest::Url::parse("https://user:pw@example.com/api/v1/x?key=sk-secret#f").unwrap();
        assert_eq!(redact_url(&url), "https://example.com/api/v1/x");
        assert_eq!(redact_url_text("not a url ?key=sk-secret"), "<not a URL>");
    }
}
