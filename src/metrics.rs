//! Gateway metrics: the counters each IO shard keeps about itself, the push API's counters,
//! and their Prometheus exposition through the `prometheus-client` crate.
//!
//! Every shard owns one [`ShardMetrics`] and is its only writer, so an update on the packet
//! path is a relaxed load and store on a cache line no other core writes: no locked
//! read-modify-write, no contention. A scrape (on the business pool) reads every shard's
//! atomics without stopping any shard, through a prometheus-client [`Collector`] that sums
//! them or labels them by shard. The push API's counters ([`PushMetrics`]) live on the
//! business pool and use prometheus-client's own metric types.
//!
//! prometheus-client writes OpenMetrics 1.0 text. `/metrics` is served as the Prometheus
//! text format 0.0.4, which every Prometheus and `promtool check metrics` read; for the
//! families here the two differ only in the name a counter's `# HELP` and `# TYPE` lines
//! carry (`x` against `x_total`) and the closing `# EOF`, which [`to_prometheus_text`]
//! rewrites.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio_metrics::TaskMonitor;

/// Why a connection ended; the `reason` label of `gateway_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Client,
    /// No packet within 1.5 × keep-alive.
    Keepalive,
    /// No CONNECT within `connect_timeout_secs`.
    ConnectTimeout,
    /// The peer closed its side (read of 0) without DISCONNECT.
    CloseWait,
    /// The socket took no bytes for `write_stall_timeout_secs`.
    WriteStall,
    /// The client broke the protocol (malformed, oversized, forbidden packet).
    ProtocolError,
    /// A new connection with the same client id took the session over.
    Takeover,
    /// The gateway is shutting down.
    Shutdown,
    /// An operator or the API disconnected it.
    Admin,
    /// The socket failed (reset, timeout from TCP keepalive / user timeout).
    SocketError,
    /// The CONNECT was refused (CONNACK with an error code).
    Refused,
    /// The peer closed or reset the connection before it sent CONNECT: a load-balancer
    /// health check (a TCP connect, or a PROXY v2 LOCAL header, then a close or reset)
    /// or a port scan, not a device's network failing.
    Probe,
    /// The store could not commit a change the connection's acknowledgement waited for.
    StoreError,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 13] = [
        DisconnectReason::Client,
        DisconnectReason::Keepalive,
        DisconnectReason::ConnectTimeout,
        DisconnectReason::CloseWait,
        DisconnectReason::WriteStall,
        DisconnectReason::ProtocolError,
        DisconnectReason::Takeover,
        DisconnectReason::Shutdown,
        DisconnectReason::Admin,
        DisconnectReason::SocketError,
        DisconnectReason::Refused,
        DisconnectReason::Probe,
        DisconnectReason::StoreError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::Keepalive => "keepalive",
            DisconnectReason::ConnectTimeout => "connect_timeout",
            DisconnectReason::CloseWait => "close_wait",
            DisconnectReason::WriteStall => "write_stall",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::Takeover => "takeover",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::Admin => "admin",
            DisconnectReason::SocketError => "socket_error",
            DisconnectReason::Refused => "refused",
            DisconnectReason::Probe => "probe",
            DisconnectReason::StoreError => "store_error",
        }
    }

    /// The reason to count for a connection that ended with `self`: one the peer closed
    /// or reset before it sent CONNECT (`connect_read` false) is a [`Probe`](Self::Probe),
    /// so health checks do not swamp the real `socket_error` and `close_wait` counts.
    pub fn counted(self, connect_read: bool) -> DisconnectReason {
        match self {
            DisconnectReason::SocketError | DisconnectReason::CloseWait if !connect_read => {
                DisconnectReason::Probe
            }
            r => r,
        }
    }
}

