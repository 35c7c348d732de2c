//! What one chat request will produce, decided up front from the request, the config and the
//! fault it drew: the deltas, the usage, the timing. The HTTP layers then only play it out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::config::StandInConfig;
use crate::faults::Fault;
use crate::reply;
use crate::state::RequestRecord;
use crate::wire::{self, Meta};

const EXCERPT_CHARS: usize = 160;
/// Gap between reasoning deltas: a thinking model's thoughts trickle in.
pub(crate) const REASONING_INTERVAL: Duration = Duration::from_millis(50);

/// The parts of an OpenAI-style request body the stand-in reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    pub model: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    response_format: Option<Value>,
    /// OpenRouter's `reasoning` parameter (`{"effort": "medium"}`).
    #[serde(default)]
    reasoning: Option<Value>,
}

/// Reasoning deltas a request that asks for reasoning gets when the stand-in
/// was not told to reason for a while (`--reasoning-ms`): a few, unpaced.
const ASKED_REASONING_DELTAS: usize = 2;

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: MessageText,
}

impl Message {
    fn text(&self) -> &str {
        &self.content.0
    }
}

/// A message's text: a string, or the text parts of OpenAI's array of
/// `{"type": "text", "text": ...}` parts joined with spaces; empty for anything else. Read
/// straight from the body, without a `Value` per message (the prompts are most of the bytes).
#[derive(Debug, Default)]
struct MessageText(String);

impl<'de> Deserialize<'de> for MessageText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MessageTextVisitor)
    }
}

struct MessageTextVisitor;

