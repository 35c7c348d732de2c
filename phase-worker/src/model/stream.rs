//! Reading a streamed reply: the body as server-sent events under the idle and first-token
//! clocks, each `data:` payload as a chunk (content delta, reasoning, finish reason, usage) or
//! a mid-stream error, and the answer accumulated until the stream says it is complete.
//!
//! The body is decoded as server-sent events ([`super::sse`]), never as lines: events may
//! arrive split across reads (even inside a UTF-8 character), with CRLF line ends, as several
//! `data:` lines, and with `:` comments between them. Reasoning deltas (`delta.reasoning`) are not part of the
//! answer, but they are the model's first tokens: they stop the first-token clock. Their count
//! comes with the usage chunk.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::call::{Completion, EventSender, ModelEvent, Usage};
use super::client::ModelClient;
use super::error::{ModelError, UNKNOWN_ERROR_CODE, bounded_message, excerpt};
use super::sse::{SseDecoder, SseEvents};
use super::wire::{WireChunk, WireDelta};

const DONE_MARKER: &str = "[DONE]";

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

/// Reads what follows `[DONE]` or a failed chunk (normally just the body's end), for a moment
/// at most, so the connection goes back to the pool instead of being closed mid-body.
async fn drain<S: Stream + Unpin>(mut body: S) {
    const PATIENCE: Duration = Duration::from_secs(1);
    let _ = tokio::time::timeout(PATIENCE, async { while body.next().await.is_some() {} }).await;
}

/// What one SSE `data:` payload says.
#[derive(Debug, PartialEq)]
enum Data<'a> {
    Done,
    Chunk(Chunk<'a>),
}

/// One chunk's news; its text borrows from the payload.
#[derive(Debug, Default, PartialEq)]
struct Chunk<'a> {
    content: Option<Cow<'a, str>>,
    /// The model that answered, as the chunk names it.
    model: Option<Cow<'a, str>>,
    /// The chunk carried reasoning: the model is thinking, not silent.
    reasoning: bool,
    /// Its reasoning as text, when it came as text (structured or
    /// encrypted reasoning has none to show).
    reasoning_text: Option<Cow<'a, str>>,
    finish_reason: Option<Cow<'a, str>>,
    usage: Option<Usage>,
}

/// Parses one `data:` payload. An `error` object is a failed try even though the HTTP status
/// was 200: OpenRouter reports failures after the stream started this way.
fn parse_data(data: &str) -> Result<Data<'_>, ModelError> {
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
    let choice = wire.choices.0;
    let (delta, finish_reason) = choice.map_or((None, None), |c| (c.delta, c.finish_reason));
    let reasoning = delta.as_ref().is_some_and(WireDelta::has_reasoning);
    let (content, reasoning_text) = delta.map_or((None, None), |d| (d.content, d.reasoning));
    Ok(Data::Chunk(Chunk {
        model: wire.model.filter(|model| !model.is_empty()),
        reasoning,
        reasoning_text: reasoning_text.filter(|text| !text.is_empty()),
        content: content.filter(|text| !text.is_empty()),
        finish_reason,
        usage: wire.usage.map(Usage::from),
    }))
}

/// The answer as it accumulates during one try.
#[derive(Debug, Default)]
pub(super) struct Reply {
    text: String,
    /// The model that answered, from the first chunk that names one.
    model: Option<String>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    /// A first token, content or reasoning, has arrived: the first-token clock has stopped.
    started: bool,
    done: bool,
}

impl Reply {
    /// Folds a chunk in and returns its new answer text, if any; reasoning is not answer text.
    fn apply<'a>(&mut self, chunk: Chunk<'a>) -> Option<Cow<'a, str>> {
        self.started |= chunk.reasoning;
        if self.model.is_none() {
            self.model = chunk.model.map(Cow::into_owned);
        }
        if let Some(finish_reason) = chunk.finish_reason {
            self.finish_reason = Some(finish_reason.into_owned());
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
    pub(super) fn finish(self, generation_id: Option<String>) -> Result<Completion, ModelError> {
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
            model: self.model,
        })
    }
}

/// The text of the chunks that arrived in one read of the body, forwarded as
/// one event of each kind: a fast model's whole answer is often a single
/// read of many chunks, and one event per chunk cost a channel hop and a
/// wake-up of the progress task each.
#[derive(Default)]
struct ReadText {
    reasoning: String,
    text: String,
}

impl ReadText {
    /// Sends what was gathered (reasoning first, as it came first) and
    /// empties it.
    async fn forward(&mut self, try_number: u32, events: &EventSender) {
        if !self.reasoning.is_empty() {
            let text = std::mem::take(&mut self.reasoning);
            let _receiver_gone = events.send_async(ModelEvent::Reasoning { try_number, text }).await;
        }
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            let _receiver_gone = events.send_async(ModelEvent::Delta { try_number, text }).await;
        }
    }
}

/// Whether a `finish_reason` says the answer was cut short.
pub(super) fn is_truncation(finish_reason: &str) -> bool {
    matches!(finish_reason, "length" | "content_filter")
}

/// What one read of the body came to.
enum Absorbed {
    /// More is to come.
    More,
    /// `[DONE]`: the reply is complete.
    Done,
    /// A payload that is not a chunk: the try has failed.
    Failed(ModelError),
    /// Bytes that are not UTF-8: nothing more of this body is read.
    Unreadable(ModelError),
}

