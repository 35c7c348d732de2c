//! Whole workflows against a stand-in as rough as the real provider (`--rough`: events split
//! across writes and inside UTF-8 characters, CRLF line ends, multi-line `data:` fields,
//! keep-alive comments between events, reasoning deltas before every answer), with one scripted
//! fault in the first phase. Unit tests of the model client cannot show what a user sees; these
//! watch as a user does and check what a watcher is promised:
//! - a failed try's deltas carry that try's number and come before its `phase_retrying`;
//! - the accepted output in `phase_completed` is exactly the last try's deltas, and no
//!   reasoning ever shows up as output;
//! - the stand-in's ledger shows the calls that really happened and how each ended.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{PhaseCompleted, PhaseOutputDelta, PhaseRetrying, WorkflowEvent};
use nexus_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

/// The first phase, which gets every fault (faults go to the next matching request).
const FIRST: u32 = 0;
const PHASES: usize = 6;
/// Every reasoning delta of the stand-in starts with this; answers must never contain it.
const REASONING_MARK: &str = "stand-in reasoning";
/// The stand-in's flags: rough, quick, short answers (reasoning 200 ms by default).
const ROUGH: [&str; 7] = [
    "--rough",
    "--first-token-latency-ms",
    "5",
    "--tokens-per-second",
    "0",
    "--reply-words",
    "12",
];

/// Redis, a rough stand-in, one orchestrator and one worker.
struct RoughStack {
    _redis: RedisServer,
    _model: StandIn,
    _orchestrator: Orchestrator,
    _worker: Worker,
    control: ModelControl,
    endpoint: String,
}

impl RoughStack {
    fn start(extra_model_args: &[&str], worker_env: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start();
        let model_args: Vec<&str> = ROUGH.iter().chain(extra_model_args).copied().collect();
        let model = StandIn::start(&model_args);
        let orchestrator = Orchestrator::start(&redis.url(), &[]);
        let worker = Worker::start(&redis.url(), &model.base_url(), worker_env);
        Self {
            control: ModelControl::new(&model.base_url()),
            endpoint: orchestrator.endpoint(),
            _redis: redis,
            _model: model,
            _orchestrator: orchestrator,
            _worker: worker,
        }
    }

    /// Queues `faults` (if any), runs one workflow and returns everything its watcher saw.
    async fn run(&self, faults: Option<Value>) -> Vec<WorkflowEvent> {
        if let Some(faults) = faults {
            self.control.inject(faults).await;
        }
        let mut client = connect(&self.endpoint).await;
        let id = start(&mut client, "Rough").await;
        let events = watch_until_end(&mut client, &id, "", Duration::from_secs(90)).await;
        let kinds: Vec<_> = events.iter().map(kind_name).collect();
        assert_eq!(kinds.last(), Some(&"completed"), "the run completes: {kinds:?}");
        events
    }

    /// How each chat request ended, once none is still in progress (an abandoned request is
    /// settled when the stand-in notices the hang-up).
    async fn outcomes(&self) -> Vec<String> {
        let mut outcomes = Vec::new();
        for _ in 0..100 {
            let requests = self.control.requests().await;
            let outcome = |r: &Value| r["outcome"].as_str().unwrap_or_default().to_owned();
            outcomes = requests.iter().map(outcome).collect();
            if !outcomes.iter().any(|o| o == "in_progress") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outcomes
    }

    /// What the first `count` requests asked, as the stand-in read them: the prompt's
    /// start and the system prompt's end.
    async fn first_prompts(&self, count: usize) -> Vec<(String, String)> {
        let requests = self.control.requests().await;
        let text = |r: &Value, field: &str| r[field].as_str().unwrap_or_default().to_owned();
        let prompts = requests.iter().take(count);
        prompts
            .map(|r| (text(r, "prompt_excerpt"), text(r, "system_tail")))
            .collect()
    }

    /// Milliseconds between consecutive requests, by the stand-in's clock.
    async fn gaps_ms(&self) -> Vec<u64> {
        let requests = self.control.requests().await;
        let received: Vec<u64> = requests.iter().map(|r| r["received_ms"].as_u64().unwrap()).collect();
        received.windows(2).map(|pair| pair[1] - pair[0]).collect()
    }
}

/// The ledger of a run whose first phase failed with `failures` and then went through.
fn ledger(failures: &[&str]) -> Vec<String> {
    let oks = std::iter::repeat_n("ok", PHASES);
    failures.iter().copied().chain(oks).map(str::to_owned).collect()
}

/// What the watcher saw of one phase, in order.
struct PhaseView<'a> {
    events: Vec<&'a Kind>,
}

