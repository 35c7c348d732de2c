//! The `OperationsService`: an operator's view of the task queues, and the
//! way back to work for tasks no worker could finish (dead letters).
//!
//! A service of its own beside `WorkflowService` because its callers and its
//! subject differ: operators (admin tokens only, `Tokens::check_admin`)
//! looking at shards and streams, not a tenant looking at its runs. It reads
//! the shards' streams as `nexus_pipeline::keys` lays them out and changes
//! state only through a transition that exists already: a requeue is a fork
//! (`state::fork`) of the run the dead letter failed, from the dead-lettered
//! phase, and only once the fork exists is the dead letter removed. Reviving
//! the failed run instead would take back an end its watchers already saw.

use crate::catalog::PipelineCatalog;
use crate::errors::ApiError;
use crate::state::{WorkflowStore, scoped_key};
use crate::validation::{CostCaps, page_size, parse_cursor};
use futures::future::try_join_all;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::{WorkflowId, shard_for};
use nexus_pipeline::keys::ShardKeys;
use nexus_pipeline::stream::{PAYLOAD_FIELD, WORKERS_GROUP};
use nexus_pipeline::transition::task_phase_name;
use nexus_proto::internal::PhaseTask;
use nexus_proto::v1::operations_service_server::OperationsService;
use nexus_proto::v1::{
    DeadLetter, DeadLetterRef, ForkWorkflowRequest, ListDeadLettersRequest, ListDeadLettersResponse, QueueStatsRequest,
    QueueStatsResponse, RequeueDeadLettersRequest, RequeueDeadLettersResponse, Requeued, ShardStats,
};
use prost::Message;
use redis::streams::{StreamId, StreamInfoGroupsReply, StreamPendingCountReply, StreamRangeReply};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The most dead letters one requeue call may name; `all` has no limit.
const MAX_REQUEUE_ENTRIES: usize = 1000;
/// Dead letters read at a time while requeueing all of them.
const REQUEUE_BATCH: usize = 100;

pub struct OperationsApi {
    pub store: WorkflowStore,
    pub catalog: Arc<PipelineCatalog>,
    pub cost_caps: CostCaps,
}

/// The idempotency key of the fork that requeues a dead letter: a retried
/// requeue (after a timeout, or a replica lost half-way) finds the same fork.
fn requeue_key(shard: u16, entry_id: &str) -> String {
    format!("requeue-{shard}-{entry_id}")
}

/// One entry of a shard's dead-letter stream, as `dead_letter.lua` wrote it.
struct StoredDeadLetter {
    shard: u16,
    entry_id: String,
    /// The run and task it was, or why it cannot be read as one.
    task: Result<(WorkflowId, PhaseTask), String>,
    task_entry_id: String,
    deliveries: u32,
    reason: String,
}

impl StoredDeadLetter {
    fn new(shard: u16, entry: StreamId) -> Self {
        let text = |name: &str| match entry.map.get(name) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => String::new(),
        };
        let task = match entry.map.get(PAYLOAD_FIELD) {
            Some(redis::Value::BulkString(payload)) => decode_task(payload),
            _ => Err("the entry holds no task".to_string()),
        };
        Self {
            shard,
            task,
            task_entry_id: text("task_id"),
            deliveries: text("deliveries").parse().unwrap_or_default(),
            reason: text("reason"),
            entry_id: entry.id,
        }
    }

    fn phase_name(&self) -> &str {
        match &self.task {
            Ok((_, task)) => task_phase_name(task),
            Err(_) => "",
        }
    }

    fn view(&self, requeued_as: String) -> DeadLetter {
        let (workflow_id, phase_index) = match &self.task {
            Ok((id, task)) => (id.to_string(), task.phase_index),
            Err(_) => (String::new(), 0),
        };
        DeadLetter {
            shard: self.shard.into(),
            entry_id: self.entry_id.clone(),
            workflow_id,
            phase_index,
            phase: self.phase_name().to_string(),
            reason: self.reason.clone(),
            deliveries: self.deliveries,
            dead_lettered_at: entry_ms(&self.entry_id).map(nexus_proto::timestamp_from_ms),
            requeued_as,
            task_entry_id: self.task_entry_id.clone(),
        }
    }
}