/// A reply being read: the decoder, the answer so far, the text not yet forwarded.
#[derive(Default)]
struct ReplyReader {
    decoder: SseDecoder,
    payloads: SseEvents,
    reply: Reply,
    read: ReadText,
}

impl ReplyReader {
    /// Folds one read's bytes in, synchronously: the payloads, chunks and errors it parses
    /// stay out of the call's future, which is held for as long as the model takes.
    fn absorb(&mut self, client: &ModelClient, bytes: &[u8]) -> Absorbed {
        if self.decoder.push(bytes, &mut self.payloads).is_err() {
            return Absorbed::Unreadable(ModelError::Malformed("stream is not UTF-8".into()));
        }
        for payload in self.payloads.iter() {
            match parse_data(payload) {
                Ok(Data::Chunk(mut chunk)) => {
                    if let Some(text) = chunk.reasoning_text.take() {
                        self.read.reasoning.push_str(&text);
                    }
                    if let Some(text) = self.reply.apply(chunk) {
                        self.read.text.push_str(&text);
                    }
                }
                Ok(Data::Done) => {
                    self.reply.done = true;
                    return Absorbed::Done;
                }
                Err(_) => return Absorbed::Failed(client.scrubbed_parse_error(payload)),
            }
        }
        self.payloads.clear();
        Absorbed::More
    }
}

impl ModelClient {
    /// Reads the SSE body, forwarding each delta as it arrives. The response is taken apart
    /// before the returned future starts, so the future holds only the body.
    pub(super) fn read_reply<'a>(
        &'a self,
        response: reqwest::Response,
        try_number: u32,
        first_token_due: Instant,
        events: &'a EventSender,
    ) -> impl Future<Output = Result<Reply, ModelError>> + Send + 'a {
        let mut body = Box::pin(idle_guarded(response.bytes_stream(), self.config.idle_timeout));
        async move {
            let mut reader = ReplyReader::default();
            while let Some(bytes) = self
                .next_bytes(&mut body, reader.reply.started, first_token_due)
                .await?
            {
                let absorbed = reader.absorb(self, &bytes);
                drop(bytes);
                reader.read.forward(try_number, events).await;
                match absorbed {
                    Absorbed::More => continue,
                    // What follows (normally just the body's end) is read so the connection
                    // can be reused.
                    Absorbed::Done => {
                        drain(body).await;
                        return Ok(reader.reply);
                    }
                    Absorbed::Failed(error) => {
                        drain(body).await;
                        return Err(error);
                    }
                    Absorbed::Unreadable(error) => return Err(error),
                }
            }
            Ok(reader.reply)
        }
    }

    /// Why a payload does not parse, quoting the provider's text scrubbed of the key.
    fn scrubbed_parse_error(&self, payload: &str) -> ModelError {
        match parse_data(&self.redact_text(payload.to_owned())) {
            Err(error) => error,
            Ok(_) => ModelError::Malformed("chunk is not valid JSON".into()),
        }
    }

    /// The body's next bytes; until the first token (content or reasoning) arrives, also
    /// bounded by its deadline.
    async fn next_bytes<S>(
        &self,
        body: &mut S,
        started: bool,
        first_token_due: Instant,
    ) -> Result<Option<Bytes>, ModelError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        let next = if started {
            body.next().await
        } else {
            tokio::time::timeout_at(first_token_due, body.next())
                .await
                .map_err(|_| self.first_token_timeout())?
        };
        next.transpose().map_err(|error| match error {
            BodyError::Idle => ModelError::Stalled(self.config.idle_timeout),
            BodyError::Transport(e) => self.transport_error(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &str) -> Chunk<'_> {
        match parse_data(data).expect("chunk parses") {
            Data::Chunk(chunk) => chunk,
            Data::Done => panic!("expected a chunk, got [DONE]"),
        }
    }

    #[test]
    fn only_the_first_choice_counts_and_an_empty_list_is_none() {
        let two = chunk(r#"{"choices":[{"delta":{"content":"first"}},{"delta":{"content":"second"}}]}"#);
        assert_eq!(two.content.as_deref(), Some("first"));
        let usage_only = chunk(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
        assert_eq!((usage_only.content, usage_only.finish_reason), (None, None));
        assert!(usage_only.usage.is_some());
        assert!(
            parse_data(r#"{"choices":{"delta":{}}}"#).is_err(),
            "choices must be a list"
        );
    }

    #[test]
    fn a_chunks_text_borrows_from_the_payload_unless_it_has_escapes() {
        let plain = chunk(
            r#"{"model":"m/x","choices":[{"delta":{"content":"Hi there","reasoning":"hm"},"finish_reason":"stop"}]}"#,
        );
        for text in [
            &plain.content,
            &plain.model,
            &plain.finish_reason,
            &plain.reasoning_text,
        ] {
            assert!(matches!(text, Some(Cow::Borrowed(_))), "{text:?} was copied");
        }
        let escaped = chunk(r#"{"choices":[{"delta":{"content":"line\nnext \u00e9"}}]}"#);
        assert_eq!(escaped.content.as_deref(), Some("line\nnext \u{e9}"));
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
        let no_items = chunk(r#"{"choices":[{"delta":{"content":"Hi","reasoning_details":[]}}]}"#);
        assert!(!no_items.reasoning);
        let an_object = chunk(r#"{"choices":[{"delta":{"content":"","reasoning_details":{"type":"x"}}}]}"#);
        assert!(an_object.reasoning);

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
}
