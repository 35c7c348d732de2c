//! A task's life in Redis, from the worker's side: fenced event appends,
//! heartbeats that keep the claim, and the final acknowledgement together
//! with the result (or the move to the dead-letter stream). Each step that
//! must be atomic is one Lua script under `lua/`.

use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{EVENTS_CHANNEL, ShardKeys, WorkflowKeys, field, status};
use nexus_pipeline::stream::WORKERS_GROUP;
use nexus_proto::internal::{PhaseResult, PhaseTask};
use nexus_proto::v1::{WorkflowEvent, workflow_event::Kind};
use prost::Message;
use redis::{Script, ScriptInvocation};
use std::collections::HashMap;
use std::sync::LazyLock;

/// Scripts that fence a task's writes start with the shared `fence.lua`.
fn fenced(body: &str) -> Script {
    Script::new(&format!("{}{body}", include_str!("lua/fence.lua")))
}

static START_TASK: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/start_task.lua")));
static APPEND_EVENT: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/append_event.lua")));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/heartbeat.lua")));
static FINISH_TASK: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/finish_task.lua")));
static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/dead_letter.lua")));
static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/take_over.lua")));

/// What trying to take over an abandoned task found.
#[derive(Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Ours now, as this new fencing attempt, delivered this many times.
    Claimed { attempt: u32, deliveries: u64 },
    /// The workflow no longer needs it; it was acknowledged.
    Stale,
    /// Another worker took it first, or it was settled meanwhile.
    Gone,
}

/// An event as a worker stores it (the cursor is its stream id).
fn event(kind: Kind) -> WorkflowEvent {
    WorkflowEvent {
        time: Some(nexus_proto::timestamp_now()),
        kind: Some(kind),
        ..Default::default()
    }
}

/// One claimed task and where it lives.
#[derive(Clone)]
pub struct TaskHandle {
    pub conn: Connection,
    pub entry_id: String,
    pub consumer: String,
    pub workflow: WorkflowId,
    pub keys: WorkflowKeys,
    pub phase_index: u32,
    /// The fencing attempt this worker runs the task as: the task's own on
    /// first delivery, a new one on every takeover.
    pub attempt: u32,
}

impl TaskHandle {
    pub fn new(conn: Connection, entry_id: String, consumer: String, task: &PhaseTask) -> Result<Self, String> {
        let workflow = WorkflowId::parse(&task.workflow_id).map_err(|error| error.to_string())?;
        Ok(Self {
            conn,
            entry_id,
            consumer,
            keys: WorkflowKeys::new(&workflow),
            workflow,
            phase_index: task.phase_index,
            attempt: task.attempt,
        })
    }

