//! Routing and delivery on a shard: from a message to the bytes on each subscriber's
//! connection, or into its session queue.
//!
//! A message published on this shard is routed to local subscribers and handed once to
//! every other shard that may hold a matching subscription (batched per loop turn). Delivery respects, per connection, the
//! client's in-flight window and the outbound watermarks: QoS 1/2 waits in the session
//! queue (bounded, oldest dropped); QoS 0 above the high watermark is still written (up
//! to `outbound_max_bytes`) while the publishers whose messages reach a congested
//! connection are paced (`pacing.rs`), or, with `slow_consumer = "drop"`, dropped and
//! counted.
//!
//! A session with several matching subscriptions gets one copy at the highest granted QoS,
//! carrying the Subscription Identifiers of all of them. Shared groups are matched only on
//! their owner shard (see `shared.rs`). MQTT 5 topic aliases are assigned here, per
//! connection, when the client allows them.

use std::sync::Arc;

use crate::acl::ACL_FILTERED;
use crate::codec::{self, OutPublish, Version};
use crate::interest::TopicKeys;
use crate::message::{Message, Origin};
use crate::metrics::DropReason;
use crate::session::{ConnKey, Inflight, InflightState, Queued, SessionKey};
use crate::topic;

use super::{packet, ConnState, Shard};

/// What happened to one message offered to one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Encoded onto the live connection (QoS 1/2: and tracked until acknowledged).
    Sent,
    /// Stored in the session queue: the device is offline, or its window is full.
    Queued,
    /// Not delivered and not stored.
    Dropped(DropReason),
}

impl Shard {
    /// A message published by a device or will on this shard: local subscribers, then
    /// the other shards whose subscriptions may match it (`crate::interest`); a retained
    /// one to its topic's home shard's order (`retained.rs`) and to every shard, which all
    /// keep the retained messages.
    pub(super) fn publish(&mut self, msg: Arc<Message>) {
        if msg.retain {
            self.order_retained(&msg);
        }
        self.route(&msg);
        self.offer_to_fleet(&msg);
        if self.routing.outbox.len() == 1 {
            return;
        }
        let keys = TopicKeys::of(&msg.topic);
        for shard in 0..self.routing.outbox.len() {
            if shard != self.id
                && (msg.retain || self.services.mailboxes.interest().may_match(shard, &keys))
            {
                self.routing.route_to(shard, &msg);
            }
        }
    }

    /// A message from another shard or the business pool.
    /// Returns the number of local sessions it matched.
    pub(super) fn accept_remote(&mut self, msg: &Arc<Message>) -> usize {
        if msg.retain {
            self.order_retained(msg);
        }
        self.route(msg)
    }

    /// Delivers to every local session with a matching subscription, once per session
    /// with the highest granted QoS among its matching subscriptions and all their
    /// subscription identifiers, then to one member of each shared group this shard owns.
    /// Returns the number of sessions and groups it matched.
    /// In a fleet, shared groups get their messages through NATS, which picks one node's
    /// members per group (`fleet_route.rs`), never here.
    pub(super) fn route(&mut self, msg: &Arc<Message>) -> usize {
        let shared = match self.services.fleet_route {
            None => self.route_shared(msg),
            Some(_) => 0,
        };
        self.route_subscribers(msg) + shared
    }

    /// The non-shared part of [`Shard::route`]: the local sessions' subscriptions.
    pub(super) fn route_subscribers(&mut self, msg: &Arc<Message>) -> usize {
        if msg.is_expired(self.clock.now_instant) {
            self.services.metrics.drop_msg(DropReason::Expired, 1);
            return 0;
        }
        let mut matched = 0;
        // The shard's reusable match buffer: routing allocates nothing per message here.
        let mut hits = std::mem::take(&mut self.routing.match_buf);
        hits.clear();
        self.routing
            .subs
            .for_each_match(&msg.topic, |s| hits.push(s));
        if hits.len() > 1 {
            hits.sort_unstable_by_key(|s| s.session);
        }
        let mut i = 0;
        let mut ids: Vec<u32> = Vec::new();
        while i < hits.len() {
            let session = hits[i].session;
            let mut best: Option<(u8, bool)> = None;
            ids.clear();
            while i < hits.len() && hits[i].session == session {
                let o = hits[i].options;
                let sub_id = hits[i].sub_id;
                i += 1;
                if o & ACL_FILTERED != 0 && !self.acl_receives(session as usize, &msg.topic) {
                    continue;
                }
                let no_local = o & 0b100 != 0;
                if no_local
                    && msg.origin
                        == (Origin::Device {
                            shard: self.id as u16,
                            session,
                        })
                {
                    continue;
                }
                let qos = msg.qos.min(o & 3);
                let retain = msg.retain && o & 0b1000 != 0;
                if sub_id != 0 {
                    ids.push(sub_id);
                }
                best = Some(match best {
                    Some((q, r)) => (q.max(qos), r || retain),
                    None => (qos, retain),
                });
            }
            if let Some((qos, retain)) = best {
                let sub_ids = (!ids.is_empty()).then(|| {
                    ids.sort_unstable();
                    ids.dedup();
                    Box::from(&ids[..])
                });
                self.deliver(session as usize, msg, qos, retain, sub_ids);
                matched += 1;
            }
        }
        self.routing.match_buf = hits;
        matched
    }