impl<'a> PhaseView<'a> {
    fn of(events: &'a [WorkflowEvent], index: u32) -> Self {
        let events = events
            .iter()
            .filter(|event| phase_of(event) == Some(index))
            .filter_map(|event| event.kind.as_ref())
            .collect();
        Self { events }
    }

    fn deltas(&self) -> impl Iterator<Item = &'a PhaseOutputDelta> + '_ {
        self.events.iter().filter_map(|kind| match *kind {
            Kind::PhaseOutputDelta(delta) => Some(delta),
            _ => None,
        })
    }

    fn text_of_try(&self, wanted: u32) -> String {
        let of_try = self.deltas().filter(|delta| delta.r#try == wanted);
        of_try.map(|delta| delta.text.as_str()).collect()
    }

    fn retries(&self) -> Vec<&'a PhaseRetrying> {
        let retrying = |kind: &&'a Kind| match *kind {
            Kind::PhaseRetrying(retrying) => Some(retrying),
            _ => None,
        };
        self.events.iter().filter_map(retrying).collect()
    }

    fn completed(&self) -> &'a PhaseCompleted {
        let completed = self.events.iter().find_map(|kind| match *kind {
            Kind::PhaseCompleted(completed) => Some(completed),
            _ => None,
        });
        completed.expect("the phase completed")
    }

    fn waits(&self) -> usize {
        let is_wait = |kind: &&&Kind| matches!(kind, Kind::PhaseWaiting(_));
        self.events.iter().filter(is_wait).count()
    }

    /// The watcher's promises for a phase whose first `failed` tries failed: deltas of each try
    /// come after the previous try's `phase_retrying` and before its own (and all before
    /// `phase_completed`), retries are numbered 1, 2, …, and the output is exactly the last
    /// try's deltas, with no reasoning in it.
    fn assert_recovered_after(&self, failed: u32) {
        let mut running = 1;
        let mut completed = false;
        for kind in &self.events {
            match kind {
                Kind::PhaseOutputDelta(delta) => {
                    assert!(!completed, "a delta after phase_completed");
                    assert_eq!(
                        delta.r#try, running,
                        "a delta marked with another try than the running one"
                    );
                    assert_eq!(delta.delivery, 1);
                    assert!(!delta.text.contains(REASONING_MARK), "reasoning streamed as output");
                }
                Kind::PhaseRetrying(retrying) => {
                    assert_eq!(retrying.r#try, running, "phase_retrying names the failed try");
                    running += 1;
                }
                Kind::PhaseCompleted(_) => completed = true,
                _ => {}
            }
        }
        let completed = self.completed();
        assert_eq!(self.retries().len() as u32, failed);
        assert_eq!(completed.tries, failed + 1);
        assert_eq!(running, failed + 1);
        assert_eq!(
            completed.output,
            self.text_of_try(failed + 1),
            "output is the last try's text"
        );
        assert!(completed.output.contains("stand-in"), "{}", completed.output);
        assert!(!completed.output.contains(REASONING_MARK));
    }

    /// The first retry's reason, which must name what went wrong.
    fn assert_first_retry_mentions(&self, cause: &str) {
        let reason = &self.retries()[0].reason;
        assert!(
            reason.contains(cause),
            "retry reason {reason:?} does not mention {cause:?}"
        );
    }
}

