//! Operators' tools, as an operator uses them: dead letters listed and
//! requeued (over gRPC and with `nexus dead-letters`), and queue depth per
//! shard (`nexus queues`). Each answer is checked against Redis itself
//! (`XRANGE`, `XLEN`) and the stand-in's ledger of model calls, not against
//! the service's own word.

use nexus_proto::v1::operations_service_client::OperationsServiceClient;
use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{
    DeadLetterRef, GetWorkflowRequest, ListDeadLettersRequest, QueueStatsRequest, RequeueDeadLettersRequest,
    ShardStats, WorkflowEvent, WorkflowStatus,
};
use nexus_tests::*;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Operations = OperationsServiceClient<Channel>;

const DEAD_LETTERS: &str = "nexus:{nx0}:deadletter";

async fn operations(endpoint: &str) -> Operations {
    OperationsServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect to orchestrator")
}

fn nexus(endpoint: &str, args: &[&str]) -> Output {
    Command::new(binary("nexus"))
        .args(["--endpoint", endpoint])
        .args(args)
        .output()
        .expect("run nexus")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A dead-letter stream entry as Redis holds it: its id and fields.
struct RawDeadLetter {
    id: String,
    fields: std::collections::HashMap<String, redis::Value>,
}

impl RawDeadLetter {
    fn text(&self, field: &str) -> String {
        match self.fields.get(field) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            other => panic!("field {field} of {} is {other:?}", self.id),
        }
    }
}

fn xrange(conn: &mut redis::Connection, key: &str) -> Vec<RawDeadLetter> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(conn).unwrap();
    reply
        .ids
        .into_iter()
        .map(|entry| RawDeadLetter {
            id: entry.id,
            fields: entry.map,
        })
        .collect()
}

fn xlen(conn: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query(conn).unwrap()
}

fn started(event: &WorkflowEvent) -> Option<(u32, u32)> {
    match &event.kind {
        Some(Kind::PhaseStarted(started)) => Some((started.index, started.delivery)),
        _ => None,
    }
}

