//! `[shards]`: the IO threads, their mailboxes and their timing wheels. That the tick is
//! finer than the shortest timeout is a cross-section rule, checked in `config/mod.rs`.

use std::time::Duration;

use serde::Deserialize;

use super::{at_least, in_range, ConfigError, Section, MAX_THREADS};

/// `[shards]`: the IO threads and their timing wheels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsConfig {
    /// 0 = one per available core; see [`Config::shard_count`].
    pub count: usize,
    pub mailbox_capacity: u32,
    /// The most bytes of messages from other shards waiting in one shard's mailbox.
    pub mailbox_max_bytes: u64,
    /// Buckets of each shard's interest filter (`crate::interest`); 0 = off.
    pub interest_buckets: u32,
    pub tick_ms: u32,
    pub expiry_batch: u32,
    pub pin_cores: bool,
    pub drain_timeout_secs: u32,
}

impl ShardsConfig {
    /// `tick_ms` as a duration: the timing wheel's resolution.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(u64::from(self.tick_ms))
    }
}

impl Section for ShardsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        in_range("shards.count", self.count, 0, MAX_THREADS)?;
        at_least("shards.mailbox_capacity", self.mailbox_capacity, 1)?;
        at_least("shards.mailbox_max_bytes", self.mailbox_max_bytes, 65536)?;
        if self.interest_buckets != 0 {
            in_range(
                "shards.interest_buckets",
                self.interest_buckets,
                1024,
                1 << 26,
            )?;
        }
        in_range("shards.tick_ms", self.tick_ms, 100, 60_000)?;
        at_least("shards.expiry_batch", self.expiry_batch, 1)
    }
}
