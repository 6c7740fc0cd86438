//! The write path: each turn, every connection with output is written once, through
//! its transport; the write-stall clock, the low watermark's refills, and the one exit
//! of every connection, `close_conn`.

use std::sync::Arc;

use crate::metrics::{DisconnectReason, ShardMetrics};

use super::conn::ConnState;
use super::{transport, wire, Shard};

impl Shard {
    pub(super) fn flush_dirty(&mut self) {
        // Flushing can refill windows and dirty connections again; the windows bound it.
        while let Some(key) = self.wire.dirty.pop() {
            if let Some(c) = self.wire.conns.get_mut(key as usize) {
                c.dirty = false;
                self.flush_conn(key as usize);
                // Between reads: where a TLS 1.3 connection leaves rustls.
                self.tls_settle(key as usize);
            }
        }
    }

    /// Writes what the socket takes. A socket that stops taking bytes starts the
    /// write-stall clock; draining below the low watermark refills the in-flight window.
    pub(super) fn flush_conn(&mut self, key: usize) {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return;
        };
        let Some((before, held)) = conn
            .bufs
            .as_ref()
            .map(|b| (b.out.len() - b.out_pos, b.held_len()))
        else {
            return;
        };
        let (sent, ok) = transport::write(conn, self.wire.records.get_mut(&(key as u32)));
        ShardMetrics::add(&self.services.metrics.bytes_sent, sent as u64);
        wire::recount_output(&mut self.wire.output_bytes, conn);
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
        } else if pending > held {
            self.still_pending(key, before - held, pending - held);
        } else if !conn.congested {
            // Only output waiting for the store commit is left: the socket is not slow.
            conn.stall_since = 0;
        }
        let session = self.wire.conns[key].session;
        self.wire.release_idle_bufs(&self.clock, key);
        if let Some(session) = session.filter(|_| pending < low) {
            self.refill(session.index());
        }
        self.settle_congestion(key);
    }

    /// All output written: the buffer goes back to the pool, the stall clock stops.
    fn drained(&mut self, key: usize) {
        let conn = &mut self.wire.conns[key];
        if !conn.congested {
            // A congested connection's clock runs until it is no longer congested.
            conn.stall_since = 0;
        }
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
                bufs.compact();
            }
        }
        // A congested connection (`pacing.rs`) must stop being congested within the
        // stall timeout, or one trickling reader would pace its publishers for ever;
        // otherwise any bytes out show a slow socket, not a stalled one.
        if conn.stall_since != 0 && pending < before && !conn.congested {
            // The clock restarts (the wheel entry re-arms lazily when it fires early).
            conn.stall_since = now + 1;
        } else if conn.stall_since == 0 {
            self.start_stall_clock(key);
        }
    }

    /// Starts connection `key`'s write-stall clock: it is closed if the clock still runs
    /// `write_stall_timeout_secs` from now.
    pub(super) fn start_stall_clock(&mut self, key: usize) {
        let now = self.clock.now32();
        let conn = &mut self.wire.conns[key];
        conn.stall_since = now + 1;
        let stall_deadline = u64::from(now) + u64::from(self.settings.write_stall_ticks) + 1;
        let timer = conn.timer;
        let wheel = &mut self.timers.wheel;
        if wheel.deadline(timer).is_some_and(|d| d > stall_deadline) {
            wheel.reset(timer, stall_deadline);
        }
    }

    /// The one exit of every connection: writes what it still has to say (pending output,
    /// an MQTT 5 DISCONNECT), cancels its timer, returns its buffers, detaches its session
    /// (will, expiry) and counts why; then closes it, or, if it said something, lets it
    /// linger in the close grace first (`closing.rs`). Closing a lingering connection ends
    /// its grace.
    pub(super) fn close_conn(
        &mut self,
        key: usize,
        reason: DisconnectReason,
        v5_reason: Option<u8>,
    ) {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return;
        };
        let state = conn.state;
        if state == ConnState::Closing {
            return self.finish_close(key);
        }
        self.forget_congestion(key);
        if state == ConnState::Authenticating {
            self.admission.auth_pending.remove(&key);
        }
        let said = self.say_last_words(key, v5_reason);
        if state != ConnState::Active {
            self.admission.handshaking = self.admission.handshaking.saturating_sub(1);
        }
        self.wire.paused.remove(&(key as u32));
        let conn = &mut self.wire.conns[key];
        self.timers.wheel.cancel(std::mem::take(&mut conn.timer));
        if let Some(b) = conn.bufs.take() {
            wire::give_bufs(
                &mut self.wire.pool,
                &mut self.wire.output_bytes,
                *b,
                self.clock.now,
            );
        }
        let session = conn.session.take();
        let connect_read = !matches!(
            state,
            ConnState::ProxyHeader | ConnState::WsUpgrade | ConnState::Handshake
        );
        let reason = reason.counted(connect_read);
        self.services.metrics.disconnect(reason);
        let accepted = self.clock.instant_of(conn.accepted_at);
        self.services.metrics.observe_connection_age(
            self.clock
                .now_instant
                .saturating_duration_since(accepted)
                .as_secs_f64(),
        );
        let client_id = if let Some(s) = session {
            let s = s.index();
            let id = self.sessions[s].client_id.clone();
            let will = match reason {
                DisconnectReason::Client => false,
                DisconnectReason::Shutdown => self.settings.wills_on_stop,
                _ => true,
            };
            self.detach_session(s, will);
            self.emit_disconnected(&id, reason);
            id
        } else {
            Arc::from("")
        };
        let peer = &self.wire.conns[key].peer;
        tracing::debug!(shard = self.id, client_id = %client_id, peer = %peer, reason = reason.as_str(), "connection closed");
        if said && state != ConnState::ProxyHeader {
            self.linger(key);
        } else {
            self.finish_close(key);
        }
    }
}
