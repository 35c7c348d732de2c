//! The JSON OpenRouter puts on the wire: completion chunks, the final usage chunk, whole
//! completions and error bodies. Kept in one place so the shapes match the real API docs.

use serde::Serialize;
use serde_json::{Value, json};

/// Room for a chunk's fields after the shared ones (`,"choices":[{"index":0,"delta":…}]}` is
/// about 100 bytes), so that building a chunk allocates once.
const CHUNK_TAIL_BYTES: usize = 128;

/// Identity shared by every chunk of one generation.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub id: String,
    pub model: String,
    pub created: u64,
    /// The chunks' shared fields as JSON (`"id":…,"provider":"Stand-in"`), rendered once:
    /// a reply is a chunk per word, and serializing these strings again for each was most of
    /// the stand-in's work, work the engine it benchmarks then had to share two cores with.
    chunk_head: String,
}

impl Meta {
    pub(crate) fn new(id: String, model: String, created: u64) -> Self {
        let mut chunk_head = String::from("\"id\":");
        push_json_str(&mut chunk_head, &id);
        chunk_head.push_str(",\"object\":\"chat.completion.chunk\",\"created\":");
        chunk_head.push_str(&created.to_string());
        chunk_head.push_str(",\"model\":");
        push_json_str(&mut chunk_head, &model);
        chunk_head.push_str(",\"provider\":\"Stand-in\"");
        Self {
            id,
            model,
            created,
            chunk_head,
        }
    }

    /// `{` and the shared fields, with room for the rest of a chunk: `rest` bytes of text
    /// and [`CHUNK_TAIL_BYTES`] of the fields around it.
    fn open_chunk(&self, rest: usize) -> String {
        let mut chunk = String::with_capacity(1 + self.chunk_head.len() + rest + CHUNK_TAIL_BYTES);
        chunk.push('{');
        chunk.push_str(&self.chunk_head);
        chunk
    }
}

/// `text` as a JSON string literal, appended. Text with nothing to escape (a quote, a
/// backslash or a control character; serde_json escapes nothing else) is copied as it is, the
/// usual case for a word of a reply; the rest goes through serde_json.
fn push_json_str(out: &mut String, text: &str) {
    let needs_escape = text.bytes().any(|byte| byte == b'"' || byte == b'\\' || byte < 0x20);
    if needs_escape {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    } else {
        out.reserve(text.len() + 2);
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
}

/// One content delta, as JSON text; the last one carries the finish reason.
pub(crate) fn content_chunk(meta: &Meta, text: &str, finish_reason: Option<&str>) -> String {
    let mut chunk = meta.open_chunk(text.len());
    chunk.push_str(",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":");
    push_json_str(&mut chunk, text);
    chunk.push_str("},\"finish_reason\":");
    match finish_reason {
        Some(reason) => push_json_str(&mut chunk, reason),
        None => chunk.push_str("null"),
    }
    chunk.push_str("}]}");
    chunk
}

/// A thinking model's thoughts: `delta.reasoning` (and its structured twin
/// `delta.reasoning_details`) with no content, as OpenRouter streams them before the answer.
pub(crate) fn reasoning_chunk(meta: &Meta, text: &str) -> String {
    let mut chunk = meta.open_chunk(2 * text.len() + 160);
    chunk.push_str(",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"reasoning\":");
    push_json_str(&mut chunk, text);
    chunk.push_str(",\"reasoning_details\":[{\"type\":\"reasoning.text\",\"text\":");
    push_json_str(&mut chunk, text);
    chunk.push_str(",\"format\":\"unknown\",\"index\":0}]},\"finish_reason\":null}]}");
    chunk
}

/// The last chunk before `[DONE]`: no choices, only usage.
pub(crate) fn usage_chunk(meta: &Meta, usage: &Usage) -> String {
    let mut chunk = meta.open_chunk(256);
    chunk.push_str(",\"choices\":[],\"usage\":");
    chunk.push_str(&serde_json::to_string(usage).expect("usage serializes"));
    chunk.push('}');
    chunk
}

/// How OpenRouter reports a failure after the 200 status has gone out.
pub(crate) fn error_chunk(meta: &Meta, code: u16, message: &str) -> String {
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
        "model": meta.model, "error": {"code": code, "message": message},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    })
    .to_string()
}

