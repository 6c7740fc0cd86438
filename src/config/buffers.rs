//! `[buffers]`: the shard scratch buffer, the buffer pool, and the outbound watermarks
//! that decide what a slow subscriber costs.

use serde::Deserialize;

use super::{at_least, in_range, invalid, ConfigError, Section};

/// Upper bound on `buffers.scratch_bytes`; each shard allocates it up front.
pub const MAX_SCRATCH_BYTES: u32 = 64 << 20;

/// `[buffers]`: the shard scratch buffer, the buffer pool and outbound queue limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuffersConfig {
    pub scratch_bytes: u32,
    pub pool_max_bytes: u64,
    pub pool_idle_secs: u32,
    pub outbound_high_watermark: u32,
    pub outbound_low_watermark: u32,
    pub slow_consumer: SlowConsumer,
    /// With `slow_consumer = "pace"`: a QoS 1/2 session queue this long congests its
    /// connection as the high watermark does.
    pub pace_queued_messages: u32,
    /// With `slow_consumer = "pace"`: the most a connected session's queue holds.
    pub paced_max_queued_messages: u32,
    /// With `slow_consumer = "pace"`: the most output a connection holds.
    pub outbound_max_bytes: u32,
    /// The most unsent output all connections of the gateway hold together.
    pub output_max_bytes: u64,
}

/// What a subscriber above its outbound high watermark costs (`[buffers] slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// The publishers whose messages reach it are paced until it drains (the default;
    /// see `shard/pacing.rs`): nothing is lost.
    Pace,
    /// Its QoS 0 messages are dropped; publishers never wait.
    Drop,
}

impl Section for BuffersConfig {
    /// The watermarks must be ordered: low < high <= max.
    fn validate(&self) -> Result<(), ConfigError> {
        let b = self;
        in_range(
            "buffers.scratch_bytes",
            b.scratch_bytes,
            4096,
            MAX_SCRATCH_BYTES,
        )?;
        at_least(
            "buffers.outbound_high_watermark",
            b.outbound_high_watermark,
            1,
        )?;
        if b.outbound_low_watermark >= b.outbound_high_watermark {
            return Err(invalid(
                "buffers.outbound_low_watermark",
                format!(
                    "must be less than buffers.outbound_high_watermark ({}), got {}",
                    b.outbound_high_watermark, b.outbound_low_watermark
                ),
            ));
        }
        at_least("buffers.pace_queued_messages", b.pace_queued_messages, 1)?;
        if u64::from(b.outbound_max_bytes) > b.output_max_bytes {
            return Err(invalid(
                "buffers.output_max_bytes",
                format!(
                    "must be at least buffers.outbound_max_bytes ({}), got {}",
                    b.outbound_max_bytes, b.output_max_bytes
                ),
            ));
        }
        if b.outbound_max_bytes < b.outbound_high_watermark {
            return Err(invalid(
                "buffers.outbound_max_bytes",
                format!(
                    "must be at least buffers.outbound_high_watermark ({}), got {}",
                    b.outbound_high_watermark, b.outbound_max_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SlowConsumer;
    use crate::config::tests::invalid_key;
    use crate::config::Config;

    #[test]
    fn flow_control_keys_are_checked_naming_them() {
        let c = Config::from_toml_str("[buffers]\nslow_consumer = \"drop\"\n").unwrap();
        assert_eq!(c.buffers.slow_consumer, SlowConsumer::Drop);
        // The gateway-wide mode is gone; pacing per publisher replaced it.
        assert!(Config::from_toml_str("[buffers]\nslow_consumer = \"backpressure\"\n").is_err());
        for (toml, key) in [
            // The queue must congest its connection before it drops anything.
            (
                "[buffers]\npace_queued_messages = 1000\n",
                "buffers.pace_queued_messages",
            ),
            (
                "[buffers]\npace_queued_messages = 0\n",
                "buffers.pace_queued_messages",
            ),
            (
                "[buffers]\noutput_max_bytes = 65536\n",
                "buffers.output_max_bytes",
            ),
            (
                "[shards]\nmailbox_max_bytes = 100\n",
                "shards.mailbox_max_bytes",
            ),
        ] {
            assert_eq!(invalid_key(toml), key, "{toml}");
        }
    }
}
