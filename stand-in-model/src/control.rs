//! `/_stand-in/*`: the control API tests use to script faults and to see which requests
//! arrived and how each ended. Not part of OpenRouter's API.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::faults::FaultSpec;
use crate::state::Shared;

/// Accept one fault as well as a list, so quick `curl` calls stay short.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<FaultSpec>),
    One(FaultSpec),
}

pub(crate) async fn queue_faults(State(shared): State<Shared>, body: Bytes) -> Response {
    let specs = match serde_json::from_slice::<OneOrMany>(&body) {
        Ok(OneOrMany::Many(specs)) => specs,
        Ok(OneOrMany::One(spec)) => vec![spec],
        Err(err) => {
            let message = format!("expected a fault or a JSON array of faults: {err}");
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response();
        }
    };
    let queued = specs.len();
    tracing::info!(queued, "faults queued");
    shared.queue_faults(specs);
    Json(json!({ "queued": queued })).into_response()
}

pub(crate) async fn list_faults(State(shared): State<Shared>) -> Response {
    Json(shared.pending_faults()).into_response()
}

pub(crate) async fn clear_faults(State(shared): State<Shared>) -> Response {
    Json(json!({ "cleared": shared.clear_faults() })).into_response()
}

pub(crate) async fn list_requests(State(shared): State<Shared>) -> Response {
    Json(shared.requests()).into_response()
}

/// How many chat requests are open now and the most that were at once (since the last
/// clear of the log).
pub(crate) async fn request_counts(State(shared): State<Shared>) -> Response {
    Json(shared.request_counts()).into_response()
}

pub(crate) async fn clear_requests(State(shared): State<Shared>) -> Response {
    Json(json!({ "cleared": shared.clear_requests() })).into_response()
}

pub(crate) async fn health() -> &'static str {
    "ok"
}