/// Why a CONNECT was refused; the `reason` label of `gateway_connect_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    Protocol,
    ClientId,
    Duplicate,
    Busy,
    Auth,
    MaxConnections,
    /// An authentication backend (webhook) was slow or down: "server unavailable".
    AuthUnavailable,
    /// `max_connections_per_ip` reached for the connection's address.
    PerIp,
    /// A PROXY header from a peer not in `mqtt.proxy_trusted`.
    ProxyUntrusted,
    /// A WebSocket upgrade request refused (answered with a 4xx).
    WsUpgrade,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 10] = [
        RefuseReason::Protocol,
        RefuseReason::ClientId,
        RefuseReason::Duplicate,
        RefuseReason::Busy,
        RefuseReason::Auth,
        RefuseReason::MaxConnections,
        RefuseReason::AuthUnavailable,
        RefuseReason::PerIp,
        RefuseReason::ProxyUntrusted,
        RefuseReason::WsUpgrade,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Protocol => "protocol",
            RefuseReason::ClientId => "client_id",
            RefuseReason::Duplicate => "duplicate",
            RefuseReason::Busy => "busy",
            RefuseReason::Auth => "auth",
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::AuthUnavailable => "auth_unavailable",
            RefuseReason::PerIp => "per_ip",
            RefuseReason::ProxyUntrusted => "proxy_untrusted",
            RefuseReason::WsUpgrade => "ws_upgrade",
        }
    }
}

/// Why a message was not delivered; the `reason` label of `gateway_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DropReason {
    /// QoS 0 above the connection's outbound high watermark.
    SlowConsumer,
    /// The session's queue was full; the oldest message was dropped.
    QueueFull,
    /// Message Expiry Interval / TTL passed before delivery.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// A shard mailbox was full.
    MailboxFull,
    /// QoS 0 for an offline persistent session (not queued, per spec option).
    Offline,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::SlowConsumer,
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::MailboxFull,
        DropReason::Offline,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::MailboxFull => "mailbox_full",
            DropReason::Offline => "offline",
        }
    }
}

/// MQTT control packet type names, indexed by the packet type number (0 and 15 included so
/// an index never goes out of bounds).
pub const PACKET_TYPES: [&str; 16] = [
    "reserved",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Upper bounds (seconds) of `gateway_connection_age_seconds`: 1 s to 7 days.
pub const CONNECTION_AGE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 60.0, 600.0, 3_600.0, 21_600.0, 86_400.0, 604_800.0,
];

