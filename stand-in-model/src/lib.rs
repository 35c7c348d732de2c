//! A local server that speaks OpenRouter's chat completions API, so tests, benchmarks and the
//! offline demo exercise the real wire protocol without a network, a key or a bill.
//!
//! The map:
//! - `config`: [`StandInConfig`], the knobs (latency to first token, pacing, reply length,
//!   keep-alive comments, reasoning time, rough framing).
//! - `chat`: `POST /api/v1/chat/completions`: auth, logging, fault draw, whole replies.
//! - `plan`: what one request will produce, decided before anything is sent.
//! - `stream`: the SSE producer task, which imitates comments, reasoning and content deltas,
//!   the usage chunk, `[DONE]` and every scripted fault, and stops when the client goes away.
//! - `framing`: how events look on the wire; smooth (cheap) or rough (split writes, CRLF,
//!   multi-line `data:`, comments between events), to prove clients parse SSE, not lines.
//! - `wire`: the JSON shapes OpenRouter sends (chunks, usage, errors).
//! - `reply`: the deterministic reply text, which always says it comes from the stand-in.
//! - `faults`: [`Fault`], the scripted failures queued through the control API.
//! - `control`: `/_stand-in/*`, where tests queue faults and read the request log.
//! - `state`: what the handlers share (config, fault queue, request log), and the connection
//!   number each request is logged with.
//! - `tls`: HTTPS with HTTP/2 by ALPN on a self-signed certificate made at start
//!   ([`SelfSignedTls`], [`serve_tls`]), as OpenRouter serves.

mod chat;
mod config;
mod control;
mod faults;
mod framing;
mod plan;
mod reply;
mod state;
mod stream;
mod tls;
mod wire;

use axum::Router;
use axum::routing::{get, post};
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

pub use config::StandInConfig;
pub use faults::{Fault, FaultSpec};
pub use tls::SelfSignedTls;

/// Serves the stand-in on an already bound listener until the task is dropped or aborted.
/// Taking a listener lets callers bind `127.0.0.1:0` and learn the port before serving.
pub async fn serve(listener: TcpListener, config: StandInConfig) -> std::io::Result<()> {
    let app = router(config).into_make_service_with_connect_info::<state::ConnectionId>();
    axum::serve(PlainListener(listener), app).await
}

/// A TCP listener whose connections go without Nagle: a streamed answer is many small writes,
/// and Nagle with the client's delayed ACK would add ~40 ms between them.
pub(crate) struct PlainListener(TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, peer) = axum::serve::Listener::accept(&mut self.0).await;
        let _ = stream.set_nodelay(true);
        (stream, peer)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Like [`serve`], over TLS with `tls`'s certificate: clients that offer `h2` by ALPN speak
/// HTTP/2 (many calls on one connection), others HTTP/1.1.
pub async fn serve_tls(listener: TcpListener, config: StandInConfig, tls: &SelfSignedTls) -> std::io::Result<()> {
    let listener = tls.listener(listener)?;
    let app = router(config).into_make_service_with_connect_info::<state::ConnectionId>();
    axum::serve(listener, app).await
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
        .route("/_stand-in/requests/counts", get(control::request_counts))
        .route("/_stand-in/health", get(control::health))
        .with_state(shared)
}
