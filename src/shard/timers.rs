//! Timers: the shard's one timing wheel. A connection has one entry (connect timeout,
//! keep-alive, write stall: whichever is due first), re-armed lazily when it fires early;
//! an offline session has one (will delay, expiry; see `mqtt/offline.rs`).

use crate::codec::{self};
use crate::metrics::DisconnectReason;
use crate::wheel::{TimerId, TimingWheel};

use super::conn::{Conn, ConnState};
use super::{Shard, SESSION_TIMER};

pub struct Timers {
    /// Payloads: a connection key, or a session key with [`SESSION_TIMER`] set.
    pub wheel: TimingWheel<u32>,
    /// The batch fired this turn (reused).
    pub fired: Vec<(TimerId, u32)>,
    /// More timers were due than one batch: run again next turn.
    pub pending: bool,
}

impl Timers {
    pub fn new() -> Self {
        Timers {
            wheel: TimingWheel::new(0),
            fired: Vec::new(),
            pending: false,
        }
    }
}

impl Shard {
    /// The deadline of a connection's single timer.
    fn conn_deadline(&self, c: &Conn) -> u64 {
        let idle = u64::from(c.last_seen) + u64::from(c.idle_ticks) + 1;
        if c.stall_since != 0 {
            let stall =
                u64::from(c.stall_since - 1) + u64::from(self.settings.write_stall_ticks) + 1;
            idle.min(stall)
        } else {
            idle
        }
    }

    /// Fires due timers in batches of `expiry_batch`; true if more are due.
    pub(super) fn run_timers(&mut self) -> bool {
        let mut fired = std::mem::take(&mut self.timers.fired);
        fired.clear();
        let more =
            self.timers
                .wheel
                .advance(self.clock.now, self.settings.expiry_batch, &mut fired);
        for &(id, payload) in &fired {
            if payload & SESSION_TIMER != 0 {
                self.on_session_timer((payload & !SESSION_TIMER) as usize, id);
            } else {
                self.on_conn_timer(payload as usize, id);
            }
        }
        self.timers.fired = fired;
        if !more {
            self.wire.pool.shrink(self.clock.now);
        }
        self.timers.pending = more;
        more
    }

    /// Lazy re-arm: traffic only moved `last_seen`; act only if the deadline really passed.
    fn on_conn_timer(&mut self, key: usize, id: TimerId) {
        let Some(conn) = self.wire.conns.get(key) else {
            return;
        };
        if conn.timer != id {
            return;
        }
        let deadline = self.conn_deadline(conn);
        if deadline > self.clock.now {
            let timer = self.timers.wheel.insert(deadline, key as u32);
            self.wire.conns[key].timer = timer;
            // Forget inbound rate debt that has run out (an idle connection keeps no box).
            self.wire.release_idle_bufs(&self.clock, key);
            return;
        }
        let stalled = conn.stall_since != 0
            && u64::from(conn.stall_since - 1) + u64::from(self.settings.write_stall_ticks)
                < self.clock.now;
        let handshake = conn.state != ConnState::Active;
        if !stalled && !handshake && self.wire.paused.contains(&(key as u32)) {
            // We stopped reading it (inbound rate, backpressure): its PINGREQs wait in
            // our buffer or the kernel, so silence is ours, not the client's.
            let now = self.clock.now32();
            self.wire.conns[key].last_seen = now;
            let deadline = self.conn_deadline(&self.wire.conns[key]);
            let timer = self.timers.wheel.insert(deadline, key as u32);
            self.wire.conns[key].timer = timer;
            return;
        }
        // The fired timer is gone from the wheel; make sure close does not cancel a reused id.
        self.wire.conns[key].timer = TimerId::default();
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
}