/// A histogram with one writer (its shard) and any number of readers (scrapes): a count
/// per bucket (not cumulative; the last one is `+Inf`) and the sum as `f64` bits. The
/// count is the sum of the buckets, so a scrape never sees `_count` disagree with `+Inf`.
#[derive(Default)]
struct LocalHistogram {
    counts: [AtomicU64; CONNECTION_AGE_BUCKETS.len() + 1],
    sum_bits: AtomicU64,
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
struct BusySample {
    at: Instant,
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
const MIN_BUSY_WINDOW: Duration = Duration::from_millis(100);

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
    /// Times a connection went over its inbound rate and stopped being read.
    pub rate_limit_pauses: AtomicU64,
    /// Times a connection's PUBLISH packets stopped being read for backpressure.
    pub publisher_pauses: AtomicU64,
    /// Connections above the outbound high watermark (with backpressure on).
    pub congested_connections: AtomicU64,
    /// Connections in their close grace: ended, still read and discarded (`close_grace_ms`).
    pub closing_connections: AtomicU64,
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
    connection_age: LocalHistogram,
    busy: Mutex<BusySample>,
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
    fn busy_ratio(&self, now: Instant, polled: Duration) -> f64 {
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

fn get(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

/// The family name prometheus-client wants for a counter: without the `_total` it adds.
pub(crate) fn counter_family(name_total: &str) -> &str {
    name_total.strip_suffix("_total").unwrap_or(name_total)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name_total: &str,
    help: &str,
    v: impl EncodeCounterValue,
) -> fmt::Result {
    enc.encode_descriptor(counter_family(name_total), help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A gauge family with one sample per label value.
fn labelled_gauges<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in samples {
        family
            .encode_family(&[(label, value.as_str())])?
            .encode_gauge(&v)?;
    }
    Ok(())
}

/// A counter family with one sample per label value.
fn labelled_counters<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name_total: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) -> fmt::Result {
    let name = counter_family(name_total);
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in samples {
        family
            .encode_family(&[(label, value.as_str())])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// Reads every shard's atomics at scrape time.
struct ShardCollector(Vec<Arc<ShardMetrics>>);

impl fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCollector")
            .field("shards", &self.0.len())
            .finish()
    }
}

impl ShardCollector {
    fn total(&self, f: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.0.iter().map(|s| f(s)).sum()
    }

    fn per_shard<V>(&self, f: impl Fn(&ShardMetrics) -> V) -> Vec<(String, V)> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, s)| (i.to_string(), f(s)))
            .collect()
    }
}

impl Collector for ShardCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        labelled_gauges(
            e,
            "gateway_connections",
            "Open connections, by shard.",
            "shard",
            self.per_shard(|s| get(&s.connections)),
        )?;
        labelled_gauges(
            e,
            "gateway_sessions",
            "Sessions (online and offline), by home shard.",
            "shard",
            self.per_shard(|s| get(&s.sessions)),
        )?;
        labelled_gauges(
            e,
            "gateway_wheel_entries",
            "Timers on the shard's timing wheel.",
            "shard",
            self.per_shard(|s| get(&s.wheel_entries)),
        )?;
        labelled_gauges(
            e,
            "gateway_congested_connections",
            "Connections above the outbound high watermark that pace publishers (slow_consumer = backpressure).",
            "shard",
            self.per_shard(|s| get(&s.congested_connections)),
        )?;
        labelled_gauges(
            e,
            "gateway_closing_connections",
            "Connections ended and in their close grace (read and discarded until close_grace_ms or close_grace_bytes); also in gateway_connections.",
            "shard",
            self.per_shard(|s| get(&s.closing_connections)),
        )?;
        gauge(
            e,
            "gateway_subscriptions",
            "Subscriptions across all sessions.",
            self.total(|s| get(&s.subscriptions)),
        )?;
        gauge(
            e,
            "gateway_queued_messages",
            "Messages waiting in session queues.",
            self.total(|s| get(&s.queued_messages)),
        )?;
        labelled_counters(
            e,
            "gateway_connects_total",
            "Accepted CONNECTs, by transport (tcp, tls, ws, wss).",
            "transport",
            TRANSPORTS
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), self.total(|s| get(&s.connects[i])))),
        )?;
        counter(
            e,
            "gateway_bytes_received_total",
            "Bytes read from device sockets.",
            self.total(|s| get(&s.bytes_received)),
        )?;
        counter(
            e,
            "gateway_bytes_sent_total",
            "Bytes written to device sockets.",
            self.total(|s| get(&s.bytes_sent)),
        )?;
        labelled_counters(
            e,
            "gateway_disconnects_total",
            "Connections ended, by reason.",
            "reason",
            DisconnectReason::ALL.iter().map(|r| {
                let i = *r as usize;
                (
                    r.as_str().to_owned(),
                    self.total(|s| get(&s.disconnects[i])),
                )
            }),
        )?;
        labelled_counters(
            e,
            "gateway_connect_refused_total",
            "CONNECTs refused, by reason.",
            "reason",
            RefuseReason::ALL.iter().map(|r| {
                let i = *r as usize;
                (r.as_str().to_owned(), self.total(|s| get(&s.refused[i])))
            }),
        )?;
        counter(
            e,
            "gateway_tls_handshake_failures_total",
            "TLS connections closed because the TLS layer failed (handshake or record error).",
            self.total(|s| get(&s.tls_failures)),
        )?;
        counter(
            e,
            "gateway_rate_limit_pauses_total",
            "Times a connection exceeded its inbound publish or byte rate and reading it was paused.",
            self.total(|s| get(&s.rate_limit_pauses)),
        )?;
        counter(
            e,
            "gateway_publisher_pauses_total",
            "Times a client's PUBLISH packets stopped being read because a subscriber was congested (slow_consumer = backpressure).",
            self.total(|s| get(&s.publisher_pauses)),
        )?;
        labelled_counters(
            e,
            "gateway_accept_paused_total",
            "Times a shard stopped accepting (connections wait in the backlog), by limit; fd_exhausted: accept() found no free file descriptor (retried every [tcp] accept_retry_ms).",
            "reason",
            [
                (
                    "connect_rate".to_owned(),
                    self.total(|s| get(&s.accept_paused_rate)),
                ),
                (
                    "handshaking".to_owned(),
                    self.total(|s| get(&s.accept_paused_handshaking)),
                ),
                (
                    "fd_exhausted".to_owned(),
                    self.total(|s| get(&s.accept_paused_fds)),
                ),
            ],
        )?;
        counter(
            e,
            "gateway_proxy_header_errors_total",
            "Connections closed for a missing, invalid or oversized PROXY protocol header.",
            self.total(|s| get(&s.proxy_header_errors)),
        )?;
        labelled_counters(
            e,
            "gateway_acl_denied_total",
            "PUBLISHes and SUBSCRIBE filters refused by the ACL, by action.",
            "action",
            ["publish", "subscribe"]
                .iter()
                .enumerate()
                .map(|(i, a)| ((*a).to_owned(), self.total(|s| get(&s.acl_denied[i])))),
        )?;
        labelled_counters(
            e,
            "gateway_messages_dropped_total",
            "Messages not delivered, by reason.",
            "reason",
            DropReason::ALL.iter().map(|r| {
                let i = *r as usize;
                (r.as_str().to_owned(), self.total(|s| get(&s.dropped[i])))
            }),
        )?;
        labelled_counters(
            e,
            "gateway_packets_received_total",
            "MQTT packets received, by type.",
            "type",
            (1..16).map(|t| {
                let n = self.total(|s| get(&s.packets_received[t]));
                (PACKET_TYPES[t].to_owned(), n)
            }),
        )?;
        labelled_counters(
            e,
            "gateway_packets_sent_total",
            "MQTT packets sent, by type.",
            "type",
            (1..16).map(|t| {
                let n = self.total(|s| get(&s.packets_sent[t]));
                (PACKET_TYPES[t].to_owned(), n)
            }),
        )?;
        labelled_gauges(
            e,
            "gateway_buffer_pool_bytes",
            "Bytes in the shards' buffer pools: pooled (idle) or lent to connections.",
            "state",
            [
                (
                    "pooled".to_owned(),
                    self.total(|s| get(&s.pool_pooled_bytes)),
                ),
                ("lent".to_owned(), self.total(|s| get(&s.pool_lent_bytes))),
            ],
        )?;
        labelled_counters(
            e,
            "gateway_buffer_pool_takes_total",
            "Buffers taken from the shards' pools: hit (reused) or miss (allocated).",
            "result",
            [
                ("hit".to_owned(), self.total(|s| get(&s.pool_hits))),
                ("miss".to_owned(), self.total(|s| get(&s.pool_misses))),
            ],
        )?;

        // Connection age: the shards' buckets summed.
        let buckets: Vec<(f64, u64)> = CONNECTION_AGE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, le)| (le, self.total(|s| get(&s.connection_age.counts[i]))))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self
            .0
            .iter()
            .map(|s| f64::from_bits(get(&s.connection_age.sum_bits)))
            .sum();
        enc.encode_descriptor(
            "gateway_connection_age_seconds",
            "How long connections lived, observed when they close.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;

        // The shards' main futures, from their tokio-metrics TaskMonitors.
        let now = Instant::now();
        let polls: Vec<_> = self
            .0
            .iter()
            .map(|s| {
                let m = s.monitor.cumulative();
                let ratio = s.busy_ratio(now, m.total_poll_duration);
                (
                    m.total_poll_count,
                    m.total_poll_duration.as_secs_f64(),
                    ratio,
                )
            })
            .collect();
        let e = &mut enc;
        let shard = |i: usize| i.to_string();
        labelled_counters(
            e,
            "gateway_shard_polls_total",
            "Polls of the shard's event loop (tokio-metrics TaskMonitor).",
            "shard",
            polls.iter().enumerate().map(|(i, p)| (shard(i), p.0)),
        )?;
        labelled_counters(
            e,
            "gateway_shard_busy_seconds_total",
            "Time the shard spent polling its event loop, i.e. busy (tokio-metrics TaskMonitor).",
            "shard",
            polls.iter().enumerate().map(|(i, p)| (shard(i), p.1)),
        )?;
        labelled_gauges(
            e,
            "gateway_shard_busy_ratio",
            "Share of wall time the shard was busy since the previous scrape (0 to 1).",
            "shard",
            polls.iter().enumerate().map(|(i, p)| (shard(i), p.2)),
        )
    }
}

