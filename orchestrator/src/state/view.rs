//! Reading workflows back: the `Workflow` a client sees is assembled from the
//! state hash, the outputs hash and the pipeline snapshot.

use super::WorkflowStore;
use super::events::timestamp;
use crate::errors::ApiError;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{WorkflowKeys, field, status};
use nexus_pipeline::transition::total_usage;
use nexus_proto::internal::{PipelineSnapshot, RunChoices};
use nexus_proto::v1::{ApprovalGate, Budget, Phase, PhaseStatus, ProjectPlan, Rating, Workflow, WorkflowStatus};
use prost::Message;
use std::collections::HashMap;

/// A workflow's two hashes, as stored.
pub struct StoredWorkflow {
    pub state: HashMap<String, Vec<u8>>,
    pub outputs: HashMap<String, String>,
}

/// Loads the state hash and, `with_outputs`, the outputs hash, in one round
/// trip; `None` when the workflow does not exist (never did, or expired).
/// Listings leave the outputs out: they can be megabytes per workflow.
pub async fn load_stored(
    conn: &mut Connection,
    id: &WorkflowId,
    with_outputs: bool,
) -> Result<Option<StoredWorkflow>, ApiError> {
    let keys = WorkflowKeys::new(id);
    let (state, outputs): (HashMap<String, Vec<u8>>, HashMap<String, String>) = if with_outputs {
        redis::pipe()
            .hgetall(keys.state())
            .hgetall(keys.outputs())
            .query_async(conn)
            .await?
    } else {
        let state = redis::AsyncCommands::hgetall(conn, keys.state()).await?;
        (state, HashMap::new())
    };
    Ok((!state.is_empty()).then_some(StoredWorkflow { state, outputs }))
}

impl StoredWorkflow {
    fn text(&self, name: &str) -> String {
        self.state
            .get(name)
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .unwrap_or_default()
    }

    fn number(&self, name: &str) -> i64 {
        self.text(name).parse().unwrap_or_default()
    }

    pub fn status(&self) -> String {
        self.text(field::STATUS)
    }

