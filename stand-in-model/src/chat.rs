//! `POST /api/v1/chat/completions`: checks the bearer token, logs the request, draws a fault,
//! then answers with an error, a stream or a whole completion.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::faults::Fault;
use crate::plan::{ChatBody, Plan};
use crate::state::{ConnectionId, Outcome, RequestRecord, Shared};
use crate::{stream, wire};

const MALFORMED_BODY: &str = "{this is not json";

pub(crate) async fn completions(
    State(shared): State<Shared>,
    version: Version,
    connection: Option<Extension<ConnectInfo<ConnectionId>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let connection = connection.map_or(0, |Extension(ConnectInfo(ConnectionId(id)))| id);
    let body = match serde_json::from_slice::<ChatBody>(&body) {
        Ok(body) => body,
        Err(err) => return reject_unreadable(&shared, &err, version, connection),
    };
    let mut record = body.record();
    record.traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    record.http_version = format!("{version:?}");
    record.connection = connection;
    let outcome = shared.record(record);
    if !has_bearer(&headers) {
        outcome.settle("status 401");
        return error_response(401, "No auth credentials found", None, false);
    }
    let fault = shared.take_fault(&body.model, body.structured());
    if let Some(Fault::Status {
        status,
        message,
        retry_after_secs,
        retry_after_http_date,
        echo_key,
    }) = &fault
    {
        outcome.settle(format!("status {status}"));
        let mut message = message
            .clone()
            .unwrap_or_else(|| format!("Stand-in fault: status {status}"));
        if *echo_key {
            message.push_str(&format!(" (you sent: {})", bearer_token(&headers).unwrap_or_default()));
        }
        let retry_after = retry_after_secs.map(|secs| retry_after_value(secs, *retry_after_http_date));
        return error_response(*status, &message, retry_after, true);
    }
    let plan = Plan::new(&body, shared.config(), outcome.seq(), fault);
    if body.stream {
        stream::respond(plan, outcome)
    } else {
        whole(plan, outcome).await
    }
}

/// Any non-empty bearer token will do; the token itself is never logged (only
/// the `echo_key` fault sends it back, to test that clients do not leak it).
fn has_bearer(headers: &HeaderMap) -> bool {
    bearer_token(headers).is_some_and(|token| !token.trim().is_empty())
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    value.and_then(|v| v.strip_prefix("Bearer "))
}

/// `Retry-After` as seconds, or as the HTTP-date that many seconds from now.
fn retry_after_value(secs: f64, http_date: bool) -> String {
    if !http_date {
        return secs.to_string();
    }
    let when = std::time::SystemTime::now() + Duration::try_from_secs_f64(secs).unwrap_or_default();
    httpdate::fmt_http_date(when)
}

fn reject_unreadable(shared: &Shared, err: &serde_json::Error, version: Version, connection: u64) -> Response {
    let record = RequestRecord {
        seq: 0,
        model: String::new(),
        stream: false,
        structured: false,
        prompt_excerpt: String::new(),
        system_tail: String::new(),
        outcome: String::new(),
        received_ms: 0,
        received_us: 0,
        finished_us: 0,
        traceparent: String::new(),
        http_version: format!("{version:?}"),
        connection,
    };
    shared.record(record).settle("status 400");
    error_response(400, &format!("Invalid request body: {err}"), None, false)
}

fn error_response(status: u16, message: &str, retry_after: Option<String>, scripted: bool) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, Json(wire::error_body(status, message, scripted))).into_response();
    let retry_after = retry_after.and_then(|value| HeaderValue::try_from(value).ok());
    if let Some(value) = retry_after {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

/// A non-streaming answer: same latency and faults, delivered in one body.
async fn whole(plan: Plan, outcome: Outcome) -> Response {
    tokio::time::sleep(plan.first_token_latency + plan.reasoning_time()).await;
    let response = match &plan.fault {
        Some(Fault::Stall { secs, .. }) => {
            tokio::time::sleep(Duration::try_from_secs_f64(*secs).unwrap_or_default()).await;
            completion_response(&plan)
        }
        Some(Fault::Malformed { .. }) => MALFORMED_BODY.into_response(),
        Some(Fault::MidStreamError { code, message, .. }) => {
            let message = message.as_deref().unwrap_or("Provider disconnected (stand-in)");
            error_response(*code, message, None, true)
        }
        _ => completion_response(&plan),
    };
    outcome.settle(plan.outcome_label());
    response
}

fn completion_response(plan: &Plan) -> Response {
    let body = wire::completion(
        &plan.meta,
        &plan.text(),
        &plan.reasoning_text(),
        &plan.finish_reason,
        &plan.usage,
    );
    ([("x-generation-id", plan.meta.id.clone())], Json(body)).into_response()
}
