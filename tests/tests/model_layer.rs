//! The model layer as users see it: what a run can choose at its start (the
//! pipeline, a model per role, extra instructions), the response cache and
//! cost caps. Witnessed by the stand-in's ledger (how many calls, which model
//! each asked for, the end of its system prompt) and by Redis itself.

use nexus_proto::v1::{ListPipelinesRequest, StartWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use std::time::Duration;

/// The response cache on, as in production (the harness turns it off).
const CACHE_ON: &[(&str, &str)] = &[("NEXUS_CACHE_TTL_SECS", "3600")];

fn choices(pipeline: &str, models: &[(&str, &str)], instructions: &str) -> StartWorkflowRequest {
    StartWorkflowRequest {
        plan: Some(sample_plan("Chosen")),
        pipeline: pipeline.into(),
        models: models.iter().map(|(r, m)| (r.to_string(), m.to_string())).collect(),
        instructions: instructions.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quick_review_runs_three_phases_with_the_runs_own_models_and_instructions() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), CACHE_ON);
    let mut client = connect(&orchestrator.endpoint()).await;

    let request = choices(
        "quick-review",
        &[("reviewer", "openai/gpt-5")],
        "Focus on accessibility.",
    );
    let id = client.start_workflow(request).await.unwrap().into_inner().workflow_id;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{workflow:?}");

    let calls = ModelControl::new(&model.base_url()).requests().await;
    let asked: Vec<&str> = calls.iter().map(|call| call["model"].as_str().unwrap()).collect();
    assert_eq!(
        asked,
        ["openai/gpt-5", "anthropic/claude-sonnet-4.5", "openai/gpt-5"],
        "three calls, the reviewer's overridden"
    );
    for call in &calls {
        let tail = call["system_tail"].as_str().unwrap();
        assert!(
            tail.ends_with("Focus on accessibility."),
            "system prompt ends with: {tail:?}"
        );
    }
    assert_eq!(workflow.pipeline, "quick-review");
    let names: Vec<&str> = workflow.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["review", "revise", "rate"]);
    assert_eq!(workflow.models["reviewer"], "openai/gpt-5");
    assert_eq!(workflow.models["primary"], "anthropic/claude-sonnet-4.5");
    assert_eq!(workflow.instructions, "Focus on accessibility.");
    assert!(workflow.rating.is_some() && !workflow.final_plan.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_choices_are_refused_with_the_reason_and_store_nothing() {
    let redis = RedisServer::start();
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut conn = redis.client().get_connection().unwrap();
    let keys_before: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();

    let long = "x".repeat(4001);
    let cases = [
        (choices("no-such-pipeline", &[], ""), "quick-review"),
        (choices("", &[("judge", "openai/gpt-5")], ""), "no role \"judge\""),
        (
            choices("", &[("reviewer", "not a model id")], ""),
            "models[\"reviewer\"]",
        ),
        (choices("", &[], &long), "4001 characters"),
    ];
    for (request, expected) in cases {
        let status = client.start_workflow(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{:?} lacks {expected:?}",
            status.message()
        );
    }
    let keys_after: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(keys_after.len(), keys_before.len(), "nothing stored: {keys_after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pipelines_offers_both_built_ins_and_one_idempotency_key_means_one_set_of_choices() {
    let redis = RedisServer::start();
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;

    let listed = client
        .list_pipelines(ListPipelinesRequest {})
        .await
        .unwrap()
        .into_inner()
        .pipelines;
    let names: Vec<(&str, bool, usize)> = listed
        .iter()
        .map(|p| (p.name.as_str(), p.is_default, p.phases.len()))
        .collect();
    assert_eq!(names, [("enterprise-plan", true, 6), ("quick-review", false, 3)]);

    let keyed = |pipeline: &str| StartWorkflowRequest {
        idempotency_key: "choice-1".into(),
        ..choices(pipeline, &[], "")
    };
    let first = client.start_workflow(keyed("quick-review")).await.unwrap().into_inner();
    let again = client.start_workflow(keyed("quick-review")).await.unwrap().into_inner();
    assert_eq!(
        (again.workflow_id.as_str(), again.created),
        (first.workflow_id.as_str(), false)
    );
    let other = client.start_workflow(keyed("")).await.unwrap_err();
    assert_eq!(
        other.code(),
        tonic::Code::InvalidArgument,
        "same key, other pipeline: {other:?}"
    );
}

/// The calls the stand-in has seen so far.
async fn calls_seen(model: &StandIn) -> usize {
    ModelControl::new(&model.base_url()).requests().await.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_identical_run_is_answered_from_the_cache_without_a_call() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), CACHE_ON);
    let mut client = connect(&orchestrator.endpoint()).await;

    let first = client.start_workflow(choices("", &[], "")).await.unwrap().into_inner();
    let paid = wait_terminal(&mut client, &first.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(paid.status(), WorkflowStatus::Completed);
    assert_eq!(calls_seen(&model).await, 6);

    let second = client.start_workflow(choices("", &[], "")).await.unwrap().into_inner();
    let events = watch_until_end(&mut client, &second.workflow_id, "", Duration::from_secs(30)).await;
    assert_eq!(calls_seen(&model).await, 6, "the second run made no model call");
    let completed: Vec<_> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(nexus_proto::v1::workflow_event::Kind::PhaseCompleted(done)) => Some(done),
            _ => None,
        })
        .collect();
    assert_eq!(completed.len(), 6);
    for (done, original) in completed.iter().zip(&paid.phases) {
        assert!(done.cache_hit, "phase {} says it was a cache hit", done.phase);
        assert_eq!(done.output, original.output, "the same answer");
        assert_eq!(done.usage.unwrap().cost_usd, 0.0, "a hit costs nothing");
        let cost = original.usage.unwrap().cost_usd;
        assert!(
            (done.saved_usd - cost).abs() < 1e-12,
            "saved {} of {cost}",
            done.saved_usd
        );
    }
    let cached = wait_terminal(&mut client, &second.workflow_id, Duration::from_secs(5)).await;
    assert_eq!(cached.rating, paid.rating, "the cached rating is the paid one");

    let fresh = StartWorkflowRequest {
        no_cache: true,
        ..choices("", &[], "")
    };
    let third = client.start_workflow(fresh).await.unwrap().into_inner();
    wait_terminal(&mut client, &third.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(calls_seen(&model).await, 12, "no_cache calls the model for every phase");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cost_cap_stops_the_run_before_the_call_that_would_pass_it() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), CACHE_ON);
    let mut client = connect(&orchestrator.endpoint()).await;
    let uncached = |cap: f64| StartWorkflowRequest {
        no_cache: true,
        max_cost_usd: cap,
        ..choices("", &[], "")
    };

    // What the first phase costs, as the stand-in reports it.
    let reference = client.start_workflow(uncached(0.0)).await.unwrap().into_inner();
    let reference = wait_terminal(&mut client, &reference.workflow_id, Duration::from_secs(30)).await;
    let first_phase_cost = reference.phases[0].usage.unwrap().cost_usd;
    let before = calls_seen(&model).await;

    let capped = client
        .start_workflow(uncached(first_phase_cost))
        .await
        .unwrap()
        .into_inner();
    let capped = wait_terminal(&mut client, &capped.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(capped.status(), WorkflowStatus::Failed);
    assert!(capped.reason.contains("cost cap"), "{}", capped.reason);
    assert_eq!(
        calls_seen(&model).await - before,
        1,
        "phase 1 was called, phase 2 was not"
    );
    let budget = capped.budget.expect("a capped run shows its budget");
    assert_eq!(budget.max_cost_usd, first_phase_cost);
    assert!((budget.spent_usd - first_phase_cost).abs() < 1e-9, "{budget:?}");
    assert!(budget.remaining_usd < 1e-9, "{budget:?}");
}