/// Polls until `done` holds, or panics with `what` after `timeout`.
async fn eventually<T>(timeout: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A run whose third phase kills every worker that starts it ends as a dead
/// letter; `nexus dead-letters list` and ListDeadLetters show it as the
/// dead-letter stream holds it; `nexus dead-letters requeue` starts a fork
/// that copies the two finished phases (no model call) and completes, and
/// the dead letter is gone from Redis. Requeueing it again finds nothing; a
/// dead letter that is no task cannot be requeued and stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_listed_as_redis_holds_it_and_requeued_as_a_fork_that_skips_finished_phases() {
    let mut stack = Stack::start_with(1, 0, SLOW_MODEL);
    let endpoint = stack.endpoint();
    let env = [("NEXUS_VISIBILITY_TIMEOUT_MS", "800"), ("NEXUS_MAX_DELIVERIES", "2")];
    let mut client = connect(&endpoint).await;
    let mut ops = operations(&endpoint).await;
    let mut redis = stack.redis.client().get_connection().unwrap();
    let id = start(&mut client, "Poisoned third phase").await;

    // Phases 1 and 2 complete; each start of phase 3 takes its worker down.
    for delivery in 1..=2u32 {
        stack
            .workers
            .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &env));
        wait_for_event(&mut client, &id, Duration::from_secs(30), |e| {
            started(e) == Some((2, delivery))
        })
        .await;
        stack.workers.last_mut().unwrap().process.kill_hard();
    }
    stack
        .workers
        .push(Worker::start(&stack.redis.url(), &stack.model.base_url(), &env));
    let failed = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(failed.status(), WorkflowStatus::Failed, "{}", failed.reason);
    // And a dead letter that is no task at all.
    let _: String = redis::cmd("XADD")
        .arg("nexus:{nx0}:tasks")
        .arg("*")
        .arg("m")
        .arg(b"\xff\xffnot a task".to_vec())
        .query(&mut redis)
        .unwrap();
    eventually(Duration::from_secs(20), "the junk task is dead-lettered", async || {
        (xlen(&mut redis, DEAD_LETTERS) == 2).then_some(())
    })
    .await;

    // Listed over gRPC exactly as Redis holds it.
    let raw = xrange(&mut redis, DEAD_LETTERS);
    let listed = ops
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.next_page_token.is_empty());
    let ids: Vec<_> = listed.dead_letters.iter().map(|d| d.entry_id.as_str()).collect();
    assert_eq!(ids, raw.iter().map(|r| r.id.as_str()).collect::<Vec<_>>());
    let (poison, junk) = (&listed.dead_letters[0], &listed.dead_letters[1]);
    assert_eq!(
        (
            poison.shard,
            poison.workflow_id.as_str(),
            poison.phase_index,
            poison.phase.as_str()
        ),
        (0, id.as_str(), 2, "enterprise_plan")
    );
    assert_eq!(poison.reason, raw[0].text("reason"));
    assert_eq!(poison.reason, failed.reason, "the reason the run failed with");
    assert_eq!(poison.deliveries.to_string(), raw[0].text("deliveries"));
    assert_eq!(poison.task_entry_id, raw[0].text("task_id"));
    let at = poison.dead_lettered_at.unwrap();
    let id_ms: i64 = raw[0].id.split('-').next().unwrap().parse().unwrap();
    assert_eq!(at.seconds * 1000 + i64::from(at.nanos / 1_000_000), id_ms);
    assert!(poison.requeued_as.is_empty());
    assert!(junk.workflow_id.is_empty(), "{junk:?}");
    assert!(junk.reason.contains("undecodable"), "{}", junk.reason);
    assert_eq!(junk.reason, raw[1].text("reason"));
    // A page at a time, the same entries.
    let first = ops
        .list_dead_letters(ListDeadLettersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let second = ops
        .list_dead_letters(ListDeadLettersRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.dead_letters, listed.dead_letters[..1]);
    assert_eq!(second.dead_letters, listed.dead_letters[1..]);
    assert!(second.next_page_token.is_empty());

    // And by the CLI, one line each.
    let output = nexus(&endpoint, &["dead-letters", "list"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = stdout(&output);
    let line_of = |entry: &str| {
        let name = format!("0:{entry} ");
        text.lines()
            .find(|line| line.starts_with(&name))
            .unwrap_or_else(|| panic!("no line for {name} in\n{text}"))
            .to_string()
    };
    let poison_line = line_of(&raw[0].id);
    for expected in [id.as_str(), "3 enterprise_plan", &raw[0].text("reason")] {
        assert!(poison_line.contains(expected), "{expected:?} not in {poison_line:?}");
    }
    assert!(line_of(&raw[1].id).contains("undecodable"));

    // Requeued: a fork runs phases 3 to 6, and only those call the model.
    let calls_before = ModelControl::new(&stack.model.base_url()).requests().await.len();
    let poison_name = format!("0:{}", raw[0].id);
    let output = nexus(&endpoint, &["dead-letters", "requeue", &poison_name]);
    let text = stdout(&output);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fork_id = text
        .split_whitespace()
        .skip_while(|word| *word != "as")
        .nth(1)
        .unwrap_or_else(|| panic!("no fork id in {text:?}"))
        .to_string();
    assert_ne!(fork_id, id);
    let fork = wait_terminal(&mut client, &fork_id, Duration::from_secs(60)).await;
    assert_eq!(fork.status(), WorkflowStatus::Completed, "{}", fork.reason);
    assert_eq!((fork.parent_workflow_id.as_str(), fork.fork_phase), (id.as_str(), 2));
    let copied: Vec<_> = fork.phases.iter().map(|p| p.copied_from.as_str()).collect();
    assert_eq!(copied, [id.as_str(), id.as_str(), "", "", "", ""]);
    let calls_after = ModelControl::new(&stack.model.base_url()).requests().await.len();
    assert_eq!(calls_after - calls_before, 4, "one call for each of phases 3 to 6");
    let events = watch_until_end(&mut client, &fork_id, "", Duration::from_secs(10)).await;
    let run: Vec<_> = events.iter().filter_map(started).map(|(index, _)| index).collect();
    assert_eq!(run, [2, 3, 4, 5], "the fork started no copied phase");
    // The parent stays failed, as its watchers saw it.
    let parent = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.clone(),
            omit_outputs: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parent.status(), WorkflowStatus::Failed);

    // Gone from Redis; the junk stays.
    let left: Vec<_> = xrange(&mut redis, DEAD_LETTERS).into_iter().map(|r| r.id).collect();
    assert_eq!(left, [raw[1].id.clone()]);
    let again = nexus(&endpoint, &["dead-letters", "requeue", &poison_name]);
    assert_eq!(again.status.code(), Some(1), "{}", stdout(&again));
    assert!(stdout(&again).contains("not found"), "{}", stdout(&again));
    let all = ops
        .requeue_dead_letters(RequeueDeadLettersRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requeued;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].entry_id, raw[1].id);
    assert!(all[0].error.contains("cannot be decoded"), "{}", all[0].error);
    assert!(all[0].new_workflow_id.is_empty());
    assert_eq!(xlen(&mut redis, DEAD_LETTERS), 1, "the junk stays");
    let named = ops
        .requeue_dead_letters(RequeueDeadLettersRequest {
            entries: vec![DeadLetterRef {
                shard: 0,
                entry_id: raw[0].id.clone(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requeued;
    assert!(named[0].error.contains("not found"), "{named:?}");
    let bad_shard = ops
        .requeue_dead_letters(RequeueDeadLettersRequest {
            entries: vec![DeadLetterRef {
                shard: 7,
                entry_id: raw[1].id.clone(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_shard.code(), tonic::Code::InvalidArgument);
}

fn shard_stats(shards: &[ShardStats], shard: u32) -> &ShardStats {
    shards.iter().find(|s| s.shard == shard).expect("every shard reported")
}

/// With no worker, every started run's first task waits: QueueStats and
/// `nexus queues` report per shard what `XLEN` of its task stream says.
/// Once a worker joins, the queues drain to zero.
#[tokio::test(flavor = "multi_thread")]
async fn queue_stats_match_the_task_streams_and_show_them_drain() {
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let shards = [("NEXUS_SHARDS", "2")];
    let orchestrator = Orchestrator::start(&redis.url(), &shards);
    let endpoint = orchestrator.endpoint();
    let mut client = connect(&endpoint).await;
    let mut ops = operations(&endpoint).await;
    let mut conn = redis.client().get_connection().unwrap();
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(start(&mut client, &format!("Queued {n}")).await);
    }

    let stats = ops.queue_stats(QueueStatsRequest {}).await.unwrap().into_inner().shards;
    assert_eq!(stats.len(), 2);
    let cli = nexus(&endpoint, &["queues"]);
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let table = stdout(&cli);
    let mut total = 0;
    for shard in 0..2u32 {
        let queued = xlen(&mut conn, &format!("nexus:{{nx{shard}}}:tasks"));
        total += queued;
        let s = shard_stats(&stats, shard);
        assert_eq!(s.queued, queued, "shard {shard}");
        assert_eq!(
            (s.pending, s.consumers, s.lag),
            (0, 0, queued as i64),
            "shard {shard}: {s:?}"
        );
        assert_eq!((s.dead_letters, s.awaiting_approval, s.oldest_pending_ms), (0, 0, 0));
        let row: Vec<_> = table
            .lines()
            .find(|line| line.split_whitespace().next() == Some(&shard.to_string()))
            .unwrap_or_else(|| panic!("no row for shard {shard} in\n{table}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[1], queued.to_string(), "QUEUED of shard {shard} in\n{table}");
    }
    assert_eq!(total, 6, "one task per run");

    let _worker = Worker::start(&redis.url(), &model.base_url(), &shards);
    let drained = eventually(Duration::from_secs(60), "the queues drain", async || {
        let stats = ops.queue_stats(QueueStatsRequest {}).await.unwrap().into_inner().shards;
        stats.iter().all(|s| s.queued == 0 && s.pending == 0).then_some(stats)
    })
    .await;
    assert_all_completed(&mut client, &ids, Duration::from_secs(30)).await;
    for shard in 0..2u32 {
        assert_eq!(xlen(&mut conn, &format!("nexus:{{nx{shard}}}:tasks")), 0);
        let s = shard_stats(&drained, shard);
        assert_eq!((s.lag, s.consumers), (0, 1), "shard {shard}: {s:?}");
    }
}

/// The operators' tools are for admin tokens: a tenant's token is refused
/// (PERMISSION_DENIED), as is a call without one; an admin's works, from
/// the CLI too.
#[tokio::test(flavor = "multi_thread")]
async fn only_admin_tokens_may_use_the_operators_tools() {
    let redis = RedisServer::start();
    let tokens = std::env::temp_dir().join(format!("nexus-operator-tokens-{}-{}", std::process::id(), free_port()));
    std::fs::write(&tokens, "acme acme-token-0123456789\nops ops-token-0123456789 admin\n").unwrap();
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_TOKENS_FILE", tokens.to_str().unwrap())]);
    let endpoint = orchestrator.endpoint();
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stats_with = |token: Option<&str>| {
        let mut request = tonic::Request::new(QueueStatsRequest {});
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut ops = OperationsServiceClient::new(channel.clone());
        async move { ops.queue_stats(request).await }
    };
    let tenant = stats_with(Some("acme-token-0123456789")).await.unwrap_err();
    assert_eq!(tenant.code(), tonic::Code::PermissionDenied, "{tenant:?}");
    let nobody = stats_with(None).await.unwrap_err();
    assert_eq!(nobody.code(), tonic::Code::Unauthenticated, "{nobody:?}");
    let admin = stats_with(Some("ops-token-0123456789")).await.unwrap().into_inner();
    assert_eq!(admin.shards.len(), 1);

    let refused = nexus(&endpoint, &["--token", "acme-token-0123456789", "dead-letters", "list"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin token"));
    let listed = nexus(&endpoint, &["--token", "ops-token-0123456789", "dead-letters", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(stdout(&listed), "no dead letters\n");
    let _ = std::fs::remove_file(&tokens);
}
