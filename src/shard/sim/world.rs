//! The simulated world: one real shard on a manual clock, a few client ids with at most
//! one live socket each, and the model of what the server should hold for each id (its
//! session, subscriptions, and the messages it may and must receive). Every action is
//! followed by `settle` (loop turns and client reads until nothing moves) and the checks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::mailbox::ShardMsg;

use super::super::ConnState;
use super::super::Shard;
use super::client::{Client, ConnectSpec, Packet};
use super::rig::manual_shard;
use super::rng::Rng;
use super::{check, topic_matches};

/// Loop turns `settle` may take before the harness calls the shard stuck.
const MAX_SETTLE_TURNS: usize = 10_000;
pub(super) const TICK_MS: u64 = 100;
pub(super) const MAX_INFLIGHT: usize = 4;
/// `max_keepalive_secs`, granted for keep-alive 0 (`keepalive_zero = "max"`).
const MAX_KEEPALIVE: u64 = 180;

/// The sim's configuration: the defaults with no ACL, no store, no inbound rate limits
/// (a manual clock would pause publishers for good), small windows, short expiries and
/// small socket buffers and watermarks so that stalls and full windows happen often.
fn config() -> Config {
    let mut c = Config::default();
    c.acl.enabled = false;
    c.store.enabled = false;
    c.shards.tick_ms = TICK_MS as u32;
    c.mqtt.max_inflight = MAX_INFLIGHT as u16;
    c.mqtt.max_session_expiry_secs = 30;
    c.mqtt.write_stall_timeout_secs = 10;
    c.limits.publish_rate = 0;
    c.limits.bytes_rate = 0;
    c.tcp.send_buffer_bytes = 4096;
    c.buffers.outbound_high_watermark = 8192;
    c.buffers.outbound_low_watermark = 2048;
    c
}

/// What the model expects the server to hold for one client id.
#[derive(Default)]
pub(super) struct MSession {
    pub subs: BTreeMap<String, u8>,
    /// Every filter it has had (a will may be published while one is held, and
    /// delivered from the queue after it is gone).
    pub ever: BTreeSet<String>,
    /// Seconds it outlives its connection.
    pub expiry_secs: u32,
    /// Offline since somewhere in (lo, hi) ms: exactly known when the client left, only
    /// bounded when the server closed it.
    pub offline: Option<(u64, u64)>,
    /// Messages (by id) it may receive, at the QoS it must receive them.
    pub allowed: HashMap<u64, u8>,
    /// QoS 1/2 messages it must still receive.
    pub expect: BTreeMap<u64, u8>,
}

/// A will as the model knows it: published no earlier than its delay (or the session's
/// end) after its connection went away other than by DISCONNECT, and never after one.
pub(super) struct MWill {
    /// The slot whose connection set it.
    pub slot: usize,
    pub topic: &'static str,
    pub qos: u8,
    /// Its delay, capped by the session's expiry, in ms.
    pub after_ms: u64,
    /// When its connection went away: `None` while it is live (or ended by DISCONNECT).
    pub gone_at: Option<u64>,
}

type WillArrival = (String, BTreeSet<String>, u64, u8, String, u64);

/// A live connection as its client sees it.
pub(super) struct Live {
    pub client: Client,
    /// Effective keep-alive, seconds.
    pub keep_alive: u64,
    pub last_sent: u64,
    /// `last_sent` when this step began: what the shard's timers went by if the step
    /// moved the clock (acks sent while settling come after the timers fired).
    pub sent_before_step: u64,
    pub window: usize,
    pub acking: bool,
    pub stalled: bool,
    /// The CONNACK's session present flag it must get, until it comes.
    pub want_connack: Option<bool>,
    /// Server exchanges open (packet id → QoS) and the acks withheld.
    pub open: HashMap<u16, u8>,
    pub withheld: Vec<(u8, u16)>,
    pub next_pkid: u16,
    /// Its will's message id.
    pub will: Option<u64>,
    /// Messages it published since the shard was last seen not holding its PUBLISHes.
    pub unread: Vec<u64>,
}

pub(super) struct Slot {
    pub id: String,
    pub live: Option<Live>,
    pub session: Option<MSession>,
}

