//! Logs and traces. Logs always go to stderr (text for people, JSON for log
//! pipelines; `RUST_LOG` filters). When `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, spans are also exported over OTLP/gRPC.
//!
//! A workflow is one trace, and one tree: every span's parent is a span that
//! is exported too. Processes hand the tree on as a W3C `traceparent` that
//! names a real span — [`traceparent_of`] on the sending side (a task names
//! the span that scheduled it, a result the worker's phase span, a model
//! request its own span), [`join_trace`] on the receiving side. The root is
//! the client's span when the client sent one; otherwise [`start_trace`]
//! starts a new trace whose id the caller chooses (the workflow's UUID, so
//! a trace is found from the workflow id alone).

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::IsTerminal;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes pending spans when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Sets up logging (`format` "text" or "json") and, if configured, OTLP
/// trace export under `service` as the service name.
///
/// Logs are events only: every log line names its workflow in its own
/// fields, and spans exist for the trace exporter. Without one, spans are
/// disabled at their call sites and cost next to nothing; formatting their
/// fields for the log layer was a tenth of the worker's CPU per phase.
pub fn init(service: &'static str, format: &str) -> TelemetryGuard {
    // `RUST_LOG` filters each layer on its own (a filter over the whole
    // subscriber keeps every span it allows alive even when no layer takes
    // spans: registered, entered and closed for no one, about 4% of the
    // worker's CPU per phase).
    let rust_log = || EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logged = tracing_subscriber::filter::filter_fn(|metadata| metadata.is_event()).and(rust_log());
    let logs = match format {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(logged)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(logged)
            .boxed(),
    };
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| otlp_provider(service));
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(rust_log())
    });
    // Not `.with(traces)` for both cases: an absent (`None`) layer says yes
    // to every span.
    let logging = tracing_subscriber::registry().with(logs);
    match traces {
        Some(traces) => logging.with(traces).init(),
        None => logging.init(),
    }
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    TelemetryGuard { provider }
}

fn otlp_provider(service: &'static str) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTLP exporter could not be built ({error}); traces are not exported");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .with_id_generator(ChosenTraceIds::default())
            .build(),
    )
}

/// Makes `span` a child of the span named by `traceparent` (W3C format), so
/// it joins that trace. Returns whether it did: an empty or malformed value,
/// or a span already started, leaves the span alone.
pub fn join_trace(span: &tracing::Span, traceparent: &str) -> bool {
    if traceparent.is_empty() || span.is_disabled() {
        return false;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if !context.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(context).is_ok()
}

/// The W3C `traceparent` naming `span`, to hand to whatever continues its
/// work in another process. `None` when spans are not exported: there is
/// then no span a `traceparent` could name.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// [`traceparent_of`] the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Starts `span`, which must have no parent and not be started (entered)
/// yet, as the root of a new trace whose id is `trace_id` (32 hex digits),
/// so that the trace can be found by an id the caller already knows. With
/// a malformed id, or when spans are not exported, the trace id is random
/// or there is no trace.
pub fn start_trace(span: &tracing::Span, trace_id: &str) {
    let Ok(trace_id) = TraceId::from_hex(trace_id) else {
        return;
    };
    NEXT_TRACE_ID.set(Some(trace_id));
    let _started = span.context();
    NEXT_TRACE_ID.set(None);
}

thread_local! {
    /// The id [`start_trace`] wants for the root span it is starting on this
    /// thread. The SDK has no other way in: it asks its id generator for a
    /// root span's trace id and ignores the span builder's.
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except the trace id [`start_trace`] asked for.
#[derive(Debug, Default)]
struct ChosenTraceIds(RandomIdGenerator);

impl IdGenerator for ChosenTraceIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.take().unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE_ID: &str = "0123456789abcdef0123456789abcdef";

    /// Spans get real contexts (nothing is exported) while `test` runs.
    fn with_spans(test: impl FnOnce()) {
        let provider = SdkTracerProvider::builder()
            .with_id_generator(ChosenTraceIds::default())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), test);
    }

    #[test]
    fn a_started_trace_has_the_chosen_id_and_a_joined_span_continues_it() {
        with_spans(|| {
            let root = tracing::info_span!(parent: None, "root");
            start_trace(&root, TRACE_ID);
            let root_parent = traceparent_of(&root).unwrap();
            assert!(root_parent.starts_with(&format!("00-{TRACE_ID}-")), "{root_parent}");
            let child = tracing::info_span!(parent: None, "child");
            assert!(join_trace(&child, &root_parent));
            let child_parent = traceparent_of(&child).unwrap();
            assert_eq!(child_parent[..36], root_parent[..36]);
            assert_ne!(child_parent, root_parent);
            let other = tracing::info_span!(parent: None, "other");
            assert!(!traceparent_of(&other).unwrap().contains(TRACE_ID));
        });
    }

    #[test]
    fn malformed_trace_context_is_not_joined() {
        with_spans(|| {
            let span = tracing::info_span!("span");
            assert!(!join_trace(&span, ""));
            assert!(!join_trace(&span, "00-not-a-traceparent-01"));
        });
    }

    #[test]
    fn without_exported_spans_there_is_no_traceparent() {
        assert_eq!(traceparent_of(&tracing::info_span!("span")), None);
    }
}
