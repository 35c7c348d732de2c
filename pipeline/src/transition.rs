//! The step after a phase: what its result writes and what comes next.
//!
//! Whoever holds a phase's result applies it, in the same atomic script that
//! settles the task: the worker that ran the phase, or the worker that gives
//! up on a poison task. This module builds what that script writes (the
//! phase's record, its completed event, and the next phase's task or the
//! run's terminal event) from the result and the pipeline the workflow
//! started with, so the decision is plain Rust with unit tests, and the Lua
//! only stores it behind the fence.
//!
//! ```text
//!            create_workflow       phase result: next
//!  (none) ──────────────────▶ pending ────────────────▶ running ──┐
//!                                │                         ▲      │ phase result: next
//!                                │                         └──────┘
//!                                ├── phase result: await ─────▶ awaiting_approval
//!                                │      (a gated phase)  ApproveStep ──▶ running
//!                                │                       RejectStep ───▶ failed
//!                                ├── phase result: complete ──▶ completed
//!                                ├── phase result: fail ──────▶ failed (also: dead-lettered task)
//!                                └── cancel_workflow ─────────▶ cancelled
//! ```

use crate::connection::Connection;
use crate::ids::WorkflowId;
use crate::keys::{ShardKeys, WorkflowKeys, field};
use nexus_proto::internal::{PhaseResult, PhaseSpec, PhaseSuccess, PhaseTask, PipelineSnapshot, phase_result::Outcome};
use nexus_proto::v1::{
    Phase, PhaseAwaitingApproval, PhaseCompleted, PhaseStarted, PhaseStatus, Rating, Usage, WorkflowCompleted,
    WorkflowEvent, WorkflowFailed, workflow_event::Kind,
};
use prost::Message;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Longest output (or final plan) an event repeats in full. A longer one is
/// left out of the completed events (they say so, and how long it is): the
/// watcher has it already, as the phase's deltas, and GetWorkflow has it.
/// So no event comes near a client's default 4 MiB message limit.
pub const INLINE_OUTPUT_MAX_BYTES: usize = 256 * 1024;

