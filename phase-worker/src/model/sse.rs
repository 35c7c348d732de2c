//! Server-sent events, decoded incrementally from the body's byte chunks.
//!
//! Why not a crate: `eventsource-stream` did this job until a profile of the throughput
//! benchmark showed its parser (nom, a copy of every line, a `String` per field) taking 14% of
//! the worker's CPU. A model reply only needs each event's `data`, so this decoder keeps to
//! the part of the WHATWG rules that decides it, and copies nothing but a line split across
//! reads:
//!
//! - lines end in `\n`, `\r\n` or `\r`, and may be split anywhere across reads, even inside
//!   a UTF-8 character (a line is decoded only once it is whole);
//! - a blank line ends an event; its data is its `data:` lines joined by `\n`, and an event
//!   with no data is not dispatched;
//! - `:` starts a comment (OpenRouter's keep-alive `: OPENROUTER PROCESSING`); `event`, `id`,
//!   `retry` and unknown fields are ignored; one space after the colon is not part of the
//!   value; a leading byte-order mark is skipped;
//! - an event not ended by a blank line when the body ends is discarded.
//!
//! The events a read completes go into one [`SseEvents`] buffer that the reader clears and
//! reuses, so a reply of hundreds of chunks costs no allocation per chunk here.

/// The data of the events decoded so far, end to end in one string.
#[derive(Debug, Default)]
pub(super) struct SseEvents {
    text: String,
    /// Where each event's data ends in `text`.
    ends: Vec<usize>,
}

impl SseEvents {
    fn push(&mut self, data: &str) {
        self.text.push_str(data);
        self.ends.push(self.text.len());
    }

    /// Each event's data, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.text[start..end])
    }

    /// Forgets the events, keeping the memory for the next read's.
    pub(super) fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }
}

/// Decodes one stream. Feed it each chunk with [`SseDecoder::push`].
#[derive(Debug, Default)]
pub(super) struct SseDecoder {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The current event's data so far.
    data: String,
    has_data: bool,
    /// The previous chunk ended in `\r`: a `\n` opening this one belongs to it.
    after_cr: bool,
    seen_first_line: bool,
}

/// The stream's bytes are not UTF-8.
#[derive(Debug, PartialEq)]
pub(super) struct NotUtf8;

impl SseDecoder {
    /// Decodes `chunk`, appending the data of every event it completes to `events`.
    pub(super) fn push(&mut self, mut chunk: &[u8], events: &mut SseEvents) -> Result<(), NotUtf8> {
        if std::mem::take(&mut self.after_cr) && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            if self.partial.is_empty() {
                self.line(&chunk[..end], events)?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&chunk[..end]);
                self.line(&line, events)?;
                line.clear();
                self.partial = line;
            }
            let crlf = chunk[end] == b'\r' && chunk.get(end + 1) == Some(&b'\n');
            self.after_cr = chunk[end] == b'\r' && end + 1 == chunk.len();
            chunk = &chunk[end + if crlf { 2 } else { 1 }..];
        }
        self.partial.extend_from_slice(chunk);
        Ok(())
    }

    fn line(&mut self, line: &[u8], events: &mut SseEvents) -> Result<(), NotUtf8> {
        let mut line = std::str::from_utf8(line).map_err(|_| NotUtf8)?;
        if !std::mem::replace(&mut self.seen_first_line, true) {
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                events.push(&self.data);
                self.data.clear();
            }
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            if std::mem::replace(&mut self.has_data, true) {
                self.data.push('\n');
            }
            self.data.push_str(value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `chunks` decode to.
    fn decode(chunks: &[&[u8]]) -> Result<Vec<String>, NotUtf8> {
        let mut decoder = SseDecoder::default();
        let mut events = SseEvents::default();
        for chunk in chunks {
            decoder.push(chunk, &mut events)?;
        }
        Ok(events.iter().map(str::to_string).collect())
    }

    #[test]
    fn events_end_at_a_blank_line_with_any_line_ending() {
        assert_eq!(
            decode(&[b"data: a\n\ndata: b\r\n\r\ndata: c\r\r"]).unwrap(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn an_event_split_anywhere_decodes_the_same() {
        let stream = "data: {\"x\":\"h\u{e9}llo\"}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n".as_bytes();
        let whole = decode(&[stream]).unwrap();
        assert_eq!(whole, ["{\"x\":\"h\u{e9}llo\"}", "[DONE]"]);
        for cut in 1..stream.len() {
            assert_eq!(
                decode(&[&stream[..cut], &stream[cut..]]).unwrap(),
                whole,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode(&bytes).unwrap(), whole, "one byte at a time");
    }

    #[test]
    fn data_lines_join_and_other_fields_and_comments_are_ignored() {
        let stream = b"\xEF\xBB\xBFevent: message\nid: 7\nretry: 10\ndata:one\ndata: two\n: comment\nnoise\n\n";
        assert_eq!(decode(&[stream]).unwrap(), ["one\ntwo"]);
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_an_unended_one_is_dropped() {
        assert_eq!(
            decode(&[b": ping\n\nevent: x\n\ndata: cut off"]).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(decode(&[b"data\n\n"]).unwrap(), [""]);
    }

    #[test]
    fn clearing_the_events_between_reads_keeps_an_event_still_arriving() {
        let mut decoder = SseDecoder::default();
        let mut events = SseEvents::default();
        decoder.push(b"data: one\n\ndata: tw", &mut events).unwrap();
        assert_eq!(events.iter().collect::<Vec<_>>(), ["one"]);
        events.clear();
        decoder.push(b"o\ndata: three\n\n", &mut events).unwrap();
        assert_eq!(events.iter().collect::<Vec<_>>(), ["two\nthree"]);
    }

    #[test]
    fn bytes_that_are_not_utf8_fail_once_their_line_is_whole() {
        assert_eq!(decode(&[b"data: \xff\xfe"]).unwrap(), Vec::<String>::new());
        assert_eq!(decode(&[b"data: \xff\xfe", b"\n\n"]), Err(NotUtf8));
    }
}
