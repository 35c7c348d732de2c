//! What operators rely on: Prometheus metrics with cost per model, secrets
//! kept out of logs and answers, the config file, bearer-token auth and
//! trace context on model calls.

use nexus_proto::v1::{GetWorkflowRequest, StartWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use std::time::Duration;

const METRICS_ENV: (&str, &str) = ("NEXUS_METRICS_LISTEN", "127.0.0.1:0");

async fn scrape(address: std::net::SocketAddr) -> String {
    let response = http_client()
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap();
    response.text().await.unwrap()
}

/// The value of the sample whose line starts with `series`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_workflows_and_model_calls_with_their_cost() {
    let redis = RedisServer::start();
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "1",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "10",
    ]);
    let orchestrator = Orchestrator::start(&redis.url(), &[METRICS_ENV]);
    let worker = Worker::start(&redis.url(), &model.base_url(), &[METRICS_ENV]);
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Measured").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(workflow.status(), WorkflowStatus::Completed);

    let orchestrator_metrics = scrape(orchestrator.metrics.expect("orchestrator metrics address")).await;
    assert_eq!(sample(&orchestrator_metrics, "nexus_workflows_started_total"), 1.0);

    let worker_metrics = scrape(worker.metrics.expect("worker metrics address")).await;
    assert_eq!(
        sample(&worker_metrics, "nexus_workflows_finished_total{status=\"completed\"}"),
        1.0
    );
    assert_eq!(
        sample(&worker_metrics, "nexus_phase_results_total{status=\"applied\"}"),
        6.0
    );
    let sonnet = "anthropic/claude-sonnet-4.5";
    assert_eq!(
        sample(
            &worker_metrics,
            &format!("nexus_model_calls_total{{model=\"{sonnet}\",outcome=\"ok\"}}")
        ),
        3.0
    );
    let cost = sample(
        &worker_metrics,
        &format!("nexus_model_cost_usd_total{{model=\"{sonnet}\"}}"),
    );
    let expected: f64 = workflow
        .phases
        .iter()
        .filter(|p| p.model == sonnet)
        .map(|p| p.usage.unwrap().cost_usd)
        .sum();
    assert!(
        expected > 0.0 && (cost - expected).abs() < 1e-9,
        "metrics cost {cost} = workflow cost {expected}"
    );
    assert_eq!(sample(&worker_metrics, "nexus_tasks_in_flight"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_never_reaches_logs_events_or_errors() {
    let secret = "sk-or-v1-THIS-IS-A-SECRET-KEY-0123456789";
    let redis = RedisServer::start();
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "1",
        "--tokens-per-second",
        "0",
        "--reply-words",
        "5",
    ]);
    let control = ModelControl::new(&model.base_url());
    control
        .inject(serde_json::json!([{"kind": "status", "status": 401, "message": "Invalid API key (stand-in)"}]))
        .await;
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let worker = Worker::start(
        &redis.url(),
        &model.base_url(),
        &[("OPENROUTER_API_KEY", secret), ("RUST_LOG", "debug")],
    );
    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Secret").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(30)).await;

    assert_eq!(workflow.status(), WorkflowStatus::Failed);
    assert!(workflow.reason.contains("Invalid API key"), "{}", workflow.reason);
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(5)).await;
    assert!(
        !format!("{workflow:?}{events:?}").contains(secret),
        "secret in a response"
    );
    let log = worker.process.log_text();
    assert!(log.contains("starting phase worker"), "the worker's log was read");
    assert!(
        !log.contains(secret) && !log.contains("THIS-IS-A-SECRET"),
        "secret in the worker's log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_a_config_file_and_the_environment_wins() {
    let redis = RedisServer::start();
    let file = std::env::temp_dir().join(format!("nexus-test-{}.env", free_port()));
    std::fs::write(
        &file,
        "# orchestrator settings\nNEXUS_MAX_PLAN_BYTES=300\nNEXUS_API_TOKEN=from-file\n",
    )
    .unwrap();
    let orchestrator = Orchestrator::start(
        &redis.url(),
        &[
            ("NEXUS_CONFIG", file.to_str().unwrap()),
            ("NEXUS_API_TOKEN", "from-env"),
        ],
    );
    let channel = tonic::transport::Endpoint::from_shared(orchestrator.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: tonic::metadata::MetadataValue<_> = "Bearer from-env".parse().unwrap();
    let mut client = nexus_proto::v1::workflow_service_client::WorkflowServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", token.clone());
            Ok(request)
        },
    );
    let mut plan = sample_plan("Too long for the file's limit");
    plan.description = "x".repeat(400);
    let status = client
        .start_workflow(StartWorkflowRequest {
            plan: Some(plan),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "the file's limit applies: {status}"
    );
    std::fs::remove_file(file).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_token_is_required_for_the_api_but_not_for_health() {
    let redis = RedisServer::start();
    let orchestrator = Orchestrator::start(&redis.url(), &[("NEXUS_API_TOKEN", "s3cret-token")]);
    let mut anonymous = connect(&orchestrator.endpoint()).await;
    let status = anonymous
        .get_workflow(GetWorkflowRequest {
            workflow_id: "wf_0_0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(!status.message().contains("s3cret-token"));
    let channel = tonic::transport::Endpoint::from_shared(orchestrator.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: "nexus.v1.WorkflowService".into(),
    };
    let serving = health.check(request).await.expect("health needs no token").into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn model_calls_carry_the_workflows_trace_context() {
    let stack = Stack::start(1);
    let mut client = connect(&stack.endpoint()).await;
    let id = start(&mut client, "Traced").await;
    wait_terminal(&mut client, &id, Duration::from_secs(30)).await;
    let trace_id = id.rsplit('_').next().unwrap();
    let requests = ModelControl::new(&stack.model.base_url()).requests().await;
    assert_eq!(requests.len(), 6);
    for request in requests {
        let traceparent = request["traceparent"].as_str().unwrap();
        let parts: Vec<_> = traceparent.split('-').collect();
        assert_eq!((parts[0], parts[1], parts[3]), ("00", trace_id, "01"), "{traceparent}");
        assert_eq!(parts[2].len(), 16);
    }
}