/// A whole answer; `reasoning` goes in `message.reasoning`, as OpenRouter puts it.
pub(crate) fn completion(meta: &Meta, text: &str, reasoning: &str, finish_reason: &str, usage: &Usage) -> Value {
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

/// Usage as OpenRouter reports it, typed so the usage chunk serializes without building a map.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost: f64,
    cost_details: CostDetails,
    prompt_tokens_details: PromptTokensDetails,
    completion_tokens_details: CompletionTokensDetails,
}

#[derive(Clone, Debug, Serialize)]
struct CostDetails {
    upstream_inference_cost: f64,
}

#[derive(Clone, Debug, Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
}

#[derive(Clone, Debug, Serialize)]
struct CompletionTokensDetails {
    reasoning_tokens: u64,
}

/// Usage with cost from a small built-in price table, so cost accounting can be tested.
/// Reasoning tokens are output tokens: they are part of `completion_tokens` and billed.
pub(crate) fn usage(model: &str, prompt_tokens: u64, completion_tokens: u64, reasoning_tokens: u64) -> Usage {
    let (input, output) = usd_per_million_tokens(model);
    let cost = (prompt_tokens as f64 * input + completion_tokens as f64 * output) / 1e6;
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        cost,
        cost_details: CostDetails {
            upstream_inference_cost: cost,
        },
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
        completion_tokens_details: CompletionTokensDetails { reasoning_tokens },
    }
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

    fn meta() -> Meta {
        Meta::new("gen-standin-7".into(), "vendor/model \"quoted\"".into(), 1_700_000_000)
    }

    fn parsed(chunk: &str) -> Value {
        serde_json::from_str(chunk).expect("a rendered chunk is JSON")
    }

    /// The chunks are rendered by hand for speed; they must still be exactly OpenRouter's shape.
    #[test]
    fn rendered_chunks_are_the_json_openrouter_sends() {
        let meta = meta();
        let shared = json!({"id": "gen-standin-7", "object": "chat.completion.chunk",
            "created": 1_700_000_000u64, "model": "vendor/model \"quoted\"", "provider": "Stand-in"});
        let with = |extra: Value| {
            let mut expected = shared.clone();
            expected
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            expected
        };
        let content = content_chunk(&meta, " word \u{2014} \"with\" a\nbreak", None);
        let delta = json!({"role": "assistant", "content": " word \u{2014} \"with\" a\nbreak"});
        assert_eq!(
            parsed(&content),
            with(json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]}))
        );
        let last = parsed(&content_chunk(&meta, "end", Some("stop")));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        let thought = "step 1 \u{2014} weighing\u{2026}";
        let details = json!([{"type": "reasoning.text", "text": thought, "format": "unknown", "index": 0}]);
        let delta = json!({"role": "assistant", "content": null, "reasoning": thought, "reasoning_details": details});
        assert_eq!(
            parsed(&reasoning_chunk(&meta, thought)),
            with(json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]}))
        );
        let usage = usage("google/x", 10, 5, 1);
        let expected = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "cost": usage.cost, "cost_details": {"upstream_inference_cost": usage.cost},
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 1}});
        assert_eq!(
            parsed(&usage_chunk(&meta, &usage)),
            with(json!({"choices": [], "usage": expected}))
        );
    }

    #[test]
    fn string_literals_are_serde_jsons_with_or_without_escapes() {
        for text in [
            "word",
            " plan\u{2014}é",
            "",
            "a \"quote\"",
            "back\\slash",
            "tab\tand\nline",
            "\u{1}",
        ] {
            let mut literal = String::new();
            push_json_str(&mut literal, text);
            assert_eq!(literal, serde_json::to_string(text).unwrap(), "for {text:?}");
        }
    }

    #[test]
    fn cost_follows_the_price_table() {
        let usage = serde_json::to_value(usage("anthropic/claude", 1_000_000, 1_000_000, 0)).unwrap();
        assert_eq!(usage["cost"].as_f64(), Some(18.0));
        assert_eq!(usage["total_tokens"].as_u64(), Some(2_000_000));
        assert_eq!(usage["cost_details"]["upstream_inference_cost"].as_f64(), Some(18.0));
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"].as_u64(), Some(0));
    }
}
