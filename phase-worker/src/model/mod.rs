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
//! # Why the layer is split this way
//!
//! Each file answers one question, so a change to one concern (a provider's new chunk field, a
//! different back-off rule, one more secret to scrub) touches one file, and its tests sit next
//! to it:
//!
//! - `call`: what a caller hands in and gets back ([`ChatRequest`], [`Completion`],
//!   [`ModelEvent`]), free of HTTP.
//! - `config`: [`ModelClientConfig`], where the model lives and how patient to be.
//! - `client`: [`ModelClient`] and the try loop: when to try, wait, retry or give up.
//! - `http`: building the HTTP client, sending a try, a non-2xx status as an error.
//! - `lanes`: the HTTP clients calls are spread over, filled in order.
//! - `stream`: reading the SSE reply: deltas, reasoning, usage chunk, mid-stream errors.
//! - `sse`: server-sent events decoded from the body's bytes.
//! - `wire`: the serde types of the OpenAI-style wire format, lenient where providers differ.
//! - `retry`: back-off, `Retry-After` (seconds or HTTP-date) and the wait budget, as pure
//!   arithmetic.
//! - `error`: [`ModelError`], which failures are worth another try, and scrubbing of keys,
//!   URLs and overlong provider messages out of error text.
//! - `cache`: the response cache: identical requests answered from Redis.
//! - `budget`: model prices and a run's cost cap, checked before each call.
//! - `fallback`: the next model when one keeps failing.
//! - `pacer`: the [`Pacer`] hook through which tries are paced; its Redis implementation is
//!   [`crate::pacing`], outside this layer, so the client itself never touches Redis.
//!
//! Of the client's own files, only the items re-exported below are public; callers need not
//! know which file holds what.

pub mod budget;
pub mod cache;
mod call;
mod client;
mod config;
mod error;
mod fallback;
mod http;
mod lanes;
mod pacer;
mod retry;
mod sse;
mod stream;
mod wire;

pub use call::{
    ChatMessage, ChatRequest, Completion, EventReceiver, EventSender, FallbackNotice, ModelEvent, OutputValidator,
    RetryNotice, Usage, WaitNotice, event_channel,
};
pub use client::ModelClient;
pub use config::ModelClientConfig;
pub use error::{ModelError, TimeoutKind, redact_url_text};
pub use http::install_crypto_provider;
pub use lanes::DEFAULT_STREAMS_PER_CONNECTION;
pub use pacer::{Pacer, PacerFuture};
