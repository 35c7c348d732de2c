//! The `nexus` command as the demo uses it: start a workflow and watch it
//! live to the final plan and rating; `nexus run` on a Markdown plan; `get`
//! as Markdown and JSON; plain output when stdout is no terminal.

use nexus_proto::v1::{Phase, ProjectPlan, Rating, WorkflowStatus};
use nexus_tests::*;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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

    let stored = stored_cursors(&stack.redis.client(), id);
    assert_eq!(received, stored, "every stored event once, in order, across the resume");
}

/// `nexus start --watch` in the background, its output piped.
fn start_watching(stack: &Stack, name: &str, description: &str) -> std::process::Child {
    std::process::Command::new(binary("nexus"))
        .args(["--endpoint", &stack.endpoint(), "start", "--name", name])
        .args(["--description", description, "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nexus")
}

/// Ctrl-C, as a terminal sends it: SIGINT to the process.
fn interrupt(child: &std::process::Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A Ctrl-C that comes while the CLI is busy printing an event is not lost.
/// Its stdout here is a pipe nobody reads until after the signal, and long
/// answers fill it, so the CLI is blocked writing when the signal arrives.
/// It must still stop watching (exit 130) once its output drains, not
/// watch on to the end of the run (exit 0) as it did when it listened for
/// Ctrl-C afresh for each event.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_printing_an_event_still_stops_the_watch() {
    let long_answers = [
        "--first-token-latency-ms",
        "0",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "20000",
    ];
    let stack = Stack::start_with(1, 1, &long_answers);
    let mut child = start_watching(&stack, "Busy printing", "A plan with long answers");
    // Long enough for the answers to fill the unread pipe (a phase prints
    // about 120 KB; a pipe holds 64 KB).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    interrupt(&child);
    let mut stdout = child.stdout.take().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()).unwrap());
    let output = child.wait_with_output().unwrap();
    let printed = drain.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        printed > 64 * 1024,
        "the pipe was full when the signal came: {printed} bytes"
    );
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("the workflow keeps running"), "{stderr}");
}

/// Ctrl-C on `nexus start --watch` stops the watching, not the run: the CLI
/// says how to re-attach (exit 130), the run completes, and the printed
/// command picks the stream up after the last event seen.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_on_watch_leaves_the_run_going_and_says_how_to_re_attach() {
    let stack = Stack::start_with(1, 1, SLOW_MODEL);
    let child = start_watching(&stack, "Interrupted", "A plan watched for a moment");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    interrupt(&child);
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

/// `nexus` with the stack's endpoint and `args`, stdout and stderr piped.
fn nexus(stack_endpoint: &str, args: &[&str]) -> Output {
    Command::new(binary("nexus"))
        .args(["--endpoint", stack_endpoint])
        .args(args)
        .output()
        .expect("run nexus")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "nexus exited {:?}:\n{}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

/// The workflow id from the CLI's "workflow <id> started" line.
fn started_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("workflow ")?.strip_suffix(" started"))
        .unwrap_or_else(|| panic!("no started line in:\n{stdout}"))
        .to_string()
}

/// A workflow as Redis holds it: its state hash and its outputs hash.
struct Stored {
    state: HashMap<String, Vec<u8>>,
    outputs: HashMap<String, String>,
}

impl Stored {
    fn read(redis: &RedisServer, id: &str) -> Self {
        let mut conn = redis.client().get_connection().unwrap();
        let key = format!("nexus:{{nx0}}:wf:{id}");
        let state: HashMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
        let outputs = redis::cmd("HGETALL")
            .arg(format!("{key}:outputs"))
            .query(&mut conn)
            .unwrap();
        assert!(!state.is_empty(), "no state for {id}");
        Self { state, outputs }
    }

    fn text(&self, field: &str) -> String {
        String::from_utf8(self.state.get(field).cloned().unwrap_or_default()).unwrap()
    }

    fn plan(&self) -> ProjectPlan {
        ProjectPlan::decode(self.state["plan"].as_slice()).unwrap()
    }

    fn rating(&self) -> Rating {
        Rating::decode(self.state["rating"].as_slice()).unwrap()
    }

