//! Driving the stack as clients do: many starts over several HTTP/2
//! connections, then waiting until every workflow has ended.

use nexus_proto::v1::{GetWorkflowRequest, ProjectPlan, StartWorkflowRequest, Workflow, WorkflowStatus};
use nexus_tests::Client;
use std::time::{Duration, Instant};

/// Clients on `connections` separate HTTP/2 connections.
pub async fn clients(endpoint: &str, connections: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(nexus_proto::v1::workflow_service_client::WorkflowServiceClient::new(
            channel,
        ));
    }
    clients
}

fn plan(n: usize) -> ProjectPlan {
    ProjectPlan {
        name: format!("Bench plan {n}"),
        description: "A booking system for a chain of climbing gyms: memberships, class schedules, \
                      payments and a mobile app. Four developers, nine months."
            .into(),
        fields: Default::default(),
    }
}

/// Starts `count` workflows, `concurrency` at a time; returns their ids in
/// start order and when the first start was sent.
pub async fn start_many(clients: &[Client], count: usize, concurrency: usize) -> (Vec<String>, Instant) {
    let began = Instant::now();
    let chunks: Vec<Vec<usize>> = (0..count)
        .collect::<Vec<_>>()
        .chunks(count.div_ceil(concurrency).max(1))
        .map(<[usize]>::to_vec)
        .collect();
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = format!(
        "{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let tasks = chunks.into_iter().enumerate().map(|(lane, numbers)| {
        let client = clients[lane % clients.len()].clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(numbers.len());
            for n in numbers {
                // Keyed, so a start retried after a timeout is the same workflow.
                let request = StartWorkflowRequest {
                    plan: Some(plan(n)),
                    idempotency_key: format!("bench-{run}-{n}"),
                    ..Default::default()
                };
                let started = patiently("StartWorkflow", || {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.start_workflow(request).await }
                })
                .await;
                ids.push(started.workflow_id);
            }
            ids
        })
    });
    let ids = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    (ids, began)
}

/// Status fields read per round trip while waiting for runs to end.
const STATUS_BATCH: usize = 100;

/// Waits until every run has ended, reading their status fields from Redis
/// itself, in start order: the first unfinished one alone until it ends,
/// then a hundred per round trip. BullMQ's driver learns
/// of its chains' ends from its queue's events in Redis; this is the same,
/// and the orchestrator serves none of it, so the CPU it is measured using
/// is what running the workflows cost. Asking it instead (`wait_all`) is one
/// GetWorkflow per run, most of them after the last run ended.
pub async fn wait_ended_in_redis(redis: &redis::Client, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
    use nexus_pipeline::keys::{WorkflowKeys, field, status};
    let deadline = Instant::now() + timeout;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let states = ids
        .iter()
        .map(|id| {
            Ok(WorkflowKeys::new(&nexus_pipeline::ids::WorkflowId::parse(id)?)
                .state()
                .to_string())
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    let mut rest = states.as_slice();
    let mut waiting = false;
    while let Some(first) = rest.first() {
        let batch = &rest[..rest.len().min(if waiting { 1 } else { STATUS_BATCH })];
        let mut statuses = redis::pipe();
        for state in batch {
            statuses.hget(state, field::STATUS);
        }
        let statuses: Vec<Option<String>> = statuses.query_async(&mut conn).await?;
        let ended = statuses
            .iter()
            .take_while(|stored| stored.as_deref().is_some_and(status::is_terminal))
            .count();
        rest = &rest[ended..];
        waiting = ended < batch.len();
        if waiting {
            anyhow::ensure!(Instant::now() < deadline, "workflow {first} did not end in {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Waits until every workflow is terminal; returns them.
pub async fn wait_all(client: &Client, ids: &[String], timeout: Duration) -> Vec<Workflow> {
    let deadline = Instant::now() + timeout;
    let client = client.clone();
    let mut finished = Vec::with_capacity(ids.len());
    for id in ids {
        loop {
            let request = GetWorkflowRequest {
                workflow_id: id.clone(),
                ..Default::default()
            };
            let workflow = patiently("GetWorkflow", || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.get_workflow(request).await }
            })
            .await;
            if matches!(
                workflow.status(),
                WorkflowStatus::Completed | WorkflowStatus::Failed | WorkflowStatus::Cancelled
            ) {
                finished.push(workflow);
                break;
            }
            assert!(Instant::now() < deadline, "workflow {id} did not finish in {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    finished
}

/// Reads ended runs through the API (they must all have completed); returns
/// them and the seconds from `began` to the last one's end.
pub async fn completed_runs(
    client: &Client,
    ids: &[String],
    began: Duration,
    timeout: Duration,
) -> anyhow::Result<(Vec<Workflow>, f64)> {
    let finished = wait_all(client, ids, timeout).await;
    let done = completed(&finished);
    anyhow::ensure!(done == ids.len(), "only {done} of {} workflows completed", ids.len());
    let seconds = elapsed_until_last(&finished, began);
    Ok((finished, seconds))
}

/// One RPC, retried (at most 5 times) when it fails or takes over 10 s, so
/// a benchmark never hangs on one lost call; each retry is reported.
async fn patiently<T, F, Fut>(what: &str, call: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    for attempt in 1..=5 {
        match tokio::time::timeout(Duration::from_secs(10), call()).await {
            Ok(Ok(response)) => return response.into_inner(),
            Ok(Err(status)) => eprintln!("{what} failed ({status}); retry {attempt}"),
            Err(_) => eprintln!("{what} took over 10 s; retry {attempt}"),
        }
    }
    panic!("{what} kept failing");
}

/// Seconds from `began` to the last workflow's completion as the server
/// recorded it (`updated_at`), so polling lag does not count.
pub fn elapsed_until_last(workflows: &[Workflow], began_unix: Duration) -> f64 {
    let last = workflows
        .iter()
        .filter_map(|w| w.updated_at)
        .map(|t| Duration::new(t.seconds as u64, t.nanos as u32))
        .max()
        .unwrap_or(began_unix);
    (last.saturating_sub(began_unix)).as_secs_f64()
}

pub fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

pub fn completed(workflows: &[Workflow]) -> usize {
    workflows
        .iter()
        .filter(|w| w.status() == WorkflowStatus::Completed)
        .count()
}
