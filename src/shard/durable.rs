//! A shard's side of the durable store: which of its changes become store ops, restoring
//! its sessions at start, and handing the turn's ops to the store writer.
//!
//! A session is stored while it is persistent (session expiry > 0) and the store is on;
//! its QoS 1/2 messages are stored from the moment they are queued or sent until they are
//! acknowledged, dropped or expire. Ops are collected during the loop turn and handed over
//! once at its end (`flush_store`), after the turn's socket writes; push answers that
//! promised `queued` ride along and are sent by the writer after the commit.
//!
//! QoS 2 state is stored too, so a restart resumes it as a reconnect would: the packet id
//! of a stored outbound QoS 2 message once sent and whether our PUBREL went out (restored
//! in flight), and the packet ids of inbound QoS 2 messages whose PUBREC went out (a
//! resend of one after the restart is acknowledged, not routed again).

use std::sync::Arc;

use crate::mailbox::home_shard;
use crate::message::Message;
use crate::session::{Inflight, InflightState, Queued, Session, NEVER_EXPIRES};
use crate::store::{now_ms, Op, StoredMessage, StoredSession};
use crate::topic;

use super::Shard;

/// What [`Shard::store_session_record`] did: wrote a persistent session's record, found
/// a session that ends with its connection (and deleted its rows if it `was_stored`), or
/// nothing (the store is off).
enum Record {
    Persistent,
    Volatile { was_stored: bool },
    NoStore,
}

impl Shard {
    /// Whether session `skey` has rows in the store.
    pub(super) fn persistent(&self, skey: usize) -> bool {
        self.services.store.is_some() && self.sessions.get(skey).is_some_and(|s| s.stored)
    }

