//! Without a trace exporter, spans are disabled where they are made: nothing
//! registers, enters or closes them (that bookkeeping was a few percent of
//! the worker's CPU per phase), while log events still go out.

#[test]
fn without_an_exporter_spans_are_disabled_and_events_are_not() {
    // SAFETY: this test binary has one test; nothing else reads the
    // environment concurrently.
    unsafe { std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT") };
    let _guard = nexus_runtime::telemetry::init("spans-off-test", "text");
    let span = tracing::info_span!("phase", workflow_id = "wf_0_x");
    assert!(span.is_disabled(), "a span nobody exports must be disabled");
    assert!(
        tracing::event_enabled!(tracing::Level::INFO),
        "info events still reach the log"
    );
}
