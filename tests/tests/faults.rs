//! Every guarantee of DESIGN.md under real failures: processes killed with
//! SIGKILL, Redis killed and restarted, tasks delivered twice.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{CancelWorkflowRequest, StartWorkflowRequest, WorkflowEvent, WorkflowStatus};
use nexus_tests::*;
use std::time::{Duration, Instant};

fn started_delivery(event: &WorkflowEvent) -> Option<(u32, u32)> {
    match &event.kind {
        Some(Kind::PhaseStarted(started)) => Some((started.index, started.delivery)),
        _ => None,
    }
}

fn completions_per_phase(events: &[WorkflowEvent]) -> Vec<usize> {
    (0..6)
        .map(|index| {
            events
                .iter()
                .filter(|e| kind_name(e) == "phase_completed" && phase_of(e) == Some(index))
                .count()
        })
        .collect()
}

fn analyse_calls(requests: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    requests
        .iter()
        .filter(|r| r["prompt_excerpt"].as_str().unwrap_or_default().starts_with("Analyse"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_phase_is_reclaimed_and_the_phase_is_recorded_once() {
    let mut stack = Stack::start_with(1, 1, SLOW_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Crash me").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_output_delta"
    })
    .await;

    stack.workers[0].process.kill_hard();
    stack
        .workers
        .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &[]));

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(90)).await;
    assert_eq!(kind_name(events.last().unwrap()), "completed");
    assert_eq!(
        completions_per_phase(&events),
        [1; 6],
        "each phase recorded exactly once"
    );
    let deliveries: Vec<_> = events
        .iter()
        .filter_map(started_delivery)
        .filter(|(index, _)| *index == 0)
        .collect();
    assert_eq!(
        deliveries,
        [(0, 1), (0, 2)],
        "analyse started, then was redelivered to the new worker"
    );
    let requests = ModelControl::new(&stack.model.base_url()).requests().await;
    let calls = analyse_calls(&requests);
    assert_eq!(calls.len(), 2, "the model log shows the retried call");
    assert_eq!(calls[0]["outcome"], "client_disconnected");
    assert_eq!(calls[1]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_phase_is_not_stolen_from_a_live_worker() {
    let slower = [
        "--first-token-latency-ms",
        "2500",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "10",
    ];
    let mut stack = Stack::start_with(1, 0, &slower);
    for _ in 0..2 {
        let env = [("NEXUS_VISIBILITY_TIMEOUT_MS", "1000")];
        stack
            .workers
            .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &env));
    }
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Slow but alive").await;
    let events = wait_for_event(&mut client, &id, Duration::from_secs(30), |e| {
        kind_name(e) == "phase_completed"
    })
    .await;
    assert!(
        events
            .iter()
            .filter_map(started_delivery)
            .all(|(_, delivery)| delivery == 1),
        "heartbeats kept the claim"
    );
    let requests = ModelControl::new(&stack.model.base_url()).requests().await;
    assert_eq!(
        analyse_calls(&requests).len(),
        1,
        "a 2.5 s phase with a 1 s visibility timeout ran once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_delivery_of_a_task_records_its_result_once() {
    let stack = Stack::start_with(1, 2, SLOW_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Twice").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_started"
    })
    .await;

    // Deliver the running task a second time, as a reclaim race would.
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let (_, payload) = shard0_task_entries(&mut redis).await.remove(0);
    let _: String = redis::cmd("XADD")
        .arg("nexus:{nx0}:tasks")
        .arg("*")
        .arg("m")
        .arg(payload)
        .query_async(&mut redis)
        .await
        .unwrap();

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(90)).await;
    assert_eq!(kind_name(events.last().unwrap()), "completed");
    assert_eq!(
        completions_per_phase(&events),
        [1; 6],
        "the duplicate's result changed nothing"
    );
    let requests = ModelControl::new(&stack.model.base_url()).requests().await;
    assert_eq!(
        analyse_calls(&requests).len(),
        2,
        "both deliveries really ran the model"
    );
    assert_eq!(requests.len(), 7, "the duplicate cost one call, and only that one");
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_task_goes_to_the_dead_letter_stream_and_fails_the_workflow() {
    let mut stack = Stack::start_with(1, 0, SLOW_MODEL);
    let env = [("NEXUS_VISIBILITY_TIMEOUT_MS", "800"), ("NEXUS_MAX_DELIVERIES", "2")];
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Poison").await;
    // The task kills every worker that takes it.
    for delivery in 1..=2u32 {
        stack
            .workers
            .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &env));
        wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
            started_delivery(e) == Some((0, delivery))
        })
        .await;
        stack.workers.last_mut().unwrap().process.kill_hard();
    }
    stack
        .workers
        .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &env));

    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(
        workflow.reason.contains("analyse") && workflow.reason.contains("dead-letter"),
        "{}",
        workflow.reason
    );
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let dead: usize = redis::cmd("XLEN")
        .arg("nexus:{nx0}:deadletter")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(dead, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_run_within_a_second_and_aborts_the_model_call() {
    let stack = Stack::start_with(
        1,
        1,
        &[
            "--first-token-latency-ms",
            "100",
            "--tokens-per-second",
            "5",
            "--reply-words",
            "100",
        ],
    );
    let control = ModelControl::new(&stack.model.base_url());
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Stop me").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_output_delta"
    })
    .await;

    let asked = Instant::now();
    let cancelled = client
        .cancel_workflow(CancelWorkflowRequest {
            workflow_id: id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status(), WorkflowStatus::Cancelled);
    let aborted = loop {
        let requests = control.requests().await;
        if requests[0]["outcome"] == "client_disconnected" {
            break asked.elapsed();
        }
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "model call not aborted: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        aborted < Duration::from_secs(1),
        "in-flight call aborted after {aborted:?}"
    );
    println!(
        "cancel: model call aborted {} ms after CancelWorkflow",
        aborted.as_millis()
    );

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(5)).await;
    let Some(Kind::Cancelled(event)) = &events.last().unwrap().kind else {
        panic!("last event is not cancelled")
    };
    assert_eq!(event.reason, "changed my mind");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(control.requests().await.len(), 1, "no phase ran after the cancel");
    let again = client
        .cancel_workflow(CancelWorkflowRequest {
            workflow_id: id,
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        again.into_inner().status(),
        WorkflowStatus::Cancelled,
        "cancelling twice is harmless"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_starts_with_one_idempotency_key_create_one_workflow() {
    let stack = Stack::start(1);
    let endpoint = stack.endpoint();
    let starts = (0..10).map(|_| {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut client = connect(&endpoint).await;
            let request = StartWorkflowRequest {
                plan: Some(sample_plan("Racy")),
                idempotency_key: "same-key".into(),
                ..Default::default()
            };
            client.start_workflow(request).await.unwrap().into_inner()
        })
    });
    let responses: Vec<_> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(responses.iter().filter(|r| r.created).count(), 1);
    assert!(responses.iter().all(|r| r.workflow_id == responses[0].workflow_id));
    let mut client = connect(&endpoint).await;
    wait_terminal(&mut client, &responses[0].workflow_id, Duration::from_secs(60)).await;
    let listed = client
        .list_workflows(nexus_proto::v1::ListWorkflowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workflows;
    assert_eq!(listed.len(), 1, "one workflow exists");
    let calls = ModelControl::new(&stack.model.base_url()).requests().await;
    assert_eq!(calls.len(), 6, "one run's six phases reached the model");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_resumes_from_a_cursor_on_another_replica_without_gap_or_duplicate() {
    let mut stack = Stack::start_with(2, 1, SLOW_MODEL);
    let mut first = connect(&stack.orchestrators[0].endpoint()).await;
    let id = start(&mut first, "Resume").await;
    let mut stream = first
        .watch_workflow(nexus_proto::v1::WatchWorkflowRequest {
            workflow_id: id.clone(),
            after_cursor: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Keep the stream open and cut it mid-run: the replica serving it dies
    // while the client reads.
    let mut held = Vec::new();
    let cut = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let phase_two_streaming = kind_name(&event) == "phase_output_delta" && phase_of(&event) == Some(1);
                held.push(event);
                if phase_two_streaming {
                    stack.orchestrators[0].process.kill_hard();
                }
            }
            Ok(None) => panic!("the stream ended before the replica was killed"),
            Err(status) => break status,
        }
    };
    assert!(stack.orchestrators.len() == 2 && !stack.orchestrators[0].process.is_running());
    eprintln!("stream cut after {} events: {}", held.len(), cut.code());

    let mut second = connect(&stack.orchestrators[1].endpoint()).await;
    let rest = watch_until_end(&mut second, &id, &held.last().unwrap().cursor, Duration::from_secs(90)).await;
    held.extend(rest);
    assert_eq!(kind_name(held.last().unwrap()), "completed");

    // The witness is Redis itself: the event stream as stored.
    let stored = stored_cursors(&stack.redis.client(), &id);
    let received: Vec<String> = held.iter().map(|e| e.cursor.clone()).collect();
    assert_eq!(
        received, stored,
        "what the client holds is the stored log: no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn orchestrator_killed_mid_run_leaves_the_other_replica_to_finish_and_restarts_cleanly() {
    let mut stack = Stack::start_with(2, 2, SLOW_MODEL);
    let mut first = connect(&stack.orchestrators[0].endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(start(&mut first, &format!("Replica {n}")).await);
    }
    wait_for_event(&mut first, &ids[0], Duration::from_secs(30), |e| {
        kind_name(e) == "phase_completed"
    })
    .await;
    stack.orchestrators[0].process.kill_hard();

    let mut second = connect(&stack.orchestrators[1].endpoint()).await;
    let halfway = wait_for_event(&mut second, &ids[0], Duration::from_secs(60), |e| {
        phase_of(e) == Some(3)
    })
    .await;
    assert!(!halfway.is_empty());
    stack.orchestrators[0] = Orchestrator::start(&stack.redis.url(), &[]);
    let mut restarted = connect(&stack.orchestrators[0].endpoint()).await;
    for id in &ids {
        let workflow = wait_terminal(&mut restarted, id, Duration::from_secs(90)).await;
        assert_eq!(workflow.status(), WorkflowStatus::Completed, "{id}");
        let events = watch_until_end(&mut second, id, "", Duration::from_secs(10)).await;
        assert_eq!(completions_per_phase(&events), [1; 6], "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted_mid_run_loses_no_accepted_workflow() {
    let mut stack = Stack::start_with(1, 2, SLOW_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(start(&mut client, &format!("Durable {n}")).await);
    }
    wait_for_event(&mut client, &ids[0], Duration::from_secs(30), |e| {
        kind_name(e) == "phase_completed"
    })
    .await;

    stack.redis.kill_hard();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.redis.restart();

    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    for id in &ids {
        let events = watch_until_end(&mut client, id, "", Duration::from_secs(10)).await;
        assert_eq!(completions_per_phase(&events), [1; 6], "{id}");
    }
    assert!(stack.orchestrators[0].process.is_running() && stack.workers.iter_mut().all(|w| w.process.is_running()));
}

/// Redis forgetting its scripts (`SCRIPT FLUSH`, as a restart without the
/// AOF or a failover to a fresh replica does) mid-run: every script call is
/// refused with NOSCRIPT once, loaded again and sent again, and the runs
/// end with each phase recorded once.
#[tokio::test(flavor = "multi_thread")]
async fn scripts_flushed_from_redis_mid_run_are_loaded_again() {
    let stack = Stack::start_with(1, 1, SLOW_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let ids = [
        start(&mut client, "Flushed 1").await,
        start(&mut client, "Flushed 2").await,
    ];
    wait_for_event(&mut client, &ids[0], Duration::from_secs(30), |e| {
        kind_name(e) == "phase_completed"
    })
    .await;
    let mut redis = stack.redis.client().get_multiplexed_async_connection().await.unwrap();
    let flushed: String = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut redis).await.unwrap();
    assert_eq!(flushed, "OK");

    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    for id in &ids {
        let events = stored_events(&stack.redis.client(), id);
        assert_eq!(completions_per_phase(&events), [1; 6], "{id}");
    }
}

/// A task that was handed to workers which died before starting it (a new
/// worker takes over a batch of abandoned tasks and is killed at once, as
/// the soak test does) is not poison: it is run, not dead-lettered. The
/// test plays those workers itself: it claims the task six times by hand,
/// never starting it, then lets a real worker take it over.
#[tokio::test(flavor = "multi_thread")]
async fn takeovers_by_workers_that_never_started_a_task_do_not_make_it_poison() {
    let stack = Stack::start_with(1, 0, FAST_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Churned").await;
    let mut redis = stack.redis.client().get_connection().unwrap();
    let stream = "nexus:{nx0}:tasks";
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg(&["CREATE", stream, "workers", "0", "MKSTREAM"])
        .query(&mut redis);
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "workers", "ghost-0", "COUNT", "1", "STREAMS", stream, ">"])
        .query(&mut redis)
        .unwrap();
    let entry = read.keys[0].ids[0].id.clone();
    for ghost in 1..=6 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(&[
                stream,
                "workers",
                format!("ghost-{ghost}").as_str(),
                "0",
                entry.as_str(),
            ])
            .query(&mut redis)
            .unwrap();
    }
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&[stream, "workers", "-", "+", "10"])
        .query(&mut redis)
        .unwrap();
    assert_eq!(pending[0].3, 7, "delivered seven times, started never");

    let _worker = Worker::start(
        &stack.redis.url(),
        &stack.model.base_url(),
        &[("NEXUS_VISIBILITY_TIMEOUT_MS", "1000")],
    );
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    let calls = ModelControl::new(&stack.model.base_url()).requests().await.len();
    assert_eq!(calls, 6, "each phase called once");
}
