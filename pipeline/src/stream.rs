//! Stream and consumer-group names, and the envelope of a stream entry.
//!
//! Each entry has one field, [`PAYLOAD_FIELD`], holding a protobuf message
//! from `nexus_proto` (tasks, events). Protobuf keeps entries small
//! and lets old and new builds share a stream.

/// Consumer group of phase workers on every shard's task stream.
pub const WORKERS_GROUP: &str = "workers";
/// The single field of every stream entry.
pub const PAYLOAD_FIELD: &str = "m";

/// Creates a consumer group (and its stream) if it does not exist yet.
pub async fn ensure_group(
    conn: &mut crate::connection::Connection,
    stream: &str,
    group: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Consumers idle this long with nothing pending are removed from a group.
/// Every restarted process joins under a new name, so without this a group
/// collects a dead consumer per restart (and per autoscaled pod).
pub const STALE_CONSUMER_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes consumers of `group` that hold no pending entries and have been
/// idle for [`STALE_CONSUMER_IDLE`]. Returns how many went.
pub async fn prune_stale_consumers(
    conn: &mut crate::connection::Connection,
    stream: &str,
    group: &str,
) -> redis::RedisResult<usize> {
    let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    let idle_limit = STALE_CONSUMER_IDLE.as_millis() as usize;
    let mut pruned = 0;
    for consumer in reply
        .consumers
        .iter()
        .filter(|c| c.pending == 0 && c.idle >= idle_limit)
    {
        let _: i64 = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(stream)
            .arg(group)
            .arg(&consumer.name)
            .query_async(conn)
            .await?;
        pruned += 1;
    }
    Ok(pruned)
}

/// Reads up to `count` new entries for `consumer` of `group`, blocking up to
/// [`crate::connection::BLOCK_TIME`] when there are none.
pub async fn read_new(
    conn: &mut crate::connection::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    let options = redis::streams::StreamReadOptions::default()
        .group(group, consumer)
        .count(count)
        .block(crate::connection::BLOCK_TIME.as_millis() as usize);
    let reply: Option<redis::streams::StreamReadReply> =
        redis::AsyncCommands::xread_options(conn, &[stream], &[">"], &options).await?;
    Ok(reply
        .map(entries_of)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, entry)| entry)
        .collect())
}

/// One entry read from a stream: its id and payload bytes.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub payload: Vec<u8>,
}

/// Flattens an `XREADGROUP`/`XREAD`/`XRANGE`-style reply into entries, in
/// order. Entries without a payload (deleted, or written by something else)
/// are returned with an empty payload so the caller can acknowledge them.
pub fn entries_of(reply: redis::streams::StreamReadReply) -> Vec<(String, Entry)> {
    reply
        .keys
        .into_iter()
        .flat_map(|key| {
            let stream = key.key;
            key.ids.into_iter().map(move |id| (stream.clone(), entry_of(id)))
        })
        .collect()
}

pub fn entry_of(id: redis::streams::StreamId) -> Entry {
    let payload = match id.map.get(PAYLOAD_FIELD) {
        Some(redis::Value::BulkString(bytes)) => bytes.clone(),
        _ => Vec::new(),
    };
    Entry { id: id.id, payload }
}
