//! The JSON OpenRouter puts on the wire: completion chunks, the final usage chunk, whole
//! completions and error bodies. Kept in one place so the shapes match the real API docs.

use serde::Serialize;
use serde_json::{Value, json};

/// Identity shared by every chunk of one generation.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub id: String,
    pub model: String,
    pub created: u64,
}

/// One content delta, typed rather than a `json!` value: it is the chunk sent most often, and
/// serializing a struct costs a fraction of building and printing a map.
#[derive(Serialize)]
pub(crate) struct ContentChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    provider: &'static str,
    choices: [ContentChoice<'a>; 1],
}

#[derive(Serialize)]
struct ContentChoice<'a> {
    index: u32,
    delta: ContentDelta<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct ContentDelta<'a> {
    role: &'static str,
    content: &'a str,
}

pub(crate) fn content_chunk<'a>(meta: &'a Meta, text: &'a str, finish_reason: Option<&'a str>) -> ContentChunk<'a> {
    ContentChunk {
        id: &meta.id,
        object: "chat.completion.chunk",
        created: meta.created,
        model: &meta.model,
        provider: "Stand-in",
        choices: [ContentChoice {
            index: 0,
            delta: ContentDelta {
                role: "assistant",
                content: text,
            },
            finish_reason,
        }],
    }
}

/// A thinking model's thoughts: `delta.reasoning` (and its structured twin
/// `delta.reasoning_details`) with no content, as OpenRouter streams them before the answer.
pub(crate) fn reasoning_chunk(meta: &Meta, text: &str) -> Value {
    let details = json!([{"type": "reasoning.text", "text": text, "format": "unknown", "index": 0}]);
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
        "model": meta.model, "provider": "Stand-in",
        "choices": [{"index": 0,
                     "delta": {"role": "assistant", "content": null, "reasoning": text,
                               "reasoning_details": details},
                     "finish_reason": null}],
    })
}

/// The last chunk before `[DONE]`: no choices, only usage.
pub(crate) fn usage_chunk(meta: &Meta, usage: &Value) -> Value {
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
        "model": meta.model, "provider": "Stand-in", "choices": [], "usage": usage,
    })
}

/// How OpenRouter reports a failure after the 200 status has gone out.
pub(crate) fn error_chunk(meta: &Meta, code: u16, message: &str) -> Value {
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
        "model": meta.model, "error": {"code": code, "message": message},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    })
}

/// A whole answer; `reasoning` goes in `message.reasoning`, as OpenRouter puts it.
pub(crate) fn completion(meta: &Meta, text: &str, reasoning: &str, finish_reason: &str, usage: &Value) -> Value {
    let mut message = json!({"role": "assistant", "content": text});
    if !reasoning.is_empty() {
        message["reasoning"] = json!(reasoning);
    }
    json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created,
        "model": meta.model, "provider": "Stand-in",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
    })
}

/// OpenRouter's error body; `metadata` marks errors that a scripted fault produced.
pub(crate) fn error_body(status: u16, message: &str, scripted: bool) -> Value {
    let mut error = json!({"code": status, "message": message});
    if scripted {
        error["metadata"] = json!({"stand_in": true});
    }
    json!({ "error": error })
}

/// Usage with cost from a small built-in price table, so cost accounting can be tested.
/// Reasoning tokens are output tokens: they are part of `completion_tokens` and billed.
pub(crate) fn usage(model: &str, prompt_tokens: u64, completion_tokens: u64, reasoning_tokens: u64) -> Value {
    let (input, output) = usd_per_million_tokens(model);
    let cost = (prompt_tokens as f64 * input + completion_tokens as f64 * output) / 1e6;
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cost": cost,
        "cost_details": {"upstream_inference_cost": cost},
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    })
}

fn usd_per_million_tokens(model: &str) -> (f64, f64) {
    if model.starts_with("anthropic/") {
        (3.0, 15.0)
    } else if model.starts_with("google/") {
        (2.0, 12.0)
    } else {
        (1.0, 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_the_price_table() {
        let usage = usage("anthropic/claude", 1_000_000, 1_000_000, 0);
        assert_eq!(usage["cost"].as_f64(), Some(18.0));
        assert_eq!(usage["total_tokens"].as_u64(), Some(2_000_000));
    }
}
