//! Forking a run: a new run that starts from another's recorded phases.
//!
//! The fork copies the parent's outputs and records of every phase before
//! its fork point into its own keys, in the same atomic step that creates
//! it (`create_workflow.lua` with a seed), and queues only the fork point's
//! phase. So copied phases cost nothing and call no model, and from then on
//! the fork is an ordinary run: workers, watchers and GetWorkflow need
//! nothing new. Copied records say where they came from (`copied_from`)
//! and carry no usage: the fork did not pay for them.

use super::view::{StoredWorkflow, load_stored};
use super::{Started, WorkflowStore, event, scoped_key};
use crate::catalog::PipelineCatalog;
use crate::errors::ApiError;
use crate::validation::{CostCaps, Seed, ValidStart, fork_fingerprint, idempotency_key};
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::field;
use nexus_proto::internal::{OutputKind, PipelineSnapshot};
use nexus_proto::v1::{ForkWorkflowRequest, Phase, PhaseCompleted, PhaseStatus, Usage, workflow_event::Kind};
use prost::Message;

impl WorkflowStore {
    /// Starts the fork `request` asks for (see the module doc).
    pub async fn fork(
        &self,
        parent_id: &WorkflowId,
        request: &ForkWorkflowRequest,
        catalog: &PipelineCatalog,
        caps: CostCaps,
        tenant: &str,
    ) -> Result<Started, ApiError> {
        let key = idempotency_key(&request.idempotency_key)?;
        let mut conn = self.conn.clone();
        let parent = load_stored(&mut conn, parent_id, true)
            .await?
            .ok_or_else(|| ApiError::NotFound(parent_id.to_string()))?;
        let pipeline = self
            .pipelines
            .get(&mut conn, parent_id.shard(), &parent.pipeline_id())
            .await?;
        let from = fork_point(&pipeline, request.from_phase.trim())?;
        // Arguments are checked before the parent's state: a bad request is
        // INVALID_ARGUMENT whatever the parent's progress.
        let mut chosen = catalog.choose_fork(&pipeline.name, &parent.choices()?, request, from)?;
        let same_phases = chosen
            .snapshot
            .phases
            .iter()
            .map(|p| &p.name)
            .eq(pipeline.phases.iter().map(|p| &p.name));
        if !same_phases {
            return Err(ApiError::FailedPrecondition(format!(
                "pipeline {:?} has changed since {parent_id} ran: its phases differ, so no phase can be copied",
                pipeline.name
            )));
        }
        chosen.choices.max_cost_usd = caps.for_request(request.max_cost_usd)?;
        let records = copied_records(parent_id, &parent, &pipeline, from)?;
        let plan = parent.plan()?;
        let seed = seed(parent_id, &parent, &pipeline, records, from)?;
        let start = ValidStart {
            plan: &plan,
            idempotency_key: key,
            pipeline: chosen,
            fingerprint: fork_fingerprint(request),
            seed,
            tenant: tenant.to_string(),
        };
        self.start(self.new_id(&scoped_key(tenant, &request.idempotency_key)), start)
            .await
    }
}

/// The index of the phase named `name`, the first the fork runs itself.
fn fork_point(pipeline: &PipelineSnapshot, name: &str) -> Result<usize, ApiError> {
    pipeline.phases.iter().position(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = pipeline.phases.iter().map(|p| p.name.as_str()).collect();
        ApiError::InvalidArgument(format!(
            "from_phase {name:?} is not a phase of pipeline {:?}; its phases are: {}",
            pipeline.name,
            names.join(", ")
        ))
    })
}

/// The parent's records of the phases before `from`, as the fork keeps
/// them; each must have completed.
fn copied_records(
    parent_id: &WorkflowId,
    parent: &StoredWorkflow,
    pipeline: &PipelineSnapshot,
    from: usize,
) -> Result<Vec<Phase>, ApiError> {
    let records = parent.phase_records()?;
    pipeline.phases[..from]
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let record = records
                .iter()
                .find(|r| r.index as usize == index && r.status == PhaseStatus::Completed as i32)
                .ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "phase {:?} of {parent_id} has not completed, so the fork cannot copy it; fork from it or an earlier phase",
                        spec.name
                    ))
                })?;
            let copied_from = if record.copied_from.is_empty() {
                parent_id.to_string()
            } else {
                record.copied_from.clone()
            };
            Ok(Phase {
                usage: Some(Usage::default()),
                duration_ms: 0,
                tries: 0,
                copied_from,
                ..record.clone()
            })
        })
        .collect()
}

/// What the fork starts with: lineage, copied records, outputs and events.
fn seed(
    parent_id: &WorkflowId,
    parent: &StoredWorkflow,
    pipeline: &PipelineSnapshot,
    records: Vec<Phase>,
    from: usize,
) -> Result<Seed, ApiError> {
    let from_text = from.to_string();
    let mut seed = Seed {
        first_phase: from as u32,
        state: vec![
            (field::PARENT.into(), parent_id.to_string().into_bytes()),
            (field::FORK_PHASE.into(), from_text.clone().into_bytes()),
            (field::PHASE.into(), from_text.into_bytes()),
        ],
        ..Seed::default()
    };
    let rating = parent.rating()?;
    for record in records {
        let spec = &pipeline.phases[record.index as usize];
        let output = parent.outputs.get(&spec.name).cloned().unwrap_or_default();
        let is_rating = spec.output() == OutputKind::Rating;
        if let Some(rating) = rating.as_ref().filter(|_| is_rating) {
            seed.state.push((field::RATING.into(), rating.encode_to_vec()));
        }
        let completed = event(Kind::PhaseCompleted(PhaseCompleted {
            index: record.index,
            phase: record.name.clone(),
            model: record.model.clone(),
            requested_model: record.requested_model.clone(),
            output: output.clone(),
            usage: record.usage,
            rating: rating.clone().filter(|_| is_rating),
            finish_reason: record.finish_reason.clone(),
            generation_id: record.generation_id.clone(),
            copied_from: record.copied_from.clone(),
            ..Default::default()
        }));
        seed.events.push(completed.encode_to_vec());
        seed.outputs.push((spec.name.clone(), output));
        seed.state
            .push((field::phase_record(record.index), record.encode_to_vec()));
    }
    Ok(seed)
}
