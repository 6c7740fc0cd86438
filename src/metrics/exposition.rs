//! The Prometheus exposition of the shards' counters: the collector that sums them or
//! labels them by shard at scrape time, the encoding helpers, and the rewrite of
//! prometheus-client's OpenMetrics text into the Prometheus text format 0.0.4.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::labels::{
    DisconnectReason, DropReason, RefuseReason, TlsHandshake, CONNECTION_AGE_BUCKETS, PACKET_TYPES,
};
use super::shard::{ShardMetrics, TRANSPORTS};

pub(super) fn get(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

/// The family name prometheus-client wants for a counter: without the `_total` it adds.
pub(crate) fn counter_family(name_total: &str) -> &str {
    name_total.strip_suffix("_total").unwrap_or(name_total)
}

pub(super) fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

pub(super) fn counter(
    enc: &mut DescriptorEncoder,
    name_total: &str,
    help: &str,
    v: impl EncodeCounterValue,
) -> fmt::Result {
    enc.encode_descriptor(counter_family(name_total), help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A gauge family with one sample per label value.
pub(super) fn labelled_gauges<V: EncodeGaugeValue>(
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
pub(super) fn labelled_counters<V: EncodeCounterValue>(
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

/// Reads every shard's atomics at scrape time. `all` holds the shards' metrics, in shard
/// order, then those of the threads that count on the shards' behalf (the TLS handshake
/// threads): their counts go into the totals but get no `shard` label of their own.
pub(super) struct ShardCollector {
    all: Vec<Arc<ShardMetrics>>,
    shards: usize,
}

impl fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCollector")
            .field("shards", &self.shards)
            .finish()
    }
}

impl ShardCollector {
    fn total(&self, f: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.all.iter().map(|s| f(s)).sum()
    }

    /// For each `(label, index)`, the label and the sum over shards of the counter at
    /// that index of the array `counters` picks.
    fn label_totals<'a, const N: usize>(
        &'a self,
        labels: [(&'static str, usize); N],
        counters: impl Fn(&ShardMetrics) -> &[AtomicU64] + Copy + 'a,
    ) -> impl Iterator<Item = (String, u64)> + 'a {
        labels
            .into_iter()
            .map(move |(label, i)| (label.to_owned(), self.total(|s| get(&counters(s)[i]))))
    }

    fn per_shard<V>(&self, f: impl Fn(&ShardMetrics) -> V) -> Vec<(String, V)> {
        self.all[..self.shards]
            .iter()
            .enumerate()
            .map(|(i, s)| (i.to_string(), f(s)))
            .collect()
    }
}

impl Collector for ShardCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_state(&mut enc)?;
        self.encode_connections(&mut enc)?;
        self.encode_traffic(&mut enc)?;
        self.encode_connection_age(&mut enc)?;
        self.encode_polls(&mut enc)
    }
}

impl ShardCollector {
    /// What the shards hold now: connections, sessions, timers, subscriptions, queues.
    fn encode_state(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        labelled_gauges(
            e,
            "gateway_connections",
            "Open connections, by shard (TLS connections in their handshake on a TLS handshake thread are in gateway_tls_handshakes_in_progress instead).",
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
            "Connections congested (output above outbound_high_watermark, or QoS 1/2 queue at pace_queued_messages) that pace their publishers (slow_consumer = pace).",
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
            "gateway_tls_record_connections",
            "TLS 1.3 and 1.2 connections past their handshake whose records the gateway's own record layer protects (rustls dropped; an idle one keeps only its keys). Handshakes stay on rustls.",
            self.total(|s| get(&s.tls_record_connections)),
        )?;
        labelled_gauges(
            e,
            "gateway_tls_handshakes_in_progress",
            "TLS connections the shard accepted whose handshake runs on a TLS handshake thread (limits.tls_handshake_threads); they count against limits.max_handshaking.",
            "shard",
            self.per_shard(|s| get(&s.tls_handshaking)),
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
        Ok(())
    }

    /// Connections opened, ended, refused or paused, and the bytes they moved.
    fn encode_connections(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
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
            self.label_totals(
                DisconnectReason::ALL.map(|r| (r.as_str(), r as usize)),
                |s| &s.disconnects,
            ),
        )?;
        labelled_counters(
            e,
            "gateway_connect_refused_total",
            "CONNECTs refused, by reason.",
            "reason",
            self.label_totals(RefuseReason::ALL.map(|r| (r.as_str(), r as usize)), |s| {
                &s.refused
            }),
        )?;
        labelled_counters(
            e,
            "gateway_tls_handshakes_total",
            "TLS handshakes by how they ended: full, resumed (from a session ticket), failed.",
            "kind",
            self.label_totals(TlsHandshake::ALL.map(|k| (k.as_str(), k as usize)), |s| {
                &s.tls_handshakes
            }),
        )?;
        counter(
            e,
            "gateway_tls_handshakes_deferred_total",
            "Reads of TLS connections in their handshake put off to the next loop turn because the turn's limits.tls_handshakes_per_turn were spent.",
            self.total(|s| get(&s.tls_handshakes_deferred)),
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
            "Times a client's PUBLISH packets stopped being read because a subscriber its messages reach was congested (slow_consumer = pace).",
            self.total(|s| get(&s.publisher_pauses)),
        )?;
        counter(
            e,
            "gateway_shard_handoff_messages_total",
            "Messages a shard handed to another shard whose subscriptions may match them ([shards] interest_buckets).",
            self.total(|s| get(&s.handoff_messages)),
        )?;
        counter(
            e,
            "gateway_shard_handoff_batches_total",
            "Batches those messages rode in: one mailbox send and at most one wake-up per shard and loop turn.",
            self.total(|s| get(&s.handoff_batches)),
        )?;
        counter(
            e,
            "gateway_publisher_pause_seconds_total",
            "Seconds publishers spent paced, counted when each pause ends (slow_consumer = pace).",
            self.total(|s| get(&s.publisher_pause_ns)) as f64 / 1e9,
        )?;
        labelled_gauges(
            e,
            "gateway_paced_publishers",
            "Connections whose PUBLISH packets are not read right now because a subscriber their messages reach is congested.",
            "shard",
            self.per_shard(|s| get(&s.paced_publishers)),
        )?;
        labelled_gauges(
            e,
            "gateway_output_buffer_bytes",
            "Unsent output bytes held for connections (bounded by [buffers] output_max_bytes).",
            "shard",
            self.per_shard(|s| get(&s.output_bytes)),
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
        Ok(())
    }

    /// ACL refusals, dropped messages, packets by type, the buffer pools.
    fn encode_traffic(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
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
        Ok(())
    }

    /// Connection age: the shards' buckets summed.
    fn encode_connection_age(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = CONNECTION_AGE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, le)| (le, self.total(|s| get(&s.connection_age.counts[i]))))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self
            .all
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
        Ok(())
    }

    /// The shards' main futures, from their tokio-metrics TaskMonitors.
    fn encode_polls(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let now = Instant::now();
        let polls: Vec<_> = self.all[..self.shards]
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

/// Renders all shards' metrics in the Prometheus text format (version 0.0.4), with
/// `off_shard`'s counts (threads counting for the shards) added to the totals.
pub fn render(shards: &[Arc<ShardMetrics>], off_shard: &[Arc<ShardMetrics>], out: &mut String) {
    let mut registry = Registry::default();
    let all = shards.iter().chain(off_shard).cloned().collect();
    registry.register_collector(Box::new(ShardCollector {
        all,
        shards: shards.len(),
    }));
    encode_into(&registry, out);
}
