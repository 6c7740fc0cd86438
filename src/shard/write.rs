//! The write path: each turn, every connection with output is written once, through
//! its transport; the write-stall clock, the low watermark's refills, and the one exit
//! of every connection, `close_conn`.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::codec::{self, Version};
use crate::metrics::{DisconnectReason, ShardMetrics};

use super::conn::ConnState;
use super::{packet, transport, wire, Shard};

impl Shard {
    pub(super) fn flush_dirty(&mut self) {
        // Flushing can refill windows and dirty connections again; the windows bound it.
        while let Some(key) = self.wire.dirty.pop() {
            if let Some(c) = self.wire.conns.get_mut(key as usize) {
                c.dirty = false;
                self.flush_conn(key as usize);
            }
        }
    }

    /// Writes what the socket takes. A socket that stops taking bytes starts the
    /// write-stall clock; draining below the low watermark refills the in-flight window.
    pub(super) fn flush_conn(&mut self, key: usize) {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return;
        };
        let Some(before) = conn.bufs.as_ref().map(|b| b.out.len() - b.out_pos) else {
            return;
        };
        let (sent, ok) = transport::write(conn);
        ShardMetrics::add(&self.services.metrics.bytes_sent, sent as u64);
        if !ok {
            self.close_conn(key, DisconnectReason::SocketError, None);
            return;
        }
        let pending = conn.outbound_len();
        let low = self.settings.low_watermark;
        if before > low && pending <= low {
            // Reading may have stopped at the high watermark (`on_readable`); with
            // edge-triggered readiness no new event comes for bytes already waiting.
            self.wire.reread.push(key as u32);
        }
        if pending == 0 {
            self.drained(key);
        } else {
            self.still_pending(key, before, pending);
        }
        let session = self.wire.conns[key].session;
        if pending <= low {
            self.clear_congested(key);
        }
        self.wire.release_idle_bufs(&self.clock, key);
        if let Some(session) = session.filter(|_| pending < low) {
            self.refill(session.index());
        }
    }

    /// All output written: the buffer goes back to the pool, the stall clock stops.
    fn drained(&mut self, key: usize) {
        let conn = &mut self.wire.conns[key];
        conn.stall_since = 0;
        if let Some(bufs) = conn.bufs.as_mut() {
            bufs.out_pos = 0;
            let mut out = std::mem::take(&mut bufs.out);
            out.clear();
            self.wire.pool.give(out, self.clock.now);
        }
    }

    /// Output left after a write (`before` bytes were waiting, `pending` are): keeps the
    /// tail at the front of its buffer and runs the write-stall clock.
    fn still_pending(&mut self, key: usize, before: usize, pending: usize) {
        let now = self.clock.now32();
        let conn = &mut self.wire.conns[key];
        if let Some(bufs) = conn.bufs.as_mut() {
            // Keep the unsent tail at the front so the buffer does not creep.
            if bufs.out_pos > bufs.out.len() / 2 {
                bufs.out.drain(..bufs.out_pos);
                bufs.out_pos = 0;
            }
        }
        // A congested connection (backpressure) must drain below the low watermark
        // within the stall timeout, or one trickling reader would pace every
        // publisher for ever; otherwise any bytes out show a slow socket, not a
        // stalled one.
        let pacing = conn.congested && pending > self.settings.low_watermark;
        if conn.stall_since != 0 && pending < before && !pacing {
            // The clock restarts (the wheel entry re-arms lazily when it fires early).
            conn.stall_since = now + 1;
        } else if conn.stall_since == 0 {
            conn.stall_since = now + 1;
            let stall_deadline = u64::from(now) + u64::from(self.settings.write_stall_ticks) + 1;
            let timer = conn.timer;
            let wheel = &mut self.timers.wheel;
            if wheel.deadline(timer).is_some_and(|d| d > stall_deadline) {
                wheel.reset(timer, stall_deadline);
            }
        }
    }

    /// The one exit of every connection: removes it from the slab and the poll, cancels its
    /// timer, returns its buffers, detaches its session (will, expiry) and counts why.
    pub(super) fn close_conn(
        &mut self,
        key: usize,
        reason: DisconnectReason,
        v5_reason: Option<u8>,
    ) {
        let Some(mut conn) = self.wire.conns.try_remove(key) else {
            return;
        };
        if conn.congested {
            self.uncount_congested();
        }
        if conn.state == ConnState::Authenticating {
            self.admission.auth_pending.remove(&key);
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
                self.services.metrics.packet_out(packet::DISCONNECT);
            }
        }
        if let Some(tls) = conn.bufs.as_mut().and_then(|b| b.tls.as_mut()) {
            // Best effort: what rustls holds (a DISCONNECT, an alert) and close_notify.
            tls.send_close_notify();
            let _ = tls.write_tls(&mut conn.socket);
        }
        if conn.state != ConnState::Active {
            self.admission.handshaking = self.admission.handshaking.saturating_sub(1);
        }
        self.wire.paused.remove(&(key as u32));
        if conn.state != ConnState::ProxyHeader {
            self.services.per_ip.release(conn.peer.addr().ip());
        }
        let _ = self.wire.poll.registry().deregister(&mut conn.socket);
        self.timers.wheel.cancel(conn.timer);
        if let Some(b) = conn.bufs.take() {
            wire::give_bufs(&mut self.wire.pool, *b, self.clock.now);
        }
        self.services
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        let connect_read = !matches!(conn.state, ConnState::ProxyHeader | ConnState::Handshake);
        let reason = reason.counted(connect_read);
        self.services.metrics.disconnect(reason);
        let accepted = self.clock.instant_of(conn.accepted_at);
        self.services.metrics.observe_connection_age(
            self.clock
                .now_instant
                .saturating_duration_since(accepted)
                .as_secs_f64(),
        );
        let client_id = if let Some(s) = conn.session {
            let s = s.index();
            let id = self.sessions[s].client_id.clone();
            let will = !matches!(
                reason,
                DisconnectReason::Client | DisconnectReason::Shutdown
            );
            self.detach_session(s, will);
            self.emit_disconnected(&id, reason);
            id
        } else {
            Arc::from("")
        };
        tracing::debug!(shard = self.id, client_id = %client_id, peer = %conn.peer, reason = reason.as_str(), "connection closed");
    }
}
