//! The transport: how a connection's socket reads become plaintext MQTT bytes.
//!
//! Five variants, chosen per read by [`Transport::of`]: plain TCP, the PROXY protocol
//! prefix (read in the clear before anything else, TLS included), TLS through rustls
//! (the handshake), TLS 1.3 and 1.2 records through our own record layer
//! once rustls is done (`records.rs`), and WebSocket (`websocket.rs`: the upgrade, then
//! frames decoded in place into the MQTT stream). The read path (`read.rs`) asks the
//! transport for one read, then hands the bytes on. On wss the layers stack:
//! socket → TLS → WebSocket → framer.

use std::io::{self, Read, Write};

use super::conn::{Conn, ConnState, Peer};
use super::Shard;
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};
use crate::proxy::{self, ProxyHeader};

/// How the next bytes of a connection are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transport {
    Plain,
    /// The PROXY header, expected before anything else (in the clear, even before TLS).
    ProxyPrefix,
    /// Ciphertext into rustls (`Shard::tls_feed`); plaintext comes out of
    /// [`Shard::tls_process`] (and goes through the WebSocket layer on wss).
    Tls,
    /// TLS 1.3 records opened by the record layer (`Shard::records_in`).
    Records,
    /// The HTTP upgrade, then WebSocket frames, in the clear (`ws_listen`).
    WebSocket,
}

impl Transport {
    pub(super) fn of(conn: &Conn) -> Self {
        if conn.state == ConnState::ProxyHeader {
            Transport::ProxyPrefix
        } else if conn.is_tls() {
            Transport::Tls
        } else if conn.link.is_tls() {
            Transport::Records
        } else if conn.link.is_ws() {
            Transport::WebSocket
        } else {
            Transport::Plain
        }
    }
}

/// What one read from the socket gave.
pub(super) struct ReadResult {
    pub via: Transport,
    pub result: io::Result<usize>,
    /// A read that got fewer bytes than it asked for: the socket's receive queue was
    /// empty at that moment, so (with edge-triggered readiness, which reports every later
    /// arrival) another read now would only return `WouldBlock`.
    pub short: bool,
}

/// One read from the socket into `scratch` (as much as the connection's read-size
/// predictor expects, which it then updates), whatever the transport. `Ok(0)` is the
/// peer's end of stream.
pub(super) fn read(conn: &mut Conn, scratch: &mut [u8]) -> ReadResult {
    let via = Transport::of(conn);
    let want = conn.predictor.next_size().min(scratch.len());
    let result = conn.socket.read(&mut scratch[..want]);
    let short = matches!(result, Ok(n) if n > 0 && n < want);
    if let Ok(n) = result {
        conn.predictor.record(n);
    }
    ReadResult { via, result, short }
}

/// The rustls session of connection `key`, if it is a live TLS connection.
pub(super) fn tls_of(
    conns: &mut slab::Slab<Conn>,
    key: usize,
) -> Option<&mut rustls::ServerConnection> {
    conns
        .get_mut(key)
        .and_then(|c| c.bufs.as_mut())
        .and_then(|b| b.tls.as_deref_mut())
}

