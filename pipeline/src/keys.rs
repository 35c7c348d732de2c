//! The Redis key layout. Every key Nexus touches is spelled here and nowhere
//! else.
//!
//! All keys of one shard carry the hash tag `{nx<shard>}`: a workflow's own
//! keys, the shard's task and dead-letter streams, its index and its
//! idempotency keys. On Redis Cluster they therefore share one slot, so every
//! state transition is one atomic script; shards spread load across masters.
//!
//! ```text
//! nexus:{nx0}:tasks              stream  phase tasks        (group "workers"): field m, the
//!                                        PhaseTask; field s, its start template (transition.rs)
//! nexus:{nx0}:deadletter         stream  tasks delivered too often, or undecodable
//! nexus:{nx0}:index              zset    workflow id -> created ms
//! nexus:{nx0}:idem:<key>         string  idempotency key -> workflow id
//! nexus:{nx0}:pipeline:<fp>      string  PipelineSnapshot by fingerprint
//! nexus:{nx0}:wf:<id>            hash    workflow state (see `field`)
//! nexus:{nx0}:wf:<id>:events     stream  WorkflowEvent, the watch log
//! nexus:{nx0}:wf:<id>:outputs    hash    "plan" and each phase's output
//! nexus:model:{<model>}:pace     hash    shared rate limit and back-off of one model
//! nexus:model:{<model>}:tokens   zset    tokens its calls reserved in the last minute
//! nexus:cache:<sha256>           string  CachedAnswer: a model's answer to an identical request
//! nexus:events:<id>              pubsub  "<id>" when that workflow has a new event
//! nexus:events                   pubsub  the same for every workflow (builds before per-run channels)
//! nexus:cancel                   pubsub  "<id>" when a workflow was cancelled
//! nexus:pace                     pubsub  "<model>\n<ms>" when a provider asked to back off
//! ```

use crate::ids::WorkflowId;

/// The one pub/sub channel that announced every workflow's new events
/// before each workflow had its own ([`WorkflowKeys::channel`]). Nothing
/// publishes to it now; orchestrators still listen to it so that, during a
/// rolling upgrade, runs advanced by older workers still wake their
/// watchers. A channel nobody publishes to costs nothing.
pub const LEGACY_EVENTS_CHANNEL: &str = "nexus:events";

/// What a workflow's own events channel is named after (then its id).
const EVENTS_CHANNEL_PREFIX: &str = "nexus:events:";

/// Pub/sub channel telling workers to abort in-flight calls of a cancelled
/// workflow. Also only a hint: workers re-check the workflow's state while a
/// call runs, so a lost message delays the abort by one check interval.
pub const CANCEL_CHANNEL: &str = "nexus:cancel";

/// Pub/sub channel announcing "model M asked everyone to back off for N ms"
/// (`<model>\n<ms>`), so workers without a rate limit for M can keep the
/// back-off locally instead of asking Redis before every call.
pub const PACE_CHANNEL: &str = "nexus:pace";

/// The response cache's entry for a request, by the SHA-256 (hex) of what
/// the model sees. Outside every shard: any run may reuse any answer.
pub fn response_cache(request_sha256: &str) -> String {
    format!("nexus:cache:{request_sha256}")
}

/// Keys shared by all workflows of one shard.
#[derive(Debug, Clone)]
pub struct ShardKeys {
    prefix: String,
}

impl ShardKeys {
    pub fn new(shard: u16) -> Self {
        Self {
            prefix: format!("nexus:{{nx{shard}}}"),
        }
    }

    pub fn tasks(&self) -> String {
        [&self.prefix, ":tasks"].concat()
    }

    pub fn dead_letter(&self) -> String {
        [&self.prefix, ":deadletter"].concat()
    }

    pub fn index(&self) -> String {
        [&self.prefix, ":index"].concat()
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    pub fn pipeline(&self, fingerprint: &str) -> String {
        format!("{}:pipeline:{fingerprint}", self.prefix)
    }

    /// The ids of a tenant's runs in flight on this shard (added when a run
    /// is created, removed when it ends).
    pub fn tenant_running(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:running", self.prefix)
    }

    /// The shard's runs waiting at an approval gate, scored by the gate's
    /// deadline (Unix ms), so timeouts are found without a scan.
    pub fn gates(&self) -> String {
        [&self.prefix, ":gates"].concat()
    }
}

/// Pacing state of one model (its shared rate limit and provider back-off),
/// shared by every worker. Tagged by the model, so each model's pacing lives
/// in one slot of its own.
/// A tenant's starts in the minute `minute` (Unix time / 60): the start
/// rate limit's counter.
pub fn tenant_starts(tenant: &str, minute: u64) -> String {
    format!("nexus:tenant:{{{tenant}}}:starts:{minute}")
}

pub fn model_pace(model: &str) -> String {
    format!("nexus:model:{{{model}}}:pace")
}

/// The tokens one model's calls reserved in the last minute: a sorted set of
/// `<id>:<tokens>` by reservation time (ms), beside its pace hash (same slot).
pub fn model_tokens(model: &str) -> String {
    format!("nexus:model:{{{model}}}:tokens")
}

/// Keys of one workflow.
#[derive(Debug, Clone)]
pub struct WorkflowKeys {
    pub shard: ShardKeys,
    state: String,
    channel: String,
}

impl WorkflowKeys {
    /// The id is rendered once for both names that carry it. Keys are
    /// joined by concatenation, not `format!`: a worker builds them for
    /// every phase, and formatting them was 2% of its instructions.
    pub fn new(id: &WorkflowId) -> Self {
        let shard = ShardKeys::new(id.shard());
        let id = id.to_string();
        let state = [&shard.prefix, ":wf:", &id].concat();
        let channel = events_channel(&id);
        Self { shard, state, channel }
    }

