//! The close grace: a connection the gateway ended with something to tell it (an MQTT 5
//! DISCONNECT with its reason, a refusing CONNACK, output still pending, such as the
//! CONNACK of a connection taken over in the turn it was accepted) is not closed at once.
//!
//! Closing a socket whose peer is still sending makes the kernel answer with a reset, and
//! a reset can destroy our last packet in the client's receive buffer before it is read
//! (the client sees `ECONNRESET`/`EPIPE` instead of the reason). So `close_conn` writes
//! the last words, and then this part half-closes the write side and keeps reading and
//! discarding, for at most `close_grace_ms` and `close_grace_bytes`, before it closes.
//!
//! A lingering connection is in `ConnState::Closing`: no session (detached at once, so
//! the client id may reconnect), no buffers (reads land in the shard's scratch buffer),
//! one wheel timer for the grace deadline. It still holds its slot in `max_connections`,
//! the per-IP count and a file descriptor, and is counted in
//! `gateway_closing_connections` and `gateway_connections`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;

use crate::codec::{self, Version};
use crate::metrics::ShardMetrics;
use crate::wheel::TimerId;

use super::conn::ConnState;
use super::{packet, Shard, READS_PER_EVENT};

impl Shard {
    /// Writes, once and without blocking, what connection `key` still has to say: its
    /// pending output, then (MQTT 5, after its CONNACK) a DISCONNECT with `v5_reason`,
    /// then TLS close_notify. True if the socket took any of its output.
    pub(super) fn say_last_words(&mut self, key: usize, v5_reason: Option<u8>) -> bool {
        let conn = &mut self.wire.conns[key];
        // Acknowledgements still waiting for the store commit are not sent.
        let mut out = match conn.bufs.as_mut() {
            Some(b) => {
                let start = b.out_pos.min(b.out.len());
                b.out[start..b.writable_end().max(start)].to_vec()
            }
            None => Vec::new(),
        };
        let disconnect = v5_reason
            .filter(|_| conn.version == Version::V5 && conn.state == super::ConnState::Active);
        if let Some(code) = disconnect {
            let start = out.len();
            codec::encode_disconnect(&mut out, code, None);
            if conn.link.is_ws() {
                crate::ws::frame::frame_in_place(&mut out, start);
            }
        }
        let sent = match conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) {
            Some(tls) => {
                // What rustls holds (earlier output, the last words) and close_notify.
                let held = tls.wants_write();
                let taken = !out.is_empty() && tls.writer().write_all(&out).is_ok();
                tls.send_close_notify();
                let written = tls.write_tls(&mut conn.socket).unwrap_or(0);
                if (held || taken) && written > 0 {
                    written
                } else {
                    0
                }
            }
            // Past its handshake: sealed by the record layer (nothing in the clear).
            None if conn.link.is_tls() => super::records::last_words(
                &mut conn.socket,
                conn.bufs.as_deref_mut(),
                self.wire.records.remove(&(key as u32)),
                &out,
            ),
            None if out.is_empty() => 0,
            None => conn.socket.write(&out).unwrap_or(0),
        };
        ShardMetrics::add(&self.services.metrics.bytes_sent, sent as u64);
        if disconnect.is_some() && sent >= out.len() {
            self.services.metrics.packet_out(packet::DISCONNECT);
        }
        sent > 0
    }

    /// Starts the close grace of connection `key`, whose session, buffers and timer are
    /// already gone: shuts its write side, arms the grace deadline. Without a grace
    /// (`close_grace_ms = 0`, or none fits in the shutdown's drain timeout) or when the
    /// shutdown of the write side fails, closes it at once.
    pub(super) fn linger(&mut self, key: usize) {
        let grace = if self.stopping {
            self.settings.shutdown_grace_ticks
        } else {
            self.settings.close_grace_ticks
        };
        let conn = &mut self.wire.conns[key];
        if grace == 0 || conn.socket.shutdown(Shutdown::Write).is_err() {
            return self.finish_close(key);
        }
        conn.state = ConnState::Closing;
        conn.max_packet = self.settings.close_grace_bytes;
        conn.timer = self
            .timers
            .wheel
            .insert(self.clock.now + u64::from(grace) + 1, key as u32);
        self.wire.closing += 1;
        // Bytes already waiting raise no new (edge-triggered) event: read them next turn.
        self.wire.reread.push(key as u32);
    }

    /// A lingering connection is readable: reads and discards into the scratch buffer
    /// until the socket has nothing more; closes it at end of stream, on an error, or
    /// once the grace's byte allowance is used up.
    pub(super) fn discard_closing(&mut self, key: usize) {
        for _ in 0..READS_PER_EVENT {
            let conn = &mut self.wire.conns[key];
            match conn.socket.read(&mut self.wire.scratch) {
                Ok(0) => return self.finish_close(key),
                Ok(n) => {
                    ShardMetrics::add(&self.services.metrics.bytes_received, n as u64);
                    let left = conn.max_packet.saturating_sub(n as u32);
                    conn.max_packet = left;
                    if left == 0 {
                        tracing::debug!(shard = self.id, peer = %conn.peer, "close grace: byte allowance used up, closing");
                        return self.finish_close(key);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.finish_close(key),
            }
        }
        self.wire.reread.push(key as u32);
    }

    /// The grace deadline of lingering connection `key` passed (its timer fired).
    pub(super) fn grace_over(&mut self, key: usize) {
        self.wire.conns[key].timer = TimerId::default();
        self.finish_close(key);
    }

    /// Closes the socket of connection `key` for good: out of the slab and the poll,
    /// its timer cancelled, its slots in the connection limits given back.
    pub(super) fn finish_close(&mut self, key: usize) {
        let Some(mut conn) = self.wire.conns.try_remove(key) else {
            return;
        };
        if conn.state == ConnState::Closing {
            self.wire.closing -= 1;
        }
        self.wire.records.remove(&(key as u32));
        if conn.state != ConnState::ProxyHeader {
            self.services.per_ip.release(conn.peer.addr().ip());
        }
        let _ = self.wire.poll.registry().deregister(&mut conn.socket);
        self.timers.wheel.cancel(conn.timer);
        self.services
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}
