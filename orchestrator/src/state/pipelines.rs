//! Pipeline snapshots by fingerprint. A workflow keeps the pipeline it
//! started with; replicas configured differently (mid-deploy) still advance
//! it correctly by loading its snapshot from Redis once and caching it.

use crate::errors::ApiError;
use nexus_pipeline::connection::Connection;
use nexus_pipeline::keys::ShardKeys;
use nexus_proto::internal::PipelineSnapshot;
use prost::Message;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub struct PipelineCache {
    by_fingerprint: RwLock<HashMap<String, Arc<PipelineSnapshot>>>,
}

impl PipelineCache {
    pub fn insert(&self, fingerprint: &str, snapshot: Arc<PipelineSnapshot>) {
        self.by_fingerprint
            .write()
            .expect("pipeline cache lock")
            .insert(fingerprint.to_string(), snapshot);
    }

    pub async fn get(
        &self,
        conn: &mut Connection,
        shard: u16,
        fingerprint: &str,
    ) -> Result<Arc<PipelineSnapshot>, ApiError> {
        if let Some(found) = self
            .by_fingerprint
            .read()
            .expect("pipeline cache lock")
            .get(fingerprint)
        {
            return Ok(found.clone());
        }
        let bytes: Option<Vec<u8>> = conn.get(ShardKeys::new(shard).pipeline(fingerprint)).await?;
        let bytes = bytes.ok_or_else(|| ApiError::Corrupt(format!("pipeline {fingerprint} is not stored")))?;
        let snapshot = Arc::new(
            PipelineSnapshot::decode(bytes.as_slice())
                .map_err(|e| ApiError::Corrupt(format!("pipeline {fingerprint}: {e}")))?,
        );
        self.insert(fingerprint, snapshot.clone());
        Ok(snapshot)
    }
}
