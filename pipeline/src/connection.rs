//! Connecting to Redis — one server or a Redis Cluster — so that a Redis
//! restart is an outage, not a crash.
//!
//! [`Connection`] is what every other module holds: a `ConnectionManager`
//! for one server (it reconnects by itself after a restart; the command in
//! flight fails and callers retry their loop) or a cluster connection (which
//! follows slot moves and failovers). Both implement the crate's
//! `ConnectionLike`, so commands and scripts are written once.
//!
//! Blocking stream reads get their own connection with a response timeout
//! longer than the block time, because one blocked command holds a whole
//! multiplexed connection.

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// Response timeout of ordinary commands. Generous, because with
/// `appendfsync always` a busy Redis answers writes after an fsync.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long blocking stream reads wait for new entries before looping.
pub const BLOCK_TIME: Duration = Duration::from_secs(2);

/// Where the state lives; shared by both binaries' command lines.
#[derive(clap::Args, Clone)]
pub struct RedisArgs {
    /// Redis URL (redis://[:password@]host:port[/db]). With --redis-cluster,
    /// a comma-separated list of seed nodes.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Talk to a Redis Cluster (REDIS_URL lists seed nodes). Raise
    /// NEXUS_SHARDS so the shards spread over the masters.
    #[arg(long, env = "NEXUS_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Number of shards: task and result streams, each with its own hash tag
    /// and so its own cluster slot. Must be the same on every process. May
    /// grow, never shrink.
    #[arg(long, env = "NEXUS_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("redis_cluster", &self.redis_cluster)
            .field("shards", &self.shards)
            .finish()
    }
}

impl RedisArgs {
    fn urls(&self) -> Vec<&str> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect()
    }

    /// A node to subscribe on. In a cluster, PUBLISH reaches every node, so
    /// any one of them hears every message.
    pub fn pubsub_url(&self) -> &str {
        self.urls().first().copied().unwrap_or("redis://127.0.0.1:6379")
    }

    /// A connection for ordinary commands, shared by all tasks of a process.
    pub async fn connect(&self) -> redis::RedisResult<Connection> {
        self.connect_with_timeout(COMMAND_TIMEOUT).await
    }

    /// A connection dedicated to blocking reads of up to [`BLOCK_TIME`].
    pub async fn connect_blocking(&self) -> redis::RedisResult<Connection> {
        self.connect_with_timeout(BLOCK_TIME + COMMAND_TIMEOUT).await
    }

    async fn connect_with_timeout(&self, response_timeout: Duration) -> redis::RedisResult<Connection> {
        if self.redis_cluster {
            let client = redis::cluster::ClusterClient::builder(self.urls())
                .response_timeout(response_timeout)
                .connection_timeout(Duration::from_secs(2))
                .retries(8)
                .build()?;
            return Ok(Connection::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(self.pubsub_url())?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(8)
            .set_max_delay(Duration::from_secs(2));
        Ok(Connection::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }

    /// Connects, waiting out a Redis that is not up yet (at start-up, or while
    /// a restart is in progress) instead of exiting.
    pub async fn connect_patiently(&self, blocking: bool) -> redis::RedisResult<Connection> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        let mut quiet = LogBackoff::default();
        loop {
            attempt += 1;
            let connected = if blocking {
                self.connect_blocking().await
            } else {
                self.connect().await
            };
            match connected {
                Ok(conn) => return Ok(conn),
                Err(error) if attempt < 60 => {
                    if quiet.should_log() {
                        tracing::warn!(%error, attempt, "redis not reachable yet; retrying");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Spaces out a repeated warning (Redis unreachable, a loop reconnecting):
/// the first time, then after 1 s, 2 s, 4 s ... at most once a minute, so an
/// outage is visible in the log without flooding it. Reset once things work.
#[derive(Debug)]
pub struct LogBackoff {
    next: Option<std::time::Instant>,
    gap: Duration,
}

impl Default for LogBackoff {
    fn default() -> Self {
        Self {
            next: None,
            gap: Duration::from_secs(1),
        }
    }
}

impl LogBackoff {
    /// Whether to log this occurrence.
    pub fn should_log(&mut self) -> bool {
        let now = std::time::Instant::now();
        if self.next.is_some_and(|next| now < next) {
            return false;
        }
        self.next = Some(now + self.gap);
        self.gap = (self.gap * 2).min(Duration::from_secs(60));
        true
    }

    /// Things work again: the next failure is logged at once.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Runs a pub/sub listener (`listen_once` subscribes and reads until the
/// connection drops) again and again, forever: a Redis restart is an outage
/// of notifications, not the end of them. Reconnect warnings are spaced out.
pub async fn listen_forever<F, Fut>(what: &str, mut listen_once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<()>>,
{
    let mut quiet = LogBackoff::default();
    loop {
        let started = std::time::Instant::now();
        if let Err(error) = listen_once().await {
            if started.elapsed() > Duration::from_secs(10) {
                quiet.reset();
            }
            if quiet.should_log() {
                tracing::warn!(%error, "{what} interrupted; reconnecting");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A connection to one Redis server or to a Redis Cluster.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd).boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count).boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Strips the password from a Redis URL (or list of URLs) so it can be logged.
pub fn redacted_url(urls: &str) -> String {
    urls.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{LogBackoff, redacted_url};

    #[test]
    fn repeated_warnings_are_spaced_out() {
        let mut quiet = LogBackoff::default();
        assert!(quiet.should_log());
        assert!(!quiet.should_log(), "a second warning right away is dropped");
        quiet.reset();
        assert!(quiet.should_log());
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redacted_url("redis://:s3cret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redacted_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redacted_url("redis://:a@h1:1,redis://:b@h2:2"),
            "redis://***@h1:1,redis://***@h2:2"
        );
    }
}
