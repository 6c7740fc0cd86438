//! Failure back-off per source address for the password checks.
//!
//! After `failure_backoff_after` failed password checks in a row from one address (a
//! wrong password, or an unknown username), that address's password checks are refused
//! at once, without hashing, for `failure_backoff_secs`. A success resets its count. So
//! a password storm from a few addresses stops costing argon2 time after a few tries and
//! does not queue ahead of honest devices elsewhere; an honest device behind the storming
//! address waits out the back-off. It is per address, not per username: a per-username
//! back-off would let any attacker lock a known user out.
//!
//! At most [`MAX_TRACKED`] addresses are remembered; when full, entries whose back-off
//! is over are dropped, and if that frees nothing a new address is not tracked (the
//! hashing bound still holds for it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered at most.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    /// Refused until then (meaningful once `count` reached the threshold).
    until: Instant,
}

pub struct Backoff {
    /// 0 = off.
    after: u32,
    period: Duration,
    by_ip: Mutex<HashMap<IpAddr, Failures>>,
}

impl Backoff {
    pub fn new(after: u32, secs: u32) -> Backoff {
        Backoff {
            after,
            period: Duration::from_secs(secs.into()),
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    /// True while `ip` is backed off: its password checks are refused without hashing.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        if self.after == 0 {
            return false;
        }
        let map = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .is_some_and(|f| f.count >= self.after && Instant::now() < f.until)
    }

    /// Records the outcome of a password check from `ip`.
    pub fn record(&self, ip: IpAddr, success: bool) {
        if self.after == 0 {
            return;
        }
        let mut map = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if success {
            map.remove(&ip);
            return;
        }
        let now = Instant::now();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, f| f.count >= self.after && now < f.until);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let f = map.entry(ip).or_insert(Failures {
            count: 0,
            until: now,
        });
        if f.count >= self.after && now >= f.until {
            // The back-off is over: a fresh start, this failure counted.
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        if f.count >= self.after {
            f.until = now + self.period;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_after_the_threshold_and_a_success_resets() {
        let b = Backoff::new(3, 60);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        b.record(a, false);
        b.record(a, false);
        assert!(!b.blocked(a));
        b.record(a, true);
        b.record(a, false);
        b.record(a, false);
        assert!(!b.blocked(a), "the success reset the count");
        b.record(a, false);
        assert!(b.blocked(a));
        assert!(!b.blocked(other));
        let off = Backoff::new(0, 60);
        for _ in 0..10 {
            off.record(a, false);
        }
        assert!(!off.blocked(a));
    }

    #[test]
    fn the_back_off_ends() {
        let b = Backoff::new(1, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        b.record(a, false);
        assert!(!b.blocked(a), "a zero-second back-off is already over");
    }
}
