//! The shard's clock: read once per loop turn, in ticks (the timing wheel's unit) and as
//! an `Instant` (message expiry, rate limits), both counted from the shard's start.
//!
//! The shard reads time only through its clock. A clock follows the system's monotonic
//! time, or, made with [`Clock::manual`], moves only when told (for tests of the timing
//! logic that must not sleep).

use std::time::{Duration, Instant, SystemTime};

pub(super) struct Clock {
    pub started: Instant,
    pub started_wall: SystemTime,
    pub tick: Duration,
    /// Whole ticks since `started`, as of the last `update`.
    pub now: u64,
    pub now_instant: Instant,
    source: Source,
}

enum Source {
    System,
    /// The time it was last set to (made by tests only).
    #[cfg_attr(not(test), allow(dead_code))]
    Manual(Instant),
}

impl Clock {
    /// A clock on the system's monotonic time.
    pub(super) fn new(tick: Duration) -> Self {
        Self::with_source(tick, Source::System)
    }

    /// A clock that moves only by [`Clock::advance`].
    #[cfg(test)]
    pub(super) fn manual(tick: Duration) -> Self {
        Self::with_source(tick, Source::Manual(Instant::now()))
    }

    fn with_source(tick: Duration, source: Source) -> Self {
        let started = match source {
            Source::System => Instant::now(),
            Source::Manual(at) => at,
        };
        Clock {
            started,
            started_wall: SystemTime::now(),
            tick,
            now: 0,
            now_instant: started,
            source,
        }
    }

    /// Moves a manual clock on by `d` (and reads it).
    #[cfg(test)]
    pub(super) fn advance(&mut self, d: Duration) {
        if let Source::Manual(at) = &mut self.source {
            *at += d;
        }
        self.update();
    }

    /// The time now, fresh (not the turn's reading).
    pub(super) fn read(&self) -> Instant {
        match self.source {
            Source::System => Instant::now(),
            Source::Manual(at) => at,
        }
    }

    /// Reads the time for this turn.
    pub(super) fn update(&mut self) {
        self.now_instant = self.read();
        let elapsed = self.now_instant - self.started;
        self.now = (elapsed.as_millis() / self.tick.as_millis().max(1)) as u64;
    }

    /// The current tick as the 32-bit value connections store.
    pub(super) fn now32(&self) -> u32 {
        self.now as u32
    }

    /// Nanoseconds since start (inbound rate limits).
    pub(super) fn now_ns(&self) -> u64 {
        (self.now_instant - self.started).as_nanos() as u64
    }

    /// When tick `t` begins.
    pub(super) fn instant_of(&self, t: u32) -> Instant {
        self.started + self.tick * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DisconnectReason;
    use crate::shard::timers::{on_due, Due, Timing};

    #[test]
    fn a_manual_clock_counts_whole_ticks_and_moves_only_when_told() {
        let mut c = Clock::manual(Duration::from_millis(100));
        c.update();
        assert_eq!((c.now, c.now_ns()), (0, 0));
        c.advance(Duration::from_millis(99));
        assert_eq!(c.now, 0, "ticks round down");
        c.advance(Duration::from_millis(1));
        assert_eq!((c.now32(), c.now_ns()), (1, 100_000_000));
        c.update();
        assert_eq!(c.now, 1, "no time passes by itself");
        assert_eq!(c.instant_of(3) - c.started, Duration::from_millis(300));
        assert_eq!(c.read(), c.now_instant);
    }

    #[test]
    fn keep_alive_expires_at_one_and_a_half_times_on_a_manual_clock() {
        // Keep-alive 2 s at 100 ms ticks: 30 ticks of silence allowed, closed on the 31st.
        let mut c = Clock::manual(Duration::from_millis(100));
        let t = Timing {
            last_seen: 0,
            idle_ticks: 30,
            stall_since: 0,
            handshake: false,
            paused: false,
            stall_ticks: 100,
        };
        let mut closed_at = None;
        for _ in 0..40 {
            c.advance(Duration::from_millis(100));
            if let Due::Close(why) = on_due(&t, c.now) {
                assert_eq!(why, DisconnectReason::Keepalive);
                closed_at = Some(c.now_instant - c.started);
                break;
            }
        }
        assert_eq!(closed_at, Some(Duration::from_millis(3100)));
    }
}
