//! An IO shard: one OS thread that owns its connections, sessions and timers outright.
//!
//! The shard runs a current-thread tokio runtime only for its mailbox and its tick. Its
//! connections are driven by the shard's own `mio::Poll`, whose epoll fd is registered once
//! with that runtime (`AsyncFd`, nested epoll). So a connection costs a slab entry, not a
//! task, a tokio stream or a timer (see `docs/ARCHITECTURE.md`).
//!
//! One loop turn: drain ready sockets (bounded), drain the mailbox (bounded), fire due
//! timers (bounded batches), flush every connection that got output this turn with one
//! write each, and hand cross-shard messages to the other shards in one batch each. Only
//! when nothing is left does the shard wait.
//!
//! The shard is a composition of owned parts, each in its own file: the `wire` (poll,
//! listeners, connection slab, buffers), `accept` (admission: overload limits,
//! handshakes), `sessions`, `routing` (subscription index, retained messages, shared
//! groups, outboxes), the `clock`, `timers` (the wheel), the `services` it calls on
//! (auth, ACL, store, metrics, mailboxes) and its `settings`. This file keeps the loop
//! turn and the mailbox dispatch.
//!
//! A connection's reads go through `read`: the `gate` decides whether to read, the
//! `transport` turns socket reads into plaintext, the `framer` cuts it into frames.
//! Its writes go through `write`; a connection ended with something to tell it lingers
//! in `closing` (the close grace) before its socket is closed. The per-packet MQTT logic is in `mqtt` (by packet
//! family; the CONNECT terms in `negotiate`); routing and delivery in `delivery` and
//! `shared`; push API requests in `push`; the durable store's side in `durable`, and the
//! MQTT acknowledgements that wait for its commits in `held`; flow control from congested
//! subscribers back to each publisher in `pacing`.

mod accept;
mod adopt;
mod clock;
mod closing;
mod conn;
mod delivery;
mod durable;
mod events;
mod fleet;
mod fleet_route;
mod framer;
mod gate;
mod handshake;
mod held;
mod listing;
mod mqtt;
mod negotiate;
mod pacing;
mod packet;
mod push;
mod read;
mod records;
mod reload;
mod retained;
mod routing;
mod services;
mod sessions;
mod settings;
mod shared;
#[cfg(test)]
mod sim;
mod timers;
mod transport;
mod websocket;
mod wire;
mod write;

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::buffer::BufferPool;
use crate::codec;
use crate::config::Config;
use crate::limits::{PerIpLimit, TokenBucket};
use crate::listen::{AcceptRetry, RetryCheck};
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::message::Message;
use crate::metrics::{DisconnectReason, ShardMetrics};

use accept::{Admission, Admit};
use clock::Clock;
pub use clock::ClockStart;
pub use conn::{Conn, ConnBufs, ConnState, Link, Peer};
/// How a shard cuts a listing into pages (the fleet's tests page through it too).
#[cfg(test)]
pub(crate) use listing::page as list_page;
use routing::Routing;
use services::Services;
use sessions::Sessions;
pub use settings::Settings;
use timers::Timers;
pub use websocket::WsBusy;
use wire::Wire;

const LISTENER: Token = Token(usize::MAX);
const TLS_LISTENER: Token = Token(usize::MAX - 1);
const WS_LISTENER: Token = Token(usize::MAX - 2);
const WSS_LISTENER: Token = Token(usize::MAX - 3);
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