/// `end_workflow`, the Lua every script that ends a run starts with.
pub const ENDING_LUA: &str = include_str!("lua/ending.lua");

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("storage unavailable: {0}")]
    Storage(#[from] redis::RedisError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// An event as stored: the cursor and workflow id are filled in when it is
/// read back (the cursor is its stream id; the id is implied by the stream).
pub fn event(kind: Kind) -> WorkflowEvent {
    WorkflowEvent {
        time: Some(nexus_proto::timestamp_now()),
        kind: Some(kind),
        ..Default::default()
    }
}

/// The task message for one phase of a workflow: it names the phase in the
/// run's pipeline snapshot (`pipeline_id`, stored before any task names it)
/// rather than carrying it. `traceparent` is the trace context of the span
/// scheduling the phase (`create_workflow` or `apply_result`), so the
/// worker's span of the phase is that span's child.
pub fn phase_task(
    id: &WorkflowId,
    phase_index: u32,
    spec: &PhaseSpec,
    pipeline_id: &str,
    traceparent: String,
) -> PhaseTask {
    PhaseTask {
        version: nexus_proto::STREAM_MESSAGE_VERSION,
        workflow_id: id.to_string(),
        phase_index,
        attempt: 1,
        spec: None,
        traceparent,
        enqueued_at_ms: crate::now_ms(),
        pipeline_id: pipeline_id.to_string(),
        phase_name: spec.name.clone(),
    }
}

/// The name of a task's phase, whichever version wrote it.
pub fn task_phase_name(task: &PhaseTask) -> &str {
    match &task.spec {
        Some(spec) => &spec.name,
        None => &task.phase_name,
    }
}

/// What the script that claims `task` for a worker needs to start it in the
/// same step (fence it, append its phase-started event, read its inputs and
/// the run's budget), saving the worker a round trip per phase; stored with
/// the task's stream entry (field `s`). Lines: workflow id, phase index,
/// attempt, input names (comma-separated), then the encoded phase-started
/// event without its time and worker, which the claiming worker adds (a
/// protobuf message's encodings concatenate into one message). `spec` is
/// the task's phase.
pub fn start_template(task: &PhaseTask, spec: &PhaseSpec) -> Vec<u8> {
    let mut template = format!(
        "{}\n{}\n{}\n{}\n",
        task.workflow_id,
        task.phase_index,
        task.attempt,
        spec.inputs.join(",")
    )
    .into_bytes();
    let started = WorkflowEvent {
        kind: Some(Kind::PhaseStarted(PhaseStarted {
            index: task.phase_index,
            phase: spec.name.clone(),
            model: spec.model.clone(),
            delivery: 1,
            worker: String::new(),
            attempt: task.attempt,
        })),
        ..Default::default()
    };
    started.encode(&mut template).expect("a Vec grows as needed");
    template
}

/// The rest of a phase-started event that a worker claiming a task with a
/// [`start_template`] appends to it: the time and the worker's name.
pub fn started_by(worker: &str) -> Vec<u8> {
    WorkflowEvent {
        time: Some(nexus_proto::timestamp_now()),
        kind: Some(Kind::PhaseStarted(PhaseStarted {
            worker: worker.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The sum of the phases' usage.
pub fn total_usage(phases: &[Phase]) -> Usage {
    phases
        .iter()
        .filter_map(|phase| phase.usage.as_ref())
        .fold(Usage::default(), |sum, usage| Usage {
            prompt_tokens: sum.prompt_tokens + usage.prompt_tokens,
            completion_tokens: sum.completion_tokens + usage.completion_tokens,
            total_tokens: sum.total_tokens + usage.total_tokens,
            cost_usd: sum.cost_usd + usage.cost_usd,
            cached_prompt_tokens: sum.cached_prompt_tokens + usage.cached_prompt_tokens,
            reasoning_tokens: sum.reasoning_tokens + usage.reasoning_tokens,
        })
}

/// Where a phase's result takes the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record the phase and queue the next one.
    Next,
    /// Record the phase and pause at its approval gate; the next phase's
    /// task is kept until the gate opens.
    Await,
    /// Record the last phase and complete the run.
    Complete,
    /// Fail the run with a reason.
    Fail,
}

impl Step {
    /// The name the scripts and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Next => "next",
            Step::Await => "await",
            Step::Complete => "complete",
            Step::Fail => "fail",
        }
    }
}

/// Everything the applying script writes, encoded.
#[derive(Debug)]
pub struct Transition {
    pub step: Step,
    pub phase_name: String,
    /// The phase's output, stored under its name.
    pub output: String,
    /// The encoded `Phase` record (empty for a failure).
    pub record: Vec<u8>,
    /// The encoded phase-completed event (empty for a failure).
    pub completed_event: Vec<u8>,
    /// The encoded next `PhaseTask` (next), or the terminal event.
    pub follow_up: Vec<u8>,
    /// The next task's [`start_template`] (next), else empty.
    pub next_start: Vec<u8>,
    /// The encoded `Rating` of a rating phase's success, else empty.
    pub rating: Vec<u8>,
    /// Why the run failed (fail only).
    pub reason: String,
    /// What the phase cost (USD), added to the run's spend.
    pub cost_usd: f64,
    /// The approval gate the run pauses at (await only).
    pub gate: Option<Gate>,
}

/// An approval gate as the applying script stores it.
#[derive(Debug)]
pub struct Gate {
    /// When it times out (Unix ms).
    pub deadline_ms: i64,
    /// "approve" or "reject".
    pub on_timeout: &'static str,
    /// The encoded awaiting-approval event.
    pub event: Vec<u8>,
}

impl Gate {
    fn after(index: u32, spec: &PhaseSpec) -> Self {
        let deadline_ms =
            crate::now_ms().saturating_add(i64::try_from(spec.approval_timeout_ms).unwrap_or(i64::MAX / 2));
        let on_timeout = if spec.approve_on_timeout { "approve" } else { "reject" };
        let awaiting = event(Kind::PhaseAwaitingApproval(PhaseAwaitingApproval {
            index,
            phase: spec.name.clone(),
            deadline: Some(nexus_proto::timestamp_from_micros(deadline_ms.saturating_mul(1000))),
            on_timeout: on_timeout.to_string(),
        }));
        Self {
            deadline_ms,
            on_timeout,
            event: awaiting.encode_to_vec(),
        }
    }
}

/// What completing a run needs of the phases before its last: their
/// records, the stored final output and rating.
#[derive(Debug, Default)]
pub struct EarlierPhases {
    pub records: Vec<Phase>,
    pub final_output: Option<String>,
    pub rating: Option<Rating>,
}

/// Whether applying `result` completes the run, so its completed event
/// needs the earlier phases ([`load_earlier_phases`]).
pub fn completes_run(result: &PhaseResult, pipeline: &PipelineSnapshot) -> bool {
    matches!(result.outcome, Some(Outcome::Success(_))) && result.phase_index as usize + 1 == pipeline.phases.len()
}

impl Transition {
    /// The transition `result` makes in a run of `pipeline`. `earlier` is
    /// needed when the result completes the run (see [`completes_run`]);
    /// `traceparent` goes into the next phase's task.
    pub fn after(
        id: &WorkflowId,
        result: &PhaseResult,
        pipeline: &PipelineSnapshot,
        earlier: Option<&EarlierPhases>,
        traceparent: String,
    ) -> Result<Self, LoadError> {
        match &result.outcome {
            Some(Outcome::Success(success)) => success_transition(id, result, success, pipeline, earlier, traceparent),
            Some(Outcome::Failure(failure)) => {
                Ok(Self::failed(&phase_name(pipeline, result.phase_index), &failure.reason))
            }
            None => Ok(Self::failed(
                &phase_name(pipeline, result.phase_index),
                "the worker reported no outcome",
            )),
        }
    }

    /// The run fails at `phase` because of `why`.
    pub fn failed(phase: &str, why: &str) -> Self {
        let reason = format!("phase {phase} failed: {why}");
        Self::run_failed(phase, reason)
    }

    /// The run fails with `reason` as given (no phase prefix added).
    pub fn run_failed(phase: &str, reason: String) -> Self {
        let failed = event(Kind::Failed(WorkflowFailed {
            reason: reason.clone(),
            phase: phase.to_string(),
        }));
        Self {
            step: Step::Fail,
            phase_name: phase.to_string(),
            output: String::new(),
            record: Vec::new(),
            completed_event: Vec::new(),
            follow_up: failed.encode_to_vec(),
            next_start: Vec::new(),
            rating: Vec::new(),
            reason,
            cost_usd: 0.0,
            gate: None,
        }
    }
}

/// The name of phase `index`, or `#index` for one the pipeline lacks.
fn phase_name(pipeline: &PipelineSnapshot, index: u32) -> String {
    pipeline
        .phases
        .get(index as usize)
        .map(|spec| spec.name.clone())
        .unwrap_or_else(|| format!("#{index}"))
}

fn success_transition(
    id: &WorkflowId,
    result: &PhaseResult,
    success: &PhaseSuccess,
    pipeline: &PipelineSnapshot,
    earlier: Option<&EarlierPhases>,
    traceparent: String,
) -> Result<Transition, LoadError> {
    let index = result.phase_index as usize;
    let spec = pipeline.phases.get(index).ok_or_else(|| {
        LoadError::Corrupt(format!(
            "result for phase {index} of a {}-phase pipeline",
            pipeline.phases.len()
        ))
    })?;
    let record = Phase {
        index: result.phase_index,
        name: spec.name.clone(),
        model: result.model.clone(),
        requested_model: spec.model.clone(),
        status: PhaseStatus::Completed as i32,
        output: String::new(),
        usage: success.usage,
        duration_ms: success.duration_ms,
        tries: success.tries,
        finish_reason: success.finish_reason.clone(),
        generation_id: success.generation_id.clone(),
        cache_hit: success.cache_hit,
        saved_usd: success.saved_usd,
        human_edit: false,
        copied_from: String::new(),
        output_bytes: success.output.len() as u64,
    };
    let completed = event(Kind::PhaseCompleted(PhaseCompleted {
        index: result.phase_index,
        phase: spec.name.clone(),
        model: result.model.clone(),
        requested_model: spec.model.clone(),
        output: inline(&success.output),
        output_omitted: success.output.len() > INLINE_OUTPUT_MAX_BYTES,
        output_bytes: success.output.len() as u64,
        usage: success.usage,
        duration_ms: success.duration_ms,
        tries: success.tries,
        rating: success.rating.clone(),
        result_published_at: Some(nexus_proto::timestamp_from_micros(result.published_at_us)),
        finish_reason: success.finish_reason.clone(),
        generation_id: success.generation_id.clone(),
        cache_hit: success.cache_hit,
        saved_usd: success.saved_usd,
        copied_from: String::new(),
    }));
    let gate =
        (spec.await_approval && index + 1 < pipeline.phases.len()).then(|| Gate::after(result.phase_index, spec));
    let (step, follow_up, next_start) = match pipeline.phases.get(index + 1) {
        Some(next) => {
            let task = phase_task(id, result.phase_index + 1, next, &result.pipeline_id, traceparent);
            let step = if gate.is_some() { Step::Await } else { Step::Next };
            (step, task.encode_to_vec(), start_template(&task, next))
        }
        None => {
            let earlier = earlier.ok_or_else(|| LoadError::Corrupt("the earlier phases were not loaded".into()))?;
            let finished = completion(pipeline, earlier, &record, success);
            (
                Step::Complete,
                event(Kind::Completed(finished)).encode_to_vec(),
                Vec::new(),
            )
        }
    };
    Ok(Transition {
        step,
        phase_name: spec.name.clone(),
        output: success.output.clone(),
        record: record.encode_to_vec(),
        completed_event: completed.encode_to_vec(),
        follow_up,
        next_start,
        rating: success.rating.as_ref().map(Message::encode_to_vec).unwrap_or_default(),
        reason: String::new(),
        cost_usd: success.usage.map_or(0.0, |usage| usage.cost_usd),
        gate,
    })
}

/// The completed event: final plan, rating and total usage, from the
/// earlier phases plus the last phase's result.
fn completion(
    pipeline: &PipelineSnapshot,
    earlier: &EarlierPhases,
    last: &Phase,
    success: &PhaseSuccess,
) -> WorkflowCompleted {
    let mut phases = earlier.records.clone();
    phases.push(last.clone());
    let final_plan = if last.name == pipeline.final_output_phase {
        success.output.clone()
    } else {
        earlier.final_output.clone().unwrap_or_default()
    };
    WorkflowCompleted {
        final_plan_omitted: final_plan.len() > INLINE_OUTPUT_MAX_BYTES,
        final_plan_bytes: final_plan.len() as u64,
        final_plan: inline(&final_plan),
        rating: success.rating.clone().or_else(|| earlier.rating.clone()),
        total_usage: Some(total_usage(&phases)),
    }
}

/// The text as an event carries it: in full, or nothing past the limit.
fn inline(text: &str) -> String {
    if text.len() > INLINE_OUTPUT_MAX_BYTES {
        String::new()
    } else {
        text.to_string()
    }
}

/// Reads what [`EarlierPhases`] holds, in one round trip.
pub async fn load_earlier_phases(
    conn: &mut Connection,
    id: &WorkflowId,
    pipeline: &PipelineSnapshot,
) -> Result<EarlierPhases, LoadError> {
    let keys = WorkflowKeys::new(id);
    let (state, final_output): (HashMap<String, Vec<u8>>, Option<String>) = redis::pipe()
        .hgetall(keys.state())
        .hget(keys.outputs(), &pipeline.final_output_phase)
        .query_async(conn)
        .await?;
    let mut records = state
        .iter()
        .filter(|(name, _)| name.starts_with("phase:"))
        .map(|(name, bytes)| Phase::decode(bytes.as_slice()).map_err(|e| LoadError::Corrupt(format!("{name}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    records.sort_by_key(|phase| phase.index);
    let rating = state
        .get(field::RATING)
        .map(|bytes| Rating::decode(bytes.as_slice()).map_err(|e| LoadError::Corrupt(format!("rating: {e}"))))
        .transpose()?;
    Ok(EarlierPhases {
        records,
        final_output,
        rating,
    })
}

/// Pipeline snapshots by fingerprint. A workflow keeps the pipeline it
/// started with; processes configured differently (mid-deploy) still advance
/// it correctly by loading its snapshot from Redis once and caching it.
#[derive(Default)]
pub struct PipelineCache {
    by_fingerprint: RwLock<HashMap<String, Arc<PipelineSnapshot>>>,
}

impl PipelineCache {
    pub fn insert(&self, fingerprint: &str, snapshot: Arc<PipelineSnapshot>) {
        self.by_fingerprint
            .write()
            .expect("pipeline cache lock")
            .insert(fingerprint.to_string(), snapshot);
    }

    pub async fn get(
        &self,
        conn: &mut Connection,
        shard: u16,
        fingerprint: &str,
    ) -> Result<Arc<PipelineSnapshot>, LoadError> {
        if let Some(found) = self
            .by_fingerprint
            .read()
            .expect("pipeline cache lock")
            .get(fingerprint)
        {
            return Ok(found.clone());
        }
        let bytes: Option<Vec<u8>> = conn.get(ShardKeys::new(shard).pipeline(fingerprint)).await?;
        let bytes = bytes.ok_or_else(|| LoadError::Corrupt(format!("pipeline {fingerprint} is not stored")))?;
        let snapshot = Arc::new(
            PipelineSnapshot::decode(bytes.as_slice())
                .map_err(|e| LoadError::Corrupt(format!("pipeline {fingerprint}: {e}")))?,
        );
        self.insert(fingerprint, snapshot.clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::v1::Usage;

    #[test]
    fn a_start_template_and_its_worker_part_concatenate_into_the_started_event() {
        let id = WorkflowId::new(2);
        let spec = PhaseSpec {
            name: "feedback".into(),
            model: "google/gemini-3-pro-preview".into(),
            inputs: vec!["plan".into(), "analyse".into()],
            ..Default::default()
        };
        let task = PhaseTask {
            attempt: 3,
            ..phase_task(&id, 1, &spec, "fp", String::new())
        };
        let template = start_template(&task, &spec);
        let text_end = template
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(3)
            .unwrap()
            .0
            + 1;
        assert_eq!(
            std::str::from_utf8(&template[..text_end]).unwrap(),
            format!("{id}\n1\n3\nplan,analyse\n")
        );
        let mut stored = template[text_end..].to_vec();
        stored.extend(started_by("worker-7"));
        let event = WorkflowEvent::decode(stored.as_slice()).unwrap();
        assert!(event.time.is_some());
        assert_eq!(
            event.kind,
            Some(Kind::PhaseStarted(PhaseStarted {
                index: 1,
                phase: "feedback".into(),
                model: "google/gemini-3-pro-preview".into(),
                delivery: 1,
                worker: "worker-7".into(),
                attempt: 3,
            }))
        );
    }

    fn pipeline(phases: &[&str]) -> PipelineSnapshot {
        PipelineSnapshot {
            name: "test".into(),
            final_output_phase: phases[phases.len() - 2].to_string(),
            phases: phases
                .iter()
                .map(|name| PhaseSpec {
                    name: name.to_string(),
                    model: "m".into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn success(index: u32, output: &str, cost: f64) -> PhaseResult {
        PhaseResult {
            phase_index: index,
            pipeline_id: "fp".into(),
            outcome: Some(Outcome::Success(PhaseSuccess {
                output: output.into(),
                usage: Some(Usage {
                    cost_usd: cost,
                    total_tokens: 10,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_success_before_the_last_phase_queues_the_next_with_attempt_one() {
        let id = WorkflowId::new(0);
        let pipeline = pipeline(&["a", "b", "c"]);
        let transition = Transition::after(&id, &success(0, "out a", 0.1), &pipeline, None, String::new()).unwrap();
        assert_eq!(transition.step, Step::Next);
        let next = PhaseTask::decode(transition.follow_up.as_slice()).unwrap();
        assert_eq!((next.phase_index, next.attempt), (1, 1));
        assert_eq!(next.spec, None, "the phase is named, not carried");
        assert_eq!((next.phase_name.as_str(), next.pipeline_id.as_str()), ("b", "fp"));
        assert_eq!(transition.output, "out a");
    }

    #[test]
    fn the_last_success_completes_with_the_final_output_and_total_usage() {
        let id = WorkflowId::new(0);
        let pipeline = pipeline(&["a", "b", "c"]);
        let earlier = EarlierPhases {
            records: vec![Phase {
                usage: Some(Usage {
                    cost_usd: 0.25,
                    total_tokens: 10,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            final_output: Some("the plan".into()),
            rating: None,
        };
        assert!(completes_run(&success(2, "rated", 0.5), &pipeline));
        let transition =
            Transition::after(&id, &success(2, "rated", 0.5), &pipeline, Some(&earlier), String::new()).unwrap();
        assert_eq!(transition.step, Step::Complete);
        let finished = WorkflowEvent::decode(transition.follow_up.as_slice()).unwrap();
        let Some(Kind::Completed(completed)) = finished.kind else {
            panic!("{finished:?}")
        };
        assert_eq!(completed.final_plan, "the plan");
        let total = completed.total_usage.unwrap();
        assert_eq!((total.cost_usd, total.total_tokens), (0.75, 20));
    }

    #[test]
    fn a_long_output_is_left_out_of_the_events_which_say_how_long_it_is() {
        let id = WorkflowId::new(0);
        let pipeline = pipeline(&["a", "b"]);
        let long = "x".repeat(INLINE_OUTPUT_MAX_BYTES + 1);
        let earlier = EarlierPhases {
            final_output: Some(long.clone()),
            ..EarlierPhases::default()
        };
        let transition = Transition::after(&id, &success(0, &long, 0.1), &pipeline, None, String::new()).unwrap();
        let event = WorkflowEvent::decode(transition.completed_event.as_slice()).unwrap();
        let Some(Kind::PhaseCompleted(completed)) = event.kind else {
            panic!()
        };
        assert!(completed.output.is_empty() && completed.output_omitted);
        assert_eq!(completed.output_bytes, long.len() as u64);
        assert_eq!(transition.output, long, "the stored output is whole");
        let last = Transition::after(&id, &success(1, &long, 0.1), &pipeline, Some(&earlier), String::new()).unwrap();
        let finished = WorkflowEvent::decode(last.follow_up.as_slice()).unwrap();
        let Some(Kind::Completed(completed)) = finished.kind else {
            panic!()
        };
        assert!(completed.final_plan.is_empty() && completed.final_plan_omitted);
        let short = Transition::after(&id, &success(0, "short", 0.1), &pipeline, None, String::new()).unwrap();
        let event = WorkflowEvent::decode(short.completed_event.as_slice()).unwrap();
        let Some(Kind::PhaseCompleted(completed)) = event.kind else {
            panic!()
        };
        assert_eq!((completed.output.as_str(), completed.output_omitted), ("short", false));
    }

    #[test]
    fn a_failure_fails_the_run_naming_the_phase() {
        let id = WorkflowId::new(0);
        let result = PhaseResult {
            phase_index: 1,
            outcome: Some(Outcome::Failure(nexus_proto::internal::PhaseFailure {
                reason: "HTTP 400".into(),
            })),
            ..Default::default()
        };
        let transition = Transition::after(&id, &result, &pipeline(&["a", "b"]), None, String::new()).unwrap();
        assert_eq!(transition.step, Step::Fail);
        assert_eq!(transition.reason, "phase b failed: HTTP 400");
    }
}
