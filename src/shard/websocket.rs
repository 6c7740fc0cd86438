//! The WebSocket transport (`ws_listen`, and `wss_listen` under TLS): MQTT over
//! WebSocket is one more layer between the socket (or rustls) and the framer, not a
//! second read path.
//!
//! A connection accepted on a WebSocket listener starts in `ConnState::WsUpgrade` (after
//! its PROXY header, if any; its TLS handshake runs first on wss). Its plaintext collects
//! in the connection's pooled `inbuf` until [`crate::ws::handshake::parse`] accepts the
//! upgrade (the 101 is written at once, the connection waits for CONNECT like any other)
//! or refuses it (the 4xx is written and it is closed). The request is bounded by
//! `ws_max_handshake_bytes`, and in time by the connect timeout and `max_handshaking`
//! like a CONNECT, because it is just another state before CONNACK.
//!
//! After the upgrade every read is decoded in place by [`crate::ws::Decoder`]: the
//! unmasked MQTT bytes go to the framer exactly as a plain TCP read would, control
//! replies (pong, close) go to the output as they are, and a WebSocket end (a close frame,
//! or refused input: unmasked, text, oversized, fragmented control frames) writes its
//! close frame and closes the connection. Outbound MQTT bytes are framed where they are
//! encoded (`Wire::output`).
//!
//! Memory: the decoder (20 bytes) and the few bytes of a control frame not yet whole live
//! in the connection's buffer box ([`WsBusy`]) only while a frame is half-read; between
//! frames the connection holds nothing more than a TCP one (its `Link` is one byte in the
//! struct's padding), so an idle WebSocket connection holds no buffer.

use crate::metrics::{DisconnectReason, RefuseReason};
use crate::ws::{handshake, Decoder, End, Policy, Upgrade};

use super::conn::ConnState;
use super::Shard;

/// A WebSocket connection's state while a frame is half-read; it travels with a handoff.
#[derive(Debug, Default)]
pub struct WsBusy {
    pub decoder: Decoder,
    /// The start of a control frame whose payload has not all arrived (at most 139
    /// bytes), passed again in front of the next bytes read.
    pub carry: Vec<u8>,
}

impl WsBusy {
    /// True when dropping it loses nothing: between frames, nothing carried.
    fn is_idle(&self) -> bool {
        self.decoder.is_idle() && self.carry.is_empty()
    }
}

impl Shard {
    /// Plaintext from a connection's socket (or out of rustls): through the WebSocket
    /// layer on a WebSocket connection, else straight on to the framer. False when the
    /// connection is gone.
    pub(super) fn ingest_plaintext(&mut self, key: usize, data: &mut [u8]) -> bool {
        let Some(conn) = self.wire.conns.get(key) else {
            return false;
        };
        if !conn.link.is_ws() {
            return self.ingest_bytes(key, data);
        }
        if conn.state == ConnState::WsUpgrade {
            return self.ws_upgrade(key, data);
        }
        self.ws_frames(key, data)
    }

    /// Bytes of the HTTP upgrade request, collected in `inbuf` until it can be answered.
    fn ws_upgrade(&mut self, key: usize, data: &[u8]) -> bool {
        let max = self.settings.ws.max_handshake_bytes;
        let mut buf = match self.wire.conns[key].bufs.as_mut() {
            Some(b) if !b.inbuf.is_empty() => std::mem::take(&mut b.inbuf),
            _ => self.wire.pool.take(data.len().min(max)),
        };
        self.wire.pool.reserve(&mut buf, data.len(), self.clock.now);
        buf.extend_from_slice(data);
        let policy = Policy {
            path: &self.settings.ws.path,
            allowed_origins: &self.settings.ws.allowed_origins,
            max_bytes: max,
        };
        let alive = match handshake::parse(&buf, &policy) {
            Upgrade::Partial => {
                self.wire.put_inbuf(&self.clock, key, buf);
                return true;
            }
            Upgrade::Refused(why) => {
                let (status, _) = why.status();
                tracing::info!(shard = self.id, peer = %self.wire.conns[key].peer, status, reason = ?why, "WebSocket upgrade refused, closing");
                self.services.metrics.refuse(RefuseReason::WsUpgrade);
                self.write_now(key, &why.response());
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                false
            }
            Upgrade::Accepted(a) => {
                // Written before the frames after it are read: a CONNECT in them may hand
                // the connection to another shard, and its pending output stays here.
                self.write_now(key, &a.response());
                match self.wire.conns.get_mut(key) {
                    Some(conn) => {
                        conn.state = ConnState::Handshake;
                        self.ws_frames(key, &mut buf[a.consumed..])
                    }
                    None => false,
                }
            }
        };
        self.wire.pool.give(buf, self.clock.now);
        alive
    }

