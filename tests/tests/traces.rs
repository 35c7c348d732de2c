//! Traces: with OTLP export on, a workflow arrives at a collector as one
//! tree — the client's call, the `StartWorkflow` server span, the
//! workflow's creation, each phase on a worker with its model requests, and
//! each result being applied, which schedules the next phase — where every
//! parent is a span that was exported too, and the `traceparent` each model
//! request carried names its own exported span.
//!
//! The collector is a tonic server implementing OTLP's trace service in
//! this test process; the orchestrator and the worker are real processes
//! exporting to it.

use nexus_proto::v1::{StartWorkflowRequest, WorkflowStatus};
use nexus_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// A span as the collector received it, ids in lowercase hex.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    service: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent_span_id: String,
    /// Integer attributes (phase index, try number, ...).
    numbers: HashMap<String, i64>,
    failed: bool,
}

impl Received {
    fn number(&self, key: &str) -> i64 {
        self.numbers
            .get(key)
            .copied()
            .unwrap_or_else(|| panic!("{} span has no {key}: {self:?}", self.name))
    }
}

/// Every span exported to the collector, in arrival order.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            let service = text_attribute(&attributes, "service.name");
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                received.push(Received {
                    name: span.name,
                    service: service.clone(),
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    numbers: number_attributes(&span.attributes),
                    failed: span
                        .status
                        .is_some_and(|status| status.code == StatusCode::Error as i32),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn text_attribute(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(text) => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Integer attributes, also those exported as text (tracing-opentelemetry
/// records unsigned fields through their `Debug` form).
fn number_attributes(attributes: &[KeyValue]) -> HashMap<String, i64> {
    attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(number) => Some((kv.key.clone(), *number)),
            any_value::Value::StringValue(text) => Some((kv.key.clone(), text.parse().ok()?)),
            _ => None,
        })
        .collect()
}

/// An OTLP/gRPC trace collector on a loopback port, served by this test's
/// runtime until the test ends.
struct Collector {
    endpoint: String,
    sink: Sink,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let sink = Sink::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        Self { endpoint, sink }
    }

    fn spans(&self) -> Vec<Received> {
        self.sink.0.lock().unwrap().clone()
    }

    /// Waits until `complete` holds for the spans received so far; panics
    /// with what did arrive when it does not in time.
    async fn wait_for(&self, complete: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if complete(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "spans did not all arrive; got {:?}",
                names(&spans)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Span name → how many.
fn names(spans: &[Received]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for span in spans {
        *counts.entry(span.name.as_str()).or_default() += 1;
    }
    counts
}

/// Redis, a fast stand-in model, and one orchestrator and one worker
/// exporting spans to a collector every 100 ms.
struct TracedStack {
    collector: Collector,
    model: StandIn,
    orchestrator: Orchestrator,
    _worker: Worker,
    _redis: RedisServer,
}

impl TracedStack {
    async fn start() -> Self {
        let collector = Collector::start().await;
        let export = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ];
        let redis = RedisServer::start();
        let model = StandIn::start(FAST_MODEL);
        let orchestrator = Orchestrator::start(&redis.url(), &export);
        let worker = Worker::start(&redis.url(), &model.base_url(), &export);
        Self {
            collector,
            model,
            orchestrator,
            _worker: worker,
            _redis: redis,
        }
    }

    /// Starts a workflow, with `traceparent` as the client's trace context
    /// when given, and waits until it completes; returns its id.
    async fn run_workflow(&self, traceparent: Option<&str>) -> String {
        let mut client = connect(&self.orchestrator.endpoint()).await;
        let mut request = Request::new(StartWorkflowRequest {
            plan: Some(sample_plan("Traced")),
            idempotency_key: String::new(),
            ..Default::default()
        });
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        let id = client.start_workflow(request).await.unwrap().into_inner().workflow_id;
        let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
        assert_eq!(workflow.status(), WorkflowStatus::Completed, "{workflow:?}");
        id
    }

    /// The span ids the stand-in saw in the `traceparent` of each model
    /// request, after checking that each names `trace_id`.
    async fn model_request_span_ids(&self, trace_id: &str) -> Vec<String> {
        let requests = ModelControl::new(&self.model.base_url()).requests().await;
        requests
            .iter()
            .map(|request| {
                let traceparent = request["traceparent"].as_str().unwrap();
                let parts: Vec<_> = traceparent.split('-').collect();
                assert_eq!((parts.len(), parts[1]), (4, trace_id), "{traceparent}");
                parts[2].to_string()
            })
            .collect()
    }

    /// Waits until the workflow's spans have arrived: a `StartWorkflow`
    /// span, its creation, `phases` phase and apply spans, and every model
    /// request the stand-in saw. Returns the spans of `trace_id`.
    async fn wait_for_tree(&self, trace_id: &str, phases: usize, model_span_ids: &[String]) -> Vec<Received> {
        let spans = self
            .collector
            .wait_for(|spans| {
                let names = names(spans);
                let count = |name| names.get(name).copied().unwrap_or(0);
                let exported: HashSet<_> = spans.iter().map(|span| span.span_id.as_str()).collect();
                count("StartWorkflow") >= 1
                    && count("create_workflow") >= 1
                    && count("phase") >= phases
                    && count("apply_result") >= phases
                    && model_span_ids.iter().all(|id| exported.contains(id.as_str()))
            })
            .await;
        for span in &spans {
            assert_eq!(span.trace_id, trace_id, "a span outside the workflow's trace: {span:?}");
        }
        spans
    }
}

/// A random W3C `traceparent` of a sampled client span: (value, trace id, span id).
fn client_trace_context() -> (String, String, String) {
    let trace_id = format!("{:032x}", rand::random::<u128>().max(1));
    let span_id = format!("{:016x}", rand::random::<u64>().max(1));
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// The workflow's spans by name; asserts each has its expected count.
struct Tree<'a> {
    start: &'a Received,
    create: &'a Received,
    phases: Vec<&'a Received>,
    applies: Vec<&'a Received>,
    model_requests: Vec<&'a Received>,
}

impl<'a> Tree<'a> {
    fn of(spans: &'a [Received], phases: usize) -> Self {
        let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
        let one = |name: &str| {
            let found = named(name);
            assert_eq!(found.len(), 1, "{name} spans: {found:?}");
            found[0]
        };
        let tree = Self {
            start: one("StartWorkflow"),
            create: one("create_workflow"),
            phases: named("phase"),
            applies: named("apply_result"),
            model_requests: named("model_request"),
        };
        assert_eq!(tree.phases.len(), phases, "phase spans");
        assert_eq!(tree.applies.len(), phases, "apply_result spans");
        assert!(tree.model_requests.len() >= phases, "model_request spans");
        tree
    }

    fn phase(&self, index: i64) -> &'a Received {
        self.phases.iter().find(|s| s.number("phase") == index).unwrap()
    }

    fn apply(&self, index: i64) -> &'a Received {
        self.applies.iter().find(|s| s.number("phase") == index).unwrap()
    }

    /// The shape every run has below `StartWorkflow`: the creation
    /// schedules phase 0, applying phase N's result schedules phase N+1,
    /// each model request is a child of its phase.
    fn assert_shape(&self, phases: i64) {
        assert_eq!(self.start.kind, SpanKind::Server as i32);
        assert_eq!(self.start.service, "nexus-orchestrator");
        assert_eq!(self.create.parent_span_id, self.start.span_id);
        assert_eq!(self.phase(0).parent_span_id, self.create.span_id);
        for index in 0..phases {
            let phase = self.phase(index);
            assert_eq!(phase.service, "nexus-phase-worker");
            assert_eq!(
                self.apply(index).parent_span_id,
                phase.span_id,
                "apply of phase {index}"
            );
            if index > 0 {
                let scheduler = self.apply(index - 1);
                assert_eq!(phase.parent_span_id, scheduler.span_id, "phase {index}");
            }
        }
        let phase_ids: HashSet<_> = self.phases.iter().map(|s| s.span_id.as_str()).collect();
        for request in &self.model_requests {
            assert_eq!(request.kind, SpanKind::Client as i32);
            assert!(phase_ids.contains(request.parent_span_id.as_str()), "{request:?}");
        }
    }
}

/// Every span's parent is another received span, except the root's,
/// which is `root_parent` ("" for none).
fn assert_closed(spans: &[Received], root_parent: &str) {
    let exported: HashSet<_> = spans.iter().map(|span| span.span_id.as_str()).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|span| !exported.contains(span.parent_span_id.as_str()))
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "more than one span without an exported parent: {roots:?}"
    );
    assert_eq!(roots[0].name, "StartWorkflow");
    assert_eq!(roots[0].parent_span_id, root_parent);
}

