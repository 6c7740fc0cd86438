//! SUBSCRIBE and UNSUBSCRIBE: the ACL, the subscription index or a shared group, and
//! retained messages for a new subscription.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::{self, reason, Version};
use crate::session::Queued;
use crate::topic::{self, Subscriber};

use crate::shard::{packet, Shard};

impl Shard {
    /// SUBSCRIBE: each filter granted or refused in the SUBACK. False if the connection
    /// was closed (No Local on a shared subscription is a protocol error, 3.8.3.1).
    pub(in crate::shard) fn on_subscribe(
        &mut self,
        key: usize,
        skey: usize,
        pkid: u16,
        filters: Vec<codec::SubscribeFilter>,
        subscription_id: Option<u32>,
    ) -> bool {
        let v = self.wire.conns[key].version;
        let sub_id = subscription_id.unwrap_or(0);
        let mut codes = Vec::with_capacity(filters.len());
        let mut wanted_retained = Vec::new();
        let mut quota_logged = false;
        let mut granted = Vec::new();
        let mut any_granted = false;
        for f in filters {
            match self.subscribe_one(key, skey, &f, sub_id, &mut quota_logged) {
                SubStep::Closed => return false,
                SubStep::Refused(code) => codes.push(code),
                SubStep::Granted { qos, retained } => {
                    any_granted = true;
                    codes.push(qos);
                    self.note_granted(&mut granted, &f.filter, qos);
                    if let Some(filter) = retained {
                        wanted_retained.push((filter, qos));
                    }
                }
            }
        }
        self.wire.output(&self.clock, key, 16 + codes.len(), |out| {
            codec::encode_suback(out, v, pkid, &codes)
        });
        self.services.metrics.packet_out(packet::SUBACK);
        if any_granted {
            // Subscriptions change only while the device is connected.
            self.store_fleet_record(skey, 0);
        }
        self.emit_subscribed(skey, granted);
        for (filter, qos) in wanted_retained {
            self.send_retained(skey, &filter, qos, sub_id);
        }
        true
    }

    /// One filter of a SUBSCRIBE: checked, allowed by the ACL, within the quota, then
    /// recorded in the session and attached where routing finds it.
    fn subscribe_one(
        &mut self,
        key: usize,
        skey: usize,
        f: &codec::SubscribeFilter,
        sub_id: u32,
        quota_logged: &mut bool,
    ) -> SubStep {
        let v = self.wire.conns[key].version;
        let refused = if v == Version::V5 {
            reason::NOT_AUTHORIZED
        } else {
            reason::V3_SUBACK_FAILURE
        };
        let shared = match self.check_filter(&f.filter, v) {
            Ok(shared) => shared,
            Err(code) => return SubStep::Refused(code),
        };
        if shared.is_some() && f.no_local {
            self.close_protocol(
                key,
                reason::PROTOCOL_ERROR,
                "no local on a shared subscription",
            );
            return SubStep::Closed;
        }
        let inner = shared.map_or(f.filter.as_str(), |(_, inner)| inner);
        let Some(acl_bits) = self.subscribe_allowed(skey, inner, shared.is_some()) else {
            return SubStep::Refused(refused);
        };
        let qos = f.qos.min(2);
        let options = qos
            | (u8::from(f.no_local) << 2)
            | (u8::from(f.retain_as_published) << 3)
            | ((f.retain_handling & 3) << 4)
            | acl_bits;
        let Some((filter, existed)) =
            self.record_subscription(skey, &f.filter, (options, sub_id), quota_logged)
        else {
            // MQTT 5 0x97 Quota exceeded; encode_suback sends 0x80 to 3.1.1 clients.
            return SubStep::Refused(reason::QUOTA_EXCEEDED);
        };
        self.store_sub(skey, &filter, options, sub_id);
        self.attach_subscription(skey, &filter, shared, options, sub_id);
        // Retained messages are not sent for shared subscriptions (4.8.2). Retain
        // Handling: 0 send retained, 1 only for a new subscription, 2 never.
        let handling = (options >> 4) & 3;
        let retained =
            (shared.is_none() && (handling == 0 || (handling == 1 && !existed))).then_some(filter);
        SubStep::Granted { qos, retained }
    }