/// The events of a watch, from the start, with or without reasoning.
async fn watched(client: &mut Client, id: &str, skip_reasoning: bool) -> Vec<nexus_proto::v1::WorkflowEvent> {
    let request = nexus_proto::v1::WatchWorkflowRequest {
        workflow_id: id.to_string(),
        skip_reasoning,
        ..Default::default()
    };
    let mut stream = client.watch_workflow(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the watch ended in time")
    {
        events.push(event);
    }
    events
}

/// The phases (by index) that streamed reasoning, in order, once each.
fn reasoning_phases(events: &[nexus_proto::v1::WorkflowEvent]) -> Vec<u32> {
    let mut phases: Vec<u32> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(nexus_proto::v1::workflow_event::Kind::PhaseReasoningDelta(thinking)) => Some(thinking.index),
            _ => None,
        })
        .collect();
    phases.dedup();
    phases
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_reviewer_reasons_and_watchers_may_leave_its_reasoning_out() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Thoughtful").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed);

    let all = watched(&mut client, &id, false).await;
    assert_eq!(
        reasoning_phases(&all),
        [1, 3, 5],
        "feedback, quality review and rating (the reviewer's phases) reasoned"
    );
    for phase in [1, 3, 5] {
        let usage = workflow.phases[phase].usage.unwrap();
        assert!(usage.reasoning_tokens > 0, "phase {phase} counts its reasoning tokens");
    }
    let without = watched(&mut client, &id, true).await;
    assert!(reasoning_phases(&without).is_empty());
    let others: Vec<&str> = all
        .iter()
        .filter(|e| kind_name(e) != "phase_reasoning_delta")
        .map(|e| e.cursor.as_str())
        .collect();
    let kept: Vec<&str> = without.iter().map(|e| e.cursor.as_str()).collect();
    assert_eq!(kept, others, "leaving reasoning out drops nothing else");
}