fn decode_task(payload: &[u8]) -> Result<(WorkflowId, PhaseTask), String> {
    let task = PhaseTask::decode(payload).map_err(|error| format!("the task cannot be decoded ({error})"))?;
    let id =
        WorkflowId::parse(&task.workflow_id).map_err(|error| format!("the task names no valid workflow ({error})"))?;
    if task_phase_name(&task).is_empty() {
        return Err("the task names no phase".to_string());
    }
    Ok((id, task))
}

/// When a stream entry was added: its id's milliseconds.
fn entry_ms(entry_id: &str) -> Option<i64> {
    parse_cursor(entry_id).and_then(|(ms, _)| i64::try_from(ms).ok())
}

/// A ListDeadLetters page token: the last dead letter of the previous page,
/// as `<shard>:<entry_id>`.
fn parse_page_token(token: &str) -> Result<Option<(u16, String)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::InvalidArgument("page_token is not a token from a previous ListDeadLetters page".into());
    let (shard, entry_id) = token.split_once(':').ok_or_else(invalid)?;
    let shard = shard.parse().map_err(|_| invalid())?;
    parse_cursor(entry_id).ok_or_else(invalid)?;
    Ok(Some((shard, entry_id.to_string())))
}

impl OperationsApi {
    fn connection(&self) -> Connection {
        self.store.connection()
    }

    fn check_shard(&self, shard: u32) -> Result<u16, ApiError> {
        match u16::try_from(shard) {
            Ok(shard) if shard < self.store.shards() => Ok(shard),
            _ => Err(ApiError::InvalidArgument(format!(
                "shard {shard} does not exist: there are {} (0 to {})",
                self.store.shards(),
                self.store.shards() - 1
            ))),
        }
    }

