//! The model client's promises, checked end to end against the stand-in model served in-process
//! on an ephemeral port. Failures are scripted through the stand-in's control API, and its
//! request log shows how many HTTP requests each call really made.

use std::future::Future;
use std::time::{Duration, Instant};

use phase_worker::model::{
    ChatMessage, ChatRequest, Completion, ModelClient, ModelClientConfig, ModelError, ModelEvent, OutputValidator,
    TimeoutKind, event_channel, install_crypto_provider,
};
use serde_json::{Value, json};
use stand_in_model::StandInConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const FAKE_KEY: &str = "sk-or-TESTSECRET";

/// A stand-in model for one test; aborted on drop.
struct StandIn {
    base_url: String,
    control: reqwest::Client,
    server: JoinHandle<std::io::Result<()>>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl StandIn {
    async fn start() -> Self {
        Self::start_with(quick()).await
    }

    /// A stand-in with rough framing whose replies reason for `reasoning` first.
    async fn start_rough(reasoning: Duration) -> Self {
        Self::start_with(StandInConfig {
            rough: true,
            reasoning,
            ..quick()
        })
        .await
    }

    async fn start_with(config: StandInConfig) -> Self {
        install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(stand_in_model::serve(listener, config));
        Self {
            base_url,
            control: reqwest::Client::new(),
            server,
        }
    }

    async fn queue_faults(&self, faults: Value) {
        let url = format!("{}/_stand-in/faults", self.base_url);
        let response = self.control.post(url).json(&faults).send().await.unwrap();
        assert!(response.status().is_success(), "faults not accepted");
    }

    async fn requests(&self) -> Vec<Value> {
        let url = format!("{}/_stand-in/requests", self.base_url);
        let response = self.control.get(url).send().await.unwrap();
        response.json().await.unwrap()
    }

    async fn outcomes(&self) -> Vec<String> {
        let requests = self.requests().await;
        let outcome = |r: &Value| r["outcome"].as_str().unwrap_or_default().to_owned();
        requests.iter().map(outcome).collect()
    }

    /// Milliseconds between consecutive requests, as the stand-in saw them.
    async fn gaps_ms(&self) -> Vec<u64> {
        let received: Vec<u64> = self
            .requests()
            .await
            .iter()
            .map(|r| r["received_ms"].as_u64().expect("received_ms"))
            .collect();
        received.windows(2).map(|pair| pair[1] - pair[0]).collect()
    }

    fn client(&self) -> ModelClient {
        self.client_with(|_| {})
    }

    fn client_with(&self, adjust: impl FnOnce(&mut ModelClientConfig)) -> ModelClient {
        let mut config = ModelClientConfig {
            base_url: self.base_url.clone(),
            api_key: Some(FAKE_KEY.into()),
            app_title: Some("Nexus tests".into()),
            first_token_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(20),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            ..ModelClientConfig::default()
        };
        adjust(&mut config);
        ModelClient::new(config).unwrap()
    }
}

/// Short unpaced replies after a 5 ms wait, smooth framing, no reasoning.
fn quick() -> StandInConfig {
    StandInConfig {
        first_token_latency: Duration::from_millis(5),
        tokens_per_second: 0.0,
        reply_words: 12,
        keepalive_comments: true,
        ..StandInConfig::default()
    }
}

fn ask(model: &str, prompt: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![
            ChatMessage::new("system", "You are a careful analyst."),
            ChatMessage::new("user", prompt),
        ],
        ..ChatRequest::default()
    }
}

fn ask_for_score(prompt: &str) -> ChatRequest {
    let schema = json!({"type": "object", "properties": {"score": {"type": "integer"}}});
    ChatRequest {
        response_format: Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "verdict", "strict": true, "schema": schema},
        })),
        ..ask("google/gemini-test", prompt)
    }
}

/// One finished call with every event it reported.
struct Call {
    result: Result<Completion, ModelError>,
    events: Vec<ModelEvent>,
}

impl Call {
    fn completion(&self) -> &Completion {
        self.result.as_ref().expect("call succeeded")
    }

    fn error(&self) -> &ModelError {
        self.result.as_ref().expect_err("call failed")
    }

