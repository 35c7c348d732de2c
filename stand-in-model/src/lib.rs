//! A local server that speaks OpenRouter's chat completions API, so tests, benchmarks and the
//! offline demo exercise the real wire protocol without a network, a key or a bill.
//!
//! The map:
//! - `config`: [`StandInConfig`], the knobs (latency to first token, pacing, reply length,
//!   keep-alive comments).
//! - `chat`: `POST /api/v1/chat/completions`: auth, logging, fault draw, whole replies.
//! - `plan`: what one request will produce, decided before anything is sent.
//! - `stream`: the SSE producer task, which imitates comments, deltas, the usage chunk, `[DONE]`
//!   and every scripted fault, and stops when the client goes away.
//! - `wire`: the JSON shapes OpenRouter sends (chunks, usage, errors).
//! - `reply`: the deterministic reply text, which always says it comes from the stand-in.
//! - `faults`: [`Fault`], the scripted failures queued through the control API.
//! - `control`: `/_stand-in/*`, where tests queue faults and read the request log.
//! - `state`: what the handlers share (config, fault queue, request log).

mod chat;
mod config;
mod control;
mod faults;
mod plan;
mod reply;
mod state;
mod stream;
mod wire;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use config::StandInConfig;
pub use faults::{Fault, FaultSpec};

/// Serves the stand-in on an already bound listener until the task is dropped or aborted.
/// Taking a listener lets callers bind `127.0.0.1:0` and learn the port before serving.
pub async fn serve(listener: TcpListener, config: StandInConfig) -> std::io::Result<()> {
    // No Nagle: a streamed answer is many small writes, and Nagle with the
    // client's delayed ACK would add ~40 ms between them.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, router(config)).await
}

/// The stand-in's routes with fresh state, for callers that host it themselves.
pub fn router(config: StandInConfig) -> Router {
    let shared = state::Shared::new(config);
    Router::new()
        .route("/api/v1/chat/completions", post(chat::completions))
        .route(
            "/_stand-in/faults",
            get(control::list_faults)
                .post(control::queue_faults)
                .delete(control::clear_faults),
        )
        .route(
            "/_stand-in/requests",
            get(control::list_requests).delete(control::clear_requests),
        )
        .route("/_stand-in/health", get(control::health))
        .with_state(shared)
}
