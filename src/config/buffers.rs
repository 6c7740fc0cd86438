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
    /// With `slow_consumer = "backpressure"`: the most output a connection holds.
    pub outbound_max_bytes: u32,
}

/// What a subscriber above its outbound high watermark costs (`[buffers] slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Its QoS 0 messages are dropped; publishers never wait (the default).
    Drop,
    /// Its QoS 0 messages are still written (up to `outbound_max_bytes`) and PUBLISH
    /// packets are not read from any client until every subscriber is back under.
    Backpressure,
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
