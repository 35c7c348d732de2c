//! Serving `WatchWorkflow`: replay from a cursor, then live events, lossless.
//!
//! The events themselves are always read from the workflow's Redis stream by
//! cursor, which is what makes watching lossless and resumable on any
//! replica. What tells a watcher to read again is a per-replica hub: one
//! pub/sub connection per orchestrator receives "workflow X has news" and
//! wakes the local watchers of X. Watchers therefore cost no Redis
//! connection each, and a quiet watcher costs Redis nothing: it reads only
//! when notified. Pub/sub loses messages only when its connection breaks,
//! so every local watcher is woken when the subscription is re-established
//! (say, after a Redis restart) and re-reads from its cursor.

use crate::errors::ApiError;
use crate::state::is_terminal;
use crate::tenants::WatchSlot;
use crate::validation::parse_cursor;
use futures::StreamExt;
use nexus_pipeline::connection::{Connection, RedisArgs};
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{EVENTS_CHANNEL, WorkflowKeys, field, status};
use nexus_pipeline::stream::entry_of;
use nexus_proto::v1::{WorkflowEvent, workflow_event::Kind};
use prost::Message;
use redis::streams::StreamRangeReply;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Events read per round trip while replaying.
const PAGE: usize = 256;
/// After a failed read, a watcher tries again this soon. A healthy, quiet
/// watcher does not poll at all: it reads when notified, and every watcher
/// is notified when the notification connection comes back after a break.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);
/// How long a watch keeps retrying Redis before giving up on the client.
const REDIS_PATIENCE: Duration = Duration::from_secs(60);

/// One workflow's live feed on this replica, shared by all its local
/// watchers: the wake-up, and the last page of events read, so watchers at
/// the same cursor share one XRANGE per notification (coalesced fan-out:
/// ten watchers of a workflow cost one read, not ten).
#[derive(Default)]
struct Feed {
    notify: Notify,
    /// Bumped by every notification; a cached page from an older
    /// generation may miss newer events.
    generation: AtomicU64,
    last_page: tokio::sync::Mutex<Option<CachedPage>>,
}

struct CachedPage {
    after: String,
    generation: u64,
    events: Arc<Vec<WorkflowEvent>>,
}

impl Feed {
    fn wake(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// Wakes the local watchers of a workflow when it has new events.
pub struct WatchHub {
    watched: Mutex<HashMap<String, Weak<Feed>>>,
    /// Cancelled when the replica shuts down: every watch stream then ends
    /// with UNAVAILABLE, so its client resumes on another replica.
    shutdown: CancellationToken,
}

impl WatchHub {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            watched: Mutex::default(),
            shutdown,
        }
    }

    /// The feed of one workflow, shared by all its local watchers.
    fn subscribe(&self, workflow_id: &str) -> Arc<Feed> {
        let mut watched = self.watched.lock().expect("watch hub lock");
        if let Some(feed) = watched.get(workflow_id).and_then(Weak::upgrade) {
            return feed;
        }
        watched.retain(|_, feed| feed.strong_count() > 0);
        let feed = Arc::new(Feed::default());
        watched.insert(workflow_id.to_string(), Arc::downgrade(&feed));
        feed
    }

    fn wake(&self, workflow_id: &str) {
        let feed = self
            .watched
            .lock()
            .expect("watch hub lock")
            .get(workflow_id)
            .and_then(Weak::upgrade);
        if let Some(feed) = feed {
            feed.wake();
        }
    }

    fn wake_all(&self) {
        let all: Vec<_> = self
            .watched
            .lock()
            .expect("watch hub lock")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        all.iter().for_each(|feed| feed.wake());
    }

    /// Listens for event notifications until the process ends, reconnecting
    /// after Redis restarts.
    pub async fn listen(self: Arc<Self>, redis: RedisArgs) {
        nexus_pipeline::connection::listen_forever("event notifications", || async {
            let listened = self.listen_once(&redis).await;
            self.wake_all();
            listened
        })
        .await
    }

