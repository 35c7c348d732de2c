//! A task's life in Redis, from the worker's side: fenced event appends,
//! heartbeats that keep the claim, and the final acknowledgement together
//! with applying the result (or the move to the dead-letter stream). Each
//! step that must be atomic is one Lua script under `lua/`.

use crate::model::budget::RunBudget;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{ShardKeys, WorkflowKeys, field, status};
use nexus_pipeline::script_call::ScriptCall;
use nexus_pipeline::stream::{Entry, WORKERS_GROUP};
use nexus_pipeline::transition::event;
use nexus_pipeline::transition::{ENDING_LUA, Transition, started_by};
use nexus_proto::internal::PhaseTask;
use nexus_proto::v1::workflow_event::Kind;
use prost::Message;
use redis::{Script, ScriptInvocation};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

/// Scripts that fence a task's writes start with the shared `fence.lua`.
fn fenced(body: &str) -> Script {
    Script::new(&format!("{}{body}", include_str!("lua/fence.lua")))
}

/// Scripts that may end a workflow also start with the shared `ending.lua`.
fn fenced_ending(body: &str) -> Script {
    Script::new(&format!("{}{ENDING_LUA}{body}", include_str!("lua/fence.lua")))
}

/// How long a run is kept after it ends when it was created before runs
/// carried their own retention (the orchestrator's default).
pub const FALLBACK_RETENTION_SECS: u64 = 7 * 24 * 3600;

static START_TASK: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/start_task.lua")));
static APPEND_EVENT: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/append_event.lua")));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/heartbeat.lua")));
static COMPLETE_TASK: LazyLock<Script> = LazyLock::new(|| fenced_ending(include_str!("lua/complete_task.lua")));
static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| fenced_ending(include_str!("lua/dead_letter.lua")));
static HAND_BACK: LazyLock<Script> = LazyLock::new(|| fenced(include_str!("lua/hand_back.lua")));
static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/take_over.lua")));

/// What trying to take over an abandoned task found.
#[derive(Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Ours now, as this new fencing attempt, delivered this many times.
    Claimed { attempt: u32, deliveries: u64, starts: u64 },
    /// The workflow no longer needs it; it was acknowledged.
    Stale,
    /// Another worker took it first, or it was settled meanwhile.
    Gone,
}

/// What settling a task did.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// The result was applied (the run moved on, completed or failed).
    Applied,
    /// Acknowledged without applying anything: there was no result, or the
    /// workflow no longer waited for it.
    Acknowledged,
    /// Another worker holds the task now; nothing was touched.
    NotOurs,
}

/// A started task: its inputs' values (in the order of its spec's inputs)
/// and its run's budget.
pub struct Started {
    pub input_values: Vec<String>,
    pub budget: RunBudget,
}

impl Started {
    /// From a start reply's tail: cost cap, spent so far, tenant, inputs.
    fn from_reply(reply: &[Vec<u8>]) -> Option<Self> {
        let text = |bytes: &Vec<u8>| String::from_utf8_lossy(bytes).into_owned();
        let [cap, spent, tenant, values @ ..] = reply else {
            return None;
        };
        Some(Self {
            input_values: values.iter().map(text).collect(),
            budget: RunBudget {
                cap_usd: text(cap).parse().unwrap_or_default(),
                spent_usd: text(spent).parse().unwrap_or_default(),
                tenant: text(tenant),
            },
        })
    }
}

/// The task the script that settled the previous one claimed for this
/// worker, and, when that script could start it too, what starting found
/// (boxed: it is passed down through every future of the task's run, and
/// each keeps a slot for what it is given).
pub struct Continuation {
    pub entry: Entry,
    pub started: Option<Box<Started>>,
}

/// One claimed task and where it lives.
pub struct TaskHandle {
    pub conn: Connection,
    pub entry_id: String,
    /// This worker's consumer name, shared by all its tasks.
    pub consumer: Arc<str>,
    pub workflow: WorkflowId,
    pub keys: WorkflowKeys,
    pub phase_index: u32,
    /// The fencing attempt this worker runs the task as: the task's own on
    /// first delivery, a new one on every takeover.
    pub attempt: u32,
    /// Set as this worker begins to acknowledge the task (settle, hand-back,
    /// dead letter): from then on a renewal that finds the entry gone has
    /// met the acknowledgement, not a takeover.
    ending: AtomicBool,
}

