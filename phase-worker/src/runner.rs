//! Running one phase task: announce it, render its prompt from stored
//! outputs, call the model while streaming deltas into the workflow's event
//! log (the worker's claim keeper renews the claim meanwhile), then apply
//! the result: record the phase and queue the next one (or end the run) in
//! the step that acknowledges the task.

use crate::cancellation::CancelRegistry;
use crate::claims::ClaimKeeper;
use crate::metrics::{self, METRICS};
use crate::model::budget::ModelPrices;
use crate::model::cache::ResponseCache;
use crate::model::{ChatMessage, ChatRequest, Completion, ModelClient, ModelError, OutputValidator};
use crate::rating;
use crate::task_lifecycle::{Continuation, Settled, Started, TaskHandle};
use nexus_pipeline::definition::render_prompt;
use nexus_pipeline::transition::{LoadError, PipelineCache, Step, Transition, completes_run, load_earlier_phases};
use nexus_proto::internal::{
    CachedAnswer, OutputKind, PhaseFailure, PhaseResult, PhaseSpec, PhaseSuccess, PhaseTask, PipelineSnapshot,
    phase_result::Outcome,
};
use nexus_proto::v1::{PhaseStarted, Usage, workflow_event::Kind};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a worker shares among its tasks.
pub struct RunnerContext {
    pub client: ModelClient,
    pub cancels: Arc<CancelRegistry>,
    /// Cancelled when the drain after a stop signal runs out: aborts calls.
    pub shutdown: CancellationToken,
    /// Cancelled at the stop signal: no new work is claimed from then on.
    pub stopping: CancellationToken,
    /// Renews the claims of the tasks this worker runs.
    pub claims: Arc<ClaimKeeper>,
    /// How long applying a finished answer is retried on Redis errors.
    pub publish_patience: Duration,
    /// The pipelines of the runs this worker advances, by fingerprint.
    pub pipelines: PipelineCache,
    /// Answers to identical requests; `None` when caching is off.
    pub cache: Option<ResponseCache>,
    /// Model prices, to estimate a call's cost against its run's cap.
    pub prices: ModelPrices,
}

/// Runs a task to its end; `started` when the script that claimed it also
/// started it. The task is held by the worker's claim keeper, and its
/// cancel token registered, before the task's start is fenced (or, for a
/// task started when it was claimed, checked against the cancellations
/// heard meanwhile), so a cancel that lands at any point reaches the call.
/// Errors talking to Redis leave the task unacknowledged, so it is reclaimed
/// and run again. Returns the task claimed for this worker when this one
/// settled, if any: the caller runs it next, in the same slot. The handle
/// comes shared (the claim keeper and the progress forwarder hold it too) and
/// the task boxed: every future a value passes through keeps a slot for it
/// for the whole call, so large ones are passed by pointer.
pub async fn run_task(
    ctx: &RunnerContext,
    handle: Arc<TaskHandle>,
    mut task: Box<PhaseTask>,
    delivery: u64,
    started: Option<Box<Started>>,
) -> Option<Continuation> {
    let spec = match task_phase(ctx, &handle, &mut task).await {
        Ok(spec) => spec,
        Err(LoadError::Storage(error)) => {
            tracing::warn!(%error, "could not read the task's pipeline; it will be redelivered");
            return None;
        }
        // Boxed: a rare path, and its 1.5 KB future inline made every call's future that much larger.
        Err(LoadError::Corrupt(why)) => return Box::pin(fail_unrunnable(ctx, &handle, &task, &why)).await,
    };
    // In a block, so the span kept is the one the work runs in (a span
    // borrowed here would keep a second slot through the call).
    let (span, task) = {
        let span = phase_span(&handle, &task, &spec, delivery);
        let task = continued_in(&span, task);
        (span, task)
    };
    METRICS.tasks_in_flight.inc();
    let registration = ctx.cancels.register(handle.workflow, &ctx.shutdown);
    let stop = registration.token.clone();
    // Renewed by the worker's one claim keeper until the work ends.
    let _claim = ctx.claims.hold(handle.clone(), stop.clone());
    let next = run_task_in_span(ctx, &handle, task, spec, delivery, started, &stop)
        .instrument(span)
        .await;
    METRICS.tasks_in_flight.dec();
    next
}

/// A task's phase: carried by the task (tasks of version 1) or, as tasks
/// are written now, named in the run's pipeline snapshot, which the worker
/// caches: a lookup, not a copy per task.
enum TaskPhase {
    Carried(Box<PhaseSpec>),
    InSnapshot(Arc<PipelineSnapshot>, usize),
}

