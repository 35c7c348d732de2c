//! [`ModelClient`] and its try loop: a call is a series of tries, each paced, traced, bounded
//! by the total timeout and the cancel token, and checked (truncation, the caller's validator).
//!
//! A failed try is retried after a jittered backoff while tries remain; a `Retry-After` is a
//! wait, not a failed try, and spends the call's wait budget instead. This file decides *when*
//! to try; `http` sends, `stream` reads, `retry` computes the waits.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::call::{ChatRequest, Completion, EventSender, ModelEvent, OutputValidator, RetryNotice, WaitNotice};
use super::config::ModelClientConfig;
use super::error::{ModelError, TimeoutKind, redact_secret, redact_url_text};
use super::http::{
    Prepared, build_http_client, endpoint, generation_id, install_crypto_provider, request_headers, tls_config,
};
use super::lanes::Lanes;
use super::pacer::Pacer;
use super::retry::{Backoff, WaitBudget};
use super::stream::is_truncation;

/// Pacer waits shorter than this are not announced as events.
const ANNOUNCED_WAIT: Duration = Duration::from_millis(100);

/// A configured connection to the model server. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ModelClient {
    /// Several HTTP clients, each with its own connections: a server allows
    /// only so many concurrent streams on one HTTP/2 connection (often 100
    /// to 256) and queues the rest, so calls are spread over enough of them
    /// ([`Lanes`]: filled in order).
    pub(super) lanes: Arc<Lanes>,
    pub(super) endpoint: reqwest::Url,
    /// Sent with every request: content types, the key, attribution.
    pub(super) headers: HeaderMap,
    pub(super) config: ModelClientConfig,
    pacer: Option<Arc<dyn Pacer>>,
}

