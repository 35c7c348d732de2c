//! The soak test: hundreds of workflows while a chaos loop SIGKILLs a random
//! worker or orchestrator every few seconds and starts it again. Afterwards
//! every workflow must be terminal, none lost, no phase recorded twice.
//!
//! Ignored in the fast suite; run it with `./scripts/soak.sh` (CI does).
//! Bounded: `NEXUS_SOAK_WORKFLOWS` (default 300) workflows, at most
//! `NEXUS_SOAK_SECONDS` (default 240) seconds.

use nexus_proto::v1::{StartWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;

/// About 1.5 s per phase, so runs last long enough for many kills.
const MODEL: &[&str] = &[
    "--first-token-latency-ms",
    "500",
    "--tokens-per-second",
    "25",
    "--reply-words",
    "25",
];
const KILL_EVERY: Duration = Duration::from_secs(2);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "soak: run with ./scripts/soak.sh"]
async fn soak_random_kills_lose_and_duplicate_nothing() {
    let workflows = env_number("NEXUS_SOAK_WORKFLOWS", 300);
    let budget = Duration::from_secs(env_number("NEXUS_SOAK_SECONDS", 240) as u64);
    let stack = Stack::start_with(2, 0, MODEL);
    let worker_env = [("NEXUS_VISIBILITY_TIMEOUT_MS", "2000")];
    let mut stack = stack;
    for _ in 0..3 {
        stack
            .workers
            .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &worker_env));
    }
    let redis_url = stack.redis.url();
    let model_url = stack.model.base_url();
    let stack = Arc::new(Mutex::new(stack));

    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let chaos = tokio::spawn(chaos_loop(
        stack.clone(),
        redis_url.clone(),
        model_url,
        done.clone(),
        kills.clone(),
    ));

    let ids = start_all(&stack, workflows).await;
    let deadline = tokio::time::Instant::now() + budget;
    let mut outcomes = Vec::new();
    for id in &ids {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        outcomes.push(final_state(&stack, id, left).await);
    }
    done.store(true, Ordering::SeqCst);
    chaos.await.unwrap();

    let lost = outcomes.iter().filter(|o| o.status.is_none()).count();
    let duplicated = outcomes.iter().filter(|o| o.duplicated).count();
    let completed = outcomes
        .iter()
        .filter(|o| o.status == Some(WorkflowStatus::Completed))
        .count();
    let failed = outcomes.len() - lost - completed;
    println!(
        "workflows={} kills={} lost={lost} duplicated={duplicated} completed={completed} failed={failed}",
        ids.len(),
        kills.load(Ordering::SeqCst)
    );
    assert_eq!(ids.len(), workflows, "every start was accepted");
    assert_eq!(lost, 0, "no workflow lost or left unfinished");
    assert_eq!(duplicated, 0, "no phase recorded twice");
    assert!(
        kills.load(Ordering::SeqCst) >= 3,
        "the chaos loop really killed processes"
    );
}

/// Starts every workflow with an idempotency key, retrying on whichever
/// orchestrator is up, as a careful client would.
async fn start_all(stack: &Arc<Mutex<Stack>>, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let request = StartWorkflowRequest {
            plan: Some(sample_plan(&format!("Soak {n}"))),
            idempotency_key: format!("soak-{n}"),
        };
        for attempt in 0.. {
            let mut client = any_client(stack).await;
            match client.start_workflow(request.clone()).await {
                Ok(response) => {
                    ids.push(response.into_inner().workflow_id);
                    break;
                }
                Err(status) if attempt < 100 => {
                    eprintln!("start {n} failed ({}); retrying", status.code());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("start {n} kept failing: {status}"),
            }
        }
    }
    ids
}

async fn any_client(stack: &Arc<Mutex<Stack>>) -> Client {
    loop {
        let endpoints: Vec<String> = stack
            .lock()
            .await
            .orchestrators
            .iter()
            .map(Orchestrator::endpoint)
            .collect();
        for endpoint in endpoints {
            if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), Client::connect(endpoint)).await {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Outcome {
    status: Option<WorkflowStatus>,
    duplicated: bool,
}

/// Waits for the workflow to end, then checks its event log for a phase
/// completed twice.
async fn final_state(stack: &Arc<Mutex<Stack>>, id: &str, left: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + left;
    loop {
        let mut client = any_client(stack).await;
        let workflow = client
            .get_workflow(nexus_proto::v1::GetWorkflowRequest {
                workflow_id: id.to_string(),
            })
            .await;
        if let Ok(workflow) = workflow.map(|w| w.into_inner()) {
            let status = workflow.status();
            if matches!(
                status,
                WorkflowStatus::Completed | WorkflowStatus::Failed | WorkflowStatus::Cancelled
            ) {
                let events = watch_resuming(stack, id).await;
                let mut completed: Vec<u32> = events
                    .iter()
                    .filter(|e| kind_name(e) == "phase_completed")
                    .filter_map(phase_of)
                    .collect();
                let count = completed.len();
                completed.dedup();
                return Outcome {
                    status: Some(status),
                    duplicated: completed.len() != count,
                };
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Outcome {
                status: None,
                duplicated: false,
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The whole event log, resuming from the last cursor on whichever
/// orchestrator is up when a replica dies mid-stream.
async fn watch_resuming(stack: &Arc<Mutex<Stack>>, id: &str) -> Vec<nexus_proto::v1::WorkflowEvent> {
    let mut events: Vec<nexus_proto::v1::WorkflowEvent> = Vec::new();
    loop {
        let cursor = events.last().map(|e| e.cursor.clone()).unwrap_or_default();
        let mut client = any_client(stack).await;
        let request = nexus_proto::v1::WatchWorkflowRequest {
            workflow_id: id.to_string(),
            after_cursor: cursor,
        };
        let Ok(response) = client.watch_workflow(request).await else {
            continue;
        };
        let mut stream = response.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return events,
                Err(_) => break,
            }
        }
    }
}

/// Every few seconds: SIGKILL a random worker or orchestrator, start a new one.
async fn chaos_loop(
    stack: Arc<Mutex<Stack>>,
    redis_url: String,
    model_url: String,
    done: Arc<AtomicBool>,
    kills: Arc<AtomicUsize>,
) {
    while !done.load(Ordering::SeqCst) {
        tokio::time::sleep(KILL_EVERY).await;
        if done.load(Ordering::SeqCst) {
            return;
        }
        let mut stack = stack.lock().await;
        let kill_worker = rand::rng().random_bool(0.6);
        if kill_worker {
            let victim = rand::rng().random_range(0..stack.workers.len());
            stack.workers[victim].process.kill_hard();
            let env = [("NEXUS_VISIBILITY_TIMEOUT_MS", "2000")];
            stack.workers[victim] = Worker::start(&redis_url, &model_url, &env);
        } else {
            let victim = rand::rng().random_range(0..stack.orchestrators.len());
            stack.orchestrators[victim].process.kill_hard();
            stack.orchestrators[victim] = Orchestrator::start(&redis_url, &[]);
        }
        kills.fetch_add(1, Ordering::SeqCst);
    }
}
