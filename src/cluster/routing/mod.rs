//! Topic routing between the nodes of a fleet (issue 19 point 2): a device PUBLISH, a
//! will or an HTTP topic push on one node reaches the matching sessions on every other
//! node, once each, and only nodes with a matching subscription receive it.
//!
//! **Interest in NATS.** Each node subscribes in NATS to the subjects of the MQTT filters
//! its sessions hold ([`subject`]), counted per node: a shard reports a filter when its
//! index gains its first subscriber and again when it loses its last ([`Interest`]); the
//! routing task counts the shards holding each filter and sends SUB at the first, UNSUB
//! at the last. A message goes out once, on `<prefix>.msg.<topic subject>`, and NATS's
//! own interest graph takes it to the nodes subscribed to a matching subject and to no
//! other: a node without a matching filter costs nothing and counts 0 messages in. The
//! alternative, publishing to every node and filtering there, sends every message to
//! every node; replicating every node's filters to every publisher would keep millions of
//! filters on each node. NATS already keeps the interest graph, and across a NATS cluster
//! too.
//!
//! **Exactly once.** A node whose filters overlap (`a/+` and `+/b`) holds two NATS
//! subscriptions matching `a/b` and receives one copy per subscription; each copy is
//! routed through the shards' whole index, so only the first may be delivered. Every
//! message carries its origin (node id and start time) and a sequence number counted by
//! the one task that publishes for the node ([`envelope`]). The NATS server handles one
//! connection's publishes one after the other and delivers each to all matching
//! subscriptions before the next, in order on the receiving connection, so all copies of
//! message n from an origin arrive before any copy of n+1: a copy whose sequence is not
//! above the last one seen from its origin is a duplicate ([`Dedup`]), exactly. That
//! needs the order of the receiving socket, which is why routing speaks the NATS protocol
//! on its own connection ([`proto`]) instead of async-nats's per-subscription channels.
//! The same order keeps QoS 1 messages of one publisher in order for each subscriber:
//! one shard queues them in order, one task publishes them, one task reads them and hands
//! them to each shard's mailbox in that order.
//!
//! **Shards never wait.** A shard offers each message to a bounded lock-free queue
//! ([`RouteHandle::offer`], `[cluster] routing_queue_capacity`). With
//! `slow_consumer = "pace"` a shard reads no PUBLISH while the queue holds half its
//! capacity and the routing connection is up ([`RouteHandle::backlogged`]), as for a
//! full outbox to another shard (`shard/pacing.rs`). When it is full anyway (NATS away,
//! `"drop"`, topic pushes) the message does not go to other nodes and is counted
//! (`gateway_fleet_messages_dropped_total{reason="queue_full"}`); its local delivery is
//! unaffected. Interest changes go through an unbounded channel: losing one would lose
//! messages, and there is at most one per SUBSCRIBE or UNSUBSCRIBE filter. Messages from
//! other nodes reach the shards through their mailboxes (`ShardMsg::FleetPublish`); the
//! routing task awaits room there, so a slow node stops reading NATS rather than drop.
//!
//! **A SUBACK means the fleet can reach the subscriber.** NATS learns a node's new filter
//! from its SUB, written by the routing task some time after the shard granted the
//! subscription; a message another node publishes before the server has read that SUB
//! misses it (about 6%, measured with a publish on node A right after the SUBACK on
//! node B: `loadgen/scripts/fleet_suback_race.sh`). So a SUBSCRIBE that gave its shard a filter new there (or comes
//! while an earlier one waits) reports an [`Interest::Barrier`] after the filters, and
//! its SUBACK waits (`shard/fleet_route.rs`) until the routing task has read the PONG of
//! a PING written after their SUBs ([`Subscribed`]): the server reads a connection in
//! order, so the subscriptions are in force by then. After a (re)connection every
//! SUBSCRIBE waits so until the PONG of the PING written after the resubscription
//! ([`Subscribed::ready`]). The SUBACK does not wait while the routing connection is
//! down, and at most `request_timeout_ms` (then counted,
//! `gateway_fleet_subacks_waited_out_total`). The CONNACK of a resumed session with
//! subscriptions (one adopted from another node brings its filters) waits the same way.
//! With a cluster of NATS servers the subscription still reaches the other servers a
//! little later. Shared groups (`$share/…`, the groups connection) do not wait.
//!
//! **What is not exact.** Core NATS is at most once: while the routing connection is
//! down (it reconnects by itself with backoff) messages leave only through the queue
//! once it is back, within its capacity, and messages from other nodes meanwhile are
//! not received. Retained messages go through a key-value bucket every node follows
//! ([`retained`]).
//!
//! **Shared subscriptions.** A node with members of `$share/{group}/{filter}` holds a
//! NATS *queue* subscription for the filter's subjects, in a queue group named after
//! `{group}/{filter}`: NATS gives each message to one subscriber of the queue group,
//! that is to one node, whose group owner shard picks one of its members. With a fleet,
//! no node delivers to a shared group on its own, not even the publishing node: the
//! queue subscriptions live on a second connection of the node ([`Role::Groups`]), and
//! NATS's no-echo only spares the publishing connection, so NATS may pick the
//! publisher's node too. So each message reaches one member fleet-wide. A node holds one
//! queue subscription per member it has (up to `cluster.shared_group_subscriptions`) and
//! NATS picks uniformly among a queue group's subscriptions, so each node gets a share
//! of the group's messages in proportion to its members (a node with one member a
//! quarter when another has three). A message for a group whose members here all left
//! meanwhile is dropped (counted `offline`).

