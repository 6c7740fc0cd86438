//! Timers: the shard's one timing wheel. A connection has one entry (connect timeout,
//! keep-alive, write stall: whichever is due first), re-armed lazily when it fires early;
//! an offline session has one (will delay, expiry; see `mqtt/offline.rs`).
//!
//! What a due connection timer means is decided by [`on_due`], a pure function of the
//! connection's timing and the current tick, tested below on ticks alone.

use crate::codec;
use crate::metrics::DisconnectReason;
use crate::wheel::{TimerId, TimingWheel};

use super::conn::{Conn, ConnState};
use super::{Shard, SESSION_TIMER};

pub(super) struct Timers {
    /// Payloads: a connection key, or a session key with [`SESSION_TIMER`] set.
    pub wheel: TimingWheel<u32>,
    /// The batch fired this turn (reused).
    pub fired: Vec<(TimerId, u32)>,
    /// More timers were due than one batch: run again next turn.
    pub pending: bool,
}

impl Timers {
    pub(super) fn new() -> Self {
        Timers {
            wheel: TimingWheel::new(0),
            fired: Vec::new(),
            pending: false,
        }
    }
}

/// A connection's timing, as its timer sees it (ticks).
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    /// Tick of accept, then of the last whole packet.
    pub last_seen: u32,
    /// Silence allowed after `last_seen` (connect timeout, then 1.5 × keep-alive).
    pub idle_ticks: u32,
    /// Tick + 1 at which output stopped draining; 0 while it drains.
    pub stall_since: u32,
    /// Before its CONNACK.
    pub handshake: bool,
    /// The shard stopped reading it (inbound rate, or held at a paced PUBLISH).
    pub paused: bool,
    /// `write_stall_timeout_secs` in ticks.
    pub stall_ticks: u32,
}

impl Timing {
    fn of(c: &Conn, paused: bool, stall_ticks: u32) -> Self {
        Timing {
            last_seen: c.last_seen,
            idle_ticks: c.idle_ticks,
            stall_since: c.stall_since,
            handshake: c.state != ConnState::Active,
            paused,
            stall_ticks,
        }
    }

    /// The tick at which the connection's timer is due: the earlier of its silence and
    /// its write-stall deadlines (each one tick late rather than early).
    pub(super) fn deadline(&self) -> u64 {
        let idle = u64::from(self.last_seen) + u64::from(self.idle_ticks) + 1;
        match self.stall_since {
            0 => idle,
            s => idle.min(u64::from(s - 1) + u64::from(self.stall_ticks) + 1),
        }
    }

    fn stalled(&self, now: u64) -> bool {
        self.stall_since != 0 && u64::from(self.stall_since - 1) + u64::from(self.stall_ticks) < now
    }
}

/// What a connection timer firing at tick `now` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Not due yet (traffic moved it): re-arm at this tick.
    Rearm(u64),
    /// Silent only because we stopped reading it: its silence starts over now; re-arm.
    Excused(u64),
    /// Close it.
    Close(DisconnectReason),
}

/// Decides what a due connection timer means (lazy re-arm: traffic only moved
/// `last_seen`; act only if the deadline really passed).
pub(super) fn on_due(t: &Timing, now: u64) -> Due {
    let deadline = t.deadline();
    if deadline > now {
        return Due::Rearm(deadline);
    }
    let stalled = t.stalled(now);
    if !stalled && !t.handshake && t.paused {
        // Its PINGREQs wait in our buffer or the kernel, so silence is ours.
        let excused = Timing {
            last_seen: now as u32,
            ..*t
        };
        return Due::Excused(excused.deadline());
    }
    Due::Close(if stalled {
        DisconnectReason::WriteStall
    } else if t.handshake {
        DisconnectReason::ConnectTimeout
    } else {
        DisconnectReason::Keepalive
    })
}

impl Shard {
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