    fn text_of_try(&self, wanted: u32) -> String {
        let delta = |event: &ModelEvent| match event {
            ModelEvent::Delta { try_number, text } if *try_number == wanted => Some(text.clone()),
            _ => None,
        };
        self.events.iter().filter_map(delta).collect()
    }

    fn waits(&self) -> Vec<(String, Duration)> {
        let wait = |event: &ModelEvent| match event {
            ModelEvent::Waiting(notice) => Some((notice.reason.clone(), notice.wait)),
            _ => None,
        };
        self.events.iter().filter_map(wait).collect()
    }

    fn retries(&self) -> Vec<(String, Duration)> {
        let retry = |event: &ModelEvent| match event {
            ModelEvent::Retrying(notice) => Some((notice.reason.clone(), notice.delay)),
            ModelEvent::Delta { .. }
            | ModelEvent::Reasoning { .. }
            | ModelEvent::FellBack(_)
            | ModelEvent::Waiting(_) => None,
        };
        self.events.iter().filter_map(retry).collect()
    }
}

async fn call(client: &ModelClient, request: &ChatRequest, validator: Option<&OutputValidator>) -> Call {
    call_with_cancel(client, request, validator, &CancellationToken::new()).await
}

/// A small channel and a separate reader, as the worker will have.
async fn call_with_cancel(
    client: &ModelClient,
    request: &ChatRequest,
    validator: Option<&OutputValidator>,
    cancel: &CancellationToken,
) -> Call {
    let (sender, receiver) = event_channel(4);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Ok(event) = receiver.recv_async().await {
            events.push(event);
        }
        events
    });
    let result = client.complete(request, validator, &sender, cancel).await;
    drop(sender);
    Call {
        result,
        events: collector.await.unwrap(),
    }
}

async fn eventually<F: Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    for _ in 0..50 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    false
}

#[tokio::test]
async fn streamed_reply_arrives_as_deltas_with_usage_and_cost_from_the_last_chunk() {
    let stand_in = StandIn::start().await;
    let request = ask("anthropic/claude-test", "summarise the quarterly figures");
    let call = call(&stand_in.client(), &request, None).await;

    let completion = call.completion();
    assert!(completion.text.starts_with("[stand-in model for anthropic/claude-test"));
    assert!(completion.text.contains("quarterly"));
    assert_eq!(call.text_of_try(1), completion.text);
    assert_eq!(completion.tries, 1);
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
    assert!(completion.generation_id.as_deref().unwrap().starts_with("gen-standin-"));

    // The stand-in streams one word per chunk and counts chunks as tokens;
    // the client forwards what each read of the body brought as one event.
    let usage = &completion.usage;
    assert_eq!(
        usage.completion_tokens,
        completion.text.split_whitespace().count() as u64
    );
    assert!((1..=usage.completion_tokens).contains(&(call.events.len() as u64)));
    // This stand-in writes its whole answer at once: one read, one event (or
    // two, should the read be split), not one per chunk.
    assert!(
        call.events.len() <= 2,
        "{} events for {} chunks",
        call.events.len(),
        usage.completion_tokens
    );
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
    let expected_cost = (usage.prompt_tokens as f64 * 3.0 + usage.completion_tokens as f64 * 15.0) / 1e6;
    assert!((usage.cost_usd - expected_cost).abs() < 1e-12);
    assert_eq!(stand_in.outcomes().await, ["ok"]);
}

#[tokio::test]
async fn keepalive_comments_are_skipped_and_keep_a_slow_start_from_looking_idle() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "latency", "first_token_ms": 1500}]))
        .await;
    let client = stand_in.client_with(|c| c.idle_timeout = Duration::from_millis(1200));
    let call = call(&client, &ask("m/slow", "take your time"), None).await;

    let completion = call.completion();
    assert_eq!(completion.tries, 1);
    assert!(!completion.text.contains("OPENROUTER"));
    assert!(completion.text.starts_with("[stand-in model"));
}