    /// The invocation of a script that appends a fenced event: keys state and
    /// events, then phase, attempt, event, time, channel and workflow id —
    /// the layout `start_task.lua` and `append_event.lua` share.
    fn event_invocation<'a>(&self, script: &'a Script, kind: Kind) -> ScriptInvocation<'a> {
        let mut invocation = script.key(self.keys.state());
        invocation
            .key(self.keys.events())
            .arg(self.phase_index)
            .arg(self.attempt)
            .arg(event(kind).encode_to_vec())
            .arg(nexus_pipeline::now_ms())
            .arg(EVENTS_CHANNEL)
            .arg(self.workflow.to_string());
        invocation
    }

    /// Announces the task as started and loads the phase's inputs, if the
    /// task is still current; `None` means it is stale (skip it).
    pub async fn start(&self, started: Kind, inputs: &[String]) -> redis::RedisResult<Option<HashMap<String, String>>> {
        let mut invocation = self.event_invocation(&START_TASK, started);
        invocation.key(self.keys.outputs()).arg(inputs);
        let reply: Vec<String> = invocation.invoke_async(&mut self.conn.clone()).await?;
        match reply.split_first() {
            Some((started, values)) if started == "1" => {
                Ok(Some(inputs.iter().cloned().zip(values.iter().cloned()).collect()))
            }
            _ => Ok(None),
        }
    }

    /// Appends an event if the task is still current; `false` means stop.
    pub async fn append(&self, kind: Kind) -> redis::RedisResult<bool> {
        let appended: i64 = self
            .event_invocation(&APPEND_EVENT, kind)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(appended == 1)
    }

    /// Takes over this (abandoned) task as a new attempt; on success the
    /// handle carries that attempt.
    pub async fn take_over(&mut self, min_idle_ms: u64) -> redis::RedisResult<Takeover> {
        let reply: Vec<String> = TAKE_OVER
            .key(self.keys.shard.tasks())
            .key(self.keys.state())
            .arg(WORKERS_GROUP)
            .arg(&self.consumer)
            .arg(min_idle_ms)
            .arg(&self.entry_id)
            .arg(self.phase_index)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match reply.as_slice() {
            [claimed, attempt, deliveries] if claimed == "claimed" => {
                self.attempt = attempt.parse().unwrap_or(u32::MAX);
                Takeover::Claimed {
                    attempt: self.attempt,
                    deliveries: deliveries.parse().unwrap_or(u64::MAX),
                }
            }
            [stale] if stale == "stale" => Takeover::Stale,
            _ => Takeover::Gone,
        })
    }

    /// Whether the workflow still waits for this task's result.
    pub async fn is_current(&self) -> redis::RedisResult<bool> {
        let (status, phase, attempt): (Option<String>, Option<u32>, Option<u32>) = redis::cmd("HMGET")
            .arg(self.keys.state())
            .arg(&[field::STATUS, field::PHASE, field::ATTEMPT])
            .query_async(&mut self.conn.clone())
            .await?;
        let running = status.is_some_and(|status| !status::is_terminal(&status));
        Ok(running && phase == Some(self.phase_index) && attempt == Some(self.attempt))
    }

    /// Extends the claim; `false` means the task was reclaimed by another
    /// worker or is no longer current, so this worker should stop.
    pub async fn heartbeat(&self) -> redis::RedisResult<bool> {
        let alive: i64 = HEARTBEAT
            .key(self.keys.shard.tasks())
            .key(self.keys.state())
            .arg(WORKERS_GROUP)
            .arg(&self.entry_id)
            .arg(&self.consumer)
            .arg(self.phase_index)
            .arg(self.attempt)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(alive == 1)
    }

    /// Publishes the result (if any) and acknowledges the task, atomically,
    /// if the task is still this worker's. With `final_delta`, the last
    /// streamed output is appended first. `false`: another worker holds it.
    pub async fn finish(&self, result: Option<&PhaseResult>, final_delta: Option<&Kind>) -> redis::RedisResult<bool> {
        let payload = result.map(Message::encode_to_vec).unwrap_or_default();
        let delta = final_delta
            .map(|kind| event(kind.clone()).encode_to_vec())
            .unwrap_or_default();
        let settled: i64 = FINISH_TASK
            .key(self.keys.shard.results())
            .key(self.keys.shard.tasks())
            .key(self.keys.state())
            .key(self.keys.events())
            .arg(payload)
            .arg(WORKERS_GROUP)
            .arg(&self.entry_id)
            .arg(delta)
            .arg(self.phase_index)
            .arg(self.attempt)
            .arg(EVENTS_CHANNEL)
            .arg(self.workflow.to_string())
            .arg(&self.consumer)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(settled == 1)
    }

    /// Moves a poison task to the dead-letter stream and reports the failure.
    pub async fn dead_letter(&self, task: &[u8], failure: &PhaseResult, deliveries: u64) -> redis::RedisResult<()> {
        let why = match &failure.outcome {
            Some(nexus_proto::internal::phase_result::Outcome::Failure(failure)) => failure.reason.as_str(),
            _ => "",
        };
        let mut conn = self.conn.clone();
        dead_letter_entry(
            &mut conn,
            &self.keys.shard,
            &self.entry_id,
            task,
            Some(failure),
            deliveries,
            why,
        )
        .await
    }
}

/// Moves a task entry to its shard's dead-letter stream, with the failure
/// result to publish (none for an entry that names no workflow).
pub async fn dead_letter_entry(
    conn: &mut Connection,
    shard: &ShardKeys,
    entry_id: &str,
    payload: &[u8],
    failure: Option<&PhaseResult>,
    deliveries: u64,
    why: &str,
) -> redis::RedisResult<()> {
    DEAD_LETTER
        .key(shard.dead_letter())
        .key(shard.results())
        .key(shard.tasks())
        .arg(payload)
        .arg(failure.map(Message::encode_to_vec).unwrap_or_default())
        .arg(WORKERS_GROUP)
        .arg(entry_id)
        .arg(deliveries)
        .arg(why)
        .invoke_async(conn)
        .await
}