impl Shard {
    /// Runs rustls over the ciphertext it holds, queues its handshake output, and feeds
    /// the plaintext to the framer. False when the connection is gone.
    pub(super) fn tls_process(&mut self, key: usize) -> bool {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return false;
        };
        let Some(tls) = conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) else {
            return true;
        };
        let was_handshaking = tls.is_handshaking();
        if was_handshaking {
            self.admission.handshake_budget.spend();
        }
        let processed = tls.process_new_packets().map(drop);
        let logged = crate::tls::traffic_secret::take_logged();
        if let Some(kind) = crate::tls::handshake_outcome(was_handshaking, tls, processed.is_err())
        {
            self.services.metrics.tls_handshake(kind);
        }
        if let Err(e) = processed {
            // rustls has queued an alert for the peer; one best-effort write of it.
            let _ = tls.write_tls(&mut conn.socket);
            ShardMetrics::add(&self.services.metrics.tls_failures, 1);
            tracing::info!(shard = self.id, peer = %conn.peer, error = %e, "TLS failed, closing");
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        }
        if let (Some(logged), Some(bufs)) = (logged, conn.bufs.as_mut()) {
            bufs.tls_secrets = Some(logged);
        }
        let mut plain = std::mem::take(&mut self.wire.plain);
        let alive = self.tls_drain(key, &mut plain);
        self.wire.plain = plain;
        if alive {
            self.wire.mark_dirty(key);
        }
        alive
    }

    /// Reads the plaintext rustls holds, in `plain`-sized pieces, into the read path,
    /// until it has none or the connection pauses. False when the connection is gone.
    fn tls_drain(&mut self, key: usize, plain: &mut [u8]) -> bool {
        loop {
            let Some(tls) = tls_of(&mut self.wire.conns, key) else {
                return false;
            };
            match tls.reader().read(plain) {
                // close_notify: the client ended the TLS session.
                Ok(0) => {
                    self.close_conn(key, DisconnectReason::CloseWait, None);
                    return false;
                }
                Ok(n) => {
                    if !self.ingest_plaintext(key, &mut plain[..n]) {
                        return false;
                    }
                    if self.wire.is_holding(key) {
                        // Paused: the rest of the plaintext waits inside rustls.
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    tracing::debug!(shard = self.id, error = %e, "TLS read failed");
                    self.close_conn(key, DisconnectReason::SocketError, None);
                    return false;
                }
            }
        }
    }

    /// The `n` bytes just read into the scratch buffer, while the PROXY header is still
    /// expected. The header may arrive over several reads; it is bounded by
    /// `proxy_header_max_bytes`. False when the connection is gone.
    pub(super) fn ingest_proxy(&mut self, key: usize, n: usize) -> bool {
        let mut buf = match self.wire.conns[key].bufs.as_mut() {
            Some(b) if !b.inbuf.is_empty() => std::mem::take(&mut b.inbuf),
            _ => self.wire.pool.take(n.min(self.settings.proxy_header_max)),
        };
        self.wire.pool.reserve(&mut buf, n, self.clock.now);
        buf.extend_from_slice(&self.wire.scratch[..n]);
        let (header, len) = match proxy::parse(&buf, self.settings.proxy_header_max) {
            Ok(Some(h)) => h,
            Ok(None) => {
                self.wire.put_inbuf(&self.clock, key, buf);
                return true;
            }
            Err(e) => {
                self.wire.pool.give(buf, self.clock.now);
                ShardMetrics::add(&self.services.metrics.proxy_header_errors, 1);
                tracing::info!(shard = self.id, peer = %self.wire.conns[key].peer, error = %e, "bad PROXY header, closing");
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                return false;
            }
        };
        let socket_peer = self.wire.conns[key].peer.addr();
        if !self.settings.proxy_trusted.trusts(socket_peer.ip()) {
            self.wire.pool.give(buf, self.clock.now);
            self.services.metrics.refuse(RefuseReason::ProxyUntrusted);
            tracing::info!(shard = self.id, peer = %socket_peer, "PROXY header from a peer not in mqtt.proxy_trusted, closing");
            self.close_conn(key, DisconnectReason::Refused, None);
            return false;
        }
        let alive = self.proxy_accepted(key, header, &mut buf[len..]);
        self.wire.pool.give(buf, self.clock.now);
        alive
    }

    /// The PROXY header is read: the connection takes the real peer address (counted per
    /// IP now) and `rest`, the bytes after the header, go on through its transport.
    fn proxy_accepted(&mut self, key: usize, header: ProxyHeader, rest: &mut [u8]) -> bool {
        let conn = &mut self.wire.conns[key];
        let peer = match header {
            ProxyHeader::Proxied(a) => a,
            ProxyHeader::Local => conn.peer.addr(),
        };
        if !self.services.per_ip.acquire(peer.ip()) {
            self.services.metrics.refuse(RefuseReason::PerIp);
            tracing::debug!(shard = self.id, %peer, "refused: max_connections_per_ip reached");
            // Still in ProxyHeader state: close_conn releases no per-IP count.
            self.close_conn(key, DisconnectReason::Refused, None);
            return false;
        }
        conn.peer = Peer::from(peer);
        conn.state = ConnState::after_prefix(conn.link);
        if conn.is_tls() {
            // On a handshake thread, the connection is gone from here.
            !self.outsource_handshake(key, rest) && self.tls_feed(key, rest)
        } else {
            self.ingest_plaintext(key, rest)
        }
    }
}

/// Writes a connection's output as far as the socket takes it: on TLS, plaintext into
/// rustls (up to its buffer limit) and ciphertext out, or sealed by the record layer
/// with `records`, the connection's record keys; else straight to the socket.
/// Returns the bytes the socket took, and false when writing failed (close it).
pub(super) fn write(
    conn: &mut Conn,
    records: Option<&mut crate::tls::record::RecordKeys>,
) -> (usize, bool) {
    let Some(bufs) = conn.bufs.as_mut() else {
        return (0, true);
    };
    let mut sent = 0;
    // Acknowledgements waiting for the store commit, and what follows them, stay.
    let end = bufs.writable_end();
    if let Some(keys) = records.filter(|_| bufs.tls.is_none()) {
        return super::records::write_records(&mut conn.socket, bufs, keys);
    }
    let Some(tls) = bufs.tls.as_mut() else {
        while bufs.out_pos < end {
            match conn.socket.write(&bufs.out[bufs.out_pos..end]) {
                Ok(0) => return (sent, false),
                Ok(n) => {
                    bufs.out_pos += n;
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (sent, false),
            }
        }
        return (sent, true);
    };
    loop {
        if bufs.out_pos < end {
            match tls.writer().write(&bufs.out[bufs.out_pos..end]) {
                Ok(n) => bufs.out_pos += n,
                Err(_) => return (sent, false),
            }
        }
        if !tls.wants_write() {
            return (sent, true);
        }
        match tls.write_tls(&mut conn.socket) {
            Ok(0) => return (sent, false),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (sent, true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (sent, false),
        }
    }
}
