//! Overload protection state (`[limits]`): the per-shard connect-rate bucket, the
//! gateway-wide count of connections per IP, and each connection's inbound rate debt.
//!
//! Everything here is touched on accept, on close, or per read: never per idle
//! connection per tick. The per-IP table is the only state shared between shards
//! (SO_REUSEPORT spreads one address's connections over all of them); it is striped so
//! two shards accepting at once rarely meet on a lock.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` 0 = unlimited.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether a token is there (refilling first); [`take`](Self::take) spends it.
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Spends one token (after [`ready`](Self::ready); never goes below zero).
    pub(crate) fn take(&mut self) {
        if self.rate != 0.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
        }
    }

    #[cfg(test)]
    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until one token is there.
    pub(crate) fn wait(&self) -> std::time::Duration {
        if self.rate == 0.0 || self.tokens >= 1.0 {
            return std::time::Duration::ZERO;
        }
        std::time::Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

/// One inbound limit as a GCRA (the "virtual scheduling" form of a token bucket): one
/// number per connection, the theoretical arrival time. A unit costs `interval_ns`; a
/// connection may run `tolerance_ns` (= burst × interval) ahead of its schedule.
#[derive(Clone, Copy, Debug)]
pub struct Gcra {
    interval_ns: u64,
    tolerance_ns: u64,
}

impl Gcra {
    /// `None` when `rate` is 0 (unlimited).
    pub fn new(rate: u32, burst: u32) -> Option<Gcra> {
        (rate > 0).then(|| {
            let interval_ns = (1_000_000_000 / u64::from(rate)).max(1);
            Gcra {
                interval_ns,
                tolerance_ns: interval_ns * u64::from(burst.max(1)),
            }
        })
    }

    /// Charges `units` to the arrival time `tat`.
    pub fn charge(&self, tat: &mut u64, now_ns: u64, units: u64) {
        *tat = (*tat).max(now_ns) + units.saturating_mul(self.interval_ns);
    }

    /// Nanoseconds until `tat` is back within the burst (0 = may go on).
    pub fn over_by(&self, tat: u64, now_ns: u64) -> u64 {
        tat.saturating_sub(now_ns).saturating_sub(self.tolerance_ns)
    }
}

/// A connection's inbound debt: GCRA arrival times for PUBLISH packets and for bytes,
/// in nanoseconds of the shard's clock (0 = never charged).
#[derive(Clone, Copy, Debug, Default)]
pub struct RateDebt {
    pub msgs: u64,
    pub bytes: u64,
}

impl RateDebt {
    /// No debt left: forgetting this state changes nothing.
    pub fn is_settled(&self, now_ns: u64) -> bool {
        self.msgs <= now_ns && self.bytes <= now_ns
    }
}

/// The per-connection inbound limits of `[limits]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct InboundLimits {
    pub msgs: Option<Gcra>,
    pub bytes: Option<Gcra>,
}

impl InboundLimits {
    pub fn enabled(&self) -> bool {
        self.msgs.is_some() || self.bytes.is_some()
    }

    /// Nanoseconds until the connection may be read again (0 = now).
    pub fn over_by(&self, d: &RateDebt, now_ns: u64) -> u64 {
        let m = self.msgs.map_or(0, |g| g.over_by(d.msgs, now_ns));
        let b = self.bytes.map_or(0, |g| g.over_by(d.bytes, now_ns));
        m.max(b)
    }
}

const STRIPES: usize = 64;

/// Open connections per IP address across all shards (`max_connections_per_ip`).
pub struct PerIpLimit {
    max: u32,
    stripes: Box<[Mutex<HashMap<IpAddr, u32>>]>,
}

impl PerIpLimit {
    /// `max` 0 = unlimited (nothing is counted).
    pub fn new(max: u32) -> Self {
        let n = if max == 0 { 0 } else { STRIPES };
        PerIpLimit {
            max,
            stripes: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn stripe(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let mut h = std::hash::DefaultHasher::new();
        ip.hash(&mut h);
        &self.stripes[(h.finish() as usize) % self.stripes.len()]
    }

    /// Counts one more connection from `ip`; false (and nothing counted) at the limit.
    pub fn acquire(&self, ip: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let mut map = self
            .stripe(&ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// One connection from `ip` counted by [`acquire`](Self::acquire) has closed.
    pub fn release(&self, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let mut map = self
            .stripe(&ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Connections counted for `ip` (tests).
    pub fn count(&self, ip: IpAddr) -> u32 {
        if self.max == 0 {
            return 0;
        }
        let map = self
            .stripe(&ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(b.wait() > Duration::ZERO);
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        let mut unlimited = TokenBucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| unlimited.try_take(t0)));
    }

    #[test]
    fn gcra_allows_burst_then_rate() {
        let g = Gcra::new(10, 5).unwrap(); // 100 ms per unit, 500 ms ahead allowed
        let mut tat = 0;
        let now = 1_000_000_000;
        for _ in 0..5 {
            g.charge(&mut tat, now, 1);
            assert_eq!(g.over_by(tat, now), 0);
        }
        g.charge(&mut tat, now, 1);
        assert_eq!(g.over_by(tat, now), 100_000_000);
        assert_eq!(g.over_by(tat, now + 100_000_000), 0);
        assert!(Gcra::new(0, 5).is_none());
        let d = RateDebt {
            msgs: tat,
            bytes: 0,
        };
        assert!(!d.is_settled(now));
        assert!(d.is_settled(tat));
    }

    #[test]
    fn per_ip_counts_and_releases() {
        let l = PerIpLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        assert!(l.acquire(a) && l.acquire(a));
        assert!(!l.acquire(a));
        assert!(l.acquire(b));
        l.release(a);
        assert_eq!(l.count(a), 1);
        assert!(l.acquire(a));
        l.release(a);
        l.release(a);
        assert_eq!(l.count(a), 0);
        let off = PerIpLimit::new(0);
        assert!((0..100).all(|_| off.acquire(a)));
    }
}
