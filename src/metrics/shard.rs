//! The counters each IO shard keeps about itself (`ShardMetrics`): one writer, relaxed
//! atomics on lines no other core writes, read by any number of scrapes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_metrics::TaskMonitor;

use super::labels::{
    DisconnectReason, DropReason, RefuseReason, TlsHandshake, CONNECTION_AGE_BUCKETS,
};

/// A histogram with one writer (its shard) and any number of readers (scrapes): a count
/// per bucket (not cumulative; the last one is `+Inf`) and the sum as `f64` bits. The
/// count is the sum of the buckets, so a scrape never sees `_count` disagree with `+Inf`.
#[derive(Default)]
pub(super) struct LocalHistogram {
    pub(super) counts: [AtomicU64; CONNECTION_AGE_BUCKETS.len() + 1],
    pub(super) sum_bits: AtomicU64,
}

impl LocalHistogram {
    fn observe(&self, v: f64) {
        let v = if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let i = CONNECTION_AGE_BUCKETS
            .iter()
            .position(|le| v <= *le)
            .unwrap_or(CONNECTION_AGE_BUCKETS.len());
        ShardMetrics::add(&self.counts[i], 1);
        let sum = f64::from_bits(self.sum_bits.load(Relaxed)) + v;
        self.sum_bits.store(sum.to_bits(), Relaxed);
    }
}

/// The previous busy-ratio sample of a shard, kept for the next scrape (scrape side only).
pub(super) struct BusySample {
    pub(super) at: Instant,
    polled: Duration,
    ratio: f64,
}

impl Default for BusySample {
    fn default() -> Self {
        BusySample {
            at: Instant::now(),
            polled: Duration::ZERO,
            ratio: 0.0,
        }
    }
}

/// Scrapes closer together than this report the previous busy ratio instead of a ratio
/// over a window too short to mean anything.
pub(super) const MIN_BUSY_WINDOW: Duration = Duration::from_millis(100);

/// The `transport` label's values: how a connection's bytes are carried (the listener
/// it came in on). Four values, so the label costs at most four series.
pub const TRANSPORTS: [&str; 4] = ["tcp", "tls", "ws", "wss"];

/// One shard's counters and gauges. Aligned so two shards never share a cache line.
///
/// The shard writes the counters with [`ShardMetrics::add`] and the gauges with
/// [`ShardMetrics::set`]; everything else here is read at scrape time.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardMetrics {
    pub connections: AtomicU64,
    pub sessions: AtomicU64,
    pub subscriptions: AtomicU64,
    pub queued_messages: AtomicU64,
    pub wheel_entries: AtomicU64,
    pub pool_pooled_bytes: AtomicU64,
    pub pool_lent_bytes: AtomicU64,
    /// Buffer pool `take`s served from a free list (cumulative, from `PoolStats::hits`).
    pub pool_hits: AtomicU64,
    /// Buffer pool `take`s that allocated (cumulative, from `PoolStats::misses`).
    pub pool_misses: AtomicU64,
    /// Accepted CONNECTs by transport, in [`TRANSPORTS`] order.
    pub connects: [AtomicU64; TRANSPORTS.len()],
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    pub refused: [AtomicU64; RefuseReason::ALL.len()],
    /// PUBLISHes and SUBSCRIBE filters refused by the ACL: [publish, subscribe].
    pub acl_denied: [AtomicU64; 2],
    /// TLS handshakes (or later TLS records) that failed: bad ClientHello, unknown CA,
    /// missing client certificate, garbage on the TLS port.
    pub tls_failures: AtomicU64,
    /// TLS handshakes by how they ended, in [`TlsHandshake::ALL`] order.
    pub tls_handshakes: [AtomicU64; TlsHandshake::ALL.len()],
    /// Reads of handshaking TLS connections put off to the next loop turn because the
    /// turn's `tls_handshakes_per_turn` were spent.
    pub tls_handshakes_deferred: AtomicU64,
    /// Times a connection went over its inbound rate and stopped being read.
    pub rate_limit_pauses: AtomicU64,
    /// Times a connection's PUBLISH packets stopped being read because a subscriber its
    /// messages reach was congested (`slow_consumer = "pace"`).
    pub publisher_pauses: AtomicU64,
    /// Nanoseconds publishers spent paced, counted when each pause ends.
    pub publisher_pause_ns: AtomicU64,
    /// Connections paced right now.
    pub paced_publishers: AtomicU64,
    /// Congested connections: above the outbound high watermark or the queue mark
    /// (`slow_consumer = "pace"`).
    pub congested_connections: AtomicU64,
    /// Unsent output bytes of the shard's connections.
    pub output_bytes: AtomicU64,
    /// Connections in their close grace: ended, still read and discarded (`close_grace_ms`).
    pub closing_connections: AtomicU64,
    /// TLS 1.3 connections past their handshake on the shard's own record layer
    /// (rustls dropped; `shard/records.rs`).
    pub tls_record_connections: AtomicU64,
    /// TLS connections this shard accepted whose handshake runs on a TLS handshake
    /// thread (`tls/handshaker.rs`). The one field two threads write: only with atomic
    /// `fetch_add` / `fetch_sub`, never [`ShardMetrics::add`].
    pub tls_handshaking: AtomicU64,
    /// Messages this shard handed to other shards (each one's subscribers are there).
    pub handoff_messages: AtomicU64,
    /// Batches they rode in: one mailbox send, at most one wake-up, per shard and turn.
    pub handoff_batches: AtomicU64,
    /// Times a shard stopped accepting: connect rate (`max_connect_rate`).
    pub accept_paused_rate: AtomicU64,
    /// Times a shard stopped accepting: too many handshakes (`max_handshaking`).
    pub accept_paused_handshaking: AtomicU64,
    /// Times a shard's accept failed for want of a file descriptor (EMFILE/ENFILE).
    pub accept_paused_fds: AtomicU64,
    /// Connections closed for a missing or invalid PROXY protocol header.
    pub proxy_header_errors: AtomicU64,
    pub dropped: [AtomicU64; 6],
    pub packets_received: [AtomicU64; 16],
    pub packets_sent: [AtomicU64; 16],
    /// Instruments the shard's main future (`monitor.instrument(shard.run(rx))`): its poll
    /// count and total poll time are the shard's loop turns and busy time, exported as
    /// `gateway_shard_polls_total`, `gateway_shard_busy_seconds_total` and
    /// `gateway_shard_busy_ratio`. Works on stable tokio (no `tokio_unstable`).
    pub monitor: TaskMonitor,
    pub(super) connection_age: LocalHistogram,
    pub(super) busy: Mutex<BusySample>,
}