/// Encodes a registry and appends it to `out` in the Prometheus text format 0.0.4.
pub(crate) fn encode_into(registry: &Registry, out: &mut String) {
    let mut openmetrics = String::with_capacity(8192);
    // Writing into a String cannot fail; an error here is a collector bug, and the
    // families encoded before it are still worth serving.
    if let Err(e) = text::encode_registry(&mut openmetrics, registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    to_prometheus_text(&openmetrics, out);
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4, appending to
/// `out`: a counter family `x` (samples `x_total`) gets `# HELP x_total` / `# TYPE x_total`,
/// and `# EOF` goes. Everything else (gauges, histograms, labels, values) is the same in
/// both formats.
pub fn to_prometheus_text(openmetrics: &str, out: &mut String) {
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .is_some_and(|next| *next == format!("# TYPE {name} counter"));
            if counter && !name.ends_with("_total") {
                out.push_str(&format!("# HELP {name}_total {help}\n"));
                continue;
            }
        } else if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            if !name.ends_with("_total") {
                out.push_str(&format!("# TYPE {name}_total counter\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// Renders all shards' metrics in the Prometheus text format (version 0.0.4).
pub fn render(shards: &[Arc<ShardMetrics>], out: &mut String) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ShardCollector(shards.to_vec())));
    encode_into(&registry, out);
}

/// The `status` label values of `gateway_push_messages_total`, all exported from the
/// start (at 0) so that rates and alerts see every series. Any other status string is
/// counted as `other`.
pub const PUSH_STATUSES: [&str; 12] = [
    "sent",
    "acked",
    "queued",
    "offline",
    "dropped",
    "matched",
    "timeout",
    "bad_request",
    "unauthorized",
    "overloaded",
    "too_large",
    "not_found",
];

/// Upper bounds (seconds) of `gateway_push_duration_seconds`: 50 µs to 10 s.
pub const PUSH_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// The labels of `gateway_push_requests_total`: `endpoint` (`push` or `batch`) and the
/// HTTP status `code` of the answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    endpoint: &'static str,
    code: u16,
}

/// Push API outcomes and latency. Shared (`Arc`) by the business pool's handlers; a
/// push is not per packet, so prometheus-client's shared atomics and histogram lock are
/// fine here.
pub struct PushMetrics {
    /// HTTP requests to the push endpoints, by endpoint and answer code.
    requests: Family<RequestLabel, Counter>,
    /// Messages (a single push, or one item of a batch), by outcome.
    messages: Family<StatusLabel, Counter>,
    /// The family's counter of each status in `PUSH_STATUSES`, resolved once: counting a
    /// push is then one atomic add, not a lock and a label hash per message.
    by_status: Vec<Counter>,
    duration: Histogram,
}

impl Default for PushMetrics {
    fn default() -> Self {
        let messages: Family<StatusLabel, Counter> = Family::default();
        // Creates every series at 0 and keeps a handle (counters share their value).
        let by_status = PUSH_STATUSES
            .iter()
            .map(|&status| messages.get_or_create(&StatusLabel { status }).clone())
            .collect();
        let requests: Family<RequestLabel, Counter> = Family::default();
        for endpoint in ["push", "batch"] {
            let _ = requests.get_or_create(&RequestLabel {
                endpoint,
                code: 200,
            });
        }
        PushMetrics {
            requests,
            messages,
            by_status,
            duration: Histogram::new(PUSH_BUCKETS),
        }
    }
}

impl PushMetrics {
    /// Counts one push request's answer (`gateway_push_requests_total{endpoint, code}`).
    pub fn record_request(&self, endpoint: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabel { endpoint, code })
            .inc();
    }

    /// Counts one message's answer (`gateway_push_messages_total{status}`) and, when given, its
    /// latency from HTTP receive to written to the device socket
    /// (`gateway_push_duration_seconds`).
    pub fn record(&self, status: &str, seconds: Option<f64>) {
        match PUSH_STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                self.by_status[i].inc();
            }
            None => {
                self.messages
                    .get_or_create(&StatusLabel { status: "other" })
                    .inc();
            }
        }
        if let Some(secs) = seconds {
            self.duration.observe(secs.max(0.0));
        }
    }

    /// Appends the push families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        // Registry::register appends the final full stop to the help text.
        registry.register(
            counter_family("gateway_push_requests_total"),
            "HTTP requests to /v1/push and /v1/push/batch, by endpoint and answer code",
            self.requests.clone(),
        );
        registry.register(
            counter_family("gateway_push_messages_total"),
            "Messages pushed (one per /v1/push request or batch item), by outcome",
            self.messages.clone(),
        );
        registry.register(
            "gateway_push_duration_seconds",
            "Push latency from HTTP receive to written to the device socket",
            self.duration.clone(),
        );
        encode_into(&registry, out);
    }
}

