//! Promises that must hold when clients retry and reconnect and providers
//! push back. Each test is witnessed from outside the system: the stand-in's
//! ledger of calls (and when it saw them), Redis itself, the client's own
//! stream, the processes' logs and exit codes.

use nexus_proto::v1::{
    CancelWorkflowRequest, ListWorkflowsRequest, ProjectPlan, StartWorkflowRequest, WatchWorkflowRequest,
    WorkflowStatus,
};
use nexus_tests::*;
use std::time::{Duration, Instant};

fn redis_conn(redis: &RedisServer) -> redis::Connection {
    redis.client().get_connection().expect("redis connection")
}

fn plan_with_fields(fields: &[(&str, &str)]) -> ProjectPlan {
    ProjectPlan {
        fields: fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..sample_plan("Fields")
    }
}

/// Workflow state hashes in Redis, found by SCAN (not by asking Nexus).
fn stored_workflows(conn: &mut redis::Connection) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("nexus:*:wf:*").query(conn).unwrap();
    keys.into_iter()
        .filter(|key| !key.ends_with(":events") && !key.ends_with(":outputs"))
        .collect()
}

/// How many entries of a stream's group are delivered and not acknowledged.
fn pending_count(conn: &mut redis::Connection, stream: &str, group: &str) -> u64 {
    let summary: Vec<redis::Value> = redis::cmd("XPENDING").arg(stream).arg(group).query(conn).unwrap();
    match summary.first() {
        Some(redis::Value::Int(count)) => *count as u64,
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

fn xlen(conn: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query(conn).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_retries_with_structured_fields_return_one_workflow() {
    let stack = Stack::start(0);
    let mut client = connect(&stack.endpoint()).await;
    let fields = [
        ("budget", "120k"),
        ("team", "4"),
        ("timeline", "6 months"),
        ("goal", "launch"),
    ];
    let mut ids = Vec::new();
    for _ in 0..20 {
        let request = StartWorkflowRequest {
            plan: Some(plan_with_fields(&fields)),
            idempotency_key: "retry-after-timeout".into(),
            ..Default::default()
        };
        let response = client.start_workflow(request).await.expect("every retry is accepted");
        ids.push(response.into_inner());
    }
    assert_eq!(ids.iter().filter(|r| r.created).count(), 1);
    assert!(ids.iter().all(|r| r.workflow_id == ids[0].workflow_id));
    assert_eq!(
        stored_workflows(&mut redis_conn(&stack.redis)).len(),
        1,
        "Redis holds one workflow"
    );

    let other = StartWorkflowRequest {
        plan: Some(plan_with_fields(&[("budget", "999k")])),
        idempotency_key: "retry-after-timeout".into(),
        ..Default::default()
    };
    let status = client.start_workflow(other).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_resumed_at_or_past_the_end_ends_at_once_and_gone_workflows_are_not_found() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "1", "--reply-words", "5"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_RETENTION_SECS", "3")]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Reconnect").await;
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(30)).await;
    let terminal = events.last().expect("events").cursor.clone();
    assert_eq!(kind_name(events.last().unwrap()), "completed");

    let (ms, _) = cursor_key(&terminal);
    for cursor in [terminal.clone(), format!("{}-0", ms + 60_000)] {
        let started = Instant::now();
        let resumed = watch_until_end(&mut client, &id, &cursor, Duration::from_secs(10)).await;
        assert!(resumed.is_empty(), "nothing after {cursor}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the stream ended at once after {cursor}"
        );
    }

    let started = Instant::now();
    let request = WatchWorkflowRequest {
        workflow_id: id.clone(),
        after_cursor: "99999999999999999999-0".into(),
        ..Default::default()
    };
    let status = client.watch_workflow(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(started.elapsed() < Duration::from_secs(1));

    // Retention (3 s here) removes the keys: a watch is then NOT_FOUND.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stored_workflows(&mut redis_conn(&redis)).is_empty() {
        assert!(Instant::now() < deadline, "the workflow never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let request = WatchWorkflowRequest {
        workflow_id: id.clone(),
        after_cursor: terminal,
        ..Default::default()
    };
    let status = client.watch_workflow(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn four_retry_afters_in_a_row_are_waited_out_not_counted_as_tries() {
    let stack = Stack::start(1);
    let control = ModelControl::new(&stack.model.base_url());
    control
        .inject(serde_json::json!([{"kind": "status", "status": 429, "times": 4, "retry_after_secs": 1}]))
        .await;
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Push back").await;
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;

    assert_eq!(kind_name(events.last().unwrap()), "completed");
    let waits = events.iter().filter(|e| kind_name(e) == "phase_waiting").count();
    assert_eq!(waits, 4, "each wait is an event");
    let requests = control.requests().await;
    let outcomes: Vec<&str> = requests.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        &outcomes[..5],
        ["status 429"; 4].iter().copied().chain(["ok"]).collect::<Vec<_>>()
    );
    for pair in requests[..5].windows(2) {
        let gap = pair[1]["received_ms"].as_u64().unwrap() - pair[0]["received_ms"].as_u64().unwrap();
        assert!(
            gap >= 990,
            "the stand-in saw a call {gap} ms after a Retry-After of 1 s"
        );
    }
    assert_eq!(requests.len(), 10, "six phases and four refusals: {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_redis_down_exits_within_the_deadline_and_logs_sparingly() {
    let mut redis = RedisServer::start();
    let mut orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_SHUTDOWN_GRACE_MS", "2000")]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Watched").await;
    let mut watch = client
        .watch_workflow(WatchWorkflowRequest {
            workflow_id: id,
            after_cursor: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the accepted event");

    redis.kill_hard();
    std::thread::sleep(Duration::from_secs(3));
    let signalled = Instant::now();
    orchestrator.process.signal("TERM");
    assert!(
        orchestrator.process.wait_exit(Duration::from_secs(6)),
        "still running 6 s after SIGTERM"
    );
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(5), "exited {took:?} after SIGTERM");
    // The stream ends with UNAVAILABLE, the code that tells a client to
    // resume elsewhere, not with a transport error.
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
    assert!(
        matches!(&ended, Ok(Err(status)) if status.code() == tonic::Code::Unavailable),
        "the watch stream ended with UNAVAILABLE: {ended:?}"
    );
    let log = orchestrator.process.log_text();
    let warnings = log.lines().filter(|line| line.contains("WARN")).count();
    assert!(warnings <= 25, "{warnings} warnings in ~5 s of outage:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_workers_never_hold_tasks_they_cannot_run() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "1", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    control
        .inject(serde_json::json!([{"kind": "latency", "first_token_ms": 4000, "times": 8}]))
        .await;
    let shards = [("NEXUS_SHARDS", "4")];
    let orchestrator = Orchestrator::start(&redis.url(), &shards);
    let worker_env = [
        ("NEXUS_SHARDS", "4"),
        ("NEXUS_WORKER_MAX_IN_FLIGHT", "1"),
        ("NEXUS_VISIBILITY_TIMEOUT_MS", "3000"),
        ("NEXUS_MAX_DELIVERIES", "3"),
    ];
    let _workers: Vec<_> = (0..2)
        .map(|_| Worker::start(&redis.url(), &model.base_url(), &worker_env))
        .collect();
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        let request = StartWorkflowRequest {
            plan: Some(sample_plan(&format!("Busy {n}"))),
            idempotency_key: format!("busy-{n}"),
            ..Default::default()
        };
        ids.push(client.start_workflow(request).await.unwrap().into_inner().workflow_id);
    }
    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    let mut conn = redis_conn(&redis);
    for shard in 0..4 {
        assert_eq!(xlen(&mut conn, &format!("nexus:{{nx{shard}}}:deadletter")), 0);
    }
    assert_eq!(control.requests().await.len(), 48, "each phase called once");
}

/// A worker's limit holds for as long as each call runs, counted where the
/// calls arrive: a slot given back before its run ended (as when the run's
/// future dropped its permit on being built) lets more calls open at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_never_has_more_calls_open_than_its_limit() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "300", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[("NEXUS_WORKER_MAX_IN_FLIGHT", "2")]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(start(&mut client, &format!("Limited {n}")).await);
    }
    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    let (open, peak) = control.request_counts().await;
    assert_eq!(open, 0);
    assert_eq!(peak, 2, "most calls open at once at the stand-in, with a limit of 2");
    assert_eq!(control.requests().await.len(), 36, "each phase called once");
}

/// Renewals are for calls that last: with renewals due every 500 ms, calls
/// of about 100 ms are never renewed, counted in Redis's own MONITOR feed
/// (the heartbeat script's calls, keyed by the task stream and the run).
#[tokio::test(flavor = "multi_thread")]
async fn calls_shorter_than_half_a_renewal_interval_are_not_renewed() {
    use futures::StreamExt;
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "100", "--reply-words", "3"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("NEXUS_VISIBILITY_TIMEOUT_MS", "1500")],
    );
    let monitor = redis.client().get_async_monitor().await.unwrap();
    let renewals = tokio::spawn(async move {
        let mut messages = monitor.into_on_message::<String>();
        let mut renewals = 0;
        while let Some(line) = messages.next().await {
            let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).take(4).collect();
            // `"EVALSHA" "<sha>" "2" "<shard>:tasks" "<shard>:wf:<id>" ...`: a heartbeat
            // (a hand-back has the same keys; none happens here).
            if let ["EVALSHA", _, "2", key] = quoted.as_slice()
                && key.ends_with(":tasks")
            {
                renewals += 1;
            }
            if line.contains("\"end-of-run\"") {
                return renewals;
            }
        }
        renewals
    });
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(start(&mut client, &format!("Short calls {n}")).await);
    }
    assert_all_completed(&mut client, &ids, Duration::from_secs(60)).await;
    let _: String = redis::cmd("PING")
        .arg("end-of-run")
        .query(&mut redis_conn(&redis))
        .unwrap();
    let renewals = tokio::time::timeout(Duration::from_secs(5), renewals)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        renewals, 0,
        "renewals of calls of about 100 ms, with renewals due every 500 ms"
    );
}

