//! `[store]`: where the durable store keeps persistent sessions, their messages and
//! retained messages, and how its group commits reach the disk (see `crate::store`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, ConfigError, Section};

/// `[store]`: the durable store of persistent sessions, their messages and retained
/// messages (see `crate::store`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub enabled: bool,
    /// A directory; the database file `gateway.redb` is inside it.
    pub path: PathBuf,
    pub durability: StoreDurability,
    /// Most changes in one write transaction (one group commit).
    pub max_batch: u32,
    /// Extra milliseconds the writer waits to gather a bigger group (0 = commit at once).
    pub commit_interval_ms: u32,
    /// With `eventual`: milliseconds between the fsyncs that make commits durable.
    pub sync_interval_ms: u32,
    /// Shard batches the writer's channel holds before shards keep theirs for next turn.
    pub queue_batches: u32,
    /// After a failed commit: milliseconds before the first reopen of the database; each
    /// failed attempt doubles the wait up to `reopen_backoff_max_ms`.
    pub reopen_backoff_min_ms: u32,
    pub reopen_backoff_max_ms: u32,
    /// Most bytes of changes one shard holds for the writer (handed over and not yet
    /// committed, or waiting for room in the channel); past it the shard refuses pushes
    /// the store would have to hold and reads no PUBLISH until it is back under.
    pub backlog_max_bytes: u64,
}

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDurability {
    /// Every commit is fsynced before anyone is told (a `queued` push is on disk).
    Immediate,
    /// Commits are not fsynced; an fsync follows within `sync_interval_ms`.
    Eventual,
}

impl StoreConfig {
    /// The first and the longest wait between reopens of a failed store.
    pub fn reopen_backoff(&self) -> (Duration, Duration) {
        let ms = |v: u32| Duration::from_millis(u64::from(v.max(1)));
        (
            ms(self.reopen_backoff_min_ms),
            ms(self.reopen_backoff_max_ms),
        )
    }
}

impl Section for StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let st = self;
        if st.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty".into()));
        }
        in_range("store.max_batch", st.max_batch, 1, 1_000_000)?;
        in_range("store.commit_interval_ms", st.commit_interval_ms, 0, 10_000)?;
        in_range("store.sync_interval_ms", st.sync_interval_ms, 1, 600_000)?;
        in_range("store.queue_batches", st.queue_batches, 1, 1_000_000)?;
        in_range(
            "store.reopen_backoff_min_ms",
            st.reopen_backoff_min_ms,
            1,
            60_000,
        )?;
        in_range(
            "store.reopen_backoff_max_ms",
            st.reopen_backoff_max_ms,
            st.reopen_backoff_min_ms,
            600_000,
        )?;
        in_range(
            "store.backlog_max_bytes",
            st.backlog_max_bytes,
            4096,
            1 << 40,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::invalid_key;
    use crate::config::Config;

    #[test]
    fn store_reopen_backoff_and_backlog_bound_are_checked_naming_their_keys() {
        let c = Config::default();
        assert_eq!(
            (c.store.reopen_backoff_min_ms, c.store.reopen_backoff_max_ms),
            (100, 10_000)
        );
        assert_eq!(
            invalid_key("[store]\nreopen_backoff_min_ms = 0\n"),
            "store.reopen_backoff_min_ms"
        );
        assert_eq!(
            invalid_key("[store]\nreopen_backoff_min_ms = 500\nreopen_backoff_max_ms = 400\n"),
            "store.reopen_backoff_max_ms"
        );
        assert_eq!(c.store.backlog_max_bytes, 16 << 20);
        assert_eq!(
            invalid_key("[store]\nbacklog_max_bytes = 100\n"),
            "store.backlog_max_bytes"
        );
    }
}