    /// A connection's timer fired: re-armed, excused, or the connection closed.
    fn on_conn_timer(&mut self, key: usize, id: TimerId) {
        let Some(conn) = self.wire.conns.get(key).filter(|c| c.timer == id) else {
            return;
        };
        if conn.state == ConnState::Closing {
            return self.grace_over(key);
        }
        let paused = self.wire.paused.contains(&(key as u32)) || self.pacing.is_held(key);
        let timing = Timing::of(conn, paused, self.settings.write_stall_ticks);
        match on_due(&timing, self.clock.now) {
            Due::Rearm(at) => {
                self.wire.conns[key].timer = self.timers.wheel.insert(at, key as u32);
                // Forget inbound rate debt that has run out (an idle connection keeps no box).
                self.wire.release_idle_bufs(&self.clock, key);
            }
            Due::Excused(at) => {
                let conn = &mut self.wire.conns[key];
                conn.last_seen = self.clock.now32();
                conn.timer = self.timers.wheel.insert(at, key as u32);
            }
            Due::Close(reason) => {
                // The fired timer is gone from the wheel; close must not cancel a reused id.
                self.wire.conns[key].timer = TimerId::default();
                let reason = match reason {
                    // Congested all along: it stopped reading or acknowledging.
                    DisconnectReason::WriteStall if self.wire.conns[key].congested => {
                        DisconnectReason::SlowConsumer
                    }
                    r => r,
                };
                let v5 = match reason {
                    DisconnectReason::Keepalive => Some(codec::reason::KEEP_ALIVE_TIMEOUT),
                    DisconnectReason::SlowConsumer => Some(codec::reason::QUOTA_EXCEEDED),
                    _ => None,
                };
                if reason == DisconnectReason::SlowConsumer {
                    tracing::info!(shard = self.id, client_id = %self.client_id_of(key), "slow consumer: congested for write_stall_timeout_secs, disconnecting");
                }
                self.close_conn(key, reason, v5);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An active connection seen at tick 10 with keep-alive 10 ticks (15 allowed).
    fn active() -> Timing {
        Timing {
            last_seen: 10,
            idle_ticks: 15,
            stall_since: 0,
            handshake: false,
            paused: false,
            stall_ticks: 20,
        }
    }

    #[test]
    fn keep_alive_is_due_one_tick_after_its_allowance_never_before() {
        let t = active();
        assert_eq!(t.deadline(), 26);
        // Fired early (the wheel's slot) or re-armed after traffic: re-arm.
        assert_eq!(on_due(&t, 25), Due::Rearm(26));
        assert_eq!(on_due(&t, 26), Due::Close(DisconnectReason::Keepalive));
        let later = Timing { last_seen: 20, ..t };
        assert_eq!(on_due(&later, 26), Due::Rearm(36));
    }

    #[test]
    fn handshake_silence_closes_before_the_connack() {
        let t = Timing {
            handshake: true,
            ..active()
        };
        assert_eq!(on_due(&t, 26), Due::Close(DisconnectReason::ConnectTimeout));
        // A paused handshake is not excused (reads pause only after the CONNACK).
        let p = Timing { paused: true, ..t };
        assert_eq!(on_due(&p, 26), Due::Close(DisconnectReason::ConnectTimeout));
    }

    #[test]
    fn write_stall_comes_first_when_earlier_and_wins_over_paused() {
        // Output stopped draining at tick 3 (stored + 1): stall deadline 3 + 20 + 1 = 24.
        let t = Timing {
            stall_since: 4,
            ..active()
        };
        assert_eq!(t.deadline(), 24);
        assert_eq!(on_due(&t, 23), Due::Rearm(24));
        assert_eq!(on_due(&t, 24), Due::Close(DisconnectReason::WriteStall));
        let p = Timing { paused: true, ..t };
        assert_eq!(on_due(&p, 24), Due::Close(DisconnectReason::WriteStall));
    }

    #[test]
    fn a_paused_connection_is_excused_and_its_silence_starts_over() {
        let t = Timing {
            paused: true,
            ..active()
        };
        assert_eq!(on_due(&t, 30), Due::Excused(30 + 15 + 1));
    }
}
