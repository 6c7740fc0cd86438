//! The event model: what a shard tells the backend about a client, and its JSON form.
//!
//! An [`Event`] is built on the IO shard that owns the client (its home shard) and is
//! serialized only on the business pool, by a sink. It holds what the shard already has
//! (`Arc<str>` client id, the `Arc<Message>` of an uplink) so building one costs one small
//! allocation at most. The JSON shape is documented in docs/API.md, "Events".
//!
//! Ordering: every event carries `seq` from the home shard's [`SeqGen`], a hybrid clock
//! that is strictly increasing on that shard and never behind the wall clock in
//! microseconds. A client's events are all produced on its home shard, so their `seq`
//! increases in the order they happened — across reconnects, across a takeover (the old
//! connection's `disconnected` is produced before the new one's `connected`) and, as long
//! as the clock does not step back, across gateway restarts. `seq` is not dense per client:
//! a backend orders by it and drops an event whose `seq` is below the last it applied.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::codec::Version;
use crate::message::Message;
use crate::metrics::DisconnectReason;

/// One event about one client.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unix time in milliseconds when it happened.
    pub time_ms: u64,
    /// From the home shard's [`SeqGen`]: orders a client's events.
    pub seq: u64,
    pub client_id: Arc<str>,
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// A CONNECT was accepted (CONNACK 0 sent).
    Connected(Box<Connected>),
    /// A connection ended, with the reason `gateway_disconnects_total` counts it under.
    Disconnected { reason: DisconnectReason },
    /// A persistent session ended because its expiry interval passed.
    SessionExpired,
    /// Filters granted by a SUBACK (QoS 0..=2; refused filters are not listed).
    Subscribed { filters: Vec<(Arc<str>, u8)> },
    /// Filters removed by an UNSUBSCRIBE.
    Unsubscribed { filters: Vec<Arc<str>> },
    /// A device PUBLISH whose topic matched `[events] uplink_filters`.
    Uplink(Arc<Message>),
}

/// The fields of a `connected` event.
#[derive(Debug, Clone)]
pub struct Connected {
    pub username: Option<String>,
    pub peer: SocketAddr,
    pub version: Version,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub session_present: bool,
}

impl EventKind {
    /// `connected`, `disconnected` or `session_expired`: what the fleet's registry
    /// follows.
    pub fn is_presence(&self) -> bool {
        matches!(
            self,
            EventKind::Connected(_) | EventKind::Disconnected { .. } | EventKind::SessionExpired
        )
    }

    /// The `kind` field and the NATS subject token.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Connected(_) => "connected",
            EventKind::Disconnected { .. } => "disconnected",
            EventKind::SessionExpired => "session_expired",
            EventKind::Subscribed { .. } => "subscribed",
            EventKind::Unsubscribed { .. } => "unsubscribed",
            EventKind::Uplink(_) => "uplink",
        }
    }
}

impl Event {
    /// An event that happens now; `seq` from the home shard's [`SeqGen`].
    pub fn now(seq: u64, client_id: Arc<str>, kind: EventKind) -> Event {
        Event {
            time_ms: unix_micros() / 1000,
            seq,
            client_id,
            kind,
        }
    }

    /// The event as JSON, with the gateway's `node` name.
    pub fn to_json(&self, node: &str) -> Vec<u8> {
        // Serializing plain fields into a Vec cannot fail.
        serde_json::to_vec(&self.with_node(node)).unwrap_or_default()
    }

    /// A serializable view of the event with the node name.
    pub fn with_node<'a>(&'a self, node: &'a str) -> WithNode<'a> {
        WithNode { event: self, node }
    }
}

/// [`Event`] and the node that produced it, serialized as one flat JSON object.
pub struct WithNode<'a> {
    event: &'a Event,
    node: &'a str,
}

impl Serialize for WithNode<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", e.kind.name())?;
        m.serialize_entry("time_ms", &e.time_ms)?;
        m.serialize_entry("seq", &e.seq)?;
        m.serialize_entry("node", self.node)?;
        m.serialize_entry("client_id", &*e.client_id)?;
        match &e.kind {
            EventKind::Connected(c) => {
                m.serialize_entry("username", &c.username)?;
                m.serialize_entry("peer", &c.peer.to_string())?;
                m.serialize_entry("protocol_version", &protocol_level(c.version))?;
                m.serialize_entry("keep_alive", &c.keep_alive)?;
                m.serialize_entry("clean_start", &c.clean_start)?;
                m.serialize_entry("session_present", &c.session_present)?;
            }
            EventKind::Disconnected { reason } => m.serialize_entry("reason", reason.as_str())?,
            EventKind::SessionExpired => {}
            EventKind::Subscribed { filters } => {
                let list: Vec<_> = filters
                    .iter()
                    .map(|(f, qos)| FilterQos {
                        filter: f,
                        qos: *qos,
                    })
                    .collect();
                m.serialize_entry("filters", &list)?;
            }
            EventKind::Unsubscribed { filters } => {
                let list: Vec<&str> = filters.iter().map(|f| &**f).collect();
                m.serialize_entry("filters", &list)?;
            }
            EventKind::Uplink(msg) => serialize_uplink(&mut m, msg)?,
        }
        m.end()
    }
}

/// The protocol level of the CONNECT: 3 (MQTT 3.1), 4 (3.1.1) or 5.
fn protocol_level(v: Version) -> u8 {
    match v {
        Version::V31 => 3,
        Version::V311 => 4,
        Version::V5 => 5,
    }
}

#[derive(Serialize)]
struct FilterQos<'a> {
    filter: &'a str,
    qos: u8,
}

fn serialize_uplink<M: SerializeMap>(m: &mut M, msg: &Message) -> Result<(), M::Error> {
    m.serialize_entry("topic", &*msg.topic)?;
    match std::str::from_utf8(&msg.payload) {
        Ok(text) => {
            m.serialize_entry("payload", text)?;
            m.serialize_entry("payload_encoding", "utf8")?;
        }
        Err(_) => {
            m.serialize_entry("payload", &BASE64.encode(&msg.payload))?;
            m.serialize_entry("payload_encoding", "base64")?;
        }
    }
    m.serialize_entry("qos", &msg.qos)?;
    m.serialize_entry("retain", &msg.retain)?;
    let Some(p) = &msg.props else {
        return Ok(());
    };
    if let Some(ct) = &p.content_type {
        m.serialize_entry("content_type", ct)?;
    }
    if let Some(rt) = &p.response_topic {
        m.serialize_entry("response_topic", rt)?;
    }
    if let Some(cd) = &p.correlation_data {
        m.serialize_entry("correlation_data", &BASE64.encode(cd))?;
    }
    if !p.user_properties.is_empty() {
        m.serialize_entry("user_properties", &p.user_properties)?;
    }
    Ok(())
}

/// A JSON array of events, the body of one webhook POST.
pub fn batch_json(events: &[Arc<Event>], node: &str) -> Vec<u8> {
    let views: Vec<WithNode<'_>> = events.iter().map(|e| e.with_node(node)).collect();
    serde_json::to_vec(&views).unwrap_or_default()
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The sequence numbers of one shard's events: strictly increasing, and at least the wall
/// clock in microseconds (so a restarted gateway continues above where it stopped). One
/// per shard, owned by it; see the module documentation for why that orders each client.
#[derive(Debug, Default)]
pub struct SeqGen {
    last: u64,
}

impl SeqGen {
    pub fn next_seq(&mut self) -> u64 {
        self.last = (self.last + 1).max(unix_micros());
        self.last
    }
}