#[tokio::test]
async fn keepalive_comments_do_not_count_as_the_first_token() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "latency", "first_token_ms": 3000}]))
        .await;
    let client = stand_in.client_with(|c| {
        c.first_token_timeout = Duration::from_millis(300);
        c.max_tries = 1;
    });
    let call = call(&client, &ask("m/slow", "hello"), None).await;

    let ModelError::Exhausted { tries: 1, last } = call.error() else {
        panic!("expected exhaustion, got {}", call.error());
    };
    let first_token = TimeoutKind::FirstToken;
    assert!(matches!(**last, ModelError::Timeout { which, .. } if which == first_token));
}

#[tokio::test]
async fn a_rough_stream_completes_with_exactly_the_text_of_a_smooth_one() {
    let smooth = StandIn::start().await;
    let rough = StandIn::start_rough(Duration::from_millis(200)).await;
    let request = ask(
        "anthropic/claude-test",
        "summarise the quarterly figures — in € and in ¥",
    );
    let expected = call(&smooth.client(), &request, None).await;
    let call = call(&rough.client(), &request, None).await;

    let completion = call.completion();
    assert_eq!(completion.text, expected.completion().text);
    assert_eq!(call.text_of_try(1), completion.text);
    assert_eq!(completion.tries, 1);
    assert!(!completion.text.contains("reasoning"), "{}", completion.text);
    let usage = &completion.usage;
    assert_eq!(usage.reasoning_tokens, 4, "200 ms of reasoning, a delta every 50 ms");
    let words = expected.completion().usage.completion_tokens;
    assert_eq!(usage.completion_tokens, words + usage.reasoning_tokens);
    assert_eq!(rough.outcomes().await, ["ok"]);
}

#[tokio::test]
async fn reasoning_for_longer_than_the_first_token_timeout_does_not_trip_it() {
    let stand_in = StandIn::start_rough(Duration::from_millis(1200)).await;
    let client = stand_in.client_with(|c| {
        c.first_token_timeout = Duration::from_millis(400);
        c.idle_timeout = Duration::from_millis(400);
        c.max_tries = 1;
    });
    let call = call(&client, &ask("m/thinker", "think hard"), None).await;

    let completion = call.completion();
    assert_eq!(completion.tries, 1);
    assert!(completion.text.starts_with("[stand-in model for m/thinker"));
    assert_eq!(completion.usage.reasoning_tokens, 24);
}

#[tokio::test]
async fn a_model_silent_after_its_reasoning_is_caught_by_the_idle_timeout() {
    let stand_in = StandIn::start_rough(Duration::from_millis(300)).await;
    stand_in
        .queue_faults(json!([{"kind": "stall", "after_words": 0, "secs": 30}]))
        .await;
    let client = stand_in.client_with(|c| {
        c.first_token_timeout = Duration::from_secs(10);
        c.idle_timeout = Duration::from_millis(400);
    });
    let started = Instant::now();
    let call = call(&client, &ask("m/thinker", "think, then stall"), None).await;

    assert_eq!(call.completion().tries, 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(call.retries()[0].0.contains("stalled"), "{:?}", call.retries());
    assert_eq!(call.text_of_try(1), "", "reasoning is never answer text");
}

#[tokio::test]
async fn payment_required_fails_fast_after_one_request_with_the_provider_message() {
    let stand_in = StandIn::start().await;
    let message = "Insufficient credits (stand-in)";
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 402, "message": message}]))
        .await;
    let call = call(&stand_in.client(), &ask("m/a", "hello"), None).await;

    assert!(matches!(call.error(), ModelError::Rejected { status: 402, .. }));
    assert!(call.error().to_string().contains(message));
    assert!(call.retries().is_empty());
    assert_eq!(stand_in.outcomes().await, ["status 402"]);
}

