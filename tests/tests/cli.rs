//! The `nexus` command as the demo uses it: start a workflow and watch it
//! live to the final plan and rating.

use nexus_tests::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn nexus_cli_starts_a_workflow_watches_it_live_and_prints_the_rating() {
    let stack = Stack::start(1);
    let output = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "start", "--name", "CLI plan"])
        .args([
            "--description",
            "A ticketing system for a theatre",
            "--field",
            "budget=50k",
            "--watch",
        ])
        .output()
        .expect("run nexus");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nexus failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "started",
        "phase 1/6 analyse",
        "phase 6/6 rate",
        "FINAL PLAN",
        "RATING: ",
        "total: ",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    let id = stdout.split_whitespace().nth(1).expect("workflow id").to_string();
    let listed = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&id),
        "list shows the workflow"
    );
    let bad = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "get", "nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("malformed"),
        "the server's message reaches the user"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_makes_the_cli_exit_non_zero() {
    let stack = Stack::start(1);
    ModelControl::new(&stack.model.base_url())
        .inject(serde_json::json!([{"kind": "status", "status": 402, "message": "Insufficient credits"}]))
        .await;
    let output = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "start", "--name", "Unpaid"])
        .args(["--description", "A plan nobody pays for", "--watch"])
        .output()
        .expect("run nexus");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("workflow failed"), "{stdout}");
    assert_eq!(output.status.code(), Some(1), "a failed run is a failed command");
}

/// The Python client generated from `proto/` (grpcio-tools, in a virtual
/// environment `examples/python/run.sh` makes) starts a run, drops its watch
/// after five events, resumes from its last cursor, and ends with the run.
/// The witness is Redis: the cursors it printed are the stored event log.
#[tokio::test(flavor = "multi_thread")]
async fn the_generated_python_client_starts_watches_and_resumes_without_a_gap() {
    let stack = Stack::start(1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let endpoint = stack.orchestrators[0].address.to_string();
    let output = Command::new(root.join("examples/python/run.sh"))
        .args(["--endpoint", &endpoint, "--drop-after", "5"])
        .env("NEXUS_PYTHON_VENV", root.join("target/python-client-venv"))
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = stdout
        .lines()
        .find_map(|line| line.strip_prefix("started "))
        .expect("the client printed the workflow id");
    let received: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("event "))
        .map(|rest| rest.split(' ').next().unwrap())
        .collect();
    assert!(stdout.contains("disconnected; resuming after"), "{stdout}");
    assert!(stdout.contains("outcome completed"), "{stdout}");

    let mut redis = stack.redis.client().get_connection().unwrap();
    let stored: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("nexus:{{nx0}}:wf:{id}:events"))
        .arg("-")
        .arg("+")
        .query(&mut redis)
        .unwrap();
    let stored: Vec<String> = stored.ids.into_iter().map(|entry| entry.id).collect();
    assert_eq!(received, stored, "every stored event once, in order, across the resume");
}

/// Ctrl-C on `nexus start --watch` stops the watching, not the run: the CLI
/// says how to re-attach (exit 130), the run completes, and the printed
/// command picks the stream up after the last event seen.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_on_watch_leaves_the_run_going_and_says_how_to_re_attach() {
    let stack = Stack::start_with(1, 1, SLOW_MODEL);
    let child = std::process::Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "start", "--name", "Interrupted"])
        .args(["--description", "A plan watched for a moment", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nexus");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("the workflow keeps running"), "{stderr}");
    let reattach = stderr
        .lines()
        .find_map(|line| line.trim().strip_prefix("nexus watch "))
        .expect("a re-attach command");
    let id = reattach.split_whitespace().next().unwrap().to_string();
    assert!(
        reattach.contains("--after "),
        "resumes after the last event seen: {reattach}"
    );

    let mut client = connect(&stack.endpoint()).await;
    let workflow = wait_terminal(&mut client, &id, std::time::Duration::from_secs(60)).await;
    assert_eq!(workflow.status(), nexus_proto::v1::WorkflowStatus::Completed);
    let resumed = Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "watch"])
        .args(reattach.split_whitespace())
        .output()
        .unwrap();
    let rest = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{rest}");
    assert!(
        rest.contains("RATING: ") && !rest.contains("accepted:"),
        "only what came after: {rest}"
    );
}
