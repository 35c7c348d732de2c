//! Plays a [`Plan`] out as an SSE body, the way OpenRouter streams: keep-alive comments while
//! "processing", reasoning deltas when the model thinks, one `data:` chunk per word, a usage
//! chunk, `[DONE]`, and any scripted mid-stream fault. How each event looks on the wire, smooth
//! or rough, is `framing`'s business. A plan with timing or a fault is played by a spawned task
//! that writes into a small channel feeding the body, so it notices at once when the client
//! hangs up (the channel closes) and stops generating. An unpaced smooth stream ("as fast as
//! the connection takes it") is gathered between pauses and written at once, as a fast
//! provider's bytes arrive in few TCP segments; one that never pauses is one body.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::faults::Fault;
use crate::framing::{self, Framing};
use crate::plan::Plan;
use crate::state::Outcome;
use crate::wire;

/// How often OpenRouter-style comments are repeated while waiting for the first token.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const MALFORMED_PAYLOAD: &str = "{this is not json";
const DONE: &str = "[DONE]";
/// Rough framing waits this long between the writes of one event, so they leave as separate
/// TCP segments instead of being coalesced into one.
const WRITE_GAP: Duration = Duration::from_millis(1);

/// The streaming response: played at once into one body when the plan never waits, else by a
/// producer task that writes as the plan's timing says.
pub(crate) fn respond(plan: Plan, outcome: Outcome) -> Response {
    let generation_id = plan.meta.id.clone();
    let body = if plays_at_once(&plan) {
        whole_body(plan, outcome)
    } else {
        produced_body(plan, outcome)
    };
    (
        [(CONTENT_TYPE, "text/event-stream"), (CACHE_CONTROL, "no-cache")],
        [("x-generation-id", generation_id)],
        body,
    )
        .into_response()
}

/// Whether the plan has nothing to wait for: no latency, no pacing, no fault, smooth framing.
fn plays_at_once(plan: &Plan) -> bool {
    let thinks_at_once = plan.reasoning.is_empty() || plan.reasoning_interval.is_zero();
    !plan.rough
        && plan.fault.is_none()
        && plan.token_interval.is_none()
        && plan.first_token_latency.is_zero()
        && thinks_at_once
}

/// A plan that never waits, played into one buffer and sent as one body. The client reads the
/// same bytes as from the producer task, and the stand-in (which shares the machine with the
/// engine it benchmarks) spends no task, channel and wake-ups per request on it.
fn whole_body(plan: Plan, outcome: Outcome) -> Body {
    let mut sink = Sink {
        tx: None,
        framing: Framing::new(false),
        gathered: Some(Vec::new()),
    };
    let played = std::pin::pin!(play(&plan, &mut sink)).poll(&mut Context::from_waker(Waker::noop()));
    debug_assert!(played.is_ready(), "a plan that plays at once never waits");
    outcome.settle(plan.outcome_label());
    Body::from(sink.gathered.unwrap_or_default())
}

/// A producer task writes into a small channel that feeds the body.
fn produced_body(plan: Plan, outcome: Outcome) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let sink = Sink {
        tx: Some(tx),
        framing: Framing::new(plan.rough),
        gathered: (!plan.rough && plan.token_interval.is_none()).then(Vec::new),
    };
    tokio::spawn(produce(plan, sink, outcome));
    Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
}

/// The client went away.
struct Gone;

/// The writing end of the body.
struct Sink {
    /// `None` while playing a whole body: everything stays gathered.
    tx: Option<mpsc::Sender<Bytes>>,
    framing: Framing,
    /// Writes not sent yet, for an unpaced smooth stream; `None` sends each write at once.
    gathered: Option<Vec<u8>>,
}

impl Sink {
    /// Sends one event's writes, spaced out when the framing is rough.
    async fn write(&mut self, writes: Vec<Bytes>) -> Result<(), Gone> {
        if let Some(gathered) = self.gathered.as_mut() {
            writes.iter().for_each(|bytes| gathered.extend_from_slice(bytes));
            return Ok(());
        }
        for (index, bytes) in writes.into_iter().enumerate() {
            if index > 0 && self.framing.is_rough() {
                self.pause(WRITE_GAP).await?;
            }
            self.send(bytes).await?;
        }
        Ok(())
    }

    async fn send(&self, bytes: Bytes) -> Result<(), Gone> {
        match &self.tx {
            Some(tx) => tx.send(bytes).await.map_err(|_| Gone),
            None => Err(Gone),
        }
    }

    /// Sends what was gathered, if anything.
    async fn flush(&mut self) -> Result<(), Gone> {
        if self.tx.is_none() {
            return Ok(());
        }
        match self.gathered.as_mut().filter(|gathered| !gathered.is_empty()) {
            Some(gathered) => {
                let bytes = Bytes::from(std::mem::take(gathered));
                self.send(bytes).await
            }
            None => Ok(()),
        }
    }

    /// Sends a JSON chunk; an unpaced smooth stream gathers it without an intermediate write.
    async fn send_data(&mut self, chunk: &str) -> Result<(), Gone> {
        if let Some(gathered) = self.gathered.as_mut() {
            framing::smooth_event(chunk, gathered);
            return Ok(());
        }
        let writes = self.framing.json(chunk);
        self.write(writes).await
    }

    async fn send_text(&mut self, payload: &str) -> Result<(), Gone> {
        let writes = self.framing.text(payload);
        self.write(writes).await
    }

    async fn send_keepalive(&mut self) -> Result<(), Gone> {
        let writes = self.framing.keepalive();
        self.write(writes).await
    }

