//! A model call's progress, written into the workflow's event log as it
//! happens: answer and reasoning text coalesced (text waits at most 100 ms
//! from its arrival, or until 4 KiB are buffered, whichever comes first; an
//! answer that arrives whole within 100 ms is one write, with the result;
//! text that arrives in larger pieces goes
//! out as several events of at most 16 KiB, so no event is large however
//! long the answer), failed tries, waits and fallbacks. Every
//! append is fenced like the task's other writes; a refused one (the run was
//! cancelled or moved on) stops the call.

use crate::model::{EventReceiver, ModelEvent};
use crate::task_lifecycle::TaskHandle;
use futures::future::BoxFuture;
use nexus_proto::v1::{
    PhaseFallback, PhaseOutputDelta, PhaseReasoningDelta, PhaseRetrying, PhaseWaiting, workflow_event::Kind,
};
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Buffered text is written at most this long after its first byte arrived.
/// The clock starts with the buffer's first byte, not on a fixed beat: a
/// fixed beat also cut short answers that straddle a tick into two writes,
/// about one extra script call for every second phase under load.
const DELTA_FLUSH: Duration = Duration::from_millis(100);
/// ... or until this many bytes are buffered.
const DELTA_MAX_BYTES: usize = 4096;
/// Most text one delta event carries.
pub const DELTA_EVENT_MAX_BYTES: usize = 16 * 1024;

/// Writes the model's deltas and retries into the event log, coalesced. A
/// refused append (the workflow was cancelled or moved on) stops the call.
/// `retries` counts the model's failed tries.
pub fn forward_events(
    handle: Arc<TaskHandle>,
    phase: String,
    retries: Counter,
    delivery: u64,
    receiver: EventReceiver,
    stop: CancellationToken,
) -> impl Future<Output = Vec<Kind>> {
    async move {
        let origin = Origin {
            handle: &handle,
            phase: &phase,
            delivery,
        };
        let mut buffer = DeltaBuffer::default();
        // Tries of models fallen back from: the next model's tries come after them.
        let mut earlier_tries = 0;
        // Made with the first text: a call that waits for its first token
        // keeps no timer (112 bytes, print-type-sizes).
        let mut flush_timer = FlushTimer::default();
        loop {
            let next = tokio::select! {
                event = receiver.recv_async() => event.ok(),
                () = flush_timer.fired(), if buffer.is_waiting() => {
                    flush(&origin, &mut buffer, &stop).await;
                    continue;
                }
            };
            let (try_number, text, part) = match next {
                Some(ModelEvent::Delta { try_number, text }) => (try_number, text, TextPart::Answer),
                Some(ModelEvent::Reasoning { try_number, text }) => (try_number, text, TextPart::Reasoning),
                Some(ModelEvent::Retrying(notice)) => {
                    retries.inc();
                    flush(&origin, &mut buffer, &stop).await;
                    let retrying = Kind::PhaseRetrying(PhaseRetrying {
                        index: handle.phase_index,
                        phase: phase.clone(),
                        r#try: earlier_tries + notice.failed_try,
                        reason: notice.reason,
                        retry_in_ms: notice.delay.as_millis() as u64,
                    });
                    append_or_stop(&handle, retrying, &stop).await;
                    continue;
                }
                Some(ModelEvent::FellBack(notice)) => {
                    flush(&origin, &mut buffer, &stop).await;
                    earlier_tries += notice.tries;
                    let fallback = Kind::PhaseFallback(PhaseFallback {
                        index: handle.phase_index,
                        phase: phase.clone(),
                        from_model: notice.from,
                        to_model: notice.to,
                        reason: notice.reason,
                    });
                    append_or_stop(&handle, fallback, &stop).await;
                    continue;
                }
                Some(ModelEvent::Waiting(notice)) => {
                    flush(&origin, &mut buffer, &stop).await;
                    let waiting = Kind::PhaseWaiting(PhaseWaiting {
                        index: handle.phase_index,
                        phase: phase.clone(),
                        reason: notice.reason,
                        wait_ms: notice.wait.as_millis() as u64,
                        waited_total_ms: notice.waited_total.as_millis() as u64,
                    });
                    append_or_stop(&handle, waiting, &stop).await;
                    continue;
                }
                None => return finish(&origin, &mut buffer, &stop).await,
            };
            // Answer or reasoning text: a new try's text starts a buffer of its own.
            let try_number = earlier_tries + try_number;
            if buffer.try_number != try_number {
                flush(&origin, &mut buffer, &stop).await;
                buffer.try_number = try_number;
            }
            buffer.start_clock(&mut flush_timer);
            if buffer.push(part, text) >= DELTA_MAX_BYTES {
                flush(&origin, &mut buffer, &stop).await;
            }
        }
    }
}

/// Streamed text of one try not yet in the event log: answer and reasoning.
#[derive(Default)]
struct DeltaBuffer {
    try_number: u32,
    text: String,
    reasoning: String,
}

/// Which of a try's texts a delta belongs to.
#[derive(Clone, Copy)]
enum TextPart {
    Answer,
    Reasoning,
}

/// Where a buffer's events belong.
struct Origin<'a> {
    handle: &'a TaskHandle,
    phase: &'a str,
    delivery: u64,
}