/// Everything a shard is started with.
pub struct ShardContext {
    pub id: usize,
    /// When the shards' clocks start (the same for all of them).
    pub clock_start: ClockStart,
    /// Read once, into the shard's [`Settings`] and ACL.
    pub config: Arc<Config>,
    pub listener: std::net::TcpListener,
    /// This shard's SO_REUSEPORT socket on `tls_listen`, with the rustls configuration.
    pub tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// This shard's SO_REUSEPORT sockets on `ws_listen` and `wss_listen` (the latter with
    /// the same rustls configuration as `tls_listen`).
    pub ws: Option<std::net::TcpListener>,
    pub wss: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// Connections per IP across all shards (`max_connections_per_ip`).
    pub per_ip: Arc<PerIpLimit>,
    pub mailbox: mpsc::Receiver<ShardMsg>,
    pub mailboxes: Mailboxes,
    pub metrics: Arc<ShardMetrics>,
    /// Connections open across the whole gateway (for `max_connections`).
    pub open_connections: Arc<AtomicUsize>,
    /// Shards whose loop has not ended yet (see `Shard::drain_after_stop`).
    pub shards_running: Arc<AtomicUsize>,
    /// The authentication providers, shared by all shards.
    pub auth: Arc<crate::auth::Authenticator>,
    /// The business runtime, where slow authentication runs.
    pub business: tokio::runtime::Handle,
    /// This shard's side of the durable store (`None` when `[store] enabled = false`).
    pub store: Option<crate::store::StoreHandle>,
    /// Stored sessions homed on this shard, restored before the first accept.
    pub restore: Vec<crate::store::StoredSession>,
    /// The last run crashed (`Store::previous_run_crashed`): the fleet's copies of the
    /// restored sessions' wills are the crash's (`cluster::session_leftover`).
    pub restored_after_crash: bool,
    /// The fleet's copy of the persistent sessions (`[cluster]` on, with the store).
    pub sessions: Option<Arc<crate::cluster::sessions::SessionStore>>,
    /// Stored retained messages (every shard keeps them all).
    pub retained: Arc<Vec<Arc<Message>>>,
    /// Told once the shard has restored its sessions and is about to accept.
    pub ready: std::sync::mpsc::Sender<usize>,
    /// Where the shard's events to the backend go (see `events.rs`).
    pub events: crate::events::EventSender,
    /// The fleet's message routing (`[cluster] enabled`; see `fleet_route.rs`).
    pub fleet_route: Option<crate::cluster::routing::RouteHandle>,
    /// The TLS handshake threads (`None` with `[limits] tls_handshakes_on_shards`).
    pub handshakers: Option<crate::tls::handshaker::Handshakers>,
}

/// One shard: its parts, each owning its state, and the loop that drives them.
pub struct Shard {
    id: usize,
    settings: Settings,
    /// Sockets, connections and their buffers.
    wire: Wire,
    /// Accepting and the handshakes under way.
    admission: Admission,
    sessions: Sessions,
    routing: Routing,
    clock: Clock,
    timers: Timers,
    services: Services,
    /// Congested subscribers and the publishers they pace (see `pacing.rs`).
    pacing: pacing::Pacing,
    /// When the loop must wake for a paused connection or the connect bucket.
    wake_at: Option<Instant>,
    stopping: bool,
    /// Answers to the business pool, sent after this turn's writes.
    pending_replies: Vec<push::PendingReply>,
    /// Orders the events of this shard's clients (see `events.rs`).
    seq: crate::events::SeqGen,
    /// MQTT acknowledgements waiting for the store commit (see `held.rs`).
    held: held::Held,
    /// SUBACKs waiting for the fleet to hold their filters (see `fleet_route.rs`).
    fleet_subacks: fleet_route::FleetSubacks,
    /// While stopping: messages (the stop's wills) the full fleet routing queue refused,
    /// offered again each turn and drain step (`fleet_route.rs`).
    fleet_backlog: VecDeque<Arc<Message>>,
    /// Set while a stale copy of a session ends (`fleet.rs`, `end_stale_copy`): its end
    /// is this node's file's only, the fleet's copy being another node's.
    ending_stale_copy: bool,
}

/// What one loop turn left behind.
struct TurnEnd {
    /// More may be waiting: turn again before waiting.
    busy: bool,
    /// A batch for another shard found its mailbox full.
    outbox_waiting: bool,
    /// Shutting down and every connection is closed: the loop ends.
    stopped: bool,
}

/// True when tokio has seen the shard's epoll fd readable since the turn last cleared it;
/// it is cleared here, as the turn that follows polls the sockets.
async fn take_io_ready(fd: &AsyncFd<PollFd>) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match fd.poll_read_ready(cx) {
            std::task::Poll::Ready(Ok(mut g)) => {
                g.clear_ready();
                true
            }
            std::task::Poll::Ready(Err(_)) => true,
            std::task::Poll::Pending => false,
        })
    })
    .await
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
            let crashed = ctx.restored_after_crash;
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
            shard.restore(restore, &retained, crashed);
            drop(retained);
            let _ = ready.send(sessions);
            // tokio-metrics measures the shard's busy time per poll (gateway_shard_busy_ratio).
            let monitor = shard.services.metrics.monitor.clone();
            if let Err(e) = rt.block_on(monitor.instrument(shard.run(rx))) {
                tracing::error!(shard = id, error = %e, "shard stopped with an error");
            }
        })
}