pub mod envelope;
mod group_sids;
mod interest_table;
mod keepalive;
mod last_words;
pub mod metrics;
pub mod proto;
pub mod retained;
pub mod subject;
mod subscribed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use crossbeam_queue::ArrayQueue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::interest::TopicKeys;
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::message::{Message, Origin};

use envelope::Envelope;
use interest_table::{InterestTable, SharedSids};
pub use metrics::{RouteDrop, RouteMetrics};
use proto::ServerOp;
pub use subscribed::Subscribed;
use subscribed::RESUBSCRIBED;

/// Messages published per write to the socket at most.
const WRITE_BATCH: usize = 1024;
/// Longest subject sent (the NATS server's default control line is 4 KiB).
const MAX_SUBJECT: usize = 3800;

/// A change of a shard's interest in a filter; for a shared group (`$share/…`), of the
/// owner shard's members of it.
#[derive(Debug)]
pub enum Interest {
    /// The shard's index gained the filter's first subscriber; a group, one member.
    Add(Arc<str>),
    /// The shard's index lost the filter's last subscriber; a group, one member.
    Remove(Arc<str>),
    /// Shard `shard` waits for the filters it reported before this to be subscribed in
    /// NATS: [`Subscribed`] reaches `ticket` once they are.
    Barrier { shard: u16, ticket: u64 },
}

/// Which of a node's two routing connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Publishes the node's messages and subscribes its sessions' filters. Without echo:
    /// the node's own messages never come back to it.
    Messages,
    /// Holds the queue subscriptions of the node's shared groups: another connection, so
    /// NATS may pick this node's members for its own messages too.
    Groups,
}

/// What a shard (or the HTTP API) holds to route messages to the fleet. Never blocks.
#[derive(Clone)]
pub struct RouteHandle {
    queue: Arc<ArrayQueue<Arc<Message>>>,
    wake: Arc<Notify>,
    interest: mpsc::UnboundedSender<Interest>,
    /// Interest changes of shared groups (`$share/…`), for the groups connection.
    groups: mpsc::UnboundedSender<Interest>,
    pub metrics: Arc<RouteMetrics>,
    /// The shards' confirmed barriers (SUBACKs waiting for NATS).
    pub subscribed: Arc<Subscribed>,
}

impl RouteHandle {
    /// Queues `msg` for the other nodes; counted and not routed to them when the queue
    /// is full.
    pub fn offer(&self, msg: &Arc<Message>) {
        if !self.try_offer(msg) {
            self.metrics.drop_msg(RouteDrop::QueueFull);
        }
    }

    /// Queues `msg` for the other nodes if the queue has room (nothing counted if not).
    pub fn try_offer(&self, msg: &Arc<Message>) -> bool {
        let queued = self.queue.push(msg.clone()).is_ok();
        self.wake.notify_one();
        queued
    }