impl DeltaBuffer {
    /// Adds `text` to its part; how many bytes that part now holds.
    fn push(&mut self, part: TextPart, text: String) -> usize {
        let buffered = match part {
            TextPart::Answer => &mut self.text,
            TextPart::Reasoning => &mut self.reasoning,
        };
        buffered.push_str(&text);
        buffered.len()
    }

    /// Whether text waits to be written (the flush clock runs).
    fn is_waiting(&self) -> bool {
        !self.text.is_empty() || !self.reasoning.is_empty()
    }

    /// Starts the flush clock when the buffer is about to take its first
    /// text.
    fn start_clock(&self, timer: &mut FlushTimer) {
        if !self.is_waiting() {
            timer.start();
        }
    }

    /// The buffered answer text as delta events, emptying it; none when empty.
    fn take_output(&mut self, origin: &Origin<'_>) -> Vec<Kind> {
        let text = std::mem::take(&mut self.text);
        output_deltas(
            &text,
            origin.handle.phase_index,
            origin.phase,
            origin.delivery,
            self.try_number,
        )
    }

    /// The buffered reasoning as events, emptying it; none when empty.
    fn take_reasoning(&mut self, origin: &Origin<'_>) -> Vec<Kind> {
        let text = std::mem::take(&mut self.reasoning);
        pieces(&text, DELTA_EVENT_MAX_BYTES)
            .map(|piece| {
                Kind::PhaseReasoningDelta(PhaseReasoningDelta {
                    index: origin.handle.phase_index,
                    phase: origin.phase.to_string(),
                    text: piece.to_string(),
                    delivery: origin.delivery as u32,
                    r#try: self.try_number,
                })
            })
            .collect()
    }
}

/// The flush clock of a buffer: made when it is first started, then reset.
#[derive(Default)]
struct FlushTimer(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl FlushTimer {
    /// Runs the clock from now for [`DELTA_FLUSH`].
    fn start(&mut self) {
        let due = tokio::time::Instant::now() + DELTA_FLUSH;
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().reset(due),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(due))),
        }
    }

    /// Ends when the clock runs out; never, before it was first started.
    fn fired(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
    }
}

/// `text` as output delta events of at most [`DELTA_EVENT_MAX_BYTES`].
pub fn output_deltas(text: &str, index: u32, phase: &str, delivery: u64, try_number: u32) -> Vec<Kind> {
    pieces(text, DELTA_EVENT_MAX_BYTES)
        .map(|piece| {
            Kind::PhaseOutputDelta(PhaseOutputDelta {
                index,
                phase: phase.to_string(),
                text: piece.to_string(),
                delivery: delivery as u32,
                r#try: try_number,
            })
        })
        .collect()
}

/// `text` in pieces of at most `max` bytes (fewer where a character would
/// be split); nothing for empty text.
fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = max.min(rest.len());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// Appends what is buffered: reasoning first (it came first), then answer
/// text. Boxed, as is `finish`: the forwarder lives as long as the call,
/// mostly waiting for the next event, and its future would otherwise keep
/// room for these (1.4 KB) all along.
fn flush<'a>(origin: &'a Origin<'a>, buffer: &'a mut DeltaBuffer, stop: &'a CancellationToken) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let reasoning = buffer.take_reasoning(origin);
        for kind in reasoning.into_iter().chain(buffer.take_output(origin)) {
            append_or_stop(origin.handle, kind, stop).await;
        }
    })
}

/// The call is over: writes all buffered text but the last piece of each
/// (reasoning, then answer), and returns those, which go with the result
/// in the settling step (no write of their own).
fn finish<'a>(
    origin: &'a Origin<'a>,
    buffer: &'a mut DeltaBuffer,
    stop: &'a CancellationToken,
) -> BoxFuture<'a, Vec<Kind>> {
    Box::pin(async move {
        let mut reasoning = buffer.take_reasoning(origin);
        let mut output = buffer.take_output(origin);
        let last = [reasoning.pop(), output.pop()];
        for piece in reasoning.into_iter().chain(output) {
            append_or_stop(origin.handle, piece, stop).await;
        }
        last.into_iter().flatten().collect()
    })
}

/// Appends a notice (a retry, a fallback, a wait) and stops the call if the
/// append is refused. Boxed whole: the notice (320 bytes) and the script
/// call are large and brief, and the forwarder, alive for the whole model
/// call, would otherwise carry room for them throughout (856 bytes, not 536).
fn append_or_stop<'a>(handle: &'a TaskHandle, kind: Kind, stop: &'a CancellationToken) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        match handle.append(kind).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(workflow_id = %handle.workflow, "workflow cancelled or moved on; aborting the model call");
                stop.cancel();
            }
            Err(error) => tracing::warn!(%error, "could not append an event; continuing"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_into_pieces_at_character_boundaries() {
        let text = "é".repeat(20_000);
        let cut: Vec<&str> = pieces(&text, DELTA_EVENT_MAX_BYTES).collect();
        assert!(cut.iter().all(|piece| piece.len() <= DELTA_EVENT_MAX_BYTES));
        assert_eq!(cut.concat(), text);
        assert_eq!(cut.len(), 3);
        assert_eq!(pieces("", 10).count(), 0);
        assert_eq!(pieces("short", 10).collect::<Vec<_>>(), ["short"]);
    }
}