impl std::ops::Deref for TaskPhase {
    type Target = PhaseSpec;

    fn deref(&self) -> &PhaseSpec {
        match self {
            TaskPhase::Carried(spec) => spec,
            TaskPhase::InSnapshot(pipeline, index) => &pipeline.phases[*index],
        }
    }
}

/// The phase `task` runs; an error when its pipeline cannot be read
/// (`Storage`) or does not have the phase (`Corrupt`).
async fn task_phase(ctx: &RunnerContext, handle: &TaskHandle, task: &mut PhaseTask) -> Result<TaskPhase, LoadError> {
    if let Some(spec) = task.spec.take() {
        return Ok(TaskPhase::Carried(spec));
    }
    let mut conn = handle.conn.clone();
    let pipeline = ctx
        .pipelines
        .get(&mut conn, handle.workflow.shard(), &task.pipeline_id)
        .await?;
    let index = task.phase_index as usize;
    if index >= pipeline.phases.len() {
        let phases = pipeline.phases.len();
        return Err(LoadError::Corrupt(format!(
            "a task for phase {index} of a {phases}-phase pipeline"
        )));
    }
    Ok(TaskPhase::InSnapshot(pipeline, index))
}

/// A task whose phase cannot be known fails its run with the reason, like
/// a result whose pipeline cannot be read (no delivery can fix it).
async fn fail_unrunnable(
    ctx: &RunnerContext,
    handle: &TaskHandle,
    task: &PhaseTask,
    why: &str,
) -> Option<Continuation> {
    tracing::error!(workflow_id = %handle.workflow, %why, "cannot run a phase task; failing the workflow");
    let reason = format!("its stored data is corrupt ({why})");
    let failed = phase_result(handle, task, "", Outcome::Failure(PhaseFailure { reason }));
    settle(ctx, handle, Some(&failed), &[], &CancellationToken::new()).await
}

/// The span of one delivery of a task: a child of the span that scheduled
/// the phase, named by the task.
fn phase_span(handle: &TaskHandle, task: &PhaseTask, spec: &PhaseSpec, delivery: u64) -> tracing::Span {
    let span = tracing::info_span!(
        "phase",
        workflow_id = %handle.workflow,
        phase = task.phase_index,
        phase_name = spec.name.as_str(),
        model = spec.model.as_str(),
        attempt = handle.attempt,
        delivery,
    );
    nexus_runtime::telemetry::join_trace(&span, &task.traceparent);
    span
}

/// The task with its trace context moved on to its phase span, so what it
/// produces (model requests, its result) descends from that span rather
/// than from the one that scheduled it. Unchanged when spans are not
/// exported.
fn continued_in(span: &tracing::Span, mut task: Box<PhaseTask>) -> Box<PhaseTask> {
    if let Some(traceparent) = nexus_runtime::telemetry::traceparent_of(span) {
        task.traceparent = traceparent;
    }
    task
}

fn run_task_in_span(
    ctx: &RunnerContext,
    handle: &Arc<TaskHandle>,
    task: Box<PhaseTask>,
    spec: TaskPhase,
    delivery: u64,
    started: Option<Box<Started>>,
    stop: &CancellationToken,
) -> impl Future<Output = Option<Continuation>> {
    async move {
        // Made ready in a future of its own, so what only the preparing
        // needs (the start's reply, the inputs, the budget) keeps no room
        // beside the call (about 400 bytes per call in flight).
        // Its fields are used in place: taken apart into locals, the plan
        // would be held twice.
        let call = match prepare_call(ctx, handle, &task, &spec, delivery, started, stop).await {
            BeforeCall::Call(call) => call,
            BeforeCall::Ended(next) => return next,
        };
        let outcome = call_model(ctx, handle, &task, &spec, &call.request, call.cache_key, delivery, stop).await;
        if let CallOutcome::Result(result, _) = &outcome
            && let Some(Outcome::Success(success)) = &result.outcome
        {
            metrics::record_tenant_cost(&call.tenant, success.usage.map_or(0.0, |usage| usage.cost_usd));
        }
        match outcome {
            CallOutcome::Result(result, final_events) => settle(ctx, handle, Some(&result), &final_events, stop).await,
            CallOutcome::Stopped if ctx.shutdown.is_cancelled() => {
                let whole = match spec {
                    TaskPhase::Carried(spec) => Box::new(PhaseTask {
                        spec: Some(spec),
                        ..*task
                    }),
                    TaskPhase::InSnapshot(..) => task,
                };
                hand_back(handle, &whole).await
            }
            CallOutcome::Stopped => settle_stopped(ctx, handle, stop).await,
        }
    }
}

