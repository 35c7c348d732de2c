//! What every Nexus process does around its work, so the binaries' `main`
//! stays a few lines:
//!
//! - [`config_file`]: an optional `KEY=VALUE` file (`--config`, `NEXUS_CONFIG`)
//!   read into the environment before flags are parsed, so every knob can
//!   come from flags, the environment or the file.
//! - [`telemetry`]: logs (text or JSON) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   is set, OpenTelemetry traces over OTLP; trace context from a
//!   `traceparent` so a workflow is one trace across processes.
//! - [`metrics`]: a Prometheus `/metrics` endpoint for a registry.
//! - [`process`]: the settings every process takes, reading a binary's
//!   configuration, unique consumer names.
//! - [`shutdown`]: a token cancelled on SIGINT or SIGTERM.

pub mod config_file;
pub mod metrics;
pub mod process;
pub mod shutdown;
pub mod telemetry;
