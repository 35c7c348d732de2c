//! The OpenAI-style chat completions wire format as OpenRouter speaks it: the request body,
//! the error body, and the streamed chunks with their deltas and usage.
//!
//! Kept apart from the public types in `call` so that a provider's quirks (fields omitted,
//! `null`, codes sent as strings) are absorbed here, by lenient serde types, and never reach
//! callers.

use std::borrow::Cow;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::call::{ChatMessage, ChatRequest, Usage};
use super::error::ModelError;

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
    /// OpenRouter's unified reasoning parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<WireReasoning<'a>>,
}

#[derive(Serialize)]
struct WireReasoning<'a> {
    effort: &'a str,
}

/// The JSON body sent for `request`.
pub(super) fn encode_request(request: &ChatRequest) -> Result<Vec<u8>, ModelError> {
    let wire = WireRequest {
        model: &request.model,
        messages: &request.messages,
        stream: true,
        temperature: request.temperature,
        max_tokens: request.max_tokens,
        response_format: request.response_format.as_ref(),
        reasoning: request
            .reasoning_effort
            .as_deref()
            .map(|effort| WireReasoning { effort }),
    };
    let mut body = Vec::with_capacity(encoded_size_estimate(request));
    serde_json::to_writer(&mut body, &wire).map_err(|e| ModelError::Request(e.to_string()))?;
    Ok(body)
}

/// About the encoded size of `request`: its text, room for the JSON around it and for escapes
/// (one byte in eight), and a schema's room when it asks for one. The body is kept for the
/// whole call (a retry sends it again), so it gets one allocation near its size, not the
/// doubling from 128 bytes that `to_vec` does, which copies the body at every step and leaves
/// it in a buffer up to twice its size. An estimate that falls short only means one regrowth.
fn encoded_size_estimate(request: &ChatRequest) -> usize {
    const JSON_AROUND: usize = 160;
    /// The built-in rating schema is 345 bytes of JSON.
    const SCHEMA_ROOM: usize = 400;
    let text: usize = request
        .messages
        .iter()
        .map(|m| m.role.len() + m.content.len() + 32)
        .sum();
    let schema = if request.response_format.is_some() {
        SCHEMA_ROOM
    } else {
        0
    };
    let reasoning = request.reasoning_effort.as_ref().map_or(0, |effort| effort.len() + 32);
    request.model.len() + text + text / 8 + JSON_AROUND + schema + reasoning
}

/// The body of a non-2xx response, when the provider sent one in its usual shape.
#[derive(Deserialize)]
pub(super) struct ErrorBody {
    pub(super) error: WireError,
}

/// A provider's error, in an error body or in a chunk of a stream that already started.
#[derive(Deserialize)]
pub(super) struct WireError {
    #[serde(default)]
    code: Value,
    #[serde(default)]
    pub(super) message: String,
}

impl WireError {
    /// The code as a number, whether sent as one or as a string.
    pub(super) fn code(&self) -> Option<u16> {
        let code = match &self.code {
            Value::String(text) => text.parse().ok(),
            other => other.as_u64(),
        };
        code.and_then(|c| u16::try_from(c).ok())
    }
}

/// One streamed `data:` payload other than `[DONE]`. Its strings borrow from the payload
/// where they can (no escapes in them): a reply is one chunk per few words, and a `String`
/// per field per chunk was a good part of the worker's allocations. Each such field goes
/// through [`borrowed_text`]: serde borrows a `Cow<str>` field, but not one inside an
/// `Option`, which it always copies.
#[derive(Deserialize)]
pub(super) struct WireChunk<'a> {
    /// The model that answered (OpenRouter may route to another than asked).
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub(super) model: Option<Cow<'a, str>>,
    /// Only the first choice: a stream asks for one (`n` is never sent).
    #[serde(default, borrow)]
    pub(super) choices: FirstChoice<'a>,
    #[serde(default)]
    pub(super) usage: Option<WireUsage>,
    #[serde(default)]
    pub(super) error: Option<WireError>,
}

#[derive(Deserialize)]
pub(super) struct WireChoice<'a> {
    #[serde(default, borrow)]
    pub(super) delta: Option<WireDelta<'a>>,
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub(super) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(super) struct WireDelta<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub(super) content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub(super) reasoning: Option<Cow<'a, str>>,
    /// Structured reasoning; only whether there is any matters here.
    #[serde(default)]
    reasoning_details: AnyDetails,
}

