//! Comparing runs phase by phase, so a client can show branches (a run and
//! its forks) side by side: which phases share an output, which differ, and
//! what each run's phases cost and scored. Outputs are compared by SHA-256,
//! and only digests travel: the texts are a GetWorkflow away.

use super::WorkflowStore;
use crate::errors::ApiError;
use nexus_pipeline::ids::WorkflowId;
use nexus_proto::internal::OutputKind;
use nexus_proto::v1::{CompareWorkflowsResponse, Phase, PhaseComparison, PhaseStatus, RunPhase, RunSummary, Workflow};
use std::fmt::Write;

/// Most runs one comparison takes.
pub const MAX_COMPARED: usize = 10;

impl WorkflowStore {
    /// Compares `ids` (2 to [`MAX_COMPARED`] runs of one pipeline).
    pub async fn compare(&self, ids: &[WorkflowId]) -> Result<CompareWorkflowsResponse, ApiError> {
        if !(2..=MAX_COMPARED).contains(&ids.len()) {
            return Err(ApiError::InvalidArgument(format!(
                "workflow_ids: give 2 to {MAX_COMPARED} runs to compare, not {}",
                ids.len()
            )));
        }
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids {
            runs.push(self.get(id).await?);
        }
        if let Some(other) = runs.iter().find(|run| run.pipeline != runs[0].pipeline) {
            return Err(ApiError::InvalidArgument(format!(
                "workflow_ids: {} ran pipeline {:?} and {} ran {:?}; only runs of one pipeline compare phase by phase",
                runs[0].workflow_id, runs[0].pipeline, other.workflow_id, other.pipeline
            )));
        }
        let rating_phase = self.rating_phase(&ids[0]).await?;
        Ok(CompareWorkflowsResponse {
            runs: runs.iter().map(summary).collect(),
            phases: (0..runs[0].phases.len())
                .map(|index| compare_phase(&runs, index, rating_phase == Some(index)))
                .collect(),
        })
    }

    /// The index of the phase whose output is the run's rating, if any.
    async fn rating_phase(&self, id: &WorkflowId) -> Result<Option<usize>, ApiError> {
        let mut conn = self.conn.clone();
        let stored = super::view::load_stored(&mut conn, id, false)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        let pipeline = self.pipelines.get(&mut conn, id.shard(), &stored.pipeline_id()).await?;
        Ok(pipeline
            .phases
            .iter()
            .position(|spec| spec.output() == OutputKind::Rating))
    }
}

fn summary(run: &Workflow) -> RunSummary {
    RunSummary {
        workflow_id: run.workflow_id.clone(),
        status: run.status,
        parent_workflow_id: run.parent_workflow_id.clone(),
        fork_phase: run.fork_phase,
        score: run.rating.as_ref().map_or(0, |rating| rating.score),
        total_usage: run.total_usage,
        models: run.models.clone(),
    }
}

/// Phase `index` across the runs: each run's entry, grouped by output.
fn compare_phase(runs: &[Workflow], index: usize, is_rating_phase: bool) -> PhaseComparison {
    let digests: Vec<Option<String>> = runs.iter().map(|run| output_digest(&run.phases[index])).collect();
    let entries: Vec<RunPhase> = runs
        .iter()
        .zip(&digests)
        .map(|(run, digest)| {
            let phase = &run.phases[index];
            let group = digest.as_ref().map_or(-1, |digest| {
                digests
                    .iter()
                    .position(|other| other.as_ref() == Some(digest))
                    .unwrap_or(0) as i32
            });
            RunPhase {
                workflow_id: run.workflow_id.clone(),
                status: phase.status,
                model: phase.model.clone(),
                group,
                output_bytes: phase.output.len() as u64,
                output_sha256: digest.clone().unwrap_or_default(),
                usage: phase.usage,
                score: if is_rating_phase {
                    run.rating.as_ref().map_or(0, |r| r.score)
                } else {
                    0
                },
                human_edit: phase.human_edit,
                copied_from: phase.copied_from.clone(),
            }
        })
        .collect();
    PhaseComparison {
        index: index as u32,
        phase: runs[0].phases[index].name.clone(),
        identical: entries.iter().all(|entry| entry.group == 0),
        runs: entries,
    }
}

/// The first 16 hex digits of a completed phase's output's SHA-256.
fn output_digest(phase: &Phase) -> Option<String> {
    if phase.status != PhaseStatus::Completed as i32 {
        return None;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, phase.output.as_bytes());
    let mut hex = String::with_capacity(16);
    for byte in &digest.as_ref()[..8] {
        let _ = write!(hex, "{byte:02x}");
    }
    Some(hex)
}
