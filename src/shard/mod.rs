//! An IO shard: one OS thread that owns its connections, sessions and timers outright.
//!
//! The shard runs a current-thread tokio runtime only for its mailbox and its tick. Its
//! connections are driven by the shard's own `mio::Poll`, whose epoll fd is registered once
//! with that runtime (`AsyncFd`, nested epoll). So a connection costs a slab entry, not a
//! task, a tokio stream or a timer (ARCHITECTURE.md, "the crux").
//!
//! One loop turn: drain ready sockets (bounded), drain the mailbox (bounded), fire due
//! timers (bounded batches), flush every connection that got output this turn with one
//! write each, and hand cross-shard messages to the other shards in one batch each. Only
//! when nothing is left does the shard wait.
//!
//! The per-packet MQTT logic is in [`mqtt`]; routing and delivery in [`delivery`].

mod backpressure;
pub use backpressure::Congestion;
mod conn;
mod delivery;
mod durable;
mod mqtt;
mod push;
mod shared;

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::buffer::{BufferPool, PoolConfig, ReadSizePredictor};
use crate::codec::{self, Version};
use crate::config::{Config, DuplicateClientId};
use crate::limits::{Gcra, InboundLimits, PerIpLimit, TokenBucket};
use crate::listen::{out_of_fds, AcceptRetry, RetryCheck};
use crate::mailbox::{Handoff, Mailboxes, ShardMsg};
use crate::message::Message;
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};
use crate::proxy::{self, ProxyHeader};
use crate::session::{ClientIds, Session};
use crate::topic::{Subscriber, SubscriptionIndex};
use crate::wheel::{TimerId, TimingWheel};

pub use conn::{Conn, ConnBufs, ConnState, Peer, NO_SESSION};

const LISTENER: Token = Token(usize::MAX);
const TLS_LISTENER: Token = Token(usize::MAX - 1);
/// Wheel payload bit marking a session timer (the rest is the session key); without it
/// the payload is a connection key.
const SESSION_TIMER: u32 = 1 << 31;
/// Socket events handled per loop turn before the mailbox and timers get a go.
const EVENTS_PER_TURN: usize = 1024;
/// Reads of one connection per readiness event before others are served.
const READS_PER_EVENT: usize = 16;
/// Connections accepted per loop turn.
const ACCEPTS_PER_TURN: usize = 256;
/// Mailbox messages handled per loop turn.
const MAILBOX_PER_TURN: usize = 256;

/// The limits a shard enforces, taken from the config once.
pub struct Limits {
    pub max_packet_size: usize,
    pub max_client_id_len: usize,
    pub connect_timeout_ticks: u32,
    pub max_keepalive_secs: u16,
    pub keepalive_zero: crate::config::KeepaliveZero,
    pub keepalive_jitter_pct: u8,
    pub takeover: bool,
    pub max_connections: usize,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued: usize,
    pub max_session_expiry_secs: u32,
    pub write_stall_ticks: u32,
    pub retain_available: bool,
    pub max_retained: usize,
    pub topic_alias_maximum: u16,
    pub outbound_topic_aliases: u16,
    pub high_watermark: usize,
    pub low_watermark: usize,
    /// `slow_consumer = "backpressure"`: pause publishers instead of dropping QoS 0.
    pub backpressure: bool,
    /// With backpressure: the most output one connection holds.
    pub outbound_max: usize,
    pub expiry_batch: usize,
    pub max_topic_len: usize,
    pub max_subscriptions: usize,
    pub tick: Duration,
    pub proxy_protocol: bool,
    pub proxy_header_max: usize,
    /// `mqtt.proxy_trusted`: who may send the PROXY header.
    pub proxy_trusted: proxy::TrustedProxies,
    /// Per shard; 0 = unlimited.
    pub max_handshaking: usize,
    pub inbound: InboundLimits,
    pub use_cn_as_client_id: bool,
    pub require_client_cert: bool,
    pub tls_buffer: usize,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        let tick = Duration::from_millis(c.shards.tick_ms as u64);
        let ticks = |secs: u64| -> u32 { secs_to_ticks(secs as f64, tick) };
        Limits {
            max_packet_size: c.mqtt.max_packet_size as usize,
            max_client_id_len: c.mqtt.max_client_id_len as usize,
            connect_timeout_ticks: ticks(c.mqtt.connect_timeout_secs as u64),
            max_keepalive_secs: c.mqtt.max_keepalive_secs as u16,
            keepalive_zero: c.mqtt.keepalive_zero,
            keepalive_jitter_pct: c.mqtt.keepalive_jitter_pct as u8,
            takeover: matches!(c.mqtt.duplicate_client_id, DuplicateClientId::Takeover),
            max_connections: c.mqtt.max_connections as usize,
            receive_maximum: c.mqtt.receive_maximum as u16,
            max_inflight: c.mqtt.max_inflight as u16,
            max_queued: c.mqtt.max_queued_messages as usize,
            max_session_expiry_secs: c.mqtt.max_session_expiry_secs,
            write_stall_ticks: ticks(c.mqtt.write_stall_timeout_secs as u64),
            retain_available: c.mqtt.retain_available,
            max_retained: c.mqtt.max_retained_messages as usize,
            topic_alias_maximum: c.mqtt.topic_alias_maximum.min(65_535) as u16,
            outbound_topic_aliases: c.mqtt.outbound_topic_aliases.min(65_535) as u16,
            high_watermark: c.buffers.outbound_high_watermark as usize,
            low_watermark: c.buffers.outbound_low_watermark as usize,
            backpressure: c.buffers.slow_consumer == crate::config::SlowConsumer::Backpressure,
            outbound_max: c.buffers.outbound_max_bytes as usize,
            expiry_batch: (c.shards.expiry_batch as usize).max(1),
            max_topic_len: c.mqtt.max_topic_len as usize,
            max_subscriptions: c.mqtt.max_subscriptions_per_client as usize,
            tick,
            proxy_protocol: c.mqtt.proxy_protocol,
            proxy_header_max: c.mqtt.proxy_header_max_bytes as usize,
            // Validated by Config::validate.
            proxy_trusted: proxy::TrustedProxies::parse(&c.mqtt.proxy_trusted).unwrap_or_default(),
            max_handshaking: c.limits.max_handshaking as usize,
            inbound: InboundLimits {
                msgs: Gcra::new(c.limits.publish_rate, c.limits.publish_burst),
                bytes: Gcra::new(c.limits.bytes_rate, c.limits.bytes_burst),
            },
            use_cn_as_client_id: c.mqtt.use_cn_as_client_id,
            require_client_cert: c.mqtt.tls_require_client_cert,
            tls_buffer: c.mqtt.tls_buffer_bytes as usize,
        }
    }

    pub fn ticks(&self, secs: f64) -> u32 {
        secs_to_ticks(secs, self.tick)
    }
}

/// Whole ticks covering `secs`, rounded up so a timer never fires early.
fn secs_to_ticks(secs: f64, tick: Duration) -> u32 {
    let t = (secs * 1000.0 / tick.as_millis().max(1) as f64).ceil();
    t.clamp(0.0, f64::from(u32::MAX / 2)) as u32
}

