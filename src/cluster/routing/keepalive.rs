//! Whether a routing connection's server still answers, as the connection's writer
//! judges it: a NATS server that hangs (stopped, or behind a path that drops packets)
//! keeps the TCP connection open and sends nothing, and a node that waits on it holds
//! its publishers back.
//!
//! The reader notes every read, and when it waits for room in the shards' mailboxes
//! (the node is slow, not NATS: it stops reading on purpose). The writer, every
//! `every`, pings the server when nothing was read for that long, and gives the
//! connection up once nothing was read for [`SILENT_PINGS`] × `every` while the reader
//! was not waiting on the shards. Any bytes count, not only PONGs, as in async-nats.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Intervals without a byte from the server after which the connection is given up.
pub(super) const SILENT_PINGS: u32 = 3;

pub(super) struct Keepalive {
    started: Instant,
    /// Milliseconds from `started` to the last read, or to the end of the last wait on
    /// the shards.
    last_ms: AtomicU64,
    waiting_on_shards: AtomicBool,
}

/// What the writer does at a tick.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tick {
    Nothing,
    Ping,
    GiveUp,
}

impl Keepalive {
    pub(super) fn new() -> Keepalive {
        Keepalive {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_on_shards: AtomicBool::new(false),
        }
    }

    /// The reader read something (or stopped waiting on the shards).
    pub(super) fn heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Release);
    }

    /// The reader waits for room in the shards' mailboxes (`true`) or is done waiting.
    pub(super) fn waiting_on_shards(&self, waiting: bool) {
        if !waiting {
            // Before the flag: a tick between the two must not see an old `last_ms`.
            self.heard();
        }
        self.waiting_on_shards.store(waiting, Ordering::Release);
    }

    /// At a tick of the writer's `every`.
    pub(super) fn tick(&self, every: Duration) -> Tick {
        self.tick_at(self.started.elapsed(), every)
    }

    fn tick_at(&self, now: Duration, every: Duration) -> Tick {
        if self.waiting_on_shards.load(Ordering::Acquire) {
            return Tick::Nothing;
        }
        let silent =
            now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Acquire)));
        if silent >= every * SILENT_PINGS {
            Tick::GiveUp
        } else if silent >= every {
            Tick::Ping
        } else {
            Tick::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_server_is_pinged_then_given_up_unless_the_node_is_the_slow_one() {
        let k = Keepalive::new();
        let (s, every) = (Duration::from_secs, Duration::from_secs(2));
        assert_eq!(k.tick_at(s(1), every), Tick::Nothing);
        assert_eq!(k.tick_at(s(2), every), Tick::Ping);
        assert_eq!(k.tick_at(s(5), every), Tick::Ping);
        assert_eq!(k.tick_at(s(6), every), Tick::GiveUp);
        // The reader waiting on the shards: the server is not to blame.
        k.waiting_on_shards(true);
        assert_eq!(k.tick_at(s(60), every), Tick::Nothing);
        k.waiting_on_shards(false);
        let now = k.started.elapsed();
        assert_eq!(k.tick_at(now + s(1), every), Tick::Nothing);
        assert_eq!(k.tick_at(now + s(7), every), Tick::GiveUp);
    }
}