    /// Waits, but gives up as soon as the client hangs up. What was gathered goes out first.
    async fn pause(&mut self, wait: Duration) -> Result<(), Gone> {
        self.flush().await?;
        let Some(tx) = &self.tx else {
            return Err(Gone);
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            () = tx.closed() => Err(Gone),
        }
    }
}

async fn produce(plan: Plan, mut sink: Sink, outcome: Outcome) {
    if play(&plan, &mut sink).await.is_ok() {
        outcome.settle(plan.outcome_label());
    }
}

async fn play(plan: &Plan, sink: &mut Sink) -> Result<(), Gone> {
    wait_for_first_token(plan, sink).await?;
    send_reasoning(plan, sink).await?;
    let words = plan.chunks.len();
    let fault_at = plan.fault.as_ref().and_then(Fault::fires_after).map(|at| at.min(words));
    for index in 0..=words {
        if fault_at == Some(index) && !fault_mid_stream(plan, sink).await? {
            return Ok(());
        }
        if index < words {
            send_word(plan, sink, index).await?;
        }
    }
    sink.send_data(&wire::usage_chunk(&plan.meta, &plan.usage)).await?;
    sink.send_text(DONE).await?;
    sink.flush().await
}

/// The model's thoughts, one delta every `reasoning_interval`, before its answer.
async fn send_reasoning(plan: &Plan, sink: &mut Sink) -> Result<(), Gone> {
    for text in &plan.reasoning {
        sink.send_data(&wire::reasoning_chunk(&plan.meta, text)).await?;
        if !plan.reasoning_interval.is_zero() {
            sink.pause(plan.reasoning_interval).await?;
        }
    }
    Ok(())
}

/// One paced content chunk; the last one carries the finish reason.
async fn send_word(plan: &Plan, sink: &mut Sink, index: usize) -> Result<(), Gone> {
    if let Some(interval) = plan.token_interval.filter(|_| index > 0) {
        sink.pause(interval).await?;
    }
    let finish = (index + 1 == plan.chunks.len()).then_some(plan.finish_reason.as_str());
    let chunk = wire::content_chunk(&plan.meta, &plan.chunks[index], finish);
    sink.send_data(&chunk).await
}

/// Comments now and every [`KEEPALIVE_INTERVAL`] until the first token is due.
async fn wait_for_first_token(plan: &Plan, sink: &mut Sink) -> Result<(), Gone> {
    let due = Instant::now() + plan.first_token_latency;
    loop {
        if plan.keepalive_comments {
            sink.send_keepalive().await?;
        }
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let wait = if plan.keepalive_comments {
            left.min(KEEPALIVE_INTERVAL)
        } else {
            left
        };
        sink.pause(wait).await?;
        if Instant::now() >= due {
            return Ok(());
        }
    }
}

/// Plays the plan's mid-stream fault; `Ok(true)` means the stream carries on afterwards.
async fn fault_mid_stream(plan: &Plan, sink: &mut Sink) -> Result<bool, Gone> {
    match &plan.fault {
        Some(Fault::Stall { secs, .. }) => {
            sink.pause(Duration::try_from_secs_f64(*secs).unwrap_or_default())
                .await?;
            Ok(true)
        }
        Some(Fault::Malformed { .. }) => {
            sink.send_text(MALFORMED_PAYLOAD).await?;
            sink.flush().await?;
            Ok(false)
        }
        Some(Fault::MidStreamError { code, message, .. }) => {
            let message = message.as_deref().unwrap_or("Provider disconnected (stand-in)");
            sink.send_data(&wire::error_chunk(&plan.meta, *code, message)).await?;
            // The fault is delivered: a client may rightly hang up before the `[DONE]`.
            let _client_may_be_gone = async {
                sink.send_text(DONE).await?;
                sink.flush().await
            }
            .await;
            Ok(false)
        }
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StandInConfig;
    use crate::plan::ChatBody;
    use crate::state::Shared;

    /// The one-body shortcut must send exactly what the producer task streams for the same plan.
    #[tokio::test]
    async fn a_plan_played_at_once_sends_the_bytes_the_producer_task_streams() {
        let config = StandInConfig {
            first_token_latency: Duration::ZERO,
            tokens_per_second: 0.0,
            reply_words: 5,
            ..StandInConfig::default()
        };
        let request = serde_json::json!({"model": "vendor/m", "stream": true, "reasoning": {"effort": "low"},
            "messages": [{"role": "user", "content": "plan a shop"}]});
        let body: ChatBody = serde_json::from_value(request).expect("a request body");
        let shared = Shared::new(config.clone());
        let at_once = Plan::new(&body, &config, 7, None);
        let mut produced = Plan::new(&body, &config, 7, None);
        produced.meta = at_once.meta.clone();
        assert!(plays_at_once(&at_once));

        let whole = whole_body(at_once, shared.record(body.record()));
        let streamed = produced_body(produced, shared.record(body.record()));
        let whole = axum::body::to_bytes(whole, usize::MAX).await.expect("the whole body");
        let streamed = axum::body::to_bytes(streamed, usize::MAX)
            .await
            .expect("the streamed body");
        assert_eq!(whole, streamed);
        let text = String::from_utf8(whole.to_vec()).expect("UTF-8");
        assert!(text.starts_with(": OPENROUTER PROCESSING\n\n"), "{text}");
        assert!(text.contains("\"reasoning\":") && text.contains("\"usage\":"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let outcomes: Vec<String> = shared.requests().into_iter().map(|r| r.outcome).collect();
        assert_eq!(outcomes, ["ok", "ok"]);
    }
}