/// Everything a shard is started with.
pub struct ShardContext {
    pub id: usize,
    pub config: Arc<Config>,
    pub listener: std::net::TcpListener,
    /// This shard's SO_REUSEPORT socket on `tls_listen`, with the rustls configuration.
    pub tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// Connections per IP across all shards (`max_connections_per_ip`).
    pub per_ip: Arc<PerIpLimit>,
    pub mailbox: mpsc::Receiver<ShardMsg>,
    pub mailboxes: Mailboxes,
    pub metrics: Arc<ShardMetrics>,
    /// Connections open across the whole gateway (for `max_connections`).
    pub open_connections: Arc<AtomicUsize>,
    /// Congested connections per shard (`slow_consumer = "backpressure"`).
    pub congestion: Arc<backpressure::Congestion>,
    /// The authentication providers, shared by all shards.
    pub auth: Arc<crate::auth::Authenticator>,
    /// The business runtime, where slow authentication runs.
    pub business: tokio::runtime::Handle,
    /// This shard's side of the durable store (`None` when `[store] enabled = false`).
    pub store: Option<crate::store::StoreHandle>,
    /// Stored sessions homed on this shard, restored before the first accept.
    pub restore: Vec<crate::store::StoredSession>,
    /// Stored retained messages (every shard keeps them all).
    pub retained: Arc<Vec<Arc<Message>>>,
    /// Told once the shard has restored its sessions and is about to accept.
    pub ready: std::sync::mpsc::Sender<usize>,
}

pub struct Shard {
    id: usize,
    config: Arc<Config>,
    limits: Limits,
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    accept_pending: bool,
    /// Accepting stopped by `max_connect_rate` or `max_handshaking`; retried every turn.
    accept_blocked: bool,
    /// Accepting failed for want of a file descriptor; retried on a timer.
    accept_retry: AcceptRetry,
    connect_bucket: TokenBucket,
    /// Connections accepted here and not yet CONNACKed (`max_handshaking`).
    handshaking: usize,
    per_ip: Arc<PerIpLimit>,
    /// Connections not read because they are over their inbound rate, or hold a
    /// PUBLISH while the gateway is backpressured.
    paused: HashSet<u32>,
    /// This shard's congested connections (see `backpressure.rs`), and all shards'.
    congested: u32,
    congestion: Arc<backpressure::Congestion>,
    /// A batch for another shard found its mailbox full this turn.
    outbox_blocked: bool,
    /// When the loop must wake for a paused connection or the connect bucket.
    wake_at: Option<Instant>,
    /// Plaintext out of rustls, on its way to the decoder.
    plain: Vec<u8>,
    conns: Slab<Conn>,
    sessions: Slab<Session>,
    by_client: ClientIds,
    subs: SubscriptionIndex,
    retained: HashMap<Arc<str>, Arc<Message>>,
    /// The byte bounds on `retained` (mirrors it; see crate::retained_budget).
    retained_budget: crate::retained_budget::RetainedBudget,
    wheel: TimingWheel<u32>,
    fired: Vec<(TimerId, u32)>,
    /// Subscribers matched by the message being routed (reused across messages).
    match_buf: Vec<Subscriber>,
    timers_pending: bool,
    pool: BufferPool,
    scratch: Vec<u8>,
    /// Connections with output to write at the end of this turn.
    dirty: Vec<u32>,
    /// Connections whose read budget ran out while bytes were still waiting.
    reread: Vec<u32>,
    /// Connections whose buffer box holds only inbound rate debt (see `sweep_settling`).
    settling: Vec<u32>,
    /// The tick `settling` was last swept.
    settled_at: u64,
    /// Messages for each other shard, sent as one batch per turn.
    outbox: Vec<Vec<Arc<Message>>>,
    /// Shared-subscription control messages for each other shard, sent in order.
    ctl_outbox: Vec<VecDeque<ShardMsg>>,
    /// The shared subscription groups this shard owns.
    shared: shared::SharedGroups,
    mailboxes: Mailboxes,
    metrics: Arc<ShardMetrics>,
    open_connections: Arc<AtomicUsize>,
    started: Instant,
    now: u64,
    now_instant: Instant,
    queued_total: u64,
    subs_total: u64,
    next_auto_id: u64,
    stopping: bool,
    /// Answers to the business pool, sent after this turn's writes.
    pending_replies: Vec<push::PendingReply>,
    started_wall: std::time::SystemTime,
    auth: Arc<crate::auth::Authenticator>,
    business: tokio::runtime::Handle,
    /// This shard's compiled `[acl]` rules.
    acl: crate::acl::Acl,
    /// CONNECTs waiting for an authentication answer, by connection key. `close_conn`
    /// removes a connection's entry, so an answer finds either its own connection (same
    /// token) or nothing.
    auth_pending: HashMap<usize, mqtt::PendingAuth>,
    next_auth_token: u64,
    store: Option<crate::store::StoreHandle>,
}

/// The mio Poll's epoll fd as seen by tokio (not owned: the Poll closes it).
struct PollFd(RawFd);
impl AsRawFd for PollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Starts shard `ctx.id` on its own OS thread.
pub fn spawn(ctx: ShardContext) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("shard-{}", ctx.id))
        .spawn(move || {
            let mut ctx = ctx;
            let id = ctx.id;
            if ctx.config.shards.pin_cores {
                pin_to_core(id);
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(shard = id, error = %e, "cannot build shard runtime");
                    return;
                }
            };
            let restore = std::mem::take(&mut ctx.restore);
            let retained = ctx.retained.clone();
            let ready = ctx.ready.clone();
            let (mut shard, rx) = match Shard::new(ctx) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(shard = id, error = %e, "cannot start shard");
                    return;
                }
            };
            let sessions = restore.len();
            shard.restore(restore, &retained);
            drop(retained);
            let _ = ready.send(sessions);
            // tokio-metrics measures the shard's busy time per poll (gateway_shard_busy_ratio).
            let monitor = shard.metrics.monitor.clone();
            if let Err(e) = rt.block_on(monitor.instrument(shard.run(rx))) {
                tracing::error!(shard = id, error = %e, "shard stopped with an error");
            }
        })
}

