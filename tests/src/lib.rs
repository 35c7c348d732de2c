//! The end-to-end test harness: real processes on ephemeral loopback ports.
//!
//! - [`RedisServer`]: a `redis-server` with AOF `appendfsync always` in a
//!   temporary directory; can be SIGKILLed and restarted on the same port and
//!   data.
//! - [`StandIn`], [`Orchestrator`], [`Worker`]: the project's binaries, built
//!   by the test script before `cargo test` runs (see `scripts/test.sh`).
//! - [`Stack`]: Redis, the stand-in model, orchestrators and workers together.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing behind.

pub mod client;
pub mod process;

pub use client::*;
pub use process::*;
