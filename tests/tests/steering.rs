//! Steering a run as its users do: approval gates (pause, edit, approve,
//! reject, time out), forks from a phase with other models or prompts, and
//! comparing branches. Witnessed by the stand-in's ledger (which calls were
//! made, what each prompt began with) and by Redis itself (status, queued
//! tasks, outputs and records), not by the service's own report alone.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{
    ApproveStepRequest, CompareWorkflowsRequest, ForkWorkflowRequest, ListWorkflowsRequest, Phase, RejectStepRequest,
    StartWorkflowRequest, WorkflowStatus,
};
use nexus_tests::*;
use prost::Message;
use redis::Commands;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Three phases; the first waits for approval. The second's prompt starts
/// with the first's output, so the stand-in's prompt excerpt shows what the
/// second phase was given.
const GATED: &str = r#"
name = "gated"
final_output = "revise"

[[phases]]
name = "draft"
role = "primary"
inputs = ["plan"]
await_approval = true
prompt = "Draft a plan for: {{plan}}"

[[phases]]
name = "revise"
role = "reviewer"
inputs = ["draft"]
prompt = "{{draft}}"

[[phases]]
name = "rate"
role = "reviewer"
inputs = ["revise"]
output = "rating"
temperature = 0.0
prompt = "Rate this plan: {{revise}}"
"#;

/// A directory with the gated pipeline and two variants whose gate times
/// out after a second: one approves then, one rejects.
fn pipelines_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nexus-steering-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("gated.toml"), GATED).unwrap();
    let timing_out = |name: &str, action: &str| {
        GATED
            .replace("name = \"gated\"", &format!("name = \"{name}\""))
            .replace(
                "await_approval = true",
                &format!("await_approval = true\napproval_timeout_secs = 1\non_approval_timeout = \"{action}\""),
            )
    };
    std::fs::write(dir.join("approve-later.toml"), timing_out("approve-later", "approve")).unwrap();
    std::fs::write(dir.join("reject-later.toml"), timing_out("reject-later", "reject")).unwrap();
    dir
}

struct GatedStack {
    redis: RedisServer,
    model: StandIn,
    orchestrator: Orchestrator,
    _worker: Worker,
    pipelines: String,
}

impl GatedStack {
    fn start() -> Self {
        let redis = RedisServer::start();
        let model = StandIn::start(FAST_MODEL);
        let pipelines = pipelines_dir().to_string_lossy().into_owned();
        let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_PIPELINES_DIR", pipelines.as_str())]);
        let worker = Worker::start(&redis.url(), &model.base_url(), &[]);
        Self {
            redis,
            model,
            orchestrator,
            _worker: worker,
            pipelines,
        }
    }

    async fn client(&self) -> Client {
        connect(&self.orchestrator.endpoint()).await
    }

    async fn start_run(&self, pipeline: &str) -> String {
        let request = StartWorkflowRequest {
            plan: Some(sample_plan("Gated")),
            pipeline: pipeline.into(),
            ..Default::default()
        };
        let mut client = self.client().await;
        client.start_workflow(request).await.unwrap().into_inner().workflow_id
    }

    fn redis(&self) -> redis::Connection {
        self.redis.client().get_connection().unwrap()
    }

    async fn calls(&self) -> Vec<serde_json::Value> {
        ModelControl::new(&self.model.base_url()).requests().await
    }
}

/// The Redis key of a workflow's state hash, and of its shard's keys.
fn state_key(id: &str) -> String {
    let shard = id.split('_').nth(1).unwrap();
    format!("nexus:{{nx{shard}}}:wf:{id}")
}

fn shard_key(id: &str, suffix: &str) -> String {
    let shard = id.split('_').nth(1).unwrap();
    format!("nexus:{{nx{shard}}}:{suffix}")
}

async fn wait_until_awaiting(client: &mut Client, id: &str) {
    wait_for_event(client, id, Duration::from_secs(30), |event| {
        matches!(event.kind, Some(Kind::PhaseAwaitingApproval(_)))
    })
    .await;
}

/// The approved event among `events`.
fn approved_event(events: &[nexus_proto::v1::WorkflowEvent]) -> nexus_proto::v1::PhaseApproved {
    events
        .iter()
        .find_map(|event| match &event.kind {
            Some(Kind::PhaseApproved(approved)) => Some(approved.clone()),
            _ => None,
        })
        .expect("an approved event")
}

