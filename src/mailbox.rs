//! The only way into a shard: a bounded mailbox per shard.
//!
//! Shards never share state; the business pool and other shards reach a shard by
//! `try_send` on its mailbox. A full mailbox is an overload answer (HTTP 503, CONNACK
//! "server unavailable", a counted drop), never a wait: nothing may block an IO shard.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::codec::Connect;
use crate::interest::ShardInterest;
use crate::message::Message;

/// A client id's home shard: the one shard that owns its session, so duplicate-login
/// takeover, push-by-client-id and the session map need no global lock.
///
/// SipHash with fixed zero keys (`DefaultHasher::new`) is stable for the life of the
/// process on every thread, which is all a home needs.
pub fn home_shard(client_id: &str, shards: usize) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    client_id.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as usize
}

/// A connection whose CONNECT was read on another shard, moving to its home shard.
pub struct Handoff {
    pub socket: mio::net::TcpStream,
    pub peer: SocketAddr,
    pub connect: Connect,
    /// Bytes that followed the CONNECT in the same reads.
    pub rest: Vec<u8>,
    pub accepted_at: Instant,
    /// The TLS session of a connection from the TLS listener (it travels with the socket;
    /// it may still hold decrypted bytes that followed the CONNECT).
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// Where in its record the ciphertext given to that rustls session ends.
    pub tls_cursor: crate::tls::record::Cursor,
    /// Its TLS 1.3 traffic secrets, from rustls' key log.
    pub tls_secrets: Option<Box<crate::tls::traffic_secret::LoggedSecrets>>,
    /// Ciphertext read past the CONNECT and not yet given to that rustls session.
    pub tls_in: Vec<u8>,
    /// The listener it came in on (a WebSocket's output is framed on the home shard too).
    pub link: crate::shard::Link,
    /// A WebSocket's decoder, when a frame was half-read at the CONNECT.
    pub ws: Option<crate::shard::WsBusy>,
}

/// One push addressed to a device by client id (HTTP push API).
pub struct ClientPush {
    pub client_id: String,
    pub msg: Arc<Message>,
    /// Hand back a receiver that fires when the device acknowledges (QoS 1).
    pub wait_ack: bool,
}

/// What happened to one [`ClientPush`], exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStatus {
    /// Written to the device's live connection.
    Sent,
    /// Stored in the device's session for delivery (offline with a persistent session, or
    /// its in-flight window is full).
    Queued,
    /// No session, or QoS 0 to an offline device: not delivered, not stored.
    Offline,
    /// Not delivered, not stored, for this reason (`slow_consumer`, `too_large`, `expired`).
    Dropped(&'static str),
}

pub struct PushOutcome {
    pub status: PushStatus,
    /// With `wait_ack` and a message that was sent or queued at QoS 1: fires on PUBACK.
    pub ack: Option<oneshot::Receiver<()>>,
}

/// A device as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    #[serde(flatten)]
    pub summary: ClientSummary,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// A device as a list of clients (`GET /v1/clients`) shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientSummary {
    pub client_id: String,
    pub online: bool,
    pub protocol_version: Option<u8>,
    pub keep_alive: Option<u16>,
    /// Seconds since the UNIX epoch at which the current connection was accepted.
    pub connected_at: Option<u64>,
    pub peer: Option<String>,
    pub shard: usize,
    pub queued_messages: usize,
    pub inflight_messages: usize,
    pub session_expiry_secs: u32,
}

/// One shard's part of a listing page (`GET /v1/clients`, `GET /v1/retained`), in key
/// order (client id, topic), each key after the request's `after`.
pub struct Page<T> {
    pub items: Vec<T>,
    /// The shard looked at every key up to this one (inclusive) and will not list one of
    /// them on the next page; `None`: it looked at every key it has.
    pub covered: Option<Arc<str>>,
}

/// What a shard is asked to list: at most `limit` entries with keys after `after`,
/// looking at no more than `scan` keys (so one page is bounded work on the shard).
#[derive(Debug, Clone)]
pub struct ListRequest {
    pub after: Option<Arc<str>>,
    pub limit: usize,
    pub scan: usize,
    /// Stop adding entries once their payloads take this many bytes (retained only).
    pub bytes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub qos: u8,
}