    /// Records of completed phases, in order.
    pub fn phase_records(&self) -> Result<Vec<Phase>, ApiError> {
        let mut records = self
            .state
            .iter()
            .filter(|(name, _)| name.starts_with("phase:"))
            .map(|(name, bytes)| Phase::decode(bytes.as_slice()).map_err(|e| ApiError::Corrupt(format!("{name}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|phase| phase.index);
        Ok(records)
    }

    pub fn rating(&self) -> Result<Option<Rating>, ApiError> {
        self.state
            .get(field::RATING)
            .map(|bytes| Rating::decode(bytes.as_slice()).map_err(|e| ApiError::Corrupt(format!("rating: {e}"))))
            .transpose()
    }

    /// The run's models per role and instructions; empty for runs stored
    /// before runs recorded them.
    pub fn choices(&self) -> Result<RunChoices, ApiError> {
        let bytes = self.state.get(field::CHOICES).map(Vec::as_slice).unwrap_or_default();
        RunChoices::decode(bytes).map_err(|e| ApiError::Corrupt(format!("choices: {e}")))
    }

    /// The run's cap and spend; `None` for runs without a cap.
    fn budget(&self) -> Option<Budget> {
        let cap: f64 = self.text(field::BUDGET_USD).parse().unwrap_or_default();
        let spent: f64 = self.text(field::SPENT_USD).parse().unwrap_or_default();
        (cap > 0.0).then(|| Budget {
            max_cost_usd: cap,
            spent_usd: spent,
            remaining_usd: (cap - spent).max(0.0),
        })
    }

    pub fn plan(&self) -> Result<ProjectPlan, ApiError> {
        let bytes = self.state.get(field::PLAN).map(Vec::as_slice).unwrap_or_default();
        ProjectPlan::decode(bytes).map_err(|e| ApiError::Corrupt(format!("plan: {e}")))
    }

    pub fn pipeline_id(&self) -> String {
        self.text(field::PIPELINE)
    }

    /// The approval gate the run waits at, if it does.
    fn approval(&self, pipeline: &PipelineSnapshot) -> Option<ApprovalGate> {
        let index: u32 = self.text(field::GATE).parse().ok()?;
        Some(ApprovalGate {
            index,
            phase: pipeline
                .phases
                .get(index as usize)
                .map(|spec| spec.name.clone())
                .unwrap_or_default(),
            deadline: Some(timestamp(self.number(field::GATE_DEADLINE_MS))),
            on_timeout: self.text(field::GATE_ON_TIMEOUT),
        })
    }

    pub fn into_workflow(
        self,
        id: &WorkflowId,
        pipeline: &PipelineSnapshot,
        with_outputs: bool,
    ) -> Result<Workflow, ApiError> {
        let workflow_status = workflow_status(&self.status());
        let records = self.phase_records()?;
        let current = self.number(field::PHASE) as usize;
        let phases: Vec<Phase> = planned_phases(pipeline)
            .into_iter()
            .map(|planned| {
                let index = planned.index as usize;
                let mut phase = records
                    .iter()
                    .find(|r| r.index == planned.index)
                    .cloned()
                    .unwrap_or(Phase {
                        status: pending_phase_status(workflow_status, index, current) as i32,
                        ..planned
                    });
                if with_outputs {
                    phase.output = self.outputs.get(&phase.name).cloned().unwrap_or_default();
                    phase.output_bytes = phase.output.len() as u64;
                }
                phase
            })
            .collect();
        let completed = workflow_status == WorkflowStatus::Completed;
        let choices = self.choices()?;
        let budget = self.budget();
        Ok(Workflow {
            workflow_id: id.to_string(),
            status: workflow_status as i32,
            plan: Some(self.plan()?),
            created_at: Some(timestamp(self.number(field::CREATED_MS))),
            updated_at: Some(timestamp(self.number(field::UPDATED_MS))),
            final_plan: if completed {
                self.outputs
                    .get(&pipeline.final_output_phase)
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            },
            rating: if completed { self.rating()? } else { None },
            total_usage: Some(total_usage(&phases)),
            phases,
            reason: self.text(field::REASON),
            idempotency_key: self.text(field::IDEMPOTENCY_KEY),
            pipeline: pipeline.name.clone(),
            models: choices.models,
            instructions: choices.instructions,
            budget,
            parent_workflow_id: self.text(field::PARENT),
            fork_phase: self.number(field::FORK_PHASE) as u32,
            approval: self.approval(pipeline),
            tenant: self.text(field::TENANT),
        })
    }
}

fn workflow_status(stored: &str) -> WorkflowStatus {
    match stored {
        status::PENDING => WorkflowStatus::Pending,
        status::RUNNING => WorkflowStatus::Running,
        status::COMPLETED => WorkflowStatus::Completed,
        status::FAILED => WorkflowStatus::Failed,
        status::CANCELLED => WorkflowStatus::Cancelled,
        status::AWAITING_APPROVAL => WorkflowStatus::AwaitingApproval,
        _ => WorkflowStatus::Unspecified,
    }
}

/// The status of a phase that has no completed record.
fn pending_phase_status(workflow: WorkflowStatus, index: usize, current: usize) -> PhaseStatus {
    if index != current {
        return PhaseStatus::Pending;
    }
    match workflow {
        WorkflowStatus::Running => PhaseStatus::Running,
        WorkflowStatus::Failed => PhaseStatus::Failed,
        WorkflowStatus::Cancelled => PhaseStatus::Cancelled,
        _ => PhaseStatus::Pending,
    }
}

/// Every phase of a pipeline as not yet run.
pub fn planned_phases(pipeline: &PipelineSnapshot) -> Vec<Phase> {
    pipeline
        .phases
        .iter()
        .enumerate()
        .map(|(index, spec)| Phase {
            index: index as u32,
            name: spec.name.clone(),
            model: spec.model.clone(),
            status: PhaseStatus::Pending as i32,
            ..Default::default()
        })
        .collect()
}

/// Most index reads one `ListWorkflows` call makes while it skips expired
/// entries.
const MAX_LIST_ROUNDS: usize = 8;

/// Where the previous page ended: (created ms, workflow id).
type PageCursor = (i64, WorkflowId);

impl WorkflowStore {
    pub async fn get(&self, id: &WorkflowId) -> Result<Workflow, ApiError> {
        self.get_with(id, true).await
    }

    /// The workflow, with or without its phases' outputs and final plan.
    pub async fn get_with(&self, id: &WorkflowId, with_outputs: bool) -> Result<Workflow, ApiError> {
        self.load(id, with_outputs)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_string()))
    }

    pub(super) async fn load(&self, id: &WorkflowId, with_outputs: bool) -> Result<Option<Workflow>, ApiError> {
        let mut conn = self.conn.clone();
        let Some(stored) = load_stored(&mut conn, id, with_outputs).await? else {
            return Ok(None);
        };
        let pipeline = self.pipelines.get(&mut conn, id.shard(), &stored.pipeline_id()).await?;
        stored.into_workflow(id, &pipeline, with_outputs).map(Some)
    }

    /// Newest first across all shards, `page_size` at a time. Index entries
    /// whose workflow expired are skipped (and dropped from the index), and
    /// the page is filled from older entries instead, so a thinned page
    /// never ends the listing early.
    /// With `parent`, only that workflow's forks are listed, and with
    /// `tenant` only that tenant's runs (a short page may come with a token:
    /// the listing goes on from where it stopped).
    pub async fn list(
        &self,
        page_size: usize,
        page_token: &str,
        parent: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<(Vec<Workflow>, String), ApiError> {
        let mut after = parse_page_token(page_token)?;
        let mut workflows = Vec::with_capacity(page_size);
        // Bounded work per call: past this many refills a short page is
        // returned with a token, and the client's next call goes on.
        for _ in 0..MAX_LIST_ROUNDS {
            if workflows.len() == page_size {
                break;
            }
            let wanted = page_size - workflows.len();
            let mut candidates = Vec::new();
            for shard in 0..self.shards {
                candidates.extend(self.newest_in_shard(shard, wanted, after.as_ref()).await?);
            }
            if candidates.is_empty() {
                return Ok((workflows, String::new()));
            }
            candidates.sort_by(|a, b| b.cmp(a));
            candidates.truncate(wanted);
            for (created_ms, id) in candidates {
                match self.load(&id, false).await? {
                    Some(workflow)
                        if parent.is_none_or(|parent| workflow.parent_workflow_id == parent)
                            && tenant.is_none_or(|tenant| workflow.tenant == tenant) =>
                    {
                        workflows.push(workflow)
                    }
                    Some(_) => {}
                    None => self.forget_expired(&id).await,
                }
                after = Some((created_ms, id));
            }
        }
        let next = after.map(|(ms, id)| format!("{ms}:{id}")).unwrap_or_default();
        Ok((workflows, next))
    }

    /// Drops an expired workflow's index entry (housekeeping would too, later).
    async fn forget_expired(&self, id: &WorkflowId) {
        let index = nexus_pipeline::keys::ShardKeys::new(id.shard()).index();
        let removed: redis::RedisResult<i64> =
            redis::AsyncCommands::zrem(&mut self.conn.clone(), index, id.to_string()).await;
        if let Err(error) = removed {
            tracing::debug!(%error, workflow_id = %id, "could not drop an expired index entry");
        }
    }

    /// Up to `count` index entries of one shard older than `after`.
    async fn newest_in_shard(
        &self,
        shard: u16,
        count: usize,
        after: Option<&PageCursor>,
    ) -> Result<Vec<PageCursor>, ApiError> {
        let index = nexus_pipeline::keys::ShardKeys::new(shard).index();
        let max = after.map(|(ms, _)| ms.to_string()).unwrap_or_else(|| "+inf".into());
        let mut found = Vec::new();
        let mut offset = 0;
        loop {
            let batch: Vec<(String, i64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(offset)
                .arg(count + 1)
                .query_async(&mut self.conn.clone())
                .await?;
            let exhausted = batch.len() <= count;
            offset += batch.len();
            found.extend(
                batch
                    .into_iter()
                    .filter_map(|(member, ms)| Some((ms, WorkflowId::parse(&member).ok()?)))
                    .filter(|entry| after.is_none_or(|after| entry < after)),
            );
            if exhausted || found.len() >= count {
                found.truncate(count);
                return Ok(found);
            }
        }
    }
}

fn parse_page_token(token: &str) -> Result<Option<PageCursor>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::InvalidArgument("page_token is not a token from a previous ListWorkflows page".into());
    let (ms, id) = token.split_once(':').ok_or_else(invalid)?;
    Ok(Some((
        ms.parse().map_err(|_| invalid())?,
        WorkflowId::parse(id).map_err(|_| invalid())?,
    )))
}