    pub fn state(&self) -> &str {
        &self.state
    }

    pub fn events(&self) -> String {
        [&self.state, ":events"].concat()
    }

    pub fn outputs(&self) -> String {
        [&self.state, ":outputs"].concat()
    }

    /// Pub/sub channel announcing "this workflow has new events" (the
    /// message is its id). Only a wake-up hint: the events themselves are
    /// read from the workflow's stream by cursor, so a lost message delays a
    /// watcher, never loses it an event. One channel per workflow, so an
    /// orchestrator subscribes only to the runs its clients watch, and an
    /// event nobody watches reaches no one (`PUBLISH` to a channel without
    /// subscribers is a lookup).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The workflow's id as text (the tail of its channel's name), for the
    /// scripts that take it: not rendered again for every call.
    pub fn workflow_id(&self) -> &str {
        &self.channel[EVENTS_CHANNEL_PREFIX.len()..]
    }
}

/// The pub/sub channel of a workflow's new events, by its id (see
/// [`WorkflowKeys::channel`]).
pub fn events_channel(workflow_id: &str) -> String {
    [EVENTS_CHANNEL_PREFIX, workflow_id].concat()
}

/// Field names of the workflow state hash.
pub mod field {
    pub const STATUS: &str = "status";
    pub const PHASE: &str = "phase";
    pub const ATTEMPT: &str = "attempt";
    pub const PIPELINE: &str = "pipeline";
    pub const PLAN: &str = "plan";
    pub const CREATED_MS: &str = "created_ms";
    pub const UPDATED_MS: &str = "updated_ms";
    pub const IDEMPOTENCY_KEY: &str = "idem";
    /// The Redis key of the idempotency record, expired with the workflow.
    pub const IDEMPOTENCY_RECORD: &str = "idem_key";
    pub const PLAN_FINGERPRINT: &str = "plan_fp";
    pub const REASON: &str = "reason";
    pub const RATING: &str = "rating";
    /// The encoded `RunChoices`: models per role and extra instructions.
    pub const CHOICES: &str = "choices";
    /// The run's cost cap in USD ("0": none) and what its phases cost so far.
    pub const BUDGET_USD: &str = "budget_usd";
    pub const SPENT_USD: &str = "spent_usd";
    /// At an approval gate: the gated phase's index, the next phase's task
    /// (queued when the gate opens), the deadline and what it does then.
    pub const GATE: &str = "gate";
    pub const GATE_TASK: &str = "gate_task";
    pub const GATE_DEADLINE_MS: &str = "gate_deadline_ms";
    pub const GATE_ON_TIMEOUT: &str = "gate_on_timeout";
    /// A fork's parent workflow and the first phase it ran itself.
    pub const PARENT: &str = "parent";
    pub const FORK_PHASE: &str = "fork_phase";
    /// The tenant a run belongs to; empty or absent without tenants.
    pub const TENANT: &str = "tenant";
    /// "1" once anybody watched the run: only then do its scripts PUBLISH
    /// its new events (orchestrator/src/state/lua/watch_workflow.lua).
    pub const WATCHED: &str = "watched";
    /// `phase:<index>` holds the encoded `nexus.v1.Phase` once it completed.
    pub fn phase_record(index: u32) -> String {
        format!("phase:{index}")
    }
    /// Field of the outputs hash that holds the rendered user plan.
    pub const PLAN_INPUT: &str = "plan";
}

/// Workflow status values as stored in the state hash.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    /// Paused at an approval gate; no task is queued meanwhile.
    pub const AWAITING_APPROVAL: &str = "awaiting_approval";

    pub fn is_terminal(status: &str) -> bool {
        matches!(status, COMPLETED | FAILED | CANCELLED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_tag(key: &str) -> &str {
        let start = key.find('{').unwrap() + 1;
        let end = key[start..].find('}').unwrap() + start;
        &key[start..end]
    }

    #[test]
    fn keys_are_spelled_as_the_layout_says() {
        let id = WorkflowId::parse("wf_3_0123456789abcdef0123456789abcdef").unwrap();
        let keys = WorkflowKeys::new(&id);
        let state = "nexus:{nx3}:wf:wf_3_0123456789abcdef0123456789abcdef";
        assert_eq!(keys.state(), state);
        assert_eq!(keys.events(), format!("{state}:events"));
        assert_eq!(keys.outputs(), format!("{state}:outputs"));
        assert_eq!(keys.channel(), "nexus:events:wf_3_0123456789abcdef0123456789abcdef");
        assert_eq!(keys.workflow_id(), id.to_string());
        let shard = &keys.shard;
        let spelled = [shard.tasks(), shard.dead_letter(), shard.index(), shard.gates()];
        assert_eq!(
            spelled,
            [
                "nexus:{nx3}:tasks",
                "nexus:{nx3}:deadletter",
                "nexus:{nx3}:index",
                "nexus:{nx3}:gates"
            ]
        );
    }

    #[test]
    fn every_key_of_a_workflow_shares_its_shards_hash_tag() {
        let id = WorkflowId::new(3);
        let keys = WorkflowKeys::new(&id);
        let all = [
            keys.state().to_string(),
            keys.events(),
            keys.outputs(),
            keys.shard.tasks(),
            keys.shard.dead_letter(),
            keys.shard.index(),
            keys.shard.idempotency("k"),
            keys.shard.pipeline("fp"),
            keys.shard.gates(),
        ];
        assert!(all.iter().all(|key| hash_tag(key) == "nx3"), "{all:?}");
    }
}