impl Shard {
    fn new(ctx: ShardContext) -> io::Result<(Self, mpsc::Receiver<ShardMsg>)> {
        let limits = Limits::from_config(&ctx.config);
        let retained_budget = crate::retained_budget::RetainedBudget::new(
            ctx.config.mqtt.max_retained_bytes,
            ctx.config.mqtt.max_retained_bytes_per_client,
        );
        let poll = Poll::new()?;
        ctx.listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(ctx.listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let (tls_listener, tls_config) = match ctx.tls {
            Some((l, cfg)) => {
                l.set_nonblocking(true)?;
                let mut l = TcpListener::from_std(l);
                poll.registry()
                    .register(&mut l, TLS_LISTENER, Interest::READABLE)?;
                (Some(l), Some(cfg))
            }
            None => (None, None),
        };
        let lim = &ctx.config.limits;
        let connect_bucket =
            TokenBucket::new(lim.max_connect_rate, lim.connect_burst, Instant::now());
        let accept_retry =
            AcceptRetry::new(Duration::from_millis(ctx.config.tcp.accept_retry_ms as u64));
        let shards = ctx.mailboxes.len();
        let b = &ctx.config.buffers;
        let pool = BufferPool::new(PoolConfig {
            max_pooled_bytes: b.pool_max_bytes as usize,
            idle_ticks: limits.ticks(b.pool_idle_secs as f64) as u64,
        });
        let started = Instant::now();
        let acl = crate::acl::Acl::from_config(&ctx.config.acl)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok((
            Shard {
                id: ctx.id,
                scratch: vec![0; b.scratch_bytes as usize],
                config: ctx.config,
                limits,
                poll,
                events: Events::with_capacity(EVENTS_PER_TURN),
                listener: Some(listener),
                tls_listener,
                plain: if tls_config.is_some() {
                    vec![0; 16 * 1024]
                } else {
                    Vec::new()
                },
                tls_config,
                accept_pending: false,
                accept_blocked: false,
                accept_retry,
                connect_bucket,
                handshaking: 0,
                per_ip: ctx.per_ip,
                paused: HashSet::new(),
                congested: 0,
                congestion: ctx.congestion,
                outbox_blocked: false,
                wake_at: None,
                conns: Slab::new(),
                sessions: Slab::new(),
                by_client: ClientIds::default(),
                subs: SubscriptionIndex::new(),
                retained: HashMap::new(),
                retained_budget,
                wheel: TimingWheel::new(0),
                fired: Vec::new(),
                match_buf: Vec::new(),
                timers_pending: false,
                pool,
                dirty: Vec::new(),
                reread: Vec::new(),
                settling: Vec::new(),
                settled_at: 0,
                outbox: vec![Vec::new(); shards],
                ctl_outbox: (0..shards).map(|_| VecDeque::new()).collect(),
                shared: Default::default(),
                mailboxes: ctx.mailboxes,
                metrics: ctx.metrics,
                open_connections: ctx.open_connections,
                started,
                now: 0,
                now_instant: started,
                queued_total: 0,
                subs_total: 0,
                next_auto_id: 0,
                stopping: false,
                pending_replies: Vec::new(),
                started_wall: std::time::SystemTime::now(),
                auth: ctx.auth,
                business: ctx.business,
                acl,
                auth_pending: HashMap::new(),
                next_auth_token: 0,
                store: ctx.store,
            },
            ctx.mailbox,
        ))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>) -> io::Result<()> {
        // SAFETY: the epoll fd belongs to `self.poll`, which lives (inside `self`) until
        // this function returns; `poll_fd` is a local dropped before `self`, so the fd stays
        // open and unchanged for the whole registration.
        let poll_fd = unsafe {
            AsyncFd::register_with_interest(
                PollFd(self.poll.as_raw_fd()),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(io::Error::from)?;
        tracing::debug!(shard = self.id, "shard started");
        loop {
            self.update_clock();
            let mut busy = self.poll_sockets()?;
            for _ in 0..MAILBOX_PER_TURN {
                match rx.try_recv() {
                    Ok(msg) => self.handle_msg(msg),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.begin_shutdown();
                        break;
                    }
                }
            }
            // An accepted authentication queues its connection for reading.
            busy |= !rx.is_empty() || !self.reread.is_empty();
            busy |= self.run_timers();
            self.sweep_settling();
            // Gauges before the writes, so whatever a client sees is already counted, and
            // after, for connections the writes closed.
            self.publish_gauges();
            self.flush_dirty();
            self.send_pending_replies();
            let outbox_waiting = self.flush_outbox() | self.flush_store();
            self.publish_gauges();
            if self.stopping && self.conns.is_empty() {
                break;
            }
            // Accepting stopped at max_handshaking and handshakes have finished since: the
            // backlog gives no new event for connections already waiting in it.
            let max = self.limits.max_handshaking;
            busy |= self.accept_blocked
                && !self.stopping
                && (max == 0 || self.handshaking < max)
                && self.connect_bucket.ready(Instant::now());
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            let next_tick = self.started + self.limits.tick * (self.now as u32 + 1);
            let mut retry = if outbox_waiting {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(3600)
            };
            if let Some(at) = self.wake_at {
                retry = retry.min(at.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(m) => { self.update_clock(); self.handle_msg(m) }
                    None => self.begin_shutdown(),
                },
                guard = poll_fd.readable() => {
                    if let Ok(mut g) = guard { g.clear_ready(); }
                }
                _ = tokio::time::sleep_until(next_tick.into()) => {}
                _ = tokio::time::sleep(retry) => {}
            }
        }
        if let Some(store) = self.store.take() {
            // Hands over the last changes (sessions detached by the shutdown), waiting
            // for room if need be: the shard serves nobody any more.
            store.close();
        }
        tracing::debug!(shard = self.id, "shard stopped");
        Ok(())
    }

    fn update_clock(&mut self) {
        self.now_instant = Instant::now();
        let elapsed = self.now_instant - self.started;
        self.now = (elapsed.as_millis() / self.limits.tick.as_millis().max(1)) as u64;
    }

    fn now32(&self) -> u32 {
        self.now as u32
    }

    /// The shard clock in nanoseconds since start (inbound rate limits).
    fn now_ns(&self) -> u64 {
        (self.now_instant - self.started).as_nanos() as u64
    }

    fn wake_no_later_than(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// Handles ready sockets; true if more may be waiting.
    fn poll_sockets(&mut self) -> io::Result<bool> {
        self.wake_at = None;
        let reread = std::mem::take(&mut self.reread);
        for key in reread {
            self.on_readable(key as usize);
        }
        self.resume_paused();
        let retry_due = match self.accept_retry.check(Instant::now()) {
            RetryCheck::Due => true,
            RetryCheck::At(at) => {
                self.wake_no_later_than(at);
                false
            }
            RetryCheck::Idle => false,
        };
        if self.accept_pending || self.accept_blocked || retry_due {
            self.accept();
        }
        match self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        }
        let n = self.events.iter().count();
        let ready: Vec<(Token, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token(),
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                )
            })
            .collect();
        for (token, readable, writable) in ready {
            if token == LISTENER || token == TLS_LISTENER {
                self.accept();
                continue;
            }
            if writable {
                // Written in `flush_dirty` with the turn's other output, after the gauges
                // are published: a client never sees an answer before it is counted.
                self.mark_dirty(token.0);
            }
            if readable {
                self.on_readable(token.0);
            }
        }
        Ok(n == EVENTS_PER_TURN || !self.reread.is_empty() || self.accept_pending)
    }

