//! A client's session: what outlives a connection.
//!
//! Sessions live in their home shard's slab, found by client id through a hashbrown map.
//! The common case — an idle device with one subscription — is kept small: the rarely
//! used parts (queued and in-flight messages, inbound QoS 2 state, the will) sit behind one
//! `Option<Box<_>>` that exists only while they are non-empty.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};
use slab::Slab;

use crate::codec::{Version, Will};
use crate::message::Message;
use crate::wheel::TimerId;

/// The key of a connection in its shard's slab. Stored as key + 1, so that an
/// `Option<ConnKey>` takes 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey(NonZeroU32);

/// The key of a session in its shard's slab (see [`ConnKey`] for the representation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey(NonZeroU32);

macro_rules! slab_key {
    ($t:ident) => {
        impl $t {
            /// The key of slab entry `index` (below `u32::MAX`: the shard refuses more).
            pub fn new(index: usize) -> Self {
                let k = u32::try_from(index)
                    .ok()
                    .and_then(|i| NonZeroU32::new(i.wrapping_add(1)));
                $t(k.expect("slab key below u32::MAX"))
            }

            pub fn index(self) -> usize {
                (self.0.get() - 1) as usize
            }
        }
    };
}
slab_key!(ConnKey);
slab_key!(SessionKey);

/// Session expiry value meaning "never" (MQTT 5: 0xFFFFFFFF).
pub const NEVER_EXPIRES: u32 = u32::MAX;

pub struct Session {
    pub client_id: Arc<str>,
    /// The live connection, if any.
    pub conn: Option<ConnKey>,
    /// Subscriptions: the filter (shared with the shard's index) and the MQTT 5 options
    /// byte (bits 0-1 QoS, 2 no local, 3 retain as published, 4-5 retain handling), and
    /// the MQTT 5 subscription identifier (0: none). 24 bytes each, as without it.
    pub subs: Vec<(Arc<str>, u8, u32)>,
    /// Seconds the session outlives its connection (0 = ends with it).
    pub expiry_secs: u32,
    /// Session expiry / will delay timer while offline.
    pub timer: Option<TimerId>,
    pub next_pkid: u16,
    /// Outbound topic aliases the current connection may receive: the client's Topic
    /// Alias Maximum capped by `[mqtt] outbound_topic_aliases` (0 = none).
    pub alias_max: u16,
    pub version: Version,
    /// The session has rows in the durable store (it is persistent and the store is on).
    pub stored: bool,
    /// The fleet keeps a will of this non-persistent session (`shard/durable.rs`): it
    /// must be emptied when the session ends.
    pub volatile_will_kept: bool,
    /// Restored at start after a crash, and neither connected nor handed over since: the
    /// fleet's copy of its will is the crash's (`cluster::session_leftover` publishes
    /// it), and its end leaves it.
    pub will_from_last_run: bool,
    pub extra: Option<Box<SessionState>>,
}

/// The parts of a session that are usually empty.
#[derive(Default)]
pub struct SessionState {
    /// Messages waiting for the client: offline, or beyond its in-flight window.
    pub queue: VecDeque<Queued>,
    /// Sent QoS 1/2 messages not yet acknowledged, oldest first.
    pub inflight: VecDeque<Inflight>,
    /// Some of `inflight` may be `Waiting` (set whenever one is made `Waiting`, cleared
    /// by a look that finds none), so the window counts skip the scan otherwise.
    pub maybe_waiting: bool,
    /// Packet ids of QoS 2 messages received (PUBREC sent) awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// The will of the current (or last) connection.
    pub will: Option<Box<Will>>,
    /// Tick at which a delayed will is published (MQTT 5 Will Delay Interval).
    pub will_due: Option<u64>,
    /// Tick at which the offline session ends.
    pub expires_at: Option<u64>,
    /// MQTT 5 topic aliases of the current connection (reset on every new connection).
    pub aliases: Option<Box<TopicAliases>>,
    /// The current connection's own ACL lists and/or the username `%u` rules need
    /// (only when one of those applies; see `crate::acl`).
    pub acl: Option<Box<crate::acl::ConnAcl>>,
}

