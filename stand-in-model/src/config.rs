//! How the stand-in behaves when no fault is scripted: how slow, how fast, how long, and how
//! rough its stream looks on the wire.

use std::time::Duration;

/// Behaviour of every reply. Faults queued through the control API override it per request.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// Wait before the first token, reasoning or content (keep-alive comments meanwhile).
    pub first_token_latency: Duration,
    /// Pace of content chunks; `0.0` sends them as fast as the connection takes them.
    pub tokens_per_second: f64,
    /// Words of prompt-derived text after the stand-in banner.
    pub reply_words: usize,
    /// Send `: OPENROUTER PROCESSING` comments while waiting for the first token, as OpenRouter
    /// does, so clients prove they skip SSE comments.
    pub keepalive_comments: bool,
    /// How long each reply streams reasoning deltas (`delta.reasoning`) before its first content
    /// token, as a thinking model does; zero sends none.
    pub reasoning: Duration,
    /// Put every legal roughness of the wire into the stream (see `framing`): events split
    /// across writes, CRLF line ends, multi-line `data:` fields, comments between events. Off
    /// by default: benchmarks want the cheap stream.
    pub rough: bool,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            first_token_latency: Duration::from_millis(50),
            tokens_per_second: 200.0,
            reply_words: 60,
            keepalive_comments: true,
            reasoning: Duration::ZERO,
            rough: false,
        }
    }
}

impl StandInConfig {
    /// Gap between content chunks, or `None` when pacing is off.
    pub(crate) fn token_interval(&self) -> Option<Duration> {
        (self.tokens_per_second.is_finite() && self.tokens_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.tokens_per_second))
    }
}