    /// Accepts from both listeners while the overload limits allow. When they do not,
    /// the connections stay in the kernel backlog: they cost us no fd and no memory, and
    /// get in once the bucket refills or handshakes finish (see `[limits]` in
    /// gateway.toml for why this beats accepting and refusing with "server busy").
    fn accept(&mut self) {
        let was_blocked = self.accept_blocked;
        self.accept_pending = false;
        self.accept_blocked = false;
        // Each listener gets its own budget, so a storm on one does not starve the other.
        for tls in [false, true] {
            let mut budget = ACCEPTS_PER_TURN;
            loop {
                let exists = if tls {
                    self.tls_listener.is_some()
                } else {
                    self.listener.is_some()
                };
                if !exists {
                    break;
                }
                if budget == 0 {
                    self.accept_pending = true;
                    break;
                }
                if !self.may_accept(was_blocked) {
                    self.accept_blocked = true;
                    return;
                }
                let listener = if tls {
                    self.tls_listener.as_ref()
                } else {
                    self.listener.as_ref()
                };
                let Some(listener) = listener else {
                    break;
                };
                match listener.accept() {
                    Ok((socket, peer)) => {
                        budget -= 1;
                        self.accept_retry.on_accept(self.id);
                        self.on_accept(socket, peer, tls);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if out_of_fds(&e) => {
                        // The listener is edge-triggered: retry on a timer.
                        let now = Instant::now();
                        let at = self.accept_retry.on_error(now, &e, self.id, &self.metrics);
                        self.wake_no_later_than(at);
                        break;
                    }
                    Err(e) => {
                        // Anything else (e.g. ECONNABORTED) concerns that one connection.
                        tracing::warn!(shard = self.id, error = %e, "accept failed");
                        break;
                    }
                }
            }
        }
    }

    /// Whether the connect rate and the handshake cap let one more connection in.
    fn may_accept(&mut self, was_blocked: bool) -> bool {
        if self.stopping {
            return false;
        }
        let max = self.limits.max_handshaking;
        if max > 0 && self.handshaking >= max {
            if !was_blocked {
                ShardMetrics::add(&self.metrics.accept_paused_handshaking, 1);
                tracing::debug!(
                    shard = self.id,
                    handshaking = self.handshaking,
                    "max_handshaking reached, not accepting"
                );
            }
            return false;
        }
        if !self.connect_bucket.ready(Instant::now()) {
            if !was_blocked {
                ShardMetrics::add(&self.metrics.accept_paused_rate, 1);
                tracing::debug!(shard = self.id, "max_connect_rate reached, not accepting");
            }
            self.wake_no_later_than(Instant::now() + self.connect_bucket.wait());
            return false;
        }
        true
    }

    fn on_accept(&mut self, socket: TcpStream, peer: SocketAddr, tls: bool) {
        self.connect_bucket.take();
        let open = self.open_connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.limits.max_connections {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            self.metrics.refuse(RefuseReason::MaxConnections);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections reached");
            return; // dropping the socket closes it
        }
        // Behind a proxy the real address is known only from the header.
        let proxied = self.limits.proxy_protocol;
        if !proxied && !self.per_ip.acquire(peer.ip()) {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            self.metrics.refuse(RefuseReason::PerIp);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections_per_ip reached");
            return;
        }
        let state = if proxied {
            ConnState::ProxyHeader
        } else {
            ConnState::Handshake
        };
        let deadline_ticks = self.limits.connect_timeout_ticks;
        let Some(key) = self.insert_conn(socket, peer, state, deadline_ticks, self.now32()) else {
            if !proxied {
                self.per_ip.release(peer.ip());
            }
            return;
        };
        if tls {
            let Some(config) = self.tls_config.clone() else {
                return;
            };
            match rustls::ServerConnection::new(config) {
                Ok(mut t) => {
                    t.set_buffer_limit(Some(self.limits.tls_buffer));
                    let bufs = self.conns[key].bufs.get_or_insert_with(Default::default);
                    bufs.tls = Some(Box::new(t));
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, %peer, error = %e, "cannot start TLS");
                    self.close_conn(key, DisconnectReason::SocketError, None);
                }
            }
        }
    }

