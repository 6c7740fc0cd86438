//! Gateway metrics: the counters each IO shard keeps about itself, the push API's counters,
//! and their Prometheus exposition through the `prometheus-client` crate.
//!
//! Every shard owns one [`ShardMetrics`] and is its only writer, so an update on the packet
//! path is a relaxed load and store on a cache line no other core writes: no locked
//! read-modify-write, no contention. A scrape (on the business pool) reads every shard's
//! atomics without stopping any shard, through a prometheus-client
//! [`Collector`](prometheus_client::collector::Collector) that sums
//! them or labels them by shard. The push API's counters ([`PushMetrics`]) live on the
//! business pool and use prometheus-client's own metric types.
//!
//! prometheus-client writes OpenMetrics 1.0 text. `/metrics` is served as the Prometheus
//! text format 0.0.4, which every Prometheus and `promtool check metrics` read; for the
//! families here the two differ only in the name a counter's `# HELP` and `# TYPE` lines
//! carry (`x` against `x_total`) and the closing `# EOF`, which [`to_prometheus_text`]
//! rewrites.
//!
//! The parts: `labels` (the reason enums and label values), `shard` (`ShardMetrics`),
//! `exposition` (the shard collector and the text encoding), `push` (`PushMetrics`) and
//! `process` (process-wide figures).

mod exposition;
mod labels;
mod process;
mod push;
mod shard;
#[cfg(test)]
mod tests;

pub(crate) use self::exposition::{counter_family, encode_into};
pub use self::exposition::{render, to_prometheus_text};
pub use self::labels::{
    DisconnectReason, DropReason, RefuseReason, TlsHandshake, CONNECTION_AGE_BUCKETS, PACKET_TYPES,
};
pub use self::process::render_process;
pub use self::push::{PushMetrics, PUSH_BUCKETS, PUSH_STATUSES};
pub use self::shard::{ShardMetrics, TRANSPORTS};
