//! What one model call takes and gives back: the request, the finished answer with its usage,
//! the progress events sent while it runs, and the hook that checks the answer's text.
//!
//! These are the types callers handle; they say nothing about HTTP or the wire format, so the
//! worker can use them without knowing how the answer travels.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system" or "user": a literal, not an allocation per message.
    pub role: Cow<'static, str>,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<Cow<'static, str>>, content: impl Into<String>) -> Self {
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
    /// Ask the model to reason first with this effort ("low", "medium",
    /// "high"); `None` leaves it to the model.
    pub reasoning_effort: Option<String>,
}

impl ChatRequest {
    /// The tokens a try may use, for a tokens-per-minute limit: the prompt
    /// at about four characters a token, plus the answer's `max_tokens` or,
    /// without one, `answer_allowance`.
    pub fn estimated_tokens(&self, answer_allowance: u64) -> u64 {
        let chars: usize = self.messages.iter().map(|m| m.content.chars().count()).sum();
        let prompt = (chars as u64).div_ceil(4);
        prompt + self.max_tokens.map_or(answer_allowance, u64::from)
    }
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
    /// Tries it took, counting the successful one (and those of models it
    /// fell back from).
    pub tries: u32,
    /// The model that answered, as the provider named it (`None`: it did
    /// not say).
    pub model: Option<String>,
}

/// Progress reported while a call runs. Deltas of a failed try have already been sent when
/// its `Retrying` arrives; `try_number` tells the tries apart.
///
/// The rare notices are boxed so that an event is as small as a delta (32 bytes, not 80):
/// events wait in the call's [`event_channel`], and a call can be held open for minutes.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelEvent {
    Delta {
        try_number: u32,
        text: String,
    },
    /// A thinking model's reasoning text (never part of the answer).
    Reasoning {
        try_number: u32,
        text: String,
    },
    Retrying(Box<RetryNotice>),
    /// The model failed for good and the call moves on to the next model.
    FellBack(Box<FallbackNotice>),
    /// The call waits before its next request (the provider's `Retry-After`
    /// or the shared rate limit); not a failed try.
    Waiting(Box<WaitNotice>),
}

/// A try failed and the call tries again after `delay`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryNotice {
    pub failed_try: u32,
    pub reason: String,
    pub delay: Duration,
}

/// The call moves on from model `from` to `to`; the next model's tries are numbered after
/// this one's `tries`.
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackNotice {
    pub from: String,
    pub to: String,
    pub reason: String,
    pub tries: u32,
}

/// The call waits `wait` before its next request, `waited_total` so far in all.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitNotice {
    pub reason: String,
    pub wait: Duration,
    pub waited_total: Duration,
}

/// Checks the final text of a try (e.g. that structured output parses); an `Err` makes the
/// try fail and be retried.
pub type OutputValidator = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// A completion's usage in the contract's terms.
impl From<&Usage> for nexus_proto::v1::Usage {
    fn from(usage: &Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            cost_usd: usage.cost_usd,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            reasoning_tokens: usage.reasoning_tokens,
        }
    }
}

/// Where a call sends its [`ModelEvent`]s as they happen.
pub type EventSender = flume::Sender<ModelEvent>;
/// Where the caller reads them; the call is over when every sender is gone.
pub type EventReceiver = flume::Receiver<ModelEvent>;

/// A call's progress channel, holding up to `capacity` events before the call waits for its
/// reader. A flume channel, not tokio's mpsc: tokio's allocates a cache-padded header and a
/// first block of 32 slots when it opens, 1.5 KB per call, held for as long as a call stays
/// open (a slow model: minutes), where this one takes about 150 bytes (300 while its reader
/// waits) and grows its queue only when events wait in it. Its `recv_async` is cancel-safe
/// the way the progress forwarder's `select!` needs: a message sent while the receive is
/// dropped stays queued for the next one.
pub fn event_channel(capacity: usize) -> (EventSender, EventReceiver) {
    flume::bounded(capacity)
}
