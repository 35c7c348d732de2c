//! Many teams on one Nexus: tokens map to tenants, a tenant sees only its
//! own runs (another's are NOT_FOUND), tokens reload without a restart, each
//! limit refuses with RESOURCE_EXHAUSTED naming it, and running open beyond
//! loopback takes an explicit flag. Witnessed by Redis (whose run it is)
//! and by the metrics endpoint.

use nexus_proto::v1::{
    CancelWorkflowRequest, ForkWorkflowRequest, GetWorkflowRequest, ListWorkflowsRequest, StartWorkflowRequest,
    WatchWorkflowRequest,
};
use nexus_tests::*;
use redis::Commands;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TEAM_A: &str = "token-of-team-a-0123456789";
const TEAM_B: &str = "token-of-team-b-0123456789";
const TEAM_C: &str = "token-of-team-c-0123456789";
const OPS: &str = "token-of-the-operators-0123";

fn tokens_file(lines: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("nexus-tokens-{}-{}", std::process::id(), free_port()));
    std::fs::write(&path, lines).unwrap();
    path
}

fn start_request(name: &str, key: &str) -> StartWorkflowRequest {
    StartWorkflowRequest {
        plan: Some(sample_plan(name)),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Starts a run as `client`'s tenant; returns its id.
async fn started(client: &mut TokenClient, name: &str, key: &str) -> String {
    client
        .start_workflow(start_request(name, key))
        .await
        .unwrap()
        .into_inner()
        .workflow_id
}

fn get(id: &str) -> GetWorkflowRequest {
    GetWorkflowRequest {
        workflow_id: id.into(),
        ..Default::default()
    }
}

fn state_key(id: &str) -> String {
    let shard = id.split('_').nth(1).unwrap();
    format!("nexus:{{nx{shard}}}:wf:{id}")
}

async fn scrape(address: std::net::SocketAddr) -> String {
    http_client()
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_sees_only_its_own_runs_and_tokens_reload_without_a_restart() {
    let file = tokens_file(&format!("team-a {TEAM_A}\nteam-b {TEAM_B}\nops {OPS} admin\n"));
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(
        &redis.url(),
        &[
            ("NEXUS_TOKENS_FILE", file.to_str().unwrap()),
            ("NEXUS_METRICS_LISTEN", "127.0.0.1:0"),
        ],
    );
    let worker = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("NEXUS_METRICS_LISTEN", "127.0.0.1:0")],
    );
    let endpoint = orchestrator.endpoint();
    let mut a = connect_with_token(&endpoint, TEAM_A).await;
    let mut b = connect_with_token(&endpoint, TEAM_B).await;
    let mut ops = connect_with_token(&endpoint, OPS).await;

    let id = started(&mut a, "A's plan", "same-key").await;
    let b_own = started(&mut b, "B's plan", "same-key").await;
    assert_ne!(id, b_own, "the same idempotency key in two tenants names two runs");
    let mut conn = redis.client().get_connection().unwrap();
    let owners: Vec<String> = [&id, &b_own]
        .iter()
        .map(|id| conn.hget(state_key(id), "tenant").unwrap())
        .collect();
    assert_eq!(owners, ["team-a", "team-b"], "Redis records whose each run is");

    // B meets A's run as if it did not exist, by every door.
    let not_found = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    };
    not_found(b.get_workflow(get(&id)).await.unwrap_err());
    let watch = WatchWorkflowRequest {
        workflow_id: id.clone(),
        ..Default::default()
    };
    not_found(b.watch_workflow(watch.clone()).await.unwrap_err());
    let cancel = CancelWorkflowRequest {
        workflow_id: id.clone(),
        reason: "not mine".into(),
    };
    not_found(b.cancel_workflow(cancel).await.unwrap_err());
    let fork = ForkWorkflowRequest {
        workflow_id: id.clone(),
        from_phase: "analyse".into(),
        ..Default::default()
    };
    not_found(b.fork_workflow(fork).await.unwrap_err());
    let listed_by_b: Vec<String> = b
        .list_workflows(ListWorkflowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workflows
        .into_iter()
        .map(|w| w.workflow_id)
        .collect();
    assert_eq!(listed_by_b, std::slice::from_ref(&b_own));
    // A sees its own, and the operators see both.
    assert_eq!(a.get_workflow(get(&id)).await.unwrap().into_inner().tenant, "team-a");
    let listed_by_ops: Vec<String> = ops
        .list_workflows(ListWorkflowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workflows
        .into_iter()
        .map(|w| w.workflow_id)
        .collect();
    assert!(
        listed_by_ops.contains(&id) && listed_by_ops.contains(&b_own),
        "{listed_by_ops:?}"
    );
    let status = connect(&endpoint).await.get_workflow(get(&id)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let metrics = scrape(orchestrator.metrics.unwrap()).await;
    for tenant in ["team-a", "team-b"] {
        let line = format!("nexus_tenant_workflows_started_total{{tenant=\"{tenant}\"}} 1");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }

    // What A's run cost (as the stand-in's usage chunks reported it, recorded
    // on the run) is counted for team A by the worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get_workflow(get(&id)).await.unwrap().into_inner().status() != nexus_proto::v1::WorkflowStatus::Completed {
        assert!(Instant::now() < deadline, "A's run did not complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cost = a
        .get_workflow(get(&id))
        .await
        .unwrap()
        .into_inner()
        .total_usage
        .unwrap()
        .cost_usd;
    let worker_metrics = scrape(worker.metrics.unwrap()).await;
    let counted: f64 = worker_metrics
        .lines()
        .find_map(|line| line.strip_prefix("nexus_tenant_cost_usd_total{tenant=\"team-a\"} "))
        .unwrap_or_else(|| panic!("no team-a spend in\n{worker_metrics}"))
        .parse()
        .unwrap();
    assert!(
        cost > 0.0 && (counted - cost).abs() < 1e-9,
        "counted {counted}, the run cost {cost}"
    );

    // Add team C and revoke team A in the file: it takes effect without a restart.
    std::fs::write(&file, format!("team-b {TEAM_B}\nteam-c {TEAM_C}\nops {OPS} admin\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = connect_with_token(&endpoint, TEAM_C).await;
        let c_ok = c.list_workflows(ListWorkflowsRequest::default()).await.is_ok();
        let a_refused = a
            .get_workflow(get(&id))
            .await
            .is_err_and(|s| s.code() == tonic::Code::Unauthenticated);
        if c_ok && a_refused {
            break;
        }
        assert!(Instant::now() < deadline, "the tokens file was not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_refuses_with_resource_exhausted_naming_it() {
    let file = tokens_file(&format!("team-a {TEAM_A}\nteam-b {TEAM_B}\nteam-c {TEAM_C}\n"));
    let redis = RedisServer::start();
    let tokens = file.to_str().unwrap();
    // No worker: runs stay in flight.
    let capped = Orchestrator::start(
        &redis.url(),
        &[
            ("NEXUS_TOKENS_FILE", tokens),
            ("NEXUS_TENANT_MAX_RUNNING", "2"),
            ("NEXUS_TENANT_MAX_WATCHES", "1"),
            ("NEXUS_MAX_WATCHERS", "2"),
        ],
    );
    let rated = Orchestrator::start(
        &redis.url(),
        &[("NEXUS_TOKENS_FILE", tokens), ("NEXUS_TENANT_STARTS_PER_MINUTE", "3")],
    );
    let exhausted = |status: tonic::Status, limit: &str| {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains(limit),
            "{:?} does not name {limit}",
            status.message()
        );
    };

    // Runs in flight: two, then refused; a cancelled one frees a place.
    let mut a = connect_with_token(&capped.endpoint(), TEAM_A).await;
    let first = started(&mut a, "one", "").await;
    let second = started(&mut a, "two", "").await;
    exhausted(
        a.start_workflow(start_request("three", "")).await.unwrap_err(),
        "NEXUS_TENANT_MAX_RUNNING",
    );
    let mut b = connect_with_token(&capped.endpoint(), TEAM_B).await;
    b.start_workflow(start_request("B is not capped by A", ""))
        .await
        .unwrap();
    a.cancel_workflow(CancelWorkflowRequest {
        workflow_id: first.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    a.start_workflow(start_request("three again", "")).await.unwrap();

    // Watches: one per tenant, two in all on this replica.
    let watch = |id: &str| WatchWorkflowRequest {
        workflow_id: id.to_string(),
        ..Default::default()
    };
    // (A cancelled run's watch ends at once, freeing its place: watch a live one.)
    let _held = a.watch_workflow(watch(&second)).await.unwrap().into_inner();
    exhausted(
        a.watch_workflow(watch(&second)).await.unwrap_err(),
        "NEXUS_TENANT_MAX_WATCHES",
    );
    let b_run = started(&mut b, "B watched", "").await;
    let _held_b = b.watch_workflow(watch(&b_run)).await.unwrap().into_inner();
    let mut c = connect_with_token(&capped.endpoint(), TEAM_C).await;
    let c_run = started(&mut c, "C", "").await;
    exhausted(c.watch_workflow(watch(&c_run)).await.unwrap_err(), "NEXUS_MAX_WATCHERS");

    // Starts per minute: three, then refused, unless the minute turned meanwhile.
    let mut rated_c = connect_with_token(&rated.endpoint(), TEAM_C).await;
    for attempt in 0.. {
        let minute = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                / 60
        };
        let before = minute();
        let mut outcomes = Vec::new();
        for n in 0..4 {
            outcomes.push(rated_c.start_workflow(start_request(&format!("rated {n}"), "")).await);
        }
        if minute() != before && attempt < 3 {
            continue;
        }
        let refused = outcomes.into_iter().filter_map(Result::err).collect::<Vec<_>>();
        assert!(!refused.is_empty(), "a fourth start within the minute is refused");
        for status in refused {
            exhausted(status, "NEXUS_TENANT_STARTS_PER_MINUTE");
        }
        break;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serving_without_tokens_beyond_loopback_takes_an_explicit_flag() {
    let redis = RedisServer::start();
    // An orchestrator on every address, with no token.
    let open_to_all = |allow: bool| {
        let mut command = Command::new(binary("orchestrator"));
        command
            .env("NEXUS_LISTEN", "0.0.0.0:0")
            .env("REDIS_URL", redis.url())
            .env_remove("NEXUS_API_TOKEN")
            .env_remove("NEXUS_TOKENS_FILE");
        if allow {
            command.env("NEXUS_ALLOW_UNAUTHENTICATED", "true");
        }
        command
    };
    let refused = open_to_all(false)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("refusing to serve") && said.contains("NEXUS_ALLOW_UNAUTHENTICATED"),
        "{said}"
    );

    let (_open, line) = Process::spawn("orchestrator-open", open_to_all(true), "listening on");
    assert!(line.contains("0.0.0.0"), "{line}");
}