impl TaskHandle {
    pub fn new(conn: Connection, entry_id: String, consumer: Arc<str>, task: &PhaseTask) -> Result<Self, String> {
        let workflow = WorkflowId::parse(&task.workflow_id).map_err(|error| error.to_string())?;
        Ok(Self {
            conn,
            entry_id,
            consumer,
            keys: WorkflowKeys::new(&workflow),
            workflow,
            phase_index: task.phase_index,
            attempt: task.attempt,
            ending: AtomicBool::new(false),
        })
    }

    /// Whether this worker has begun to acknowledge the task.
    pub fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    fn begin_ending(&self) {
        self.ending.store(true, Ordering::Relaxed);
    }

    /// The call of a script that appends a fenced event: keys state and
    /// events (then the outputs hash, `with_outputs`), then phase, attempt,
    /// event, time, channel and workflow id — the layout `start_task.lua`
    /// and `append_event.lua` share.
    fn event_call<'a>(&self, script: &'a Script, kind: Kind, with_outputs: bool) -> ScriptCall<'a> {
        let events = self.keys.events();
        let outputs = if with_outputs {
            self.keys.outputs()
        } else {
            String::new()
        };
        let keys = [self.keys.state(), &events, &outputs];
        let mut invocation = ScriptCall::new(script, &keys[..if with_outputs { 3 } else { 2 }]);
        invocation
            .arg(self.phase_index)
            .arg(self.attempt)
            .arg(event(kind).encode_to_vec())
            .arg(nexus_pipeline::now_ms())
            .arg(self.keys.channel())
            .arg(self.keys.workflow_id());
        invocation
    }

    /// Announces the task as started and loads the phase's inputs and the
    /// run's budget, if the task is still current; `None` means it is stale
    /// (skip it).
    pub async fn start(&self, started: Kind, inputs: &[String]) -> redis::RedisResult<Option<Started>> {
        let mut invocation = self.event_call(&START_TASK, started, true);
        invocation.arg(inputs);
        let reply: Vec<Vec<u8>> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(match reply.split_first() {
            Some((started, rest)) if started == b"1" => Started::from_reply(rest),
            _ => None,
        })
    }

    /// Appends an event if the task is still current; `false` means stop.
    pub async fn append(&self, kind: Kind) -> redis::RedisResult<bool> {
        let appended: i64 = self
            .event_call(&APPEND_EVENT, kind, false)
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
            .arg(&*self.consumer)
            .arg(min_idle_ms)
            .arg(&self.entry_id)
            .arg(self.phase_index)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match reply.as_slice() {
            [claimed, attempt, deliveries, starts] if claimed == "claimed" => {
                self.attempt = attempt.parse().unwrap_or(u32::MAX);
                Takeover::Claimed {
                    attempt: self.attempt,
                    deliveries: deliveries.parse().unwrap_or(u64::MAX),
                    starts: starts.parse().unwrap_or(u64::MAX),
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

    /// Puts the task back on the stream for another worker to take at once
    /// (`task` as it should run again); `true` when it was handed back.
    pub async fn hand_back(&self, task: &PhaseTask) -> redis::RedisResult<bool> {
        self.begin_ending();
        let again = PhaseTask {
            attempt: self.attempt,
            ..task.clone()
        };
        let outcome: String = self
            .owned_invocation(&HAND_BACK)
            .arg(again.encode_to_vec())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(outcome == "handed_back")
    }

    /// Extends the claim; `false` means the task was reclaimed by another
    /// worker or is no longer current, so this worker should stop.
    pub async fn heartbeat(&self) -> redis::RedisResult<bool> {
        let alive: i64 = self
            .owned_invocation(&HEARTBEAT)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(alive == 1)
    }

    /// A script about this worker's hold on the task: KEYS task stream and
    /// state hash; ARGV group, entry id, consumer, phase index, attempt.
    fn owned_invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut invocation = script.key(self.keys.shard.tasks());
        invocation
            .key(self.keys.state())
            .arg(WORKERS_GROUP)
            .arg(&self.entry_id)
            .arg(&*self.consumer)
            .arg(self.phase_index)
            .arg(self.attempt);
        invocation
    }

    /// Applies the result's transition (if any) and acknowledges the task,
    /// atomically, if the task is still this worker's; `final_events` (the
    /// last streamed reasoning and answer text) are appended first. With `claim_next`, the
    /// same step claims the shard's next new task for this worker (the
    /// continuation it should run in this task's slot), if there is one.
    pub async fn settle(
        &self,
        transition: Option<&Transition>,
        final_events: &[Kind],
        claim_next: bool,
    ) -> redis::RedisResult<(Settled, Option<Continuation>)> {
        self.begin_ending();
        let (tasks, events, outputs, gates) = (
            self.keys.shard.tasks(),
            self.keys.events(),
            self.keys.outputs(),
            self.keys.shard.gates(),
        );
        let keys = [tasks.as_str(), self.keys.state(), &events, &outputs, &gates];
        let mut invocation = ScriptCall::new(&COMPLETE_TASK, &keys);
        invocation
            .arg(WORKERS_GROUP)
            .arg(&self.entry_id)
            .arg(&*self.consumer)
            .arg(self.phase_index)
            .arg(self.attempt)
            .arg(self.keys.channel())
            .arg(self.keys.workflow_id())
            .arg(final_events.len())
            .arg(transition.map_or("", |t| t.step.as_str()))
            .arg(nexus_pipeline::now_ms());
        match transition {
            Some(t) => invocation
                .arg(&t.phase_name)
                .arg(&t.output)
                .arg(&t.record)
                .arg(&t.completed_event)
                .arg(&t.follow_up)
                .arg(&t.rating)
                .arg(&t.reason),
            None => invocation.arg(&["", "", "", "", "", "", ""]),
        };
        invocation
            .arg(FALLBACK_RETENTION_SECS)
            .arg(if claim_next { "1" } else { "0" })
            .arg(transition.map_or(0.0, |t| t.cost_usd));
        match transition.and_then(|t| t.gate.as_ref()) {
            Some(gate) => invocation.arg(&gate.event).arg(gate.deadline_ms).arg(gate.on_timeout),
            None => invocation.arg(&["", "", ""]),
        };
        invocation
            .arg(transition.map_or(&[][..], |t| t.next_start.as_slice()))
            .arg(started_by(&self.consumer));
        for kind in final_events {
            invocation.arg(event(kind.clone()).encode_to_vec());
        }
        let reply: Vec<Vec<u8>> = invocation.invoke_async(&mut self.conn.clone()).await?;
        let settled = match reply.first().map(Vec::as_slice) {
            Some(b"applied") => Settled::Applied,
            Some(b"settled") => Settled::Acknowledged,
            _ => Settled::NotOurs,
        };
        let next = match reply.as_slice() {
            [_, id, payload, rest @ ..] => Some(Continuation {
                entry: Entry {
                    id: String::from_utf8_lossy(id).into_owned(),
                    payload: payload.clone(),
                },
                started: match rest.split_first() {
                    Some((started, rest)) if started == b"started" => Started::from_reply(rest).map(Box::new),
                    _ => None,
                },
            }),
            _ => None,
        };
        Ok((settled, next))
    }

    /// Moves a poison task to the dead-letter stream and fails its run with
    /// `why`, if the run still waits for this task. `true`: the run failed.
    pub async fn dead_letter(
        &self,
        task: &[u8],
        phase_name: &str,
        deliveries: u64,
        why: &str,
    ) -> redis::RedisResult<bool> {
        self.begin_ending();
        let failed = Transition::run_failed(phase_name, why.to_string());
        let reply: String = DEAD_LETTER
            .key(self.keys.shard.dead_letter())
            .key(self.keys.shard.tasks())
            .key(self.keys.state())
            .key(self.keys.events())
            .key(self.keys.outputs())
            .arg(task)
            .arg(WORKERS_GROUP)
            .arg(&self.entry_id)
            .arg(deliveries)
            .arg(why)
            .arg(self.phase_index)
            .arg(self.attempt)
            .arg(failed.follow_up)
            .arg(nexus_pipeline::now_ms())
            .arg(self.keys.channel())
            .arg(self.keys.workflow_id())
            .arg(FALLBACK_RETENTION_SECS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(reply == "failed")
    }
}

/// Moves a task entry that names no workflow (undecodable) to its shard's
/// dead-letter stream.
pub async fn dead_letter_entry(
    conn: &mut Connection,
    shard: &ShardKeys,
    entry_id: &str,
    payload: &[u8],
    why: &str,
) -> redis::RedisResult<()> {
    let any_key = shard.dead_letter();
    let _: String = DEAD_LETTER
        .key(shard.dead_letter())
        .key(shard.tasks())
        .key(&any_key)
        .key(&any_key)
        .key(&any_key)
        .arg(payload)
        .arg(WORKERS_GROUP)
        .arg(entry_id)
        .arg(1)
        .arg(why)
        .arg(&["", "", "", "", "", "", ""])
        .invoke_async(conn)
        .await?;
    Ok(())
}