pub(super) struct World {
    pub shard: Shard,
    rx: mpsc::Receiver<ShardMsg>,
    addr: SocketAddr,
    pub slots: Vec<Slot>,
    /// The manual clock, ms since start.
    pub now: u64,
    pub next_msg: u64,
    /// Messages whose PUBLISH the shard held (`pacing.rs`): handled later than sent, so
    /// against later subscriptions, or never if their connection ended first (their
    /// publisher got no acknowledgement): they may arrive anywhere, or not at all.
    pub deferred: HashSet<u64>,
    pub rng: Rng,
    /// Connections taken over, read until the next `reconcile`.
    pub replaced: Vec<Client>,
    /// Wills by message id.
    pub wills: HashMap<u64, MWill>,
    /// Wills delivered this action: receiver, its subscriptions, message id, QoS, topic,
    /// time.
    will_arrivals: Vec<WillArrival>,
}

impl World {
    pub(super) fn new(seed: u64, clients: usize) -> World {
        let (shard, rx, addr) = manual_shard(config(), tokio::runtime::Handle::current());
        let slots = (0..clients)
            .map(|i| Slot {
                id: format!("c{i}"),
                live: None,
                session: None,
            })
            .collect();
        World {
            shard,
            rx,
            addr,
            slots,
            now: 0,
            next_msg: 1,
            deferred: HashSet::new(),
            rng: Rng::new(seed),
            replaced: Vec::new(),
            wills: HashMap::new(),
            will_arrivals: Vec::new(),
        }
    }

    /// Marks the start of a step (see `Live::sent_before_step`).
    pub(super) fn begin_step(&mut self) {
        for live in self.slots.iter_mut().filter_map(|s| s.live.as_mut()) {
            live.sent_before_step = live.last_sent;
        }
    }

