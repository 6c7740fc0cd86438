//! The calls an IO shard makes, one per thing that happened, so each call site in the
//! shard is a single line.
//!
//! Each checks first whether the event is wanted (a disabled sender, subscriptions not
//! included, a topic no uplink filter matches) and then builds nothing: with events off a
//! call is one branch. Each takes the shard's [`SeqGen`], so the sequence number is drawn
//! only for an event that is sent.

use std::sync::Arc;

use super::model::{Connected, Event, EventKind, SeqGen};
use super::queue::EventSender;
use crate::message::Message;
use crate::metrics::DisconnectReason;

impl EventSender {
    /// A CONNECT was accepted (after the takeover of an older connection was closed).
    pub fn connected(&self, seq: &mut SeqGen, client_id: &Arc<str>, c: impl FnOnce() -> Connected) {
        if self.enabled() {
            let kind = EventKind::Connected(Box::new(c()));
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }

    /// An accepted connection (one that got `connected`) ended.
    pub fn disconnected(&self, seq: &mut SeqGen, client_id: &Arc<str>, reason: DisconnectReason) {
        if self.enabled() {
            let kind = EventKind::Disconnected { reason };
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }

    /// A persistent session's expiry interval passed and it was removed.
    pub fn session_expired(&self, seq: &mut SeqGen, client_id: &Arc<str>) {
        if self.enabled() {
            let kind = EventKind::SessionExpired;
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }

    /// A SUBACK granted `filters` (filter, QoS); built only with `include_subscriptions`.
    pub fn subscribed(
        &self,
        seq: &mut SeqGen,
        client_id: &Arc<str>,
        filters: impl FnOnce() -> Vec<(Arc<str>, u8)>,
    ) {
        if self.wants_subscriptions() {
            let kind = EventKind::Subscribed { filters: filters() };
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }

    /// An UNSUBACK removed `filters`; built only with `include_subscriptions`.
    pub fn unsubscribed(
        &self,
        seq: &mut SeqGen,
        client_id: &Arc<str>,
        filters: impl FnOnce() -> Vec<Arc<str>>,
    ) {
        if self.wants_subscriptions() {
            let kind = EventKind::Unsubscribed { filters: filters() };
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }

    /// A device PUBLISH was accepted; forwarded when its topic matches `uplink_filters`.
    /// Shares the message's `Arc`: nothing is copied.
    pub fn uplink(&self, seq: &mut SeqGen, client_id: &Arc<str>, msg: &Arc<Message>) {
        if self.wants_uplink(&msg.topic) {
            let kind = EventKind::Uplink(msg.clone());
            self.try_emit(Event::now(seq.next_seq(), client_id.clone(), kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::config::DropPolicy;
    use crate::events::filter::UplinkFilter;
    use crate::events::metrics::EventsMetrics;
    use crate::events::queue::SinkQueue;
    use crate::message::Origin;

    fn message(topic: &str) -> Arc<Message> {
        Arc::new(Message::new(
            topic.into(),
            bytes::Bytes::new(),
            0,
            false,
            Origin::Gateway,
        ))
    }

    #[test]
    fn a_disabled_sender_builds_nothing() {
        let tx = EventSender::disabled();
        let mut seq = SeqGen::default();
        let id: Arc<str> = "d".into();
        tx.connected(&mut seq, &id, || panic!("built a connected event"));
        tx.subscribed(&mut seq, &id, || panic!("built a subscribed event"));
        tx.unsubscribed(&mut seq, &id, || panic!("built an unsubscribed event"));
        tx.disconnected(&mut seq, &id, DisconnectReason::Client);
        tx.session_expired(&mut seq, &id);
        tx.uplink(&mut seq, &id, &message("a/b"));
        assert!(!tx.enabled());
    }

    #[test]
    fn only_wanted_events_are_queued() {
        let metrics = EventsMetrics::default();
        let ring = Arc::new(crossbeam_queue::ArrayQueue::new(8));
        let queue = SinkQueue {
            ring: ring.clone(),
            notify: Default::default(),
            policy: DropPolicy::DropNewest,
            metrics: metrics.sink("webhook", ring.clone()),
            presence_only: false,
            newest_dropped_ms: Default::default(),
        };
        let tx = EventSender::new(vec![queue], UplinkFilter::new(&["a/+".into()]), false);
        let mut seq = SeqGen::default();
        let id: Arc<str> = "d".into();
        tx.subscribed(&mut seq, &id, || panic!("subscriptions are not included"));
        tx.uplink(&mut seq, &id, &message("c/d"));
        assert_eq!(ring.len(), 0);
        tx.uplink(&mut seq, &id, &message("a/b"));
        tx.disconnected(&mut seq, &id, DisconnectReason::Takeover);
        assert_eq!(ring.len(), 2);
        let first = ring.pop().unwrap();
        let second = ring.pop().unwrap();
        assert_eq!(first.kind.name(), "uplink");
        assert!(second.seq > first.seq);
    }
}
