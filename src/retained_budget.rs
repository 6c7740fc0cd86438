//! Byte bounds on retained messages: gateway-wide (`[mqtt] max_retained_bytes`) and per
//! client (`max_retained_bytes_per_client`).
//!
//! `max_retained_messages` bounds the count only, so devices could pin 100,000 × 1 MiB of
//! memory and disk. Each shard keeps a full copy of the retained messages, applied in the
//! order each topic's home shard decided (`shard/retained.rs`), so each shard keeps one
//! [`RetainedBudget`] that mirrors its copy: the bytes of every retained topic (topic plus
//! payload), and for the topics last set by a client homed on this shard, that client.
//! A client's PUBLISHes are handled on its home shard, which counts them at once (before
//! the topic's home decides), so it knows both totals when it decides on a retained
//! PUBLISH ([`RetainedBudget::admit`]). The gateway-wide view of a shard can lag the
//! others by the retained updates they accepted in the same moment; the bound may be
//! passed by that much.
//!
//! Retained messages pushed by the backend (HTTP API) count toward the gateway-wide total
//! but are not refused by it: the backend is trusted (as with ACLs).

use std::collections::HashMap;
use std::sync::Arc;

/// Why a retained PUBLISH was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverBudget {
    /// `max_retained_bytes` (gateway-wide) would be passed.
    Gateway,
    /// `max_retained_bytes_per_client` would be passed.
    Client,
}

impl OverBudget {
    /// The config key of the bound, for the log.
    pub(crate) fn key(self) -> &'static str {
        match self {
            OverBudget::Gateway => "mqtt.max_retained_bytes",
            OverBudget::Client => "mqtt.max_retained_bytes_per_client",
        }
    }
}

struct Entry {
    bytes: usize,
    /// The client that set it, when homed on this shard.
    owner: Option<Arc<str>>,
}

/// One shard's mirror of the retained bytes.
pub(crate) struct RetainedBudget {
    /// 0 = no bound.
    max_total: usize,
    /// 0 = no bound.
    max_per_client: usize,
    total: usize,
    topics: HashMap<Arc<str>, Entry>,
    per_client: HashMap<Arc<str>, usize>,
}

/// What a retained message costs: its topic and payload.
pub(crate) fn cost(topic: &str, payload: &[u8]) -> usize {
    topic.len() + payload.len()
}

impl RetainedBudget {
    pub(crate) fn new(max_total: u64, max_per_client: u64) -> RetainedBudget {
        RetainedBudget {
            max_total: usize::try_from(max_total).unwrap_or(usize::MAX),
            max_per_client: usize::try_from(max_per_client).unwrap_or(usize::MAX),
            total: 0,
            topics: HashMap::new(),
            per_client: HashMap::new(),
        }
    }

    /// May `client` (homed on this shard) set `topic` to a retained message of `bytes`
    /// (see [`cost`])? Replacing its own message counts only the difference.
    pub(crate) fn admit(&self, client: &str, topic: &str, bytes: usize) -> Result<(), OverBudget> {
        let old = self.topics.get(topic);
        let freed = old.map_or(0, |e| e.bytes);
        if self.max_total > 0 && self.total - freed + bytes > self.max_total {
            return Err(OverBudget::Gateway);
        }
        let mine = self.per_client.get(client).copied().unwrap_or(0);
        let freed_mine = match old {
            Some(e) if e.owner.as_deref() == Some(client) => e.bytes,
            _ => 0,
        };
        if self.max_per_client > 0 && mine - freed_mine + bytes > self.max_per_client {
            return Err(OverBudget::Client);
        }
        Ok(())
    }

    /// `topic` now holds a retained message of `bytes`, set by `owner` when that client is
    /// homed on this shard.
    pub(crate) fn set(&mut self, topic: &Arc<str>, bytes: usize, owner: Option<Arc<str>>) {
        self.remove(topic);
        if let Some(o) = &owner {
            *self.per_client.entry(o.clone()).or_insert(0) += bytes;
        }
        self.total += bytes;
        self.topics.insert(topic.clone(), Entry { bytes, owner });
    }

    /// `topic` no longer holds a retained message (deleted, expired).
    pub(crate) fn remove(&mut self, topic: &str) {
        let Some(old) = self.topics.remove(topic) else {
            return;
        };
        self.total -= old.bytes;
        if let Some(o) = old.owner {
            if let Some(n) = self.per_client.get_mut(&o) {
                *n -= old.bytes;
                if *n == 0 {
                    self.per_client.remove(&o);
                }
            }
        }
    }

    #[cfg(test)]
    /// Retained bytes this shard knows of (the gateway-wide total as this shard sees it).
    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn bounds_per_client_and_gateway_wide_with_replacement_and_removal() {
        let mut b = RetainedBudget::new(100, 40);
        let (a, c) = (arc("a"), arc("c"));
        assert_eq!(b.admit("a", "t1", 30), Ok(()));
        b.set(&arc("t1"), 30, Some(a.clone()));
        assert_eq!(b.admit("a", "t2", 20), Err(OverBudget::Client));
        // Replacing its own message counts the difference only.
        assert_eq!(b.admit("a", "t1", 40), Ok(()));
        assert_eq!(b.admit("a", "t1", 41), Err(OverBudget::Client));
        b.set(&arc("x"), 60, None); // from another shard or the backend
        assert_eq!(b.total(), 90);
        assert_eq!(b.admit("c", "t3", 20), Err(OverBudget::Gateway));
        // c replacing a's topic frees a's bytes in the gateway-wide count.
        assert_eq!(b.admit("c", "t1", 35), Ok(()));
        b.set(&arc("t1"), 35, Some(c.clone()));
        assert_eq!(b.admit("a", "t2", 40), Err(OverBudget::Gateway));
        b.remove("x");
        assert_eq!(b.admit("a", "t2", 40), Ok(()));
        b.remove("t1");
        assert_eq!(b.total(), 0);
        assert!(b.per_client.is_empty());
        let unbounded = RetainedBudget::new(0, 0);
        assert_eq!(unbounded.admit("a", "t", usize::MAX / 2), Ok(()));
    }
}
