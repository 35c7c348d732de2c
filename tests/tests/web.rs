//! The web tracker (`orchestrator --web`) in a real browser: Debian's headless
//! Chromium, driven by `tests/web/tracker.mjs` through playwright-core. The
//! script checks what only the page can tell (states change, a reload
//! restores the page and watches on by cursor) and prints what the page
//! shows; the witnesses here are Redis (each phase's stored output, the
//! event log) and GetWorkflow (rating, tokens, cost).
//!
//! Without Chromium these tests skip, loudly, unless NEXUS_REQUIRE_BROWSER is
//! set (CI sets it), in which case they fail.

use nexus_proto::v1::{GetWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const PHASES: [&str; 6] = [
    "analyse",
    "feedback",
    "enterprise_plan",
    "quality_review",
    "improve",
    "rate",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Chromium and the script's npm package, or `None` (after saying so) when
/// Chromium is missing and no browser is required.
fn browser() -> Option<PathBuf> {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if !chromium.exists() {
        let required = std::env::var_os("NEXUS_REQUIRE_BROWSER").is_some();
        assert!(
            !required,
            "NEXUS_REQUIRE_BROWSER is set but {} is missing (apt-get install chromium; scripts/test.sh does)",
            chromium.display()
        );
        eprintln!(
            "\n######## SKIPPED: the web tracker's browser test needs Chromium at {} \
             (apt-get install chromium, or run scripts/test.sh); set NEXUS_REQUIRE_BROWSER=1 to fail instead ########\n",
            chromium.display()
        );
        return None;
    }
    install_script_dependencies();
    Some(chromium)
}

/// `npm ci` in tests/web once, if scripts/test.sh has not already.
fn install_script_dependencies() {
    static ONCE: Mutex<()> = Mutex::new(());
    let _once = ONCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = repo_root().join("tests/web");
    if dir.join("node_modules/playwright-core").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .expect("npm on PATH (Debian's nodejs)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// What tracker.mjs printed as its result, and its log.
struct ScriptRun {
    result: serde_json::Value,
    stderr: String,
}

/// Runs tracker.mjs against `url`; on a "BLIP" line from the script, calls
/// `blip` and tells the script to go on.
fn run_script(chromium: &Path, url: &str, env: &[(&str, &str)], mut blip: impl FnMut()) -> ScriptRun {
    let mut child = Command::new("node")
        .arg(repo_root().join("tests/web/tracker.mjs"))
        .env("NEXUS_WEB_URL", url)
        .env("CHROMIUM", chromium)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node on PATH");
    let mut stdin = Some(child.stdin.take().expect("stdin"));
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("stderr");
    let log = stderr.clone();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        log.lock().unwrap().push_str(&text);
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut result = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match received.recv_timeout(left) {
            Ok(line) if line == "BLIP" => {
                blip();
                let mut pipe = stdin.take().expect("one blip");
                writeln!(pipe, "go on").expect("script's stdin");
            }
            Ok(line) => {
                if let Some(json) = line.strip_prefix("RESULT ") {
                    result = Some(serde_json::from_str(json).expect("RESULT is JSON"));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait for node");
    // The stderr thread ends with the process; give it a moment to hand over.
    std::thread::sleep(Duration::from_millis(100));
    let stderr = stderr.lock().unwrap().clone();
    match result {
        Some(result) if status.success() => ScriptRun { result, stderr },
        _ => panic!("tracker.mjs failed ({status}):\n{stderr}"),
    }
}

fn screenshot(name: &str) -> PathBuf {
    let path = repo_root().join("target").join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// One run as a person sees it: start from the form, phases turning running
/// then completed with their streamed text, a reload mid-phase, the
/// orchestrator killed and back mid-run, then the final plan and rating.
/// Every phase's text on the page is exactly its output in Redis (a delta
/// applied twice or missed would show), the rating and the tokens and cost
/// per phase are GetWorkflow's, and every watch the page opened after the
/// reload started at a cursor of the stored event log.
#[tokio::test(flavor = "multi_thread")]
async fn the_tracker_shows_a_run_live_through_a_reload_and_a_blip_exactly_as_stored() {
    let Some(chromium) = browser() else { return };
    let redis = RedisServer::start();
    let model = StandIn::start(SLOW_MODEL);
    let listen = format!("127.0.0.1:{}", free_port());
    let web = [("NEXUS_WEB", "1")];
    let mut orchestrator = Orchestrator::start_on(&listen, &redis.url(), &web);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let shot = screenshot("web-tracker.png");

    let run = run_script(
        &chromium,
        &format!("http://{listen}/"),
        &[
            ("NEXUS_WEB_BLIP", "1"),
            ("NEXUS_WEB_SCREENSHOT", shot.to_str().unwrap()),
        ],
        || {
            orchestrator.process.kill_hard();
            std::thread::sleep(Duration::from_millis(500));
            orchestrator = Orchestrator::start_on(&listen, &redis.url(), &web);
        },
    );
    let page = &run.result;
    let id = page["id"].as_str().expect("workflow id");

    let mut redis_conn = redis.client().get_connection().unwrap();
    let outputs: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("nexus:{{nx0}}:wf:{id}:outputs"))
        .query(&mut redis_conn)
        .unwrap();
    let mut client = connect(&format!("http://{listen}")).await;
    let workflow = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("GetWorkflow")
        .into_inner();
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);

    let phases = page["phases"].as_array().expect("phases");
    let names: Vec<_> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, PHASES, "one card per phase, in order");
    for (card, stored) in phases.iter().zip(&workflow.phases) {
        let name = card["name"].as_str().unwrap();
        assert_eq!(card["state"], "completed", "{name}");
        assert_eq!(
            card["text"].as_str(),
            outputs.get(name).map(String::as_str),
            "{name}: the page shows exactly the stored output"
        );
        assert_eq!(
            card["streamed"], true,
            "{name}: the page built the text from the streamed deltas"
        );
        let usage = stored.usage.unwrap_or_default();
        let stats = card["stats"].as_str().unwrap();
        let tokens = format!("{} in / {} out tokens", usage.prompt_tokens, usage.completion_tokens);
        let cost = format!("${:.4}", usage.cost_usd);
        assert!(
            usage.completion_tokens > 0 && stats.contains(&tokens) && stats.contains(&cost),
            "{name}: {stats:?} shows {tokens} and {cost}"
        );
    }
    let rating = workflow.rating.expect("rating");
    assert_eq!(page["score"], rating.score, "the score is the stored rating");
    assert_eq!(page["reasons"], serde_json::json!(rating.reasons), "with its reasons");
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        words(page["finalPlan"].as_str().unwrap()),
        words(&workflow.final_plan),
        "the final plan is rendered"
    );
    assert_eq!(page["usageRows"], 8, "a usage row per phase, with heading and total");
    assert_eq!(page["listed"], 1, "the run is in the recent runs list");

    let stored_cursors = stored_cursors(&redis.client(), id);
    let watches = page["watchesAfterBlip"].as_array().expect("watches");
    assert!(
        watches.len() >= 2,
        "the page watched again after the blip: {watches:?}\n{}",
        run.stderr
    );
    for cursor in watches.iter().chain(page["watchesAfterReload"].as_array().unwrap()) {
        let cursor = cursor.as_str().unwrap();
        assert!(
            stored_cursors.iter().any(|stored| stored == cursor),
            "the page resumed at {cursor:?}, an event of the stored log"
        );
    }
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "screenshot saved"
    );
}

/// With NEXUS_API_TOKEN set, the page without the token shows the server's
/// UNAUTHENTICATED for the list and for starting; once the token is entered
/// the same page starts a run and follows it to the end.
#[tokio::test(flavor = "multi_thread")]
async fn the_tracker_without_the_token_says_unauthenticated_and_with_it_works() {
    let Some(chromium) = browser() else { return };
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let token = "web-test-token";
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_WEB", "1"), ("NEXUS_API_TOKEN", token)]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let shot = screenshot("web-tracker-auth.png");

    let run = run_script(
        &chromium,
        &format!("{}/", orchestrator.endpoint()),
        &[
            ("NEXUS_WEB_MODE", "auth"),
            ("NEXUS_WEB_TOKEN", token),
            ("NEXUS_WEB_SCREENSHOT", shot.to_str().unwrap()),
        ],
        || panic!("no blip in this test"),
    );
    let page = &run.result;
    for error in ["listError", "startError"] {
        let text = page[error].as_str().unwrap();
        assert!(text.contains("UNAUTHENTICATED"), "{error}: {text}");
    }
    let id = page["id"].as_str().expect("workflow id");
    let mut client = connect_with_token(&orchestrator.endpoint(), token).await;
    let workflow = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("GetWorkflow")
        .into_inner();
    assert_eq!(workflow.status(), WorkflowStatus::Completed, "{}", workflow.reason);
    assert_eq!(page["score"], workflow.rating.expect("rating").score);
    assert_eq!(workflow.plan.expect("plan").name, "Token plan");
}
