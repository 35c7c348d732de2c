//! What a test does as a user: a real tonic client of the public API, and the
//! stand-in model's control API for scripting failures.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::workflow_service_client::WorkflowServiceClient;
use nexus_proto::v1::{
    GetWorkflowRequest, ProjectPlan, StartWorkflowRequest, WatchWorkflowRequest, Workflow, WorkflowEvent,
    WorkflowStatus,
};
use std::time::Duration;
use tonic::transport::Channel;

pub type Client = WorkflowServiceClient<Channel>;

pub async fn connect(endpoint: &str) -> Client {
    WorkflowServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect to orchestrator")
}

/// Adds the bearer token to every call of a [`TokenClient`].
pub type AddToken = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;

/// A client that sends `authorization: Bearer <token>` on every call.
pub type TokenClient = WorkflowServiceClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

pub async fn connect_with_token(endpoint: &str, token: &str) -> TokenClient {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to orchestrator");
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("token is ASCII");
    let add_token: AddToken = Box::new(move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", value.clone());
        Ok(request)
    });
    WorkflowServiceClient::with_interceptor(channel, add_token)
}

pub fn sample_plan(name: &str) -> ProjectPlan {
    ProjectPlan {
        name: name.to_string(),
        description: "Build an online shop for handmade furniture: catalogue, checkout, payments, \
                      delivery tracking and an admin area. Team of four, launch in six months."
            .to_string(),
        fields: [("budget".to_string(), "120k EUR".to_string())].into(),
    }
}

pub async fn start(client: &mut Client, name: &str) -> String {
    let request = StartWorkflowRequest {
        plan: Some(sample_plan(name)),
        idempotency_key: String::new(),
        ..Default::default()
    };
    client
        .start_workflow(request)
        .await
        .expect("start workflow")
        .into_inner()
        .workflow_id
}

/// Opens a watch stream from `after_cursor` ("" for the start).
pub async fn open_watch(client: &mut Client, workflow_id: &str, after_cursor: &str) -> tonic::Streaming<WorkflowEvent> {
    let request = WatchWorkflowRequest {
        workflow_id: workflow_id.to_string(),
        after_cursor: after_cursor.to_string(),
        ..Default::default()
    };
    client
        .watch_workflow(request)
        .await
        .expect("watch workflow")
        .into_inner()
}

/// Watches from `after_cursor` until the stream ends (terminal event) or the
/// timeout passes; returns the events seen.
pub async fn watch_until_end(
    client: &mut Client,
    workflow_id: &str,
    after_cursor: &str,
    timeout: Duration,
) -> Vec<WorkflowEvent> {
    let mut stream = open_watch(client, workflow_id, after_cursor).await;
    let mut events = Vec::new();
    let collect = async {
        while let Some(event) = stream.message().await.expect("watch stream") {
            events.push(event);
        }
    };
    let _ = tokio::time::timeout(timeout, collect).await;
    events
}