impl fmt::Debug for ModelClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelClient")
            .field("endpoint", &redact_url_text(self.endpoint.as_str()))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ModelClient {
    pub fn new(config: ModelClientConfig) -> Result<Self, ModelError> {
        install_crypto_provider();
        let endpoint = endpoint(&config.base_url)?;
        let tls = tls_config(&config)?;
        let http = (0..config.connections.max(1))
            .map(|_| build_http_client(&config, &tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            lanes: Arc::new(Lanes::new(http, config.streams_per_connection)),
            endpoint,
            headers: request_headers(&config)?,
            config,
            pacer: None,
        })
    }

    /// Paces every try through `pacer` (rate limits, shared back-off).
    pub fn with_pacer(mut self, pacer: Arc<dyn Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Asks the model, retrying failed tries per the config. Deltas and retry notices go to
    /// `events` as they happen; a slow receiver slows the stream down rather than losing text.
    pub fn complete(
        &self,
        request: &ChatRequest,
        validator: Option<&OutputValidator>,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Completion, ModelError>> {
        async move {
            // Encoded once up front (a request that cannot be encoded fails here); a retry
            // encodes it again, since each try hands its body to the HTTP client.
            let mut first_body = Some(self.prepare(request)?);
            let mut waits = WaitBudget::new(self.config.max_total_wait);
            let mut try_number = 1;
            loop {
                let tokens = request.estimated_tokens(self.config.answer_token_allowance);
                self.wait_turn(&request.model, tokens, &mut waits, events, cancel)
                    .await
                    .map_err(|e| self.redact(e))?;
                let prepared = match first_body.take() {
                    Some(prepared) => prepared,
                    None => self.prepare(request)?,
                };
                let error = match self
                    .traced_try(prepared, request, try_number, validator, events, cancel)
                    .await
                {
                    Ok(completion) => {
                        return Ok(Completion {
                            tries: try_number,
                            ..completion
                        });
                    }
                    Err(error) => error,
                };
                // The error is moved whole into one wait: kept here, it and the try's
                // result would keep room beside every try (208 bytes, print-type-sizes).
                let next = self
                    .wait_after_failure(error, &request.model, try_number, &mut waits, events, cancel)
                    .await?;
                if next == NextTry::Counts {
                    try_number += 1;
                }
            }
        }
    }

    /// One try in its own `model_request` span. A failure comes back scrubbed of the key and
    /// is recorded on the span.
    fn traced_try(
        &self,
        mut prepared: Prepared,
        request: &ChatRequest,
        try_number: u32,
        validator: Option<&OutputValidator>,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Completion, ModelError>> {
        async move {
            // Made in a block: a span borrowed here would keep a second slot beside the one
            // the try runs in.
            let span = {
                let span = model_request_span(request, try_number);
                prepared.join_span(&span);
                span
            };
            // The failure is recorded on the span the try runs in (the current one), so the
            // call does not keep a second handle to it.
            let try_and_record = async {
                let tried = self
                    .try_once(
                        &mut prepared,
                        try_number,
                        request.accept_truncated,
                        validator,
                        events,
                        cancel,
                    )
                    .await;
                tried.map_err(|error| {
                    let error = self.redact(error);
                    record_failed_try(&tracing::Span::current(), &error);
                    error
                })
            };
            try_and_record.instrument(span).await
        }
    }

    /// One try under the total timeout and the cancel token, then the validator.
    fn try_once(
        &self,
        prepared: &mut Prepared,
        try_number: u32,
        accept_truncated: bool,
        validator: Option<&OutputValidator>,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Completion, ModelError>> {
        async move {
            tracing::debug!(try_number, endpoint = %redact_url_text(self.endpoint.as_str()), "model try starting");
            let total = self.config.total_timeout;
            // The call's future is built inside the `select!`, not passed in: a future moved into
            // an async fn or block is stored twice in the task (rust-lang/rust#62958), and this
            // one is the largest a task holds while its call is in flight.
            let completion = tokio::select! {
                biased;
                () = cancel.cancelled() => Err(ModelError::Cancelled),
                attempt = tokio::time::timeout(total, self.stream_once(prepared, try_number, events)) => {
                    attempt.unwrap_or(Err(ModelError::Timeout { which: TimeoutKind::Total, after: total }))
                }
            }?;
            if let Some(reason) = completion.finish_reason.as_deref().filter(|r| is_truncation(r))
                && !accept_truncated
            {
                return Err(ModelError::Truncated(reason.to_string()));
            }
            if let Some(validate) = validator {
                validate(&completion.text).map_err(ModelError::InvalidOutput)?;
            }
            Ok(completion)
        }
    }

    /// Sends the request and reads the streamed reply; both count against the first-token
    /// clock until a first token arrives.
    fn stream_once(
        &self,
        prepared: &mut Prepared,
        try_number: u32,
        events: &EventSender,
    ) -> impl Future<Output = Result<Completion, ModelError>> {
        async move {
            let first_token_due = Instant::now() + self.config.first_token_timeout;
            // Held until the reply is read: the call's stream on its connection.
            let lease = self.lanes.lease();
            let response = self.send(&lease, prepared, first_token_due).await?;
            let generation_id = generation_id(&response);
            let reply = self.read_reply(response, try_number, first_token_due, events).await?;
            reply.finish(generation_id)
        }
    }

    /// Waits out a failed try before the next: as long as the provider asked
    /// (`Retry-After`), which is not a failed try, so it spends the wait
    /// budget and the try number stays; otherwise the back-off, unless the
    /// error is final or the tries are used up (then the error, as returned).
    async fn wait_after_failure(
        &self,
        error: ModelError,
        model: &str,
        failed_try: u32,
        waits: &mut WaitBudget,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> Result<NextTry, ModelError> {
        if let Some(asked) = error.retry_after() {
            self.wait_as_asked(model, &error, asked, waits, events, cancel).await?;
            return Ok(NextTry::Same);
        }
        self.wait_before_retry(error, failed_try, events, cancel).await?;
        Ok(NextTry::Counts)
    }

    /// Waits until the pacer lets a try of `model` start; the wait counts
    /// against the call's wait budget, not its tries.
    async fn wait_turn(
        &self,
        model: &str,
        tokens: u64,
        waits: &mut WaitBudget,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        let Some(pacer) = &self.pacer else { return Ok(()) };
        loop {
            let wait = pacer.reserve(model, tokens).await;
            if wait.is_zero() {
                return Ok(());
            }
            let reason = format!("the shared rate limit of {model} is used up");
            self.wait_out(wait, reason, waits, events, cancel).await?;
        }
    }

    /// Waits out the `Retry-After` the provider sent with `error` (bounded), after telling the
    /// pacer, so every caller of `model` holds off too.
    async fn wait_as_asked(
        &self,
        model: &str,
        error: &ModelError,
        asked: Duration,
        waits: &mut WaitBudget,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        let wait = Backoff::from_config(&self.config).honoured_retry_after(asked);
        if let Some(pacer) = &self.pacer {
            pacer.back_off(model, wait).await;
        }
        let reason = format!("{error}; the provider asked to wait {asked:.1?}");
        self.wait_out(wait, reason, waits, events, cancel).await
    }

    /// Sleeps `wait` unless that would pass the call's total wait budget;
    /// announces waits worth telling a watcher about.
    async fn wait_out(
        &self,
        wait: Duration,
        reason: String,
        waits: &mut WaitBudget,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        let waited_total = waits.spend(wait, &reason)?;
        tracing::debug!(?wait, ?waited_total, %reason, "model call waiting");
        with_cancel(cancel, async {
            if wait >= ANNOUNCED_WAIT {
                let event = ModelEvent::Waiting(Box::new(WaitNotice {
                    reason,
                    wait,
                    waited_total,
                }));
                let _receiver_gone = events.send_async(event).await;
            }
            tokio::time::sleep(wait).await;
            Ok(())
        })
        .await
    }

    /// Gives up with `error` unless it is retryable and tries remain; otherwise reports the
    /// retry and sleeps out the backoff.
    async fn wait_before_retry(
        &self,
        error: ModelError,
        failed_try: u32,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> Result<(), ModelError> {
        if !error.is_retryable() {
            return Err(error);
        }
        if failed_try >= self.config.max_tries.max(1) {
            let last = Box::new(error);
            return Err(ModelError::Exhausted {
                tries: failed_try,
                last,
            });
        }
        let backoff = Backoff::from_config(&self.config);
        let delay = backoff.delay(failed_try, error.retry_after(), rand::random());
        let reason = format!("{error}; retrying in {delay:.1?}");
        tracing::warn!(failed_try, %reason, "model try failed");
        let event = ModelEvent::Retrying(Box::new(RetryNotice {
            failed_try,
            reason,
            delay,
        }));
        with_cancel(cancel, async {
            let _receiver_gone = events.send_async(event).await;
            tokio::time::sleep(delay).await;
            Ok(())
        })
        .await
    }

    /// Removes the API key from a text a provider sent.
    pub(super) fn redact_text(&self, text: String) -> String {
        match &self.config.api_key {
            Some(key) if !key.expose_secret().is_empty() => redact_secret(text, key.expose_secret()),
            _ => text,
        }
    }

    /// Removes the API key from an error's messages.
    fn redact(&self, error: ModelError) -> ModelError {
        match &self.config.api_key {
            Some(key) => error.redact(key.expose_secret()),
            None => error,
        }
    }
}

/// The span of one HTTP try of a call: a child of the span the call
/// belongs to.
fn model_request_span(request: &ChatRequest, try_number: u32) -> tracing::Span {
    let span = tracing::info_span!(
        "model_request",
        otel.kind = "client",
        model = %request.model,
        try_number,
        http.request.method = "POST",
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(traceparent) = &request.traceparent {
        nexus_runtime::telemetry::join_trace(&span, traceparent);
    }
    span
}

/// Marks a try's span as failed with `error` (already redacted).
fn record_failed_try(span: &tracing::Span, error: &ModelError) {
    span.record("otel.status_code", "error");
    span.record("otel.status_description", error.to_string());
}

/// Runs `work` unless and until `cancel` fires first.
async fn with_cancel<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = Result<T, ModelError>>,
) -> Result<T, ModelError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ModelError::Cancelled),
        result = work => result,
    }
}
/// Whether the try after a failed one is a new try or the same one again.
#[derive(Debug, PartialEq, Eq)]
enum NextTry {
    /// The provider asked to wait: the same try, once the wait is over.
    Same,
    /// A failed try: the next one counts.
    Counts,
}
