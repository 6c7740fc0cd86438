//! One shared clock per runtime instead of a timer per connection.
//!
//! A single task advances a tick counter every [`TICK`] and wakes the slot of a ring of
//! `Notify`s that belongs to the new tick. A connection that wants to wait (its next
//! PINGREQ, a handshake deadline, a reconnect backoff) parks on the slot of its due tick;
//! `Notified` is an intrusive waiter inside the task's own future, so a waiting
//! connection costs no allocation and no timer entry. Waits longer than one lap of the
//! ring simply wake once per lap and park again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub const TICK: Duration = Duration::from_millis(20);
const SLOTS: u64 = 4096; // one lap = 82 s

pub struct Ticker {
    now: AtomicU64,
    slots: Vec<Notify>,
}

impl Ticker {
    /// Creates the ring and spawns its driver on the current runtime.
    pub fn start() -> Arc<Ticker> {
        let t = Arc::new(Ticker {
            now: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| Notify::new()).collect(),
        });
        let driver = t.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(TICK);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            iv.tick().await;
            loop {
                iv.tick().await;
                let now = driver.now.fetch_add(1, Ordering::AcqRel) + 1;
                driver.slots[(now % SLOTS) as usize].notify_waiters();
            }
        });
        t
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }

    /// The tick `d` from now (at least one tick ahead for a non-zero `d`).
    pub fn after(&self, d: Duration) -> u64 {
        let ticks = d.as_micros().div_ceil(TICK.as_micros()) as u64;
        self.now() + ticks
    }

    /// Returns once tick `t` has been reached.
    pub async fn until(&self, t: u64) {
        loop {
            let slot = &self.slots[(t % SLOTS) as usize];
            // Registered before the check, so a tick between the two cannot be missed.
            let notified = slot.notified();
            if self.now() >= t {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_in_order_of_their_ticks() {
        let t = Ticker::start();
        let start = t.now();
        let a = t.clone();
        let b = t.clone();
        let late = tokio::spawn(async move {
            a.until(start + 5).await;
            a.now()
        });
        let early = tokio::spawn(async move {
            b.until(start + 2).await;
            b.now()
        });
        let (late, early) = (late.await.unwrap(), early.await.unwrap());
        assert!(early >= start + 2 && late >= start + 5);
        // A tick already reached returns at once.
        t.until(start).await;
    }
}
