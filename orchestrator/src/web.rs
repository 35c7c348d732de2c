//! The web tracker (`--web`): a page that starts a run and watches its
//! phases live, served by the orchestrator itself on the gRPC port.
//!
//! Why here and like this:
//! - The page talks to the same `WorkflowService` as every other client,
//!   through gRPC-Web: [`tonic_web::GrpcWebLayer`] translates each call to
//!   plain gRPC in front of the token interceptor, so auth, validation and
//!   watching by cursor are exactly the API's. No second API, no polling.
//! - One origin for page and API, so the browser needs no CORS.
//! - The files are compiled into the binary (`include_str!`) and need no
//!   build step: plain HTML and JavaScript, with gRPC-Web framing and the
//!   few protobuf messages the page uses encoded by hand in `web/app.js`.
//!   Nothing for a newcomer to install, nothing to go stale on disk.
//!
//! Without the flag nothing here is served and the server speaks HTTP/2
//! only, as before.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tonic::service::{LayerExt, Layered, Routes};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");

/// Wraps a gRPC service so browsers can call it with gRPC-Web (native gRPC
/// requests pass through unchanged).
pub fn grpc_web<S>(service: S) -> Layered<tonic_web::GrpcWebService<S>, S> {
    tonic_web::GrpcWebLayer::new().named_layer(service)
}

/// Adds the page's files to the gRPC routes: `/` and `/app.js`. Every other
/// path stays the gRPC router's (an unknown one is `UNIMPLEMENTED`).
pub fn with_page(routes: Routes) -> Routes {
    routes
        .into_axum_router()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .into()
}

async fn index() -> impl IntoResponse {
    (csp(), file("text/html; charset=utf-8", INDEX_HTML))
}

async fn app_js() -> impl IntoResponse {
    file("text/javascript; charset=utf-8", APP_JS)
}

/// Scripts from this origin only, and no framing: should anything ever slip
/// through the page's escaping, the browser still runs none of it.
fn csp() -> [(header::HeaderName, &'static str); 1] {
    [(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    )]
}

/// A static file; `no-cache` so a browser picks up a new binary's page on
/// reload instead of pairing an old script with a new server.
fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}