/// Process-wide figures read at scrape time: /proc, rlimits, and the lossy logger's drops.
#[derive(Debug)]
struct ProcessCollector {
    log_lines_dropped: u64,
    started: Instant,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        counter(
            e,
            "gateway_log_lines_dropped_total",
            "Log lines dropped because the log queue was full.",
            self.log_lines_dropped,
        )?;
        gauge(
            e,
            "gateway_uptime_seconds",
            "Seconds since the gateway started.",
            self.started.elapsed().as_secs_f64(),
        )?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss_pages * page_size(),
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle being read is one of the entries.
            let open = dir.count().saturating_sub(1) as u64;
            gauge(
                e,
                "process_open_fds",
                "Number of open file descriptors.",
                open,
            )?;
        }
        if let Some(limit) = max_fds() {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                limit,
            )?;
        }
        if let Some(ticks) = stat.as_deref().and_then(cpu_ticks) {
            counter(
                e,
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                ticks as f64 / clock_ticks_per_sec() as f64,
            )?;
        }
        if let Some(start) = stat.as_deref().and_then(start_time_secs) {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                start,
            )?;
        }
        Ok(())
    }
}

/// Process-wide figures from /proc: resident memory, open and maximum fds, CPU time, start
/// time, uptime, and the lines the lossy logger dropped. Read on the business pool at
/// scrape time; appended in the Prometheus text format 0.0.4.
pub fn render_process(out: &mut String, log_lines_dropped: u64, started: Instant) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector {
        log_lines_dropped,
        started,
    }));
    encode_into(&registry, out);
}