/// The topic aliases of one MQTT 5 connection, both directions. Allocated only for a
/// connection that sets an alias or is sent one.
#[derive(Default)]
pub struct TopicAliases {
    /// Set by the client: alias → topic.
    inbound: hashbrown::HashMap<u16, Arc<str>>,
    /// Assigned by us: (topic, alias, last use), at most the session's `alias_max`.
    outbound: Vec<(Arc<str>, u16, u64)>,
    uses: u64,
}

impl TopicAliases {
    /// Remembers the client's alias for `topic`.
    pub fn set_inbound(&mut self, alias: u16, topic: &str) {
        if self.inbound.get(&alias).is_none_or(|t| &**t != topic) {
            self.inbound.insert(alias, Arc::from(topic));
        }
    }

    /// The topic the client set for `alias`.
    pub fn inbound(&self, alias: u16) -> Option<Arc<str>> {
        self.inbound.get(&alias).cloned()
    }

    /// The outbound alias for `topic` when up to `max` may be in use: `(alias, known)`,
    /// where `known` means the client already has it (send an empty topic). A new topic
    /// takes the next free alias, or the least recently used one's. Nothing changes
    /// until [`TopicAliases::commit`].
    pub fn outbound(&self, topic: &str, max: u16) -> (u16, bool) {
        if let Some(&(_, alias, _)) = self.outbound.iter().find(|(t, _, _)| &**t == topic) {
            return (alias, true);
        }
        if self.outbound.len() < usize::from(max) {
            return (self.outbound.len() as u16 + 1, false);
        }
        let lru = self.outbound.iter().min_by_key(|(_, _, used)| *used);
        (lru.map_or(1, |&(_, alias, _)| alias), false)
    }

    /// Records that `alias` was sent for `topic` (its topic, if new, went with it).
    pub fn commit(&mut self, topic: &Arc<str>, alias: u16) {
        self.uses += 1;
        let uses = self.uses;
        match self.outbound.iter_mut().find(|(_, a, _)| *a == alias) {
            Some(e) => {
                if *e.0 != **topic {
                    e.0 = topic.clone();
                }
                e.2 = uses;
            }
            None => self.outbound.push((topic.clone(), alias, uses)),
        }
    }
}

/// A message queued for a session, with the QoS granted by the matching subscription.
pub struct Queued {
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Option<Box<[u32]>>,
    /// The shared subscription group (`"{group}/{filter}"`) this message was given to
    /// this session through; such QoS 1/2 messages go back to the group when the
    /// session ends or leaves the group before finishing them.
    pub shared: Option<Arc<str>>,
    /// Told when the client acknowledges this message (push API `wait_ack`).
    pub waiter: Option<AckWaiter>,
    /// The message's key in the durable store (0 = not stored).
    pub seq: u64,
    /// Restored after a restart and perhaps sent before it: goes out with DUP set.
    pub dup: bool,
}

/// The sending half that reports a device's PUBACK back to a waiting push request.
pub type AckWaiter = tokio::sync::oneshot::Sender<()>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent (QoS 1: waiting for PUBACK; QoS 2: for PUBREC).
    Published,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
    /// Sent on an earlier connection and not yet again on this one, because the client
    /// came back with a smaller Receive Maximum (MQTT 5 §3.3.4): resent, with DUP and its
    /// packet id, once the window has room, before anything queued.
    Waiting,
}

pub struct Inflight {
    pub pkid: u16,
    pub state: InflightState,
    pub item: Queued,
}

/// An acknowledgement of an outbound QoS 1/2 message, by what it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// PUBACK: ends a QoS 1 exchange.
    PubAck,
    /// PUBREC: answers a QoS 2 PUBLISH (an error code ends the exchange).
    PubRec,
    /// PUBCOMP: ends a QoS 2 exchange after our PUBREL.
    PubComp,
}

impl Ack {
    /// True when in-flight entry `f` is the one this acknowledgement of `pkid` answers.
    fn answers(self, f: &Inflight, pkid: u16) -> bool {
        f.pkid == pkid
            && match self {
                Ack::PubAck => f.item.qos == 1,
                Ack::PubRec => f.item.qos == 2,
                Ack::PubComp => f.state == InflightState::Released,
            }
    }
}

