//! The whole workflow end to end: real Redis, orchestrator, workers and
//! stand-in model processes, driven through the public gRPC API.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{GetWorkflowRequest, ListWorkflowsRequest, PhaseStatus, StartWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const PHASES: [&str; 6] = [
    "analyse",
    "feedback",
    "enterprise_plan",
    "quality_review",
    "improve",
    "rate",
];

#[tokio::test(flavor = "multi_thread")]
async fn six_phases_complete_in_order_and_the_result_is_stored() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Furniture shop").await;

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;

    let cursors: Vec<_> = events.iter().map(|e| cursor_key(&e.cursor)).collect();
    assert!(
        cursors.windows(2).all(|pair| pair[0] < pair[1]),
        "cursors must increase: {cursors:?}"
    );
    assert!(events.iter().all(|e| e.workflow_id == id));
    assert_eq!(kind_name(&events[0]), "accepted");
    assert_eq!(
        kind_name(events.last().unwrap()),
        "completed",
        "stream ends with the terminal event"
    );
    let completed_phases: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::PhaseCompleted(done)) => Some(done.phase.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(completed_phases, PHASES, "each phase completes once, in order");
    for (index, phase) in PHASES.iter().enumerate() {
        let position = |kind: &str| {
            events
                .iter()
                .position(|e| kind_name(e) == kind && phase_of(e) == Some(index as u32))
        };
        let (started, delta, done) = (
            position("phase_started"),
            position("phase_output_delta"),
            position("phase_completed"),
        );
        assert!(
            started < delta && delta < done,
            "{phase}: started {started:?} < first delta {delta:?} < completed {done:?}"
        );
    }
    let Some(Kind::Completed(finished)) = &events.last().unwrap().kind else {
        unreachable!()
    };
    let rating = finished.rating.clone().expect("rating");
    assert!(
        (1..=10).contains(&rating.score) && !rating.reasons.is_empty(),
        "{rating:?}"
    );
    assert!(
        finished.final_plan.contains("stand-in"),
        "the stand-in's text says where it comes from"
    );

    let workflow = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(workflow.status(), WorkflowStatus::Completed);
    assert_eq!(workflow.final_plan, finished.final_plan);
    assert_eq!(workflow.rating, Some(rating));
    assert_eq!(workflow.phases.len(), 6);
    for phase in &workflow.phases {
        assert_eq!(phase.status(), PhaseStatus::Completed, "{}", phase.name);
        assert!(
            !phase.output.is_empty() && phase.usage.is_some_and(|u| u.completion_tokens > 0 && u.cost_usd > 0.0),
            "{phase:?}"
        );
    }
    assert_eq!(workflow.phases[0].model, "anthropic/claude-sonnet-4.5");
    assert_eq!(workflow.phases[1].model, "google/gemini-3-pro-preview");
    let total = workflow.total_usage.unwrap();
    let summed: f64 = workflow.phases.iter().map(|p| p.usage.unwrap().cost_usd).sum();
    assert!((total.cost_usd - summed).abs() < 1e-9 && total.cost_usd > 0.0);
    assert_eq!(finished.total_usage.unwrap().total_tokens, total.total_tokens);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_concurrent_workflows_and_run_each_phase_once() {
    let stack = Stack::start(2);
    let mut client = connect(&stack.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(start(&mut client, &format!("Plan {n}")).await);
    }
    let mut workers_seen = HashSet::new();
    for id in &ids {
        let events = watch_until_end(&mut client, id, "", Duration::from_secs(90)).await;
        assert_eq!(kind_name(events.last().unwrap()), "completed", "{id}");
        let completions = events.iter().filter(|e| kind_name(e) == "phase_completed").count();
        assert_eq!(completions, 6, "{id}: each phase recorded once");
        workers_seen.extend(events.iter().filter_map(|e| match &e.kind {
            Some(Kind::PhaseStarted(started)) => Some(started.worker.clone()),
            _ => None,
        }));
    }
    let model_calls = ModelControl::new(&stack.model.base_url()).requests().await;
    assert_eq!(
        model_calls.len(),
        8 * 6,
        "each phase of each workflow called the model exactly once"
    );
    let expected: HashSet<_> = stack.workers.iter().map(|w| w.name.clone()).collect();
    assert_eq!(workers_seen, expected, "both workers took tasks");
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_required_fails_the_workflow_with_the_providers_message() {
    let stack = Stack::start(1);
    let control = ModelControl::new(&stack.model.base_url());
    control
        .inject(serde_json::json!([{"kind": "status", "status": 402, "message": "Insufficient credits: add more at openrouter.ai/credits (stand-in)"}]))
        .await;
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Unfunded").await;

    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;

    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(
        workflow.reason.contains("Insufficient credits"),
        "reason carries the provider's message: {}",
        workflow.reason
    );
    assert!(
        workflow.reason.contains("analyse"),
        "reason names the phase: {}",
        workflow.reason
    );
    assert_eq!(control.requests().await.len(), 1, "402 is not retried");
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(5)).await;
    assert_eq!(kind_name(events.last().unwrap()), "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_call_waits_for_retry_after_then_the_run_completes() {
    let stack = Stack::start(1);
    let control = ModelControl::new(&stack.model.base_url());
    control.inject(serde_json::json!([{"kind": "status", "status": 429, "message": "Rate limited (stand-in)", "retry_after_secs": 1}])).await;
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Busy").await;

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;

    assert_eq!(kind_name(events.last().unwrap()), "completed");
    let waited = events
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::PhaseWaiting(waiting)) => Some(waiting.clone()),
            _ => None,
        })
        .expect("a phase_waiting event");
    assert_eq!(waited.phase, "analyse");
    assert!(waited.reason.contains("429"), "{}", waited.reason);
    // The witness of the wait is the stand-in's clock, not the announcement.
    let calls = control.requests().await;
    let gap = calls[1]["received_ms"].as_u64().unwrap() - calls[0]["received_ms"].as_u64().unwrap();
    assert!(
        gap >= 1000,
        "the stand-in saw the retry {gap} ms after a Retry-After of 1 s"
    );
    assert_eq!(calls.len(), 7, "six phases plus the refused call");
    assert!(
        !events.iter().any(|e| kind_name(e) == "phase_retrying"),
        "waiting out Retry-After is not a failed try"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let existing = start(&mut client, "Existing").await;
    wait_terminal(&mut client, &existing, Duration::from_secs(60)).await;
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let snapshot_before = redis_snapshot(&mut redis).await;

    let empty = StartWorkflowRequest {
        plan: Some(nexus_proto::v1::ProjectPlan {
            name: "x".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = client.start_workflow(empty).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("description"), "{}", status.message());

    let missing = client
        .start_workflow(StartWorkflowRequest::default())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(missing.message().contains("plan is required"), "{}", missing.message());

    let mut huge = sample_plan("Huge");
    huge.description = "x".repeat(64 * 1024 + 1);
    huge.fields.clear();
    let status = client
        .start_workflow(StartWorkflowRequest {
            plan: Some(huge),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("65537") && status.message().contains("65536"),
        "{}",
        status.message()
    );

    let malformed = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: "not-an-id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    assert!(malformed.message().contains("malformed"), "{}", malformed.message());

    let unknown_id = "wf_0_0192f5e3a1b27c3d8e9f001122334455".to_string();
    let unknown = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: unknown_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains(&unknown_id));
    let watch = nexus_proto::v1::WatchWorkflowRequest {
        workflow_id: unknown_id.clone(),
        after_cursor: String::new(),
        ..Default::default()
    };
    assert_eq!(
        client.watch_workflow(watch).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let cancel = nexus_proto::v1::CancelWorkflowRequest {
        workflow_id: unknown_id,
        reason: String::new(),
    };
    assert_eq!(
        client.cancel_workflow(cancel).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let bad_cursor = nexus_proto::v1::WatchWorkflowRequest {
        workflow_id: existing.clone(),
        after_cursor: "yesterday".into(),
        ..Default::default()
    };
    assert_eq!(
        client.watch_workflow(bad_cursor).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let bad_page = ListWorkflowsRequest {
        page_size: 1000,
        page_token: String::new(),
        ..Default::default()
    };
    assert_eq!(
        client.list_workflows(bad_page).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    assert_eq!(
        redis_snapshot(&mut redis).await,
        snapshot_before,
        "nothing stored changed"
    );
    let after = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: existing,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.status(), WorkflowStatus::Completed);
}

/// Every key with its type and size: enough to see any write.
async fn redis_snapshot(redis: &mut redis::aio::MultiplexedConnection) -> HashMap<String, String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("nexus:*").query_async(redis).await.unwrap();
    let mut snapshot = HashMap::new();
    for key in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&key).query_async(redis).await.unwrap();
        snapshot.insert(key, format!("{:?}", dump.map(|d| d.len())));
    }
    snapshot
}

#[tokio::test(flavor = "multi_thread")]
async fn same_idempotency_key_returns_the_same_workflow_and_starts_one_run() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let request = StartWorkflowRequest {
        plan: Some(sample_plan("Once")),
        idempotency_key: "order-7".into(),
        ..Default::default()
    };
    let first = client.start_workflow(request.clone()).await.unwrap().into_inner();
    let second = client.start_workflow(request.clone()).await.unwrap().into_inner();
    assert!(first.created && !second.created);
    assert_eq!(first.workflow_id, second.workflow_id);

    let mut other = request.clone();
    other.plan.as_mut().unwrap().description = "A different plan".into();
    let status = client.start_workflow(other).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains(&first.workflow_id), "{}", status.message());

    wait_terminal(&mut client, &first.workflow_id, Duration::from_secs(60)).await;
    let listed = client
        .list_workflows(ListWorkflowsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.workflows.len(), 1, "one run only");
    assert_eq!(ModelControl::new(&stack.model.base_url()).requests().await.len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_through_every_workflow_newest_first() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let mut started = Vec::new();
    for n in 0..5 {
        started.push(start(&mut client, &format!("Listed {n}")).await);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_workflows(ListWorkflowsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.workflows.len() <= 2);
        seen.extend(page.workflows.into_iter().map(|w| w.workflow_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    started.reverse();
    assert_eq!(seen, started);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unparsable_rating_is_retried_then_fails_the_workflow_with_a_clear_reason() {
    let stack = Stack::start(1);
    let control = ModelControl::new(&stack.model.base_url());
    let bad = serde_json::json!({"kind": "bad_json_output", "model": "google/gemini-3-pro-preview", "times": 3});
    control.inject(serde_json::json!([bad])).await;
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Unratable").await;

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;

    let retries: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::PhaseRetrying(retry)) if retry.phase == "rate" => Some(retry.reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(retries.len(), 2, "tries 1 and 2 failed and were retried: {retries:?}");
    let Some(Kind::Failed(failed)) = &events.last().unwrap().kind else {
        panic!("the workflow did not fail")
    };
    assert_eq!(failed.phase, "rate");
    assert!(
        failed.reason.contains("rating is not the expected JSON"),
        "{}",
        failed.reason
    );
    let structured: Vec<_> = control
        .requests()
        .await
        .into_iter()
        .filter(|r| r["structured"] == true)
        .collect();
    assert_eq!(
        structured.len(),
        3,
        "the rating phase asked for structured output three times"
    );
}

/// Subscribers of each workflow's notification channel, as Redis counts them.
async fn channel_subscribers(redis: &mut redis::aio::MultiplexedConnection, workflow_ids: &[&str]) -> Vec<i64> {
    let mut command = redis::cmd("PUBSUB");
    command.arg("NUMSUB");
    for id in workflow_ids {
        command.arg(format!("nexus:events:{id}"));
    }
    let reply: Vec<(String, i64)> = command.query_async(redis).await.unwrap();
    reply.into_iter().map(|(_, subscribers)| subscribers).collect()
}

/// An orchestrator hears only of the runs its clients watch: a run nobody
/// watches notifies no one, a watched run's channel has the orchestrator as
/// its subscriber while the watch lasts (and the watch is live through it),
/// and loses it after. Counted by Redis (`PUBSUB NUMSUB`), not by the
/// orchestrator.
#[tokio::test(flavor = "multi_thread")]
async fn an_orchestrator_subscribes_only_to_the_runs_its_clients_watch() {
    let stack = Stack::start_with(1, 1, SLOW_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let unwatched = start(&mut client, "Nobody watches this").await;
    let watched = start(&mut client, "Somebody watches this").await;
    assert_eq!(channel_subscribers(&mut redis, &[&unwatched, &watched]).await, [0, 0]);

    let mut stream = open_watch(&mut client, &watched, "").await;
    // Subscribed by the time the stream is open, before any event arrives.
    assert_eq!(
        channel_subscribers(&mut redis, &[&unwatched, &watched]).await,
        [0, 1],
        "subscribed to the watched run only"
    );
    let first = stream.message().await.unwrap().expect("the accepted event");
    assert_eq!(kind_name(&first), "accepted");
    // Live through the subscription: the slow model's phase completes after
    // the watch began, and its event arrives.
    let live = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.message().await.unwrap() {
            if kind_name(&event) == "phase_completed" {
                return event;
            }
        }
        panic!("the watch ended before a phase completed");
    })
    .await
    .expect("a live phase_completed event");
    assert_eq!(phase_of(&live), Some(0));

    drop(stream);
    let unsubscribed = tokio::time::timeout(Duration::from_secs(15), async {
        while channel_subscribers(&mut redis, &[&watched]).await != [0] {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(unsubscribed.is_ok(), "still subscribed 15 s after the watcher left");
}

/// A run nobody watches is not announced: its events are stored, but no
/// PUBLISH goes out for them. A watched run is announced from the moment
/// its watch opens, and the watch receives every stored event. Heard by a
/// subscriber of every run's channel, and compared with XRANGE.
#[tokio::test(flavor = "multi_thread")]
async fn only_watched_runs_are_announced_and_their_watch_misses_nothing() {
    use futures::StreamExt;
    // Answers stream over about 200 ms, so deltas are appended mid-call too.
    let model = [
        "--first-token-latency-ms",
        "20",
        "--tokens-per-second",
        "200",
        "--reply-words",
        "40",
    ];
    let stack = Stack::start_with(1, 1, &model);
    let mut client = connect(&stack.endpoint()).await;
    let mut notifications = stack.redis.client().get_async_pubsub().await.unwrap();
    notifications.psubscribe("nexus:events:*").await.unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let counting = heard.clone();
    let listener = tokio::spawn(async move {
        let mut messages = notifications.into_on_message();
        while let Some(message) = messages.next().await {
            let id: String = message.get_payload().unwrap();
            *counting.lock().unwrap().entry(id).or_default() += 1;
        }
    });

    let unwatched = start(&mut client, "Nobody watches this").await;
    let finished = wait_terminal(&mut client, &unwatched, Duration::from_secs(60)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed, "{}", finished.reason);
    let watched = start(&mut client, "Somebody watches this").await;
    let received = watch_until_end(&mut client, &watched, "", Duration::from_secs(60)).await;
    assert_eq!(received.last().map(kind_name), Some("completed"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    listener.abort();

    let unwatched_events = stored_events(&stack.redis.client(), &unwatched);
    let received: Vec<String> = received.iter().map(|event| event.cursor.clone()).collect();
    assert_eq!(
        received,
        stored_cursors(&stack.redis.client(), &watched),
        "the watch received exactly the stored events"
    );
    let heard = heard.lock().unwrap().clone();
    assert!(unwatched_events.len() > 12, "the unwatched run stored its events");
    assert_eq!(
        heard.get(&unwatched),
        None,
        "the unwatched run was announced: {heard:?}"
    );
    assert!(
        heard.get(&watched).copied().unwrap_or(0) > 6,
        "the watched run's phases were announced: {heard:?}"
    );
}

/// The watched mark is state in Redis, so a Redis restored from an older
/// AOF, or a replica promoted before the mark reached it, can lose it. An
/// orchestrator marks its watched runs again whenever its notification
/// connection comes back, so a watch whose mark was lost (deleted here by
/// hand, then the connection dropped) still hears the rest of the run.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_watched_mark_is_restored_when_notifications_reconnect() {
    // A second per phase: the run is still going well after the reconnect.
    let model = [
        "--first-token-latency-ms",
        "1000",
        "--tokens-per-second",
        "2000",
        "--reply-words",
        "10",
    ];
    let stack = Stack::start_with(1, 1, &model);
    let mut client = connect(&stack.endpoint()).await;
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let id = start(&mut client, "Lost mark").await;
    let state = format!("nexus:{{nx0}}:wf:{id}");
    let mark = redis::cmd("HGET").arg(&state).arg("watched").clone();
    let mut stream = open_watch(&mut client, &id, "").await;
    let marked: Option<String> = mark.query_async(&mut redis).await.unwrap();
    assert_eq!(marked.as_deref(), Some("1"), "opening the watch marked the run");

    let _: i64 = redis::cmd("HDEL")
        .arg(&state)
        .arg("watched")
        .query_async(&mut redis)
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(killed >= 1, "the orchestrator's notification connection dropped");
    let remarked = tokio::time::timeout(Duration::from_secs(10), async {
        while mark.query_async::<Option<String>>(&mut redis).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(remarked.is_ok(), "the run was not marked again after the reconnect");

    let mut received = Vec::new();
    let to_the_end = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.message().await.unwrap() {
            received.push(event.cursor);
        }
    })
    .await;
    assert!(to_the_end.is_ok(), "the watch stalled after the reconnect");
    let stored = stored_cursors(&stack.redis.client(), &id);
    assert_eq!(received, stored, "the watch received exactly the stored events");
}

/// An answer that streams in whole within the 100 ms coalescing window is
/// one delta event per phase, written with the result, even when the window
/// would have straddled it had it started with the call: the clock starts
/// at the first byte. The answers here begin 95 ms into the call and take
/// 10 to 20 ms (reasoning first, where the model reasons), so a beat from
/// the call's start splits them and a clock from their first byte has
/// 80 ms to spare. Counted in the event stream Redis holds; the deltas still
/// add up to each phase's stored output.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_streamed_within_the_flush_window_is_one_delta_event() {
    let model = [
        "--first-token-latency-ms",
        "95",
        "--tokens-per-second",
        "2000",
        "--reply-words",
        "20",
    ];
    let stack = Stack::start_with(1, 1, &model);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Coalesced deltas").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);

    let mut deltas: Vec<Vec<String>> = vec![Vec::new(); 6];
    for event in stored_events(&stack.redis.client(), &id) {
        if let Some(Kind::PhaseOutputDelta(delta)) = event.kind {
            deltas[delta.index as usize].push(delta.text);
        }
    }
    for (phase, pieces) in workflow.phases.iter().zip(&deltas) {
        assert_eq!(pieces.len(), 1, "{}: {} delta events", phase.name, pieces.len());
        assert_eq!(pieces.concat(), phase.output, "{}", phase.name);
    }
}

/// A phase costs Redis one script once the worker is busy: the script that
/// settles a phase (records it, queues the next, acknowledges) also claims
/// and starts the next task, and writes the last streamed reasoning and
/// answer text. Only a task taken by a read has a start script of its own.
/// Seen in Redis's MONITOR feed: for a six-phase run whose reasoning models
/// stream reasoning, 1 start script, 6 settle scripts, no event appended
/// by a script of its own. And inside the scripts, only the first phase's
/// start fences by reading the run's state and counts the start with a
/// command of its own: a settle that claims the next phase's task it has
/// just queued starts it from what it has already read and written. (Each
/// settle reads the state once to fence its result; heartbeats, which read
/// other fields, are not counted.)
#[tokio::test(flavor = "multi_thread")]
async fn a_phase_is_one_script_call_once_the_worker_is_busy() {
    use futures::StreamExt;
    let instant = [
        "--first-token-latency-ms",
        "0",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "20",
    ];
    let stack = Stack::start_with(1, 1, &instant);
    let mut client = connect(&stack.endpoint()).await;
    // A first run loads every script, so none is sent twice (NOSCRIPT) below.
    let warm_up = start(&mut client, "Loads the scripts").await;
    wait_terminal(&mut client, &warm_up, Duration::from_secs(60)).await;

    let monitor = stack.redis.client().get_async_monitor().await.unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let feed = tokio::spawn(async move {
        let mut messages = monitor.into_on_message::<String>();
        while let Some(line) = messages.next().await {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let id = start(&mut client, "Counted scripts").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    tokio::time::sleep(Duration::from_millis(300)).await;
    feed.abort();
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(10)).await;
    assert!(
        events.iter().any(|event| kind_name(event) == "phase_reasoning_delta"),
        "the stand-in's reasoning models stream reasoning"
    );

    let state_key = nexus_pipeline::keys::WorkflowKeys::new(&nexus_pipeline::ids::WorkflowId::parse(&id).unwrap())
        .state()
        .to_string();
    let (mut starts, mut settles, mut others) = (0, 0, Vec::new());
    let (mut settle_reads, mut start_reads, mut counted_starts) = (0, 0, 0);
    while let Ok(line) = lines.try_recv() {
        // `<time> [<db> <client>] "EVALSHA" "<sha>" "<keys>" "<first key>" ...`,
        // and for a call a script makes, `<time> [<db> lua] "HMGET" "<key>" ...`.
        let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).take(7).collect();
        match quoted.as_slice() {
            // The fence's reads: a settle's also reads the spend, a start's the budget.
            ["HMGET", key, "status", "phase", "attempt", "watched", "spent_usd", ..] if *key == state_key => {
                settle_reads += 1
            }
            ["HMGET", key, "status", "phase", "attempt", "watched", "budget_usd", ..] if *key == state_key => {
                start_reads += 1
            }
            ["HINCRBY", key, "starts", ..] if *key == state_key => counted_starts += 1,
            ["EVALSHA", _, "3", key, ..] if *key == state_key => starts += 1,
            ["EVALSHA", _, "5", key, ..] if key.ends_with(":tasks") => settles += 1,
            // An event appended on its own (create_workflow has 7 keys).
            ["EVALSHA", _, "2", key, ..] if *key == state_key => others.push(line.clone()),
            _ => {}
        }
    }
    assert_eq!(
        (starts, settles),
        (1, 6),
        "start and settle scripts; other writes: {others:?}"
    );
    assert!(others.is_empty(), "no write of its own for streamed text: {others:?}");
    assert_eq!(
        (settle_reads, start_reads, counted_starts),
        (6, 1, 1),
        "the fence's reads of the run's state by settles and by starts, and starts counted by HINCRBY"
    );
}

/// A run started while no worker runs, and its first task as queued.
struct QueuedRun {
    stack: Stack,
    client: Client,
    id: String,
    redis: redis::aio::MultiplexedConnection,
    entry_id: String,
    payload: Vec<u8>,
    task: nexus_proto::internal::PhaseTask,
}

impl QueuedRun {
    async fn start(name: &str) -> Self {
        use prost::Message;
        let stack = Stack::start(0);
        let mut client = connect(&stack.endpoint()).await;
        let id = start(&mut client, name).await;
        let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
        let mut tasks = shard0_task_entries(&mut redis).await;
        assert_eq!(tasks.len(), 1, "the run's first task waits in the stream");
        let (entry_id, payload) = tasks.remove(0);
        Self {
            entry_id,
            task: nexus_proto::internal::PhaseTask::decode(payload.as_slice()).unwrap(),
            payload,
            stack,
            client,
            id,
            redis,
        }
    }

    /// The pipeline snapshot the task names, as stored.
    async fn stored_pipeline(&mut self) -> nexus_proto::internal::PipelineSnapshot {
        use prost::Message;
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(format!("nexus:{{nx0}}:pipeline:{}", self.task.pipeline_id))
            .query_async(&mut self.redis)
            .await
            .unwrap();
        nexus_proto::internal::PipelineSnapshot::decode(stored.as_slice()).unwrap()
    }

    /// Starts a worker, waits for the run to complete and returns the
    /// stand-in's ledger of calls.
    async fn complete_with_a_worker(&mut self) -> Vec<serde_json::Value> {
        let stack = &mut self.stack;
        stack
            .workers
            .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &[]));
        let workflow = wait_terminal(&mut self.client, &self.id, Duration::from_secs(60)).await;
        assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
        ModelControl::new(&stack.model.base_url()).requests().await
    }
}

/// A queued task names its phase in the run's stored pipeline instead of
/// carrying the phase (prompts and all), so the stream, the AOF and every
/// claim carry a few dozen bytes per task; a worker started later runs the
/// phase with the stored prompts.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_task_names_its_phase_in_the_stored_pipeline_instead_of_carrying_it() {
    use prost::Message;
    let mut run = QueuedRun::start("Waits for a worker").await;
    let task = &run.task;
    assert_eq!(task.workflow_id, run.id);
    assert_eq!((task.phase_index, task.phase_name.as_str()), (0, "analyse"));
    assert_eq!(task.spec, None, "the task carries no phase");
    let pipeline = run.stored_pipeline().await;
    let analyse = &pipeline.phases[0];
    let size = run.payload.len();
    assert!(
        size < 256 && size * 2 < analyse.encoded_len(),
        "a task of {size} bytes for a phase of {}",
        analyse.encoded_len()
    );

    let requests = run.complete_with_a_worker().await;
    let first = &requests[0];
    let system = &analyse.system_prompt;
    let tail: String = system
        .chars()
        .skip(system.chars().count().saturating_sub(160))
        .collect();
    assert!(!tail.is_empty());
    assert_eq!(first["system_tail"], tail.as_str(), "the stored system prompt: {first}");
    let template_opening: String = analyse
        .prompt_template
        .split("{{")
        .next()
        .unwrap()
        .chars()
        .take(40)
        .collect();
    assert!(
        !template_opening.is_empty() && first["prompt_excerpt"].as_str().unwrap().starts_with(&template_opening),
        "the prompt is the stored template's: {first}"
    );
}

/// A task queued by a build whose tasks carried their phase (stream message
/// version 1) still runs after an upgrade, with the phase it carries.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_carries_its_phase_from_an_older_build_still_runs() {
    use nexus_proto::internal::PhaseTask;
    use prost::Message;
    let mut run = QueuedRun::start("Queued by an older build").await;
    let mut spec = run.stored_pipeline().await.phases[0].clone();
    spec.system_prompt = "CARRIED SYSTEM PROMPT".into();
    let old = PhaseTask {
        version: 1,
        spec: Some(Box::new(spec)),
        phase_name: String::new(),
        ..run.task.clone()
    };
    let _: () = redis::pipe()
        .cmd("XDEL")
        .arg("nexus:{nx0}:tasks")
        .arg(&run.entry_id)
        .ignore()
        .cmd("XADD")
        .arg("nexus:{nx0}:tasks")
        .arg("*")
        .arg("m")
        .arg(old.encode_to_vec())
        .ignore()
        .query_async(&mut run.redis)
        .await
        .unwrap();

    let requests = run.complete_with_a_worker().await;
    assert_eq!(requests.len(), 6);
    assert_eq!(
        requests[0]["system_tail"], "CARRIED SYSTEM PROMPT",
        "the first phase ran as the task carried it"
    );
}
