//! Admission: accepting connections within the overload limits (`max_connections`,
//! per IP, `max_connect_rate`, `max_handshaking`), registering them on the wire with
//! their one timer, and adopting connections other shards hand over.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::buffer::ReadSizePredictor;
use crate::codec::Version;
use crate::limits::TokenBucket;
use crate::listen::{out_of_fds, AcceptRetry};
use crate::mailbox::Handoff;
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};

use super::conn::{Conn, ConnState, Link, Peer};
use super::wire::give_bufs;
use super::{Shard, ACCEPTS_PER_TURN, SESSION_TIMER};

/// How soon a shard that stopped accepting at `max_handshaking`, with handshakes on the
/// TLS handshake threads, looks again.
const HANDSHAKES_ELSEWHERE_RECHECK: Duration = Duration::from_millis(5);

/// The state of accepting and of handshakes under way.
pub(super) struct Admission {
    /// A listener's accept budget ran out this turn: accept again next turn.
    pub accept_pending: bool,
    /// Accepting stopped by `max_connect_rate` or `max_handshaking`; retried every turn.
    pub accept_blocked: bool,
    pub connect_bucket: TokenBucket,
    /// Accepting failed for want of a file descriptor; retried on a timer.
    pub accept_retry: AcceptRetry,
    /// Connections accepted here and not yet CONNACKed (`max_handshaking`).
    pub handshaking: usize,
    /// TLS handshake steps left this turn (`tls_handshakes_per_turn`, `handshake.rs`).
    pub handshake_budget: super::handshake::HandshakeBudget,
    /// CONNECTs waiting for an authentication answer, by connection key. `close_conn`
    /// removes a connection's entry, so an answer finds either its own connection (same
    /// token) or nothing.
    pub auth_pending: HashMap<usize, super::mqtt::PendingAuth>,
    pub next_auth_token: u64,
    /// Numbers assigned client ids; also the state of the keep-alive jitter's draws.
    pub next_auto_id: u64,
}

impl Admission {
    pub(super) fn new(connect_bucket: TokenBucket, accept_retry: AcceptRetry) -> Self {
        Admission {
            accept_pending: false,
            accept_blocked: false,
            connect_bucket,
            accept_retry,
            handshaking: 0,
            handshake_budget: Default::default(),
            auth_pending: HashMap::new(),
            next_auth_token: 0,
            next_auto_id: 0,
        }
    }
}

/// A connection taken off the shard before its CONNECT was answered ([`Shard::detach`]).
pub(super) struct Detached {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub accepted_at: Instant,
    pub link: Link,
    pub tls: Option<Box<rustls::ServerConnection>>,
    pub tls_cursor: crate::tls::record::Cursor,
    pub tls_secrets: Option<Box<crate::tls::traffic_secret::LoggedSecrets>>,
    /// Ciphertext read and not yet given to rustls.
    pub tls_in: Vec<u8>,
    pub ws: Option<super::WsBusy>,
}

/// Whether one more connection may be accepted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Yes,
    /// `max_handshaking` connections are between accept and CONNACK.
    HandshakesFull,
    /// `max_connect_rate`: a token is there again after this long.
    RateLimited(Duration),
}

impl Admission {
    /// True when `max` (0 = unlimited) handshakes are under way: here, and `elsewhere`
    /// (on the TLS handshake threads).
    pub(super) fn handshakes_full(&self, max: usize, elsewhere: usize) -> bool {
        max > 0 && self.handshaking + elsewhere >= max
    }

    /// The overload limits' word on one more connection at `now`, with `elsewhere`
    /// handshakes of this shard's on the TLS handshake threads.
    pub(super) fn admit(
        &mut self,
        max_handshaking: usize,
        elsewhere: usize,
        now: Instant,
    ) -> Admit {
        if self.handshakes_full(max_handshaking, elsewhere) {
            Admit::HandshakesFull
        } else if !self.connect_bucket.ready(now) {
            Admit::RateLimited(self.connect_bucket.wait())
        } else {
            Admit::Yes
        }
    }
}

impl Shard {
    /// Whether the connect rate and the handshake cap let one more connection in; the
    /// first refusal after accepting is counted and logged.
    fn may_accept(&mut self, was_blocked: bool) -> bool {
        if self.stopping {
            return false;
        }
        let now = self.clock.read();
        let elsewhere = self.handshaking_elsewhere();
        match self
            .admission
            .admit(self.settings.max_handshaking, elsewhere, now)
        {
            Admit::Yes => true,
            Admit::HandshakesFull => {
                if !was_blocked {
                    self.log_accept_paused(true);
                }
                // A handshake ending on a TLS handshake thread by failure or time-out
                // sends no message that would wake this shard: look again soon.
                if elsewhere > 0 {
                    self.wake_no_later_than(now + HANDSHAKES_ELSEWHERE_RECHECK);
                }
                false
            }
            Admit::RateLimited(wait) => {
                if !was_blocked {
                    self.log_accept_paused(false);
                }
                self.wake_no_later_than(now + wait);
                false
            }
        }
    }