    /// Up to `count` dead letters of `shard`, oldest first, after `after`
    /// (an entry id) or from the start.
    async fn read(&self, shard: u16, after: Option<&str>, count: usize) -> Result<Vec<StoredDeadLetter>, ApiError> {
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(ShardKeys::new(shard).dead_letter())
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.connection())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| StoredDeadLetter::new(shard, entry))
            .collect())
    }

    async fn read_one(&self, shard: u16, entry_id: &str) -> Result<Option<StoredDeadLetter>, ApiError> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(ShardKeys::new(shard).dead_letter())
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut self.connection())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .next()
            .map(|entry| StoredDeadLetter::new(shard, entry)))
    }

    /// The fork an earlier requeue of `letter` started, if one did (it then
    /// stopped before removing the dead letter); empty if none.
    async fn requeued_as(&self, letter: &StoredDeadLetter) -> Result<String, ApiError> {
        let Ok((parent, _)) = &letter.task else {
            return Ok(String::new());
        };
        // The fork's key is scoped to the run's tenant, as the fork was.
        let tenant = match self.store.get_with(parent, false).await {
            Ok(workflow) => workflow.tenant,
            Err(ApiError::NotFound(_)) => return Ok(String::new()),
            Err(error) => return Err(error),
        };
        let key = scoped_key(&tenant, &requeue_key(letter.shard, &letter.entry_id));
        let record: Option<String> = redis::cmd("GET")
            .arg(ShardKeys::new(shard_for(Some(&key), self.store.shards())).idempotency(&key))
            .query_async(&mut self.connection())
            .await?;
        // The record is "<workflow id>|<request fingerprint>" (create_workflow.lua).
        Ok(record
            .and_then(|record| record.split_once('|').map(|(id, _)| id.to_string()))
            .unwrap_or_default())
    }

    /// Requeues one dead letter (see the module doc). Problems with this
    /// dead letter are the answer's `error`; Redis failing is the call's.
    async fn requeue(&self, letter: &StoredDeadLetter) -> Result<Requeued, ApiError> {
        let mut answer = Requeued {
            shard: letter.shard.into(),
            entry_id: letter.entry_id.clone(),
            ..Default::default()
        };
        let parent = match &letter.task {
            Ok((parent, _)) => parent,
            Err(why) => {
                answer.error = format!("{why}, so it cannot be requeued; it stays in the dead-letter stream");
                return Ok(answer);
            }
        };
        answer.workflow_id = parent.to_string();
        match self.fork(letter, parent).await {
            Ok(fork) => {
                let _: u64 = redis::cmd("XDEL")
                    .arg(ShardKeys::new(letter.shard).dead_letter())
                    .arg(&letter.entry_id)
                    .query_async(&mut self.connection())
                    .await?;
                answer.new_workflow_id = fork;
            }
            Err(ApiError::Storage(error)) => return Err(ApiError::Storage(error)),
            Err(ApiError::NotFound(_)) => {
                answer.error = format!(
                    "workflow {parent} is gone (expired after its retention period), so it cannot be forked; the dead letter stays"
                );
            }
            Err(other) => {
                answer.error = format!("{}; the dead letter stays", Status::from(other).message());
            }
        }
        Ok(answer)
    }

    /// Forks the dead letter's run from its phase, for the run's tenant;
    /// returns the fork's id (the same one again on a retry).
    async fn fork(&self, letter: &StoredDeadLetter, parent: &WorkflowId) -> Result<String, ApiError> {
        let tenant = self.store.get_with(parent, false).await?.tenant;
        let request = ForkWorkflowRequest {
            workflow_id: parent.to_string(),
            from_phase: letter.phase_name().to_string(),
            idempotency_key: requeue_key(letter.shard, &letter.entry_id),
            ..Default::default()
        };
        let started = self
            .store
            .fork(parent, &request, &self.catalog, self.cost_caps, &tenant)
            .await?;
        if started.created {
            crate::metrics::record_start(&tenant);
        }
        tracing::info!(
            shard = letter.shard,
            entry = %letter.entry_id,
            parent = %parent,
            workflow_id = %started.workflow_id,
            from_phase = %request.from_phase,
            created = started.created,
            "dead letter requeued as a fork"
        );
        Ok(started.workflow_id)
    }

    /// Requeues every dead letter of every shard, a batch at a time.
    async fn requeue_all(&self) -> Result<Vec<Requeued>, ApiError> {
        let mut answers = Vec::new();
        for shard in 0..self.store.shards() {
            let mut after: Option<String> = None;
            loop {
                let batch = self.read(shard, after.as_deref(), REQUEUE_BATCH).await?;
                for letter in &batch {
                    answers.push(self.requeue(letter).await?);
                }
                if batch.len() < REQUEUE_BATCH {
                    break;
                }
                after = batch.last().map(|letter| letter.entry_id.clone());
            }
        }
        Ok(answers)
    }

    async fn requeue_named(&self, entries: &[DeadLetterRef]) -> Result<Vec<Requeued>, ApiError> {
        if entries.len() > MAX_REQUEUE_ENTRIES {
            return Err(ApiError::InvalidArgument(format!(
                "at most {MAX_REQUEUE_ENTRIES} entries a call; use `all` for every dead letter"
            )));
        }
        let mut named = Vec::with_capacity(entries.len());
        for entry in entries {
            let shard = self.check_shard(entry.shard)?;
            if parse_cursor(&entry.entry_id).is_none() {
                return Err(ApiError::InvalidArgument(format!(
                    "entry_id {:?} is not a stream entry id (<ms>-<seq>)",
                    entry.entry_id.chars().take(80).collect::<String>()
                )));
            }
            named.push((shard, entry.entry_id.as_str()));
        }
        let mut answers = Vec::with_capacity(named.len());
        for (shard, entry_id) in named {
            let answer = match self.read_one(shard, entry_id).await? {
                Some(letter) => self.requeue(&letter).await?,
                None => Requeued {
                    shard: shard.into(),
                    entry_id: entry_id.to_string(),
                    error: "not found: already requeued or removed, or never a dead letter of this shard".into(),
                    ..Default::default()
                },
            };
            answers.push(answer);
        }
        Ok(answers)
    }

    async fn shard_stats(&self, shard: u16) -> Result<ShardStats, ApiError> {
        let keys = ShardKeys::new(shard);
        let tasks = keys.tasks();
        let mut conn = self.connection();
        // One shard's keys share a slot, so this pipeline suits a cluster too.
        let (exists, queued, dead_letters, awaiting_approval): (bool, u64, u64, u64) = redis::pipe()
            .exists(&tasks)
            .cmd("XLEN")
            .arg(&tasks)
            .cmd("XLEN")
            .arg(keys.dead_letter())
            .zcard(keys.gates())
            .query_async(&mut conn)
            .await?;
        let group = if exists {
            let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&tasks)
                .query_async(&mut conn)
                .await?;
            reply.groups.into_iter().find(|group| group.name == WORKERS_GROUP)
        } else {
            None
        };
        let mut stats = ShardStats {
            shard: shard.into(),
            queued,
            dead_letters,
            awaiting_approval,
            ..Default::default()
        };
        let Some(group) = group else {
            // No worker has joined this shard yet: every task waits.
            stats.lag = queued as i64;
            return Ok(stats);
        };
        stats.pending = group.pending as u64;
        stats.consumers = group.consumers as u32;
        stats.lag = group.lag.map_or(-1, |lag| lag as i64);
        if group.pending > 0 {
            let oldest: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&tasks)
                .arg(WORKERS_GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .query_async(&mut conn)
                .await?;
            stats.oldest_pending_ms = oldest.ids.first().map_or(0, |entry| entry.last_delivered_ms as u64);
        }
        Ok(stats)
    }
}