fn approve(id: &str, phase_index: u32, edited: Option<&str>) -> ApproveStepRequest {
    ApproveStepRequest {
        workflow_id: id.into(),
        phase_index,
        edited_output: edited.map(str::to_string),
        comment: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gated_run_waits_across_an_orchestrator_restart_and_goes_on_with_the_persons_edit() {
    let mut stack = GatedStack::start();
    let id = stack.start_run("gated").await;
    let mut client = stack.client().await;
    wait_until_awaiting(&mut client, &id).await;

    // Paused in Redis itself: the status, the gate's deadline entry, no task queued.
    let mut redis = stack.redis();
    let status: String = redis.hget(state_key(&id), "status").unwrap();
    assert_eq!(status, "awaiting_approval");
    let queued: usize = redis.xlen(shard_key(&id, "tasks")).unwrap();
    assert_eq!(queued, 0, "no task is queued while the run waits");
    let gated: Vec<String> = redis.zrange(shard_key(&id, "gates"), 0, -1).unwrap();
    assert_eq!(gated, std::slice::from_ref(&id));
    assert_eq!(stack.calls().await.len(), 1, "only the gated phase ran");

    // The orchestrator dies and another takes over; the run still waits.
    stack.orchestrator.process.kill_hard();
    stack.orchestrator = Orchestrator::start(&stack.redis.url(), &[("NEXUS_PIPELINES_DIR", stack.pipelines.as_str())]);
    let mut client = stack.client().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = get_retrying(&mut client, &id).await;
    assert_eq!(waiting.status(), WorkflowStatus::AwaitingApproval);
    let gate = waiting.approval.expect("the gate is shown");
    assert_eq!(
        (gate.index, gate.phase.as_str(), gate.on_timeout.as_str()),
        (0, "draft", "reject")
    );
    assert_eq!(stack.calls().await.len(), 1, "nothing ran meanwhile");

    // Approving another phase than the one it waits at is refused.
    let wrong = client.approve_step(approve(&id, 1, None)).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::FailedPrecondition, "{wrong:?}");
    assert!(wrong.message().contains("phase 0"), "{}", wrong.message());

    let edited = "HUMAN EDIT: keep the scope to the booking flow; payments come in phase two.";
    let approved = client
        .approve_step(approve(&id, 0, Some(edited)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(approved.workflow.unwrap().status(), WorkflowStatus::AwaitingApproval);
    let finished = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed, "{finished:?}");

    // The next phase was given the person's text, as the stand-in saw it.
    let calls = stack.calls().await;
    assert_eq!(calls.len(), 3);
    let second_prompt = calls[1]["prompt_excerpt"].as_str().unwrap();
    assert!(
        second_prompt.starts_with("HUMAN EDIT: keep the scope"),
        "{second_prompt:?}"
    );
    // Redis holds the edit as the phase's output, recorded as a human edit.
    let output: String = redis.hget(format!("{}:outputs", state_key(&id)), "draft").unwrap();
    assert_eq!(output, edited);
    let record: Vec<u8> = redis.hget(state_key(&id), "phase:0").unwrap();
    assert!(Phase::decode(record.as_slice()).unwrap().human_edit);
    let gated: Vec<String> = redis.zrange(shard_key(&id, "gates"), 0, -1).unwrap();
    assert!(gated.is_empty(), "the gate is gone: {gated:?}");

    // Watchers saw the pause and the approval with the edit, as stored.
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(10)).await;
    let stored: usize = redis.xlen(format!("{}:events", state_key(&id))).unwrap();
    assert_eq!(events.len(), stored);
    let approval = approved_event(&events);
    assert_eq!(approval.edited_output.as_deref(), Some(edited));
    assert!(!approval.timed_out);

    let again = client.approve_step(approve(&id, 0, None)).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(again.message().contains("completed"), "{}", again.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_or_cancelled_gate_ends_the_run_and_no_further_model_is_called() {
    let stack = GatedStack::start();
    let mut client = stack.client().await;
    let rejected = stack.start_run("gated").await;
    let cancelled = stack.start_run("gated").await;
    wait_until_awaiting(&mut client, &rejected).await;
    wait_until_awaiting(&mut client, &cancelled).await;

    let reply = client
        .reject_step(RejectStepRequest {
            workflow_id: rejected.clone(),
            phase_index: 0,
            reason: "the draft ignores the budget".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let workflow = reply.workflow.unwrap();
    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(
        workflow.reason.contains("rejected") && workflow.reason.contains("ignores the budget"),
        "{}",
        workflow.reason
    );
    client
        .cancel_workflow(nexus_proto::v1::CancelWorkflowRequest {
            workflow_id: cancelled.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut redis = stack.redis();
    let statuses: Vec<String> = [&rejected, &cancelled]
        .iter()
        .map(|id| redis.hget(state_key(id), "status").unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "cancelled"]);
    let gated: Vec<String> = redis.zrange(shard_key(&rejected, "gates"), 0, -1).unwrap();
    let gated_too: Vec<String> = redis.zrange(shard_key(&cancelled, "gates"), 0, -1).unwrap();
    assert!(gated.is_empty() && gated_too.is_empty(), "{gated:?} {gated_too:?}");
    assert_eq!(stack.calls().await.len(), 2, "one call per run: the gated phase only");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_times_out_approves_or_fails_as_its_pipeline_says() {
    let stack = GatedStack::start();
    let mut client = stack.client().await;
    let approved = stack.start_run("approve-later").await;
    let failed = stack.start_run("reject-later").await;

    let approved_run = wait_terminal(&mut client, &approved, Duration::from_secs(30)).await;
    let failed_run = wait_terminal(&mut client, &failed, Duration::from_secs(30)).await;
    assert_eq!(approved_run.status(), WorkflowStatus::Completed, "{approved_run:?}");
    assert_eq!(failed_run.status(), WorkflowStatus::Failed, "{failed_run:?}");
    assert!(failed_run.reason.contains("timed out"), "{}", failed_run.reason);

    let events = watch_until_end(&mut client, &approved, "", Duration::from_secs(10)).await;
    let by_timeout = events.iter().any(|event| {
        matches!(&event.kind, Some(Kind::PhaseApproved(approval)) if approval.timed_out && approval.edited_output.is_none())
    });
    assert!(by_timeout, "the approval says its timeout gave it");
    // Each run's gate waited about its second: the deadline is the pipeline's.
    let gate_wait = |events: &[nexus_proto::v1::WorkflowEvent]| {
        let at = |wanted: &str| {
            events
                .iter()
                .find(|e| kind_name(e) == wanted)
                .and_then(|e| e.time)
                .map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
                .unwrap()
        };
        at("phase_approved") - at("phase_awaiting_approval")
    };
    let waited = gate_wait(&events);
    assert!((0.9..5.0).contains(&waited), "the gate waited {waited:.2} s");
    assert_eq!(
        stack.calls().await.len(),
        4,
        "three phases for one run, one for the other"
    );
}

/// A fork's request on the default six-phase pipeline, from `from`.
fn fork_request(parent: &str, from: &str) -> ForkWorkflowRequest {
    ForkWorkflowRequest {
        workflow_id: parent.into(),
        from_phase: from.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_from_phase_3_copies_phases_1_and_2_without_a_call_and_differs_from_there() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let parent = start(&mut client, "Fork me").await;
    let parent_run = wait_terminal(&mut client, &parent, Duration::from_secs(60)).await;
    assert_eq!(parent_run.status(), WorkflowStatus::Completed);
    let control = ModelControl::new(&stack.model.base_url());
    assert_eq!(control.requests().await.len(), 6);

    let prompt = "REWRITTEN PROMPT. Write a lean plan for {{plan}} using {{analyse}} and {{feedback}}";
    let mut request = fork_request(&parent, "enterprise_plan");
    request.models.insert("reviewer".into(), "openai/gpt-5".into());
    request.prompts.insert("enterprise_plan".into(), prompt.into());
    let fork = client.fork_workflow(request).await.unwrap().into_inner();
    assert!(fork.created);
    let fork_run = wait_terminal(&mut client, &fork.workflow_id, Duration::from_secs(60)).await;
    assert_eq!(fork_run.status(), WorkflowStatus::Completed, "{fork_run:?}");

    // Phases 1 and 2 called no model: the fork made four calls, from phase 3.
    let calls = control.requests().await;
    assert_eq!(calls.len(), 10, "6 for the parent, 4 for the fork");
    let fork_calls = &calls[6..];
    assert!(
        fork_calls[0]["prompt_excerpt"]
            .as_str()
            .unwrap()
            .starts_with("REWRITTEN PROMPT")
    );
    let models: Vec<&str> = fork_calls.iter().map(|c| c["model"].as_str().unwrap()).collect();
    assert_eq!(
        models,
        [
            "anthropic/claude-sonnet-4.5",
            "openai/gpt-5",
            "anthropic/claude-sonnet-4.5",
            "openai/gpt-5"
        ]
    );

    // Redis: copied outputs equal the parent's, later ones differ; records say where they came from.
    let mut redis = stack.redis.client().get_connection().unwrap();
    let outputs = |id: &str, redis: &mut redis::Connection| -> std::collections::HashMap<String, String> {
        redis.hgetall(format!("{}:outputs", state_key(id))).unwrap()
    };
    let (parent_outputs, fork_outputs) = (outputs(&parent, &mut redis), outputs(&fork.workflow_id, &mut redis));
    for name in ["analyse", "feedback"] {
        assert_eq!(fork_outputs[name], parent_outputs[name], "{name} is copied");
    }
    for name in ["enterprise_plan", "quality_review", "improve"] {
        assert_ne!(fork_outputs[name], parent_outputs[name], "{name} is the fork's own");
    }
    for index in 0..2 {
        let record: Vec<u8> = redis
            .hget(state_key(&fork.workflow_id), format!("phase:{index}"))
            .unwrap();
        let record = Phase::decode(record.as_slice()).unwrap();
        assert_eq!(record.copied_from, parent);
        assert_eq!(
            record.usage.unwrap().cost_usd,
            0.0,
            "a copied phase cost the fork nothing"
        );
    }
    let lineage: (String, String) = redis::cmd("HMGET")
        .arg(state_key(&fork.workflow_id))
        .arg("parent")
        .arg("fork_phase")
        .query(&mut redis)
        .unwrap();
    assert_eq!(lineage, (parent.clone(), "2".to_string()));
    assert_eq!(
        (fork_run.parent_workflow_id.as_str(), fork_run.fork_phase),
        (parent.as_str(), 2)
    );

    // Compare: shared phases 1-2, different from phase 3 on.
    let comparison = client
        .compare_workflows(CompareWorkflowsRequest {
            workflow_ids: vec![parent.clone(), fork.workflow_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let identical: Vec<bool> = comparison.phases.iter().map(|phase| phase.identical).collect();
    assert_eq!(identical, [true, true, false, false, false, false]);
    let fork_side = &comparison.phases[0].runs[1];
    assert_eq!((fork_side.group, fork_side.copied_from.as_str()), (0, parent.as_str()));
    assert_eq!(comparison.phases[2].runs[1].group, 1);
    assert_eq!(comparison.runs[1].parent_workflow_id, parent);
    assert!(comparison.runs.iter().all(|run| run.score >= 1), "both are rated");

    // The forks of the parent, and only they.
    let listed = client
        .list_workflows(ListWorkflowsRequest {
            parent_workflow_id: parent.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.workflows.iter().map(|w| w.workflow_id.as_str()).collect();
    assert_eq!(ids, [fork.workflow_id.as_str()]);

    // The CLI's view of the same comparison.
    let printed = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "compare", &parent, &fork.workflow_id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    assert!(
        text.contains("phase 1 analyse (same)") && text.contains("phase 3 enterprise_plan (differs)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_fork_is_refused_with_the_reason_and_stores_nothing() {
    let stack = Stack::start_with(1, 0, FAST_MODEL);
    let mut client = connect(&stack.endpoint()).await;
    // No worker: the parent never gets past phase 1.
    let parent = start(&mut client, "Still running").await;
    let mut redis = stack.redis.client().get_connection().unwrap();
    let mut keys_before: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis).unwrap();
    keys_before.sort();

    let mut earlier_prompt = fork_request(&parent, "feedback");
    earlier_prompt
        .prompts
        .insert("analyse".into(), "Again: {{plan}}".into());
    let mut bad_placeholder = fork_request(&parent, "analyse");
    bad_placeholder
        .prompts
        .insert("analyse".into(), "Use {{improve}}".into());
    let cases = [
        (
            fork_request(&parent, "nope"),
            tonic::Code::InvalidArgument,
            "analyse, feedback",
        ),
        (earlier_prompt, tonic::Code::InvalidArgument, "before the fork point"),
        (bad_placeholder, tonic::Code::InvalidArgument, "{{improve}}"),
        (
            fork_request(&parent, "feedback"),
            tonic::Code::FailedPrecondition,
            "has not completed",
        ),
        (
            fork_request("wf_0_0195f2c4d6e87a9b8c7d6e5f4a3b2c1d", "analyse"),
            tonic::Code::NotFound,
            "not found",
        ),
    ];
    for (request, code, message) in cases {
        let status = client.fork_workflow(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(message),
            "{:?} lacks {message:?}",
            status.message()
        );
    }
    let mut keys_after: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis).unwrap();
    keys_after.sort();
    assert_eq!(keys_before, keys_after, "nothing was stored");
}

/// A person's edit of a megabyte goes through a client with default limits:
/// the next phase reads it (Redis holds it whole) and the approved event
/// says how long it is instead of repeating it.
#[tokio::test(flavor = "multi_thread")]
async fn a_megabyte_edit_is_accepted_stored_whole_and_kept_out_of_the_event() {
    let stack = GatedStack::start();
    let id = stack.start_run("gated").await;
    let mut client = stack.client().await;
    wait_until_awaiting(&mut client, &id).await;
    let edited = format!("HUMAN EDIT {}", "a long and careful plan ".repeat(44_000));
    assert!(edited.len() > 1_000_000);
    client.approve_step(approve(&id, 0, Some(&edited))).await.unwrap();
    let finished = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed, "{finished:?}");

    let mut redis = stack.redis();
    let output: String = redis.hget(format!("{}:outputs", state_key(&id)), "draft").unwrap();
    assert!(output == edited, "Redis holds the whole edit");
    let calls = stack.calls().await;
    assert!(calls[1]["prompt_excerpt"].as_str().unwrap().starts_with("HUMAN EDIT"));
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(10)).await;
    let approval = approved_event(&events);
    assert_eq!(
        (approval.edited_output, approval.edited_bytes),
        (None, edited.len() as u64)
    );
}

/// The same steering from the `nexus` CLI: approve with an edit from a file,
/// fork and watch the fork, list a run's forks; `watch` of a cancelled run
/// exits 3.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_approves_with_an_edit_forks_lists_forks_and_exits_3_for_a_cancelled_run() {
    let stack = GatedStack::start();
    let endpoint = stack.orchestrator.endpoint();
    let nexus = |args: &[&str]| {
        Command::new(binary("nexus"))
            .args(["--endpoint", &endpoint])
            .args(args)
            .output()
            .unwrap()
    };
    let id = stack.start_run("gated").await;
    let mut client = stack.client().await;
    wait_until_awaiting(&mut client, &id).await;
    let edit = std::env::temp_dir().join(format!("nexus-edit-{}-{}.md", std::process::id(), free_port()));
    std::fs::write(&edit, "EDITED IN A FILE: a smaller first release.").unwrap();
    let approved = nexus(&["approve", &id, "--edit", edit.to_str().unwrap(), "--comment", "smaller"]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let finished = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(finished.status(), WorkflowStatus::Completed);
    let output: String = stack
        .redis()
        .hget(format!("{}:outputs", state_key(&id)), "draft")
        .unwrap();
    assert_eq!(output, "EDITED IN A FILE: a smaller first release.");

    let forked = nexus(&["fork", &id, "--from", "rate", "--watch"]);
    let text = String::from_utf8_lossy(&forked.stdout);
    assert!(
        forked.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&forked.stderr)
    );
    let fork_id = text.split_whitespace().nth(1).expect("the fork's id").to_string();
    assert!(text.contains("copied from"), "{text}");
    let listed = nexus(&["list", "--parent", &id]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&fork_id) && !listed.contains(&format!("{id} ")),
        "{listed}"
    );
    assert_eq!(stack.calls().await.len(), 4, "three phases, then the fork's one");

    let cancelled = stack.start_run("gated").await;
    wait_until_awaiting(&mut client, &cancelled).await;
    let reject_wrong = nexus(&["reject", &cancelled, "--phase", "1"]);
    assert!(!reject_wrong.status.success());
    client
        .cancel_workflow(nexus_proto::v1::CancelWorkflowRequest {
            workflow_id: cancelled.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap();
    let watched = nexus(&["watch", &cancelled]);
    assert_eq!(
        watched.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&watched.stdout)
    );
}
