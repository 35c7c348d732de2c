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
//!
//! Every connection, pub/sub and cluster ones included, is made from
//! [`RedisArgs`] alone, so `rediss://` (TLS, rustls), an ACL user in the URL
//! and `NEXUS_REDIS_CA_FILE` (a private CA for `rediss://`) apply to all of
//! them alike.

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Response timeout of ordinary commands. Generous, because with
/// `appendfsync always` a busy Redis answers writes after an fsync.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long blocking stream reads wait for new entries before looping.
pub const BLOCK_TIME: Duration = Duration::from_secs(2);

/// Where the state lives; shared by both binaries' command lines.
#[derive(clap::Args, Clone)]
pub struct RedisArgs {
    /// Redis URL: redis://[[user]:password@]host:port[/db], or rediss://
    /// for TLS (the user is an ACL user; none: "default"). With
    /// --redis-cluster, a comma-separated list of seed nodes. Logged with
    /// the password hidden.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// CA certificates (PEM) to trust for rediss:// instead of the system's
    /// roots: a Redis with a certificate from a private CA.
    #[arg(long, env = "NEXUS_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

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
            .field("redis_ca_file", &self.redis_ca_file)
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
    /// any one of them hears every message. Subscribe through
    /// [`RedisArgs::pubsub_client`], which also applies the CA file.
    pub fn pubsub_url(&self) -> &str {
        self.urls().first().copied().unwrap_or("redis://127.0.0.1:6379")
    }

    /// A client of the node [`RedisArgs::pubsub_url`] names, for pub/sub.
    pub fn pubsub_client(&self) -> redis::RedisResult<redis::Client> {
        match self.tls_certificates()? {
            Some(certificates) => redis::Client::build_with_tls(self.pubsub_url(), certificates),
            None => redis::Client::open(self.pubsub_url()),
        }
    }

    /// The private CA to trust, when one is configured. Only `rediss://`
    /// URLs can use it: a CA file beside a plaintext URL is refused rather
    /// than ignored, since whoever set it expects TLS.
    fn tls_certificates(&self) -> redis::RedisResult<Option<redis::TlsCertificates>> {
        let Some(file) = &self.redis_ca_file else {
            return Ok(None);
        };
        if let Some(plain) = self.urls().into_iter().find(|url| !url.starts_with("rediss://")) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "NEXUS_REDIS_CA_FILE is for rediss:// URLs",
                redacted_url(plain),
            )));
        }
        let pem = std::fs::read(file).map_err(|error| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "reading NEXUS_REDIS_CA_FILE",
                format!("{}: {error}", file.display()),
            ))
        })?;
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
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
            let mut builder = redis::cluster::ClusterClient::builder(self.urls())
                .response_timeout(response_timeout)
                .connection_timeout(Duration::from_secs(2))
                .retries(8);
            if let Some(certificates) = self.tls_certificates()? {
                builder = builder.certs(certificates);
            }
            return Ok(Connection::Cluster(builder.build()?.get_async_connection().await?));
        }
        let client = self.pubsub_client()?;
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
    /// a restart is in progress) instead of exiting; a setting that cannot
    /// work (a CA file that cannot be read, or beside a redis:// URL) fails
    /// at once.
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
                // A wrong setting does not fix itself: say so at once.
                Err(error) if attempt < 60 && error.kind() != redis::ErrorKind::InvalidClientConfig => {
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

/// Strips the password from a Redis URL (or list of URLs) so it can be
/// logged. An ACL user stays visible (it says which account connects); a
/// lone name before the `@` is hidden too, in case it is a password
/// written without its colon.
pub fn redacted_url(urls: &str) -> String {
    urls.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let (scheme, credentials, rest) = (&url[..scheme_end], &url[scheme_end + 3..at], &url[at + 1..]);
            match credentials.split_once(':') {
                Some((user, _)) if !user.is_empty() => format!("{scheme}://{user}:***@{rest}"),
                _ => format!("{scheme}://***@{rest}"),
            }
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
            redacted_url("rediss://nexus:pa:ss@w0rd@host:6380"),
            "rediss://nexus:***@host:6380"
        );
        assert_eq!(redacted_url("redis://s3cret@host"), "redis://***@host");
        assert_eq!(
            redacted_url("redis://:a@h1:1,redis://:b@h2:2"),
            "redis://***@h1:1,redis://***@h2:2"
        );
    }
}
