//! How SSE events look on the wire.
//!
//! Smooth framing is one write per event, `\n` line ends and one `data:` line: cheap, for
//! benchmarks and the demo. Rough framing is everything the SSE spec allows and real providers,
//! proxies and TCP do, so a client that only copes with the smooth form fails here rather than
//! in production:
//! - each event is split across several writes: halfway through, inside its first multi-byte
//!   UTF-8 character, and between the `\r` and `\n` of its last line end;
//! - lines end in CRLF;
//! - every other JSON chunk is pretty-printed over several `data:` lines (SSE joins them with
//!   `\n`, which JSON takes as whitespace, so the chunk still parses);
//! - a `: OPENROUTER PROCESSING` comment comes between events now and then, not only before
//!   the first token.

use axum::body::Bytes;

const KEEPALIVE: &str = ": OPENROUTER PROCESSING";

/// Turns events into the writes that carry them; rough framing varies with the event count.
#[derive(Debug)]
pub(crate) struct Framing {
    rough: bool,
    events: usize,
}

impl Framing {
    pub(crate) fn new(rough: bool) -> Self {
        Self { rough, events: 0 }
    }

    pub(crate) fn is_rough(&self) -> bool {
        self.rough
    }

    /// A `data:` event carrying a JSON chunk (its text). Rough framing pretty-prints every
    /// other one over several `data:` lines.
    pub(crate) fn json(&mut self, chunk: &str) -> Vec<Bytes> {
        if !self.rough {
            let mut frame = Vec::new();
            smooth_event(chunk, &mut frame);
            return vec![Bytes::from(frame)];
        }
        self.events += 1;
        let payload = match serde_json::from_str::<serde_json::Value>(chunk) {
            Ok(value) if self.events.is_multiple_of(2) => {
                serde_json::to_string_pretty(&value).unwrap_or_else(|_| chunk.to_owned())
            }
            _ => chunk.to_owned(),
        };
        self.rough_data(&payload)
    }

    /// A `data:` event carrying text as it is (`[DONE]`, or a chunk that is not JSON).
    pub(crate) fn text(&mut self, payload: &str) -> Vec<Bytes> {
        if !self.rough {
            return smooth(&format!("data: {payload}\n\n"));
        }
        self.events += 1;
        self.rough_data(payload)
    }

    /// A keep-alive comment on its own.
    pub(crate) fn keepalive(&self) -> Vec<Bytes> {
        if !self.rough {
            return smooth(&format!("{KEEPALIVE}\n\n"));
        }
        split(&format!("{KEEPALIVE}\r\n\r\n"))
    }

    /// One `data:` line per payload line, CRLF line ends, split into writes; every third
    /// event has a keep-alive comment before it.
    fn rough_data(&self, payload: &str) -> Vec<Bytes> {
        let mut writes = Vec::new();
        if self.events.is_multiple_of(3) {
            writes.extend(self.keepalive());
        }
        let mut event: String = payload.lines().map(|line| format!("data: {line}\r\n")).collect();
        event.push_str("\r\n");
        writes.extend(split(&event));
        writes
    }
}

/// A smooth `data:` event, appended to `out`: where an unpaced stream gathers its writes.
pub(crate) fn smooth_event(payload: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload.as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn smooth(frame: &str) -> Vec<Bytes> {
    vec![Bytes::from(frame.to_owned())]
}

/// The event as several writes whose concatenation is the event.
fn split(event: &str) -> Vec<Bytes> {
    let bytes = Bytes::from(event.to_owned());
    let mut cuts = vec![0, event.len() / 2, event.len().saturating_sub(1), event.len()];
    if let Some((at, _)) = event.char_indices().find(|(_, c)| c.len_utf8() > 1) {
        cuts.push(at + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|cut| bytes.slice(cut[0]..cut[1])).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn joined(writes: &[Bytes]) -> String {
        let bytes: Vec<u8> = writes.iter().flat_map(|w| w.iter().copied()).collect();
        String::from_utf8(bytes).expect("the writes together are UTF-8")
    }

    /// What an SSE parser makes of one event: its `data:` lines joined with `\n`.
    fn data_of(event: &str) -> String {
        let lines = event.split("\r\n").filter_map(|line| line.strip_prefix("data:"));
        let values: Vec<&str> = lines.map(|value| value.strip_prefix(' ').unwrap_or(value)).collect();
        values.join("\n")
    }

    #[test]
    fn smooth_framing_is_one_write_per_event() {
        let mut framing = Framing::new(false);
        let writes = framing.json(&json!({"a": 1}).to_string());
        assert_eq!(writes, [Bytes::from("data: {\"a\":1}\n\n")]);
        assert_eq!(framing.keepalive(), [Bytes::from(": OPENROUTER PROCESSING\n\n")]);
    }

    #[test]
    fn rough_events_are_split_crlf_and_still_parse_when_joined() {
        let mut framing = Framing::new(true);
        let chunk = json!({"choices": [{"delta": {"content": " word — with a dash"}}]});
        for _ in 0..6 {
            let writes = framing.json(&chunk.to_string());
            assert!(writes.len() >= 3, "{writes:?}");
            assert_eq!(writes.last().unwrap(), &Bytes::from("\n"), "the last CRLF is split");
            let text = joined(&writes);
            assert!(text.ends_with("\r\n\r\n"));
            assert!(!text.replace("\r\n", "").contains('\n'), "no bare LF: {text:?}");
            let event = text
                .rsplit_once(": OPENROUTER PROCESSING\r\n\r\n")
                .map_or(text.as_str(), |(_, e)| e);
            let parsed: Value = serde_json::from_str(&data_of(event)).expect("joined data is JSON");
            assert_eq!(parsed, chunk);
        }
    }

    #[test]
    fn rough_framing_varies_data_lines_and_comments_between_events() {
        let mut framing = Framing::new(true);
        let events: Vec<String> = (0..3)
            .map(|_| joined(&framing.json(&json!({"a": [1, 2]}).to_string())))
            .collect();
        assert_eq!(events[0].matches("data:").count(), 1);
        assert!(events[1].matches("data:").count() > 1, "{:?}", events[1]);
        assert!(events[2].starts_with(": OPENROUTER PROCESSING\r\n\r\n"));
    }

    #[test]
    fn a_split_may_fall_inside_a_utf8_character() {
        let writes = split("data: …\r\n\r\n");
        assert!(writes.iter().any(|w| std::str::from_utf8(w).is_err()), "{writes:?}");
        assert_eq!(joined(&writes), "data: …\r\n\r\n");
    }
}
