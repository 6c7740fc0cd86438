//! Publisher backpressure, the lossless alternative to shedding QoS 0
//! (`[buffers] slow_consumer = "backpressure"`).
//!
//! By default a subscriber above its outbound high watermark loses QoS 0 messages, so one
//! slow device slows nobody. A data pipeline fanning a stream out to a few consumers wants
//! the opposite: nothing lost, the publishers slowed to what the consumers take. Here a
//! connection above the high watermark is *congested*: it still gets QoS 0 (up to
//! `outbound_max_bytes`), each shard publishes how many congested connections it has,
//! and while any shard has one, no shard handles PUBLISH packets — the frame and what
//! follows it on that connection are held (the same holding the inbound rate limit
//! uses; a PUBLISH larger than one read stops being read), and TCP carries the wait
//! back to the publisher. Clients that are not publishing are read as usual, so the
//! subscribers' acknowledgements keep flowing. A held connection is not timed out for
//! keep-alive (its PINGREQs wait behind the held PUBLISH), and a congested subscriber
//! must get back under the low watermark within `write_stall_timeout_secs` or it is
//! closed: the slowest consumer paces the publishers, but only for so long.
//!
//! While publishers are held, each shard looks at them again every millisecond
//! (`RECHECK`): the work is proportional to the held publishers, which in a pipeline
//! are few.
//!
//! Why gateway-wide and not per publisher → subscriber edge: a message from shard A
//! reaches shard B's subscribers through B's mailbox, so A would need B's verdict per
//! message, and every pause would need a matching resume across shards keyed by a
//! connection that may be gone. One counter per shard is exact, needs no bookkeeping
//! on close beyond the connection's own flag, and is what a pipeline wants anyway:
//! the slowest consumer paces the stream. The price (one slow subscriber pauses every
//! publisher) is why this is opt-in, and why a subscriber that stops reading is closed
//! after `write_stall_timeout_secs` (its congestion ends with it).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::Shard;
use crate::metrics::ShardMetrics;

/// How often a shard with held publishers looks again at the other shards' congestion
/// (a remote shard's relief sends no event to this one).
pub(super) const RECHECK: Duration = Duration::from_millis(1);

/// Congested connections per shard, written by each shard for its own slot and read by
/// all of them.
pub struct Congestion {
    per_shard: Box<[AtomicU32]>,
}

impl Congestion {
    pub fn new(shards: usize) -> Congestion {
        Congestion {
            per_shard: (0..shards).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// True if any shard has a congested connection.
    pub fn any(&self) -> bool {
        self.per_shard.iter().any(|c| c.load(Ordering::Relaxed) > 0)
    }

    fn set(&self, shard: usize, n: u32) {
        self.per_shard[shard].store(n, Ordering::Relaxed);
    }
}

impl Shard {
    /// True when PUBLISH packets must not be read now: backpressure is on and some
    /// subscriber is congested, or this shard's messages for another shard are waiting
    /// for room in its mailbox.
    pub(super) fn backpressured(&self) -> bool {
        self.settings.backpressure
            && (self.routing.outbox_blocked || self.services.congestion.any())
    }

    /// Marks connection `key` congested (it was just given output above the high
    /// watermark); it stays so until `flush_conn` drains it below the low watermark.
    pub(super) fn note_congested(&mut self, key: usize) {
        if !self.settings.backpressure {
            return;
        }
        let conn = &mut self.wire.conns[key];
        if !conn.congested {
            conn.congested = true;
            self.congested += 1;
            self.services.congestion.set(self.id, self.congested);
        }
    }

    /// Connection `key` drained below the low watermark.
    pub(super) fn clear_congested(&mut self, key: usize) {
        if let Some(conn) = self.wire.conns.get_mut(key).filter(|c| c.congested) {
            conn.congested = false;
            self.uncount_congested();
        }
    }

    /// A congested connection is gone (closed) or drained.
    pub(super) fn uncount_congested(&mut self) {
        self.congested -= 1;
        self.services.congestion.set(self.id, self.congested);
    }

    /// Stops reading connection `key` at a PUBLISH while the gateway is backpressured.
    pub(super) fn hold_publisher(&mut self, key: usize) {
        if self.wire.paused.insert(key as u32) {
            ShardMetrics::add(&self.services.metrics.publisher_pauses, 1);
        }
        self.wake_no_later_than(self.clock.now_instant + RECHECK);
    }

    /// True if what connection `key` has read but not handled starts with a PUBLISH:
    /// frames held at a pause, or else the start of a frame larger than one read.
    pub(super) fn holds_publish(&self, key: usize) -> bool {
        self.wire
            .conns
            .get(key)
            .filter(|c| c.state == super::ConnState::Active)
            .and_then(|c| c.bufs.as_ref())
            .and_then(|b| b.held.first().or(b.inbuf.first()))
            .is_some_and(|&b| super::packet::type_of(b) == super::packet::PUBLISH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_shard_congested_is_seen_by_all() {
        let c = Congestion::new(3);
        assert!(!c.any());
        c.set(2, 1);
        assert!(c.any());
        c.set(2, 0);
        c.set(0, 4);
        assert!(c.any());
        c.set(0, 0);
        assert!(!c.any());
    }
}