/// Reasoning-only streaming for three times the first-token and idle
/// timeouts (the scaled-down form of "a minute of thinking against a 60 s
/// idle timeout"): every phase completes on its first try.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_think_does_not_trip_the_first_token_or_idle_timeout() {
    let redis = RedisServer::start();
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "0",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "5",
        "--reasoning-ms",
        "1500",
    ]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let timeouts = [
        ("NEXUS_MODEL_FIRST_TOKEN_TIMEOUT_MS", "500"),
        ("NEXUS_MODEL_IDLE_TIMEOUT_MS", "500"),
    ];
    let _worker = Worker::start(&redis.url(), &model.base_url(), &timeouts);
    let mut client = connect(&orchestrator.endpoint()).await;
    let request = choices("quick-review", &[], "");
    let id = client.start_workflow(request).await.unwrap().into_inner().workflow_id;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    assert!(workflow.phases.iter().all(|p| p.tries == 1), "{:?}", workflow.phases);
    assert!(
        workflow.phases.iter().all(|p| p.duration_ms >= 1500),
        "each phase thought for 1.5 s"
    );
    assert_eq!(calls_seen(&model).await, 3, "no try was cut off and repeated");
    let events = watched(&mut client, &id, false).await;
    assert_eq!(reasoning_phases(&events), [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reviewer_that_always_answers_503_falls_back_and_the_run_names_who_answered() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let gemini = "google/gemini-3-pro-preview";
    ModelControl::new(&model.base_url())
        .inject(serde_json::json!([{"kind": "status", "status": 503, "model": gemini, "times": 1000}]))
        .await;
    let models = format!("primary=anthropic/claude-sonnet-4.5,reviewer={gemini}|openai/gpt-5");
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_MODELS", models.as_str())]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[("NEXUS_MODEL_MAX_TRIES", "2")]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Resilient").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);

    for phase in &workflow.phases {
        let reviewer = phase.index % 2 == 1;
        let (answered, asked, tries) = match reviewer {
            true => ("openai/gpt-5", gemini, 3),
            false => ("anthropic/claude-sonnet-4.5", "anthropic/claude-sonnet-4.5", 1),
        };
        assert_eq!(
            (phase.model.as_str(), phase.requested_model.as_str(), phase.tries),
            (answered, asked, tries),
            "phase {}",
            phase.name
        );
    }
    let calls = ModelControl::new(&model.base_url()).requests().await;
    let count = |name: &str| calls.iter().filter(|call| call["model"] == name).count();
    assert_eq!(count(gemini), 6, "two tries for each of the three reviewer phases");
    assert_eq!(count("openai/gpt-5"), 3, "then one call each to the fallback");
    let events = watched(&mut client, &id, true).await;
    let fallbacks: Vec<(u32, &str, &str)> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(nexus_proto::v1::workflow_event::Kind::PhaseFallback(f)) => {
                Some((f.index, f.from_model.as_str(), f.to_model.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        fallbacks,
        [
            (1, gemini, "openai/gpt-5"),
            (3, gemini, "openai/gpt-5"),
            (5, gemini, "openai/gpt-5")
        ]
    );
}

/// The issue's own case, unscaled: a thinking model that reasons for 61 s
/// before its first word, against the default timeouts (60 s idle, 120 s
/// first token). Runs a one-phase pipeline from `NEXUS_PIPELINES_DIR`.
#[tokio::test(flavor = "multi_thread")]
async fn a_minute_of_reasoning_does_not_trip_the_default_60_s_idle_timeout() {
    let dir = std::env::temp_dir().join(format!("nexus-test-pipelines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("think.toml"),
        "name = \"think\"\nfinal_output = \"think\"\n[[phases]]\nname = \"think\"\nrole = \"reviewer\"\n\
         reasoning = \"high\"\ninputs = [\"plan\"]\nprompt = \"Think hard about {{plan}}\"\n",
    )
    .unwrap();
    let redis = RedisServer::start();
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "0",
        "--reply-words",
        "5",
        "--reasoning-ms",
        "61000",
    ]);
    let pipelines = dir.to_string_lossy().into_owned();
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_PIPELINES_DIR", pipelines.as_str())]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = client
        .start_workflow(choices("think", &[], ""))
        .await
        .unwrap()
        .into_inner()
        .workflow_id;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(120)).await;
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    let phase = &workflow.phases[0];
    assert_eq!(phase.tries, 1, "the long think was not cut off");
    assert!(phase.duration_ms >= 61_000, "it thought for {} ms", phase.duration_ms);
    assert!(phase.usage.unwrap().reasoning_tokens > 1000, "{:?}", phase.usage);
    assert_eq!(calls_seen(&model).await, 1);
}

