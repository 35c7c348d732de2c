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

    let mut ids = Vec::new();
    for n in 0..12 {
        ids.push(start(&mut client, &format!("Clustered {n}")).await);
    }
    for id in &ids {
        let events = watch_until_end(&mut client, id, "", Duration::from_secs(60)).await;
        assert_eq!(kind_name(events.last().unwrap()), "completed", "{id}");
        let workflow = wait_terminal(&mut client, id, Duration::from_secs(5)).await;
        assert_eq!(workflow.status(), WorkflowStatus::Completed);
        assert!(workflow.rating.is_some());
    }

    let shards: std::collections::HashSet<_> = ids.iter().map(|id| id.split('_').nth(1).unwrap().to_string()).collect();
    assert!(shards.len() > 1, "workflows were spread over shards: {shards:?}");
    for node in &cluster.nodes {
        let mut conn = node.client().get_multiplexed_async_connection().await.unwrap();
        let keys: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert!(keys > 0, "master on port {} holds part of the state", node.port);
    }
    let listed = client
        .list_workflows(nexus_proto::v1::ListWorkflowsRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await;
    assert_eq!(
        listed.unwrap().into_inner().workflows.len(),
        12,
        "listing merges every shard"
    );
}