    /// A filter's length and syntax, and for a `$share/` filter its group and inner
    /// filter. `Err` is the SUBACK code of an invalid filter.
    fn check_filter<'f>(
        &self,
        filter: &'f str,
        v: Version,
    ) -> Result<Option<(&'f str, &'f str)>, u8> {
        let invalid = if v == Version::V5 {
            reason::TOPIC_FILTER_INVALID
        } else {
            reason::V3_SUBACK_FAILURE
        };
        if filter.len() > self.settings.max_topic_len {
            return Err(invalid);
        }
        let shared = if filter.starts_with("$share/") {
            match topic::parse_shared(filter) {
                Some((g, inner)) if topic::valid_topic_filter(inner) => Some((g, inner)),
                _ => return Err(invalid),
            }
        } else {
            None
        };
        if !topic::valid_topic_filter(filter) {
            return Err(invalid);
        }
        Ok(shared)
    }

    /// Records `filter` with its options and identifier in session `skey`: updated if it is there, added
    /// if the quota allows (`max_subscriptions_per_client`; a refusal is logged once per
    /// SUBSCRIBE). The session's copy of the filter, and whether it was there already.
    fn record_subscription(
        &mut self,
        skey: usize,
        filter: &str,
        (options, sub_id): (u8, u32),
        quota_logged: &mut bool,
    ) -> Option<(Arc<str>, bool)> {
        let max = self.settings.max_subscriptions;
        let s = &mut self.sessions[skey];
        if let Some(sub) = s.subs.iter_mut().find(|(fl, ..)| **fl == *filter) {
            (sub.1, sub.2) = (options, sub_id);
            return Some((sub.0.clone(), true));
        }
        if s.subs.len() >= max {
            if !*quota_logged {
                *quota_logged = true;
                tracing::info!(shard = self.id, client_id = %s.client_id, max, "max_subscriptions_per_client reached, subscription refused");
            }
            return None;
        }
        let a: Arc<str> = Arc::from(filter);
        // Most devices subscribe once: no spare capacity (Vec would take 4).
        s.subs.reserve_exact(1);
        s.subs.push((a.clone(), options, sub_id));
        self.count_subscription(&a, true);
        Some((a, false))
    }

    /// A session's subscription list gained (`added`) or lost `filter`: the shard's count
    /// and the interest filter other shards route by (`crate::interest`; every add is
    /// paired with exactly one remove here).
    pub(in crate::shard) fn count_subscription(&mut self, filter: &str, added: bool) {
        let interest = self.services.mailboxes.interest();
        if added {
            self.routing.subs_total += 1;
            interest.add(self.id, filter);
        } else {
            self.routing.subs_total -= 1;
            interest.remove(self.id, filter);
        }
    }

    /// Puts a subscription of session `skey` where routing finds it: its shared group
    /// (`shared` = group and inner filter of a `$share/` filter), or the shard's index.
    /// SUBSCRIBE and the restore of stored sessions both come through here.
    pub(in crate::shard) fn attach_subscription(
        &mut self,
        skey: usize,
        filter: &Arc<str>,
        shared: Option<(&str, &str)>,
        options: u8,
        sub_id: u32,
    ) {
        match shared {
            Some((group, inner)) => self.join_shared(skey, group, inner, options, sub_id),
            None => {
                self.index_insert(
                    filter,
                    Subscriber {
                        session: skey as u32,
                        options,
                        sub_id,
                    },
                );
            }
        }
    }

    /// Removes one subscription of a session; true if it existed. Leaving a shared group
    /// hands the group's messages still queued for the session back to the group.
    pub(in crate::shard) fn unsubscribe(&mut self, skey: usize, filter: &str) -> bool {
        let s = &mut self.sessions[skey];
        let Some(i) = s.subs.iter().position(|(f, ..)| &**f == filter) else {
            return false;
        };
        s.subs.swap_remove(i);
        self.count_subscription(filter, false);
        self.store_unsub(skey, filter);
        let s = &mut self.sessions[skey];
        match filter.strip_prefix("$share/") {
            Some(key) => {
                let key: Arc<str> = Arc::from(key);
                let client_id = s.client_id.clone();
                let mut items = Vec::new();
                if let Some(st) = s.extra.as_mut() {
                    let (theirs, ours): (VecDeque<Queued>, VecDeque<Queued>) =
                        std::mem::take(&mut st.queue)
                            .into_iter()
                            .partition(|q| q.shared.as_ref() == Some(&key));
                    st.queue = ours;
                    items = Vec::from(theirs);
                }
                s.compact();
                self.sessions.queued_total -= items.len() as u64;
                for item in &items {
                    self.store_forget(skey, item);
                }
                self.leave_shared(&key, &client_id, items);
            }
            None => {
                self.index_remove(filter, skey as u32);
            }
        }
        true
    }

    /// UNSUBSCRIBE: each filter removed or not found, in the UNSUBACK.
    pub(in crate::shard) fn on_unsubscribe(
        &mut self,
        key: usize,
        skey: usize,
        pkid: u16,
        filters: &[String],
    ) {
        let v = self.wire.conns[key].version;
        let codes: Vec<u8> = filters
            .iter()
            .map(|f| {
                if self.unsubscribe(skey, f) {
                    0
                } else {
                    reason::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        self.wire.output(&self.clock, key, 16 + codes.len(), |out| {
            codec::encode_unsuback(out, v, pkid, &codes)
        });
        self.services.metrics.packet_out(packet::UNSUBACK);
        if codes.contains(&0) {
            self.store_fleet_record(skey, 0);
        }
        self.emit_unsubscribed(skey, filters, &codes);
    }
}

/// What became of one filter of a SUBSCRIBE.
enum SubStep {
    /// Refused with this SUBACK code.
    Refused(u8),
    /// Granted at `qos`; `retained` is the filter when retained messages are to be sent.
    Granted { qos: u8, retained: Option<Arc<str>> },
    /// The connection was closed (protocol error).
    Closed,
}