/// Claims renewed every 10 ms on a worker whose phases settle all the time:
/// a renewal that meets a task this worker has just acknowledged must not
/// take it for a takeover (no "aborting" line for calls that ended well),
/// and every phase runs once, counted at the stand-in.
#[tokio::test(flavor = "multi_thread")]
async fn renewals_racing_settles_report_no_lost_tasks() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "5", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let worker = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("NEXUS_VISIBILITY_TIMEOUT_MS", "30")],
    );
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(start(&mut client, &format!("Renewed {n}")).await);
    }
    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    assert_eq!(control.requests().await.len(), 120, "each phase called once");
    let log = worker.process.log_text();
    let lost = log.lines().filter(|line| line.contains("no longer ours")).count();
    assert_eq!(lost, 0, "tasks reported lost with no other worker running");
}

/// Freezes `frozen` (SIGSTOP), starts a rescuer with `env`, waits until the
/// rescuer has taken the run's task over (a second delivery started), then
/// lets `frozen` go on (SIGCONT). Returns the rescuer.
async fn take_over_from_frozen(
    frozen: &Worker,
    redis: &RedisServer,
    model: &StandIn,
    env: &[(&str, &str)],
    client: &mut Client,
    id: &str,
) -> Worker {
    frozen.process.signal("STOP");
    let rescuer = Worker::start(&redis.url(), &model.base_url(), env);
    wait_for_event(
        client,
        id,
        Duration::from_secs(20),
        |e| matches!(&e.kind, Some(nexus_proto::v1::workflow_event::Kind::PhaseStarted(s)) if s.delivery == 2),
    )
    .await;
    frozen.process.signal("CONT");
    rescuer
}