/// A started task's model call, ready to make.
struct CallPlan {
    request: ChatRequest,
    /// Its key in the response cache, when the answer may be cached.
    cache_key: Option<String>,
    /// The run's tenant, whose spend the call adds to.
    tenant: String,
}

/// What preparing a task's call came to.
enum BeforeCall {
    Call(CallPlan),
    /// No call to make: the task was stale, answered from the cache or
    /// refused by its run's cost cap, and is settled; or it could not be
    /// started. The task the settling claimed, if any.
    Ended(Option<Continuation>),
}

/// Starts the task unless its claim started it, renders its prompt from
/// the inputs the start read, and settles it at once where no call is
/// needed (stale, answered from the cache, past its run's cost cap).
async fn prepare_call(
    ctx: &RunnerContext,
    handle: &Arc<TaskHandle>,
    task: &PhaseTask,
    spec: &PhaseSpec,
    delivery: u64,
    started: Option<Box<Started>>,
    stop: &CancellationToken,
) -> BeforeCall {
    let started = match started {
        Some(started) => *started,
        None => match start(handle, spec, delivery).await {
            Ok(Some(started)) => started,
            Ok(None) => {
                tracing::info!(workflow_id = %handle.workflow, phase = %spec.name, "task is stale (workflow moved on or ended); skipping");
                return BeforeCall::Ended(settle(ctx, handle, None, &[], stop).await);
            }
            Err(error) => {
                tracing::warn!(%error, "could not start task; it will be redelivered");
                return BeforeCall::Ended(None);
            }
        },
    };
    let Started { input_values, budget } = started;
    let request = {
        // The earlier outputs are in the prompt now; not kept through the call.
        let inputs: HashMap<String, String> = spec.inputs.iter().cloned().zip(input_values).collect();
        chat_request(task, spec, &inputs)
    };
    let cache_key = ctx
        .cache
        .as_ref()
        .filter(|_| !spec.no_cache)
        .map(|_| ResponseCache::key(&request));
    // The answer from the cache and the refusal by the budget are settled in
    // futures of their own, boxed: their results and events, inline, would
    // keep room in this future (905 bytes).
    if let Some(answer) = cached_answer(ctx, cache_key.as_deref()).await {
        return BeforeCall::Ended(Box::pin(settle_cached(ctx, handle, task, spec, answer, delivery, stop)).await);
    }
    if let Some(refusal) = budget.refusal(ctx.prices.prompt_cost_usd(&request)) {
        tracing::info!(workflow_id = %handle.workflow, phase = %spec.name, %refusal, "stopping the run before a call past its cost cap");
        metrics::record_budget_stop(&spec.model);
        return BeforeCall::Ended(Box::pin(settle_refused(ctx, handle, task, spec, refusal, stop)).await);
    }
    BeforeCall::Call(CallPlan {
        request,
        cache_key,
        tenant: budget.tenant,
    })
}

/// Starts a task claimed by a read (not started when it was claimed).
async fn start(handle: &TaskHandle, spec: &PhaseSpec, delivery: u64) -> redis::RedisResult<Option<Started>> {
    let started = Kind::PhaseStarted(PhaseStarted {
        index: handle.phase_index,
        phase: spec.name.clone(),
        model: spec.model.clone(),
        delivery: delivery as u32,
        worker: handle.consumer.to_string(),
        attempt: handle.attempt,
    });
    handle.start(started, &spec.inputs).await
}

/// The drain after a stop signal ran out mid-call: the task goes back on the
/// stream for another worker to take at once, rather than after the
/// visibility timeout. If Redis cannot be reached it stays pending and is
/// reclaimed the usual way.
async fn hand_back(handle: &TaskHandle, task: &PhaseTask) -> Option<Continuation> {
    match handle.hand_back(task).await {
        Ok(true) => tracing::info!(workflow_id = %handle.workflow, "shutting down; handed the task back"),
        Ok(false) => tracing::info!(workflow_id = %handle.workflow, "shutting down; the task was no longer needed"),
        Err(error) => tracing::warn!(%error, "could not hand the task back; it will be reclaimed"),
    }
    None
}

