//! Serving `WatchWorkflow`: replay from a cursor, then live events, lossless.
//!
//! The events themselves are always read from the workflow's Redis stream by
//! cursor, which is what makes watching lossless and resumable on any
//! replica. What tells a watcher to read again is a per-replica hub: one
//! pub/sub connection per orchestrator, subscribed to the channel of each
//! workflow that has a watcher here (and only those), wakes the local
//! watchers of X when X has news. Watchers therefore cost no Redis
//! connection each; a quiet watcher costs Redis nothing (it reads only when
//! notified); and a run nobody watches costs the orchestrator nothing (its
//! notifications reach no one). Pub/sub loses messages only when its
//! connection breaks, so every local watcher is woken when the subscriptions
//! are re-established (say, after a Redis restart) and re-reads from its
//! cursor.
//!
//! A watcher's first read comes after its workflow's subscription is
//! confirmed and after the run is marked watched (`open_watch`), so an
//! event appended in between is either in that read or announced after it.
//! Only marked runs are announced at all: the scripts that append a run's
//! events skip the PUBLISH until somebody has watched it, so a run nobody
//! watches costs Redis no pub/sub work either (on a cluster, a PUBLISH
//! travels to every node). The mark is Redis state a restore or a failover
//! can lose, so the hub marks its watched runs again whenever its
//! connection comes back. A workflow's channel is unsubscribed a little after
//! its last local watcher left ([`UNSUBSCRIBE_EVERY`]); subscribing and
//! that sweep take turns on one lock, so a sweep never drops the channel of
//! a watcher that just arrived.

use crate::errors::ApiError;
use crate::state::{is_terminal, open_watch};
use crate::tenants::WatchSlot;
use crate::validation::parse_cursor;
use futures::StreamExt;
use nexus_pipeline::connection::{Connection, RedisArgs};
use nexus_pipeline::ids::WorkflowId;
use nexus_pipeline::keys::{LEGACY_EVENTS_CHANNEL, WorkflowKeys, events_channel, field, status};
use nexus_pipeline::stream::entry_of;
use nexus_proto::v1::{WorkflowEvent, workflow_event::Kind};
use prost::Message;
use redis::aio::PubSubSink;
use redis::streams::StreamRangeReply;
use std::collections::{HashMap, HashSet};
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
/// How often channels of workflows nobody here watches any more are
/// unsubscribed. Until then a departed watcher's channel costs one message
/// per event, which is dropped.
const UNSUBSCRIBE_EVERY: Duration = Duration::from_secs(2);
/// How long a new watcher waits for its subscription before reading anyway
/// (Redis unreachable): it is woken when the hub reconnects and subscribes
/// every watched workflow again.
const SUBSCRIBE_PATIENCE: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE / UNSUBSCRIBE command when many change at once.
const CHANNELS_PER_COMMAND: usize = 1000;

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
    /// Where new watchers ask for their workflow's channel: the live
    /// connection's [`SubscriptionManager`]; none while it is down.
    subscribe_requests: Mutex<Option<mpsc::UnboundedSender<SubscribeRequest>>>,
    /// Cancelled when the replica shuts down: every watch stream then ends
    /// with UNAVAILABLE, so its client resumes on another replica.
    shutdown: CancellationToken,
}

/// "Subscribe to this workflow's channel and tell me when it is done."
struct SubscribeRequest {
    workflow_id: String,
    done: tokio::sync::oneshot::Sender<()>,
}

impl WatchHub {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            watched: Mutex::default(),
            subscribe_requests: Mutex::default(),
            shutdown,
        }
    }

    /// The feed of one workflow, shared by all its local watchers, once its
    /// channel is subscribed (or, with Redis unreachable, once the hub will
    /// subscribe it on reconnecting, as it does for every live feed).
    async fn subscribe(&self, workflow_id: &str) -> Arc<Feed> {
        // The feed exists before the request is sent: the manager's sweep
        // never drops the channel of a feed that is alive.
        let feed = self.feed(workflow_id);
        let (done, subscribed) = tokio::sync::oneshot::channel();
        let request = SubscribeRequest {
            workflow_id: workflow_id.to_string(),
            done,
        };
        let sent = match self.subscribe_requests.lock().expect("watch hub lock").as_ref() {
            Some(requests) => requests.send(request).is_ok(),
            None => false,
        };
        if sent && tokio::time::timeout(SUBSCRIBE_PATIENCE, subscribed).await.is_err() {
            tracing::warn!(
                workflow_id,
                "subscribing to the workflow's events timed out; reading anyway"
            );
        }
        feed
    }

    fn feed(&self, workflow_id: &str) -> Arc<Feed> {
        let mut watched = self.watched.lock().expect("watch hub lock");
        if let Some(feed) = watched.get(workflow_id).and_then(Weak::upgrade) {
            return feed;
        }
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

    /// The workflows with a live local watcher; forgets the others.
    fn live_workflows(&self) -> HashSet<String> {
        let mut watched = self.watched.lock().expect("watch hub lock");
        watched.retain(|_, feed| feed.strong_count() > 0);
        watched.keys().cloned().collect()
    }

    /// Listens for event notifications until the process ends, reconnecting
    /// after Redis restarts.
    pub async fn listen(self: Arc<Self>, redis: RedisArgs, conn: Connection) {
        nexus_pipeline::connection::listen_forever("event notifications", || async {
            let listened = self.listen_once(&redis, &conn).await;
            *self.subscribe_requests.lock().expect("watch hub lock") = None;
            self.wake_all();
            listened
        })
        .await
    }

    async fn listen_once(self: &Arc<Self>, redis: &RedisArgs, conn: &Connection) -> redis::RedisResult<()> {
        let client = redis.pubsub_client()?;
        let (mut sink, mut messages) = client.get_async_pubsub().await?.split();
        sink.subscribe(LEGACY_EVENTS_CHANNEL).await?;
        // Requests queue from here on; every feed alive before this point is
        // in the set subscribed next, so no watcher is left out.
        let (requests, queued) = mpsc::unbounded_channel();
        *self.subscribe_requests.lock().expect("watch hub lock") = Some(requests);
        let workflows = self.live_workflows();
        let channels: Vec<String> = workflows.iter().map(|id| events_channel(id)).collect();
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
            sink.subscribe(chunk).await?;
        }
        mark_watched_again(conn, &workflows).await;
        self.wake_all();
        let manager = SubscriptionManager {
            hub: self.clone(),
            sink,
            subscribed: workflows,
        };
        let manager = tokio::spawn(manager.run(queued));
        while let Some(message) = messages.next().await {
            if let Ok(workflow_id) = message.get_payload::<String>() {
                self.wake(&workflow_id);
            }
        }
        manager.abort();
        Ok(())
    }
}