/// A worker frozen mid-call, whose task another worker took over meanwhile,
/// learns it lost the task at its next claim renewal and aborts its model
/// call: seen at the stand-in as its request cut off, seconds before the
/// model would have answered (renewals every 500 ms here, the model's first
/// token after 8 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_lost_its_task_aborts_the_call_at_its_next_renewal() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "8000", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let quick_claims = [("NEXUS_VISIBILITY_TIMEOUT_MS", "1500")];
    let frozen = Worker::start(&redis.url(), &model.base_url(), &quick_claims);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Lost").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while control.request_counts().await.0 < 1 {
        assert!(Instant::now() < deadline, "the first call never reached the model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let _rescuer = take_over_from_frozen(&frozen, &redis, &model, &quick_claims, &mut client, &id).await;
    let resumed = Instant::now();

    let deadline = resumed + Duration::from_secs(4);
    let requests = loop {
        let requests = control.requests().await;
        if requests.iter().any(|r| r["outcome"] == "client_disconnected") {
            break requests;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen worker's call was not aborted: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        requests.len(),
        2,
        "the frozen worker's call and the rescuer's: {requests:?}"
    );
    assert_eq!(requests[0]["outcome"], "client_disconnected", "{requests:?}");
    assert_eq!(
        control.request_counts().await.0,
        1,
        "the rescuer's call is still open ({:?} after SIGCONT)",
        resumed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_fences_out_the_frozen_worker_it_replaced() {
    let redis = RedisServer::start();
    let model = StandIn::start(SLOW_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    // Its heartbeat is due only every 10 s, so after SIGCONT it streams on
    // (and finishes) before it could learn from a heartbeat that it lost the
    // task: only the attempt fence can keep its output out.
    let frozen = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("NEXUS_VISIBILITY_TIMEOUT_MS", "30000")],
    );
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Frozen").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_output_delta"
    })
    .await;

    let _rescuer = take_over_from_frozen(&frozen, &redis, &model, &[], &mut client, &id).await;

    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(90)).await;
    assert_eq!(kind_name(events.last().unwrap()), "completed");
    // Compare with Redis itself: after the takeover's start, nothing of the
    // old attempt may land in the log, and phase 1's output is the new
    // attempt's streamed text.
    let takeover = events
        .iter()
        .position(
            |e| matches!(&e.kind, Some(nexus_proto::v1::workflow_event::Kind::PhaseStarted(s)) if s.delivery == 2),
        )
        .expect("the takeover started");
    use nexus_proto::v1::workflow_event::Kind;
    let late: Vec<_> = events[takeover..]
        .iter()
        .filter(|e| matches!(&e.kind, Some(Kind::PhaseOutputDelta(d)) if d.index == 0 && d.delivery == 1))
        .collect();
    assert!(
        late.is_empty(),
        "{} deltas of the fenced-out attempt landed",
        late.len()
    );
    let streamed: String = events[takeover..]
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::PhaseOutputDelta(d)) if d.index == 0 => Some(d.text.as_str()),
            _ => None,
        })
        .collect();
    let completed: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::PhaseCompleted(c)) if c.index == 0 => Some(c.output.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        completed,
        [streamed],
        "phase 1 completed once, with the new attempt's text"
    );
}