    pub(super) fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.shard.clock.advance(Duration::from_millis(ms));
    }

    /// Loop turns and client reads until two quiet rounds in a row: the shard not busy
    /// and no client read or wrote. Loopback delivers within the syscall, so quiet means
    /// done; a bound turns a livelock into a failure, never a wall-clock wait.
    pub(super) fn settle(&mut self) -> Result<(), String> {
        let mut quiet = 0;
        for _ in 0..MAX_SETTLE_TURNS {
            let end = self.shard.turn(&mut self.rx).map_err(|e| e.to_string())?;
            if !end.busy && self.shard.pacing.resume_pending() {
                // The real loop would now wait for a socket or the tick (up to a second)
                // with a released publisher still held.
                return Err("a turn ended idle with released publishers not read again".into());
            }
            self.excuse_held();
            let moved = self.pump()?;
            if end.busy || moved {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet == 2 {
                    // Whatever was sent is handled now, unless it is still held.
                    self.slots
                        .iter_mut()
                        .filter_map(|s| s.live.as_mut())
                        .for_each(|l| l.unread.clear());
                    return Ok(());
                }
            }
        }
        Err(format!("not settled after {MAX_SETTLE_TURNS} turns"))
    }

    /// A client whose PUBLISH the shard holds (a subscriber its messages reach is
    /// congested, `pacing.rs`) is silent because of the shard: its keep-alive allowance
    /// starts over, as the shard's own timer excuses it.
    fn excuse_held(&mut self) {
        for slot in &mut self.slots {
            let Some(live) = slot.live.as_mut() else {
                continue;
            };
            let held = self
                .shard
                .sessions
                .find(&slot.id)
                .and_then(|k| self.shard.sessions.get(k as usize))
                .and_then(|s| s.conn)
                .is_some_and(|c| self.shard.pacing.is_held(c.index()));
            if held {
                live.last_sent = self.now;
                self.deferred.extend(live.unread.drain(..));
            }
        }
        for s in self.slots.iter_mut().filter_map(|s| s.session.as_mut()) {
            s.expect.retain(|m, _| !self.deferred.contains(m));
        }
    }

    /// Reads every client that reads; true if anything moved.
    fn pump(&mut self) -> Result<bool, String> {
        let mut moved = false;
        for c in &mut self.replaced {
            moved |= c.read(&mut Vec::new());
        }
        for i in 0..self.slots.len() {
            let Some(live) = self.slots[i].live.as_mut().filter(|l| !l.stalled) else {
                continue;
            };
            let mut packets = Vec::new();
            moved |= live.client.read(&mut packets);
            for p in packets {
                moved = true;
                self.on_packet(i, p)?;
            }
        }
        Ok(moved)
    }

    fn on_packet(&mut self, i: usize, p: Packet) -> Result<(), String> {
        let now = self.now;
        let slot = &mut self.slots[i];
        let id = slot.id.clone();
        let live = slot.live.as_mut().expect("a live client");
        match p {
            Packet::ConnAck {
                session_present,
                code,
            } => {
                let want = live.want_connack.take();
                if code != 0 || want != Some(session_present) {
                    return Err(format!(
                        "{id}: CONNACK code {code} session present {session_present}, \
                         expected code 0 and {want:?}"
                    ));
                }
            }
            Packet::Publish {
                qos,
                pkid,
                topic,
                payload,
            } => {
                let session = slot.session.as_mut().expect("a live client has a session");
                let msg = u64::from_le_bytes(payload[..8].try_into().expect("8-byte id"));
                if self.wills.contains_key(&msg) {
                    // Checked in `reconcile`, once the model knows the connection closed.
                    let subs = session.ever.clone();
                    self.will_arrivals
                        .push((id.clone(), subs, msg, qos, topic, now));
                } else {
                    deliver(&id, session, qos, &topic, &payload, &self.deferred)?;
                }
                if qos > 0 {
                    if live.open.insert(pkid, qos).is_some() {
                        return Err(format!("{id}: packet id {pkid} sent while in flight"));
                    }
                    if live.open.len() > live.window {
                        return Err(format!(
                            "{id}: {} messages in flight, window {}",
                            live.open.len(),
                            live.window
                        ));
                    }
                    live.ack(if qos == 1 { 0x40 } else { 0x50 }, pkid, now);
                }
            }
            Packet::PubRec(pkid) => {
                live.client.send_ack(0x62, pkid);
                live.last_sent = now;
            }
            Packet::PubRel(pkid) => live.ack(0x70, pkid, now),
            Packet::Disconnect => live.client.closed = true,
            Packet::PubAck
            | Packet::PubComp
            | Packet::SubAck
            | Packet::UnsubAck
            | Packet::PingResp => {}
        }
        Ok(())
    }

    /// Connects client `i` (a takeover when it has a live connection).
    pub(super) fn connect(&mut self, i: usize, spec: &ConnectSpec) {
        let mut client = Client::connect(self.addr, spec.v5);
        client.send_connect(spec);
        let slot = &mut self.slots[i];
        if let Some(old) = slot.live.take() {
            if let Some(w) = old.will.and_then(|id| self.wills.get_mut(&id)) {
                w.gone_at = Some(self.now);
            }
            self.replaced.push(old.client);
            // Closing the old connection ends a session that ends with its connection.
            if slot.session.as_ref().is_some_and(|s| s.expiry_secs == 0) {
                slot.session = None;
            }
        }
        let present = !spec.clean && slot.session.is_some();
        if spec.clean {
            // The old session ends now, and with it the wait of its will.
            let now = self.now;
            for w in self.wills.values_mut().filter(|w| w.slot == i) {
                if let Some(gone) = w.gone_at {
                    w.after_ms = w.after_ms.min(now - gone);
                }
            }
        }
        if !present {
            slot.session = Some(MSession::default());
        }
        let session = slot.session.as_mut().expect("just made");
        session.offline = None;
        session.expiry_secs = match (spec.v5, spec.clean) {
            (true, _) => spec.expiry.min(30),
            (false, true) => 0,
            (false, false) => 30,
        };
        let window = if spec.v5 {
            usize::from(spec.receive_max).min(MAX_INFLIGHT)
        } else {
            MAX_INFLIGHT
        };
        slot.live = Some(Live {
            client,
            keep_alive: match spec.keep_alive {
                0 => MAX_KEEPALIVE,
                k => u64::from(k),
            },
            last_sent: self.now,
            sent_before_step: self.now,
            window,
            acking: true,
            stalled: false,
            want_connack: Some(present),
            open: HashMap::new(),
            withheld: Vec::new(),
            next_pkid: 1,
            will: None,
            unread: Vec::new(),
        });
    }

    /// A message published now on `topic` at `qos`: every session subscribed to it may
    /// get it, and must get a QoS 1/2 copy. Returns the message id.
    pub(super) fn expect_publish(&mut self, topic: &str, qos: u8) -> u64 {
        let id = self.next_msg;
        self.next_msg += 1;
        for s in self.slots.iter_mut().filter_map(|s| s.session.as_mut()) {
            let granted = s
                .subs
                .iter()
                .filter(|(f, _)| topic_matches(f, topic))
                .map(|(_, &q)| q.min(qos))
                .max();
            if let Some(g) = granted {
                s.allowed.insert(id, g);
                if g > 0 {
                    s.expect.insert(id, g);
                }
            }
        }
        id
    }

    /// The client of slot `i` went away (its own doing when `known`, at `self.now`; else
    /// the server closed it some time after its last packet). Its session goes offline,
    /// or ends.
    pub(super) fn gone(&mut self, i: usize, known: bool) {
        let now = self.now;
        let slot = &mut self.slots[i];
        let Some(live) = slot.live.take() else {
            return;
        };
        let lo = if known { now } else { live.sent_before_step };
        if let Some(w) = live.will.and_then(|id| self.wills.get_mut(&id)) {
            w.gone_at = Some(lo);
        }
        match slot.session.as_mut() {
            Some(s) if s.expiry_secs > 0 => s.offline = Some((lo, now)),
            _ => slot.session = None,
        }
        // Dropped without a shutdown: closed, or reset if unread bytes remain.
        drop(live);
    }

    /// After a settle: notices connections the server closed, and checks that each
    /// close had a cause (keep-alive, a write stall) and that no overdue one was missed.
    pub(super) fn reconcile(&mut self) -> Result<(), String> {
        // The shard's side of a connection taken over is checked in `check` (the
        // connection count); its client may still be reading what was sent before.
        self.replaced.clear();
        for i in 0..self.slots.len() {
            let Some(live) = self.slots[i].live.as_ref() else {
                continue;
            };
            let id = &self.slots[i].id;
            let online = self
                .shard
                .sessions
                .find(id)
                .and_then(|k| self.shard.sessions.get(k as usize))
                .is_some_and(|s| s.is_online());
            if live.want_connack.is_some() && !live.stalled && !live.client.closed {
                return Err(format!("{id}: no CONNACK"));
            }
            let since = self.now - live.last_sent;
            let allowed = live.keep_alive * 1500;
            if live.client.closed || !online {
                let since = self.now - live.sent_before_step;
                if !live.stalled && since + TICK_MS < allowed {
                    return Err(format!(
                        "{id}: closed by the server {since} ms after its last packet, \
                         keep-alive allows {allowed} ms"
                    ));
                }
                self.gone(i, false);
            } else if since > allowed + 3 * TICK_MS {
                return Err(format!(
                    "{id}: still open {since} ms after its last packet, keep-alive \
                     allows {allowed} ms"
                ));
            }
        }
        for (id, subs, msg, qos, topic, at) in std::mem::take(&mut self.will_arrivals) {
            will_delivered(&id, &subs, &self.wills[&msg], msg, qos, &topic, at)?;
        }
        self.reconcile_expiry()
    }

    /// Offline sessions must live until their expiry and be gone soon after; in the
    /// uncertain window the model follows the server.
    fn reconcile_expiry(&mut self) -> Result<(), String> {
        for slot in &mut self.slots {
            let Some(s) = slot.session.as_ref() else {
                continue;
            };
            let Some((lo, hi)) = s.offline else {
                continue;
            };
            let exists = self.shard.sessions.find(&slot.id).is_some();
            let expiry = u64::from(s.expiry_secs) * 1000;
            if !exists && self.now + TICK_MS < lo + expiry {
                return Err(format!(
                    "{}: session ended {} ms after going offline, expiry {expiry} ms",
                    slot.id,
                    self.now - lo
                ));
            }
            if exists && self.now > hi + expiry + 2 * TICK_MS {
                return Err(format!(
                    "{}: session still exists {} ms after going offline, expiry {expiry} ms",
                    slot.id,
                    self.now - hi
                ));
            }
            if !exists {
                slot.session = None;
            }
        }
        Ok(())
    }

    /// The shard's bookkeeping, and the model's sessions against the shard's.
    pub(super) fn check(&self) -> Result<(), String> {
        let ids: Vec<&str> = self.slots.iter().map(|s| s.id.as_str()).collect();
        check::shard(&self.shard, &ids)?;
        let live = self.slots.iter().filter(|s| s.live.is_some()).count();
        // A connection the shard ended lingers in its close grace (`Closing`): it is no
        // client any more (checked in `check::shard`), so it does not count here.
        let open = (self.shard.wire.conns.iter())
            .filter(|(_, c)| c.state != ConnState::Closing)
            .count();
        if open != live {
            return Err(format!(
                "{open} open connections on the shard, {live} live clients (one taken over not closed?)"
            ));
        }
        for slot in &self.slots {
            let server = self.shard.sessions.find(&slot.id).is_some();
            if server != slot.session.is_some() {
                return Err(format!(
                    "{}: the server {} a session, the model {}",
                    slot.id,
                    if server { "has" } else { "has no" },
                    if slot.session.is_some() {
                        "has one"
                    } else {
                        "has none"
                    },
                ));
            }
        }
        Ok(())
    }
}