    /// Whether the queue holds half its capacity while the routing connection is up: a
    /// shard then reads no PUBLISH until it drains (`shard/fleet_route.rs`). While NATS
    /// is away the queue fills and drops instead, so local delivery goes on.
    pub fn backlogged(&self) -> bool {
        self.metrics.connected.get() == 1 && self.queue.len() * 2 >= self.queue.capacity()
    }

    /// Whether the connection that holds the filters' subscriptions is up.
    pub fn connected(&self) -> bool {
        self.metrics.connected.get() == 1
    }

    /// Reports a change of this shard's interest in a filter.
    pub fn interest(&self, change: Interest) {
        let shared = match &change {
            Interest::Add(f) | Interest::Remove(f) => f.starts_with("$share/"),
            Interest::Barrier { .. } => false,
        };
        let to = if shared { &self.groups } else { &self.interest };
        // Closed only once the routing task has ended (shutdown).
        let _ = to.send(change);
    }
}

/// The last sequence number seen from each origin (see the module doc).
#[derive(Default)]
pub struct Dedup {
    last: HashMap<String, u64>,
}

impl Dedup {
    /// True the first time `(origin, seq)` is seen, false for a later copy.
    pub fn first(&mut self, origin: &str, seq: u64) -> bool {
        match self.last.get_mut(origin) {
            Some(last) if seq <= *last => false,
            Some(last) => {
                *last = seq;
                true
            }
            None => {
                self.last.insert(origin.to_string(), seq);
                true
            }
        }
    }
}

/// The routing of this node: the queue shards offer to and the task that talks to NATS.
pub struct Router {
    handle: RouteHandle,
    /// The interest changes for the messages connection and for the groups connection.
    changes: Mutex<Option<[mpsc::UnboundedReceiver<Interest>; 2]>>,
    /// `<subject_prefix>.msg`
    prefix: String,
    origin: String,
    urls: Vec<String>,
    token: String,
    /// TLS to NATS (`crate::nats_tls`), shared with the fleet's async-nats client.
    tls: Arc<rustls::ClientConfig>,
    name: String,
    /// The fleet's retained messages (see [`retained`]) and its subjects' prefix.
    retained: async_nats::jetstream::kv::Store,
    retained_prefix: String,
    /// `cluster.shared_group_subscriptions`.
    sets_per_group: usize,
    /// `cluster.request_timeout_ms` (at least a second): how often each connection
    /// looks whether NATS still answers (`keepalive`).
    ping_every: Duration,
}