impl<'de> Visitor<'de> for MessageTextVisitor {
    type Value = MessageText;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a string or an array of content parts")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageText, E> {
        Ok(MessageText(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<MessageText, E> {
        Ok(MessageText(text))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut parts: A) -> Result<MessageText, A::Error> {
        let mut texts = Vec::new();
        while let Some(part) = parts.next_element::<Value>()? {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                texts.push(text.to_owned());
            }
        }
        Ok(MessageText(texts.join(" ")))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessageText, A::Error> {
        while map.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
        Ok(MessageText::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<MessageText, E> {
        Ok(MessageText::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<MessageText, E> {
        Ok(MessageText::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<MessageText, E> {
        Ok(MessageText::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<MessageText, E> {
        Ok(MessageText::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<MessageText, E> {
        Ok(MessageText::default())
    }
}

impl ChatBody {
    pub(crate) fn structured(&self) -> bool {
        let kind = self.response_format.as_ref().and_then(|f| f.get("type"));
        matches!(kind.and_then(Value::as_str), Some("json_schema" | "json_object"))
    }

    /// The last [`EXCERPT_CHARS`] characters of the system messages.
    fn system_tail(&self) -> String {
        let system: String = self
            .messages
            .iter()
            .filter(|m| m.role == "system")
            .map(Message::text)
            .collect::<Vec<_>>()
            .join("\n");
        let start = system
            .char_indices()
            .rev()
            .nth(EXCERPT_CHARS - 1)
            .map_or(0, |(at, _)| at);
        system[start..].to_owned()
    }

    /// Whether the request asks the model to reason first (an effort, a
    /// token budget, or `enabled`), as OpenRouter's `reasoning` allows.
    fn asks_for_reasoning(&self) -> bool {
        let Some(Value::Object(reasoning)) = &self.reasoning else {
            return false;
        };
        let enabled = reasoning.get("enabled").and_then(Value::as_bool);
        enabled.unwrap_or(reasoning.contains_key("effort") || reasoning.contains_key("max_tokens"))
    }

    fn last_user_text(&self) -> &str {
        let last = self.messages.iter().rev().find(|m| m.role == "user");
        last.map_or("", Message::text)
    }

    /// About four characters per token, like the real tokenizers on English.
    fn prompt_tokens(&self) -> u64 {
        let chars: usize = self.messages.iter().map(|m| m.text().chars().count()).sum();
        (chars as u64 / 4).max(1)
    }

    pub(crate) fn record(&self) -> RequestRecord {
        RequestRecord {
            seq: 0,
            model: self.model.clone(),
            stream: self.stream,
            structured: self.structured(),
            prompt_excerpt: head(self.last_user_text(), EXCERPT_CHARS).to_owned(),
            system_tail: self.system_tail(),
            outcome: String::new(),
            received_ms: 0,
            received_us: 0,
            finished_us: 0,
            traceparent: String::new(),
            http_version: String::new(),
            connection: 0,
        }
    }
}

/// The first `chars` characters of `text`.
fn head(text: &str, chars: usize) -> &str {
    let end = text.char_indices().nth(chars).map_or(text.len(), |(at, _)| at);
    &text[..end]
}

/// Everything one generation will send.
#[derive(Debug)]
pub(crate) struct Plan {
    pub meta: Meta,
    /// Reasoning deltas, sent `reasoning_interval` apart before the first content chunk.
    pub reasoning: Vec<String>,
    /// [`REASONING_INTERVAL`] when the stand-in reasons for a configured time; zero for
    /// the few deltas a request that asks for reasoning gets.
    pub reasoning_interval: Duration,
    pub chunks: Vec<String>,
    pub finish_reason: String,
    pub usage: wire::Usage,
    pub first_token_latency: Duration,
    pub token_interval: Option<Duration>,
    pub keepalive_comments: bool,
    pub rough: bool,
    pub fault: Option<Fault>,
}

impl Plan {
    pub(crate) fn new(body: &ChatBody, config: &StandInConfig, seq: u64, fault: Option<Fault>) -> Self {
        let mut chunks = match &fault {
            Some(Fault::Long { bytes, chunk_bytes }) if !body.structured() => reply::pieces(
                &reply::long_text(&body.model, body.last_user_text(), *bytes),
                *chunk_bytes,
            ),
            _ => reply::chunks(&reply_text(body, config, fault.as_ref())),
        };
        let mut finish_reason = "stop".to_string();
        if let Some(max) = body.max_tokens.filter(|max| *max < chunks.len()) {
            chunks.truncate(max.max(1));
            finish_reason = "length".to_string();
        }
        if let Some(Fault::Truncated {
            after_words,
            finish_reason: reason,
        }) = &fault
        {
            chunks.truncate((*after_words).max(1));
            finish_reason = reason.clone();
        }
        let first_token_latency = match fault {
            Some(Fault::Latency { first_token_ms }) => Duration::from_millis(first_token_ms),
            _ => config.first_token_latency,
        };
        let (count, reasoning_interval) = match reasoning_deltas(config.reasoning) {
            0 if body.asks_for_reasoning() => (ASKED_REASONING_DELTAS, Duration::ZERO),
            count => (count, REASONING_INTERVAL),
        };
        let reasoning = reply::reasoning_deltas(&body.model, count);
        let completion_tokens = (chunks.len() + reasoning.len()) as u64;
        Self {
            meta: Meta::new(format!("gen-standin-{seq}"), body.model.clone(), unix_now()),
            usage: wire::usage(
                &body.model,
                body.prompt_tokens(),
                completion_tokens,
                reasoning.len() as u64,
            ),
            reasoning,
            reasoning_interval,
            chunks,
            finish_reason,
            first_token_latency,
            token_interval: config.token_interval(),
            keepalive_comments: config.keepalive_comments,
            rough: config.rough,
            fault,
        }
    }

    pub(crate) fn text(&self) -> String {
        self.chunks.concat()
    }

    pub(crate) fn reasoning_text(&self) -> String {
        self.reasoning.concat()
    }

    /// How long the reasoning takes before the answer starts.
    pub(crate) fn reasoning_time(&self) -> Duration {
        self.reasoning_interval * self.reasoning.len() as u32
    }

    /// What the request log records when the plan plays out to the end.
    pub(crate) fn outcome_label(&self) -> String {
        self.fault.as_ref().map_or_else(|| "ok".into(), Fault::outcome_label)
    }
}

/// Enough deltas, [`REASONING_INTERVAL`] apart, to fill `time`.
fn reasoning_deltas(time: Duration) -> usize {
    time.as_millis().div_ceil(REASONING_INTERVAL.as_millis()) as usize
}

fn reply_text(body: &ChatBody, config: &StandInConfig, fault: Option<&Fault>) -> String {
    let prompt = body.last_user_text();
    match (body.structured(), fault) {
        (true, Some(Fault::BadJsonOutput)) => reply::BAD_JSON_OUTPUT.to_owned(),
        (true, _) => reply::structured_text(&body.model, prompt),
        (false, _) => reply::free_text(&body.model, prompt, config.reply_words),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(messages: Value) -> ChatBody {
        serde_json::from_value(serde_json::json!({"model": "m", "messages": messages})).expect("a request body")
    }

    #[test]
    fn the_record_keeps_the_prompts_head_and_the_system_prompts_tail_in_characters() {
        let long = "é".repeat(EXCERPT_CHARS + 7);
        let record = body(serde_json::json!([
            {"role": "system", "content": format!("start {long}")},
            {"role": "system", "content": "end"},
            {"role": "user", "content": format!("{long} tail")},
        ]))
        .record();
        assert_eq!(record.prompt_excerpt, "é".repeat(EXCERPT_CHARS));
        assert_eq!(record.system_tail, format!("{}\nend", "é".repeat(EXCERPT_CHARS - 4)));
        let short =
            body(serde_json::json!([{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]))
                .record();
        assert_eq!(
            (short.prompt_excerpt.as_str(), short.system_tail.as_str()),
            ("hi", "brief")
        );
    }

    #[test]
    fn message_text_is_the_string_or_the_text_parts_and_empty_for_anything_else() {
        let parts = serde_json::json!([{"type": "text", "text": "first"}, {"type": "image_url"}, {"type": "text", "text": "second"}]);
        let body = body(serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": 42},
            {"role": "user", "content": {"unexpected": true}},
            {"role": "user", "content": null},
            {"role": "user", "content": parts},
        ]));
        let texts: Vec<&str> = body.messages.iter().map(Message::text).collect();
        assert_eq!(texts, ["be brief", "", "", "", "first second"]);
        assert_eq!(body.last_user_text(), "first second");
        assert!(serde_json::from_value::<ChatBody>(serde_json::json!({"model": "m", "messages": "no"})).is_err());
    }
}