/// Polls GetWorkflow until the workflow is terminal.
pub async fn wait_terminal(client: &mut Client, workflow_id: &str, timeout: Duration) -> Workflow {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let workflow = get_retrying(client, workflow_id).await;
        let terminal = matches!(
            workflow.status(),
            WorkflowStatus::Completed | WorkflowStatus::Failed | WorkflowStatus::Cancelled
        );
        if terminal || tokio::time::Instant::now() > deadline {
            return workflow;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for every workflow to end and asserts each completed, naming the
/// first that did not and its reason.
pub async fn assert_all_completed(client: &mut Client, ids: &[String], timeout: Duration) {
    for id in ids {
        let workflow = wait_terminal(client, id, timeout).await;
        assert_eq!(
            workflow.status(),
            WorkflowStatus::Completed,
            "{id}: {}",
            workflow.reason
        );
    }
}

/// GetWorkflow, retried while the service is briefly unavailable (a test
/// may be restarting Redis or an orchestrator).
pub async fn get_retrying(client: &mut Client, workflow_id: &str) -> Workflow {
    for _ in 0..300 {
        match client
            .get_workflow(GetWorkflowRequest {
                workflow_id: workflow_id.to_string(),
                ..Default::default()
            })
            .await
        {
            Ok(response) => return response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => panic!("workflow {workflow_id} lost: {status}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("GetWorkflow kept failing for {workflow_id}");
}

pub fn kind_name(event: &WorkflowEvent) -> &'static str {
    match &event.kind {
        Some(Kind::Accepted(_)) => "accepted",
        Some(Kind::PhaseStarted(_)) => "phase_started",
        Some(Kind::PhaseOutputDelta(_)) => "phase_output_delta",
        Some(Kind::PhaseCompleted(_)) => "phase_completed",
        Some(Kind::PhaseRetrying(_)) => "phase_retrying",
        Some(Kind::PhaseWaiting(_)) => "phase_waiting",
        Some(Kind::PhaseReasoningDelta(_)) => "phase_reasoning_delta",
        Some(Kind::PhaseFallback(_)) => "phase_fallback",
        Some(Kind::PhaseAwaitingApproval(_)) => "phase_awaiting_approval",
        Some(Kind::PhaseApproved(_)) => "phase_approved",
        Some(Kind::Completed(_)) => "completed",
        Some(Kind::Failed(_)) => "failed",
        Some(Kind::Cancelled(_)) => "cancelled",
        None => "none",
    }
}

/// Stream ids compare as (milliseconds, sequence).
pub fn cursor_key(cursor: &str) -> (u64, u64) {
    let (ms, seq) = cursor.split_once('-').expect("cursor is a stream id");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// A plain HTTP client (the workspace's reqwest brings no TLS provider of
/// its own; tests only speak plain HTTP on loopback, but reqwest wants one).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The stand-in model's control API.
pub struct ModelControl {
    base_url: String,
    http: reqwest::Client,
}

impl ModelControl {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.to_string(),
            http: http_client(),
        }
    }

    /// The control API of a stand-in serving HTTPS on the certificate in
    /// `cert_pem` (a PEM file, as `--cert-out` writes it).
    pub fn trusting(base_url: &str, cert_pem: &std::path::Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = std::fs::read(cert_pem).expect("read the stand-in's certificate");
        let roots = reqwest::Certificate::from_pem_bundle(&pem).expect("a PEM certificate");
        let http = reqwest::Client::builder().tls_certs_only(roots).build().unwrap();
        Self {
            base_url: base_url.to_string(),
            http,
        }
    }

    /// Chat requests open now and the most that were open at once, as the
    /// stand-in counted them.
    pub async fn request_counts(&self) -> (u64, u64) {
        let url = format!("{}/_stand-in/requests/counts", self.base_url);
        let counts: serde_json::Value = self.http.get(url).send().await.unwrap().json().await.unwrap();
        (counts["open"].as_u64().unwrap(), counts["peak_open"].as_u64().unwrap())
    }

    /// Queues faults, each consumed by the next matching request.
    pub async fn inject(&self, faults: serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/_stand-in/faults", self.base_url))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "injecting faults: {}",
            response.status()
        );
    }

    /// Every chat request the stand-in saw, in order.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}/_stand-in/requests", self.base_url))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }
}

/// Watches until an event matches `predicate`; returns the events up to and
/// including it. Panics if none matches in time.
pub async fn wait_for_event(
    client: &mut Client,
    workflow_id: &str,
    timeout: Duration,
    predicate: impl Fn(&WorkflowEvent) -> bool,
) -> Vec<WorkflowEvent> {
    let mut stream = open_watch(client, workflow_id, "").await;
    let mut events = Vec::new();
    let found = tokio::time::timeout(timeout, async {
        while let Some(event) = stream.message().await.expect("watch stream") {
            let matched = predicate(&event);
            events.push(event);
            if matched {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "no matching event for {workflow_id}; saw {:?}",
        events.iter().map(kind_name).collect::<Vec<_>>()
    );
    events
}

/// The phase index an event is about, if it is about one.
pub fn phase_of(event: &WorkflowEvent) -> Option<u32> {
    match &event.kind {
        Some(Kind::PhaseStarted(e)) => Some(e.index),
        Some(Kind::PhaseOutputDelta(e)) => Some(e.index),
        Some(Kind::PhaseCompleted(e)) => Some(e.index),
        Some(Kind::PhaseRetrying(e)) => Some(e.index),
        Some(Kind::PhaseWaiting(e)) => Some(e.index),
        _ => None,
    }
}

/// The entries of shard 0's task stream, read with XRANGE: each entry's id
/// and its task payload (field `m`).
pub async fn shard0_task_entries(redis: &mut redis::aio::MultiplexedConnection) -> Vec<(String, Vec<u8>)> {
    let tasks: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("nexus:{nx0}:tasks")
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap();
    tasks
        .ids
        .into_iter()
        .map(|entry| match entry.map.get("m") {
            Some(redis::Value::BulkString(bytes)) => (entry.id.clone(), bytes.clone()),
            other => panic!("task payload: {other:?}"),
        })
        .collect()
}

/// A workflow's events as stored in Redis, in order, each with its stream
/// entry id as its cursor: the witness that what a client received is
/// compared with (read with XRANGE, not asked of the service).
pub fn stored_events(redis: &redis::Client, workflow_id: &str) -> Vec<WorkflowEvent> {
    use prost::Message;
    let id = nexus_pipeline::ids::WorkflowId::parse(workflow_id).expect("a workflow id");
    let mut conn = redis.get_connection().expect("connect to redis");
    let stored: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(nexus_pipeline::keys::WorkflowKeys::new(&id).events())
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE the workflow's events");
    stored
        .ids
        .into_iter()
        .map(|entry| {
            let payload: Vec<u8> = entry.get("m").expect("an event payload in field m");
            let mut event = WorkflowEvent::decode(payload.as_slice()).expect("a stored event decodes");
            event.cursor = entry.id;
            event
        })
        .collect()
}

/// The cursors of a workflow's stored events, in order (see [`stored_events`]).
pub fn stored_cursors(redis: &redis::Client, workflow_id: &str) -> Vec<String> {
    stored_events(redis, workflow_id)
        .into_iter()
        .map(|event| event.cursor)
        .collect()
}
