//! Nexus on a real three-master Redis Cluster: every workflow's keys and its
//! shard's streams share one hash tag, so each transition is a single-slot
//! script, and shards spread the work over the masters.

use nexus_proto::v1::WorkflowStatus;
use nexus_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn workflows_run_on_a_three_master_redis_cluster_spread_over_all_masters() {
    let cluster = RedisCluster::start(3);
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "5",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "20",
    ]);
    let env = [("NEXUS_REDIS_CLUSTER", "true"), ("NEXUS_SHARDS", "6")];
    let orchestrator = Orchestrator::start(&cluster.urls(), &env);
    let _workers: Vec<_> = (0..2)
        .map(|_| Worker::start(&cluster.urls(), &model.base_url(), &env))
        .collect();
    let mut client = connect(&orchestrator.endpoint()).await;

    // Start until every one of the six shards has a workflow (the shard is
    // drawn from the idempotency key), then a few more.
    let mut ids: Vec<String> = Vec::new();
    let shard_of = |id: &str| id.split('_').nth(1).unwrap().to_string();
    for n in 0..60 {
        let covered: std::collections::HashSet<_> = ids.iter().map(|id| shard_of(id)).collect();
        if covered.len() == 6 && ids.len() >= 12 {
            break;
        }
        let request = nexus_proto::v1::StartWorkflowRequest {
            plan: Some(sample_plan(&format!("Clustered {n}"))),
            idempotency_key: format!("clustered-{n}"),
            ..Default::default()
        };
        ids.push(client.start_workflow(request).await.unwrap().into_inner().workflow_id);
    }
    for id in &ids {
        let events = watch_until_end(&mut client, id, "", Duration::from_secs(60)).await;
        assert_eq!(kind_name(events.last().unwrap()), "completed", "{id}");
        let workflow = wait_terminal(&mut client, id, Duration::from_secs(5)).await;
        assert_eq!(workflow.status(), WorkflowStatus::Completed);
        assert!(workflow.rating.is_some());
    }

    let shards: std::collections::HashSet<_> = ids.iter().map(|id| shard_of(id)).collect();
    assert_eq!(shards.len(), 6, "the workflows cover all six shards: {shards:?}");
    // Ask each master itself which workflows' state it holds: every master
    // must hold some, and together exactly the workflows started. (Stream
    // groups exist on every master from start-up; state keys only where
    // shards really live.)
    let mut held = Vec::new();
    for node in &cluster.nodes {
        let mut conn = node.client().get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("nexus:*:wf:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let states: Vec<String> = keys
            .into_iter()
            .filter(|key| !key.ends_with(":events") && !key.ends_with(":outputs"))
            .collect();
        assert!(!states.is_empty(), "master on port {} holds workflow state", node.port);
        for state in &states {
            let record: Option<String> = redis::cmd("HGET")
                .arg(state)
                .arg("idem_key")
                .query_async(&mut conn)
                .await
                .unwrap();
            let ttl: i64 = redis::cmd("TTL")
                .arg(record.unwrap())
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(ttl > 0, "the idempotency record of {state} expires with it (ttl {ttl})");
        }
        held.extend(states);
    }
    held.sort();
    let mut expected: Vec<String> = ids
        .iter()
        .map(|id| format!("nexus:{{nx{}}}:wf:{id}", shard_of(id)))
        .collect();
    expected.sort();
    assert_eq!(held, expected);
    let listed = client
        .list_workflows(nexus_proto::v1::ListWorkflowsRequest {
            page_size: 100,
            page_token: String::new(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        listed.unwrap().into_inner().workflows.len(),
        ids.len(),
        "listing merges every shard"
    );
}
