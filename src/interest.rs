//! Which shards may hold a subscription matching a topic, so a message published on one
//! shard (or pushed by topic from the business pool) is handed only to the shards that
//! can use it instead of to every shard.
//!
//! Each shard has a counting filter: a table of atomic counters, shared by every shard and
//! the business pool. A subscription adds one to the bucket of its filter's *key* in the
//! table of the shard that matches it (the session's home shard; for a `$share/` group, the
//! group's owner shard), and takes it away when it goes. The key of a filter without
//! wildcards is the filter itself; the key of a wildcard filter is the levels before its
//! first wildcard level, and how many there are (`a/b/+/c` → (`a/b`, 2), `#` → (``, 0)).
//! A topic of `n` levels can only be matched by a filter whose key is the topic itself or
//! one of its `n + 1` prefixes, so the sender checks `n + 2` buckets per shard.
//!
//! Invariants:
//! - No false negatives: while a shard holds a subscription matching `topic`, one of the
//!   buckets `may_match` checks for it is non-zero. The count is raised (Release) before
//!   the SUBACK is written and read (Acquire) when a message is routed, so a message read
//!   after the subscriber saw its SUBACK finds it.
//! - False positives (colliding buckets, a `+` that needs one more level, `$` topics
//!   under a leading wildcard) only cost a hop: the receiving shard matches exactly.
//! - Every add has exactly one remove (the callers tie both to a session's subscription
//!   list gaining and losing the entry), so a count never goes below what is subscribed.
//!   Counters are one byte and stick at 255: a bucket that many subscriptions share
//!   stays busy (a false positive) rather than wrap.
//!
//! Memory: one byte per bucket per shard (`interest_buckets`, default 64 Ki: 64 KiB per
//! shard), allocated zeroed so only the pages subscriptions touch become resident.
//!
//! With `[shards] interest_buckets = 0`, or a topic deeper than [`MAX_LEVELS`], every
//! shard may match.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::mailbox::home_shard;
use crate::topic::parse_shared;

/// A bucket counted this high stays there: one byte per bucket, and a filter that
/// thousands subscribe to (a broadcast topic) keeps its bucket busy for good.
const STUCK: u8 = u8::MAX;

/// Topics with more levels than this go to every shard (their keys would not fit the
/// fixed array [`TopicKeys`] keeps on the stack).
pub const MAX_LEVELS: usize = 30;

/// Counting filters of the shards' subscriptions.
pub struct ShardInterest {
    /// Per shard; empty when off.
    tables: Box<[Box<[AtomicU8]>]>,
    /// `buckets - 1` (buckets is a power of two).
    mask: u64,
}

/// The bucket hashes a topic can be matched under: the whole topic, then each prefix.
pub struct TopicKeys {
    keys: [u64; MAX_LEVELS + 2],
    /// How many of `keys` are used; 0 = the topic is too deep, every shard may match.
    len: usize,
}

impl ShardInterest {
    /// Tables of `buckets` counters (rounded up to a power of two) for `shards` shards;
    /// `buckets == 0` turns the filter off.
    pub fn new(shards: usize, buckets: usize) -> Self {
        if buckets == 0 {
            return ShardInterest {
                tables: Box::new([]),
                mask: 0,
            };
        }
        let buckets = buckets.next_power_of_two();
        let tables = (0..shards).map(|_| zeroed_counters(buckets)).collect();
        ShardInterest {
            tables,
            mask: buckets as u64 - 1,
        }
    }

    /// Off: every shard may match every topic.
    pub fn off() -> Self {
        Self::new(0, 0)
    }

    fn enabled(&self) -> bool {
        !self.tables.is_empty()
    }

