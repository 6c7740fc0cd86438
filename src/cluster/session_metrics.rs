//! The metrics of the fleet's persistent sessions (`sessions`, `handover`): session
//! changes written to JetStream or not, sessions restored here from the fleet, sessions
//! handed over from here to another node. Rendered with the fleet's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{counter_family, encode_into};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

pub struct SessionMetrics {
    changes: Family<OutcomeLabel, Counter>,
    pub restored: Counter,
    pub handed_over: Counter,
    /// Sessions of dead nodes taken in here (`take_in`).
    pub taken_in: Counter,
    /// The re-sync after a NATS outage (`session_resync`).
    pub resync_pending: Gauge,
    pub resync_written: Counter,
    pub resync_dropped: Counter,
    pub resync_skipped: Counter,
    /// Dead nodes' wills (`session_will`).
    pub wills: WillCounters,
}

/// Wills a dead node left, taken here: published, or not (the client came back); and
/// the wills this node's run before a crash left, not settled yet.
#[derive(Clone, Default)]
pub struct WillCounters {
    pub published: Counter,
    pub cancelled: Counter,
    pub crash_pending: Gauge,
}

impl Default for SessionMetrics {
    fn default() -> Self {
        let changes: Family<OutcomeLabel, Counter> = Family::default();
        for outcome in ["written", "failed", "too_large"] {
            let _ = changes.get_or_create(&OutcomeLabel { outcome });
        }
        SessionMetrics {
            changes,
            restored: Counter::default(),
            handed_over: Counter::default(),
            taken_in: Counter::default(),
            resync_pending: Gauge::default(),
            resync_written: Counter::default(),
            resync_dropped: Counter::default(),
            resync_skipped: Counter::default(),
            wills: WillCounters::default(),
        }
    }
}

impl SessionMetrics {
    /// `n` session changes of one commit group were written to JetStream (`ok`) or not.
    pub fn changes(&self, n: usize, ok: bool) {
        let outcome = if ok { "written" } else { "failed" };
        let family = self.changes.get_or_create(&OutcomeLabel { outcome });
        family.inc_by(n as u64);
    }

    /// A change NATS refused as larger than its `max_payload`: not in the fleet.
    pub fn too_large(&self) {
        let family = self.changes.get_or_create(&OutcomeLabel {
            outcome: "too_large",
        });
        family.inc();
    }

    fn render_resync(&self, registry: &mut Registry) {
        registry.register(
            counter_family("gateway_fleet_dead_node_wills_published_total"),
            "Wills of a dead node's devices (or of this node's run before a crash) this node took and published",
            self.wills.published.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_dead_node_wills_cancelled_total"),
            "Wills of a dead node's devices (or of this node's run before a crash) this node took and did not publish: the device was back after the will delay (on a live node; for this node's own, here too)",
            self.wills.cancelled.clone(),
        );
        registry.register(
            "gateway_fleet_crash_wills_pending",
            "Wills this node's run before a crash left, read after the restart and not settled yet (waiting for their delay, or to be tried again)",
            self.wills.crash_pending.clone(),
        );
        registry.register(
            "gateway_fleet_session_resync_pending",
            "Session changes made while NATS was away, waiting to be written to JetStream",
            self.resync_pending.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_session_resync_written_total"),
            "Session changes made while NATS was away, written to JetStream once it was back",
            self.resync_written.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_session_resync_dropped_total"),
            "Session changes made while NATS was away not kept for the re-sync (past cluster.session_resync_max_mib)",
            self.resync_dropped.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_session_resync_skipped_total"),
            "Session records (and restart resets) kept for the re-sync and not written: another node wrote the session's record more than cluster.clock_skew_ms after this node made them (the device resumed there while NATS was away; this node's copy is stale)",
            self.resync_skipped.clone(),
        );
    }

    /// Appends the families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        registry.register(
            counter_family("gateway_fleet_session_changes_total"),
            "Persistent-session changes (records, subscriptions, queued messages and their deletions) and the wills of online sessions for JetStream, by outcome: written, failed (the pushes waiting for them answered dropped, store_error), too_large (refused by NATS as larger than its max_payload: not kept in the fleet; a record written empty instead)",
            self.changes.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_sessions_restored_total"),
            "Sessions read from JetStream for a device resuming here",
            self.restored.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_sessions_handed_over_total"),
            "Sessions this node let go because another node resumes them",
            self.handed_over.clone(),
        );
        registry.register(
            counter_family("gateway_fleet_sessions_taken_in_total"),
            "Persistent sessions of dead nodes this node took in (offline) so that their messages and pushes are queued until the device comes back",
            self.taken_in.clone(),
        );
        self.render_resync(&mut registry);
        encode_into(&registry, out);
    }
}
