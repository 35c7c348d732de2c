//! A phase whose answer is megabytes long (a long enterprise plan) flows to
//! a client with gRPC's default 4 MiB message limit: deltas come in small
//! events, the completed events leave the text out and say how long it is,
//! a watcher can drop off mid-phase and resume by cursor, and GetWorkflow
//! can leave bodies out. The witness is Redis's copy of the output.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{GetWorkflowRequest, StartWorkflowRequest, WatchWorkflowRequest, WorkflowEvent, WorkflowStatus};
use nexus_tests::*;
use redis::Commands;
use std::time::Duration;

/// One phase, whose output is the final plan.
const ONE_PHASE: &str = r#"
name = "write"
final_output = "write"

[[phases]]
name = "write"
role = "primary"
inputs = ["plan"]
prompt = "Write the complete plan for: {{plan}}"
"#;

const ANSWER_BYTES: usize = 5 * 1024 * 1024;

fn delta_text(event: &WorkflowEvent) -> Option<&str> {
    match &event.kind {
        Some(Kind::PhaseOutputDelta(delta)) => Some(&delta.text),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_five_megabyte_answer_completes_and_is_watchable_and_resumable_under_the_default_message_limit() {
    let dir = std::env::temp_dir().join(format!("nexus-large-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("write.toml"), ONE_PHASE).unwrap();
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let pipelines = dir.to_string_lossy().into_owned();
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_PIPELINES_DIR", pipelines.as_str())]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    ModelControl::new(&model.base_url())
        .inject(serde_json::json!([{"kind": "long", "bytes": ANSWER_BYTES}]))
        .await;
    // A client with tonic's defaults: at most 4 MiB per message received.
    let mut client = connect(&orchestrator.endpoint()).await;
    let request = StartWorkflowRequest {
        plan: Some(sample_plan("Long plan")),
        pipeline: "write".into(),
        ..Default::default()
    };
    let id = client.start_workflow(request).await.unwrap().into_inner().workflow_id;

    // Watch until about a megabyte has arrived, then drop off mid-phase.
    let watch = |after: &str| WatchWorkflowRequest {
        workflow_id: id.clone(),
        after_cursor: after.to_string(),
        ..Default::default()
    };
    let mut first = client.watch_workflow(watch("")).await.unwrap().into_inner();
    let mut seen: Vec<WorkflowEvent> = Vec::new();
    let mut received = 0;
    while received < 1024 * 1024 {
        let event = first
            .message()
            .await
            .expect("no message over the limit")
            .expect("the stream goes on");
        received += delta_text(&event).map_or(0, str::len);
        seen.push(event);
    }
    drop(first);
    let cursor = seen.last().unwrap().cursor.clone();
    let rest = watch_until_end(&mut client, &id, &cursor, Duration::from_secs(60)).await;
    assert!(
        matches!(rest.last().and_then(|e| e.kind.as_ref()), Some(Kind::Completed(_))),
        "the resumed stream ends with the completed event"
    );
    seen.extend(rest);

    // The deltas, once each, are exactly the output Redis holds.
    let mut redis = redis.client().get_connection().unwrap();
    let shard = id.split('_').nth(1).unwrap();
    let stored: String = redis
        .hget(format!("nexus:{{nx{shard}}}:wf:{id}:outputs"), "write")
        .unwrap();
    assert!(stored.len() >= ANSWER_BYTES, "{} bytes stored", stored.len());
    assert!(stored.contains("stand-in"), "the stand-in says the text is its own");
    let streamed: String = seen.iter().filter_map(delta_text).collect();
    assert_eq!(streamed.len(), stored.len());
    assert!(
        streamed == stored,
        "the deltas, resumed mid-phase, are the stored output"
    );
    let largest = seen.iter().filter_map(delta_text).map(str::len).max().unwrap();
    assert!(largest <= 16 * 1024, "a delta carries at most 16 KiB, not {largest}");
    let cursors: Vec<&str> = seen.iter().map(|e| e.cursor.as_str()).collect();
    assert!(
        cursors.windows(2).all(|w| cursor_key(w[0]) < cursor_key(w[1])),
        "no event twice"
    );

    // The completed events say how long the text is instead of repeating it.
    let completed = seen
        .iter()
        .find_map(|event| match &event.kind {
            Some(Kind::PhaseCompleted(completed)) => Some(completed.clone()),
            _ => None,
        })
        .unwrap();
    assert!(completed.output_omitted && completed.output.is_empty());
    assert_eq!(completed.output_bytes, stored.len() as u64);
    let Some(Kind::Completed(finished)) = &seen.last().unwrap().kind else {
        unreachable!()
    };
    assert!(finished.final_plan_omitted && finished.final_plan_bytes == stored.len() as u64);

    // GetWorkflow leaves the bodies out on request; in full it needs a larger limit.
    let light = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.clone(),
            omit_outputs: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(light.status(), WorkflowStatus::Completed);
    assert_eq!(light.phases[0].output_bytes, stored.len() as u64);
    assert!(light.final_plan.is_empty() && light.phases[0].output.is_empty());
    let mut roomy = connect(&orchestrator.endpoint())
        .await
        .max_decoding_message_size(64 * 1024 * 1024);
    let full = roomy
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        full.final_plan == stored,
        "GetWorkflow's final plan is the stored output"
    );
    assert_eq!(ModelControl::new(&model.base_url()).requests().await.len(), 1);
}