#[tonic::async_trait]
impl OperationsService for OperationsApi {
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let shards = match request.shard {
            Some(shard) => {
                let shard = self.check_shard(shard)?;
                shard..shard + 1
            }
            None => 0..self.store.shards(),
        };
        let after = parse_page_token(&request.page_token)?;
        let first = after.as_ref().map_or(shards.start, |(shard, _)| *shard);
        if !shards.contains(&first) {
            return Err(ApiError::InvalidArgument("page_token is from a listing of another shard".into()).into());
        }
        // One more than the page holds: whether there is a next page.
        let mut letters = Vec::with_capacity(size + 1);
        for shard in first..shards.end {
            let after = after.as_ref().filter(|(at, _)| *at == shard).map(|(_, id)| id.as_str());
            letters.extend(self.read(shard, after, size + 1 - letters.len()).await?);
            if letters.len() > size {
                break;
            }
        }
        let mut next_page_token = String::new();
        if letters.len() > size {
            letters.truncate(size);
            if let Some(last) = letters.last() {
                next_page_token = format!("{}:{}", last.shard, last.entry_id);
            }
        }
        let mut dead_letters = Vec::with_capacity(letters.len());
        for letter in &letters {
            dead_letters.push(letter.view(self.requeued_as(letter).await?));
        }
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        }))
    }

    async fn requeue_dead_letters(
        &self,
        request: Request<RequeueDeadLettersRequest>,
    ) -> Result<Response<RequeueDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let requeued = match (request.all, request.entries.is_empty()) {
            (true, true) => self.requeue_all().await?,
            (false, false) => self.requeue_named(&request.entries).await?,
            (true, false) => {
                return Err(ApiError::InvalidArgument("give either entries or all, not both".into()).into());
            }
            (false, true) => {
                return Err(ApiError::InvalidArgument(
                    "name the dead letters to requeue (shard and entry_id), or set all".into(),
                )
                .into());
            }
        };
        Ok(Response::new(RequeueDeadLettersResponse { requeued }))
    }

    async fn queue_stats(&self, _request: Request<QueueStatsRequest>) -> Result<Response<QueueStatsResponse>, Status> {
        let shards = try_join_all((0..self.store.shards()).map(|shard| self.shard_stats(shard))).await?;
        Ok(Response::new(QueueStatsResponse { shards }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_name_a_shard_and_an_entry() {
        assert_eq!(parse_page_token("").unwrap(), None);
        assert_eq!(
            parse_page_token("3:1732612345678-0").unwrap(),
            Some((3, "1732612345678-0".to_string()))
        );
        for bad in ["3", "x:1-0", "3:abc", "3:1-0:2", "70000:1-0"] {
            assert!(parse_page_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_payload_that_is_no_task_is_not_requeueable() {
        assert!(decode_task(b"\xff\xffnot a task").is_err());
        let nameless = PhaseTask {
            workflow_id: WorkflowId::new(0).to_string(),
            ..Default::default()
        };
        assert!(
            decode_task(&nameless.encode_to_vec()).is_err(),
            "a task without a phase"
        );
    }
}