impl ShardMetrics {
    /// Adds to a counter. Only the owning shard calls this, so load+store is race-free and
    /// cheaper than a locked read-modify-write.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Relaxed);
    }

    pub fn disconnect(&self, r: DisconnectReason) {
        Self::add(&self.disconnects[r as usize], 1);
    }
    pub fn refuse(&self, r: RefuseReason) {
        Self::add(&self.refused[r as usize], 1);
    }
    pub fn tls_handshake(&self, kind: TlsHandshake) {
        Self::add(&self.tls_handshakes[kind as usize], 1);
    }
    /// An ACL refusal: a PUBLISH (`subscribe` false) or one SUBSCRIBE filter.
    pub fn acl_denied(&self, subscribe: bool) {
        Self::add(&self.acl_denied[usize::from(subscribe)], 1);
    }
    pub fn drop_msg(&self, r: DropReason, n: u64) {
        Self::add(&self.dropped[r as usize], n);
    }
    pub fn packet_in(&self, packet_type: u8) {
        Self::add(&self.packets_received[usize::from(packet_type & 15)], 1);
    }
    pub fn packet_out(&self, packet_type: u8) {
        Self::add(&self.packets_sent[usize::from(packet_type & 15)], 1);
    }

    /// Records how long a connection lived, in its shard's close path
    /// (`gateway_connection_age_seconds`). Only the owning shard calls this.
    pub fn observe_connection_age(&self, secs: f64) {
        self.connection_age.observe(secs);
    }

    /// The share of wall time the shard spent polling its main future since the previous
    /// call, given the monitor's cumulative poll time `polled` at `now`. Called by scrapes
    /// only; two scrapes closer than [`MIN_BUSY_WINDOW`] get the previous value.
    pub(super) fn busy_ratio(&self, now: Instant, polled: Duration) -> f64 {
        let mut prev = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let wall = now.saturating_duration_since(prev.at);
        if wall < MIN_BUSY_WINDOW {
            return prev.ratio;
        }
        let busy = polled.saturating_sub(prev.polled);
        let ratio = (busy.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0);
        *prev = BusySample {
            at: now,
            polled,
            ratio,
        };
        ratio
    }
}
