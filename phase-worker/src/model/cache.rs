//! The response cache: a request identical to one answered within the TTL
//! (same model, messages and parameters) is answered from Redis, without a
//! model call and without cost. Shared by every worker, so a second run of
//! the same plan (a retry, a demo, a test suite) costs nothing.
//!
//! The key is a SHA-256 of the request as the provider would see it, so two
//! requests share an answer only when every byte that could change the
//! model's answer is the same. Only finished answers are kept (not ones the
//! model cut short). Storing happens off the phase's critical path; a lost
//! write only costs a later cache miss. Off per phase (`cache = false` in
//! the pipeline), per run (`no_cache`), or for a worker
//! (`NEXUS_CACHE_TTL_SECS=0`).

use super::call::{ChatRequest, Completion};
use nexus_pipeline::connection::Connection;
use nexus_proto::internal::CachedAnswer;
use prost::Message;
use redis::AsyncCommands;
use serde::Serialize;
use std::time::Duration;

/// The parts of a request that decide the answer, in a fixed order.
#[derive(Serialize)]
struct CacheIdentity<'a> {
    model: &'a str,
    messages: Vec<(&'a str, &'a str)>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    response_format: Option<&'a serde_json::Value>,
    reasoning_effort: Option<&'a str>,
}

#[derive(Clone)]
pub struct ResponseCache {
    conn: Connection,
    ttl: Duration,
}

impl ResponseCache {
    /// A cache keeping answers for `ttl`; `None` when `ttl` is zero (off).
    pub fn new(conn: Connection, ttl: Duration) -> Option<Self> {
        (!ttl.is_zero()).then_some(Self { conn, ttl })
    }

    /// The Redis key of a request's answer.
    pub fn key(request: &ChatRequest) -> String {
        let identity = CacheIdentity {
            model: &request.model,
            messages: request
                .messages
                .iter()
                .map(|m| (m.role.as_ref(), m.content.as_str()))
                .collect(),
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            response_format: request.response_format.as_ref(),
            reasoning_effort: request.reasoning_effort.as_deref(),
        };
        let canonical = serde_json::to_vec(&identity).expect("a request serializes");
        let digest = ring::digest::digest(&ring::digest::SHA256, &canonical);
        nexus_pipeline::keys::response_cache(&hex(digest.as_ref()))
    }

    /// The kept answer for `key`, if any. An unreadable entry is a miss.
    pub async fn lookup(&self, key: &str) -> redis::RedisResult<Option<CachedAnswer>> {
        let bytes: Option<Vec<u8>> = self.conn.clone().get(key).await?;
        Ok(bytes.and_then(|bytes| CachedAnswer::decode(bytes.as_slice()).ok()))
    }

    /// Keeps a finished answer under `key`, in the background.
    pub fn store(&self, key: String, completion: &Completion) {
        let answer = CachedAnswer {
            text: completion.text.clone(),
            usage: Some(nexus_proto::v1::Usage::from(&completion.usage)),
            finish_reason: completion.finish_reason.clone().unwrap_or_default(),
            generation_id: completion.generation_id.clone().unwrap_or_default(),
            stored_ms: nexus_pipeline::now_ms(),
        };
        let (mut conn, ttl) = (self.conn.clone(), self.ttl.as_secs().max(1));
        tokio::spawn(async move {
            let stored: redis::RedisResult<()> = conn.set_ex(&key, answer.encode_to_vec(), ttl).await;
            if let Err(error) = stored {
                tracing::warn!(%error, "could not keep an answer in the response cache");
            }
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChatMessage;

    fn request(prompt: &str, temperature: Option<f32>) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
            temperature,
            max_tokens: None,
            response_format: None,
            traceparent: Some("00-a-b-01".into()),
            accept_truncated: false,
            reasoning_effort: None,
        }
    }

    #[test]
    fn the_key_follows_what_the_model_sees_and_nothing_else() {
        let base = ResponseCache::key(&request("plan", None));
        let mut traced = request("plan", None);
        traced.traceparent = Some("00-other-trace-01".into());
        assert_eq!(
            ResponseCache::key(&traced),
            base,
            "the trace is not part of the request's meaning"
        );
        assert_ne!(ResponseCache::key(&request("plan!", None)), base);
        assert_ne!(ResponseCache::key(&request("plan", Some(0.0))), base);
        assert!(base.starts_with("nexus:cache:") && base.len() == "nexus:cache:".len() + 64);
    }
}