/// What a connection brings to the session it attaches to.
pub struct Attach {
    pub conn: ConnKey,
    pub version: Version,
    pub expiry_secs: u32,
    pub alias_max: u16,
    pub will: Option<Box<Will>>,
    pub acl: Option<Box<crate::acl::ConnAcl>>,
}

impl Session {
    pub fn new(client_id: Arc<str>, version: Version) -> Self {
        Session {
            client_id,
            conn: None,
            subs: Vec::new(),
            expiry_secs: 0,
            timer: None,
            next_pkid: 1,
            alias_max: 0,
            version,
            stored: false,
            volatile_will_kept: false,
            will_from_last_run: false,
            extra: None,
        }
    }

    pub fn is_online(&self) -> bool {
        self.conn.is_some()
    }

    pub fn state(&mut self) -> &mut SessionState {
        self.extra.get_or_insert_with(Default::default)
    }

    /// Frees the rarely used part once it holds nothing.
    pub fn compact(&mut self) {
        if let Some(s) = &self.extra {
            if s.queue.is_empty()
                && s.inflight.is_empty()
                && s.inbound_qos2.is_empty()
                && s.will.is_none()
                && s.will_due.is_none()
                && s.expires_at.is_none()
                && s.aliases.is_none()
                && s.acl.is_none()
            {
                self.extra = None;
            }
        }
    }

    pub fn queued_len(&self) -> usize {
        self.extra.as_ref().map_or(0, |s| s.queue.len())
    }

    pub fn inflight_len(&self) -> usize {
        self.extra.as_ref().map_or(0, |s| s.inflight.len())
    }

    /// The next free packet id (1..=65535), skipping ids still in flight.
    pub fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            let busy = self
                .extra
                .as_ref()
                .is_some_and(|s| s.inflight.iter().any(|f| f.pkid == id));
            if !busy {
                return id;
            }
        }
    }

    /// Attaches a connection: the session is online under its terms, with its will and
    /// ACL state. What belonged to the last connection or to the time offline goes (a
    /// delayed will, the expiry, topic aliases: MQTT 5 3.3.2.3.4). Returns the offline
    /// timer, for the caller to cancel.
    pub fn attach(&mut self, a: Attach) -> Option<TimerId> {
        self.conn = Some(a.conn);
        self.version = a.version;
        self.expiry_secs = a.expiry_secs;
        self.alias_max = a.alias_max;
        if let Some(st) = self.extra.as_mut() {
            st.will = None;
            st.will_due = None;
            st.expires_at = None;
            st.aliases = None;
            st.acl = None;
        }
        if let Some(w) = a.will {
            self.state().will = Some(w);
        }
        if a.acl.is_some() {
            self.state().acl = a.acl;
        }
        self.compact();
        self.timer.take()
    }

    /// Detaches the connection: the session is offline, without the connection's topic
    /// aliases and ACL state. Returns its will, for the caller to publish or delay.
    pub fn detach(&mut self) -> Option<Box<Will>> {
        self.conn = None;
        self.alias_max = 0;
        let st = self.extra.as_mut()?;
        st.aliases = None;
        st.acl = None;
        st.will.take()
    }

    /// Drops the will of the connection attached now (it ended without one: the device
    /// went on elsewhere).
    pub fn discard_will(&mut self) {
        if let Some(st) = self.extra.as_mut() {
            st.will = None;
        }
    }

    /// Ends the in-flight exchange `ack` answers for packet id `pkid`, and returns it
    /// (`None`: no such exchange, an unknown or late acknowledgement).
    pub fn complete(&mut self, pkid: u16, ack: Ack) -> Option<Inflight> {
        let st = self.extra.as_mut()?;
        let i = st.inflight.iter().position(|f| ack.answers(f, pkid))?;
        st.inflight.remove(i)
    }

    /// A PUBREC accepted the QoS 2 message `pkid`: it waits for PUBCOMP now (our PUBREL
    /// goes out). False when no such message is in flight.
    pub fn release(&mut self, pkid: u16) -> bool {
        let Some(st) = self.extra.as_mut() else {
            return false;
        };
        match st
            .inflight
            .iter_mut()
            .find(|f| Ack::PubRec.answers(f, pkid))
        {
            Some(f) => {
                f.state = InflightState::Released;
                true
            }
            None => false,
        }
    }

    /// PUBREL of inbound QoS 2 message `pkid`: its id is free again. False when it was
    /// not known.
    pub fn release_inbound(&mut self, pkid: u16) -> bool {
        let Some(st) = self.extra.as_mut() else {
            return false;
        };
        let known = match st.inbound_qos2.iter().position(|&p| p == pkid) {
            Some(i) => {
                st.inbound_qos2.swap_remove(i);
                true
            }
            None => false,
        };
        self.compact();
        known
    }

    /// True when a new QoS 1/2 message may go straight out: nothing queued ahead of it
    /// and fewer than `window` messages in flight.
    pub fn window_open(&self, window: u16) -> bool {
        self.queued_len() == 0
            && self.on_wire_len() == self.inflight_len()
            && self.inflight_len() < usize::from(window)
    }

    /// In-flight messages sent on this connection (not `Waiting`): what the client's
    /// Receive Maximum counts.
    pub fn on_wire_len(&self) -> usize {
        self.extra.as_ref().map_or(0, |s| {
            if !s.maybe_waiting {
                return s.inflight.len();
            }
            s.inflight
                .iter()
                .filter(|f| f.state != InflightState::Waiting)
                .count()
        })
    }

    /// The next queued message to send, if the in-flight window has room for it and no
    /// message of an earlier connection waits to be resent.
    pub fn next_to_send(&mut self, window: u16) -> Option<Queued> {
        if self.on_wire_len() >= usize::from(window) || self.on_wire_len() < self.inflight_len() {
            return None;
        }
        self.extra.as_mut()?.queue.pop_front()
    }

    /// The position of the first `Waiting` message, if the window has room to resend it.
    /// Finding none clears `maybe_waiting`.
    pub fn next_waiting(&mut self, window: u16) -> Option<usize> {
        if self.on_wire_len() >= usize::from(window) {
            return None;
        }
        let st = self.extra.as_mut()?;
        if !st.maybe_waiting {
            return None;
        }
        let found = (st.inflight.iter()).position(|f| f.state == InflightState::Waiting);
        st.maybe_waiting = found.is_some();
        found
    }

    /// Subscription options for `filter` if subscribed.
    pub fn subscription(&self, filter: &str) -> Option<u8> {
        self.subs
            .iter()
            .find(|(f, ..)| &**f == filter)
            .map(|(_, o, _)| *o)
    }
}

