//! Applying a phase result: record it, then queue the next phase, complete
//! the workflow or fail it, all in one fenced script (`apply_result.lua`).

use super::{WorkflowStore, event, phase_task, scripts, view};
use crate::errors::ApiError;
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{EVENTS_CHANNEL, WorkflowKeys};
use nexus_pipeline::stream::ORCHESTRATORS_GROUP;
use nexus_proto::internal::{PhaseResult, PhaseSuccess, PipelineSnapshot, phase_result::Outcome};
use nexus_proto::v1::{
    Phase, PhaseCompleted, PhaseStatus, Rating, WorkflowCompleted, WorkflowFailed, workflow_event::Kind,
};
use prost::Message;

/// What applying one result did.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied: "next" (the next phase is queued), "complete" or "fail".
    Applied(&'static str),
    /// Fenced off: a duplicate, a late result of an old attempt, or a result
    /// for a workflow that already ended. Nothing changed.
    Stale(String),
    Missing,
}

/// The arguments that differ between the three ways a result can end.
struct Transition {
    outcome: &'static str,
    phase_name: String,
    output: String,
    record: Vec<u8>,
    completed_event: Vec<u8>,
    follow_up: Vec<u8>,
    rating: Vec<u8>,
    reason: String,
}

impl WorkflowStore {
    /// Applies the result read from `entry_id` of the shard's result stream
    /// and acknowledges that entry in the same atomic step.
    pub async fn apply_result(&self, entry_id: &str, result: &PhaseResult) -> Result<ApplyOutcome, ApiError> {
        let id = WorkflowId::parse(&result.workflow_id)?;
        let mut conn = self.conn.clone();
        let pipeline = self.pipelines.get(&mut conn, id.shard(), &result.pipeline_id).await?;
        let transition = match &result.outcome {
            Some(Outcome::Success(success)) => self.success_transition(&id, result, success, &pipeline).await?,
            Some(Outcome::Failure(failure)) => failure_transition(result, &pipeline, &failure.reason),
            None => failure_transition(result, &pipeline, "the worker reported no outcome"),
        };
        let keys = WorkflowKeys::new(&id);
        let kind = transition.outcome;
        let reply: String = scripts::APPLY_RESULT
            .key(keys.state())
            .key(keys.events())
            .key(keys.outputs())
            .key(keys.shard.tasks())
            .key(keys.shard.results())
            .arg(result.phase_index)
            .arg(result.attempt)
            .arg(transition.outcome)
            .arg(nexus_pipeline::now_ms())
            .arg(transition.phase_name)
            .arg(transition.output)
            .arg(transition.record)
            .arg(transition.completed_event)
            .arg(transition.follow_up)
            .arg(transition.rating)
            .arg(transition.reason)
            .arg(self.retention_secs)
            .arg(EVENTS_CHANNEL)
            .arg(id.to_string())
            .arg(entry_id)
            .arg(ORCHESTRATORS_GROUP)
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.as_str() {
            "applied" => ApplyOutcome::Applied(kind),
            "missing" => ApplyOutcome::Missing,
            other => ApplyOutcome::Stale(other.trim_start_matches("stale:").to_string()),
        })
    }

    async fn success_transition(
        &self,
        id: &WorkflowId,
        result: &PhaseResult,
        success: &PhaseSuccess,
        pipeline: &PipelineSnapshot,
    ) -> Result<Transition, ApiError> {
        let index = result.phase_index as usize;
        let spec = pipeline.phases.get(index).ok_or_else(|| {
            ApiError::Corrupt(format!(
                "result for phase {index} of a {}-phase pipeline",
                pipeline.phases.len()
            ))
        })?;
        let record = Phase {
            index: result.phase_index,
            name: spec.name.clone(),
            model: result.model.clone(),
            status: PhaseStatus::Completed as i32,
            output: String::new(),
            usage: success.usage,
            duration_ms: success.duration_ms,
            tries: success.tries,
            finish_reason: success.finish_reason.clone(),
            generation_id: success.generation_id.clone(),
        };
        let completed = event(Kind::PhaseCompleted(PhaseCompleted {
            index: result.phase_index,
            phase: spec.name.clone(),
            model: result.model.clone(),
            output: success.output.clone(),
            usage: success.usage,
            duration_ms: success.duration_ms,
            tries: success.tries,
            rating: success.rating.clone(),
            result_published_at: Some(nexus_proto::timestamp_from_micros(result.published_at_us)),
            finish_reason: success.finish_reason.clone(),
            generation_id: success.generation_id.clone(),
        }));
        let mut transition = Transition {
            outcome: "next",
            phase_name: spec.name.clone(),
            output: success.output.clone(),
            record: record.encode_to_vec(),
            completed_event: completed.encode_to_vec(),
            follow_up: Vec::new(),
            rating: success.rating.as_ref().map(Message::encode_to_vec).unwrap_or_default(),
            reason: String::new(),
        };
        match pipeline.phases.get(index + 1) {
            Some(next) => {
                transition.follow_up =
                    phase_task(id, result.phase_index + 1, next, &result.pipeline_id).encode_to_vec();
            }
            None => {
                let finished = self.completion(id, pipeline, &record, success).await?;
                transition.outcome = "complete";
                transition.follow_up = event(Kind::Completed(finished)).encode_to_vec();
            }
        }
        Ok(transition)
    }

    /// The completed event: final plan, rating and total usage, from what is
    /// stored plus the last phase's result.
    async fn completion(
        &self,
        id: &WorkflowId,
        pipeline: &PipelineSnapshot,
        last: &Phase,
        success: &PhaseSuccess,
    ) -> Result<WorkflowCompleted, ApiError> {
        let stored = view::load_stored(&mut self.conn.clone(), id, true)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        let mut phases = stored.phase_records()?;
        phases.push(last.clone());
        let final_plan = if last.name == pipeline.final_output_phase {
            success.output.clone()
        } else {
            stored
                .outputs
                .get(&pipeline.final_output_phase)
                .cloned()
                .unwrap_or_default()
        };
        let rating: Option<Rating> = success.rating.clone().or(stored.rating()?);
        Ok(WorkflowCompleted {
            final_plan,
            rating,
            total_usage: Some(view::total_usage(&phases)),
        })
    }
}

fn failure_transition(result: &PhaseResult, pipeline: &PipelineSnapshot, reason: &str) -> Transition {
    let phase = pipeline
        .phases
        .get(result.phase_index as usize)
        .map(|spec| spec.name.clone())
        .unwrap_or_else(|| format!("#{}", result.phase_index));
    let reason = format!("phase {phase} failed: {reason}");
    let failed = event(Kind::Failed(WorkflowFailed {
        reason: reason.clone(),
        phase: phase.clone(),
    }));
    Transition {
        outcome: "fail",
        phase_name: phase,
        output: String::new(),
        record: Vec::new(),
        completed_event: Vec::new(),
        follow_up: failed.encode_to_vec(),
        rating: Vec::new(),
        reason,
    }
}