/// A task stopped without a result is acknowledged only when the workflow no
/// longer needs it (cancelled, finished or moved on). Otherwise (shutdown,
/// Redis trouble, or another worker took it over) it stays pending, so it is
/// redelivered rather than lost.
async fn settle_stopped(ctx: &RunnerContext, handle: &TaskHandle, stop: &CancellationToken) -> Option<Continuation> {
    if ctx.shutdown.is_cancelled() {
        tracing::info!(workflow_id = %handle.workflow, "shutting down; leaving the task for another worker");
        return None;
    }
    match handle.is_current().await {
        Ok(false) => settle(ctx, handle, None, &[], stop).await,
        Ok(true) => {
            tracing::info!(workflow_id = %handle.workflow, "task stopped but still needed; leaving it to be redelivered");
            None
        }
        Err(error) => {
            tracing::warn!(%error, workflow_id = %handle.workflow, "cannot check the task; leaving it to be redelivered");
            None
        }
    }
}

enum CallOutcome {
    /// The result, and the last streamed text (reasoning, answer) not yet
    /// in the event log.
    Result(Box<PhaseResult>, Vec<Kind>),
    /// Cancelled, superseded, taken over, shutting down or failed to load
    /// its inputs: no result to publish.
    Stopped,
}

/// Settles a task with its cached answer: the answer's text as deltas (a
/// long one in pieces, the last with the result), then the result.
async fn settle_cached(
    ctx: &RunnerContext,
    handle: &TaskHandle,
    task: &PhaseTask,
    spec: &PhaseSpec,
    answer: CachedAnswer,
    delivery: u64,
    stop: &CancellationToken,
) -> Option<Continuation> {
    let (result, mut deltas) = from_cache(handle, task, spec, answer, delivery);
    let last: Vec<Kind> = deltas.pop().into_iter().collect();
    for delta in deltas {
        if !matches!(handle.append(delta).await, Ok(true)) {
            return settle_stopped(ctx, handle, stop).await;
        }
    }
    settle(ctx, handle, Some(&result), &last, stop).await
}

/// Settles a task the run's cost cap refused to call the model for: a failure.
async fn settle_refused(
    ctx: &RunnerContext,
    handle: &TaskHandle,
    task: &PhaseTask,
    spec: &PhaseSpec,
    refusal: String,
    stop: &CancellationToken,
) -> Option<Continuation> {
    let refused = result(handle, task, spec, Outcome::Failure(PhaseFailure { reason: refusal }));
    settle(ctx, handle, Some(&refused), &[], stop).await
}

/// The cached answer for `key`, if caching is on and there is one. A cache
/// that cannot be read is a miss: the model is called.
async fn cached_answer(ctx: &RunnerContext, key: Option<&str>) -> Option<CachedAnswer> {
    let (cache, key) = (ctx.cache.as_ref()?, key?);
    match cache.lookup(key).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(%error, "could not read the response cache; calling the model");
            None
        }
    }
}

/// The phase's result from a cached answer: no call, no cost; what the
/// original call cost is reported as saved. The text goes to watchers as
/// deltas, as if streamed.
fn from_cache(
    handle: &TaskHandle,
    task: &PhaseTask,
    spec: &PhaseSpec,
    answer: CachedAnswer,
    delivery: u64,
) -> (PhaseResult, Vec<Kind>) {
    let saved_usd = answer.usage.map_or(0.0, |usage| usage.cost_usd);
    metrics::record_cache_hit(&spec.model, saved_usd);
    let rating = match spec.output() {
        OutputKind::Rating => rating::parse_rating(&answer.text).ok(),
        _ => None,
    };
    let deltas = crate::progress::output_deltas(&answer.text, handle.phase_index, &spec.name, delivery, 1);
    let success = PhaseSuccess {
        output: answer.text,
        usage: Some(Usage::default()),
        duration_ms: 0,
        tries: 0,
        rating,
        generation_id: answer.generation_id,
        finish_reason: answer.finish_reason,
        cache_hit: true,
        saved_usd,
    };
    (result(handle, task, spec, Outcome::Success(success)), deltas)
}