    /// Bytes already framed (the upgrade's answer, pong and close replies) written now,
    /// ahead of anything else the connection has this turn.
    fn write_now(&mut self, key: usize, bytes: &[u8]) {
        self.wire.output_raw(&self.clock, key, bytes);
        self.flush_conn(key);
    }

    /// Decodes WebSocket frames in place and hands their MQTT bytes to the framer. The
    /// decoder's state is stored before the framer runs, so a CONNECT handed to another
    /// shard takes it along. False when the connection is gone.
    fn ws_frames(&mut self, key: usize, data: &mut [u8]) -> bool {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return false;
        };
        let mut busy = conn
            .bufs
            .as_mut()
            .and_then(|b| b.ws.take())
            .unwrap_or_default();
        // A control frame cut short last time: decode it with the new bytes behind it.
        let mut joined = std::mem::take(&mut busy.carry);
        let input: &mut [u8] = if joined.is_empty() {
            data
        } else {
            self.wire
                .pool
                .reserve(&mut joined, data.len(), self.clock.now);
            joined.extend_from_slice(data);
            &mut joined
        };
        let mut replies = Vec::new();
        let max = u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX);
        let d = busy.decoder.decode(input, max, &mut replies);
        if d.used < input.len() {
            busy.carry = self.wire.pool.take(input.len() - d.used);
            busy.carry.extend_from_slice(&input[d.used..]);
        }
        self.store_ws(key, busy);
        if !replies.is_empty() {
            self.wire.output_raw(&self.clock, key, &replies);
        }
        let mut alive = d.plain == 0 || self.ingest_bytes(key, &input[..d.plain]);
        self.wire.pool.give(joined, self.clock.now);
        if let Some(end) = d.end {
            if alive {
                self.ws_end(key, end);
            }
            alive = false;
        }
        alive
    }

    /// Keeps the decoder in the connection's buffer box while a frame is half-read; drops
    /// it (and the box, if nothing else is in it) between frames.
    fn store_ws(&mut self, key: usize, busy: WsBusy) {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return;
        };
        if busy.is_idle() {
            if let Some(b) = conn.bufs.as_mut() {
                b.ws = None;
            }
            self.wire.pool.give(busy.carry, self.clock.now);
            self.wire.release_idle_bufs(&self.clock, key);
        } else {
            conn.bufs.get_or_insert_with(Default::default).ws = Some(busy);
        }
    }

    /// The WebSocket ended: its close frame (queued by the decoder) goes out, then the
    /// connection closes; a close frame from the client is its end of stream.
    fn ws_end(&mut self, key: usize, end: End) {
        let Some(conn) = self.wire.conns.get(key) else {
            return;
        };
        let client = self.client_id_of(key);
        let reason = match end {
            End::Closed { .. } => {
                tracing::debug!(shard = self.id, client_id = %client, peer = %conn.peer, %end, "WebSocket closed by the client");
                DisconnectReason::CloseWait
            }
            End::Refused { .. } => {
                tracing::info!(shard = self.id, client_id = %client, peer = %conn.peer, %end, "WebSocket refused, closing");
                DisconnectReason::ProtocolError
            }
        };
        self.flush_conn(key);
        self.close_conn(key, reason, None);
    }
}