    /// A subscription to `filter` (as the client sent it, `$share/` included) now exists
    /// for a session living on shard `home`.
    pub fn add(&self, home: usize, filter: &str) {
        if let Some((shard, bucket)) = self.slot(home, filter) {
            // Saturating: a bucket that reached STUCK stays there (a permanent false
            // positive, never a false negative).
            let counter = &self.tables[shard][bucket];
            let _ = counter.fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                (n < STUCK).then(|| n + 1)
            });
        }
    }

    /// The subscription [`ShardInterest::add`] counted is gone.
    pub fn remove(&self, home: usize, filter: &str) {
        if let Some((shard, bucket)) = self.slot(home, filter) {
            let counter = &self.tables[shard][bucket];
            let before = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n != STUCK && n != 0).then(|| n - 1)
            });
            debug_assert!(
                before != Err(0),
                "interest removed more often than added: {filter}"
            );
        }
    }

    /// The shard that matches `filter` for a session on `home`, and the bucket of its key.
    fn slot(&self, home: usize, filter: &str) -> Option<(usize, usize)> {
        if !self.enabled() {
            return None;
        }
        let (shard, inner) = match parse_shared(filter) {
            Some((group, inner)) => {
                let key = format!("{group}/{inner}");
                (home_shard(&key, self.tables.len()), inner)
            }
            None => (home, filter),
        };
        Some((shard, self.bucket(filter_key(inner))))
    }

    fn bucket(&self, hash: u64) -> usize {
        (hash & self.mask) as usize
    }

    /// Whether `shard` may hold a subscription matching the topic of `keys`.
    pub fn may_match(&self, shard: usize, keys: &TopicKeys) -> bool {
        if !self.enabled() || keys.len == 0 {
            return true;
        }
        let table = &self.tables[shard];
        keys.keys[..keys.len]
            .iter()
            .any(|&h| table[self.bucket(h)].load(Ordering::Acquire) != 0)
    }

    /// The buckets in use on `shard`.
    pub fn occupied(&self, shard: usize) -> usize {
        self.tables.get(shard).map_or(0, |t| {
            t.iter().filter(|c| c.load(Ordering::Relaxed) != 0).count()
        })
    }

    /// The subscriptions counted for `shard` (the sum of its buckets).
    pub fn total(&self, shard: usize) -> u64 {
        self.tables.get(shard).map_or(0, |t| {
            t.iter().map(|c| u64::from(c.load(Ordering::Relaxed))).sum()
        })
    }
}

impl TopicKeys {
    /// The keys `topic` (a topic name, no wildcards) can be matched under.
    pub fn of(topic: &str) -> TopicKeys {
        let mut keys = TopicKeys {
            keys: [0; MAX_LEVELS + 2],
            len: 0,
        };
        let bytes = topic.as_bytes();
        let mut h = Fnv::new();
        let mut level = 0;
        let mut n = 0;
        // The prefix of 0 levels: the key of `#` and `+/...`.
        keys.keys[n] = prefix_key(h.0, 0);
        n += 1;
        for &b in bytes {
            if b == b'/' {
                level += 1;
                if level > MAX_LEVELS - 1 {
                    return keys; // len 0: too deep
                }
                keys.keys[n] = prefix_key(h.0, level);
                n += 1;
            }
            h.byte(b);
        }
        keys.keys[n] = prefix_key(h.0, level + 1);
        keys.keys[n + 1] = exact_key(h.0);
        keys.len = n + 2;
        keys
    }
}

/// `n` counters at zero, from zeroed memory: the pages are the kernel's zero page until
/// a subscription first counts in them, so an unused table costs no resident memory.
fn zeroed_counters(n: usize) -> Box<[AtomicU8]> {
    let zeros: Box<[u8]> = vec![0u8; n].into_boxed_slice();
    // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8, and the box
    // is moved, so nothing else refers to the memory.
    unsafe { Box::from_raw(Box::into_raw(zeros) as *mut [AtomicU8]) }
}

/// The key hash of a filter (no `$share/` prefix).
fn filter_key(filter: &str) -> u64 {
    let mut h = Fnv::new();
    let mut start = 0usize;
    for (level, part) in filter.split('/').enumerate() {
        if part == "+" || part == "#" {
            // The bytes before this level, without its leading '/'.
            let mut p = Fnv::new();
            for &b in &filter.as_bytes()[..start.saturating_sub(1)] {
                p.byte(b);
            }
            return prefix_key(p.0, level);
        }
        start += part.len() + 1;
    }
    for &b in filter.as_bytes() {
        h.byte(b);
    }
    exact_key(h.0)
}

fn prefix_key(hash: u64, levels: usize) -> u64 {
    mix(hash ^ (levels as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn exact_key(hash: u64) -> u64 {
    mix(hash ^ 0xD6E8_FEB8_6659_FD93)
}

/// The finaliser of splitmix64: spreads FNV's low-entropy low bits over the word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, fed a byte at a time so one pass over a topic yields every prefix's hash.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xCBF2_9CE4_8422_2325)
    }

    fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
}

#[cfg(test)]
mod tests;
