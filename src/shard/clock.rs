//! The shard's clock: read once per loop turn, in ticks (the timing wheel's unit) and as
//! an `Instant` (message expiry, rate limits), both counted from the shards' common start
//! ([`ClockStart`]): tick `t` is the same moment on every shard, so a connection handed
//! from one shard to another keeps the tick it was accepted in.
//!
//! The shard reads time only through its clock. A clock follows the system's monotonic
//! time, or, made with [`Clock::manual`], moves only when told (for tests of the timing
//! logic that must not sleep).

use std::time::{Duration, Instant, SystemTime};

/// When every shard's clock starts: taken once, before the shards are spawned.
#[derive(Clone, Copy, Debug)]
pub struct ClockStart {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl ClockStart {
    pub fn now() -> Self {
        ClockStart {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

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
    /// A clock on the system's monotonic time, counting from `start`.
    pub(super) fn new(tick: Duration, start: ClockStart) -> Self {
        Self::with_source(tick, start, Source::System)
    }

    /// A clock that moves only by [`Clock::advance`], from `start`.
    #[cfg(test)]
    pub(super) fn manual(tick: Duration, start: ClockStart) -> Self {
        Self::with_source(tick, start, Source::Manual(start.instant))
    }

    fn with_source(tick: Duration, start: ClockStart, source: Source) -> Self {
        Clock {
            started: start.instant,
            started_wall: start.wall,
            tick,
            now: 0,
            now_instant: start.instant,
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

    /// The tick `at` falls in (0 before the start), at most the current one: the inverse
    /// of [`Clock::instant_of`], so a tick's start maps back to that tick exactly.
    pub(super) fn tick_of(&self, at: Instant) -> u32 {
        let since = at.saturating_duration_since(self.started).as_millis();
        let tick = (since / self.tick.as_millis().max(1)) as u64;
        tick.min(self.now) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DisconnectReason;
    use crate::shard::timers::{on_due, Due, Timing};

    #[test]
    fn a_manual_clock_counts_whole_ticks_and_moves_only_when_told() {
        let mut c = Clock::manual(Duration::from_millis(100), ClockStart::now());
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

    /// Two shards' clocks from one start agree on ticks: the start of a tick on one maps
    /// to that same tick on the other (a connection handed between them keeps its
    /// accept tick), never past the current one, and 0 before the start.
    #[test]
    fn clocks_from_one_start_agree_on_ticks() {
        let start = ClockStart::now();
        let (mut a, mut b) = (
            Clock::manual(Duration::from_millis(1000), start),
            Clock::manual(Duration::from_millis(1000), start),
        );
        a.advance(Duration::from_millis(7_999));
        b.advance(Duration::from_millis(9_500));
        assert_eq!(a.now32(), 7);
        for t in 0..=7 {
            assert_eq!(b.tick_of(a.instant_of(t)), t);
            assert_eq!(b.tick_of(a.instant_of(t) + Duration::from_millis(999)), t);
        }
        assert_eq!(a.tick_of(b.now_instant), 7, "not past the current tick");
        assert_eq!(a.tick_of(start.instant - Duration::from_millis(1)), 0);
    }

    #[test]
    fn keep_alive_expires_at_one_and_a_half_times_on_a_manual_clock() {
        // Keep-alive 2 s at 100 ms ticks: 30 ticks of silence allowed, closed on the 31st.
        let mut c = Clock::manual(Duration::from_millis(100), ClockStart::now());
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