/// The fields of /proc/self/stat after the parenthesised command name (which may itself
/// contain spaces and parentheses), starting with field 3 (state).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 2..].split_whitespace().collect())
}

/// utime + stime from /proc/self/stat (fields 14 and 15).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let f = stat_fields(stat)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Process start time as seconds since the epoch: field 22 of /proc/self/stat (clock
/// ticks after boot) plus `btime` from /proc/stat.
fn start_time_secs(stat: &str) -> Option<f64> {
    let ticks: u64 = stat_fields(stat)?.get(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(btime as f64 + ticks as f64 / clock_ticks_per_sec() as f64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

fn max_fds() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `sample` (name and labels exactly as written).
    fn value(text: &str, sample: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_per_shard_and_totals() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::set(&a.connections, 3);
        ShardMetrics::set(&b.connections, 4);
        ShardMetrics::add(&a.connects[0], 2);
        ShardMetrics::add(&b.connects[2], 5);
        a.disconnect(DisconnectReason::Keepalive);
        b.disconnect(DisconnectReason::Keepalive);
        a.drop_msg(DropReason::MailboxFull, 7);
        a.packet_in(12);
        ShardMetrics::set(&b.pool_hits, 9);
        let mut s = String::new();
        render(&[a, b], &mut s);
        assert_eq!(value(&s, "gateway_connections{shard=\"0\"}"), Some(3.0));
        assert_eq!(value(&s, "gateway_connections{shard=\"1\"}"), Some(4.0));
        assert_eq!(
            value(&s, "gateway_connects_total{transport=\"tcp\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "gateway_connects_total{transport=\"ws\"}"),
            Some(5.0)
        );
        assert_eq!(
            value(&s, "gateway_disconnects_total{reason=\"keepalive\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "gateway_disconnects_total{reason=\"client\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(
                &s,
                "gateway_messages_dropped_total{reason=\"mailbox_full\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            value(&s, "gateway_packets_received_total{type=\"pingreq\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "gateway_buffer_pool_takes_total{result=\"hit\"}"),
            Some(9.0)
        );
        assert_eq!(
            value(&s, "gateway_shard_polls_total{shard=\"1\"}"),
            Some(0.0)
        );
        assert!(s.contains("# TYPE gateway_connects_total counter\n"), "{s}");
        assert!(
            s.contains("# HELP gateway_connects_total Accepted CONNECTs, by transport"),
            "{s}"
        );
        assert!(s.contains("# TYPE gateway_connections gauge\n"), "{s}");
        assert!(!s.contains("# EOF"), "{s}");
    }

    #[test]
    fn connection_age_buckets_are_summed_over_shards_and_cumulative() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.observe_connection_age(0.5);
        a.observe_connection_age(30.0);
        b.observe_connection_age(1_000_000.0);
        b.observe_connection_age(f64::NAN);
        let mut s = String::new();
        render(&[a, b], &mut s);
        let bucket = |le: &str| {
            value(
                &s,
                &format!("gateway_connection_age_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("1.0"), Some(2.0), "{s}");
        assert_eq!(bucket("10.0"), Some(2.0), "{s}");
        assert_eq!(bucket("60.0"), Some(3.0), "{s}");
        assert_eq!(bucket("604800.0"), Some(3.0), "{s}");
        assert_eq!(bucket("+Inf"), Some(4.0), "{s}");
        assert_eq!(value(&s, "gateway_connection_age_seconds_count"), Some(4.0));
        assert_eq!(
            value(&s, "gateway_connection_age_seconds_sum"),
            Some(1_000_030.5)
        );
        assert!(s.contains("# TYPE gateway_connection_age_seconds histogram\n"));
    }

    #[test]
    fn busy_ratio_is_poll_time_over_wall_time_since_the_last_scrape() {
        let m = ShardMetrics::default();
        let t0 = m.busy.lock().unwrap().at;
        let ms = Duration::from_millis;
        assert_eq!(m.busy_ratio(t0 + ms(1000), ms(250)), 0.25);
        // Too close to the previous scrape: the previous ratio, and the sample is kept.
        assert_eq!(m.busy_ratio(t0 + ms(1050), ms(1000)), 0.25);
        assert_eq!(m.busy_ratio(t0 + ms(2000), ms(1000)), 0.75);
        // Never above 1, never negative.
        assert_eq!(m.busy_ratio(t0 + ms(2500), ms(5000)), 1.0);
        assert_eq!(m.busy_ratio(t0 + ms(3500), ms(5000)), 0.0);
    }

    #[tokio::test]
    async fn shard_polls_come_from_the_task_monitor() {
        let m = Arc::new(ShardMetrics::default());
        let monitor = m.monitor.clone();
        monitor
            .instrument(async {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            })
            .await;
        let mut s = String::new();
        render(&[m], &mut s);
        assert_eq!(
            value(&s, "gateway_shard_polls_total{shard=\"0\"}"),
            Some(4.0),
            "{s}"
        );
        let ratio = value(&s, "gateway_shard_busy_ratio{shard=\"0\"}").unwrap();
        assert!((0.0..=1.0).contains(&ratio), "{s}");
    }

    #[test]
    fn push_metrics_count_statuses_and_latency() {
        let p = PushMetrics::default();
        p.record("sent", Some(0.0003));
        p.record("sent", Some(2.0));
        p.record("overloaded", None);
        p.record("no_such_status", None);
        let mut s = String::new();
        p.render(&mut s);
        assert_eq!(
            value(&s, "gateway_push_messages_total{status=\"sent\"}"),
            Some(2.0),
            "{s}"
        );
        assert_eq!(
            value(&s, "gateway_push_messages_total{status=\"overloaded\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "gateway_push_messages_total{status=\"other\"}"),
            Some(1.0)
        );
        for status in PUSH_STATUSES {
            let sample = format!("gateway_push_messages_total{{status=\"{status}\"}}");
            assert!(value(&s, &sample).is_some(), "{sample} missing:\n{s}");
        }
        let bucket = |le: &str| {
            value(
                &s,
                &format!("gateway_push_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.00025"), Some(0.0), "{s}");
        assert_eq!(bucket("0.0005"), Some(1.0), "{s}");
        assert_eq!(bucket("2.5"), Some(2.0), "{s}");
        assert_eq!(bucket("+Inf"), Some(2.0), "{s}");
        assert_eq!(value(&s, "gateway_push_duration_seconds_count"), Some(2.0));
        for family in ["gateway_push_requests_total", "gateway_push_messages_total"] {
            assert!(s.contains(&format!("# TYPE {family} counter\n")), "{s}");
        }
        p.record_request("batch", 413);
        let mut s = String::new();
        p.render(&mut s);
        let req = |endpoint: &str, code: u16| {
            value(
                &s,
                &format!("gateway_push_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}}"),
            )
        };
        assert_eq!(req("batch", 413), Some(1.0), "{s}");
        assert_eq!(req("push", 200), Some(0.0), "{s}");
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut s = String::new();
        render_process(&mut s, 42, Instant::now());
        assert_eq!(value(&s, "gateway_log_lines_dropped_total"), Some(42.0));
        assert!(
            value(&s, "process_resident_memory_bytes").unwrap() > 0.0,
            "{s}"
        );
        assert!(value(&s, "process_open_fds").unwrap() >= 3.0, "{s}");
        assert!(value(&s, "process_max_fds").unwrap() > 0.0, "{s}");
        assert!(value(&s, "process_cpu_seconds_total").is_some(), "{s}");
        let start = value(&s, "process_start_time_seconds").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start > 1.0e9 && start <= now + 1.0, "{start} vs {now}");
        assert!(
            s.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{s}"
        );
    }

    #[test]
    fn openmetrics_counters_become_prometheus_0_0_4_counters() {
        let om = "# HELP a_total Already suffixed.\n# TYPE a_total counter\na_total 1\n\
                  # HELP b Plain.\n# TYPE b counter\nb_total 2\n\
                  # HELP c A gauge.\n# TYPE c gauge\nc 3\n# EOF\n";
        let mut out = String::new();
        to_prometheus_text(om, &mut out);
        assert_eq!(
            out,
            "# HELP a_total Already suffixed.\n# TYPE a_total counter\na_total 1\n\
             # HELP b_total Plain.\n# TYPE b_total counter\nb_total 2\n\
             # HELP c A gauge.\n# TYPE c gauge\nc 3\n"
        );
    }

    #[test]
    fn stat_fields_parse_after_the_command_name() {
        let stat = "123 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 4200 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(stat_fields(stat).unwrap()[19], "4200");
    }
}
