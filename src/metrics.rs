//! Counters each shard keeps about itself, and their Prometheus text exposition.
//!
//! Every shard owns one [`ShardMetrics`] and is its only writer, so a counter update is an
//! uncontended relaxed add on a cache line no other core writes. A scrape (on the
//! business pool) reads them all without stopping any shard and sums or labels them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 11] = [
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
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 6] = [
        RefuseReason::Protocol,
        RefuseReason::ClientId,
        RefuseReason::Duplicate,
        RefuseReason::Busy,
        RefuseReason::Auth,
        RefuseReason::MaxConnections,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Protocol => "protocol",
            RefuseReason::ClientId => "client_id",
            RefuseReason::Duplicate => "duplicate",
            RefuseReason::Busy => "busy",
            RefuseReason::Auth => "auth",
            RefuseReason::MaxConnections => "max_connections",
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

/// One shard's counters and gauges. Aligned so two shards never share a cache line.
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
    pub connects: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub disconnects: [AtomicU64; 11],
    pub refused: [AtomicU64; 6],
    pub dropped: [AtomicU64; 6],
    pub packets_received: [AtomicU64; 16],
    pub packets_sent: [AtomicU64; 16],
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
    pub fn drop_msg(&self, r: DropReason, n: u64) {
        Self::add(&self.dropped[r as usize], n);
    }
    pub fn packet_in(&self, packet_type: u8) {
        Self::add(&self.packets_received[usize::from(packet_type & 15)], 1);
    }
    pub fn packet_out(&self, packet_type: u8) {
        Self::add(&self.packets_sent[usize::from(packet_type & 15)], 1);
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

/// Writes one metric family: HELP, TYPE and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders all shards' metrics in the Prometheus text format (version 0.0.4).
pub fn render(shards: &[std::sync::Arc<ShardMetrics>], out: &mut String) {
    let per_shard = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> u64| {
        family(out, name, "gauge", help);
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", f(s));
        }
    };
    per_shard(out, "gateway_connections", "Open connections.", &|s| {
        get(&s.connections)
    });
    per_shard(
        out,
        "gateway_sessions",
        "Sessions (online and offline).",
        &|s| get(&s.sessions),
    );
    per_shard(
        out,
        "gateway_wheel_entries",
        "Timers on the shard's wheel.",
        &|s| get(&s.wheel_entries),
    );

    let total = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();
    let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    };
    scalar(
        out,
        "gateway_subscriptions",
        "gauge",
        "Subscriptions across all sessions.",
        total(&|s| get(&s.subscriptions)),
    );
    scalar(
        out,
        "gateway_queued_messages",
        "gauge",
        "Messages waiting in session queues.",
        total(&|s| get(&s.queued_messages)),
    );
    scalar(
        out,
        "gateway_connects_total",
        "counter",
        "Accepted CONNECTs.",
        total(&|s| get(&s.connects)),
    );
    scalar(
        out,
        "gateway_bytes_received_total",
        "counter",
        "Bytes read from device sockets.",
        total(&|s| get(&s.bytes_received)),
    );
    scalar(
        out,
        "gateway_bytes_sent_total",
        "counter",
        "Bytes written to device sockets.",
        total(&|s| get(&s.bytes_sent)),
    );

    let labelled =
        |out: &mut String, name: &str, help: &str, label: &str, items: &[(&str, u64)]| {
            family(out, name, "counter", help);
            for (l, v) in items {
                let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
            }
        };
    let items: Vec<_> = DisconnectReason::ALL
        .iter()
        .map(|r| (r.as_str(), total(&|s| get(&s.disconnects[*r as usize]))))
        .collect();
    labelled(
        out,
        "gateway_disconnects_total",
        "Connections ended, by reason.",
        "reason",
        &items,
    );
    let items: Vec<_> = RefuseReason::ALL
        .iter()
        .map(|r| (r.as_str(), total(&|s| get(&s.refused[*r as usize]))))
        .collect();
    labelled(
        out,
        "gateway_connect_refused_total",
        "CONNECTs refused, by reason.",
        "reason",
        &items,
    );
    let items: Vec<_> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str(), total(&|s| get(&s.dropped[*r as usize]))))
        .collect();
    labelled(
        out,
        "gateway_messages_dropped_total",
        "Messages not delivered, by reason.",
        "reason",
        &items,
    );
    let items: Vec<_> = (1..16)
        .map(|t| (PACKET_TYPES[t], total(&|s| get(&s.packets_received[t]))))
        .collect();
    labelled(
        out,
        "gateway_packets_received_total",
        "MQTT packets received, by type.",
        "type",
        &items,
    );
    let items: Vec<_> = (1..16)
        .map(|t| (PACKET_TYPES[t], total(&|s| get(&s.packets_sent[t]))))
        .collect();
    labelled(
        out,
        "gateway_packets_sent_total",
        "MQTT packets sent, by type.",
        "type",
        &items,
    );
    family(
        out,
        "gateway_buffer_pool_bytes",
        "gauge",
        "Bytes in the shards' buffer pools: pooled (idle) or lent to connections.",
    );
    let _ = writeln!(
        out,
        "gateway_buffer_pool_bytes{{state=\"pooled\"}} {}",
        total(&|s| get(&s.pool_pooled_bytes))
    );
    let _ = writeln!(
        out,
        "gateway_buffer_pool_bytes{{state=\"lent\"}} {}",
        total(&|s| get(&s.pool_lent_bytes))
    );
}