    /// The completed phases' records, in order.
    fn phases(&self) -> Vec<Phase> {
        let mut phases: Vec<Phase> = (0..)
            .map_while(|index| self.state.get(&format!("phase:{index}")))
            .map(|bytes| Phase::decode(bytes.as_slice()).unwrap())
            .collect();
        phases.sort_by_key(|phase| phase.index);
        phases
    }
}

/// The text of a `## heading` section of a Markdown document, up to the next.
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let marker = format!("\n## {heading}\n\n");
    let start = markdown
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{markdown}"))
        + marker.len();
    let rest = &markdown[start..];
    &rest[..rest.find("\n\n## ").unwrap_or(rest.trim_end().len())]
}

/// The row a phase record makes in the Markdown phase table.
fn phase_row(phase: &Phase) -> String {
    let usage = phase.usage.unwrap();
    format!(
        "| {} | {} | {} | completed | {} | {} | {:.4} | {:.1} s |",
        phase.index + 1,
        phase.name,
        phase.model,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cost_usd,
        phase.duration_ms as f64 / 1000.0
    )
}

/// A folder of its own under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nexus-test-{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary path is UTF-8")
}

/// A pipeline whose first phase's prompt is the plan alone, so the
/// stand-in's ledger (the first 160 characters of each prompt) shows the
/// whole plan as the models got it.
const PLAN_FIRST_PIPELINE: &str = r#"
name = "plan-first"
final_output = "revise"

[[phases]]
name = "read"
role = "primary"
inputs = ["plan"]
system = "Read the plan."
prompt = "{{plan}}"

[[phases]]
name = "revise"
role = "reviewer"
inputs = ["plan", "read"]
system = "Revise the plan."
prompt = "Revise {{plan}} after {{read}}"

[[phases]]
name = "rate"
role = "reviewer"
inputs = ["revise"]
output = "rating"
system = "Rate the plan."
prompt = "Rate {{revise}}"
"#;

const TICKETS_PLAN: &str = "---\n# fields for the models\nbudget: 50k EUR\nteam: \"3 people\"\n---\n\
                            # Ticket Office\n\nSell theatre tickets online.\n";

