//! The registry's own metrics (`RegistryMetrics`): its JetStream key-value operations by
//! kind and outcome (a compare-and-set that lost to another node's write is a
//! `conflict`), the takeovers the flapping throttle refused, and the connections this
//! node closed because another node's later claim won their client id. Counted on the
//! business pool, rendered with the other fleet metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{counter_family, encode_into};

/// The `op` label values of `gateway_fleet_registry_ops_total`, all exported at 0.
pub const OPS: [&str; 4] = ["get", "update", "delete", "lease"];
/// Its `outcome` label values.
pub const OUTCOMES: [&str; 3] = ["ok", "error", "conflict"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    outcome: &'static str,
}

pub struct RegistryMetrics {
    ops: Family<OpLabels, Counter>,
    /// Takeovers from another node refused by `takeover_min_interval_ms`.
    pub throttled: Counter,
    /// Connections here closed because another node's later claim won their client id.
    pub lost: Counter,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        let ops: Family<OpLabels, Counter> = Family::default();
        for op in OPS {
            for outcome in OUTCOMES {
                if outcome != "conflict" || op == "update" || op == "delete" {
                    let _ = ops.get_or_create(&OpLabels { op, outcome });
                }
            }
        }
        RegistryMetrics {
            ops,
            throttled: Counter::default(),
            lost: Counter::default(),
        }
    }
}

impl RegistryMetrics {
    /// Counts one registry operation `op` (one of [`OPS`]) that succeeded or failed.
    pub fn count(&self, op: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.ops.get_or_create(&OpLabels { op, outcome }).inc();
    }

    /// Counts a compare-and-set `op` that lost to another write.
    pub fn conflict_on(&self, op: &'static str) {
        let labels = OpLabels {
            op,
            outcome: "conflict",
        };
        self.ops.get_or_create(&labels).inc();
    }

    /// Counts a claim's update that lost to another node's write.
    pub fn conflict(&self) {
        self.conflict_on("update");
    }

    /// Appends the families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        registry.register(
            counter_family("gateway_fleet_registry_ops_total"),
            "Operations on the fleet's registry (JetStream key-value) by kind and outcome; conflict: a compare-and-set that another write beat",
            self.ops.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_takeovers_throttled_total"),
            "Connections closed instead of taking their client id over from another node again within cluster.takeover_min_interval_ms (a client id flapping between nodes)",
            self.throttled.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_arbitration_lost_total"),
            "Connections here closed because another node's later registry claim won their client id",
            self.lost.clone(),
        );
        encode_into(&registry, out);
    }
}