    /// Why a QoS `qos` message for session `skey` is refused before delivery, if it is:
    /// the store would have to hold it (QoS 1/2, persistent session) and cannot now.
    pub(super) fn store_refusal(&self, skey: usize, qos: u8) -> Option<&'static str> {
        if qos == 0 || !self.persistent(skey) {
            return None;
        }
        self.services.store.as_ref()?.refusal()
    }

    fn store_op(&mut self, op: Op) {
        if let Some(st) = self.services.store.as_mut() {
            st.push(op);
        }
    }

    /// Writes the session's record and the fleet's copy of its will: after CONNECT
    /// (`online`) or when its connection ended. A session whose expiry became 0 leaves
    /// the store.
    pub(super) fn store_session(&mut self, skey: usize, online: bool) {
        if online {
            self.sessions[skey].will_from_last_run = false;
        }
        match self.store_session_record(skey, online) {
            Record::Persistent => self.store_will(skey, online),
            Record::Volatile { was_stored } => self.store_volatile_will(skey, online, was_stored),
            Record::NoStore => {}
        }
    }

    /// The record alone (the will is the caller's).
    fn store_session_record(&mut self, skey: usize, online: bool) -> Record {
        if self.services.store.is_none() {
            return Record::NoStore;
        }
        let s = &self.sessions[skey];
        if s.expiry_secs == 0 {
            let was_stored = s.stored;
            if was_stored {
                let id = s.client_id.clone();
                self.set_stored(skey, false);
                self.store_op(Op::DeleteSession(id));
            }
            return Record::Volatile { was_stored };
        }
        self.set_stored(skey, true);
        let s = &self.sessions[skey];
        let offline_since_ms = if online { 0 } else { now_ms().max(1) };
        let op = Op::Session {
            client_id: s.client_id.clone(),
            version: s.version,
            expiry_secs: s.expiry_secs,
            offline_since_ms,
        };
        self.store_op(op);
        self.store_fleet_record(skey, offline_since_ms);
        Record::Persistent
    }

    /// With the fleet's sessions on: the persistent session's whole record for the
    /// fleet (`Op::FleetRecord`), after any change to its record, subscriptions or
    /// inbound QoS 2 ids (once per SUBSCRIBE or UNSUBSCRIBE packet). One key, rewritten
    /// whole: a session has few subscriptions, and reading it back on another node is
    /// then one direct get. `offline_since_ms`: 0 while connected.
    pub(in crate::shard) fn store_fleet_record(&mut self, skey: usize, offline_since_ms: u64) {
        if self.services.sessions.is_none() || !self.persistent(skey) {
            return;
        }
        let s = &self.sessions[skey];
        let record = crate::store::mirror::FleetRecord {
            client_id: s.client_id.clone(),
            version: s.version,
            expiry_secs: s.expiry_secs,
            offline_since_ms,
            subs: s.subs.clone(),
            inbound_qos2: (s.extra.as_ref()).map_or_else(Vec::new, |st| st.inbound_qos2.clone()),
        };
        self.store_op(Op::FleetRecord(Box::new(record)));
    }

    /// The will of session `skey`'s connection while `online`; none once offline.
    fn connection_will(&self, skey: usize, online: bool) -> Option<Box<crate::codec::Will>> {
        let s = &self.sessions[skey];
        online.then(|| s.extra.as_ref()?.will.clone()).flatten()
    }

    /// With the fleet's sessions on: the will of the session's connection while online,
    /// none once offline, for the fleet to publish if this node dies (`cluster::session_will`).
    fn store_will(&mut self, skey: usize, online: bool) {
        if self.services.sessions.is_none() {
            return; // without the fleet: no clone of the will
        }
        let will = self.connection_will(skey, online);
        self.store_will_of(self.sessions[skey].client_id.clone(), will);
    }

    /// With the fleet's sessions on, the will of a non-persistent session's connection
    /// too, so that the fleet publishes it if this node dies, at once: the session ends
    /// with its node, and a will is not delayed past the end of its session (MQTT 5
    /// 3.1.3.2.2). Unlike a persistent session's, it is written only when there is a
    /// will, and emptied only when one was written (`stale`: a persistent session's may
    /// be there), so devices without a will cost the fleet nothing.
    fn store_volatile_will(&mut self, skey: usize, online: bool, stale: bool) {
        if self.services.sessions.is_none() {
            return;
        }
        let will = self.connection_will(skey, online).map(|mut w| {
            w.delay_secs = 0;
            w
        });
        let s = &mut self.sessions[skey];
        if will.is_none() && !s.volatile_will_kept && !stale {
            return;
        }
        s.volatile_will_kept = will.is_some();
        let client_id = s.client_id.clone();
        self.store_will_of(client_id, will);
    }

    fn store_will_of(&mut self, client_id: Arc<str>, will: Option<Box<crate::codec::Will>>) {
        if self.services.sessions.is_some() {
            self.store_op(Op::Will { client_id, will });
        }
    }

    /// Whether session `skey` is kept in the store, counted per shard for the publishers'
    /// acknowledgements (`Mailboxes::may_store`, `held.rs`).
    pub(super) fn set_stored(&mut self, skey: usize, stored: bool) {
        let s = &mut self.sessions[skey];
        if s.stored != stored {
            s.stored = stored;
            self.services.mailboxes.stored_session(self.id, stored);
        }
    }

    /// The session ended: its rows go, and the fleet's copy of its will, if it has one.
    pub(super) fn store_session_ended(&mut self, s: &Session) {
        if s.stored {
            let op = Op::DeleteSession(s.client_id.clone());
            // A stale copy's end leaves the fleet's copy, another node's (`fleet.rs`).
            let op = match self.ending_stale_copy {
                true => Op::LocalOnly(Box::new(op)),
                false => op,
            };
            self.store_op(op);
        }
        // A restored session that ended before its device came back leaves the last
        // run's will to the fleet: after a crash, the fleet publishes it (MQTT 5: at the
        // end of the session at the latest; here at the end of its delay); else the key
        // was emptied when the session went offline.
        if (s.stored && !s.will_from_last_run) || s.volatile_will_kept {
            self.store_will_of(s.client_id.clone(), None);
        }
    }

    pub(super) fn store_sub(&mut self, skey: usize, filter: &Arc<str>, options: u8, sub_id: u32) {
        if self.persistent(skey) {
            let op = Op::Sub {
                client_id: self.sessions[skey].client_id.clone(),
                filter: filter.clone(),
                options,
                sub_id,
            };
            self.store_op(op);
        }
    }

    pub(super) fn store_unsub(&mut self, skey: usize, filter: &str) {
        if self.persistent(skey) {
            let op = Op::DeleteSub {
                client_id: self.sessions[skey].client_id.clone(),
                filter: Arc::from(filter),
            };
            self.store_op(op);
        }
    }

    /// A QoS 1/2 message given to a persistent session: stored under a fresh sequence.
    pub(super) fn store_message(&mut self, skey: usize, item: &mut Queued) {
        if item.qos == 0 || item.seq != 0 || !self.persistent(skey) {
            return;
        }
        let client_id = self.sessions[skey].client_id.clone();
        if let Some(st) = self.services.store.as_mut() {
            item.seq = st.next_seq();
            st.push(Op::Message {
                client_id,
                seq: item.seq,
                msg: item.msg.clone(),
                qos: item.qos,
                retain: item.retain,
            });
        }
    }

    /// A stored message is finished (acknowledged, dropped or expired): its row goes.
    pub(super) fn store_forget(&mut self, skey: usize, item: &Queued) {
        if item.seq == 0 || self.services.store.is_none() {
            return;
        }
        if let Some(s) = self.sessions.get(skey) {
            let op = Op::DeleteMessage {
                client_id: s.client_id.clone(),
                seq: item.seq,
            };
            self.store_op(op);
        }
    }

    /// A stored QoS 2 message went out under `pkid`: kept, so that after a restart it goes
    /// out again under the same packet id (the client's duplicate check is by packet id).
    pub(super) fn store_qos2_sent(&mut self, skey: usize, pkid: u16, item: &Queued) {
        if item.qos == 2 && item.seq != 0 && self.persistent(skey) {
            self.store_qos2_out(skey, item.seq, pkid, false);
        }
    }

    /// PUBREC came for QoS 2 message `pkid` and our PUBREL goes out: after a restart the
    /// PUBREL is sent again, never the message.
    pub(super) fn store_qos2_released(&mut self, skey: usize, pkid: u16) {
        let seq = self.sessions[skey].extra.as_ref().and_then(|st| {
            st.inflight
                .iter()
                .find(|f| f.pkid == pkid && f.state == InflightState::Released)
                .map(|f| f.item.seq)
        });
        if let Some(seq) = seq.filter(|&s| s != 0) {
            if self.persistent(skey) {
                self.store_qos2_out(skey, seq, pkid, true);
            }
        }
    }

    fn store_qos2_out(&mut self, skey: usize, seq: u64, pkid: u16, released: bool) {
        let op = Op::Qos2Out {
            client_id: self.sessions[skey].client_id.clone(),
            seq,
            pkid,
            released,
        };
        self.store_op(op);
    }

    /// An inbound QoS 2 packet id is taken (`taken`: PUBREC goes out) or free again (its
    /// PUBREL came). A resend after a restart of a message taken is not routed again.
    pub(super) fn store_qos2_in(&mut self, skey: usize, pkid: u16, taken: bool) {
        if !self.persistent(skey) {
            return;
        }
        let client_id = self.sessions[skey].client_id.clone();
        self.store_op(if taken {
            Op::Qos2In { client_id, pkid }
        } else {
            Op::DeleteQos2In { client_id, pkid }
        });
        // Inbound QoS 2 ids change only while the device is connected.
        self.store_fleet_record(skey, 0);
    }

    /// A retained message (or its deletion): written by the topic's home shard only, as
    /// every shard keeps the same copy.
    pub(super) fn store_retained_msg(&mut self, msg: &Arc<Message>, delete: bool) {
        if self.services.store.is_none()
            || home_shard(&msg.topic, self.services.mailboxes.len()) != self.id
        {
            return;
        }
        let op = if delete {
            Op::DeleteRetained(msg.topic.clone())
        } else {
            Op::Retained(msg.clone())
        };
        self.store_op(op);
    }

    /// Hands this turn's ops to the store writer; true if some must be offered again, or
    /// while the backlog is past `[store] backlog_max_bytes` (the shard looks again in a
    /// millisecond: with `durability = "eventual"` no commit wakes it). Once it is back
    /// under, the publishers held for it are read again.
    pub(super) fn flush_store(&mut self) -> bool {
        let Some(st) = self.services.store.as_mut() else {
            return false;
        };
        let waiting = st.flush() || st.over_bound();
        if st.back_under_bound() {
            self.outbox_unblocked();
        }
        waiting
    }

    /// This shard holds `[store] backlog_max_bytes` of changes for the writer: no PUBLISH
    /// is read on it until the writer catches up (`publish_paced`).
    pub(super) fn store_backlogged(&self) -> bool {
        self.services.store.as_ref().is_some_and(|s| s.over_bound())
    }

    /// At start, before the first accept: the sessions homed here, their subscriptions
    /// re-indexed, their messages queued in order, their offline expiry re-armed from the
    /// wall clock time they went offline; and the retained messages.
    pub(super) fn restore(
        &mut self,
        sessions: Vec<StoredSession>,
        retained: &[Arc<Message>],
        after_crash: bool,
    ) {
        for m in retained {
            self.routing.retained.insert(m.topic.clone(), m.clone());
            let cost = crate::retained_budget::cost(&m.topic, &m.payload);
            self.routing.retained_budget.set(&m.topic, cost, None);
        }
        let now_wall = now_ms();
        // The first messages of a session may have been sent (and even received) before
        // the restart: they go out again with DUP set, as any redelivery.
        let maybe_sent = usize::from(self.settings.max_inflight);
        for stored in sessions {
            let skey = self.sessions.open(&stored.client_id, stored.version);
            self.set_stored(skey, true);
            self.sessions[skey].will_from_last_run = after_crash;
            let s = &mut self.sessions[skey];
            s.expiry_secs = stored.expiry_secs;
            s.subs.reserve_exact(stored.subs.len());
            for (filter, options, sub_id) in stored.subs {
                self.sessions[skey]
                    .subs
                    .push((filter.clone(), options, sub_id));
                self.count_subscription(&filter, true);
                self.attach_subscription(
                    skey,
                    &filter,
                    topic::parse_shared(&filter),
                    options,
                    sub_id,
                );
            }
            restore_messages(&mut self.sessions[skey], stored.messages, maybe_sent);
            let queued = self.sessions[skey].queued_len();
            self.sessions.queued_total += queued as u64;
            if !stored.inbound_qos2.is_empty() {
                self.sessions[skey].state().inbound_qos2 = stored.inbound_qos2;
            }
            if stored.offline_since_ms == 0 {
                // Online when the gateway stopped (a crash): offline from now on. Stored
                // so that the next restart counts its expiry from here, not afresh. The
                // fleet's copy of its will stays as the crash left it, for the fleet to
                // publish (`cluster::session_leftover`).
                self.store_session_record(skey, false);
            }
            if stored.expiry_secs != NEVER_EXPIRES {
                let total_ms = u64::from(stored.expiry_secs) * 1000;
                let gone_ms = if stored.offline_since_ms == 0 {
                    0
                } else {
                    now_wall.saturating_sub(stored.offline_since_ms)
                };
                let left_secs = total_ms.saturating_sub(gone_ms).div_ceil(1000) as u32;
                let at = self.offline_deadline(self.clock.now, left_secs);
                self.sessions[skey].state().expires_at = Some(at);
                self.arm_session_timer(skey);
            }
        }
    }
}

/// A restored session's messages: a QoS 2 message that was in flight goes back in flight
/// under its packet id (sent again as PUBLISH with DUP, or as PUBREL if that went out, when
/// the client comes back); the others are queued, the first `maybe_sent` with DUP.
fn restore_messages(s: &mut Session, messages: Vec<StoredMessage>, maybe_sent: usize) {
    if messages.is_empty() {
        return;
    }
    let st = s.state();
    st.queue.reserve_exact(messages.len());
    for m in messages {
        let item = Queued {
            msg: m.msg,
            qos: m.qos,
            retain: m.retain,
            sub_ids: None,
            shared: None,
            waiter: None,
            seq: m.seq,
            dup: st.queue.len() + st.inflight.len() < maybe_sent,
        };
        match m.inflight {
            Some((pkid, released)) => st.inflight.push_back(Inflight {
                pkid,
                state: if released {
                    InflightState::Released
                } else {
                    InflightState::Published
                },
                item,
            }),
            None => st.queue.push_back(item),
        }
    }
}