/// `nexus run plan.md`: the front matter's fields, the heading's name and the
/// body reach the run (read back with `get --format json`, and in the prompt
/// the stand-in saw) with the run's options; the run is watched live; the
/// Markdown written beside the plan holds the final-plan phase's output and
/// the rating exactly as Redis does, a row per phase, and is byte for byte
/// what `get --format md` prints.
#[tokio::test(flavor = "multi_thread")]
async fn nexus_run_starts_a_markdown_plan_and_writes_its_final_plan_and_rating_beside_it() {
    let pipelines = TempDir::new("pipelines");
    pipelines.write("plan-first.toml", PLAN_FIRST_PIPELINE);
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_PIPELINES_DIR", path_arg(&pipelines.0))]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let plans = TempDir::new("plans");
    let plan = plans.write("tickets.md", TICKETS_PLAN);

    let output = nexus(
        &orchestrator.endpoint(),
        &[
            "run",
            path_arg(&plan),
            "--pipeline",
            "plan-first",
            "--model",
            "reviewer=openai/gpt-5",
            "--instructions",
            "Answer in English.",
        ],
    );
    let stdout = stdout_of(&output);
    let written = plans.0.join("tickets.nexus.md");
    for expected in [
        "accepted: \"Ticket Office\", pipeline plan-first with 3 phases",
        "── phase 1/3 read",
        "── phase 3/3 rate",
        "FINAL PLAN",
        &format!("final plan and rating written to {}", written.display()),
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    let id = started_id(&stdout);

    // What the run got, read back as JSON.
    let json: serde_json::Value = serde_json::from_str(&stdout_of(&nexus(
        &orchestrator.endpoint(),
        &["get", &id, "--format", "json"],
    )))
    .expect("get --format json is JSON");
    assert_eq!(json["plan"]["name"], "Ticket Office", "the heading names the run");
    assert_eq!(json["plan"]["description"], "Sell theatre tickets online.");
    assert_eq!(
        json["plan"]["fields"],
        serde_json::json!({"budget": "50k EUR", "team": "3 people"})
    );
    assert_eq!(json["pipeline"], "plan-first");
    assert_eq!(json["models"]["reviewer"], "openai/gpt-5");
    assert_eq!(json["instructions"], "Answer in English.");

    // What the models saw.
    let calls = ModelControl::new(&model.base_url()).requests().await;
    let asked: Vec<&str> = calls.iter().map(|call| call["model"].as_str().unwrap()).collect();
    assert_eq!(asked, ["anthropic/claude-sonnet-4.5", "openai/gpt-5", "openai/gpt-5"]);
    let first_prompt = calls[0]["prompt_excerpt"].as_str().unwrap();
    assert!(
        first_prompt
            .starts_with("Project: Ticket Office\n\nSell theatre tickets online.\n\nbudget: 50k EUR\nteam: 3 people"),
        "the plan as the model got it: {first_prompt:?}"
    );
    for call in &calls {
        assert!(
            call["system_tail"].as_str().unwrap().ends_with("Answer in English."),
            "{call}"
        );
    }

    // The Markdown against Redis.
    let markdown = std::fs::read_to_string(&written).expect("the final plan was written beside the plan");
    let stored = Stored::read(&redis, &id);
    assert_eq!(stored.text("status"), "completed");
    assert!(markdown.starts_with("# Ticket Office\n"), "{markdown}");
    assert_eq!(
        section(&markdown, "Final plan"),
        stored.outputs["revise"],
        "the final-plan phase's output"
    );
    let rating = stored.rating();
    let reasons: Vec<String> = rating.reasons.iter().map(|reason| format!("- {reason}")).collect();
    assert_eq!(
        section(&markdown, &format!("Rating: {}/10", rating.score)),
        reasons.join("\n")
    );
    let phases = stored.phases();
    assert_eq!(phases.len(), 3);
    for phase in &phases {
        let row = phase_row(phase);
        assert!(markdown.contains(&row), "missing {row:?} in:\n{markdown}");
    }
    let get_md = stdout_of(&nexus(&orchestrator.endpoint(), &["get", &id, "--format", "md"]));
    assert_eq!(get_md, markdown, "run and get --format md write the same document");
}

/// `nexus run` on a run that fails: exit status 1 like `watch`, and no
/// file, so a good plan from an earlier run is never replaced by nothing.
#[tokio::test(flavor = "multi_thread")]
async fn nexus_run_of_a_failed_run_exits_1_and_writes_nothing() {
    let stack = Stack::start(1);
    ModelControl::new(&stack.model.base_url())
        .inject(serde_json::json!([{"kind": "status", "status": 402, "message": "Insufficient credits"}]))
        .await;
    let plans = TempDir::new("failed-plan");
    let plan = plans.write("unpaid.md", "# Unpaid\n\nA plan nobody pays for.\n");
    let out = plans.0.join("result.md");
    let output = nexus(&stack.endpoint(), &["run", path_arg(&plan), "--out", path_arg(&out)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("workflow failed"));
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert!(!out.exists(), "no file for a failed run");
}

/// `nexus get --format json`: every field a user reads is what Redis holds
/// for the run (plan, status, each phase's record and output, final plan,
/// rating, times), under the proto's field names.
#[tokio::test(flavor = "multi_thread")]
async fn nexus_get_format_json_is_the_workflow_as_redis_holds_it() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "JSON plan").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);

    let json: serde_json::Value =
        serde_json::from_str(&stdout_of(&nexus(&stack.endpoint(), &["get", &id, "--format", "json"])))
            .expect("get --format json is JSON");
    let stored = Stored::read(&stack.redis, &id);
    assert_eq!(json["workflow_id"], id);
    assert_eq!(stored.text("status"), "completed");
    assert_eq!(json["status"], "WORKFLOW_STATUS_COMPLETED");
    let plan = stored.plan();
    assert_eq!(json["plan"]["name"], plan.name);
    assert_eq!(json["plan"]["description"], plan.description);
    assert_eq!(json["plan"]["fields"], serde_json::to_value(&plan.fields).unwrap());
    assert_eq!(json["pipeline"], "enterprise-plan");

    let phases = stored.phases();
    assert_eq!(json["phases"].as_array().unwrap().len(), 6);
    assert_eq!(phases.len(), 6);
    let mut prompt_tokens = 0;
    for (shown, record) in json["phases"].as_array().unwrap().iter().zip(&phases) {
        let usage = record.usage.unwrap();
        prompt_tokens += usage.prompt_tokens;
        assert_eq!(shown["index"], record.index);
        assert_eq!(shown["name"], record.name);
        assert_eq!(shown["model"], record.model);
        assert_eq!(shown["status"], "PHASE_STATUS_COMPLETED");
        assert_eq!(shown["output"], stored.outputs[&record.name]);
        assert_eq!(shown["usage"]["prompt_tokens"], usage.prompt_tokens);
        assert_eq!(shown["usage"]["completion_tokens"], usage.completion_tokens);
        assert_eq!(shown["usage"]["reasoning_tokens"], usage.reasoning_tokens);
        assert_eq!(shown["usage"]["cost_usd"].as_f64().unwrap(), usage.cost_usd);
        assert_eq!(shown["duration_ms"], record.duration_ms);
        assert_eq!(shown["tries"], record.tries);
        assert_eq!(shown["finish_reason"], record.finish_reason);
        assert_eq!(shown["generation_id"], record.generation_id);
        assert!(!record.generation_id.is_empty());
    }
    assert_eq!(json["total_usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(json["final_plan"], stored.outputs["improve"]);
    let rating = stored.rating();
    assert_eq!(json["rating"]["score"], rating.score);
    assert_eq!(
        json["rating"]["reasons"],
        serde_json::to_value(&rating.reasons).unwrap()
    );
    assert_eq!(json["created_at"], rfc3339_of_ms(&stored.text("created_ms")));
    assert_eq!(json["updated_at"], rfc3339_of_ms(&stored.text("updated_ms")));
    assert_eq!(json["reason"], "");
    assert!(json["budget"].is_null(), "no cost cap, no budget");
}

/// Milliseconds since the epoch in RFC 3339, as GNU `date` writes them
/// (a second witness besides the CLI's own calendar arithmetic).
fn rfc3339_of_ms(ms: &str) -> String {
    let ms: i64 = ms.parse().unwrap();
    let output = Command::new("date")
        .args(["-u", "-d", &format!("@{}", ms / 1000), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .expect("date on PATH");
    let seconds = String::from_utf8(output.stdout).unwrap();
    let fraction = if ms % 1000 == 0 {
        String::new()
    } else {
        format!(".{:03}", ms % 1000)
    };
    format!("{}{fraction}Z", seconds.trim())
}

/// Piped, the CLI writes plain lines: no escape codes, no carriage
/// returns, no blank separator lines, each phase's streamed text (and a
/// reviewer's reasoning) as whole lines of their own. The same command on a
/// terminal (a pseudo-terminal from `script`) is coloured, so the plainness
/// comes from the check, not from output that never had colour.
#[tokio::test(flavor = "multi_thread")]
async fn piped_output_is_plain_lines_without_escape_codes_or_carriage_returns() {
    let stack = Stack::start(1);
    let piped = stdout_of(&nexus(
        &stack.endpoint(),
        &[
            "start",
            "--name",
            "Piped",
            "--description",
            "A plan for a log file",
            "--watch",
        ],
    ));
    assert!(!piped.contains('\x1b'), "an escape code in:\n{piped:?}");
    assert!(!piped.contains('\r'), "a carriage return in:\n{piped:?}");
    assert!(!piped.contains("\n\n"), "a blank line in:\n{piped}");
    let id = started_id(&piped);
    let mut client = connect(&stack.endpoint()).await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(10)).await;
    let lines: Vec<&str> = piped.lines().collect();
    for phase in &workflow.phases {
        assert!(
            lines.contains(&phase.output.as_str()),
            "{}'s text is not a line of its own in:\n{piped}",
            phase.name
        );
    }
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("(thinking) [stand-in reasoning")),
        "the reviewer's reasoning on lines of its own:\n{piped}"
    );

    let command = format!(
        "{} --endpoint {} start --name Coloured --description 'A plan for a person' --watch",
        binary("nexus").display(),
        stack.endpoint()
    );
    let on_terminal = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) on PATH");
    let shown = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{shown}");
    assert!(
        shown.contains("\x1b[32m✓ analyse done"),
        "a terminal gets colour:\n{shown:?}"
    );
}