    async fn listen_once(&self, redis: &RedisArgs) -> redis::RedisResult<()> {
        let client = redis.pubsub_client()?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(EVENTS_CHANNEL).await?;
        self.wake_all();
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            if let Ok(workflow_id) = message.get_payload::<String>() {
                self.wake(&workflow_id);
            }
        }
        Ok(())
    }
}

/// Starts streaming a workflow's events into a channel; the receiver is the
/// gRPC response stream. Fails fast when the workflow does not exist.
pub async fn watch(
    hub: Arc<WatchHub>,
    conn: Connection,
    id: WorkflowId,
    after_cursor: String,
    skip_reasoning: bool,
    slot: WatchSlot,
) -> Result<mpsc::Receiver<Result<WorkflowEvent, Status>>, ApiError> {
    let keys = WorkflowKeys::new(&id);
    let (status, last): (Option<String>, StreamRangeReply) = redis::pipe()
        .hget(keys.state(), field::STATUS)
        .cmd("XREVRANGE")
        .arg(keys.events())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn.clone())
        .await?;
    let Some(status) = status else {
        return Err(ApiError::NotFound(id.to_string()));
    };
    let last = last.ids.first().and_then(|entry| parse_cursor(&entry.id));
    if !status::is_terminal(&status) && !after_cursor.is_empty() && parse_cursor(&after_cursor) > last {
        // Resuming past the end of a running workflow would wait on events
        // the client can never have seen: the cursor is not from here.
        return Err(ApiError::InvalidArgument(format!(
            "after_cursor {after_cursor} is ahead of workflow {id}'s events; resume with a cursor this workflow sent"
        )));
    }
    let (sender, receiver) = mpsc::channel(64);
    let watcher = Watcher {
        hub,
        conn,
        id,
        events_key: keys.events(),
        cursor: after_cursor,
        skip_reasoning,
        sender,
        _slot: slot,
    };
    tokio::spawn(watcher.run());
    Ok(receiver)
}

struct Watcher {
    hub: Arc<WatchHub>,
    conn: Connection,
    id: WorkflowId,
    events_key: String,
    cursor: String,
    /// Leave reasoning deltas out (the cursor still moves past them).
    skip_reasoning: bool,
    sender: mpsc::Sender<Result<WorkflowEvent, Status>>,
    /// Counts this watch against the watch limits while it lives.
    _slot: WatchSlot,
}

impl Watcher {
    async fn run(mut self) {
        crate::metrics::METRICS.watchers.inc();
        self.stream_events().await;
        crate::metrics::METRICS.watchers.dec();
    }

    async fn stream_events(&mut self) {
        let feed = self.hub.subscribe(&self.id.to_string());
        let mut failing_since: Option<tokio::time::Instant> = None;
        // Only a watch that finds nothing on its first read can be at or
        // past the end already; later, the terminal event itself ends it.
        let mut first_read = true;
        loop {
            // Registered before reading, so a notification that arrives
            // while we read is not missed.
            let notified = feed.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A read can hang while Redis is down: shutting down must not
            // wait for it, or the client sees a broken connection instead
            // of UNAVAILABLE.
            let shutdown = self.hub.shutdown.clone();
            let page = tokio::select! {
                page = self.read_page(&feed) => page,
                _ = shutdown.cancelled() => return self.end_for_shutdown().await,
            };
            match page {
                Ok(events) => {
                    failing_since = None;
                    match self.forward(&events).await {
                        Flow::Continue if events.len() == PAGE => continue,
                        Flow::Continue if events.is_empty() && std::mem::take(&mut first_read) => {
                            match self.caught_up_with_end().await {
                                Ok(Flow::Stop) => return,
                                Ok(Flow::Continue) => {}
                                Err(error) => {
                                    tracing::warn!(%error, workflow_id = %self.id, "watch cannot check the workflow's status")
                                }
                            }
                        }
                        Flow::Continue => {}
                        Flow::Stop => return,
                    }
                }
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    tracing::warn!(%error, workflow_id = %self.id, "watch cannot read events; retrying");
                    if since.elapsed() > REDIS_PATIENCE {
                        let status =
                            Status::unavailable("workflow storage unavailable; reconnect with your last cursor");
                        let _ = self.sender.send(Err(status)).await;
                        return;
                    }
                }
            }
            let retry = async {
                match failing_since {
                    Some(_) => tokio::time::sleep(RETRY_AFTER_ERROR).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = retry => {}
                _ = self.sender.closed() => return,
                _ = self.hub.shutdown.cancelled() => return self.end_for_shutdown().await,
            };
        }
    }