impl Router {
    pub fn new(
        config: &ClusterConfig,
        node: &str,
        retained: async_nats::jetstream::kv::Store,
        tls: Arc<rustls::ClientConfig>,
    ) -> Arc<Router> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (groups_tx, groups_rx) = mpsc::unbounded_channel();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Arc::new(Router {
            handle: RouteHandle {
                queue: Arc::new(ArrayQueue::new(
                    (config.routing_queue_capacity as usize).max(1),
                )),
                wake: Arc::new(Notify::new()),
                interest: tx,
                groups: groups_tx,
                metrics: Arc::default(),
                subscribed: Arc::new(Subscribed::new()),
            },
            changes: Mutex::new(Some([rx, groups_rx])),
            prefix: format!("{}.msg", config.subject_prefix),
            origin: format!("{node}/{started}"),
            urls: config.urls(),
            token: config.nats_token.clone(),
            tls,
            name: format!("gateway-route-{node}"),
            retained,
            retained_prefix: format!("$KV.{}", retained::bucket(config)),
            sets_per_group: config.shared_group_subscriptions as usize,
            ping_every: config.request_timeout().max(Duration::from_secs(1)),
        })
    }

    pub fn handle(&self) -> RouteHandle {
        self.handle.clone()
    }

    /// Clears `topic`'s retained message on every node (see [`retained::clear`]).
    pub async fn clear_retained(&self, topic: &str) -> Result<(), String> {
        retained::clear(&self.retained, topic, &self.origin).await
    }

    pub fn render_metrics(&self, out: &mut String) {
        self.handle.metrics.render(out);
    }

    /// Follows the retained messages bucket and runs both connections until `stop`.
    pub async fn run(self: Arc<Self>, shards: Mailboxes, stop: CancellationToken) {
        let Some([changes, groups]) = self
            .changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let metrics = self.handle.metrics.clone();
        let follow = retained::follow(self.retained.clone(), shards.clone(), metrics, stop.clone());
        tokio::spawn(follow);
        let dedup = Arc::new(Mutex::new(Dedup::default()));
        let messages = self.clone().connection(
            Role::Messages,
            changes,
            (shards.clone(), dedup.clone()),
            stop.clone(),
        );
        let groups = self
            .clone()
            .connection(Role::Groups, groups, (shards, dedup), stop);
        tokio::join!(messages, groups);
    }

    /// Connects as `role`, routes until `stop`, and connects again whenever the
    /// connection ends.
    async fn connection(
        self: Arc<Self>,
        role: Role,
        mut changes: mpsc::UnboundedReceiver<Interest>,
        (shards, dedup): (Mailboxes, Arc<Mutex<Dedup>>),
        stop: CancellationToken,
    ) {
        let mut table = InterestTable::new(self.sets_per_group);
        let name = format!("{}-{role:?}", self.name);
        let mut seq = 0u64;
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        let dial = proto::Dial {
            urls: &self.urls,
            token: &self.token,
            tls: &self.tls,
            name: &name,
        };
        while !stop.is_cancelled() {
            let conn = tokio::select! {
                c = proto::connect(&dial) => c,
                _ = stop.cancelled() => return,
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, connection = ?role, "cluster: message routing cannot reach NATS; messages to other nodes wait in the queue (within routing_queue_capacity)");
                        failing = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            tracing::info!(origin = %self.origin, connection = ?role, "cluster: message routing connected to NATS");
            failing = false;
            backoff = Duration::from_millis(100);
            if role == Role::Messages {
                self.handle.metrics.connected.set(1);
            }
            let (read, write) = tokio::io::split(conn.stream);
            let pong = Arc::new(Notify::new());
            let alive = Arc::new(keepalive::Keepalive::new());
            let reading = Reading {
                alive: alive.clone(),
                buf: conn.rest,
                dedup: dedup.clone(),
                groups: table.groups.clone(),
                shards: shards.clone(),
                pong: pong.clone(),
                batch: Vec::new(),
                shared: Vec::new(),
            };
            let reader = tokio::spawn(self.clone().read_loop(read, reading));
            let mut session = Session {
                router: &self,
                role,
                write,
                table: &mut table,
                changes: &mut changes,
                seq: &mut seq,
                max_payload: conn.max_payload,
            };
            let ended = session.write_loop(reader, (pong, &alive), &stop).await;
            if role == Role::Messages {
                self.handle.metrics.connected.set(0);
            }
            // SUBACKs waiting for this connection's PONGs wait no more: the next one
            // subscribes everything again, and messages meanwhile are missed anyway.
            // Every shard looks again (some barriers may still be in the channel).
            let pending = (table.groups.lock())
                .unwrap_or_else(|p| p.into_inner())
                .take_barriers();
            let subscribed = &self.handle.subscribed;
            subscribed.confirm(&pending, &shards);
            if role == Role::Messages {
                subscribed.disconnected();
                for shard in 0..shards.len() {
                    let _ = shards.try_send(shard, ShardMsg::FleetSubscribed);
                }
            }
            if let Err(e) = ended {
                tracing::warn!(error = %e, connection = ?role, "cluster: message routing lost its NATS connection; reconnecting");
            }
        }
    }

    /// Reads the server's operations: messages for this node's shards, PINGs answered.
    async fn read_loop(
        self: Arc<Self>,
        mut read: ReadHalf<proto::Stream>,
        mut ctx: Reading,
    ) -> String {
        loop {
            loop {
                match proto::parse(&mut ctx.buf) {
                    Ok(Some(ServerOp::Msg {
                        subject,
                        sid,
                        payload,
                    })) => self.arrived(&subject, sid, payload, &mut ctx),
                    Ok(Some(ServerOp::Ping)) => ctx.pong.notify_one(),
                    Ok(Some(ServerOp::Pong)) => {
                        let mut groups = ctx.groups.lock().unwrap_or_else(|p| p.into_inner());
                        let done = groups.ponged();
                        drop(groups);
                        if !done.is_empty() {
                            self.handle.subscribed.confirm(&done, &ctx.shards);
                        }
                    }
                    Ok(Some(ServerOp::Err(e))) => {
                        tracing::warn!(error = %e, "cluster: NATS reports an error on the routing connection")
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return e.to_string(),
                }
            }
            ctx.alive.waiting_on_shards(true);
            self.hand_over(&mut ctx).await;
            ctx.alive.waiting_on_shards(false);
            match read.read_buf(&mut ctx.buf).await {
                Ok(0) => return "closed by the server".into(),
                Ok(_) => ctx.alive.heard(),
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Hands what one read brought to the shards: the subscribers' messages to each
    /// shard whose subscriptions may match them (`crate::interest`), each shared group's
    /// message to the group's owner shard. Awaits room in their mailboxes: a slow node
    /// stops reading NATS rather than drop. A shard that has stopped (a graceful stop)
    /// takes nothing: what was for it is counted and dropped, and the connection reads
    /// on, so a stopping node's last words are still answered (`last_words.rs`).
    async fn hand_over(&self, ctx: &mut Reading) {
        let metrics = &self.handle.metrics;
        let stopping = |m: ShardMsg| {
            let n = match &m {
                ShardMsg::FleetPublish(part) => part.len() as u64,
                _ => 1,
            };
            metrics.drop_msgs(RouteDrop::Stopping, n);
        };
        if !ctx.batch.is_empty() {
            let batch = std::mem::take(&mut ctx.batch);
            let keys: Vec<TopicKeys> = batch.iter().map(|m| TopicKeys::of(&m.topic)).collect();
            for shard in 0..ctx.shards.len() {
                let interest = ctx.shards.interest();
                let part: Vec<Arc<Message>> = (batch.iter().zip(&keys))
                    .filter(|(_, k)| interest.may_match(shard, k))
                    .map(|(m, _)| m.clone())
                    .collect();
                if part.is_empty() {
                    continue;
                }
                let msg = ShardMsg::FleetPublish(part);
                if let Err(back) = ctx.shards.send(shard, msg).await {
                    stopping(back);
                }
            }
        }
        for (key, msg) in std::mem::take(&mut ctx.shared) {
            let owner = crate::mailbox::home_shard(&key, ctx.shards.len());
            let msg = ShardMsg::FleetShared { key, msg };
            if let Err(back) = ctx.shards.send(owner, msg).await {
                stopping(back);
            }
        }
    }

    /// Takes in one NATS message: for a shared group when it came through the group's
    /// queue subscription (NATS picked this node), else for the subscribers, unless it
    /// is this node's own (never, without echo; checked all the same) or a duplicate.
    /// Malformed or expired ones are counted.
    fn arrived(&self, subject: &str, sid: u64, body: bytes::Bytes, ctx: &mut Reading) {
        let metrics = &self.handle.metrics;
        let topic = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .and_then(subject::decode_topic);
        let (Some(topic), Ok(env)) = (topic, Envelope::decode(body)) else {
            metrics.drop_msg(RouteDrop::Malformed);
            return;
        };
        let own = env.origin == self.origin;
        let group = (ctx.groups.lock())
            .unwrap_or_else(|p| p.into_inner())
            .group(sid);
        if group.is_none() {
            if own {
                return;
            }
            let mut dedup = ctx.dedup.lock().unwrap_or_else(|p| p.into_inner());
            if !dedup.first(&env.origin, env.seq) {
                metrics.drop_msg(RouteDrop::Duplicate);
                return;
            }
        }
        if env.expiry_ms == Some(0) {
            metrics.drop_msg(RouteDrop::Expired);
            return;
        }
        if !own {
            metrics.received(1);
        }
        let mut msg = Message::new(
            topic.into(),
            env.payload,
            env.qos,
            env.retain,
            Origin::Gateway,
        );
        msg.props = env.props;
        msg.expires = env
            .expiry_ms
            .map(|ms| msg.created + Duration::from_millis(ms));
        let msg = Arc::new(msg);
        match group {
            Some(key) => ctx.shared.push((key, msg)),
            None => ctx.batch.push(msg),
        }
    }
}

/// What the reader of one connection works with.
struct Reading {
    /// What the writer knows of this reader's reads (`keepalive`).
    alive: Arc<keepalive::Keepalive>,
    /// Bytes read and not parsed yet.
    buf: BytesMut,
    /// The last sequence seen per origin; kept across connections.
    dedup: Arc<Mutex<Dedup>>,
    groups: SharedSids,
    shards: Mailboxes,
    pong: Arc<Notify>,
    /// Messages for the subscribers, and for shared groups, from the current read.
    batch: Vec<Arc<Message>>,
    shared: Vec<(Arc<str>, Arc<Message>)>,
}

/// Why a connection's writer stopped.
enum Exit {
    /// The reader ended (the connection broke), with why.
    ReaderEnded(String),
    /// The gateway stops.
    Stopped,
    Failed(String),
}

/// One connection's writing side and the state it works on.
struct Session<'a> {
    router: &'a Router,
    role: Role,
    write: WriteHalf<proto::Stream>,
    table: &'a mut InterestTable,
    changes: &'a mut mpsc::UnboundedReceiver<Interest>,
    seq: &'a mut u64,
    max_payload: usize,
}

impl Session<'_> {
    /// Subscribes the held filters, then writes interest changes, queued messages,
    /// PINGs and PONGs until the reader ends, a write makes no progress, the server
    /// stays silent (`keepalive`), or the gateway stops. The reader is stopped, and
    /// waited for, before this returns: the next connection's table is its own.
    async fn write_loop(
        &mut self,
        mut reader: tokio::task::JoinHandle<String>,
        (pong, alive): (Arc<Notify>, &keepalive::Keepalive),
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let exit = self.serve(&mut reader, (pong, alive), stop).await;
        if let Exit::ReaderEnded(why) = exit {
            return Err(why);
        }
        reader.abort();
        let _ = reader.await;
        match exit {
            Exit::Failed(why) => Err(why),
            _ => Ok(()),
        }
    }

    async fn serve(
        &mut self,
        reader: &mut tokio::task::JoinHandle<String>,
        (pong, alive): (Arc<Notify>, &keepalive::Keepalive),
        stop: &CancellationToken,
    ) -> Exit {
        let mut out = BytesMut::new();
        self.table.resubscribe(&self.router.prefix, &mut out);
        if self.role == Role::Messages {
            let mut sids = self.table.groups.lock().unwrap_or_else(|p| p.into_inner());
            sids.barrier(vec![(RESUBSCRIBED, 0)], &mut out);
        }
        if let Err(e) = self.flush(&mut out).await {
            return Exit::Failed(e);
        }
        self.count_subscriptions();
        let wake = self.router.handle.wake.clone();
        let every = self.router.ping_every;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => match alive.tick(every) {
                    keepalive::Tick::Nothing => {}
                    keepalive::Tick::Ping => {
                        let mut sids = self.table.groups.lock().unwrap_or_else(|p| p.into_inner());
                        sids.ping(&mut out);
                    }
                    keepalive::Tick::GiveUp => {
                        let silent = every * keepalive::SILENT_PINGS;
                        return Exit::Failed(format!("NATS sent nothing for {silent:?}, PINGs unanswered"));
                    }
                },
                ended = &mut *reader => {
                    return Exit::ReaderEnded(ended.unwrap_or_else(|e| e.to_string()));
                }
                _ = stop.cancelled() => return match self.role {
                    Role::Messages => self.last_words(reader, &mut out).await,
                    Role::Groups => Exit::Stopped,
                },
                _ = pong.notified() => out.put_slice(b"PONG\r\n"),
                change = self.changes.recv() => {
                    let Some(change) = change else { return Exit::Stopped };
                    let mut barriers = Vec::new();
                    self.apply(change, &mut barriers, &mut out);
                    while let Ok(change) = self.changes.try_recv() {
                        self.apply(change, &mut barriers, &mut out);
                    }
                    if !barriers.is_empty() {
                        let mut sids = self.table.groups.lock().unwrap_or_else(|p| p.into_inner());
                        sids.barrier(barriers, &mut out);
                    }
                    self.count_subscriptions();
                }
                _ = wake.notified(), if self.role == Role::Messages => self.publish_queued(&mut out),
            }
            if let Err(e) = self.flush(&mut out).await {
                return Exit::Failed(e);
            }
        }
    }

    /// One interest change: SUB or UNSUB into `out`, or a barrier kept for the PING
    /// written after this batch.
    fn apply(&mut self, change: Interest, barriers: &mut Vec<(u16, u64)>, out: &mut BytesMut) {
        match change {
            Interest::Barrier { shard, ticket } => barriers.push((shard, ticket)),
            change => self.table.apply(change, &self.router.prefix, out),
        }
    }

    fn count_subscriptions(&self) {
        let n = self.table.subscriptions() as i64;
        let i = usize::from(self.role == Role::Groups);
        self.router.handle.metrics.set_subscriptions(i, n);
    }

    /// Encodes up to [`WRITE_BATCH`] queued messages as PUBs (wakes itself for the rest).
    fn publish_queued(&mut self, out: &mut BytesMut) {
        let handle = &self.router.handle;
        let now = Instant::now();
        let mut sent = 0;
        for _ in 0..WRITE_BATCH {
            let Some(msg) = handle.queue.pop() else { break };
            if msg.is_expired(now) {
                handle.metrics.drop_msg(RouteDrop::Expired);
                continue;
            }
            *self.seq += 1;
            let env = Envelope {
                origin: self.router.origin.clone(),
                seq: *self.seq,
                qos: msg.qos,
                retain: msg.retain,
                expiry_ms: msg
                    .expires
                    .map(|e| e.saturating_duration_since(now).as_millis().max(1) as u64),
                props: msg.props.clone(),
                payload: msg.payload.clone(),
            };
            let body = env.encode();
            let subject = subject::topic_subject(&msg.topic);
            if body.len() > self.max_payload || subject.len() > MAX_SUBJECT {
                handle.metrics.drop_msg(RouteDrop::TooLarge);
                continue;
            }
            put_pub(out, &self.router.prefix, &subject, &body);
            sent += 1;
            if msg.retain {
                self.put_retained(out, &msg, env);
            }
        }
        handle.metrics.sent(sent);
        if !handle.queue.is_empty() {
            handle.wake.notify_one();
        }
    }

    /// Puts a retained message (or its clear) into the fleet's bucket.
    fn put_retained(&self, out: &mut BytesMut, msg: &Message, env: Envelope) {
        let key = retained::key(&msg.topic);
        let body = Envelope {
            seq: crate::store::now_ms(),
            ..env
        }
        .encode();
        if key.len() > MAX_SUBJECT || body.len() > self.max_payload {
            self.router.handle.metrics.drop_msg(RouteDrop::TooLarge);
            return;
        }
        put_pub(out, &self.router.retained_prefix, &key, &body);
        self.router.handle.metrics.retained_out();
    }

    /// Writes `out` to the server; fails when a write makes no progress for
    /// `SILENT_PINGS` × `ping_every` (a server that stopped reading).
    async fn flush(&mut self, out: &mut BytesMut) -> Result<(), String> {
        let limit = self.router.ping_every * keepalive::SILENT_PINGS;
        while !out.is_empty() {
            match tokio::time::timeout(limit, self.write.write(out)).await {
                Ok(Ok(0)) => return Err("the connection is closed".into()),
                Ok(Ok(n)) => out.advance(n),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("a write to NATS made no progress for {limit:?}")),
            }
        }
        // TLS may keep the tail of a write in its own buffer until flushed.
        match tokio::time::timeout(limit, self.write.flush()).await {
            Ok(flushed) => flushed.map_err(|e| e.to_string()),
            Err(_) => Err(format!("a write to NATS made no progress for {limit:?}")),
        }
    }
}

/// Appends `PUB <prefix>.<subject> <len>` and the body.
fn put_pub(out: &mut BytesMut, prefix: &str, subject: &str, body: &[u8]) {
    out.put_slice(format!("PUB {prefix}.{subject} {}\r\n", body.len()).as_bytes());
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_drops_later_copies_per_origin() {
        let mut d = Dedup::default();
        assert!(d.first("a/1", 1));
        assert!(!d.first("a/1", 1));
        assert!(d.first("b/1", 1));
        assert!(d.first("a/1", 3));
        assert!(!d.first("a/1", 2));
        assert!(d.first("a/2", 1), "a restarted node is a new origin");
    }
}
