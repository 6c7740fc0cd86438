//! The receiving side of a device: duplicate detection by sequence number, the device's
//! own counts (for the per-subscriber report), and the tally of one read that is added
//! to the fleet's shared counters once per read.

use std::collections::HashSet;

/// Duplicate detection per device.
pub(super) enum Dedup {
    Set(HashSet<u64>),
    Ordered(Option<u64>),
}

impl Dedup {
    /// True if `seq` is new.
    pub(super) fn insert(&mut self, seq: u64) -> bool {
        match self {
            Dedup::Set(s) => s.insert(seq),
            Dedup::Ordered(max) => {
                if max.is_some_and(|m| seq <= m) {
                    false
                } else {
                    *max = Some(seq);
                    true
                }
            }
        }
    }
}

/// One device's duplicate detection and its own running counts.
pub(super) struct Inbox {
    pub(super) dedup: Dedup,
    pub(super) unique: u64,
    pub(super) duplicates: u64,
}

/// What the messages of one read brought, added to the fleet's shared counters once per
/// read instead of once per message.
pub(super) struct Tally {
    /// When the read returned: the receive time of every message in it.
    pub(super) now_ns: u64,
    pub(super) received: u64,
    pub(super) unique: u64,
    pub(super) duplicates: u64,
    pub(super) foreign: u64,
    pub(super) latencies_us: Vec<u64>,
}

impl Tally {
    pub(super) fn new(now_ns: u64) -> Tally {
        Tally {
            now_ns,
            received: 0,
            unique: 0,
            duplicates: 0,
            foreign: 0,
            latencies_us: Vec::new(),
        }
    }

    pub(super) fn message(&mut self, stamp: Option<(u64, u64)>, inbox: &mut Inbox) {
        self.received += 1;
        let Some((seq, sent_ns)) = stamp else {
            self.foreign += 1;
            return;
        };
        if inbox.dedup.insert(seq) {
            self.unique += 1;
            inbox.unique += 1;
            self.latencies_us
                .push(self.now_ns.saturating_sub(sent_ns) / 1000);
        } else {
            self.duplicates += 1;
            inbox.duplicates += 1;
        }
    }
}
