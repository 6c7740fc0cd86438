//! The producer side: [`EventSender`], the handle IO shards call, and the bounded queue
//! each sink drains.
//!
//! A shard must never wait on the backend, so [`EventSender::try_emit`] never blocks and
//! never allocates beyond the event's one `Arc`: each sink has a preallocated lock-free
//! ring (`crossbeam_queue::ArrayQueue`) of `queue_capacity` slots. When a ring is full the
//! configured [`DropPolicy`] discards the oldest queued event or the new one, and the drop
//! is counted by reason. The sink task is woken through a `tokio::sync::Notify`, whose
//! `notify_one` takes no lock when nobody waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use super::config::DropPolicy;
use super::filter::UplinkFilter;
use super::metrics::SinkMetrics;
use super::model::Event;

/// A sink's ring of queued events.
pub type EventRing = ArrayQueue<Arc<Event>>;

/// One sink's queue: the ring, its wake-up, and what to do when it is full.
#[derive(Clone)]
pub struct SinkQueue {
    pub ring: Arc<EventRing>,
    pub notify: Arc<Notify>,
    pub policy: DropPolicy,
    pub metrics: SinkMetrics,
    /// Takes only `connected`, `disconnected` and `session_expired` (the fleet's
    /// registry): uplinks and subscriptions never crowd them out of the ring.
    pub presence_only: bool,
    /// With [`DropPolicy::DropOldest`], when the newest event dropped happened (Unix ms;
    /// 0: none): every event still queued is at least as new (`cluster::registry`).
    pub newest_dropped_ms: Arc<AtomicU64>,
}

impl SinkQueue {
    /// Queues `event` or drops one event by the policy; never waits.
    pub fn push(&self, event: Arc<Event>) {
        if self.presence_only && !event.kind.is_presence() {
            return;
        }
        let dropped = match self.policy {
            DropPolicy::DropOldest => match self.ring.force_push(event) {
                Some(old) => {
                    (self.newest_dropped_ms).fetch_max(old.time_ms, Ordering::SeqCst);
                    true
                }
                None => false,
            },
            DropPolicy::DropNewest => self.ring.push(event).is_err(),
        };
        if dropped {
            self.metrics.dropped(self.policy.reason(), 1);
        }
        self.notify.notify_one();
    }

    /// Takes up to `max - batch.len()` queued events into `batch`.
    pub fn take(&self, batch: &mut Vec<Arc<Event>>, max: usize) {
        while batch.len() < max {
            match self.ring.pop() {
                Some(e) => batch.push(e),
                None => break,
            }
        }
    }
}

struct Inner {
    sinks: Vec<SinkQueue>,
    uplink: UplinkFilter,
    subscriptions: bool,
}

/// The handle a shard keeps: cheap to clone, never blocks. A disabled sender (no sink
/// configured) answers `false` to every "wants" question, so the shard builds no event.
#[derive(Clone, Default)]
pub struct EventSender {
    inner: Option<Arc<Inner>>,
}

impl EventSender {
    /// A sender that drops nothing and sends nothing: events are off.
    pub fn disabled() -> EventSender {
        EventSender::default()
    }

    pub(super) fn new(
        sinks: Vec<SinkQueue>,
        uplink: UplinkFilter,
        subscriptions: bool,
    ) -> EventSender {
        EventSender {
            inner: (!sinks.is_empty()).then(|| {
                Arc::new(Inner {
                    sinks,
                    uplink,
                    subscriptions,
                })
            }),
        }
    }

    /// Whether lifecycle events (`connected`, `disconnected`, `session_expired`) are wanted.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether `subscribed` / `unsubscribed` are wanted (`include_subscriptions`).
    pub fn wants_subscriptions(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.subscriptions)
    }

    /// Whether a device PUBLISH to `topic` is forwarded as an `uplink` event. One branch
    /// when no uplink filter is configured.
    pub fn wants_uplink(&self, topic: &str) -> bool {
        self.inner.as_ref().is_some_and(|i| i.uplink.matches(topic))
    }

    /// Hands `event` to every sink's queue. Never blocks; a full queue drops by its policy.
    pub fn try_emit(&self, event: Event) {
        if let Some(inner) = &self.inner {
            let event = Arc::new(event);
            for sink in &inner.sinks {
                sink.push(event.clone());
            }
        }
    }
}
