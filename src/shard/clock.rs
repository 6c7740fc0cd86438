//! The shard's clock: read once per loop turn, in ticks (the timing wheel's unit) and as
//! an `Instant` (message expiry, rate limits), both counted from the shard's start.

use std::time::{Duration, Instant, SystemTime};

pub struct Clock {
    pub started: Instant,
    pub started_wall: SystemTime,
    pub tick: Duration,
    /// Whole ticks since `started`, as of the last `update`.
    pub now: u64,
    pub now_instant: Instant,
}

impl Clock {
    pub fn new(tick: Duration) -> Self {
        let started = Instant::now();
        Clock {
            started,
            started_wall: SystemTime::now(),
            tick,
            now: 0,
            now_instant: started,
        }
    }

    /// Reads the time.
    pub fn update(&mut self) {
        self.now_instant = Instant::now();
        let elapsed = self.now_instant - self.started;
        self.now = (elapsed.as_millis() / self.tick.as_millis().max(1)) as u64;
    }

    /// The current tick as the 32-bit value connections store.
    pub fn now32(&self) -> u32 {
        self.now as u32
    }

    /// Nanoseconds since start (inbound rate limits).
    pub fn now_ns(&self) -> u64 {
        (self.now_instant - self.started).as_nanos() as u64
    }

    /// When tick `t` begins.
    pub fn instant_of(&self, t: u32) -> Instant {
        self.started + self.tick * t
    }
}