/// Finds a session by client id. Stores only the session's 4-byte slab key per entry and
/// compares against the id the session already holds, instead of a second 16-byte
/// `Arc<str>` key: at a million sessions this saves ~40 bytes each.
#[derive(Default)]
pub struct ClientIds {
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl ClientIds {
    pub fn get(&self, client_id: &str, sessions: &Slab<Session>) -> Option<u32> {
        let hash = self.hasher.hash_one(client_id);
        self.table
            .find(hash, |&k| {
                sessions
                    .get(k as usize)
                    .is_some_and(|s| &*s.client_id == client_id)
            })
            .copied()
    }

    /// Indexes session `key` under its client id (which must not be indexed yet).
    pub fn insert(&mut self, key: u32, sessions: &Slab<Session>) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(&*sessions[key as usize].client_id);
        self.table.insert_unique(hash, key, |&k| {
            hasher.hash_one(sessions.get(k as usize).map_or("", |s| &*s.client_id))
        });
    }

    /// Removes the entry for `client_id`; call before the session leaves the slab.
    pub fn remove(&mut self, client_id: &str, sessions: &Slab<Session>) -> Option<u32> {
        let hash = self.hasher.hash_one(client_id);
        self.table
            .find_entry(hash, |&k| {
                sessions
                    .get(k as usize)
                    .is_some_and(|s| &*s.client_id == client_id)
            })
            .ok()
            .map(|e| e.remove().0)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Origin;
    use bytes::Bytes;

    fn queued(pkid: u16) -> Inflight {
        sent(pkid, 1, InflightState::Published)
    }

    fn sent(pkid: u16, qos: u8, state: InflightState) -> Inflight {
        Inflight {
            pkid,
            state,
            item: Queued {
                msg: Arc::new(Message::new(
                    "t".into(),
                    Bytes::new(),
                    1,
                    false,
                    Origin::Gateway,
                )),
                qos,
                retain: false,
                sub_ids: None,
                shared: None,
                waiter: None,
                seq: 0,
                dup: false,
            },
        }
    }

    #[test]
    fn outbound_aliases_reuse_the_least_recently_used() {
        let mut a = TopicAliases::default();
        let (t1, t2, t3): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(a.outbound(&t1, 2), (1, false));
        a.commit(&t1, 1);
        assert_eq!(a.outbound(&t1, 2), (1, true));
        assert_eq!(a.outbound(&t2, 2), (2, false));
        a.commit(&t2, 2);
        a.commit(&t1, 1); // t1 used again: t2 is now the oldest
        assert_eq!(a.outbound(&t3, 2), (2, false));
        a.commit(&t3, 2);
        assert_eq!(a.outbound(&t3, 2), (2, true));
        assert_eq!(a.outbound(&t2, 2), (1, false));
        a.set_inbound(4, "x/y");
        assert_eq!(a.inbound(4).as_deref(), Some("x/y"));
        assert_eq!(a.inbound(5), None);
    }

    #[test]
    fn packet_ids_wrap_and_skip_inflight() {
        let mut s = Session::new("c".into(), Version::V311);
        assert_eq!(s.next_packet_id(), 1);
        s.state().inflight.push_back(queued(2));
        assert_eq!(s.next_packet_id(), 3);
        s.next_pkid = u16::MAX;
        assert_eq!(s.next_packet_id(), u16::MAX);
        assert_eq!(s.next_packet_id(), 1);
    }

    #[test]
    fn compact_frees_empty_state_only() {
        let mut s = Session::new("c".into(), Version::V5);
        s.state();
        s.compact();
        assert!(s.extra.is_none());
        s.state().inflight.push_back(queued(1));
        s.compact();
        assert_eq!(s.inflight_len(), 1);
    }

    #[test]
    fn client_ids_find_insert_remove() {
        let mut sessions = Slab::new();
        let mut ids = ClientIds::default();
        for i in 0..1000 {
            let k = sessions.insert(Session::new(Arc::from(format!("dev-{i}")), Version::V311));
            ids.insert(k as u32, &sessions);
        }
        assert_eq!(ids.len(), 1000);
        let k = ids.get("dev-500", &sessions).expect("found");
        assert_eq!(&*sessions[k as usize].client_id, "dev-500");
        assert_eq!(ids.get("dev-1000", &sessions), None);
        assert_eq!(ids.remove("dev-500", &sessions), Some(k));
        sessions.remove(k as usize);
        assert_eq!(ids.get("dev-500", &sessions), None);
        assert_eq!(ids.remove("dev-500", &sessions), None);
        assert_eq!(ids.len(), 999);
    }

    fn will(topic: &str) -> Box<Will> {
        Box::new(Will {
            topic: topic.into(),
            payload: Bytes::new(),
            qos: 0,
            retain: false,
            delay_secs: 0,
            props: None,
        })
    }

    fn attach(conn: usize, will: Option<Box<Will>>) -> Attach {
        Attach {
            conn: ConnKey::new(conn),
            version: Version::V5,
            expiry_secs: 60,
            alias_max: 5,
            will,
            acl: None,
        }
    }

    #[test]
    fn attach_clears_what_the_offline_time_left_and_detach_returns_the_will() {
        let mut s = Session::new("c".into(), Version::V311);
        s.timer = Some(TimerId::default());
        let st = s.state();
        st.will = Some(will("old"));
        st.will_due = Some(10);
        st.expires_at = Some(20);
        st.aliases = Some(Box::default());
        assert_eq!(
            s.attach(attach(7, Some(will("new")))),
            Some(TimerId::default())
        );
        assert!(s.is_online() && s.timer.is_none());
        assert_eq!(
            (s.conn, s.version, s.expiry_secs, s.alias_max),
            (Some(ConnKey::new(7)), Version::V5, 60, 5)
        );
        let st = s.extra.as_ref().expect("the will is kept");
        assert!(st.will_due.is_none() && st.expires_at.is_none() && st.aliases.is_none());
        assert_eq!(s.detach().map(|w| w.topic), Some("new".to_string()));
        assert!(!s.is_online());
        assert_eq!(s.alias_max, 0);
        assert!(s.detach().is_none());
    }

    #[test]
    fn attach_without_will_or_leftovers_keeps_the_session_small() {
        let mut s = Session::new("c".into(), Version::V5);
        s.state();
        assert_eq!(s.attach(attach(1, None)), None);
        assert!(s.extra.is_none());
    }

    #[test]
    fn each_ack_completes_only_the_exchange_it_answers() {
        use InflightState::{Published, Released};
        // (in flight: pkid, qos, state), ack, pkid → completed?
        type Row = ((u16, u8, InflightState), Ack, u16, bool);
        let rows: &[Row] = &[
            ((1, 1, Published), Ack::PubAck, 1, true),
            ((1, 1, Published), Ack::PubAck, 2, false),
            ((1, 2, Published), Ack::PubAck, 1, false),
            ((1, 2, Published), Ack::PubRec, 1, true),
            ((1, 1, Published), Ack::PubRec, 1, false),
            ((1, 2, Released), Ack::PubComp, 1, true),
            ((1, 2, Published), Ack::PubComp, 1, false),
            ((1, 1, Published), Ack::PubComp, 1, false),
        ];
        for (i, &((pkid, qos, state), ack, acked, want)) in rows.iter().enumerate() {
            let mut s = Session::new("c".into(), Version::V5);
            s.state().inflight.push_back(sent(pkid, qos, state));
            let done = s.complete(acked, ack);
            assert_eq!(done.is_some(), want, "row {i}");
            assert_eq!(s.inflight_len(), usize::from(!want), "row {i}");
        }
        let mut s = Session::new("c".into(), Version::V5);
        assert!(s.complete(1, Ack::PubAck).is_none());
    }

    #[test]
    fn release_moves_a_qos2_message_to_await_pubcomp() {
        let mut s = Session::new("c".into(), Version::V5);
        assert!(!s.release(3));
        s.state()
            .inflight
            .push_back(sent(3, 2, InflightState::Published));
        s.state()
            .inflight
            .push_back(sent(4, 1, InflightState::Published));
        assert!(!s.release(4));
        assert!(s.complete(3, Ack::PubComp).is_none());
        assert!(s.release(3));
        assert_eq!(s.complete(3, Ack::PubComp).map(|f| f.pkid), Some(3));
    }

    #[test]
    fn release_inbound_frees_a_known_id_once() {
        let mut s = Session::new("c".into(), Version::V5);
        assert!(!s.release_inbound(5));
        s.state().inbound_qos2.extend([5, 6]);
        assert!(s.release_inbound(5));
        assert!(!s.release_inbound(5));
        assert!(s.release_inbound(6));
        assert!(s.extra.is_none(), "compacted once empty");
    }

    #[test]
    fn next_to_send_respects_the_window() {
        let mut s = Session::new("c".into(), Version::V5);
        assert!(s.window_open(1));
        assert!(s.next_to_send(1).is_none());
        for pkid in [1, 2] {
            let item = sent(pkid, 1, InflightState::Published).item;
            s.state().queue.push_back(item);
        }
        assert!(!s.window_open(5), "a queue ahead closes the window");
        s.state().inflight.push_back(queued(9));
        assert!(s.next_to_send(1).is_none(), "window of 1 is full");
        assert!(s.next_to_send(2).is_some());
        assert_eq!(s.queued_len(), 1);
        s.state().queue.clear();
        assert!(s.window_open(2) && !s.window_open(1));
    }

    #[test]
    fn keys_round_trip_and_fit_in_four_bytes() {
        for i in [0, 1, 1000, u32::MAX as usize - 1] {
            assert_eq!(ConnKey::new(i).index(), i);
            assert_eq!(SessionKey::new(i).index(), i);
        }
        assert_eq!(std::mem::size_of::<Option<ConnKey>>(), 4);
        assert_eq!(std::mem::size_of::<Option<SessionKey>>(), 4);
    }

    #[test]
    fn idle_session_is_small() {
        // client id Arc + subs Vec + conn + expiry + timer + pkid + version + box pointer.
        assert!(
            std::mem::size_of::<Session>() <= 88,
            "{}",
            std::mem::size_of::<Session>()
        );
        // A subscription: filter, options and identifier in the filter's padding.
        assert_eq!(std::mem::size_of::<(Arc<str>, u8, u32)>(), 24);
    }
}
