//! Connecting to Redis so that a Redis restart is an outage, not a crash.
//!
//! Every connection is a `ConnectionManager`: it reconnects by itself after
//! Redis restarts; the command in flight fails and callers retry their loop.
//! Blocking stream reads get their own manager with a response timeout longer
//! than the block time, because one blocked command holds the whole
//! multiplexed connection.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// Response timeout of ordinary commands. Generous, because with
/// `appendfsync always` a busy Redis answers writes after an fsync.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long blocking stream reads wait for new entries before looping.
pub const BLOCK_TIME: Duration = Duration::from_secs(2);

/// A connection for ordinary commands, shared by all tasks of a process.
pub async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    connect_with_timeout(url, COMMAND_TIMEOUT).await
}

/// A connection dedicated to blocking reads of up to [`BLOCK_TIME`].
pub async fn connect_blocking(url: &str) -> redis::RedisResult<ConnectionManager> {
    connect_with_timeout(url, BLOCK_TIME + COMMAND_TIMEOUT).await
}

async fn connect_with_timeout(url: &str, response_timeout: Duration) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(8)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

/// Connects, waiting out a Redis that is not up yet (at start-up, or while a
/// restart is in progress) instead of exiting.
pub async fn connect_patiently(url: &str, blocking: bool) -> redis::RedisResult<ConnectionManager> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1.. {
        let connected = if blocking {
            connect_blocking(url).await
        } else {
            connect(url).await
        };
        match connected {
            Ok(conn) => return Ok(conn),
            Err(error) if attempt < 60 => {
                tracing::warn!(%error, attempt, "redis not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(error),
        }
    }
    unreachable!("the loop returns")
}

/// Strips the password from a Redis URL so it can be logged.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redacted_url("redis://:s3cret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redacted_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