    /// Registers a socket and puts it in the slab with its one timer armed.
    fn insert_conn(
        &mut self,
        mut socket: TcpStream,
        peer: SocketAddr,
        state: ConnState,
        idle_ticks: u32,
        accepted_at: u32,
    ) -> Option<usize> {
        apply_socket_options(&socket, &self.config);
        let now = self.now32();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if key >= SESSION_TIMER as usize {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if let Err(e) = self.poll.registry().register(
            &mut socket,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(shard = self.id, %peer, error = %e, "cannot register connection");
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let timer = self
            .wheel
            .insert(u64::from(now) + u64::from(idle_ticks) + 1, key as u32);
        if state != ConnState::Active {
            self.handshaking += 1;
        }
        entry.insert(Conn {
            socket,
            peer: Peer::from(peer),
            session: NO_SESSION,
            timer,
            last_seen: now,
            idle_ticks,
            stall_since: 0,
            accepted_at,
            max_packet: u32::MAX,
            keep_alive: 0,
            window: self.limits.max_inflight,
            version: Version::V311,
            state,
            predictor: ReadSizePredictor::new(),
            dirty: false,
            congested: false,
            bufs: None,
        });
        Some(key)
    }

    /// Reads a ready connection: through rustls on a TLS connection, into the scratch
    /// buffer otherwise (and always for a PROXY header, which precedes the ClientHello).
    /// A connection over its inbound rate is not read at all until it is back under.
    fn on_readable(&mut self, key: usize) {
        for _ in 0..READS_PER_EVENT {
            let now_ns = self.now_ns();
            if self.backpressured() && self.holds_publish(key) {
                // The rest of a PUBLISH larger than one read waits too.
                self.hold_publisher(key);
                return;
            }
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.state == ConnState::Authenticating {
                // Read again once accepted (TCP backpressure meanwhile).
                return;
            }
            if conn.outbound_len() >= self.limits.high_watermark {
                // Answers pile up unread (say a PINGREQ flood from a peer that never
                // reads): leave its bytes in the kernel, so TCP backpressure stops the
                // peer, until `flush_conn` drains the output below the low watermark.
                return;
            }
            if conn.state == ConnState::Active {
                if let Some(b) = conn.bufs.as_ref() {
                    let over = self.limits.inbound.over_by(&b.rate, now_ns);
                    if over > 0 || !b.held.is_empty() {
                        self.pause_reads(key, over);
                        return;
                    }
                }
            }
            let state = conn.state;
            let tls = match conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) {
                Some(t) if state != ConnState::ProxyHeader => Some(t),
                _ => None,
            };
            let result = match tls {
                Some(t) => t.read_tls(&mut conn.socket),
                None => {
                    let want = conn.predictor.next_size().min(self.scratch.len());
                    conn.socket.read(&mut self.scratch[..want])
                }
            };
            let via_tls = state != ConnState::ProxyHeader && conn.is_tls();
            match result {
                Ok(0) => {
                    self.close_conn(key, DisconnectReason::CloseWait, None);
                    return;
                }
                Ok(n) => {
                    if !via_tls {
                        conn.predictor.record(n);
                    }
                    ShardMetrics::add(&self.metrics.bytes_received, n as u64);
                    if state == ConnState::Active {
                        if let Some(g) = self.limits.inbound.bytes {
                            let b = conn.bufs.get_or_insert_with(Default::default);
                            g.charge(&mut b.rate.bytes, now_ns, n as u64);
                        }
                    }
                    let alive = if via_tls {
                        self.tls_process(key)
                    } else if state == ConnState::ProxyHeader {
                        self.ingest_proxy(key, n)
                    } else {
                        self.ingest(key, n)
                    };
                    if !alive {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(shard = self.id, error = %e, "read failed");
                    self.close_conn(key, DisconnectReason::SocketError, None);
                    return;
                }
            }
        }
        self.reread.push(key as u32);
    }

    /// Stops reading a connection over its inbound rate: its bytes wait in the kernel
    /// and then in the client (TCP backpressure) until `resume_paused` reads it again.
    fn pause_reads(&mut self, key: usize, over_ns: u64) {
        if self.paused.insert(key as u32) {
            ShardMetrics::add(&self.metrics.rate_limit_pauses, 1);
            tracing::debug!(shard = self.id, client_id = %self.client_id_of(key), pause_ms = over_ns / 1_000_000, "inbound rate exceeded, pausing reads");
        }
        self.wake_no_later_than(self.now_instant + Duration::from_nanos(over_ns));
    }

    /// Reads again the paused connections that are back under their inbound rate.
    fn resume_paused(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let now_ns = self.now_ns();
        let keys: Vec<u32> = self.paused.drain().collect();
        for key in keys {
            let over = match self.conns.get(key as usize) {
                None => continue,
                Some(c) => c
                    .bufs
                    .as_ref()
                    .map_or(0, |b| self.limits.inbound.over_by(&b.rate, now_ns)),
            };
            if over > 0 {
                self.paused.insert(key);
                self.wake_no_later_than(self.now_instant + Duration::from_nanos(over));
            } else if self.backpressured() && self.holds_publish(key as usize) {
                self.paused.insert(key);
                self.wake_no_later_than(self.now_instant + backpressure::RECHECK);
            } else {
                self.resume(key as usize);
            }
        }
    }

    /// Handles what a paused connection holds (frames, then plaintext inside rustls) and
    /// reads it again, unless that puts it over its rate once more.
    fn resume(&mut self, key: usize) {
        if self.conns[key].state != ConnState::Active {
            // A key freed and reused since it was paused: not the paused connection.
            return;
        }
        let held = self.take_held(key);
        if !held.is_empty() {
            let alive = self.ingest_bytes(key, &held);
            self.pool.give(held, self.now);
            if !alive || self.is_holding(key) {
                return;
            }
        }
        if self.conns[key].is_tls() && (!self.tls_process(key) || self.is_holding(key)) {
            return;
        }
        self.on_readable(key);
    }

    /// Runs rustls over the ciphertext it holds, queues its handshake output, and feeds
    /// the plaintext to the MQTT decoder. False when the connection is gone.
    fn tls_process(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let Some(tls) = conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) else {
            return true;
        };
        if let Err(e) = tls.process_new_packets() {
            // rustls has queued an alert for the peer; one best-effort write of it.
            let _ = tls.write_tls(&mut conn.socket);
            ShardMetrics::add(&self.metrics.tls_failures, 1);
            tracing::info!(shard = self.id, peer = %conn.peer, error = %e, "TLS failed, closing");
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        }
        let mut plain = std::mem::take(&mut self.plain);
        let alive = loop {
            let Some(tls) = tls_of(&mut self.conns, key) else {
                break false;
            };
            match tls.reader().read(&mut plain) {
                // close_notify: the client ended the TLS session.
                Ok(0) => {
                    self.close_conn(key, DisconnectReason::CloseWait, None);
                    break false;
                }
                Ok(n) => {
                    if !self.ingest_bytes(key, &plain[..n]) {
                        break false;
                    }
                    if self.is_holding(key) {
                        // Paused: the rest of the plaintext waits inside rustls.
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) => {
                    tracing::debug!(shard = self.id, error = %e, "TLS read failed");
                    self.close_conn(key, DisconnectReason::SocketError, None);
                    break false;
                }
            }
        };
        self.plain = plain;
        if alive {
            self.mark_dirty(key);
        }
        alive
    }

    /// Feeds ciphertext that arrived outside rustls (after a PROXY header) to it.
    fn tls_feed(&mut self, key: usize, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(tls) = tls_of(&mut self.conns, key) else {
                return false;
            };
            if let Err(e) = tls.read_tls(&mut data) {
                ShardMetrics::add(&self.metrics.tls_failures, 1);
                tracing::info!(shard = self.id, error = %e, "TLS failed, closing");
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                return false;
            }
            if !self.tls_process(key) {
                return false;
            }
        }
        true
    }

    /// The `n` bytes just read into the scratch buffer, while the PROXY header is still
    /// expected. The header may arrive over several reads; it is bounded by
    /// `proxy_header_max_bytes`. False when the connection is gone.
    fn ingest_proxy(&mut self, key: usize, n: usize) -> bool {
        let mut buf = match self.conns[key].bufs.as_mut() {
            Some(b) if !b.inbuf.is_empty() => std::mem::take(&mut b.inbuf),
            _ => self.pool.take(n.min(self.limits.proxy_header_max)),
        };
        self.pool.reserve(&mut buf, n, self.now);
        buf.extend_from_slice(&self.scratch[..n]);
        let parsed = proxy::parse(&buf, self.limits.proxy_header_max);
        let (header, len) = match parsed {
            Ok(Some(h)) => h,
            Ok(None) => {
                self.put_inbuf(key, buf);
                return true;
            }
            Err(e) => {
                self.pool.give(buf, self.now);
                ShardMetrics::add(&self.metrics.proxy_header_errors, 1);
                tracing::info!(shard = self.id, peer = %self.conns[key].peer, error = %e, "bad PROXY header, closing");
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                return false;
            }
        };
        let socket_peer = self.conns[key].peer.addr();
        if !self.limits.proxy_trusted.trusts(socket_peer.ip()) {
            self.pool.give(buf, self.now);
            self.metrics.refuse(RefuseReason::ProxyUntrusted);
            tracing::info!(shard = self.id, peer = %socket_peer, "PROXY header from a peer not in mqtt.proxy_trusted, closing");
            self.close_conn(key, DisconnectReason::Refused, None);
            return false;
        }
        let conn = &mut self.conns[key];
        let peer = match header {
            ProxyHeader::Proxied(a) => a,
            ProxyHeader::Local => conn.peer.addr(),
        };
        if !self.per_ip.acquire(peer.ip()) {
            self.pool.give(buf, self.now);
            self.metrics.refuse(RefuseReason::PerIp);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections_per_ip reached");
            // Still in ProxyHeader state: close_conn releases no per-IP count.
            self.close_conn(key, DisconnectReason::Refused, None);
            return false;
        }
        conn.peer = Peer::from(peer);
        conn.state = ConnState::Handshake;
        let alive = if conn.is_tls() {
            self.tls_feed(key, &buf[len..])
        } else {
            self.ingest_bytes(key, &buf[len..])
        };
        self.pool.give(buf, self.now);
        alive
    }

    /// Decodes the `n` bytes just read into the scratch buffer, after completing any partial
    /// frame the connection holds. Returns false when the connection is gone (closed or
    /// handed to another shard).
    fn ingest(&mut self, key: usize, n: usize) -> bool {
        let scratch = std::mem::take(&mut self.scratch);
        let alive = self.ingest_bytes(key, &scratch[..n]);
        self.scratch = scratch;
        alive
    }

    fn ingest_bytes(&mut self, key: usize, mut data: &[u8]) -> bool {
        let max = self.limits.max_packet_size;
        let limited = self.limits.inbound.enabled() || self.limits.backpressure;
        if limited && self.is_holding(key) {
            // Paused with frames held: these bytes queue behind them, in order.
            let mut held = self.take_held(key);
            self.pool.reserve(&mut held, data.len(), self.now);
            held.extend_from_slice(data);
            self.put_held(key, held);
            return true;
        }
        // 1. Complete a partial frame held from an earlier read.
        let has_partial = self.conns[key]
            .bufs
            .as_ref()
            .is_some_and(|b| !b.inbuf.is_empty());
        if has_partial {
            let mut inbuf = match self.conns[key].bufs.as_mut() {
                Some(b) => std::mem::take(&mut b.inbuf),
                None => Vec::new(),
            };
            loop {
                match codec::frame_len(&inbuf, max) {
                    Err(e) => {
                        self.pool.give(inbuf, self.now);
                        return self.protocol_error(key, &e);
                    }
                    Ok(None) => {
                        // Header incomplete: take one more byte (headers are at most 5).
                        let Some((&b, rest)) = data.split_first() else {
                            self.put_inbuf(key, inbuf);
                            return true;
                        };
                        self.pool.reserve(&mut inbuf, 1, self.now);
                        inbuf.push(b);
                        data = rest;
                    }
                    Ok(Some(len)) => {
                        let need = len - inbuf.len().min(len);
                        let take = need.min(data.len());
                        self.pool.reserve(&mut inbuf, take, self.now);
                        inbuf.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if inbuf.len() < len {
                            self.put_inbuf(key, inbuf);
                            return true;
                        }
                        let alive = self.dispatch(key, &inbuf, data);
                        self.pool.give(inbuf, self.now);
                        if !alive {
                            return false;
                        }
                        break;
                    }
                }
            }
        }
        // 2. Every whole frame in place, straight from the scratch buffer.
        loop {
            if data.is_empty() {
                return true;
            }
            match codec::frame_len(data, max) {
                Err(e) => return self.protocol_error(key, &e),
                Ok(Some(len)) if len <= data.len() => {
                    if limited && self.conns[key].state == ConnState::Active {
                        let over = self.over_by(key);
                        let hold = data[0] >> 4 == 3 && self.backpressured();
                        if over > 0 || hold {
                            // Over the inbound rate, or a PUBLISH while subscribers are
                            // congested: keep the rest for later, read no more.
                            let mut held = self.pool.take(data.len());
                            held.extend_from_slice(data);
                            self.put_held(key, held);
                            if over > 0 {
                                self.pause_reads(key, over);
                            } else {
                                self.hold_publisher(key);
                            }
                            return true;
                        }
                    }
                    let (frame, rest) = data.split_at(len);
                    if !self.dispatch(key, frame, rest) {
                        return false;
                    }
                    data = rest;
                }
                Ok(known) => {
                    // 3. Only a trailing partial frame is copied out, into a pooled buffer
                    //    sized for the whole frame when its length is known.
                    let want = known.unwrap_or(data.len()).max(data.len());
                    let mut inbuf = self
                        .pool
                        .take(want.min(crate::buffer::MAX_CLASS).max(data.len()));
                    inbuf.extend_from_slice(data);
                    self.put_inbuf(key, inbuf);
                    return true;
                }
            }
        }
    }

    /// One whole frame to the MQTT layer, after charging a PUBLISH to the connection's
    /// inbound message rate (the debt pauses reads; the frame itself is never dropped).
    fn dispatch(&mut self, key: usize, frame: &[u8], rest: &[u8]) -> bool {
        if let Some(g) = self.limits.inbound.msgs {
            let now_ns = self.now_ns();
            let conn = &mut self.conns[key];
            if frame[0] >> 4 == 3 && conn.state == ConnState::Active {
                let b = conn.bufs.get_or_insert_with(Default::default);
                g.charge(&mut b.rate.msgs, now_ns, 1);
            }
        }
        self.handle_frame(key, frame, rest)
    }

    /// Nanoseconds until the connection is back under its inbound rate (0 = it is).
    fn over_by(&self, key: usize) -> u64 {
        self.conns[key]
            .bufs
            .as_ref()
            .map_or(0, |b| self.limits.inbound.over_by(&b.rate, self.now_ns()))
    }

    fn is_holding(&self, key: usize) -> bool {
        self.conns
            .get(key)
            .and_then(|c| c.bufs.as_ref())
            .is_some_and(|b| !b.held.is_empty())
    }

    fn take_held(&mut self, key: usize) -> Vec<u8> {
        match self.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) {
            Some(b) => std::mem::take(&mut b.held),
            None => Vec::new(),
        }
    }

