//! What a Nexus workflow is made of and where it lives in Redis.
//!
//! Both deployables (the orchestrator and the phase workers) depend on this
//! crate and on nothing of each other's:
//!
//! - [`definition`]: the pipeline as data (phases, model roles, prompt
//!   templates, inputs), its validation, the built-in default, and how a
//!   phase's prompt is rendered from stored outputs.
//! - [`ids`]: workflow ids, which carry the shard a workflow belongs to.
//! - [`keys`]: the Redis key layout. No other module spells a key.
//! - [`connection`]: how both binaries connect to Redis and ride out restarts.
//! - [`stream`]: the stream and group names and the protobuf envelope of a
//!   stream entry.
//! - [`transition`]: the state machine's step after a phase (what its result
//!   writes, what comes next), applied by whoever holds the result.

pub mod connection;
pub mod definition;
pub mod ids;
pub mod keys;
pub mod script_call;
pub mod stream;
pub mod transition;

/// Milliseconds since the Unix epoch, the timestamp unit stored in Redis.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
