//! The routing's metrics: messages in and out of NATS, the ones dropped by reason, the
//! NATS subscriptions this node holds for its sessions' filters and whether the routing
//! connection is up.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{counter_family, encode_into};

/// Why a message did not go out to, or come in from, the fleet.
#[derive(Debug, Clone, Copy)]
pub enum RouteDrop {
    /// The outgoing queue (`routing_queue_capacity`) was full.
    QueueFull,
    /// Larger than the NATS server's `max_payload`, or a subject longer than it takes.
    TooLarge,
    /// A second copy of a message this node already delivered (overlapping filters).
    Duplicate,
    /// A body or subject this node cannot read.
    Malformed,
    /// Expired before it could leave or arrive.
    Expired,
    /// Arrived after this node's shards stopped (a graceful stop).
    Stopping,
}

impl RouteDrop {
    pub const ALL: [RouteDrop; 6] = [
        RouteDrop::QueueFull,
        RouteDrop::TooLarge,
        RouteDrop::Duplicate,
        RouteDrop::Malformed,
        RouteDrop::Expired,
        RouteDrop::Stopping,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RouteDrop::QueueFull => "queue_full",
            RouteDrop::TooLarge => "too_large",
            RouteDrop::Duplicate => "duplicate",
            RouteDrop::Malformed => "malformed",
            RouteDrop::Expired => "expired",
            RouteDrop::Stopping => "stopping",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

pub struct RouteMetrics {
    messages: Family<DirectionLabel, Counter>,
    retained: Family<DirectionLabel, Counter>,
    dropped: Family<ReasonLabel, Counter>,
    /// NATS subscriptions held for this node's filters (the sum of `by_connection`).
    subscriptions: Gauge,
    by_connection: [std::sync::atomic::AtomicI64; 2],
    /// 1 while the routing connection to NATS is up.
    pub connected: Gauge,
    /// Subscribe barriers (each holding SUBACKs, or a resumed session's CONNACK) let go
    /// before NATS confirmed their subscriptions (they waited `request_timeout_ms`).
    pub subacks_waited_out: Counter,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        let messages: Family<DirectionLabel, Counter> = Family::default();
        let retained: Family<DirectionLabel, Counter> = Family::default();
        for direction in ["in", "out"] {
            let _ = messages.get_or_create(&DirectionLabel { direction });
            let _ = retained.get_or_create(&DirectionLabel { direction });
        }
        let dropped: Family<ReasonLabel, Counter> = Family::default();
        for r in RouteDrop::ALL {
            let _ = dropped.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        RouteMetrics {
            messages,
            retained,
            dropped,
            subscriptions: Gauge::default(),
            by_connection: Default::default(),
            connected: Gauge::default(),
            subacks_waited_out: Counter::default(),
        }
    }
}

impl RouteMetrics {
    pub fn sent(&self, n: u64) {
        self.messages
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc_by(n);
    }

    pub fn received(&self, n: u64) {
        self.messages
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc_by(n);
    }

    /// Connection `i` (messages 0, groups 1) holds `n` subscriptions.
    pub fn set_subscriptions(&self, i: usize, n: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.by_connection[i].store(n, Relaxed);
        let total = self.by_connection.iter().map(|c| c.load(Relaxed)).sum();
        self.subscriptions.set(total);
    }

    /// A retained update put into the fleet's bucket.
    pub fn retained_out(&self) {
        self.retained
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc();
    }

    /// A retained update read from the fleet's bucket and applied here.
    pub fn retained_in(&self) {
        self.retained
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc();
    }

    pub fn drop_msg(&self, reason: RouteDrop) {
        self.drop_msgs(reason, 1);
    }

    /// `n` messages not routed, for `reason`.
    pub fn drop_msgs(&self, reason: RouteDrop, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc_by(n);
    }

    /// Appends the routing families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        registry.register(
            counter_family("gateway_fleet_messages_total"),
            "Messages routed between nodes through NATS: out = published by this node, in = delivered here from another node (after the duplicate check)",
            self.messages.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_retained_total"),
            "Retained updates in the fleet's bucket: out = put by this node, in = read from it and applied here (this node's own included)",
            self.retained.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_messages_dropped_total"),
            "Messages not routed to or from other nodes, by reason",
            self.dropped.clone(),
        );
        registry.register(
            "gateway_fleet_route_subscriptions",
            "NATS subscriptions this node holds for the topic filters of its sessions",
            self.subscriptions.clone(),
        );
        registry.register(
            "gateway_fleet_route_connected",
            "1 while this node's message routing connection to NATS is up",
            self.connected.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_subacks_waited_out_total"),
            "Subscribe barriers (held SUBACKs, or a resumed session's CONNACK) let go after cluster.request_timeout_ms without NATS confirming their new subscriptions",
            self.subacks_waited_out.clone(),
        );
        encode_into(&registry, out);
    }
}
