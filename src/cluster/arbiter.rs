//! Who wins a client id across the fleet: the registry write that claims it, by
//! compare-and-set on the entry's revision, and the throttle on a client id that keeps
//! moving between nodes.
//!
//! - **One winner.** A node that accepted a connection claims its client id with a
//!   JetStream key-value *update* that expects the revision it just read (0: no entry yet).
//!   Two nodes claiming at the same instant cannot both succeed from the same revision:
//!   the loser of the race reads again and writes on top of the winner's entry, so the
//!   claims form one chain in revision order, each replacing exactly one predecessor,
//!   and the node of each replaced entry is asked to close its connection
//!   (`crate::cluster`, `takeover` subject). The last claim in revision order is the
//!   later connection, as MQTT wants (the later CONNECT takes the session over); its
//!   node is the one the registry names, and the only one left connected.
//! - **Only a session still here takes over.** A claim that finds another node's entry
//!   first asks whether the session is still here (online, or offline and persistent): a
//!   change applied late (the registry task behind) for a device that has since gone on
//!   to that node (its session ended here, or was handed over) must not close its newer
//!   connection there.
//! - **Flapping.** A node takes a given client id over from another node at most once
//!   per `cluster.takeover_min_interval_ms`; a connection that would take it over sooner
//!   is not written to the registry and is closed (MQTT 5 DISCONNECT 0x9F, connection
//!   rate exceeded), so a device bouncing between nodes in a tight loop costs the
//!   registry one read per connect, not a write, a takeover request and a delete.
//!
//! Everything here runs on the business pool (the registry writer), never on a shard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::ops_metrics::RegistryMetrics;

/// Claims lost to a concurrent write before the claim gives up (each retry reads the
/// winner's entry and writes on top of it, so more than a few means a storm).
const MAX_ATTEMPTS: u32 = 8;

/// What a claim of a client id came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The registry names this node now; `before` is the other node whose entry this
    /// claim replaced (asked to close its connection), if any.
    Won { before: Option<String> },
    /// Another node held it and this node took it over too recently: not written.
    Throttled { holder: String },
    /// Another node held it and the session here had ended by then (a late change, the
    /// device gone on to that node, say): not written.
    Gone,
}

/// The entry of `key` now: its revision (0: none) and the node it names (`None`: none,
/// or deleted).
pub(super) async fn read(
    clients: &kv::Store,
    key: &str,
    metrics: &RegistryMetrics,
) -> Result<(u64, Option<String>), String> {
    let entry = clients.entry(key).await;
    metrics.count("get", entry.is_ok());
    let entry = entry.map_err(|e| format!("get {key}: {e}"))?;
    Ok(match entry {
        Some(e) if e.operation == kv::Operation::Put => (
            e.revision,
            Some(String::from_utf8_lossy(&e.value).into_owned()),
        ),
        Some(e) => (e.revision, None),
        None => (0, None),
    })
}

/// Writes `key → node` on top of the entry of `revision`: `Ok(false)` when another write
/// came first.
pub(super) async fn write(
    clients: &kv::Store,
    key: &str,
    node: &str,
    revision: u64,
    metrics: &RegistryMetrics,
) -> Result<bool, String> {
    let value = Bytes::copy_from_slice(node.as_bytes());
    match clients.update(key, value, revision).await {
        Ok(_) => {
            metrics.count("update", true);
            Ok(true)
        }
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            metrics.conflict();
            Ok(false)
        }
        Err(e) => {
            metrics.count("update", false);
            Err(format!("update {key}: {e}"))
        }
    }
}

/// Claims `key` for `node` by compare-and-set, unless its session is no longer here
/// (`still_here`, asked once another node's entry is read: a takeover) or `throttle`
/// refuses a takeover from the node holding it.
pub async fn claim<F: std::future::Future<Output = bool>>(
    clients: &kv::Store,
    key: &str,
    node: &str,
    (throttle, still_here): (&Throttle, impl Fn() -> F),
    metrics: &RegistryMetrics,
) -> Result<Claim, String> {
    for _ in 0..MAX_ATTEMPTS {
        let (revision, holder) = read(clients, key, metrics).await?;
        let before = holder.filter(|h| h != node);
        if let Some(holder) = &before {
            if !still_here().await {
                return Ok(Claim::Gone);
            }
            if !throttle.allow(key, Instant::now()) {
                metrics.throttled.inc();
                return Ok(Claim::Throttled {
                    holder: holder.clone(),
                });
            }
        }
        if write(clients, key, node, revision, metrics).await? {
            return Ok(Claim::Won { before });
        }
    }
    Err(format!(
        "claim {key}: lost to concurrent writes {MAX_ATTEMPTS} times"
    ))
}

/// When this node last took each client id over from another node, for
/// `cluster.takeover_min_interval_ms`. Entries older than the interval are dropped once
/// the map doubles, so it holds about the ids taken over within one interval.
pub struct Throttle {
    interval: Duration,
    last: Mutex<HashMap<Arc<str>, Instant>>,
    /// Size after the last prune; the next one comes at twice that.
    pruned_at: Mutex<usize>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: Mutex::default(),
            pruned_at: Mutex::new(1024),
        }
    }

    /// Whether a takeover of `key` may happen at `now` (and records it if so).
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last.get(key) {
            if now.saturating_duration_since(*at) < self.interval {
                return false;
            }
        }
        last.insert(key.into(), now);
        let mut mark = self.pruned_at.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= *mark * 2 {
            last.retain(|_, at| now.saturating_duration_since(*at) < self.interval);
            *mark = last.len().max(1024);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_taken_over_at_most_once_per_interval() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(t.allow("a", t0));
        assert!(!t.allow("a", t0 + Duration::from_millis(999)));
        assert!(
            t.allow("b", t0 + Duration::from_millis(10)),
            "per client id"
        );
        assert!(t.allow("a", t0 + Duration::from_millis(1000)));
        let off = Throttle::new(Duration::ZERO);
        assert!(off.allow("a", t0) && off.allow("a", t0));
    }

    #[test]
    fn old_entries_are_pruned() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..2047 {
            assert!(t.allow(&format!("old-{i}"), t0));
        }
        // The 2048th entry doubles the map: the old ones go.
        let later = t0 + Duration::from_secs(2);
        assert!(t.allow("new", later));
        assert_eq!(
            t.last.lock().unwrap().len(),
            1,
            "only the recent one is kept"
        );
    }
}
