//! Which of a shard's subscribe barriers NATS has confirmed (see the routing module doc,
//! "A SUBACK means the fleet can reach the subscriber"): per shard the highest confirmed
//! ticket, and whether the messages connection's resubscription is confirmed since it
//! last connected. The routing task writes these; the shards read them each turn.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::mailbox::{Mailboxes, ShardMsg};

/// Per shard, the highest [`Interest::Barrier`](super::Interest::Barrier) ticket whose subscriptions NATS has (or
/// that was let go because the routing connection ended); and whether the messages
/// connection's subscriptions are all in NATS since it last connected (the PONG of a
/// PING after its resubscription).
pub struct Subscribed {
    confirmed: Box<[AtomicU64]>,
    ready: AtomicBool,
    /// The PONG after the last words of a stopping node (`last_words.rs`) was read.
    last_words: Notify,
}

/// The barrier "shard" of the PING written after a connection's resubscription.
pub(super) const RESUBSCRIBED: u16 = u16::MAX;
/// The barrier "shard" of the PING written after a stopping node's last messages.
pub(super) const LAST_WORDS: u16 = u16::MAX - 1;

impl Subscribed {
    pub(super) fn new() -> Self {
        Subscribed {
            confirmed: (0..crate::config::MAX_THREADS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            ready: AtomicBool::new(false),
            last_words: Notify::new(),
        }
    }

    /// Resolves once the PING after the last words is answered (or its connection
    /// ended); at once if that happened before.
    pub(super) async fn last_words_read(&self) {
        self.last_words.notified().await;
    }

    /// Whether NATS holds every subscription the messages connection had when it
    /// (re)connected: until then a SUBACK waits for a barrier even for a filter its shard
    /// already held.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The messages connection ended: its resubscription is to be confirmed again.
    pub(super) fn disconnected(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// The highest ticket of shard `shard` confirmed so far.
    pub fn confirmed(&self, shard: usize) -> u64 {
        self.confirmed
            .get(shard)
            .map_or(u64::MAX, |c| c.load(Ordering::Acquire))
    }

    /// Confirms `done` (shard, ticket) and wakes those shards.
    pub(super) fn confirm(&self, done: &[(u16, u64)], shards: &Mailboxes) {
        for &(shard, ticket) in done {
            if shard == RESUBSCRIBED {
                self.ready.store(true, Ordering::Release);
            } else if shard == LAST_WORDS {
                self.last_words.notify_one();
            } else if let Some(c) = self.confirmed.get(usize::from(shard)) {
                c.fetch_max(ticket, Ordering::AcqRel);
            }
        }
        let mut woken: Vec<u16> = (done.iter().map(|d| d.0))
            .filter(|&s| s != RESUBSCRIBED && s != LAST_WORDS)
            .collect();
        woken.sort_unstable();
        woken.dedup();
        for shard in woken {
            // A full mailbox means a busy shard: it looks at the tickets every turn.
            let _ = shards.try_send(usize::from(shard), ShardMsg::FleetSubscribed);
        }
    }
}