#[allow(clippy::too_many_arguments)]
fn call_model(
    ctx: &RunnerContext,
    handle: &Arc<TaskHandle>,
    task: &PhaseTask,
    spec: &PhaseSpec,
    request: &ChatRequest,
    cache_key: Option<String>,
    delivery: u64,
    stop: &CancellationToken,
) -> impl Future<Output = CallOutcome> {
    async move {
        let (events, receiver) = crate::model::event_channel(256);
        let started = Instant::now();
        let validator: Option<&OutputValidator> = match spec.output() {
            OutputKind::Rating => Some(&validate_rating),
            _ => None,
        };
        // The forwarder runs beside the call in this task, not in one of its
        // own, and ends when the call is done and drops its sender.
        let forwarder = crate::progress::forward_events(
            handle.clone(),
            spec.name.clone(),
            metrics::retries_counter(&spec.model),
            delivery,
            receiver,
            stop.clone(),
        );
        let call = async {
            let events = events;
            ctx.client
                .complete_with_fallbacks(request, &spec.fallback_models, validator, &events, stop)
                .await
        };
        let (answer, final_events) = tokio::join!(call, forwarder);
        let seconds = started.elapsed().as_secs_f64();
        match &answer {
            Ok(completion) => {
                let answered = completion.model.as_deref().unwrap_or(&spec.model);
                metrics::record_call(answered, "ok", seconds, Some(&usage_of(completion)))
            }
            Err(ModelError::Cancelled) => metrics::record_call(&spec.model, "cancelled", seconds, None),
            Err(_) => metrics::record_call(&spec.model, "failed", seconds, None),
        }
        if let (Ok(completion), Some(cache), Some(key)) = (&answer, &ctx.cache, cache_key)
            && finished_normally(completion)
        {
            cache.store(key, completion);
        }
        match answer {
            Err(ModelError::Cancelled) => CallOutcome::Stopped,
            _ if stop.is_cancelled() => CallOutcome::Stopped,
            Ok(completion) => CallOutcome::Result(
                Box::new(success(handle, task, spec, completion, started.elapsed())),
                final_events,
            ),
            Err(error) => CallOutcome::Result(
                Box::new(result(
                    handle,
                    task,
                    spec,
                    Outcome::Failure(PhaseFailure {
                        reason: error.to_string(),
                    }),
                )),
                final_events,
            ),
        }
    }
}

/// Whether an answer is worth keeping: the model finished it (not cut
/// short, even where the pipeline accepts that).
fn finished_normally(completion: &Completion) -> bool {
    matches!(completion.finish_reason.as_deref(), None | Some("stop") | Some(""))
}

/// The usage of a completion in the contract's terms.
fn usage_of(completion: &Completion) -> Usage {
    Usage::from(&completion.usage)
}

fn validate_rating(text: &str) -> Result<(), String> {
    rating::parse_rating(text).map(|_| ())
}