/// What a shard made of a dead node's session offered to it (`ShardMsg::TakeIn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenIn {
    /// It holds the session now.
    Adopted,
    /// It held a session of the client id already (its device connected here).
    AlreadyHere,
    /// It is stopping, or keeps no sessions (no store): it took nothing.
    Refused,
}

/// What a shard can be asked to do.
pub enum ShardMsg {
    Handoff(Box<Handoff>),
    /// From a TLS handshake thread: a connection this shard accepted, its handshake done.
    Handshaken(Box<crate::tls::handshaker::Handshaken>),
    /// Messages to route to this shard's local subscribers (batched per loop turn), from
    /// shard `from`. A `stamp` other than 0 asks for a [`ShardMsg::Committed`] once the
    /// store changes they caused here are committed (`shard/held.rs`).
    Publish {
        from: u16,
        stamp: u64,
        batch: Vec<Arc<Message>>,
        /// What the batch costs (see [`Mailboxes::send_routed`]).
        bytes: usize,
    },
    /// From a topic's home shard: its retained updates (an empty payload deletes), the
    /// latest of each topic, in the order it applied them (`shard/retained.rs`).
    Retained(Vec<Arc<Message>>),
    /// Back to a publisher's shard: how many more (or fewer) congested subscribers pace
    /// each of its sessions (`shard/pacing.rs`), as (session key, change).
    Pace(Vec<(u32, i32)>),
    /// Back to a publisher's shard: its batches up to `stamp` are routed here and what
    /// they stored is committed (`ok`), or the commit failed (`!ok`).
    Committed {
        from: u16,
        stamp: u64,
        ok: bool,
    },
    /// Pushes to devices whose home is this shard; answered after this turn's writes.
    Push {
        items: Vec<ClientPush>,
        reply: oneshot::Sender<Vec<PushOutcome>>,
    },
    /// A backend publish to a topic: route to local subscribers, answer how many matched.
    PushTopic {
        msg: Arc<Message>,
        reply: oneshot::Sender<usize>,
    },
    ClientInfo {
        client_id: String,
        reply: oneshot::Sender<Option<ClientInfo>>,
    },
    /// A page of the sessions homed here (`online`: only those with, or without, a live
    /// connection).
    ListClients {
        req: ListRequest,
        online: Option<bool>,
        reply: oneshot::Sender<Page<ClientSummary>>,
    },
    /// A page of the retained messages whose topic is homed here (each shard holds them
    /// all; the topic's home shard is the one that stores it), matching `filter` if any.
    ListRetained {
        req: ListRequest,
        filter: Option<Arc<str>>,
        reply: oneshot::Sender<Page<Arc<Message>>>,
    },
    /// Forget the retained message of `topic` (sent to every shard); the topic's home
    /// shard also deletes it from the store. The answer: whether this shard had one, and
    /// from the home shard with a store, the receiver that fires after the commit.
    DeleteRetained {
        topic: Arc<str>,
        reply: oneshot::Sender<RetainedDeleted>,
    },
    /// Disconnect a client (MQTT 5 reason 0x98); optionally drop its session too.
    Kick {
        client_id: String,
        clear_session: bool,
        /// `None`: no session; `Some(online)`: whether a connection was closed.
        reply: oneshot::Sender<Option<bool>>,
    },
    /// Begin graceful shutdown: stop accepting, tell v5 clients 0x8B, close everything.
    Shutdown,
    /// The `[acl]` rules a config reload compiled (`src/reload.rs`): in force for this
    /// shard's next check (`shard/reload.rs`), which `applied` then tells the reload.
    Acl {
        acl: Box<crate::acl::Acl>,
        applied: oneshot::Sender<()>,
    },
    /// To a shared group's owner shard: `client_id` (homed on `shard`) subscribed to
    /// `$share/{group}/{filter}` with `options` (the subscription options byte) and
    /// subscription identifier `sub_id` (0 = none). A repeat updates the member.
    SharedJoin(Box<SharedMember>),
    /// To a shared group's owner shard: `client_id` left the group `key`
    /// (`"{group}/{filter}"`): unsubscribed, or its session ended.
    SharedLeave {
        key: Arc<str>,
        client_id: Arc<str>,
    },
    /// From a shared group's owner to a member's home shard: deliver `msg` at `qos` to
    /// `client_id` as a member of group `key`, or bounce it back if it is no member.
    DeliverShared(Box<SharedDelivery>),
    /// Back to a shared group's owner: a message a member could not take or will not
    /// finish (it left with the message queued or unacknowledged); send it to another.
    /// `from` is no member any more.
    SharedBounce(Box<SharedBounce>),
    /// The business runtime's answer to an authentication the shard handed it.
    AuthDone(Box<AuthDone>),
    /// From the fleet (`crate::cluster`): another node accepted `client_id`; its live
    /// connection here, if any, is closed as taken over (MQTT 5 0x8E).
    TakenOver {
        client_id: String,
    },
    /// This node's offline copy of `client_id`'s session is stale (another node changed
    /// the session after its device connected here): ended without purging the fleet's
    /// copy, unless its device is back here.
    StaleCopy {
        client_id: String,
    },
    /// From the fleet: `client_id` connected here while another node held it, again
    /// within `cluster.takeover_min_interval_ms`; its live connection here is closed
    /// (MQTT 5 0x9F, connection rate exceeded) and the other node keeps it.
    FleetThrottled {
        client_id: Arc<str>,
    },
    /// From the fleet (`crate::cluster::handover`): another node is about to resume
    /// `client_id`'s session; this shard closes its connection (0x8E, no will) and lets the
    /// session go without purging the fleet's copy. `reply`: whether a stored session went
    /// (its deletion then reaches the fleet's mirror, which says when it is through).
    HandOver {
        client_id: String,
        reply: oneshot::Sender<bool>,
    },
    /// From the fleet (`crate::cluster::take_in`): the persistent session of a node that
    /// died, which this node claimed in the registry; the shard adopts it offline and
    /// says what became of it.
    TakeIn {
        stored: Box<crate::store::StoredSession>,
        reply: oneshot::Sender<TakenIn>,
    },
    /// From the fleet's routing (`crate::cluster::routing`): messages published on other
    /// nodes, for this shard's subscribers (not its shared groups, not its retained store).
    FleetPublish(Vec<Arc<Message>>),
    /// From the fleet's retained messages bucket, to the topic's home shard: a retained
    /// update (an empty payload clears) to decide as one of its own devices' (not routed
    /// to subscribers).
    FleetRetained(Arc<Message>),
    /// From the fleet's routing: NATS holds the subscriptions of some of this shard's
    /// subscribe barriers (`RouteHandle::subscribed`); their SUBACKs may go.
    FleetSubscribed,
    /// From the fleet's routing, to the owner shard of shared group `key`
    /// (`{group}/{filter}`): NATS picked this node's members for `msg`; one of them gets it.
    FleetShared {
        key: Arc<str>,
        msg: Arc<Message>,
    },
}

