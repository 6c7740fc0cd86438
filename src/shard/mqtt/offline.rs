//! A session without its connection: DISCONNECT, the will (now or delayed), the expiry
//! timer, and the end of the session.

use std::sync::Arc;

use crate::codec::{reason, Will};
use crate::message::{Message, Origin};
use crate::metrics::DisconnectReason;
use crate::session::{InflightState, Queued, NEVER_EXPIRES};
use crate::wheel::TimerId;

use crate::shard::{Shard, SESSION_TIMER};

impl Shard {
    /// The session's connection ended. Publishes or schedules the will, and ends the
    /// session now or arms its expiry.
    pub(in crate::shard) fn detach_session(&mut self, skey: usize, will_allowed: bool) {
        let now = self.clock.now;
        let s = &mut self.sessions[skey];
        let will = s.detach().filter(|_| will_allowed);
        if s.expiry_secs == 0 {
            if let Some(w) = will {
                self.publish_will(*w);
            }
            self.end_session(skey);
            return;
        }
        let expiry = s.expiry_secs;
        if expiry != NEVER_EXPIRES {
            let at = self.offline_deadline(now, expiry);
            self.sessions[skey].state().expires_at = Some(at);
        }
        // A queue that grew past the bound while its publishers were paced goes back
        // under it: offline, nothing paces them any more.
        self.trim_queue(skey, self.settings.max_queued);
        self.store_session(skey, false);
        self.sessions[skey].compact();
        self.arm_session_timer(skey);
        if let Some(w) = will {
            self.publish_or_delay_will(Some(skey), w);
        }
    }

    /// The tick by which `secs` have surely passed since `now`. `now` is the current tick
    /// rounded down, so one more tick is added: a session deadline is never early, and at
    /// most one tick late (as the connection deadlines in `timers::Timing::deadline`).
    pub(in crate::shard) fn offline_deadline(&self, now: u64, secs: u32) -> u64 {
        now + u64::from(self.settings.ticks(f64::from(secs))) + 1
    }

    /// A will whose connection ended: published now, or, with a Will Delay Interval and a
    /// session `skey` that lives on offline, at the delay or when the session ends,
    /// whichever is first. While the shard stops, now: no timer fires after the stop.
    pub(in crate::shard) fn publish_or_delay_will(&mut self, skey: Option<usize>, w: Box<Will>) {
        let Some(skey) = skey.filter(|_| w.delay_secs > 0 && !self.stopping) else {
            self.publish_will(*w);
            return;
        };
        let delay = w.delay_secs.min(self.sessions[skey].expiry_secs);
        let due = self.offline_deadline(self.clock.now, delay);
        let st = self.sessions[skey].state();
        st.will = Some(w);
        st.will_due = Some(due);
        self.arm_session_timer(skey);
    }

    /// The gateway stops (`mqtt.wills_on_stop`): the wills of offline sessions still
    /// waiting out their delay are published now, as nothing would publish them later.
    pub(in crate::shard) fn publish_delayed_wills(&mut self) {
        let waiting: Vec<usize> = (self.sessions.iter())
            .filter(|(_, s)| !s.is_online())
            .filter(|(_, s)| s.extra.as_ref().is_some_and(|st| st.will.is_some()))
            .map(|(k, _)| k)
            .collect();
        for skey in waiting {
            self.publish_waiting_will(skey);
        }
    }

    /// Publishes the will offline session `skey` waits out the delay of, now.
    fn publish_waiting_will(&mut self, skey: usize) {
        let st = self.sessions[skey].state();
        st.will_due = None;
        if let Some(w) = st.will.take() {
            self.publish_will(*w);
        }
    }

    pub(in crate::shard) fn arm_session_timer(&mut self, skey: usize) {
        let s = &mut self.sessions[skey];
        if let Some(t) = s.timer.take() {
            self.timers.wheel.cancel(t);
        }
        let due = s
            .extra
            .as_ref()
            .and_then(|st| match (st.will_due, st.expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            });
        if let Some(at) = due {
            s.timer = Some(self.timers.wheel.insert(at, skey as u32 | SESSION_TIMER));
        }
    }

