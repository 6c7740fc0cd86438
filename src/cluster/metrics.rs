//! The fleet's metrics (`FleetMetrics`): pushes this node forwarded to other nodes by
//! outcome and their round-trip time, the pushes it answered for other nodes, and the
//! takeovers it asked of other nodes, and whether its NATS connection is up. Counted on the business pool; rendered with
//! `/metrics` when `[cluster] enabled`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{counter_family, encode_into, PUSH_BUCKETS};

/// The `outcome` label values of `gateway_fleet_requests_total`, all exported at 0.
pub const OUTCOMES: [&str; 4] = ["answered", "no_responders", "timeout", "error"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

pub struct FleetMetrics {
    requests: Family<OutcomeLabel, Counter>,
    duration: Histogram,
    pub served: Counter,
    pub takeovers: Counter,
    /// 1 while the NATS connection is up (set at each scrape).
    pub nats_connected: Gauge,
}

impl Default for FleetMetrics {
    fn default() -> Self {
        let requests: Family<OutcomeLabel, Counter> = Family::default();
        for outcome in OUTCOMES {
            let _ = requests.get_or_create(&OutcomeLabel { outcome });
        }
        FleetMetrics {
            requests,
            duration: Histogram::new(PUSH_BUCKETS),
            served: Counter::default(),
            takeovers: Counter::default(),
            nats_connected: Gauge::default(),
        }
    }
}

impl FleetMetrics {
    /// Counts one request to another node (`outcome` one of [`OUTCOMES`]) and its
    /// round-trip time when it was answered.
    pub fn request(&self, outcome: &'static str, seconds: Option<f64>) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Some(s) = seconds {
            self.duration.observe(s.max(0.0));
        }
    }

    /// Appends the fleet families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        registry.register(
            counter_family("gateway_fleet_requests_total"),
            "Pushes forwarded to the node holding the device, by outcome of the NATS request",
            self.requests.clone(),
        );
        registry.register(
            "gateway_fleet_request_seconds",
            "Round trip of an answered push request to another node",
            self.duration.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_requests_served_total"),
            "Push requests from other nodes answered by this node",
            self.served.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_takeovers_total"),
            "Devices that connected here while another node held them (that node was asked to close its connection)",
            self.takeovers.clone(),
        );
        registry.register(
            "gateway_fleet_nats_connected",
            "1 while this node's connection to the fleet's NATS is up, 0 while it reconnects",
            self.nats_connected.clone(),
        );
        encode_into(&registry, out);
    }
}