/// A shard's answer to [`ShardMsg::DeleteRetained`].
pub struct RetainedDeleted {
    /// The shard held a retained message for the topic.
    pub existed: bool,
    /// From the topic's home shard when the store is on: fires once the deletion is
    /// committed, with one outcome that is still `Queued` if it was and `Dropped` if the
    /// commit failed (the store writer's answer to a deferred push).
    pub committed: Option<oneshot::Receiver<Vec<PushOutcome>>>,
}

/// An authentication answer for connection `conn` of the shard; `token` tells it from a
/// later connection that reused the slab key (see `Shard::auth_pending`).
pub struct AuthDone {
    pub conn: usize,
    pub token: u64,
    pub verdict: crate::auth::Verdict,
    /// The client's session as the fleet kept it, to adopt before accepting (`None`
    /// without the fleet, or when it keeps none).
    pub session: Option<Box<crate::store::StoredSession>>,
}

/// A member joining a shared subscription group (see [`ShardMsg::SharedJoin`]).
pub struct SharedMember {
    pub group: Arc<str>,
    pub filter: Arc<str>,
    pub client_id: Arc<str>,
    pub shard: usize,
    pub options: u8,
    pub sub_id: u32,
}

/// One message for one shared group member (see [`ShardMsg::DeliverShared`]).
pub struct SharedDelivery {
    pub key: Arc<str>,
    pub client_id: Arc<str>,
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub sub_id: u32,
    /// Times this message was handed back already (bounds the bouncing).
    pub attempts: u8,
}