    pub(in crate::shard) fn on_session_timer(&mut self, skey: usize, id: TimerId) {
        let Some(s) = self.sessions.get_mut(skey) else {
            return;
        };
        if s.timer != Some(id) || s.is_online() {
            return;
        }
        s.timer = None;
        let now = self.clock.now;
        let (will_due, expires_at) = s
            .extra
            .as_ref()
            .map_or((None, None), |st| (st.will_due, st.expires_at));
        if will_due.is_some_and(|d| d <= now) {
            self.publish_waiting_will(skey);
        }
        if expires_at.is_some_and(|d| d <= now) {
            tracing::debug!(shard = self.id, client_id = %self.sessions[skey].client_id, "session expired");
            self.emit_session_expired(skey);
            self.end_session(skey);
            return;
        }
        self.sessions[skey].compact();
        self.arm_session_timer(skey);
    }

    /// Removes a session and everything it holds; a pending will is published now.
    pub(in crate::shard) fn end_session(&mut self, skey: usize) {
        let Some(s) = self.sessions.remove(skey) else {
            return;
        };
        if s.stored {
            self.services.mailboxes.stored_session(self.id, false);
        }
        self.store_session_ended(&s);
        let mut groups: Vec<Arc<str>> = Vec::new();
        for (filter, ..) in &s.subs {
            self.count_subscription(filter, false);
            match filter.strip_prefix("$share/") {
                Some(key) => groups.push(Arc::from(key)),
                None => {
                    self.index_remove(filter, skey as u32);
                }
            }
        }
        if let Some(t) = s.timer {
            self.timers.wheel.cancel(t);
        }
        // QoS 1/2 messages of shared groups that were not finished go to other members:
        // queued ones and those sent but not acknowledged (a QoS 2 message the client
        // has acknowledged with PUBREC is its own).
        let mut unfinished: Vec<Queued> = Vec::new();
        if let Some(st) = s.extra {
            self.sessions.queued_total -= st.queue.len() as u64;
            if !groups.is_empty() {
                let sent = st
                    .inflight
                    .into_iter()
                    .filter(|f| f.state != InflightState::Released)
                    .map(|f| f.item);
                unfinished.extend(
                    sent.chain(st.queue)
                        .filter(|q| q.shared.is_some() && q.qos > 0),
                );
            }
            if st.will_due.is_some() {
                if let Some(w) = st.will {
                    self.publish_will(*w);
                }
            }
        }
        for key in groups {
            let items = unfinished
                .iter()
                .filter(|q| q.shared.as_ref() == Some(&key))
                .map(|q| Queued {
                    msg: q.msg.clone(),
                    qos: q.qos,
                    retain: q.retain,
                    sub_ids: None,
                    shared: None,
                    waiter: None,
                    seq: 0,
                    dup: false,
                })
                .collect();
            self.leave_shared(&key, &s.client_id, items);
        }
        debug_assert!(s.conn.is_none_or(|c| self
            .wire
            .conns
            .get(c.index())
            .is_none_or(|c| c.session.is_none())));
    }

    pub(in crate::shard) fn publish_will(&mut self, w: Will) {
        let expiry = w.props.as_ref().and_then(|p| p.message_expiry);
        let mut msg = Message::new(
            Arc::from(w.topic),
            w.payload,
            w.qos,
            w.retain,
            Origin::Gateway,
        )
        .with_expiry_secs(expiry);
        msg.props = w.props;
        self.publish(Arc::new(msg));
    }

    /// DISCONNECT from the client: its session expiry may change (not from 0), and
    /// only "disconnect with will message" (0x04) keeps the will. Always false (closed).
    pub(in crate::shard) fn on_disconnect(
        &mut self,
        key: usize,
        skey: usize,
        code: u8,
        session_expiry: Option<u32>,
    ) -> bool {
        let s = &mut self.sessions[skey];
        if let Some(e) = session_expiry {
            if s.expiry_secs == 0 && e != 0 {
                // [MQTT-3.14.2-2]: cannot turn a session that ends into one that lasts.
                return self.close_protocol(
                    key,
                    reason::PROTOCOL_ERROR,
                    "session expiry set on DISCONNECT after 0 at CONNECT",
                );
            }
            s.expiry_secs = e.min(self.settings.max_session_expiry_secs);
        }
        // A kept will is treated as after an abnormal close (Will Delay Interval
        // included). It is taken out before the close, which drops any will of a client
        // that sent DISCONNECT, and placed once the session is detached.
        let will = s.extra.as_mut().and_then(|st| st.will.take());
        let session_ends = s.expiry_secs == 0;
        self.close_conn(key, DisconnectReason::Client, None);
        if let Some(w) = will.filter(|_| code == reason::DISCONNECT_WITH_WILL) {
            self.publish_or_delay_will((!session_ends).then_some(skey), w);
        }
        false
    }
}