    fn put_held(&mut self, key: usize, held: Vec<u8>) {
        let bufs = self.conns[key].bufs.get_or_insert_with(Default::default);
        bufs.held = held;
    }

    fn put_inbuf(&mut self, key: usize, inbuf: Vec<u8>) {
        let conn = &mut self.conns[key];
        let bufs = conn.bufs.get_or_insert_with(Default::default);
        bufs.inbuf = inbuf;
        self.release_idle_bufs(key);
    }

    /// Drops a connection's buffer box once it holds nothing.
    fn release_idle_bufs(&mut self, key: usize) {
        let now_ns = self.now_ns();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(b) = conn.bufs.as_mut() else {
            return;
        };
        if b.is_idle(now_ns) {
            if let Some(b) = conn.bufs.take() {
                let b = *b;
                self.pool.give(b.inbuf, self.now);
                self.pool.give(b.out, self.now);
            }
        } else if !b.settling && b.holds_only_debt() {
            // Only rate debt left (every read charges the byte rate): drop the box when
            // the debt has run out, or every connection that spoke once keeps ~110 bytes.
            b.settling = true;
            self.settling.push(key as u32);
        }
    }

    /// Once per tick: drops the buffer boxes whose rate debt has run out; keeps waiting on
    /// those still in debt; forgets those that got busy again (they come back here when
    /// they are idle once more).
    fn sweep_settling(&mut self) {
        if self.settling.is_empty() || self.settled_at == self.now {
            return;
        }
        self.settled_at = self.now;
        let now_ns = self.now_ns();
        let mut keys = std::mem::take(&mut self.settling);
        keys.retain(|&key| {
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return false;
            };
            let Some(b) = conn.bufs.as_mut().filter(|b| b.settling) else {
                return false;
            };
            if !b.holds_only_debt() {
                b.settling = false;
                return false;
            }
            if !b.rate.is_settled(now_ns) {
                return true;
            }
            if let Some(b) = conn.bufs.take() {
                let b = *b;
                self.pool.give(b.inbuf, self.now);
                self.pool.give(b.out, self.now);
            }
            false
        });
        self.settling = keys;
    }

    /// Closes a connection for a protocol error, telling an MQTT 5 client why.
    fn protocol_error(&mut self, key: usize, e: &codec::ProtocolError) -> bool {
        let conn = &self.conns[key];
        let client = self.client_id_of(key);
        tracing::info!(shard = self.id, client_id = %client, peer = %conn.peer, error = %e, "protocol error, closing");
        let reason = (conn.state == ConnState::Active).then(|| e.reason_code());
        self.close_conn(key, DisconnectReason::ProtocolError, reason);
        false
    }

    fn client_id_of(&self, key: usize) -> Arc<str> {
        match self.conns.get(key).map(|c| c.session) {
            Some(s) if s != NO_SESSION => self.sessions[s as usize].client_id.clone(),
            _ => Arc::from(""),
        }
    }

    /// Appends encoded output for a connection; it is written at the end of the turn.
    fn output(&mut self, key: usize, reserve: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let bufs = conn.bufs.get_or_insert_with(Default::default);
        if bufs.out.capacity() == 0 {
            bufs.out = self.pool.take(reserve);
        } else {
            self.pool.reserve(&mut bufs.out, reserve, self.now);
        }
        encode(&mut bufs.out);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key as u32);
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty && conn.outbound_len() > 0 {
                conn.dirty = true;
                self.dirty.push(key as u32);
            }
        }
    }

    fn flush_dirty(&mut self) {
        // Flushing can refill windows and dirty connections again; the windows bound it.
        while let Some(key) = self.dirty.pop() {
            if let Some(c) = self.conns.get_mut(key as usize) {
                c.dirty = false;
                self.flush_conn(key as usize);
            }
        }
    }

    /// Writes what the socket takes. A socket that stops taking bytes starts the
    /// write-stall clock; draining below the low watermark refills the in-flight window.
    fn flush_conn(&mut self, key: usize) {
        let now = self.now32();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(bufs) = conn.bufs.as_mut() else {
            return;
        };
        let pending_before = bufs.out.len() - bufs.out_pos;
        let mut failed = false;
        if let Some(tls) = bufs.tls.as_mut() {
            // Plaintext into rustls as far as its buffer limit takes it, ciphertext out.
            loop {
                if bufs.out_pos < bufs.out.len() {
                    match tls.writer().write(&bufs.out[bufs.out_pos..]) {
                        Ok(n) => bufs.out_pos += n,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if !tls.wants_write() {
                    break;
                }
                match tls.write_tls(&mut conn.socket) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => ShardMetrics::add(&self.metrics.bytes_sent, n as u64),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }
        while bufs.tls.is_none() && bufs.out_pos < bufs.out.len() {
            match conn.socket.write(&bufs.out[bufs.out_pos..]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    bufs.out_pos += n;
                    ShardMetrics::add(&self.metrics.bytes_sent, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.close_conn(key, DisconnectReason::SocketError, None);
            return;
        }
        let tls_pending = bufs.tls.as_ref().is_some_and(|t| t.wants_write());
        let pending = bufs.out.len() - bufs.out_pos + usize::from(tls_pending);
        if pending_before > self.limits.low_watermark && pending <= self.limits.low_watermark {
            // Reading may have stopped at the high watermark (`on_readable`); with
            // edge-triggered readiness no new event comes for bytes already waiting.
            self.reread.push(key as u32);
        }
        if pending == 0 {
            bufs.out.clear();
            bufs.out_pos = 0;
            let out = std::mem::take(&mut bufs.out);
            self.pool.give(out, self.now);
            conn.stall_since = 0;
        } else {
            // Keep the unsent tail at the front so the buffer does not creep.
            if bufs.out_pos > bufs.out.len() / 2 {
                bufs.out.drain(..bufs.out_pos);
                bufs.out_pos = 0;
            }
            // A congested connection (backpressure) must drain below the low watermark
            // within the stall timeout, or one trickling reader would pace every
            // publisher for ever; otherwise any bytes out show a slow socket, not a
            // stalled one.
            let pacing = conn.congested && pending > self.limits.low_watermark;
            if conn.stall_since != 0 && pending < pending_before && !pacing {
                // The clock restarts (the wheel entry re-arms lazily when it fires early).
                conn.stall_since = now + 1;
            } else if conn.stall_since == 0 {
                conn.stall_since = now + 1;
                let stall_deadline = u64::from(now) + u64::from(self.limits.write_stall_ticks) + 1;
                let timer = conn.timer;
                if self
                    .wheel
                    .deadline(timer)
                    .is_some_and(|d| d > stall_deadline)
                {
                    self.wheel.reset(timer, stall_deadline);
                }
            }
        }
        let session = conn.session;
        if pending <= self.limits.low_watermark {
            self.clear_congested(key);
        }
        self.release_idle_bufs(key);
        if pending < self.limits.low_watermark && session != NO_SESSION {
            self.refill(session as usize);
        }
    }

    /// The deadline of a connection's single timer.
    fn conn_deadline(&self, c: &Conn) -> u64 {
        let idle = u64::from(c.last_seen) + u64::from(c.idle_ticks) + 1;
        if c.stall_since != 0 {
            let stall = u64::from(c.stall_since - 1) + u64::from(self.limits.write_stall_ticks) + 1;
            idle.min(stall)
        } else {
            idle
        }
    }

    /// Fires due timers in batches of `expiry_batch`; true if more are due.
    fn run_timers(&mut self) -> bool {
        let mut fired = std::mem::take(&mut self.fired);
        fired.clear();
        let more = self
            .wheel
            .advance(self.now, self.limits.expiry_batch, &mut fired);
        for &(id, payload) in &fired {
            if payload & SESSION_TIMER != 0 {
                self.on_session_timer((payload & !SESSION_TIMER) as usize, id);
            } else {
                self.on_conn_timer(payload as usize, id);
            }
        }
        self.fired = fired;
        if !more {
            self.pool.shrink(self.now);
        }
        self.timers_pending = more;
        more
    }

    /// Lazy re-arm: traffic only moved `last_seen`; act only if the deadline really passed.
    fn on_conn_timer(&mut self, key: usize, id: TimerId) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.timer != id {
            return;
        }
        let deadline = self.conn_deadline(conn);
        if deadline > self.now {
            let timer = self.wheel.insert(deadline, key as u32);
            self.conns[key].timer = timer;
            // Forget inbound rate debt that has run out (an idle connection keeps no box).
            self.release_idle_bufs(key);
            return;
        }
        let stalled = conn.stall_since != 0
            && u64::from(conn.stall_since - 1) + u64::from(self.limits.write_stall_ticks)
                < self.now;
        let handshake = conn.state != ConnState::Active;
        if !stalled && !handshake && self.paused.contains(&(key as u32)) {
            // We stopped reading it (inbound rate, backpressure): its PINGREQs wait in
            // our buffer or the kernel, so silence is ours, not the client's.
            let now = self.now32();
            self.conns[key].last_seen = now;
            let deadline = self.conn_deadline(&self.conns[key]);
            let timer = self.wheel.insert(deadline, key as u32);
            self.conns[key].timer = timer;
            return;
        }
        // The fired timer is gone from the wheel; make sure close does not cancel a reused id.
        self.conns[key].timer = TimerId::default();
        if stalled {
            self.close_conn(key, DisconnectReason::WriteStall, None);
        } else if handshake {
            self.close_conn(key, DisconnectReason::ConnectTimeout, None);
        } else {
            self.close_conn(
                key,
                DisconnectReason::Keepalive,
                Some(codec::reason::KEEP_ALIVE_TIMEOUT),
            );
        }
    }

    /// The one exit of every connection: removes it from the slab and the poll, cancels its
    /// timer, returns its buffers, detaches its session (will, expiry) and counts why.
    fn close_conn(&mut self, key: usize, reason: DisconnectReason, v5_reason: Option<u8>) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if conn.congested {
            self.uncount_congested();
        }
        if conn.state == ConnState::Authenticating {
            self.auth_pending.remove(&key);
        }
        if let (Some(code), Version::V5, ConnState::Active) = (v5_reason, conn.version, conn.state)
        {
            // One best-effort, non-blocking write of any pending output plus the DISCONNECT.
            let mut out = match conn.bufs.as_mut() {
                Some(b) => b.out.split_off(b.out_pos),
                None => Vec::new(),
            };
            codec::encode_disconnect(&mut out, code, None);
            let written = match conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) {
                Some(tls) => tls.writer().write_all(&out).is_ok(),
                None => conn.socket.write(&out).is_ok(),
            };
            if written {
                self.metrics.packet_out(14);
            }
        }
        if let Some(tls) = conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) {
            // Best effort: what rustls holds (a DISCONNECT, an alert) and close_notify.
            tls.send_close_notify();
            let _ = tls.write_tls(&mut conn.socket);
        }
        if conn.state != ConnState::Active {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        self.paused.remove(&(key as u32));
        if conn.state != ConnState::ProxyHeader {
            self.per_ip.release(conn.peer.addr().ip());
        }
        let _ = self.poll.registry().deregister(&mut conn.socket);
        self.wheel.cancel(conn.timer);
        if let Some(b) = conn.bufs.take() {
            let b = *b;
            self.pool.give(b.inbuf, self.now);
            self.pool.give(b.out, self.now);
            self.pool.give(b.held, self.now);
        }
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
        let connect_read = !matches!(conn.state, ConnState::ProxyHeader | ConnState::Handshake);
        let reason = reason.counted(connect_read);
        self.metrics.disconnect(reason);
        let accepted = self.started + self.limits.tick * conn.accepted_at;
        self.metrics.observe_connection_age(
            self.now_instant
                .saturating_duration_since(accepted)
                .as_secs_f64(),
        );
        let client_id = if conn.session != NO_SESSION {
            let s = conn.session as usize;
            let id = self.sessions[s].client_id.clone();
            let will = !matches!(
                reason,
                DisconnectReason::Client | DisconnectReason::Shutdown
            );
            self.detach_session(s, will);
            id
        } else {
            Arc::from("")
        };
        tracing::debug!(shard = self.id, client_id = %client_id, peer = %conn.peer, reason = reason.as_str(), "connection closed");
    }

    fn handle_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Handoff(h) => self.adopt(*h),
            ShardMsg::Publish(batch) => {
                for m in batch {
                    self.accept_remote(&m);
                }
            }
            ShardMsg::Push { items, reply } => self.on_push(items, reply),
            ShardMsg::PushTopic { msg, reply } => self.on_push_topic(msg, reply),
            ShardMsg::ClientInfo { client_id, reply } => {
                let _ = reply.send(self.client_info(&client_id));
            }
            ShardMsg::Kick {
                client_id,
                clear_session,
                reply,
            } => {
                let _ = reply.send(self.kick(&client_id, clear_session));
            }
            ShardMsg::Shutdown => self.begin_shutdown(),
            ShardMsg::SharedJoin(m) => self.on_shared_join(*m),
            ShardMsg::SharedLeave { key, client_id } => self.on_shared_leave(&key, &client_id),
            ShardMsg::DeliverShared(d) => self.on_deliver_shared(*d),
            ShardMsg::SharedBounce(b) => self.on_shared_bounce(*b),
            ShardMsg::AuthDone(d) => self.on_auth_done(*d),
        }
    }

    /// Takes over a connection whose CONNECT another shard read.
    fn adopt(&mut self, h: Handoff) {
        if self.stopping {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            self.per_ip.release(h.peer.ip());
            return;
        }
        let elapsed = self.now_instant.saturating_duration_since(h.accepted_at);
        let accepted_at = self
            .now32()
            .saturating_sub(self.limits.ticks(elapsed.as_secs_f64()));
        // The connect timeout runs from the accept on the other shard, not from now.
        let idle = self
            .limits
            .connect_timeout_ticks
            .saturating_sub(self.now32() - accepted_at);
        let Some(key) = self.insert_conn(h.socket, h.peer, ConnState::Handshake, idle, accepted_at)
        else {
            self.per_ip.release(h.peer.ip());
            return;
        };
        let tls = h.tls.is_some();
        if tls {
            self.conns[key]
                .bufs
                .get_or_insert_with(Default::default)
                .tls = h.tls;
        }
        let mut alive = self.on_connect(key, h.connect, false, &h.rest);
        if alive && !h.rest.is_empty() {
            alive = self.ingest_bytes(key, &h.rest);
        }
        if alive && tls {
            // Plaintext rustls decrypted after the CONNECT is still inside it.
            self.tls_process(key);
        }
    }

    fn begin_shutdown(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        for mut l in [self.listener.take(), self.tls_listener.take()]
            .into_iter()
            .flatten()
        {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_conn(
                key,
                DisconnectReason::Shutdown,
                Some(codec::reason::SERVER_SHUTTING_DOWN),
            );
        }
    }

    /// Sends each other shard its batch of messages; true if some must be retried.
    fn flush_outbox(&mut self) -> bool {
        let mut waiting = self.flush_ctl();
        self.outbox_blocked = false;
        for shard in 0..self.outbox.len() {
            if self.outbox[shard].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outbox[shard]);
            if let Err(ShardMsg::Publish(batch)) =
                self.mailboxes.try_send(shard, ShardMsg::Publish(batch))
            {
                // Keep it for the next turn, but never more than a mailbox's worth
                // (with backpressure no PUBLISH is read meanwhile, so it stops growing).
                let cap = self.config.shards.mailbox_capacity as usize;
                let mut batch = batch;
                self.outbox_blocked = true;
                if batch.len() > cap && !self.limits.backpressure {
                    let excess = batch.len() - cap;
                    batch.drain(..excess);
                    self.metrics
                        .drop_msg(crate::metrics::DropReason::MailboxFull, excess as u64);
                }
                self.outbox[shard] = batch;
                waiting = true;
            }
        }
        waiting
    }

    fn publish_gauges(&mut self) {
        let m = &self.metrics;
        ShardMetrics::set(&m.connections, self.conns.len() as u64);
        ShardMetrics::set(&m.sessions, self.sessions.len() as u64);
        ShardMetrics::set(&m.subscriptions, self.subs_total);
        ShardMetrics::set(&m.queued_messages, self.queued_total);
        ShardMetrics::set(&m.wheel_entries, self.wheel.len() as u64);
        ShardMetrics::set(&m.congested_connections, u64::from(self.congested));
        let p = self.pool.stats();
        ShardMetrics::set(&m.pool_pooled_bytes, p.pooled_bytes as u64);
        ShardMetrics::set(&m.pool_lent_bytes, p.lent_bytes as u64);
        ShardMetrics::set(&m.pool_hits, p.hits);
        ShardMetrics::set(&m.pool_misses, p.misses);
    }
}