/// The spend Redis holds for a run is the sum of what each phase cost, not
/// the last phase's cost (the settle adds each phase's cost to the stored
/// spend in the same write that records the phase).
#[tokio::test(flavor = "multi_thread")]
async fn a_runs_stored_spend_is_the_sum_of_its_phases_costs() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let started = client
        .start_workflow(StartWorkflowRequest {
            no_cache: true,
            ..choices("", &[], "")
        })
        .await
        .unwrap()
        .into_inner();
    let id = started.workflow_id;
    let run = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(run.status(), WorkflowStatus::Completed);
    let costs: Vec<f64> = run.phases.iter().map(|p| p.usage.unwrap().cost_usd).collect();
    assert_eq!(costs.len(), 6);
    assert!(costs.iter().all(|cost| *cost > 0.0), "{costs:?}");

    let mut conn = redis.client().get_connection().unwrap();
    let shard = id.split('_').nth(1).unwrap();
    let stored: String = redis::Commands::hget(&mut conn, format!("nexus:{{nx{shard}}}:wf:{id}"), "spent_usd").unwrap();
    let stored: f64 = stored.parse().unwrap();
    let sum: f64 = costs.iter().sum();
    assert!(
        (stored - sum).abs() < 1e-9,
        "Redis holds {stored}, the phases cost {sum} ({costs:?})"
    );
}
