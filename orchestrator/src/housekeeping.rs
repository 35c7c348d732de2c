//! Periodic clean-up that keeps Redis from growing without bound: finished
//! workflows' keys expire by themselves (their TTL is set when they end);
//! this removes what TTLs cannot reach: index entries of expired workflows.

use nexus_pipeline::connection::Connection;
use nexus_pipeline::keys::ShardKeys;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const EVERY: Duration = Duration::from_secs(60);

pub async fn run(conn: Connection, shards: u16, retention_secs: u64, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        for shard in 0..shards {
            if let Err(error) = sweep_shard(&mut conn.clone(), shard, retention_secs).await {
                tracing::warn!(%error, shard, "housekeeping failed; will retry");
            }
        }
    }
}

async fn sweep_shard(conn: &mut Connection, shard: u16, retention_secs: u64) -> redis::RedisResult<()> {
    let keys = ShardKeys::new(shard);
    // A workflow expires `retention` after it *ended*; one created longer ago
    // than that plus a generous run time is gone or about to be.
    let cutoff_ms = nexus_pipeline::now_ms() - (retention_secs as i64 + 24 * 3600) * 1000;
    let removed: usize = redis::cmd("ZREMRANGEBYSCORE")
        .arg(keys.index())
        .arg("-inf")
        .arg(cutoff_ms)
        .query_async(conn)
        .await?;
    if removed > 0 {
        tracing::info!(removed, shard, "removed index entries of expired workflows");
    }
    Ok(())
}
