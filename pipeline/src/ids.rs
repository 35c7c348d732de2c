//! Workflow ids: `wf_<shard>_<uuid v7 as 32 hex digits>`.
//!
//! The shard is part of the id so that every key of a workflow, and the task
//! and result streams it uses, share one Redis Cluster hash slot: the state
//! transitions stay single-slot Lua scripts, and the shard count can grow
//! without moving existing workflows. UUID v7 makes ids sort by creation time.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkflowId {
    shard: u16,
    uuid: uuid::Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("workflow id is empty")]
    Empty,
    #[error("workflow id {0:?} is malformed: expected wf_<shard>_<32 hex digits>")]
    Malformed(String),
}

impl WorkflowId {
    pub fn new(shard: u16) -> Self {
        Self {
            shard,
            uuid: uuid::Uuid::now_v7(),
        }
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The W3C trace id of the workflow's trace: its UUID, so a trace is
    /// found from the workflow id alone.
    pub fn trace_id(&self) -> String {
        self.uuid.simple().to_string()
    }

    /// A `traceparent` naming this workflow's trace and a made-up span: for
    /// when spans are not exported, so there is no real span to name, yet
    /// every task and model request still tells which workflow it serves.
    pub fn traceparent(&self) -> String {
        let span_id = rand::random::<u64>().max(1);
        format!("00-{}-{span_id:016x}-01", self.trace_id())
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        if text.is_empty() {
            return Err(IdError::Empty);
        }
        let malformed = || IdError::Malformed(truncate(text, 80));
        let rest = text.strip_prefix("wf_").ok_or_else(malformed)?;
        let (shard, hex) = rest.split_once('_').ok_or_else(malformed)?;
        let shard_ok = !shard.is_empty() && shard.len() <= 5 && shard.bytes().all(|b| b.is_ascii_digit());
        let hex_ok = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !shard_ok || !hex_ok {
            return Err(malformed());
        }
        Ok(Self {
            shard: shard.parse().map_err(|_| malformed())?,
            uuid: uuid::Uuid::parse_str(hex).map_err(|_| malformed())?,
        })
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wf_{}_{}", self.shard, self.uuid.simple())
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Picks the shard of a new workflow: from the idempotency key when there is
/// one (so a retry lands where the key is stored), else at random.
pub fn shard_for(idempotency_key: Option<&str>, shard_count: u16) -> u16 {
    let count = shard_count.max(1);
    match idempotency_key {
        Some(key) => (fnv1a(key.as_bytes()) % u64::from(count)) as u16,
        None => rand::random_range(0..count),
    }
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike `std`'s hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_its_text_form() {
        let id = WorkflowId::new(7);
        assert_eq!(WorkflowId::parse(&id.to_string()), Ok(id));
        assert_eq!(id.shard(), 7);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "x",
            "wf_",
            "wf_1_abc",
            "wf__0123456789abcdef0123456789abcdef",
            "wf_1_0123456789ABCDEF0123456789abcdef",
            "wf_a_0123456789abcdef0123456789abcdef",
        ] {
            assert!(matches!(WorkflowId::parse(bad), Err(IdError::Malformed(_))), "{bad}");
        }
        assert_eq!(WorkflowId::parse(""), Err(IdError::Empty));
    }

    #[test]
    fn idempotency_key_always_maps_to_the_same_shard() {
        let shard = shard_for(Some("order-42"), 8);
        assert!((0..20).all(|_| shard_for(Some("order-42"), 8) == shard));
        assert!(shard < 8);
    }
}