/// A message handed back to its group's owner (see [`ShardMsg::SharedBounce`]).
pub struct SharedBounce {
    pub key: Arc<str>,
    pub from: Arc<str>,
    pub msg: Arc<Message>,
    pub attempts: u8,
}

/// The senders of every shard's mailbox, indexed by shard id.
#[derive(Clone)]
pub struct Mailboxes {
    senders: Arc<[mpsc::Sender<ShardMsg>]>,
    /// Per shard: the bytes of the routed messages ([`ShardMsg::Publish`]) sent to it and
    /// not yet handled, so a sender can bound a busy shard's mailbox by bytes.
    routed_bytes: Arc<[AtomicUsize]>,
    /// Which shards may hold a subscription matching a topic (`crate::interest`).
    interest: Arc<ShardInterest>,
    /// Per shard: its sessions kept in the store (the only ones a routed message can be
    /// stored for), so a publisher's acknowledgement waits only for shards that may store.
    stored_sessions: Arc<[AtomicUsize]>,
}

impl Mailboxes {
    /// Creates `shards` mailboxes of `capacity` each; returns the senders and the receivers.
    pub fn new(shards: usize, capacity: usize) -> (Self, Vec<mpsc::Receiver<ShardMsg>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(capacity)).unzip();
        let routed_bytes = (0..shards).map(|_| AtomicUsize::new(0)).collect();
        let boxes = Mailboxes {
            senders: tx.into(),
            routed_bytes,
            interest: Arc::new(ShardInterest::off()),
            stored_sessions: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        };
        (boxes, rx)
    }

    /// Routes by interest: a counting filter of `buckets` per shard (0 = off, every shard
    /// gets every message).
    pub fn with_interest(mut self, buckets: usize) -> Self {
        self.interest = Arc::new(ShardInterest::new(self.senders.len(), buckets));
        self
    }

    /// Which shards may hold a subscription matching a topic.
    pub fn interest(&self) -> &ShardInterest {
        &self.interest
    }

    /// A session of `shard` started (`added`) or stopped being kept in the store. Raised
    /// before its CONNACK is written, so a PUBLISH read after that sees it.
    pub fn stored_session(&self, shard: usize, added: bool) {
        if added {
            self.stored_sessions[shard].fetch_add(1, Ordering::Release);
        } else {
            self.stored_sessions[shard].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether a message routed to `shard` may be stored there (it keeps some session in
    /// the store).
    pub fn may_store(&self, shard: usize) -> bool {
        self.stored_sessions[shard].load(Ordering::Acquire) > 0
    }

    /// Bytes of routed messages waiting in `shard`'s mailbox.
    pub fn routed_bytes(&self, shard: usize) -> usize {
        self.routed_bytes[shard].load(Ordering::Relaxed)
    }

    /// Sends `shard` a batch of routed messages costing `bytes` (see [`Message::cost`]);
    /// the receiver gives the bytes back with [`Mailboxes::routed_done`]. `counted` runs
    /// once there is room, before the batch can be handled: what it counts is counted by
    /// the time a message of the batch reaches a device (counted after the send, a
    /// sender preempted in between showed a delivered batch uncounted).
    pub fn send_routed(
        &self,
        shard: usize,
        msg: ShardMsg,
        bytes: usize,
        counted: impl FnOnce(),
    ) -> Result<(), ShardMsg> {
        let Ok(permit) = self.senders[shard].try_reserve() else {
            return Err(msg);
        };
        // Counted before it can be handled, so the count never goes below zero.
        self.routed_bytes[shard].fetch_add(bytes, Ordering::Relaxed);
        counted();
        permit.send(msg);
        Ok(())
    }

    /// `shard` handled routed messages costing `bytes`.
    pub fn routed_done(&self, shard: usize, bytes: usize) {
        self.routed_bytes[shard].fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Whether `shard` has stopped (its mailbox is closed).
    pub fn is_closed(&self, shard: usize) -> bool {
        self.senders[shard].is_closed()
    }

    /// Non-blocking send; gives the message back when the mailbox is full or closed.
    pub fn try_send(&self, shard: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.senders[shard].try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
        })
    }

    /// Sends `msg` to `shard`, waiting for room: for tasks on the business pool only,
    /// never a shard. Gives the message back when the shard has stopped.
    pub async fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.senders[shard].send(msg).await.map_err(|e| e.0)
    }

    /// Sends `make(shard)` to every shard, or to none: room is reserved in every mailbox
    /// before anything is sent, so a full (or closed) mailbox leaves the others untouched
    /// and the caller can answer "not sent" truthfully. Err names the first shard without
    /// room.
    pub fn try_send_all(&self, make: impl FnMut(usize) -> ShardMsg) -> Result<(), usize> {
        self.try_send_to(|_| true, make)
    }

    /// [`Mailboxes::try_send_all`] to the shards for which `to` says yes.
    pub fn try_send_to(
        &self,
        to: impl Fn(usize) -> bool,
        mut make: impl FnMut(usize) -> ShardMsg,
    ) -> Result<(), usize> {
        let mut permits = Vec::with_capacity(self.senders.len());
        for (shard, sender) in self.senders.iter().enumerate() {
            if to(shard) {
                permits.push((shard, sender.try_reserve().map_err(|_| shard)?));
            }
        }
        for (shard, permit) in permits {
            permit.send(make(shard));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_shard_is_stable_and_spread() {
        assert_eq!(home_shard("dev-1", 4), home_shard("dev-1", 4));
        assert_eq!(home_shard("anything", 1), 0);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[home_shard(&format!("device-{i:08}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    /// What a routed batch's sender counts is counted before the receiver can take the
    /// batch (a sender preempted after the send left delivered messages uncounted), and
    /// not at all when the mailbox is full.
    #[test]
    fn a_routed_batch_is_counted_before_it_can_be_handled_and_not_when_refused() {
        let (mb, mut rx) = Mailboxes::new(1, 1);
        let mut counted = 0;
        let sent = mb.send_routed(0, ShardMsg::Shutdown, 10, || {
            assert!(rx[0].try_recv().is_err(), "handled before it was counted");
            counted += 1;
        });
        assert!(sent.is_ok());
        assert_eq!((counted, mb.routed_bytes(0)), (1, 10));
        let refused = mb.send_routed(0, ShardMsg::Shutdown, 5, || counted += 1);
        assert!(matches!(refused, Err(ShardMsg::Shutdown)));
        assert_eq!((counted, mb.routed_bytes(0)), (1, 10));
        assert!(matches!(rx[0].try_recv(), Ok(ShardMsg::Shutdown)));
    }

    #[test]
    fn full_mailbox_gives_the_message_back() {
        let (mb, _rx) = Mailboxes::new(1, 1);
        assert!(mb.try_send(0, ShardMsg::Shutdown).is_ok());
        assert!(matches!(
            mb.try_send(0, ShardMsg::Shutdown),
            Err(ShardMsg::Shutdown)
        ));
    }

    #[test]
    fn send_all_sends_to_every_shard_or_to_none() {
        let (mb, mut rx) = Mailboxes::new(3, 1);
        assert!(mb.try_send(1, ShardMsg::Shutdown).is_ok());
        assert_eq!(mb.try_send_all(|_| ShardMsg::Shutdown), Err(1));
        assert!(
            rx[0].try_recv().is_err(),
            "shard 0 got a message though shard 1 was full"
        );
        assert!(rx[2].try_recv().is_err());
        assert!(rx[1].try_recv().is_ok());
        assert_eq!(mb.try_send_all(|_| ShardMsg::Shutdown), Ok(()));
        assert!(rx.iter_mut().all(|r| r.try_recv().is_ok()));
    }
}