/// Every phase after the first went through on its first try.
fn assert_later_phases_clean(events: &[WorkflowEvent]) {
    for index in 1..PHASES as u32 {
        PhaseView::of(events, index).assert_recovered_after(0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rough_stream_with_reasoning_completes_every_phase_with_exactly_its_deltas() {
    let stack = RoughStack::start(&[], &[]);
    let events = stack.run(None).await;

    for index in 0..PHASES as u32 {
        let phase = PhaseView::of(&events, index);
        phase.assert_recovered_after(0);
        let usage = phase.completed().usage.expect("usage");
        assert_eq!(usage.reasoning_tokens, 4, "200 ms of reasoning, a delta every 50 ms");
        assert!(usage.completion_tokens > usage.reasoning_tokens);
    }
    assert_eq!(stack.outcomes().await, ledger(&[]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stall_mid_answer_is_cut_by_the_idle_timeout_and_retried() {
    let stack = RoughStack::start(&[], &[("NEXUS_MODEL_IDLE_TIMEOUT_MS", "600")]);
    let stall = json!({"kind": "stall", "after_words": 3, "secs": 30});
    let events = stack.run(Some(stall)).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(1);
    phase.assert_first_retry_mentions("stalled");
    let partial = phase.text_of_try(1);
    assert!(!partial.is_empty(), "the stalled try streamed its first words");
    assert!(phase.completed().output.starts_with(&partial));
    assert_later_phases_clean(&events);
    assert_eq!(stack.outcomes().await, ledger(&["client_disconnected"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_silent_after_its_reasoning_is_cut_by_the_idle_timeout() {
    // The first-token clock stops at the first reasoning delta (reasoning is progress), so
    // only the idle clock can notice the silence that follows it.
    let stack = RoughStack::start(&[], &[("NEXUS_MODEL_IDLE_TIMEOUT_MS", "600")]);
    let stall = json!({"kind": "stall", "after_words": 0, "secs": 30});
    let events = stack.run(Some(stall)).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(1);
    phase.assert_first_retry_mentions("stalled");
    assert_eq!(
        phase.text_of_try(1),
        "",
        "the silent try had only reasoning, which is no output"
    );
    assert_later_phases_clean(&events);
    assert_eq!(stack.outcomes().await, ledger(&["client_disconnected"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunk_fails_the_try_and_the_retry_is_the_output() {
    let stack = RoughStack::start(&[], &[]);
    let events = stack.run(Some(json!({"kind": "malformed", "after_words": 3}))).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(1);
    phase.assert_first_retry_mentions("malformed stream");
    let partial = phase.text_of_try(1);
    assert!(!partial.is_empty());
    assert_ne!(phase.completed().output, partial);
    assert_later_phases_clean(&events);
    assert_eq!(stack.outcomes().await, ledger(&["malformed"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mid_stream_error_fails_the_try_and_the_retry_is_the_output() {
    let stack = RoughStack::start(&[], &[]);
    let error = json!({"kind": "mid_stream_error", "after_words": 3, "code": 502,
                       "message": "Provider disconnected (stand-in)"});
    let events = stack.run(Some(error)).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(1);
    phase.assert_first_retry_mentions("Provider disconnected (stand-in)");
    let partial = phase.text_of_try(1);
    assert!(!partial.is_empty());
    assert!(phase.completed().output.starts_with(&partial));
    assert_ne!(phase.completed().output, partial);
    assert_later_phases_clean(&events);
    assert_eq!(stack.outcomes().await, ledger(&["mid_stream_error"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_502s_without_retry_after_are_failed_tries_spaced_by_back_off() {
    let stack = RoughStack::start(&[], &[("NEXUS_MODEL_BACKOFF_BASE_MS", "200")]);
    let down = json!({"kind": "status", "status": 502, "message": "Model down (stand-in)", "times": 2});
    let events = stack.run(Some(down)).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(2);
    phase.assert_first_retry_mentions("Model down (stand-in)");
    assert_eq!(
        phase.text_of_try(1) + &phase.text_of_try(2),
        "",
        "refused tries stream nothing"
    );
    assert_eq!(phase.waits(), 0, "no Retry-After: back-off, not a wait");
    let announced: Vec<u64> = phase.retries().iter().map(|r| r.retry_in_ms).collect();
    assert!(
        announced[0] <= 200 && announced[1] <= 400,
        "full jitter under the ceiling: {announced:?}"
    );
    let gaps = stack.gaps_ms().await;
    for (gap, delay) in gaps.iter().zip(&announced) {
        assert!(gap + 2 >= *delay, "retried {gap} ms after announcing {delay} ms");
    }
    assert_later_phases_clean(&events);
    assert_eq!(stack.outcomes().await, ledger(&["status 502", "status 502"]));
    // Each try encodes the request afresh: the stand-in read the same one three times.
    let prompts = stack.first_prompts(3).await;
    assert!(
        !prompts[0].0.is_empty(),
        "the first try carried its prompt: {prompts:?}"
    );
    assert!(
        prompts.iter().all(|p| *p == prompts[0]),
        "every try the same request: {prompts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alives_alone_trip_the_first_token_timeout_but_longer_reasoning_does_not() {
    // Every answer reasons for 900 ms, longer than the 600 ms first-token timeout: reasoning
    // is progress. The first call sends only keep-alive comments for 2.5 s: that is not.
    let stack = RoughStack::start(
        &["--reasoning-ms", "900"],
        &[("NEXUS_MODEL_FIRST_TOKEN_TIMEOUT_MS", "600")],
    );
    let slow = json!({"kind": "latency", "first_token_ms": 2500});
    let events = stack.run(Some(slow)).await;

    let phase = PhaseView::of(&events, FIRST);
    phase.assert_recovered_after(1);
    phase.assert_first_retry_mentions("first token");
    assert_eq!(phase.text_of_try(1), "");
    assert_later_phases_clean(&events);
    let reasoning = phase.completed().usage.expect("usage").reasoning_tokens;
    assert_eq!(reasoning, 18, "900 ms of reasoning, a delta every 50 ms");
    assert_eq!(stack.outcomes().await, ledger(&["client_disconnected"]));
}