#[tokio::test]
async fn retry_after_waits_are_not_tries_so_four_429s_still_complete() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 429, "times": 4,
                              "message": "Rate limited", "retry_after_secs": 0.3}]))
        .await;
    let call = call(&stand_in.client(), &ask("m/a", "hello"), None).await;

    assert_eq!(
        call.completion().tries,
        1,
        "waiting out Retry-After is not a failed try"
    );
    assert!(call.retries().is_empty());
    let waits = call.waits();
    assert_eq!(waits.len(), 4);
    assert!(
        waits
            .iter()
            .all(|(reason, wait)| reason.contains("429") && *wait >= Duration::from_millis(300))
    );
    let gaps = stand_in.gaps_ms().await;
    assert!(
        gaps.iter().all(|gap| *gap >= 290),
        "gaps between calls at the stand-in: {gaps:?}"
    );
    assert_eq!(
        stand_in.outcomes().await,
        ["status 429", "status 429", "status 429", "status 429", "ok"]
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 503, "retry_after_secs": 2,
                              "retry_after_http_date": true}]))
        .await;
    let call = call(&stand_in.client(), &ask("m/a", "hello"), None).await;

    call.completion();
    // An HTTP-date has whole seconds: "now + 2 s" is between 1 and 2 s away.
    let gaps = stand_in.gaps_ms().await;
    assert_eq!(gaps.len(), 1);
    assert!((900..2500).contains(&gaps[0]), "gap at the stand-in {} ms", gaps[0]);
}

#[tokio::test]
async fn waits_past_the_wait_budget_fail_with_a_clear_reason() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 429, "times": 10, "retry_after_secs": 0.4}]))
        .await;
    let client = stand_in.client_with(|config| config.max_total_wait = Duration::from_secs(1));
    let call = call(&client, &ask("m/a", "hello"), None).await;

    let error = call.error().to_string();
    assert!(error.contains("waited") && error.contains("limit"), "{error}");
    assert_eq!(
        stand_in.outcomes().await.len(),
        3,
        "0.4 s + 0.4 s fit in 1 s, a third wait does not"
    );
}

#[tokio::test]
async fn truncated_answers_are_failed_tries_unless_accepted() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "truncated", "after_words": 3, "times": 3}]))
        .await;
    let cut = call(&stand_in.client(), &ask("m/a", "hello"), None).await;
    let error = cut.error().to_string();
    assert!(error.contains("cut short") && error.contains("length"), "{error}");
    assert_eq!(stand_in.outcomes().await.len(), 3);

    stand_in
        .queue_faults(json!([{"kind": "truncated", "after_words": 3, "finish_reason": "content_filter"}]))
        .await;
    let accepting = ChatRequest {
        accept_truncated: true,
        reasoning_effort: None,
        ..ask("m/a", "hello")
    };
    let accepted = call(&stand_in.client(), &accepting, None).await;
    assert_eq!(accepted.completion().finish_reason.as_deref(), Some("content_filter"));
    assert_eq!(accepted.completion().tries, 1);
}

#[tokio::test]
async fn mid_stream_error_fails_the_try_and_only_the_retry_text_is_returned() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "mid_stream_error", "after_words": 3,
                              "code": 502, "message": "Provider disconnected"}]))
        .await;
    let call = call(&stand_in.client(), &ask("m/a", "explain the error"), None).await;

    let completion = call.completion();
    assert_eq!(completion.tries, 2);
    let partial = call.text_of_try(1);
    assert!(!partial.is_empty());
    assert_eq!(completion.text, call.text_of_try(2));
    assert!(completion.text.starts_with(&partial));
    assert_ne!(completion.text, partial);
    assert!(call.retries()[0].0.contains("Provider disconnected"));
    assert_eq!(stand_in.outcomes().await, ["mid_stream_error", "ok"]);
}

#[tokio::test]
async fn malformed_chunk_fails_the_try_and_is_retried() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "malformed", "after_words": 2}]))
        .await;
    let call = call(&stand_in.client(), &ask("m/a", "hello"), None).await;

    assert_eq!(call.completion().tries, 2);
    assert!(call.retries()[0].0.contains("malformed stream"));
    assert_eq!(stand_in.outcomes().await, ["malformed", "ok"]);
}

#[tokio::test]
async fn stall_beyond_idle_timeout_is_retried_and_the_stalled_request_is_abandoned() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "stall", "after_words": 3, "secs": 30}]))
        .await;
    let client = stand_in.client_with(|c| c.idle_timeout = Duration::from_millis(300));
    let started = Instant::now();
    let call = call(&client, &ask("m/a", "hello"), None).await;

    assert_eq!(call.completion().tries, 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(call.retries()[0].0.contains("stalled"));
    let abandoned = || async { stand_in.outcomes().await == ["client_disconnected", "ok"] };
    assert!(eventually(abandoned).await, "{:?}", stand_in.outcomes().await);
}