    /// The retained messages matching a new subscription, sent with RETAIN set.
    pub(super) fn send_retained(&mut self, skey: usize, filter: &str, granted: u8, sub_id: u32) {
        let now = self.clock.now_instant;
        let matching: Vec<Arc<Message>> = if filter.contains(['+', '#']) {
            self.routing
                .retained
                .values()
                .filter(|m| topic::matches(filter, &m.topic))
                .cloned()
                .collect()
        } else {
            self.routing
                .retained
                .get(filter)
                .cloned()
                .into_iter()
                .collect()
        };
        let filtered = self
            .sessions
            .get(skey)
            .and_then(|s| s.subscription(filter))
            .is_some_and(|o| o & ACL_FILTERED != 0);
        for m in matching {
            if m.is_expired(now) {
                self.forget_retained(&m.topic);
                continue;
            }
            if filtered && !self.acl_receives(skey, &m.topic) {
                continue;
            }
            let sub_ids = (sub_id != 0).then(|| Box::from([sub_id]));
            self.deliver(skey, &m, m.qos.min(granted), true, sub_ids);
        }
    }

    /// One message to one session at the QoS it was granted.
    pub(super) fn deliver(
        &mut self,
        skey: usize,
        msg: &Arc<Message>,
        qos: u8,
        retain: bool,
        sub_ids: Option<Box<[u32]>>,
    ) -> Delivery {
        let item = Queued {
            msg: msg.clone(),
            qos,
            retain,
            sub_ids,
            shared: None,
            waiter: None,
            seq: 0,
            dup: false,
        };
        self.deliver_item(skey, item)
    }

    /// Delivers or queues one item, and says exactly what happened to it.
    pub(super) fn deliver_item(&mut self, skey: usize, mut item: Queued) -> Delivery {
        if item.msg.is_expired(self.clock.now_instant) {
            self.services.metrics.drop_msg(DropReason::Expired, 1);
            return Delivery::Dropped(DropReason::Expired);
        }
        // Stored before it is sent or queued: it stays stored until acknowledged.
        self.store_message(skey, &mut item);
        let ckey = self.sessions[skey].conn.map(ConnKey::index);
        let conn = ckey
            .and_then(|c| self.wire.conns.get(c))
            .filter(|c| c.state == ConnState::Active);
        let (Some(conn), Some(ckey)) = (conn, ckey) else {
            if item.qos == 0 {
                self.services.metrics.drop_msg(DropReason::Offline, 1);
                return Delivery::Dropped(DropReason::Offline);
            }
            self.enqueue(skey, item);
            return Delivery::Queued;
        };
        let over_high = conn.outbound_len() >= self.settings.high_watermark;
        let origin = item.msg.origin;
        let delivery = if item.qos == 0 {
            self.deliver_qos0(ckey, &item, over_high)
        } else if !over_high && self.sessions[skey].window_open(self.wire.conns[ckey].window) {
            if self.send_inflight(skey, ckey, item) {
                Delivery::Sent
            } else {
                Delivery::Dropped(DropReason::TooLarge)
            }
        } else {
            // QoS 1/2 waits in the session queue.
            self.enqueue(skey, item);
            Delivery::Queued
        };
        if self.settings.pace {
            let over_high = self.wire.conns[ckey].outbound_len() >= self.settings.high_watermark;
            if over_high || self.sessions[skey].queued_len() >= self.settings.pace_queued {
                self.note_congested(ckey);
            }
            self.pace_publisher(ckey, origin);
        }
        delivery
    }

