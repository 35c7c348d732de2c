//! Fallbacks: a phase may name more than one model (its role's model, then
//! the role's fallbacks, from `NEXUS_MODELS` as `role=a|b|c` or a run's
//! overrides). When one keeps failing (its tries used up, the model not
//! found, or the provider holding it off past the wait budget) the call moves
//! on to the next, and says so with [`ModelEvent::FellBack`]. Failures that
//! another model cannot mend (a bad request, a bad key, no credit, a
//! cancel) end the call at once.
//!
//! This is done here, on every endpoint alike, rather than with OpenRouter's
//! `models` routing: the worker then sees and reports each switch, each
//! model keeps its own tries and back-off, and a local OpenAI-compatible
//! server gets fallbacks too. The model that answered is recorded from the
//! response's `model` field either way.

use super::call::{ChatRequest, Completion, EventSender, FallbackNotice, ModelEvent, OutputValidator};
use super::client::ModelClient;
use super::error::ModelError;
use tokio_util::sync::CancellationToken;

impl ModelClient {
    /// [`ModelClient::complete`] with `request.model`, then each of
    /// `fallbacks` in turn while the failure is one another model may not
    /// have. The completion's `tries` counts every model's tries.
    pub fn complete_with_fallbacks(
        &self,
        request: &ChatRequest,
        fallbacks: &[String],
        validator: Option<&OutputValidator>,
        events: &EventSender,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Completion, ModelError>> {
        async move {
            // The request is copied only for a fallback model: a prompt can be large, and
            // thousands of calls may be in flight. Boxed, so the call's future does not keep
            // room for a whole request (152 bytes) through the first model's call.
            let mut fallback_request: Option<Box<ChatRequest>> = None;
            let mut next_models = fallbacks.iter();
            let mut earlier_tries = 0;
            loop {
                let current = fallback_request.as_deref().unwrap_or(request);
                let error = match self.complete(current, validator, events, cancel).await {
                    Ok(completion) => {
                        return Ok(Completion {
                            tries: earlier_tries + completion.tries,
                            model: completion.model.or_else(|| Some(current.model.clone())),
                            ..completion
                        });
                    }
                    Err(error) => error,
                };
                let next = next_models.next().filter(|_| error.warrants_fallback());
                let Some(next) = next else { return Err(error) };
                let tries = error.tries_made();
                tracing::warn!(from = %current.model, to = %next, %error, "falling back to the next model");
                let fell_back = ModelEvent::FellBack(Box::new(FallbackNotice {
                    from: current.model.clone(),
                    to: next.clone(),
                    reason: error.to_string(),
                    tries,
                }));
                let _receiver_gone = events.send_async(fell_back).await;
                earlier_tries += tries;
                let mut request = fallback_request.take().unwrap_or_else(|| Box::new(request.clone()));
                request.model = next.clone();
                fallback_request = Some(request);
            }
        }
    }
}