#[tokio::test]
async fn three_502s_in_a_row_exhaust_after_exactly_max_tries_requests() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 502,
                              "message": "Model down", "times": 3}]))
        .await;
    let client = stand_in.client_with(|c| c.max_tries = 3);
    let call = call(&client, &ask("m/a", "hello"), None).await;

    let ModelError::Exhausted { tries: 3, last } = call.error() else {
        panic!("expected exhaustion after 3 tries, got {}", call.error());
    };
    assert!(matches!(**last, ModelError::Status { status: 502, .. }));
    assert!(call.error().to_string().contains("Model down"));
    assert_eq!(call.retries().len(), 2);
    assert_eq!(stand_in.requests().await.len(), 3);
}

#[tokio::test]
async fn cancel_aborts_an_in_flight_call_within_200ms() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "latency", "first_token_ms": 10000}]))
        .await;
    let client = stand_in.client();
    let cancel = CancellationToken::new();
    let running = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let call = call_with_cancel(&client, &ask("m/a", "hello"), None, &cancel).await;
            (call.result, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let (result, returned_at) = running.await.unwrap();

    assert!(matches!(result, Err(ModelError::Cancelled)));
    assert!(returned_at - cancelled_at < Duration::from_millis(200));
    let abandoned = || async { stand_in.outcomes().await == ["client_disconnected"] };
    assert!(eventually(abandoned).await);
}

#[tokio::test]
async fn structured_output_rejected_by_the_validator_is_retried_until_it_passes() {
    let stand_in = StandIn::start().await;
    stand_in.queue_faults(json!([{"kind": "bad_json_output"}])).await;
    let validator = |text: &str| -> Result<(), String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let score = value["score"].as_u64().ok_or("no score")?;
        (1..=10)
            .contains(&score)
            .then_some(())
            .ok_or("score out of range".into())
    };
    let call = call(&stand_in.client(), &ask_for_score("rate this plan"), Some(&validator)).await;

    let completion = call.completion();
    assert_eq!(completion.tries, 2);
    assert!(call.text_of_try(1).contains("not json"));
    assert!(call.retries()[0].0.contains("model output rejected"));
    let verdict: Value = serde_json::from_str(&completion.text).unwrap();
    assert!(verdict["reasons"][0].as_str().unwrap().contains("stand-in"));
    let structured = stand_in.requests().await.iter().all(|r| r["structured"] == true);
    assert!(structured);
}

#[tokio::test]
async fn api_key_never_appears_in_error_messages() {
    let stand_in = StandIn::start().await;
    stand_in
        .queue_faults(json!([{"kind": "status", "status": 401, "message": "Invalid API key", "echo_key": true}]))
        .await;
    let client = stand_in.client();
    let rejected = call(&client, &ask("m/a", "hello"), None).await;
    assert!(matches!(rejected.error(), ModelError::Rejected { status: 401, .. }));

    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = stand_in.client_with(|c| {
        c.base_url = format!("http://127.0.0.1:{closed_port}/?api_key={FAKE_KEY}");
        c.max_tries = 1;
    });
    let refused = call(&unreachable, &ask("m/a", "hello"), None).await;
    assert!(matches!(refused.error(), ModelError::Exhausted { .. }));

    for text in [
        rejected.error().to_string(),
        format!("{:?}", rejected.error()),
        refused.error().to_string(),
        format!("{:?}", refused.error()),
        format!("{client:?}"),
        format!("{:?}", unreachable),
    ] {
        assert!(!text.contains("TESTSECRET"), "key leaked in: {text}");
    }
}

#[tokio::test]
async fn missing_api_key_is_rejected_by_the_server_without_retrying() {
    let stand_in = StandIn::start().await;
    let client = stand_in.client_with(|c| c.api_key = None);
    let call = call(&client, &ask("m/a", "hello"), None).await;

    assert!(matches!(call.error(), ModelError::Rejected { status: 401, .. }));
    assert!(call.error().to_string().contains("No auth credentials found"));
    assert_eq!(stand_in.requests().await.len(), 1);
}