/// The model request for a phase: its system prompt and its template
/// rendered with the stored inputs.
fn chat_request(task: &PhaseTask, spec: &PhaseSpec, inputs: &HashMap<String, String>) -> ChatRequest {
    let mut messages = Vec::with_capacity(2);
    if !spec.system_prompt.is_empty() {
        messages.push(ChatMessage {
            role: "system".into(),
            content: spec.system_prompt.clone(),
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: render_prompt(&spec.prompt_template, inputs),
    });
    ChatRequest {
        model: spec.model.clone(),
        messages,
        temperature: spec.temperature,
        max_tokens: (spec.max_tokens > 0).then_some(spec.max_tokens),
        response_format: (spec.output() == OutputKind::Rating).then(rating::response_format),
        traceparent: Some(task.traceparent.clone()),
        accept_truncated: spec.accept_truncated,
        reasoning_effort: (!spec.reasoning_effort.is_empty()).then(|| spec.reasoning_effort.clone()),
    }
}

fn success(
    handle: &TaskHandle,
    task: &PhaseTask,
    spec: &PhaseSpec,
    completion: Completion,
    elapsed: Duration,
) -> PhaseResult {
    let rating = match spec.output() {
        OutputKind::Rating => rating::parse_rating(&completion.text).ok(),
        _ => None,
    };
    let success = PhaseSuccess {
        usage: Some(usage_of(&completion)),
        duration_ms: elapsed.as_millis() as u64,
        tries: completion.tries,
        rating,
        generation_id: completion.generation_id.unwrap_or_default(),
        finish_reason: completion.finish_reason.unwrap_or_default(),
        output: completion.text,
        cache_hit: false,
        saved_usd: 0.0,
    };
    let answered = completion.model.unwrap_or_else(|| spec.model.clone());
    PhaseResult {
        model: answered,
        ..result(handle, task, spec, Outcome::Success(success))
    }
}

fn result(handle: &TaskHandle, task: &PhaseTask, spec: &PhaseSpec, outcome: Outcome) -> PhaseResult {
    phase_result(handle, task, &spec.model, outcome)
}

/// A result of `task` as this worker's attempt; `model` is the one asked.
fn phase_result(handle: &TaskHandle, task: &PhaseTask, model: &str, outcome: Outcome) -> PhaseResult {
    PhaseResult {
        version: nexus_proto::STREAM_MESSAGE_VERSION,
        workflow_id: task.workflow_id.clone(),
        phase_index: task.phase_index,
        attempt: handle.attempt,
        outcome: Some(outcome),
        worker: handle.consumer.to_string(),
        traceparent: task.traceparent.clone(),
        model: model.to_string(),
        published_at_ms: nexus_pipeline::now_ms(),
        published_at_us: nexus_proto::unix_micros(),
        pipeline_id: task.pipeline_id.clone(),
    }
}

/// Applies the result (or just acknowledges) once the answer is in. A
/// Redis error here is retried for a while rather than leaving the task to
/// be redelivered: that would run (and pay for) the model call again. The
/// fence makes a repeated apply harmless. The transition is built once and
/// only the apply is repeated. Gives up when the task stops being this
/// worker's or the patience runs out.
async fn settle(
    ctx: &RunnerContext,
    handle: &TaskHandle,
    result: Option<&PhaseResult>,
    final_events: &[Kind],
    stop: &CancellationToken,
) -> Option<Continuation> {
    let span = tracing::info_span!("apply_result", workflow_id = %handle.workflow, phase = handle.phase_index);
    let deadline = Instant::now() + ctx.publish_patience;
    let mut delay = Duration::from_millis(50);
    let mut transition: Option<Transition> = None;
    loop {
        let attempt = async {
            if let (Some(result), None) = (result, &transition) {
                transition = Some(transition_for(ctx, handle, result).await?);
            }
            let claim_next = !ctx.stopping.is_cancelled();
            Ok::<_, LoadError>(handle.settle(transition.as_ref(), final_events, claim_next).await?)
        };
        match attempt.instrument(span.clone()).await {
            Ok((settled, next)) => {
                count_settled(handle, &settled, transition.map(|t| t.step));
                return next;
            }
            Err(error) if Instant::now() < deadline && !stop.is_cancelled() => {
                tracing::warn!(%error, workflow_id = %handle.workflow, retry_in = ?delay, "could not apply the result; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(error) => {
                tracing::warn!(%error, workflow_id = %handle.workflow, "could not apply the result; the task will be redelivered");
                return None;
            }
        }
    }
}

/// The transition a result makes. A run whose stored pipeline or phases
/// cannot be read fails with that reason rather than retrying forever.
async fn transition_for(
    ctx: &RunnerContext,
    handle: &TaskHandle,
    result: &PhaseResult,
) -> Result<Transition, LoadError> {
    let mut conn = handle.conn.clone();
    let id = &handle.workflow;
    let loaded = async {
        let pipeline = ctx.pipelines.get(&mut conn, id.shard(), &result.pipeline_id).await?;
        let earlier = match completes_run(result, &pipeline) {
            true => Some(load_earlier_phases(&mut conn, id, &pipeline).await?),
            false => None,
        };
        let traceparent = nexus_runtime::telemetry::current_traceparent().unwrap_or_else(|| id.traceparent());
        let transition = Transition::after(id, result, &pipeline, earlier.as_ref(), traceparent)?;
        metrics::record_pipeline_cost(&pipeline.name, transition.cost_usd);
        Ok(transition)
    };
    match loaded.await {
        Err(LoadError::Corrupt(why)) => {
            tracing::error!(workflow_id = %id, %why, "cannot apply a phase result; failing the workflow");
            let phase = format!("#{}", result.phase_index + 1);
            Ok(Transition::failed(
                &phase,
                &format!("its stored data is corrupt ({why})"),
            ))
        }
        other => other,
    }
}

fn count_settled(handle: &TaskHandle, settled: &Settled, step: Option<Step>) {
    match (settled, step) {
        (Settled::Applied, Some(step)) => metrics::record_applied(step),
        (Settled::Acknowledged, Some(_)) => {
            metrics::record_stale();
            tracing::info!(workflow_id = %handle.workflow, "the workflow no longer waited for this result (cancelled or moved on)")
        }
        (Settled::NotOurs, _) => {
            tracing::info!(workflow_id = %handle.workflow, "the task was taken over by another worker; dropping this attempt's result")
        }
        _ => {}
    }
}

/// Why a task run `runs` times is dead-lettered.
pub fn dead_letter_reason(runs: u64) -> String {
    format!(
        "the task was started {runs} times without finishing (workers crashed or timed out on it); moved to the dead-letter stream"
    )
}
