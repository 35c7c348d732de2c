//! The reply text. It is deterministic so tests and benchmarks are repeatable, derived from the
//! prompt so different phases visibly differ, and always labelled as the stand-in's so nobody
//! mistakes demo output for a real model's.

const FALLBACK_WORDS: &str = "stand-in reply without prompt";

/// Banner plus `words` words cycled from the prompt. Only the words used are looked at: the
/// prompt carries the plan and every earlier phase's output.
pub(crate) fn free_text(model: &str, prompt: &str, words: usize) -> String {
    let source = if prompt.split_whitespace().next().is_some() {
        prompt
    } else {
        FALLBACK_WORDS
    };
    let mut text = format!("[stand-in model for {model}; not a real LLM]");
    for word in source.split_whitespace().cycle().take(words) {
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// A structured-output answer: a score from 1 to 10 fixed by the prompt, and reasons that say
/// where it came from.
pub(crate) fn structured_text(model: &str, prompt: &str) -> String {
    let verdict = Verdict {
        score: 1 + fnv1a(prompt.as_bytes()) % 10,
        reasons: [
            format!("stand-in: score for {model} derived from a hash of the prompt"),
            "stand-in: not a real evaluation".to_owned(),
        ],
    };
    serde_json::to_string(&verdict).expect("a struct of strings and numbers serializes")
}

/// Field order matters to humans reading demo output: score first.
#[derive(serde::Serialize)]
struct Verdict {
    score: u64,
    reasons: [String; 2],
}

/// `count` reasoning deltas: a banner that says these are no real thoughts, then numbered
/// steps. The dash and ellipsis are multi-byte on purpose, so a rough stream splits characters.
pub(crate) fn reasoning_deltas(model: &str, count: usize) -> Vec<String> {
    let banner = format!("[stand-in reasoning for {model}; not a real model's thoughts]");
    let steps = (1..count).map(|step| format!(" step {step} — weighing the plan…"));
    std::iter::once(banner).chain(steps).take(count).collect()
}

/// Text a structured request gets under the `bad_json_output` fault.
pub(crate) const BAD_JSON_OUTPUT: &str = "not json at all (stand-in)";

/// Splits text into word-sized deltas whose concatenation is exactly the text.
pub(crate) fn chunks(text: &str) -> Vec<String> {
    text.split(' ')
        .enumerate()
        .map(|(i, word)| {
            let mut chunk = String::with_capacity(word.len() + 1);
            if i > 0 {
                chunk.push(' ');
            }
            chunk.push_str(word);
            chunk
        })
        .collect()
}

/// About `bytes` bytes of free text (at least that many, ending at a word).
pub(crate) fn long_text(model: &str, prompt: &str, bytes: usize) -> String {
    let paragraph = free_text(model, prompt, 200);
    let mut text = String::with_capacity(bytes + paragraph.len());
    while text.len() < bytes {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&paragraph);
    }
    text
}

/// `text` in pieces of about `size` bytes, each ending at a character boundary.
pub(crate) fn pieces(text: &str, size: usize) -> Vec<String> {
    let mut pieces = Vec::with_capacity(text.len() / size.max(1) + 1);
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = size.max(1).min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    pieces
}

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_names_the_stand_in_and_cycles_prompt_words() {
        let text = free_text("m/x", "alpha beta", 3);
        assert_eq!(text, "[stand-in model for m/x; not a real LLM] alpha beta alpha");
        assert_eq!(chunks(&text).concat(), text);
    }

    #[test]
    fn reasoning_names_the_stand_in_and_has_the_asked_length() {
        assert!(reasoning_deltas("m/x", 0).is_empty());
        let deltas = reasoning_deltas("m/x", 3);
        assert_eq!(deltas.len(), 3);
        assert!(deltas[0].starts_with("[stand-in reasoning for m/x"));
        assert!(deltas[2].contains("step 2"));
    }

    #[test]
    fn structured_text_is_json_with_a_stable_score_in_range() {
        let text = structured_text("m", "judge this");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let score = value["score"].as_u64().unwrap();
        assert!((1..=10).contains(&score));
        assert_eq!(text, structured_text("m", "judge this"));
        assert!(value["reasons"][0].as_str().unwrap().contains("stand-in"));
        assert_eq!(chunks(&text).concat(), text);
    }
}