impl Live {
    /// Sends ack `first` for `pkid`, or withholds it.
    pub(super) fn ack(&mut self, first: u8, pkid: u16, now: u64) {
        if !self.acking {
            self.withheld.push((first, pkid));
            return;
        }
        self.client.send_ack(first, pkid);
        self.last_sent = now;
        if first != 0x50 {
            // PUBACK or PUBCOMP ends the exchange; after PUBREC the PUBREL comes.
            self.open.remove(&pkid);
        }
    }

    /// Sends every withheld ack.
    pub(super) fn release(&mut self, now: u64) {
        self.acking = true;
        for (first, pkid) in std::mem::take(&mut self.withheld) {
            self.ack(first, pkid, now);
        }
    }

    pub(super) fn pkid(&mut self) -> u16 {
        let p = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        p
    }
}

/// Checks a delivered message against the model: the session was subscribed when it was
/// published, and it comes at the granted QoS.
fn deliver(
    id: &str,
    s: &mut MSession,
    qos: u8,
    topic: &str,
    payload: &[u8],
    deferred: &HashSet<u64>,
) -> Result<(), String> {
    let msg = u64::from_le_bytes(payload[..8].try_into().expect("8-byte id"));
    if deferred.contains(&msg) {
        s.expect.remove(&msg);
        return Ok(());
    }
    let want = topic_of(payload);
    if want != topic.as_bytes() {
        return Err(format!(
            "{id}: message {msg} arrived on {topic}, sent on another"
        ));
    }
    match s.allowed.get(&msg) {
        None => Err(format!(
            "{id}: message {msg} on {topic} matched none of its subscriptions"
        )),
        Some(&g) if g != qos => Err(format!(
            "{id}: message {msg} on {topic} at QoS {qos}, granted {g} (subscribed {:?})",
            s.subs
        )),
        Some(_) => {
            s.expect.remove(&msg);
            Ok(())
        }
    }
}