    /// A QoS 0 message onto a live connection. Above the high watermark it is dropped,
    /// unless publishers are paced instead, which still drops it at `outbound_max` or
    /// when the shard's output reached its share of `output_max_bytes`.
    fn deliver_qos0(&mut self, ckey: usize, item: &Queued, over_high: bool) -> Delivery {
        let s = &self.settings;
        let room = s.pace
            && self.wire.conns[ckey].outbound_len() < s.outbound_max
            && self.wire.output_bytes < s.output_max;
        if over_high && !room {
            self.services.metrics.drop_msg(DropReason::SlowConsumer, 1);
            return Delivery::Dropped(DropReason::SlowConsumer);
        }
        if self.send_publish(ckey, 0, item, false) {
            Delivery::Sent
        } else {
            Delivery::Dropped(DropReason::TooLarge)
        }
    }

    /// Queues a QoS 1/2 message, dropping the oldest beyond the session's bound:
    /// `max_queued_messages`, or, for a connected session whose publishers are paced,
    /// `paced_max_queued_messages` (each publisher gets a message or a loop turn's worth
    /// in before it is paced, so a subscriber thousands of devices publish to needs room
    /// for one from each; `pacing.rs`).
    fn enqueue(&mut self, skey: usize, item: Queued) {
        let online = self.sessions[skey].conn.is_some();
        let max = if online && self.settings.pace {
            self.settings.paced_max_queued
        } else {
            self.settings.max_queued
        };
        self.trim_queue(skey, max.saturating_sub(1));
        self.sessions[skey].state().queue.push_back(item);
        self.sessions.queued_total += 1;
    }

    /// Drops the oldest queued messages of session `skey` beyond `max` (counted as
    /// `queue_full`, and forgotten by the store).
    pub(super) fn trim_queue(&mut self, skey: usize, max: usize) {
        while self.sessions[skey].queued_len() > max {
            let Some(old) = self.sessions[skey].state().queue.pop_front() else {
                return;
            };
            self.sessions.queued_total -= 1;
            self.services.metrics.drop_msg(DropReason::QueueFull, 1);
            self.store_forget(skey, &old);
        }
    }

    /// Sends a QoS 1/2 message with a fresh packet id and tracks it until acknowledged.
    /// False if it was too large for the client (dropped).
    fn send_inflight(&mut self, skey: usize, ckey: usize, item: Queued) -> bool {
        let pkid = self.sessions[skey].next_packet_id();
        if !self.send_publish(ckey, pkid, &item, item.dup) {
            self.store_forget(skey, &item);
            return false;
        }
        self.store_qos2_sent(skey, pkid, &item);
        self.sessions[skey].state().inflight.push_back(Inflight {
            pkid,
            state: InflightState::Published,
            item,
        });
        true
    }

    /// Encodes a PUBLISH onto a connection; false if it exceeds the client's Maximum
    /// Packet Size (dropped and counted, MQTT 5 3.1.2.11.4). With MQTT 5 topic aliases
    /// allowed, the topic's alias goes along: with the topic the first time, alone after.
    fn send_publish(&mut self, ckey: usize, pkid: u16, item: &Queued, dup: bool) -> bool {
        let conn = &self.wire.conns[ckey];
        let v = conn.version;
        let v5 = v == Version::V5;
        // Aliases only on an MQTT 5 connection with a session that allows them.
        let skey = conn.session.map(SessionKey::index).filter(|_| v5);
        let alias_max = skey
            .and_then(|k| self.sessions.get(k))
            .map_or(0, |s| s.alias_max);
        let skey = skey.unwrap_or_default();
        let alias = (alias_max > 0).then(|| {
            self.sessions[skey]
                .extra
                .as_ref()
                .and_then(|st| st.aliases.as_ref())
                .map_or((1, false), |a| a.outbound(&item.msg.topic, alias_max))
        });
        let topic: &str = match alias {
            Some((_, true)) => "",
            _ => &item.msg.topic,
        };
        let p = OutPublish {
            dup,
            qos: item.qos,
            retain: item.retain,
            topic,
            pkid,
            payload: &item.msg.payload,
            props: if v5 { item.msg.props.as_deref() } else { None },
            // Never more than the interval it came with: the shard's clock is read once
            // per turn, so it may be a little older than the message.
            message_expiry: if v5 {
                item.msg
                    .remaining_expiry_secs(self.clock.now_instant.max(item.msg.created))
            } else {
                None
            },
            subscription_ids: item.sub_ids.as_deref().unwrap_or(&[]),
            topic_alias: alias.map(|(a, _)| a),
        };
        let len = codec::publish_len(v, &p);
        if len > conn.max_packet as usize {
            self.services.metrics.drop_msg(DropReason::TooLarge, 1);
            return false;
        }
        if let Some((a, _)) = alias {
            self.sessions[skey]
                .state()
                .aliases
                .get_or_insert_with(Default::default)
                .commit(&item.msg.topic, a);
        }
        self.wire.output(&self.clock, ckey, len, |out| {
            codec::encode_publish(out, v, &p);
        });
        self.services.metrics.packet_out(packet::PUBLISH);
        true
    }

