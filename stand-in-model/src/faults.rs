//! Scripted failures. Tests queue them through `POST /_stand-in/faults`; each is consumed, in
//! order, by the next chat request it matches, so a test can say "the first call gets a 429,
//! the second succeeds" without timing games.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One way a request can go wrong, mirroring what OpenRouter really does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Reject before streaming with this HTTP status and OpenRouter's error body.
    Status {
        status: u16,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        retry_after_secs: Option<f64>,
        /// Send `Retry-After` as an HTTP-date (now plus the seconds), as
        /// some providers and proxies do, instead of a number of seconds.
        #[serde(default)]
        retry_after_http_date: bool,
        /// Echo the request's bearer token in the error message, as a careless
        /// provider or proxy might: the client must never pass it on.
        #[serde(default)]
        echo_key: bool,
    },
    /// Go completely silent (no comments either) for `secs` after `after_words` chunks.
    Stall { after_words: usize, secs: f64 },
    /// Send a chunk that is not JSON after `after_words` chunks, then hang up without `[DONE]`.
    Malformed { after_words: usize },
    /// Send an `error` chunk (status already 200) after `after_words` chunks, then `[DONE]`.
    MidStreamError {
        after_words: usize,
        #[serde(default = "default_mid_stream_code")]
        code: u16,
        #[serde(default)]
        message: Option<String>,
    },
    /// Wait this long before the first token instead of the configured latency.
    Latency { first_token_ms: u64 },
    /// Answer a structured-output request with text that is not JSON.
    BadJsonOutput,
    /// Stop after `after_words` chunks with this `finish_reason` ("length",
    /// "content_filter"), the way a model cut short ends its stream.
    Truncated {
        after_words: usize,
        #[serde(default = "default_truncation")]
        finish_reason: String,
    },
    /// Answer with about `bytes` bytes of text (a long plan), streamed in
    /// chunks of about `chunk_bytes`.
    Long {
        bytes: usize,
        #[serde(default = "default_chunk_bytes")]
        chunk_bytes: usize,
    },
}

fn default_chunk_bytes() -> usize {
    512
}

fn default_truncation() -> String {
    "length".into()
}

fn default_mid_stream_code() -> u16 {
    502
}

impl Fault {
    /// What the request log says happened to a request that met this fault.
    pub fn outcome_label(&self) -> String {
        match self {
            Fault::Status { status, .. } => format!("status {status}"),
            Fault::Stall { .. } => "stall".into(),
            Fault::Malformed { .. } => "malformed".into(),
            Fault::MidStreamError { .. } => "mid_stream_error".into(),
            Fault::Latency { .. } => "latency".into(),
            Fault::BadJsonOutput => "bad_json_output".into(),
            Fault::Truncated { finish_reason, .. } => format!("truncated {finish_reason}"),
            Fault::Long { bytes, .. } => format!("long {bytes}"),
        }
    }

    /// After how many content chunks a mid-stream fault fires, if this is one.
    pub(crate) fn fires_after(&self) -> Option<usize> {
        match self {
            Fault::Stall { after_words, .. }
            | Fault::Malformed { after_words }
            | Fault::MidStreamError { after_words, .. } => Some(*after_words),
            _ => None,
        }
    }
}

/// A queued fault with its matching rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Only requests for this model consume the fault; any model when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How many matching requests it affects before it leaves the queue.
    #[serde(default = "default_times")]
    pub times: u32,
    #[serde(flatten)]
    pub fault: Fault,
}

fn default_times() -> u32 {
    1
}

/// First-in, first-out queue of pending faults.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    pending: VecDeque<FaultSpec>,
}

impl FaultQueue {
    pub(crate) fn extend(&mut self, specs: impl IntoIterator<Item = FaultSpec>) {
        self.pending.extend(specs.into_iter().filter(|spec| spec.times > 0));
    }

    pub(crate) fn clear(&mut self) -> usize {
        std::mem::take(&mut self.pending).len()
    }

    pub(crate) fn pending(&self) -> Vec<FaultSpec> {
        self.pending.iter().cloned().collect()
    }

    /// Consumes one use of the oldest fault that applies to a request for
    /// `model`. `bad_json_output` only applies to structured-output requests,
    /// the only ones it can spoil.
    pub(crate) fn take(&mut self, model: &str, structured: bool) -> Option<Fault> {
        let index = self.pending.iter().position(|spec| {
            spec.model.as_deref().is_none_or(|m| m == model)
                && (structured || !matches!(spec.fault, Fault::BadJsonOutput))
        })?;
        let spec = &mut self.pending[index];
        spec.times -= 1;
        let fault = spec.fault.clone();
        if spec.times == 0 {
            self.pending.remove(index);
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Vec<FaultSpec> {
        serde_json::from_str(json).expect("fault JSON parses")
    }

    #[test]
    fn documented_fault_shapes_parse() {
        let specs = parse(
            r#"[{"kind":"status","status":429,"message":"slow down","retry_after_secs":1},
                {"kind":"stall","after_words":3,"secs":30},
                {"kind":"malformed","after_words":3},
                {"kind":"mid_stream_error","after_words":3,"code":502,"message":"Provider disconnected"},
                {"kind":"latency","first_token_ms":2000},
                {"kind":"bad_json_output","model":"m","times":2}]"#,
        );
        assert_eq!(specs.len(), 6);
        assert_eq!(specs[5].times, 2);
        assert_eq!(specs[5].fault, Fault::BadJsonOutput);
        assert_eq!(specs[0].fault.outcome_label(), "status 429");
    }

    #[test]
    fn faults_are_consumed_in_order_by_matching_models_only() {
        let mut queue = FaultQueue::default();
        queue.extend(parse(
            r#"[{"kind":"latency","first_token_ms":1,"model":"a","times":2},
                {"kind":"bad_json_output"}]"#,
        ));
        assert_eq!(
            queue.take("b", false),
            None,
            "bad_json_output waits for a structured request"
        );
        assert_eq!(queue.take("b", true), Some(Fault::BadJsonOutput));
        assert!(matches!(queue.take("a", false), Some(Fault::Latency { .. })));
        assert!(matches!(queue.take("a", true), Some(Fault::Latency { .. })));
        assert_eq!(queue.take("a", false), None);
    }
}