/// Checks a delivered will: its connection went away (not by DISCONNECT) at least its
/// delay ago, the receiver has been subscribed to its topic, at no more than its QoS.
fn will_delivered(
    id: &str,
    subs: &BTreeSet<String>,
    w: &MWill,
    msg: u64,
    qos: u8,
    topic: &str,
    now: u64,
) -> Result<(), String> {
    let Some(gone) = w.gone_at else {
        return Err(format!(
            "{id}: will {msg} arrived while its connection lives or after a DISCONNECT"
        ));
    };
    if now + TICK_MS < gone + w.after_ms {
        return Err(format!(
            "{id}: will {msg} arrived {} ms after its connection went, delay {} ms",
            now - gone,
            w.after_ms
        ));
    }
    let subscribed = subs.iter().any(|f| topic_matches(f, topic));
    if subscribed && topic == w.topic && qos <= w.qos {
        return Ok(());
    }
    Err(format!(
        "{id}: will {msg} on {topic} at QoS {qos} (set on {} at QoS {}), subscribed {subs:?}",
        w.topic, w.qos
    ))
}

/// A payload: the message id, the topic (so a mix-up shows), then padding.
pub(super) fn payload(msg: u64, topic: &str, pad: usize) -> Vec<u8> {
    let mut p = msg.to_le_bytes().to_vec();
    p.push(topic.len() as u8);
    p.extend_from_slice(topic.as_bytes());
    p.resize(p.len() + pad, 0xAB);
    p
}

fn topic_of(payload: &[u8]) -> &[u8] {
    let n = usize::from(payload[8]);
    &payload[9..9 + n]
}