    /// Moves queued messages onto the connection while its window and watermark allow:
    /// first the messages of an earlier connection still waiting to be resent.
    pub(super) fn refill(&mut self, skey: usize) {
        self.resend_waiting(skey);
        loop {
            let Some(s) = self.sessions.get_mut(skey) else {
                return;
            };
            let Some(ckey) = s.conn.map(ConnKey::index) else {
                break;
            };
            if s.queued_len() == 0 {
                break;
            }
            let Some(conn) = self.wire.conns.get(ckey) else {
                break;
            };
            if conn.state != ConnState::Active
                || conn.outbound_len() >= self.settings.high_watermark
            {
                break;
            }
            let Some(item) = s.next_to_send(conn.window) else {
                break;
            };
            self.sessions.queued_total -= 1;
            if item.msg.is_expired(self.clock.now_instant) {
                self.services.metrics.drop_msg(DropReason::Expired, 1);
                self.store_forget(skey, &item);
                continue;
            }
            if item.qos == 0 {
                self.send_publish(ckey, 0, &item, false);
            } else {
                self.send_inflight(skey, ckey, item);
            }
        }
        if let Some(s) = self.sessions.get_mut(skey) {
            s.compact();
            if let Some(ckey) = s.conn {
                self.settle_congestion(ckey.index());
            }
        }
    }

    /// Resends, with DUP and their packet ids, the messages of an earlier connection that
    /// wait for room in the window (`InflightState::Waiting`), oldest first.
    fn resend_waiting(&mut self, skey: usize) {
        loop {
            let Some(s) = self.sessions.get_mut(skey) else {
                return;
            };
            let Some(ckey) = s.conn.map(ConnKey::index) else {
                return;
            };
            let Some(conn) = self.wire.conns.get(ckey) else {
                return;
            };
            if conn.state != ConnState::Active
                || conn.outbound_len() >= self.settings.high_watermark
            {
                return;
            }
            let Some(i) = s.next_waiting(conn.window) else {
                return;
            };
            let st = self.sessions[skey].state();
            let Some(mut f) = st.inflight.remove(i) else {
                return;
            };
            if self.send_publish(ckey, f.pkid, &f.item, true) {
                f.state = InflightState::Published;
                self.sessions[skey].state().inflight.insert(i, f);
            } else {
                self.store_forget(skey, &f.item);
            }
        }
    }

    /// On a resumed session: every unfinished PUBREL again, and every unacknowledged
    /// PUBLISH again with DUP set and its original packet id as far as the client's
    /// window allows (the rest wait their turn, before the queue: MQTT 5 §3.3.4), then
    /// the queue.
    pub(super) fn resend_inflight(&mut self, skey: usize) {
        let Some(ckey) = self.sessions[skey].conn.map(ConnKey::index) else {
            return;
        };
        let v = self.wire.conns[ckey].version;
        let window = usize::from(self.wire.conns[ckey].window);
        let inflight = match self.sessions[skey].extra.as_mut() {
            Some(st) => std::mem::take(&mut st.inflight),
            None => Default::default(),
        };
        // PUBRELs go out whatever the window; they count in it.
        let mut on_wire = inflight
            .iter()
            .filter(|f| f.state == InflightState::Released)
            .count();
        let mut kept = std::collections::VecDeque::with_capacity(inflight.len());
        let mut maybe_waiting = false;
        for mut f in inflight {
            match f.state {
                InflightState::Published | InflightState::Waiting if on_wire >= window => {
                    f.state = InflightState::Waiting;
                    maybe_waiting = true;
                    kept.push_back(f);
                }
                InflightState::Published | InflightState::Waiting => {
                    if self.send_publish(ckey, f.pkid, &f.item, true) {
                        f.state = InflightState::Published;
                        on_wire += 1;
                        kept.push_back(f);
                    } else {
                        self.store_forget(skey, &f.item);
                    }
                }
                InflightState::Released => {
                    self.wire.output(&self.clock, ckey, 16, |out| {
                        codec::encode_pubrel(out, v, f.pkid, 0)
                    });
                    self.services.metrics.packet_out(packet::PUBREL);
                    kept.push_back(f);
                }
            }
        }
        if !kept.is_empty() {
            let st = self.sessions[skey].state();
            st.inflight = kept;
            st.maybe_waiting = maybe_waiting;
        }
        self.refill(skey);
    }
}