impl Shard {
    fn new(ctx: ShardContext) -> io::Result<(Self, mpsc::Receiver<ShardMsg>)> {
        Self::with_clock(ctx, Clock::new)
    }

    /// A shard reading time from the clock `clock` makes for its tick (the simulation
    /// test gives it `Clock::manual`).
    fn with_clock(
        ctx: ShardContext,
        clock: fn(Duration, ClockStart) -> Clock,
    ) -> io::Result<(Self, mpsc::Receiver<ShardMsg>)> {
        let settings = Settings::from_config(&ctx.config);
        let acl = crate::acl::Acl::from_config(&ctx.config.acl)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let poll = Poll::new()?;
        ctx.listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(ctx.listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let register = |l: std::net::TcpListener, token| -> io::Result<TcpListener> {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry()
                .register(&mut l, token, Interest::READABLE)?;
            Ok(l)
        };
        let (tls_listener, mut tls_config) = match ctx.tls {
            Some((l, cfg)) => (Some(register(l, TLS_LISTENER)?), Some(cfg)),
            None => (None, None),
        };
        let ws_listener = ctx.ws.map(|l| register(l, WS_LISTENER)).transpose()?;
        let wss_listener = match ctx.wss {
            Some((l, cfg)) => {
                tls_config.get_or_insert(cfg);
                Some(register(l, WSS_LISTENER)?)
            }
            None => None,
        };
        let clock = clock(settings.tick, ctx.clock_start);
        let connect_bucket =
            TokenBucket::new(settings.connect_rate, settings.connect_burst, clock.read());
        let shards = ctx.mailboxes.len();
        let wire = Wire {
            poll,
            events: Events::with_capacity(EVENTS_PER_TURN),
            listener: Some(listener),
            tls_listener,
            ws_listener,
            wss_listener,
            plain: if tls_config.is_some() {
                vec![0; 16 * 1024]
            } else {
                Vec::new()
            },
            tls_config,
            records: Default::default(),
            conns: Slab::new(),
            pool: BufferPool::new(settings.pool),
            scratch: vec![0; settings.scratch_bytes],
            dirty: Vec::new(),
            reread: Vec::new(),
            tls_feeding: None,
            deferred_handoff: None,
            skip_io_poll: false,
            paused: HashSet::new(),
            settling: Vec::new(),
            settled_at: 0,
            closing: 0,
            output_bytes: 0,
        };
        let immediate = ctx.config.store.durability == crate::config::StoreDurability::Immediate;
        let held = held::Held::new(
            ctx.store
                .as_ref()
                .filter(|_| immediate)
                .map(|s| s.signal().clone()),
            shards,
        );
        let services = Services {
            auth: ctx.auth,
            business: ctx.business,
            acl,
            store: ctx.store,
            metrics: ctx.metrics,
            mailboxes: ctx.mailboxes,
            per_ip: ctx.per_ip,
            open_connections: ctx.open_connections,
            shards_running: ctx.shards_running,
            events: ctx.events,
            sessions: ctx.sessions,
            fleet_route: ctx.fleet_route,
            handshakers: ctx.handshakers,
            fleet_paced: Default::default(),
        };
        let admission = Admission::new(connect_bucket, AcceptRetry::new(settings.accept_retry));
        let routing = Routing::new(shards, &settings);
        Ok((
            Shard {
                id: ctx.id,
                clock,
                settings,
                wire,
                admission,
                sessions: Sessions::default(),
                routing,
                timers: Timers::new(),
                services,
                pacing: pacing::Pacing::new(shards),
                wake_at: None,
                stopping: false,
                pending_replies: Vec::new(),
                seq: Default::default(),
                held,
                fleet_subacks: Default::default(),
                fleet_backlog: VecDeque::new(),
                ending_stale_copy: false,
            },
            ctx.mailbox,
        ))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>) -> io::Result<()> {
        // SAFETY: the epoll fd belongs to `self.wire.poll`, which lives (inside `self`) until
        // this function returns; `poll_fd` is a local dropped before `self`, so the fd stays
        // open and unchanged for the whole registration.
        let poll_fd = unsafe {
            AsyncFd::register_with_interest(
                PollFd(self.wire.poll.as_raw_fd()),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(io::Error::from)?;
        tracing::debug!(shard = self.id, "shard started");
        loop {
            let turn = self.turn(&mut rx)?;
            if turn.stopped {
                break;
            }
            if turn.busy {
                tokio::task::yield_now().await;
                continue;
            }
            let next_tick = self.clock.instant_of(self.clock.now32() + 1);
            let mut retry = if turn.outbox_waiting {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(3600)
            };
            if let Some(at) = self.wake_at {
                retry = retry.min(at.saturating_duration_since(self.clock.read()));
            }
            let woke_by_mailbox = tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(m) => { self.clock.update(); self.handle_msg(m); true }
                    None => { self.begin_shutdown(); false }
                },
                guard = poll_fd.readable() => {
                    if let Ok(mut g) = guard { g.clear_ready(); }
                    false
                }
                _ = tokio::time::sleep_until(next_tick.into()) => false,
                _ = tokio::time::sleep(retry) => false,
                _ = held::Held::committed(self.held.signal()) => false,
            };
            // Woken by another shard or the business pool alone: the sockets have nothing
            // new unless tokio has seen the poll's fd readable, so the turn skips asking.
            self.wire.skip_io_poll = woke_by_mailbox && !take_io_ready(&poll_fd).await;
        }
        // What other shards routed here in their last turns (see `drain_step`).
        let (deadline, mut counted_out) = (self.clock.read() + self.settings.drain_timeout, false);
        while !self.drain_step(&mut rx, &mut counted_out, deadline) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Counted, if any is left (one published after this shard counted itself out).
        self.flush_fleet_backlog(true);
        if let Some(store) = self.services.store.take() {
            // Hands over the last changes (sessions detached by the shutdown), waiting
            // for room if need be: the shard serves nobody any more.
            store.close();
        }
        tracing::debug!(shard = self.id, "shard stopped");
        Ok(())
    }

    /// Shards stop one by one, and a batch another shard routed in its last turns (a
    /// message its device was already acknowledged for) may still be on its way here, or
    /// still in that shard's outbox behind a full mailbox. So after its loop a shard keeps
    /// handling its mailbox and sending its outbox (`run` waits a millisecond between
    /// steps); once its outbox is empty it counts itself out of `shards_running`, and when
    /// every shard has, it takes what is left in its mailbox, hands the changes to the
    /// store and is done. At most `drain_timeout_secs` (`deadline`). True when done.
    fn drain_step(
        &mut self,
        rx: &mut mpsc::Receiver<ShardMsg>,
        counted_out: &mut bool,
        deadline: Instant,
    ) -> bool {
        let everyone_out =
            *counted_out && self.services.shards_running.load(Ordering::Acquire) == 0;
        while let Ok(msg) = rx.try_recv() {
            self.clock.update();
            self.handle_msg(msg);
        }
        let late = self.clock.read() >= deadline;
        let waiting = self.flush_outbox() | self.flush_fleet_backlog(late);
        self.flush_store();
        if !*counted_out && (!waiting || late) {
            self.services.shards_running.fetch_sub(1, Ordering::AcqRel);
            *counted_out = true;
        }
        everyone_out || late
    }

    /// One loop turn, without waiting: read the clock, drain ready sockets, the mailbox
    /// and due timers (each bounded), then write and hand on what the turn produced.
    /// `run` calls it and waits when it was not busy; the simulation test drives it alone.
    fn turn(&mut self, rx: &mut mpsc::Receiver<ShardMsg>) -> io::Result<TurnEnd> {
        self.clock.update();
        let per_turn = self.settings.tls_handshakes_per_turn;
        self.admission.handshake_budget.refill(per_turn);
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
        busy |= !rx.is_empty() || !self.wire.reread.is_empty();
        busy |= self.run_timers();
        self.wire.sweep_settling(&self.clock);
        // Gauges before the writes, so whatever a client sees is already counted, and
        // after, for connections the writes closed.
        self.publish_gauges();
        self.release_held();
        // Group joins and leaves reach their owner shard before the SUBACK or UNSUBACK
        // that follows them is written: a client publishing right after its SUBACK must
        // find the group known where the message goes (messages go after the writes).
        let ctl_waiting = (self.routing).flush_ctl(
            &self.services.mailboxes,
            &self.services.metrics,
            &self.settings,
        );
        self.flush_dirty();
        self.send_pending_replies();
        let outbox_waiting = ctl_waiting
            | self.flush_outbox()
            | self.flush_echoes()
            | self.flush_store()
            | self.flush_fleet();
        self.publish_gauges();
        // A publisher released this turn (by the mailbox or a drained subscriber) is read
        // again next turn, not at the next tick.
        busy |= self.pacing.resume_pending();
        if self.stopping && self.wire.conns.is_empty() {
            return Ok(TurnEnd {
                busy,
                outbox_waiting,
                stopped: true,
            });
        }
        // Accepting stopped at max_handshaking and handshakes have finished since: the
        // backlog gives no new event for connections already waiting in it.
        let max = self.settings.max_handshaking;
        busy |= self.admission.accept_blocked
            && !self.stopping
            && self
                .admission
                .admit(max, self.handshaking_elsewhere(), self.clock.read())
                == Admit::Yes;
        Ok(TurnEnd {
            busy,
            outbox_waiting,
            stopped: false,
        })
    }

    /// Hands this turn's message batches (stamped for the commit answers) to the other
    /// shards; true if some must be retried.
    fn flush_outbox(&mut self) -> bool {
        let stamp = self.route_stamp();
        let was_blocked = self.routing.outbox_blocked;
        let waiting = self.routing.flush(
            &self.services.mailboxes,
            &self.services.metrics,
            &self.settings,
            (self.id as u16, stamp),
        );
        self.outboxes_flushed(waiting);
        if was_blocked && !self.routing.outbox_blocked {
            self.outbox_unblocked();
        }
        self.flush_pace() | waiting
    }

    fn wake_no_later_than(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// Handles ready sockets; true if more may be waiting.
    fn poll_sockets(&mut self) -> io::Result<bool> {
        self.wake_at = None;
        let reread = std::mem::take(&mut self.wire.reread);
        for key in reread {
            self.on_readable(key as usize, false);
        }
        self.resume_paused();
        self.resume_released();
        let retry_due = match self.admission.accept_retry.check(self.clock.read()) {
            RetryCheck::Due => true,
            RetryCheck::At(at) => {
                self.wake_no_later_than(at);
                false
            }
            RetryCheck::Idle => false,
        };
        if self.admission.accept_pending || self.admission.accept_blocked || retry_due {
            self.accept();
        }
        let polled = if std::mem::take(&mut self.wire.skip_io_poll) {
            self.wire.events.clear();
            Ok(())
        } else {
            self.wire
                .poll
                .poll(&mut self.wire.events, Some(Duration::ZERO))
        };
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        }
        let n = self.wire.events.iter().count();
        let ready: Vec<(Token, bool, bool, bool)> = self
            .wire
            .events
            .iter()
            .map(|e| {
                let closed = e.is_read_closed() || e.is_error();
                (
                    e.token(),
                    e.is_readable() || closed,
                    closed,
                    e.is_writable(),
                )
            })
            .collect();
        for (token, readable, closed, writable) in ready {
            if [LISTENER, TLS_LISTENER, WS_LISTENER, WSS_LISTENER].contains(&token) {
                self.accept();
                continue;
            }
            if writable {
                // Written in `flush_dirty` with the turn's other output, after the gauges
                // are published: a client never sees an answer before it is counted.
                self.wire.mark_dirty(token.0);
            }
            if readable {
                self.on_readable(token.0, !closed);
            }
        }
        Ok(n == EVENTS_PER_TURN || !self.wire.reread.is_empty() || self.admission.accept_pending)
    }

    fn client_id_of(&self, key: usize) -> Arc<str> {
        match self.wire.conns.get(key).and_then(|c| c.session) {
            Some(s) => self.sessions[s.index()].client_id.clone(),
            _ => Arc::from(""),
        }
    }

    fn handle_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Handoff(h) => self.adopt(*h),
            ShardMsg::Handshaken(h) => self.adopt_handshaken(*h),
            ShardMsg::Publish {
                from,
                stamp,
                batch,
                bytes,
            } => {
                for m in batch {
                    self.accept_remote(&m);
                }
                self.services.mailboxes.routed_done(self.id, bytes);
                self.note_remote(from, stamp);
            }
            ShardMsg::Retained(updates) => self.on_retained(updates),
            ShardMsg::Pace(changes) => self.on_pace(changes),
            ShardMsg::Committed { from, stamp, ok } => self.on_committed(from, stamp, ok),
            ShardMsg::Push { items, reply } => self.on_push(items, reply),
            ShardMsg::PushTopic { msg, reply } => self.on_push_topic(msg, reply),
            ShardMsg::ClientInfo { client_id, reply } => {
                let _ = reply.send(self.client_info(&client_id));
            }
            ShardMsg::ListClients { req, online, reply } => {
                let _ = reply.send(self.list_clients(&req, online));
            }
            ShardMsg::ListRetained { req, filter, reply } => {
                let _ = reply.send(self.list_retained(&req, filter.as_deref()));
            }
            ShardMsg::DeleteRetained { topic, reply } => {
                let _ = reply.send(self.delete_retained(topic));
            }
            ShardMsg::Kick {
                client_id,
                clear_session,
                reply,
            } => {
                let _ = reply.send(self.kick(&client_id, clear_session));
            }
            ShardMsg::Shutdown => self.begin_shutdown(),
            ShardMsg::Acl { acl, applied } => self.replace_acl(*acl, applied),
            ShardMsg::SharedJoin(m) => self.on_shared_join(*m),
            ShardMsg::SharedLeave { key, client_id } => self.on_shared_leave(&key, &client_id),
            ShardMsg::DeliverShared(d) => self.on_deliver_shared(*d),
            ShardMsg::SharedBounce(b) => self.on_shared_bounce(*b),
            ShardMsg::AuthDone(d) => self.on_auth_done(*d),
            ShardMsg::TakenOver { client_id } => self.taken_over_elsewhere(&client_id),
            ShardMsg::StaleCopy { client_id } => {
                self.end_stale_copy(&client_id);
            }
            ShardMsg::FleetThrottled { client_id } => self.fleet_throttled(&client_id),
            ShardMsg::HandOver { client_id, reply } => {
                let _ = reply.send(self.hand_over(&client_id));
            }
            ShardMsg::TakeIn { stored, reply } => {
                let _ = reply.send(self.take_in(*stored));
            }
            ShardMsg::FleetPublish(batch) => self.on_fleet_publish(batch),
            ShardMsg::FleetRetained(msg) => self.order_retained(&msg),
            ShardMsg::FleetShared { key, msg } => self.on_fleet_shared(&key, &msg),
            // The turn's `release_held` looks at the confirmed tickets.
            ShardMsg::FleetSubscribed => {}
        }
    }

    fn begin_shutdown(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let listeners = [
            self.wire.listener.take(),
            self.wire.tls_listener.take(),
            self.wire.ws_listener.take(),
            self.wire.wss_listener.take(),
        ];
        for mut l in listeners.into_iter().flatten() {
            let _ = self.wire.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.wire.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_conn(
                key,
                DisconnectReason::Shutdown,
                Some(codec::reason::SERVER_SHUTTING_DOWN),
            );
        }
        if self.settings.wills_on_stop {
            self.publish_delayed_wills();
        }
    }

    fn publish_gauges(&mut self) {
        let m = &self.services.metrics;
        ShardMetrics::set(&m.connections, self.wire.conns.len() as u64);
        ShardMetrics::set(&m.sessions, self.sessions.len() as u64);
        ShardMetrics::set(&m.subscriptions, self.routing.subs_total);
        ShardMetrics::set(&m.queued_messages, self.sessions.queued_total);
        ShardMetrics::set(&m.wheel_entries, self.timers.wheel.len() as u64);
        ShardMetrics::set(&m.congested_connections, u64::from(self.pacing.congested));
        ShardMetrics::set(&m.paced_publishers, self.pacing.held_count() as u64);
        ShardMetrics::set(&m.output_bytes, self.wire.output_bytes as u64);
        ShardMetrics::set(&m.closing_connections, self.wire.closing as u64);
        ShardMetrics::set(&m.tls_record_connections, self.wire.records.len() as u64);
        let p = self.wire.pool.stats();
        ShardMetrics::set(&m.pool_pooled_bytes, p.pooled_bytes as u64);
        ShardMetrics::set(&m.pool_lent_bytes, p.lent_bytes as u64);
        ShardMetrics::set(&m.pool_hits, p.hits);
        ShardMetrics::set(&m.pool_misses, p.misses);
    }
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
