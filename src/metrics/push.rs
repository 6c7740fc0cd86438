//! The push API's metrics (`PushMetrics`): requests and messages by status and their
//! latency, in prometheus-client's own metric types on the business pool.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::exposition::{counter_family, encode_into};

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
pub(super) struct StatusLabel {
    status: &'static str,
}

/// The labels of `gateway_push_requests_total`: `endpoint` (`push` or `batch`) and the
/// HTTP status `code` of the answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabel {
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