/// The rustls session of connection `key`, if it is a live TLS connection.
fn tls_of(conns: &mut Slab<Conn>, key: usize) -> Option<&mut rustls::ServerConnection> {
    conns
        .get_mut(key)
        .and_then(|c| c.bufs.as_mut())
        .and_then(|b| b.tls.as_deref_mut())
}

/// Pins the calling thread to core `id` modulo the cores this process may use.
fn pin_to_core(id: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0, ..)
    // affects only the calling thread.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(id % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !ok {
        tracing::warn!(shard = id, error = %io::Error::last_os_error(), "cannot pin shard to its core");
    }
}

/// TCP options from `[tcp]`: no delay, keepalive probes and TCP_USER_TIMEOUT to find
/// half-open peers, and buffer sizes when set.
fn apply_socket_options(socket: &TcpStream, config: &Config) {
    let t = &config.tcp;
    let s = socket2::SockRef::from(socket);
    let _ = s.set_nodelay(t.nodelay);
    if t.keepalive_idle_secs > 0 {
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(t.keepalive_idle_secs as u64))
            .with_interval(Duration::from_secs(t.keepalive_interval_secs as u64))
            .with_retries(t.keepalive_retries as u32);
        let _ = s.set_tcp_keepalive(&ka);
    }
    if t.user_timeout_secs > 0 {
        let _ = s.set_tcp_user_timeout(Some(Duration::from_secs(t.user_timeout_secs as u64)));
    }
    if t.send_buffer_bytes > 0 {
        let _ = s.set_send_buffer_size(t.send_buffer_bytes as usize);
    }
    if t.recv_buffer_bytes > 0 {
        let _ = s.set_recv_buffer_size(t.recv_buffer_bytes as usize);
    }
}