    /// Counts and logs that accepting stopped, at the handshake cap or the connect rate.
    fn log_accept_paused(&self, handshakes: bool) {
        let m = &self.services.metrics;
        if handshakes {
            ShardMetrics::add(&m.accept_paused_handshaking, 1);
            tracing::debug!(
                shard = self.id,
                handshaking = self.admission.handshaking,
                "max_handshaking reached, not accepting"
            );
        } else {
            ShardMetrics::add(&m.accept_paused_rate, 1);
            tracing::debug!(shard = self.id, "max_connect_rate reached, not accepting");
        }
    }

    /// Accepts from both listeners while the overload limits allow. When they do not,
    /// the connections stay in the kernel backlog: they cost us no fd and no memory, and
    /// get in once the bucket refills or handshakes finish (see `[limits]` in
    /// gateway.toml for why this beats accepting and refusing with "server busy").
    pub(super) fn accept(&mut self) {
        let was_blocked = self.admission.accept_blocked;
        self.admission.accept_pending = false;
        self.admission.accept_blocked = false;
        // Each listener gets its own budget, so a storm on one does not starve the others.
        for link in Link::ALL {
            let mut budget = ACCEPTS_PER_TURN;
            loop {
                if self.wire.listener_of(link).is_none() {
                    break;
                }
                if budget == 0 {
                    self.admission.accept_pending = true;
                    break;
                }
                if !self.may_accept(was_blocked) {
                    self.admission.accept_blocked = true;
                    return;
                }
                let Some(listener) = self.wire.listener_of(link) else {
                    break;
                };
                match listener.accept() {
                    Ok((socket, peer)) => {
                        budget -= 1;
                        self.admission.accept_retry.on_accept(self.id);
                        self.on_accept(socket, peer, link);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if out_of_fds(&e) => {
                        // The listener is edge-triggered: retry on a timer.
                        let now = self.clock.read();
                        let metrics = &self.services.metrics;
                        let at = self
                            .admission
                            .accept_retry
                            .on_error(now, &e, self.id, metrics);
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

    fn on_accept(&mut self, socket: TcpStream, peer: SocketAddr, link: Link) {
        self.admission.connect_bucket.take();
        let open = self
            .services
            .open_connections
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if open > self.settings.max_connections {
            self.services
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            self.services.metrics.refuse(RefuseReason::MaxConnections);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections reached");
            return; // dropping the socket closes it
        }
        // Behind a proxy the real address is known only from the header.
        let proxied = self.settings.proxy_protocol;
        if !proxied && !self.services.per_ip.acquire(peer.ip()) {
            self.services
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            self.services.metrics.refuse(RefuseReason::PerIp);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections_per_ip reached");
            return;
        }
        let state = if proxied {
            ConnState::ProxyHeader
        } else {
            ConnState::after_prefix(link)
        };
        let deadline_ticks = self.settings.connect_timeout_ticks;
        let now = self.clock.now32();
        let Some(key) = self.insert_conn(socket, peer, state, link, deadline_ticks, now) else {
            if !proxied {
                self.services.per_ip.release(peer.ip());
            }
            return;
        };
        if link.is_tls() {
            let Some(config) = self.wire.tls_config.clone() else {
                return;
            };
            match rustls::ServerConnection::new(config) {
                Ok(mut t) => {
                    t.set_buffer_limit(Some(self.settings.tls_buffer));
                    let bufs = self.wire.conns[key]
                        .bufs
                        .get_or_insert_with(Default::default);
                    bufs.tls = Some(Box::new(t));
                    if !proxied {
                        self.outsource_handshake(key, &[]);
                    }
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
        link: Link,
        idle_ticks: u32,
        accepted_at: u32,
    ) -> Option<usize> {
        self.settings.socket.apply(&socket);
        let now = self.clock.now32();
        let entry = self.wire.conns.vacant_entry();
        let key = entry.key();
        if key >= SESSION_TIMER as usize {
            self.services
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if let Err(e) = self.wire.poll.registry().register(
            &mut socket,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(shard = self.id, %peer, error = %e, "cannot register connection");
            self.services
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let timer = self
            .timers
            .wheel
            .insert(u64::from(now) + u64::from(idle_ticks) + 1, key as u32);
        if state != ConnState::Active {
            self.admission.handshaking += 1;
        }
        entry.insert(Conn {
            socket,
            peer: Peer::from(peer),
            session: None,
            timer,
            last_seen: now,
            idle_ticks,
            stall_since: 0,
            accepted_at,
            max_packet: u32::MAX,
            keep_alive: 0,
            window: self.settings.max_inflight,
            version: Version::V311,
            state,
            link,
            predictor: ReadSizePredictor::new(),
            dirty: false,
            congested: false,
            bufs: None,
        });
        Some(key)
    }

    /// Takes connection `key` off this shard, before its CONNECT is answered, to go on
    /// elsewhere (its home shard, a TLS handshake thread): deregistered, its timer
    /// cancelled, its buffers returned; what it carries comes out.
    pub(super) fn detach(&mut self, key: usize) -> Detached {
        let mut conn = self.wire.conns.remove(key);
        // Stop counting it here before the other side can count it.
        ShardMetrics::set(
            &self.services.metrics.connections,
            self.wire.conns.len() as u64,
        );
        self.admission.handshaking = self.admission.handshaking.saturating_sub(1);
        let _ = self.wire.poll.registry().deregister(&mut conn.socket);
        self.timers.wheel.cancel(conn.timer);
        let (mut tls, mut ws, mut tls_cursor) = (None, None, Default::default());
        let (mut tls_in, mut tls_secrets) = (Vec::new(), None);
        if let Some(mut b) = conn.bufs.take() {
            tls = b.tls.take();
            tls_cursor = b.tls_cursor;
            tls_secrets = b.tls_secrets.take();
            // A plain copy: the pool buffer stays with this shard's pool.
            tls_in = b.tls_in.to_vec();
            ws = b.ws.take();
            give_bufs(
                &mut self.wire.pool,
                &mut self.wire.output_bytes,
                *b,
                self.clock.now,
            );
        }
        Detached {
            socket: conn.socket,
            peer: conn.peer.addr(),
            accepted_at: self.clock.instant_of(conn.accepted_at),
            link: conn.link,
            tls,
            tls_cursor,
            tls_secrets,
            tls_in,
            ws,
        }
    }

    /// A connection no longer in this shard's slab (detached, or never adopted) is
    /// closed: its per-IP count and its place among the open connections go.
    pub(super) fn release_detached(&self, peer: SocketAddr) {
        self.services.per_ip.release(peer.ip());
        self.services
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Registers a connection accepted at `accepted_at` by another thread (another
    /// shard, a TLS handshake thread), in `state`; its connect timeout runs from that
    /// accept, not from now. `None` when it was closed instead (this shard is stopping,
    /// or cannot register it), its counts released.
    pub(super) fn adopt_socket(
        &mut self,
        socket: TcpStream,
        peer: SocketAddr,
        state: ConnState,
        link: Link,
        accepted: Instant,
    ) -> Option<usize> {
        if self.stopping {
            self.release_detached(peer);
            return None;
        }
        let accepted_at = self.clock.tick_of(accepted);
        let idle = self
            .settings
            .connect_timeout_ticks
            .saturating_sub(self.clock.now32() - accepted_at);
        let key = self.insert_conn(socket, peer, state, link, idle, accepted_at);
        if key.is_none() {
            self.services.per_ip.release(peer.ip());
        }
        key
    }

    /// Takes over a connection whose CONNECT another shard read.
    pub(super) fn adopt(&mut self, h: Handoff) {
        let state = ConnState::Handshake;
        let Some(key) = self.adopt_socket(h.socket, h.peer, state, h.link, h.accepted_at) else {
            return;
        };
        let tls = h.tls.is_some();
        if tls || h.ws.is_some() {
            let bufs = self.wire.conns[key]
                .bufs
                .get_or_insert_with(Default::default);
            bufs.tls = h.tls;
            bufs.tls_cursor = h.tls_cursor;
            bufs.tls_secrets = h.tls_secrets;
            bufs.ws = h.ws;
        }
        let mut alive = self.on_connect(key, h.connect, false, &h.rest);
        if alive && !h.rest.is_empty() {
            alive = self.ingest_bytes(key, &h.rest);
        }
        let mut carried = h.tls_in;
        if alive && tls {
            // Plaintext rustls decrypted after the CONNECT is still inside it; then the
            // ciphertext the other shard had read past it.
            if self.tls_process(key) {
                self.tls_carried(key, &mut carried);
            }
        } else if tls {
            // Its credentials are being checked: kept, read once it is let in
            // (`on_auth_done`).
            self.tls_carried(key, &mut carried);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_table() {
        let now = Instant::now();
        // Burst 1, 10 per second: one now, the next 100 ms later.
        let retry = AcceptRetry::new(Duration::from_millis(100));
        let mut a = Admission::new(TokenBucket::new(10, 1, now), retry);
        assert_eq!(a.admit(2, 0, now), Admit::Yes);
        a.connect_bucket.take();
        assert!(matches!(a.admit(2, 0, now), Admit::RateLimited(w) if w > Duration::ZERO));
        let later = now + Duration::from_millis(100);
        assert_eq!(a.admit(2, 0, later), Admit::Yes);
        a.handshaking = 2;
        assert_eq!(a.admit(2, 0, later), Admit::HandshakesFull);
        assert_eq!(a.admit(3, 0, later), Admit::Yes);
        assert_eq!(a.admit(0, 0, later), Admit::Yes, "0 = no handshake cap");
        assert!(a.handshakes_full(2, 0) && !a.handshakes_full(0, 0));
        // Handshakes on the TLS handshake threads count too.
        a.handshaking = 1;
        assert_eq!(a.admit(3, 1, later), Admit::Yes);
        assert_eq!(a.admit(3, 2, later), Admit::HandshakesFull);
        assert_eq!(a.admit(0, 9, later), Admit::Yes);
    }
}