/// Marks the watched runs again after the notification connection came
/// back. The mark lives in Redis, so a Redis restored from an older AOF or
/// a replica promoted before the mark reached it may have lost it, and an
/// unmarked run is not announced; the wake-up that follows re-reads what
/// was appended meanwhile.
async fn mark_watched_again(conn: &Connection, workflows: &HashSet<String>) {
    let ids: Vec<WorkflowId> = workflows.iter().filter_map(|id| WorkflowId::parse(id).ok()).collect();
    let mut failed = 0;
    for chunk in ids.chunks(64) {
        let marks = chunk.iter().map(|id| {
            let (mut conn, keys) = (conn.clone(), WorkflowKeys::new(id));
            async move { open_watch(&mut conn, &keys).await }
        });
        failed += futures::future::join_all(marks)
            .await
            .iter()
            .filter(|marked| marked.is_err())
            .count();
    }
    if failed > 0 {
        tracing::warn!(
            failed,
            "could not mark some watched runs again; they are re-marked on the next reconnect"
        );
    }
}

/// Owns the subscribing half of the notification connection: subscribes
/// the channels new watchers ask for (all that queued up, in one command)
/// and, every [`UNSUBSCRIBE_EVERY`], drops those of workflows no local
/// watcher follows any more. One task doing both, in turn, keeps a sweep
/// from unsubscribing a channel a new watcher was just told is live.
struct SubscriptionManager {
    hub: Arc<WatchHub>,
    sink: PubSubSink,
    subscribed: HashSet<String>,
}

impl SubscriptionManager {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<SubscribeRequest>) {
        let mut sweep = tokio::time::interval(UNSUBSCRIBE_EVERY);
        loop {
            tokio::select! {
                Some(first) = requests.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < CHANNELS_PER_COMMAND
                        && let Ok(next) = requests.try_recv()
                    {
                        batch.push(next);
                    }
                    if self.subscribe(batch).await.is_err() {
                        return;
                    }
                }
                _ = sweep.tick() => {
                    if self.unsubscribe_departed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Subscribes what the batch asks for and is not subscribed yet, then
    /// tells every requester.
    async fn subscribe(&mut self, batch: Vec<SubscribeRequest>) -> redis::RedisResult<()> {
        let new: HashSet<&str> = batch
            .iter()
            .map(|request| request.workflow_id.as_str())
            .filter(|id| !self.subscribed.contains(*id))
            .collect();
        if !new.is_empty() {
            let channels: Vec<String> = new.iter().map(|id| events_channel(id)).collect();
            if let Err(error) = self.sink.subscribe(&channels).await {
                tracing::warn!(%error, "cannot subscribe to watched workflows' events");
                return Err(error);
            }
            self.subscribed.extend(new.into_iter().map(str::to_string));
        }
        for request in batch {
            let _ = request.done.send(());
        }
        Ok(())
    }

    async fn unsubscribe_departed(&mut self) -> redis::RedisResult<()> {
        let live = self.hub.live_workflows();
        let departed: Vec<String> = self.subscribed.difference(&live).cloned().collect();
        for chunk in departed.chunks(CHANNELS_PER_COMMAND) {
            let channels: Vec<String> = chunk.iter().map(|id| events_channel(id)).collect();
            self.sink.unsubscribe(&channels).await?;
            chunk.iter().for_each(|id| {
                self.subscribed.remove(id);
            });
        }
        Ok(())
    }
}

/// Starts streaming a workflow's events into a channel; the receiver is the
/// gRPC response stream. Fails fast when the workflow does not exist. The
/// workflow's channel is subscribed (alongside the first read) before the
/// stream opens, so once a client sees it open, live events reach it
/// without waiting for a subscription.
pub async fn watch(
    hub: Arc<WatchHub>,
    conn: Connection,
    id: WorkflowId,
    after_cursor: String,
    skip_reasoning: bool,
    slot: WatchSlot,
) -> Result<mpsc::Receiver<Result<WorkflowEvent, Status>>, ApiError> {
    let keys = WorkflowKeys::new(&id);
    let workflow_id = id.to_string();
    let mut reader = conn.clone();
    let (feed, opened) = tokio::join!(hub.subscribe(&workflow_id), open_watch(&mut reader, &keys));
    let Some((status, last)) = opened? else {
        return Err(ApiError::NotFound(id.to_string()));
    };
    let last = parse_cursor(&last);
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
        feed,
        conn,
        workflow_id,
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
    /// The workflow's live feed, subscribed before the stream opened.
    feed: Arc<Feed>,
    conn: Connection,
    /// The id as events carry it, rendered once (not per event).
    workflow_id: String,
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
        let feed = self.feed.clone();
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
                event.workflow_id = self.workflow_id.clone();
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