/// The first model request fails with a 500 and is retried, so one phase
/// has two model requests: each its own span, named by its own header.
#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_is_one_tree_under_the_clients_span() {
    let stack = TracedStack::start().await;
    ModelControl::new(&stack.model.base_url())
        .inject(serde_json::json!([{"kind": "status", "status": 500, "message": "Internal error (stand-in)"}]))
        .await;
    let (traceparent, trace_id, client_span_id) = client_trace_context();
    stack.run_workflow(Some(&traceparent)).await;
    let model_span_ids = stack.model_request_span_ids(&trace_id).await;
    assert_eq!(model_span_ids.len(), 7, "model requests at the stand-in");
    assert_eq!(
        model_span_ids.iter().collect::<HashSet<_>>().len(),
        7,
        "{model_span_ids:?}"
    );
    let spans = stack.wait_for_tree(&trace_id, 6, &model_span_ids).await;
    let tree = Tree::of(&spans, 6);
    assert_eq!(tree.start.parent_span_id, client_span_id);
    tree.assert_shape(6);
    assert_closed(&spans, &client_span_id);
    let exported_requests: HashMap<_, _> = tree.model_requests.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    assert_eq!(exported_requests.len(), 7, "model_request spans");
    for id in &model_span_ids {
        assert!(
            exported_requests.contains_key(id.as_str()),
            "the stand-in saw {id}, no model_request span"
        );
    }
    let failed = exported_requests[model_span_ids[0].as_str()];
    assert!(failed.failed, "the failed try's span is marked as an error: {failed:?}");
    assert_eq!(failed.number("http.response.status_code"), 500);
    assert_eq!(failed.parent_span_id, tree.phase(0).span_id);
    let retry = exported_requests[model_span_ids[1].as_str()];
    assert_eq!(
        (retry.parent_span_id.as_str(), retry.number("try_number")),
        (failed.parent_span_id.as_str(), 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_client_span_the_workflows_uuid_names_its_trace() {
    let stack = TracedStack::start().await;
    let id = stack.run_workflow(None).await;
    let trace_id = id.rsplit('_').next().unwrap().to_string();
    let model_span_ids = stack.model_request_span_ids(&trace_id).await;
    let spans = stack.wait_for_tree(&trace_id, 6, &model_span_ids).await;
    let tree = Tree::of(&spans, 6);
    tree.assert_shape(6);
    assert_closed(&spans, "");
}