/// Push API outcomes and latency, kept on the business pool (not per packet, so plain
/// shared atomics are fine here).
pub struct PushMetrics {
    statuses: [AtomicU64; PUSH_STATUSES.len()],
    /// Cumulative histogram buckets of `gateway_push_duration_seconds`.
    buckets: [AtomicU64; PUSH_BUCKETS.len()],
    count: AtomicU64,
    /// Sum of observed durations in nanoseconds.
    sum_nanos: AtomicU64,
}

/// The `status` label values of `gateway_push_requests_total`.
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

/// Upper bounds (seconds) of the push latency buckets: 50 µs to 10 s.
pub const PUSH_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

impl Default for PushMetrics {
    fn default() -> Self {
        PushMetrics {
            statuses: std::array::from_fn(|_| AtomicU64::new(0)),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl PushMetrics {
    /// Counts one push answer and, when given, its HTTP-receive-to-socket latency.
    pub fn record(&self, status: &str, seconds: Option<f64>) {
        if let Some(i) = PUSH_STATUSES.iter().position(|s| *s == status) {
            self.statuses[i].fetch_add(1, Relaxed);
        }
        if let Some(secs) = seconds {
            for (i, le) in PUSH_BUCKETS.iter().enumerate() {
                if secs <= *le {
                    self.buckets[i].fetch_add(1, Relaxed);
                }
            }
            self.count.fetch_add(1, Relaxed);
            self.sum_nanos.fetch_add((secs * 1e9) as u64, Relaxed);
        }
    }

    pub fn render(&self, out: &mut String) {
        family(
            out,
            "gateway_push_requests_total",
            "counter",
            "Push API requests, by outcome.",
        );
        for (i, s) in PUSH_STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "gateway_push_requests_total{{status=\"{s}\"}} {}",
                get(&self.statuses[i])
            );
        }
        family(
            out,
            "gateway_push_duration_seconds",
            "histogram",
            "Push latency from HTTP receive to written to the device socket.",
        );
        for (i, le) in PUSH_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "gateway_push_duration_seconds_bucket{{le=\"{le}\"}} {}",
                get(&self.buckets[i])
            );
        }
        let count = get(&self.count);
        let _ = writeln!(
            out,
            "gateway_push_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "gateway_push_duration_seconds_sum {}",
            get(&self.sum_nanos) as f64 / 1e9
        );
        let _ = writeln!(out, "gateway_push_duration_seconds_count {count}");
    }
}

/// Process-wide figures from /proc: resident memory, open fds, CPU time, and the lines the
/// lossy logger dropped. Read on the business pool at scrape time.
pub fn render_process(out: &mut String, log_lines_dropped: u64, started: std::time::Instant) {
    family(
        out,
        "gateway_log_lines_dropped_total",
        "counter",
        "Log lines dropped because the log queue was full.",
    );
    let _ = writeln!(out, "gateway_log_lines_dropped_total {log_lines_dropped}");
    family(
        out,
        "gateway_uptime_seconds",
        "gauge",
        "Seconds since the gateway started.",
    );
    let _ = writeln!(
        out,
        "gateway_uptime_seconds {:.3}",
        started.elapsed().as_secs_f64()
    );
    let page = page_size();
    if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
    {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", rss_pages * page);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {}", dir.count().saturating_sub(1));
    }
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_ticks(&s))
    {
        let hz = clock_ticks_per_sec();
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(
            out,
            "process_cpu_seconds_total {:.2}",
            ticks as f64 / hz as f64
        );
    }
    if let Some(limit) = max_fds() {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {limit}");
    }
}

/// utime + stime from /proc/self/stat (fields 14 and 15, after the parenthesised name).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
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
    use std::sync::Arc;

    #[test]
    fn renders_per_shard_and_totals() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::set(&a.connections, 3);
        ShardMetrics::set(&b.connections, 4);
        a.disconnect(DisconnectReason::Keepalive);
        b.disconnect(DisconnectReason::Keepalive);
        a.packet_in(12);
        let mut s = String::new();
        render(&[a, b], &mut s);
        assert!(s.contains("gateway_connections{shard=\"0\"} 3\n"));
        assert!(s.contains("gateway_connections{shard=\"1\"} 4\n"));
        assert!(s.contains("gateway_disconnects_total{reason=\"keepalive\"} 2\n"));
        assert!(s.contains("gateway_packets_received_total{type=\"pingreq\"} 1\n"));
        assert!(s.contains("# TYPE gateway_connects_total counter\n"));
    }

    #[test]
    fn cpu_ticks_parse_after_the_command_name() {
        let stat = "123 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(cpu_ticks(stat), Some(300));
    }
}