/// An optional string that borrows from the payload when it has no escapes (a `Cow` in a
/// newtype is borrowed by serde's derive; in an `Option` it is not).
fn borrowed_text<'de: 'a, 'a, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text>::deserialize(deserializer)?.map(|text| text.0))
}

/// The first element of `choices`, the rest skipped: read in place rather than into a `Vec`,
/// which cost an allocation and a free for every chunk of every answer.
#[derive(Default)]
pub(super) struct FirstChoice<'a>(pub(super) Option<WireChoice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(FirstChoiceVisitor(std::marker::PhantomData))
    }
}

struct FirstChoiceVisitor<'a>(std::marker::PhantomData<WireChoice<'a>>);

impl<'de: 'a, 'a> Visitor<'de> for FirstChoiceVisitor<'a> {
    type Value = FirstChoice<'a>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a list of choices")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<FirstChoice<'a>, A::Error> {
        let first = items.next_element::<WireChoice<'a>>()?;
        while items.next_element::<IgnoredAny>()?.is_some() {}
        Ok(FirstChoice(first))
    }
}

impl WireDelta<'_> {
    /// Whether the delta carries any reasoning, as text or as structured details.
    pub(super) fn has_reasoning(&self) -> bool {
        let text = self.reasoning.as_deref().is_some_and(|text| !text.is_empty());
        text || self.reasoning_details.0
    }
}

/// Whether a value holds anything: a non-empty array, or any value but `null`. Its content is
/// skipped, not built: a thinking model sends details with every reasoning delta, and a
/// `Value` of maps for each was a good part of parsing them.
#[derive(Default)]
struct AnyDetails(bool);

impl<'de> Deserialize<'de> for AnyDetails {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AnyDetailsVisitor)
    }
}

struct AnyDetailsVisitor;

impl<'de> Visitor<'de> for AnyDetailsVisitor {
    type Value = AnyDetails;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<AnyDetails, A::Error> {
        let mut any = false;
        while items.next_element::<IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(AnyDetails(any))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyDetails, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(AnyDetails(true))
    }

    fn visit_unit<E: de::Error>(self) -> Result<AnyDetails, E> {
        Ok(AnyDetails(false))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyDetails, E> {
        Ok(AnyDetails(true))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<AnyDetails, E> {
        Ok(AnyDetails(true))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<AnyDetails, E> {
        Ok(AnyDetails(true))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<AnyDetails, E> {
        Ok(AnyDetails(true))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<AnyDetails, E> {
        Ok(AnyDetails(true))
    }
}

/// Lenient on purpose: providers omit or null fields they do not track.
#[derive(Deserialize)]
pub(super) struct WireUsage {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_request_body_is_written_into_one_allocation() {
        let plan = "An online shop for furniture, with payments.\n\t\"Quoted\" and plain text. ".repeat(40);
        let analysis = ChatRequest {
            model: "anthropic/claude-sonnet-4.5".into(),
            messages: vec![
                ChatMessage::new("system", "You are a senior solution architect."),
                ChatMessage::new(
                    "user",
                    format!("Analyse the following project plan.\n\nPROJECT PLAN:\n{plan}"),
                ),
            ],
            temperature: Some(0.2),
            max_tokens: Some(4000),
            ..ChatRequest::default()
        };
        let rating = ChatRequest {
            model: "google/gemini-3-pro-preview".into(),
            messages: vec![ChatMessage::new("user", "Rate this plan: a shop.")],
            response_format: Some(crate::rating::response_format()),
            reasoning_effort: Some("medium".into()),
            ..ChatRequest::default()
        };
        for request in [analysis, rating] {
            let body = encode_request(&request).unwrap();
            let estimate = encoded_size_estimate(&request);
            assert!(body.len() <= estimate, "{} bytes, estimated {estimate}", body.len());
            assert!(
                body.capacity() <= estimate,
                "no regrowth: {} > {estimate}",
                body.capacity()
            );
            assert!(
                estimate < body.len() * 3 / 2,
                "not much larger: {} bytes, estimated {estimate}",
                body.len()
            );
        }
    }
}
