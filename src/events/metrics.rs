//! The events pipeline's metrics, labelled by sink (`webhook`, `nats`): events sent,
//! retried and dropped (by reason), queue depth, and delivery latency.
//!
//! Counters are prometheus-client's shared atomics, resolved per sink once at start, so
//! counting a drop on an IO shard is one atomic add. They are appended to `/metrics` by
//! [`EventsMetrics::render`], like the store's families.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::model::Event;
use super::queue::EventRing;
use crate::metrics::{counter_family, encode_into};

/// Every `reason` label value of `gateway_events_dropped_total`, exported from the start.
pub const DROP_REASONS: [&str; 4] = [
    "queue_full_oldest",
    "queue_full_newest",
    "rejected",
    "shutdown",
];

/// Upper bounds (seconds) of `gateway_events_delivery_seconds`: 1 ms to 5 minutes.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    sink: &'static str,
    reason: &'static str,
}

/// All sinks' families.
pub struct EventsMetrics {
    sent: Family<SinkLabel, Counter>,
    retried: Family<SinkLabel, Counter>,
    dropped: Family<DropLabel, Counter>,
    latency: Family<SinkLabel, Histogram>,
    queues: std::sync::Mutex<Vec<(&'static str, Arc<EventRing>)>>,
}

impl Default for EventsMetrics {
    fn default() -> Self {
        EventsMetrics {
            sent: Family::default(),
            retried: Family::default(),
            dropped: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            queues: Default::default(),
        }
    }
}

/// One sink's series, resolved once.
#[derive(Clone, Debug)]
pub struct SinkMetrics {
    pub sent: Counter,
    pub retried: Counter,
    dropped: Vec<Counter>,
    latency: Histogram,
}

impl SinkMetrics {
    /// Counts `n` events dropped for `reason` (one of [`DROP_REASONS`]).
    pub fn dropped(&self, reason: &str, n: u64) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i].inc_by(n);
        }
    }

    /// Observes the delivery latency of `events` (from when each happened to now).
    pub fn delivered(&self, events: &[Arc<Event>]) {
        let now_ms = super::model::unix_micros() / 1000;
        for e in events {
            let secs = now_ms.saturating_sub(e.time_ms) as f64 / 1000.0;
            self.latency.observe(secs);
        }
        self.sent.inc_by(events.len() as u64);
    }

    /// Events dropped for `reason` so far (for tests and logs).
    pub fn dropped_count(&self, reason: &str) -> u64 {
        DROP_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.dropped[i].get())
    }
}

impl EventsMetrics {
    /// The series of `sink`, all created at 0, and its queue for the depth gauge.
    pub fn sink(&self, sink: &'static str, queue: Arc<EventRing>) -> SinkMetrics {
        let label = SinkLabel { sink };
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sink, queue));
        SinkMetrics {
            sent: self.sent.get_or_create(&label).clone(),
            retried: self.retried.get_or_create(&label).clone(),
            dropped: DROP_REASONS
                .iter()
                .map(|&reason| {
                    self.dropped
                        .get_or_create(&DropLabel { sink, reason })
                        .clone()
                })
                .collect(),
            latency: self.latency.get_or_create(&label).clone(),
        }
    }

    /// Appends the events families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut r = Registry::default();
        let depth: Family<SinkLabel, Gauge> = Family::default();
        for (sink, q) in self.queues.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            depth.get_or_create(&SinkLabel { sink }).set(q.len() as i64);
        }
        r.register(
            "gateway_events_queue_depth",
            "Events waiting in a sink's queue",
            depth,
        );
        r.register(
            counter_family("gateway_events_sent_total"),
            "Events delivered by a sink (acknowledged by the webhook or JetStream, or published to NATS)",
            self.sent.clone(),
        );
        r.register(
            counter_family("gateway_events_retried_total"),
            "Events sent again after a failed delivery attempt",
            self.retried.clone(),
        );
        r.register(
            counter_family("gateway_events_dropped_total"),
            "Events a sink dropped, by reason",
            self.dropped.clone(),
        );
        r.register(
            "gateway_events_delivery_seconds",
            "Time from an event to its delivery by a sink",
            self.latency.clone(),
        );
        encode_into(&r, out);
    }
}