/// Junk on the task stream goes to the dead-letter stream at once; a run
/// whose phase cannot be known (its stored pipeline is gone before a worker
/// read it) fails with the reason, without a model call, instead of being
/// retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn undecodable_tasks_and_runs_whose_pipeline_is_gone_end_in_the_dead_letter_stream_or_a_failed_run() {
    let redis = RedisServer::start();
    let model = StandIn::start(&[]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Poisoned").await;

    let mut conn = redis_conn(&redis);
    let _: String = redis::cmd("XADD")
        .arg("nexus:{nx0}:tasks")
        .arg("*")
        .arg("m")
        .arg(b"\xff\xffnot a task".to_vec())
        .query(&mut conn)
        .unwrap();
    let pipelines: Vec<String> = redis::cmd("KEYS").arg("nexus:*:pipeline:*").query(&mut conn).unwrap();
    assert_eq!(pipelines.len(), 1, "{pipelines:?}");
    let _: i64 = redis::cmd("DEL").arg(&pipelines[0]).query(&mut conn).unwrap();
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);

    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(
        workflow.reason.contains("is not stored"),
        "the reason names the missing pipeline: {}",
        workflow.reason
    );
    assert_eq!(xlen(&mut conn, "nexus:{nx0}:deadletter"), 1, "the junk task");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = pending_count(&mut conn, "nexus:{nx0}:tasks", "workers");
        if pending == 0 || Instant::now() > deadline {
            assert_eq!(pending, 0, "no task left pending");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let calls = ModelControl::new(&model.base_url()).requests().await.len();
    assert_eq!(
        calls, 0,
        "no model call for a phase that cannot be known, nor one per redelivery"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_published_while_workers_resubscribe_still_stops_the_call_at_once() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "20000"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    // Heartbeats every 10 s: only the cancel path itself can stop the call fast.
    let _worker = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("NEXUS_VISIBILITY_TIMEOUT_MS", "30000")],
    );
    let control = ModelControl::new(&model.base_url());
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Cancel in the gap").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_started"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis_conn(&redis))
        .unwrap();
    assert!(killed >= 1, "subscriptions dropped");
    let cancelled_at = Instant::now();
    client
        .cancel_workflow(CancelWorkflowRequest {
            workflow_id: id.clone(),
            reason: "now".into(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let requests = control.requests().await;
        if requests[0]["outcome"] == "client_disconnected" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the model call was not aborted: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = cancelled_at.elapsed();
    assert!(took < Duration::from_millis(1500), "aborted {took:?} after the cancel");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_answer_survives_a_redis_outage_without_a_second_model_call() {
    let mut redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "1", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    control
        .inject(serde_json::json!([{"kind": "latency", "first_token_ms": 1500}]))
        .await;
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Blip").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_started"
    })
    .await;

    redis.kill_hard();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The stand-in settles the call as "latency" (its fault) once it sent [DONE].
    while control
        .requests()
        .await
        .first()
        .is_none_or(|call| call["outcome"] != "latency")
    {
        assert!(Instant::now() < deadline, "the first call never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();

    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    assert_eq!(control.requests().await.len(), 6, "no phase was paid for twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_refill_past_expired_entries() {
    let stack = Stack::start(0);
    let mut client = connect(&stack.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(start(&mut client, &format!("List {n}")).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The three newest expire as retention would remove them: keys gone,
    // index entries left behind.
    let mut conn = redis_conn(&stack.redis);
    for id in &ids[2..] {
        let state = format!("nexus:{{nx0}}:wf:{id}");
        let _: () = redis::cmd("DEL")
            .arg(&state)
            .arg(format!("{state}:events"))
            .arg(format!("{state}:outputs"))
            .query(&mut conn)
            .unwrap();
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = client
            .list_workflows(ListWorkflowsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.workflows.into_iter().map(|w| w.workflow_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut expected: Vec<_> = ids[..2].to_vec();
    expected.reverse();
    assert_eq!(listed, expected, "every live workflow listed, newest first");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_answer_is_a_failed_try_then_a_clear_failure() {
    let stack = Stack::start(1);
    let control = ModelControl::new(&stack.model.base_url());
    control
        .inject(serde_json::json!([{"kind": "truncated", "after_words": 3, "times": 3}]))
        .await;
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Cut off").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;

    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(workflow.reason.contains("cut short"), "{}", workflow.reason);
    let outcomes: Vec<String> = control
        .requests()
        .await
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["truncated length"; 3]);

    let done = start(&mut client, "Whole").await;
    let finished = wait_terminal(&mut client, &done, Duration::from_secs(30)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed);
    assert!(finished.phases.iter().all(|p| p.finish_reason == "stop"));
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_and_echoed_keys_stay_out_of_logs_and_answers() {
    let password = "REDIS-PASSWORD-s3cr3t";
    let api_key = "sk-or-v1-ECHOED-KEY-0123456789";
    let api_token = "NEXUS-API-TOKEN-t0k3n";
    let redis = RedisServer::start_with(&["--requirepass", password]);
    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let model = StandIn::start(&["--first-token-latency-ms", "1", "--reply-words", "5"]);
    let control = ModelControl::new(&model.base_url());
    let huge = "x".repeat(200_000);
    control
        .inject(serde_json::json!([{"kind": "status", "status": 401, "echo_key": true,
                                    "message": format!("Invalid key {huge}")}]))
        .await;
    let orchestrator = Orchestrator::start(&url, &[("RUST_LOG", "debug"), ("NEXUS_API_TOKEN", api_token)]);
    let worker = Worker::start(
        &url,
        &model.base_url(),
        &[("RUST_LOG", "debug"), ("OPENROUTER_API_KEY", api_key)],
    );
    let mut client = connect_with_token(&orchestrator.endpoint(), api_token).await;
    let id = client
        .start_workflow(StartWorkflowRequest {
            plan: Some(sample_plan("Secrets")),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workflow_id;
    let workflow = loop {
        let workflow = client
            .get_workflow(nexus_proto::v1::GetWorkflowRequest {
                workflow_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if workflow.status() == WorkflowStatus::Failed {
            break workflow;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stream = client
        .watch_workflow(WatchWorkflowRequest {
            workflow_id: id.clone(),
            after_cursor: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    let mut intruder = connect_with_token(&orchestrator.endpoint(), "wrong-token-guess").await;
    let refused = intruder
        .get_workflow(nexus_proto::v1::GetWorkflowRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    assert!(
        workflow.reason.contains("Invalid key"),
        "{}",
        &workflow.reason[..200.min(workflow.reason.len())]
    );
    assert!(
        workflow.reason.len() < 2_000,
        "reason is {} bytes",
        workflow.reason.len()
    );
    let answers = format!("{workflow:?}{events:?}{refused:?}");
    assert!(!answers.contains("wrong-token-guess"), "a sent token echoed back");
    for secret in [password, api_key, api_token] {
        assert!(!answers.contains(secret), "{secret} in an answer");
        for process in [&orchestrator.process, &worker.process, &model.process] {
            let log = process.log_text();
            assert!(!log.contains(secret), "{secret} in the log of {}", process.name);
        }
    }
    for process in [&orchestrator.process, &worker.process] {
        assert!(
            process.log_text().contains("DEBUG"),
            "{} logged at debug level",
            process.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_lives_exactly_as_long_as_its_workflow() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "700", "--reply-words", "3"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_RETENTION_SECS", "2")]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let request = StartWorkflowRequest {
        plan: Some(sample_plan("Long run")),
        idempotency_key: "long-run".into(),
        ..Default::default()
    };
    let first = client.start_workflow(request.clone()).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let retry = client.start_workflow(request).await.unwrap().into_inner();
    assert_eq!(
        retry.workflow_id, first.workflow_id,
        "the key outlived the retention counted from creation"
    );
    assert!(!retry.created);
    let workflow = wait_terminal(&mut client, &first.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed);
    let mut conn = redis_conn(&redis);
    let ttl = |conn: &mut redis::Connection, key: &str| -> i64 { redis::cmd("PTTL").arg(key).query(conn).unwrap() };
    let key_ttl = ttl(&mut conn, "nexus:{nx0}:idem:long-run");
    let state_ttl = ttl(&mut conn, &format!("nexus:{{nx0}}:wf:{}", first.workflow_id));
    assert!(
        state_ttl > 0 && key_ttl > 0,
        "both expire: key {key_ttl} ms, state {state_ttl} ms"
    );
    assert!(
        (key_ttl - state_ttl).abs() < 300,
        "key {key_ttl} ms, state {state_ttl} ms"
    );
}

/// The phase-started events of a workflow as stored in Redis: (phase, worker).
fn stored_phase_starts(redis: &RedisServer, id: &str) -> Vec<(u32, String)> {
    stored_events(&redis.client(), id)
        .into_iter()
        .filter_map(|event| match event.kind? {
            nexus_proto::v1::workflow_event::Kind::PhaseStarted(started) => Some((started.index, started.worker)),
            _ => None,
        })
        .collect()
}

/// SIGTERM to a busy worker: it finishes the calls it has (none is paid
/// twice), claims nothing more (every later phase starts on the other
/// worker, as Redis's event log shows) and exits well within its drain.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_told_to_stop_finishes_its_calls_and_claims_nothing_more() {
    let redis = RedisServer::start();
    let model = StandIn::start(&["--first-token-latency-ms", "1500", "--reply-words", "5"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let mut stopping = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(start(&mut client, &format!("Drained {n}")).await);
    }
    for id in &ids {
        wait_for_event(&mut client, id, Duration::from_secs(20), |e| {
            kind_name(e) == "phase_started"
        })
        .await;
    }
    let _other = Worker::start(&redis.url(), &model.base_url(), &[]);
    let signalled = Instant::now();
    stopping.process.signal("TERM");
    assert!(
        stopping.process.wait_exit(Duration::from_secs(8)),
        "the worker still ran 8 s after SIGTERM"
    );
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(5), "exited {took:?} after SIGTERM");
    assert_all_completed(&mut client, &ids, Duration::from_secs(60)).await;

    for id in &ids {
        let starts = stored_phase_starts(&redis, id);
        let phases: Vec<u32> = starts.iter().map(|(phase, _)| *phase).collect();
        assert_eq!(phases, [0, 1, 2, 3, 4, 5], "each phase started once: {starts:?}");
        let first = &starts[0].1;
        assert!(
            starts[1..].iter().all(|(_, worker)| worker != first),
            "after SIGTERM the stopping worker started nothing: {starts:?}"
        );
    }
    let calls = ModelControl::new(&model.base_url()).requests().await.len();
    assert_eq!(calls, 18, "three runs of six phases, none paid twice");
}

/// SIGTERM to a worker whose call outlasts its drain: the call is aborted
/// and the task handed back, so another worker starts it at once rather
/// than after the visibility timeout (a minute here), and the run completes.
/// Redis's event log says who started the phase and when.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_must_stop_mid_call_hands_the_task_back_for_another_to_take_at_once() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let patient = [
        ("NEXUS_VISIBILITY_TIMEOUT_MS", "60000"),
        ("NEXUS_SHUTDOWN_GRACE_MS", "1000"),
    ];
    let mut stopping = Worker::start(&redis.url(), &model.base_url(), &patient);
    // The first call takes a minute to answer; every later one is quick.
    ModelControl::new(&model.base_url())
        .inject(serde_json::json!([{"kind": "latency", "first_token_ms": 60000}]))
        .await;
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Handed back").await;
    wait_for_event(&mut client, &id, Duration::from_secs(20), |e| {
        kind_name(e) == "phase_started"
    })
    .await;
    let _other = Worker::start(&redis.url(), &model.base_url(), &patient);

    let signalled = Instant::now();
    stopping.process.signal("TERM");
    assert!(
        stopping.process.wait_exit(Duration::from_secs(6)),
        "the worker still ran 6 s after SIGTERM"
    );
    let finished = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed, "{finished:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "done long before the 60 s visibility timeout could have freed the task"
    );

    let mut conn = redis_conn(&redis);
    let starts = stored_phase_starts(&redis, &id);
    let first_phase: Vec<&String> = starts.iter().filter(|(phase, _)| *phase == 0).map(|(_, w)| w).collect();
    assert_eq!(
        first_phase.len(),
        2,
        "phase 1 started by the stopping worker, then by the other: {starts:?}"
    );
    assert_ne!(first_phase[0], first_phase[1]);
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("nexus:{nx0}:tasks")
        .arg("workers")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        pending.first(),
        Some(&redis::Value::Int(0)),
        "nothing left pending: {pending:?}"
    );
    let calls = ModelControl::new(&model.base_url()).requests().await;
    assert_eq!(calls.len(), 7, "the aborted call, then six");
}