    /// Ends the stream with UNAVAILABLE: the client resumes elsewhere.
    async fn end_for_shutdown(&self) {
        let status =
            Status::unavailable("this orchestrator is shutting down; resume with your last cursor on another replica");
        let _ = self.sender.send(Err(status)).await;
    }

    /// The events after this watcher's cursor: the feed's cached page when
    /// another watcher just read from the same cursor since the last
    /// notification, else one XRANGE (single-flight per workflow).
    async fn read_page(&mut self, feed: &Feed) -> redis::RedisResult<Arc<Vec<WorkflowEvent>>> {
        let generation = feed.generation.load(Ordering::SeqCst);
        let mut last_page = feed.last_page.lock().await;
        if let Some(page) = last_page
            .as_ref()
            .filter(|page| page.after == self.cursor && page.generation == generation)
        {
            return Ok(page.events.clone());
        }
        let events = Arc::new(self.fetch().await?);
        *last_page = Some(CachedPage {
            after: self.cursor.clone(),
            generation,
            events: events.clone(),
        });
        Ok(events)
    }

    async fn fetch(&mut self) -> redis::RedisResult<Vec<WorkflowEvent>> {
        let start = if self.cursor.is_empty() {
            "-".to_string()
        } else {
            format!("({}", self.cursor)
        };
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.events_key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(entry_of)
            .filter_map(|entry| {
                let mut event = WorkflowEvent::decode(entry.payload.as_slice()).ok()?;
                event.cursor = entry.id;
                event.workflow_id = self.id.to_string();
                Some(event)
            })
            .collect())
    }

    /// With nothing after the cursor: ends the stream when the workflow has
    /// ended (the client already holds its terminal event, or resumed past
    /// it) and with `NOT_FOUND` when its keys are gone (retention).
    /// The status is read before the events, in one pipeline: a terminal
    /// status seen first means its terminal event (written in the same
    /// script) is in the range read after it, so no event can be skipped.
    async fn caught_up_with_end(&mut self) -> redis::RedisResult<Flow> {
        let start = if self.cursor.is_empty() {
            "-".to_string()
        } else {
            format!("({}", self.cursor)
        };
        let (status, newer): (Option<String>, StreamRangeReply) = redis::pipe()
            .hget(WorkflowKeys::new(&self.id).state(), field::STATUS)
            .cmd("XRANGE")
            .arg(&self.events_key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await?;
        if !newer.ids.is_empty() {
            return Ok(Flow::Continue);
        }
        match status {
            None => {
                let gone = Status::not_found(format!(
                    "workflow {} no longer exists (finished workflows are kept for the retention period)",
                    self.id
                ));
                let _ = self.sender.send(Err(gone)).await;
                Ok(Flow::Stop)
            }
            Some(status) if status::is_terminal(&status) => Ok(Flow::Stop),
            Some(_) => Ok(Flow::Continue),
        }
    }

    async fn forward(&mut self, events: &[WorkflowEvent]) -> Flow {
        for event in events.iter().cloned() {
            self.cursor = event.cursor.clone();
            if self.skip_reasoning && matches!(event.kind, Some(Kind::PhaseReasoningDelta(_))) {
                continue;
            }
            let terminal = is_terminal(&event);
            if self.sender.send(Ok(event)).await.is_err() || terminal {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }
}

enum Flow {
    Continue,
    Stop,
}
