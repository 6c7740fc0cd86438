//! The schema and its records: the four tables and the value encodings (little-endian,
//! length-prefixed, a format byte first) of sessions, subscriptions and messages.
//!
//! **Checksums.** redb checksums its commits, not what a read returns: a damaged page
//! can hand back a value with other bytes in it. So every value this gateway writes
//! (format 2) carries a CRC-32 of its key and body after the format byte, and a value whose
//! checksum fails is refused ([`RecordError`]) rather than delivered. Values of stores
//! written before (format 1, and 5-byte subscriptions without a format byte) are still
//! read, without a check, and get one when they are next written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::TableDefinition;

use crate::codec::{PublishProps, Version};
use crate::message::{Message, Origin};

pub(super) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
pub(super) const SUBS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("subs");
pub(super) const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
pub(super) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
/// (client id, message sequence) → packet id and whether PUBREL went out, of an outbound
/// QoS 2 message in flight.
pub(super) const QOS2_OUT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("qos2_out");
/// (client id, packet id) of an inbound QoS 2 message received (PUBREC sent), until its
/// PUBREL.
pub(super) const QOS2_IN: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("qos2_in");

/// Encoding version of the values written now: format byte, CRC-32, body.
pub(super) const FORMAT: u8 = 2;
/// The format of stores written before checksums: format byte, body.
const FORMAT_UNCHECKED: u8 = 1;
/// Bytes before a value's body: the format byte and the checksum.
const HEADER: usize = 5;

/// Why a stored value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordError {
    /// The CRC-32 of its key and body is not the one stored with it.
    Checksum,
    /// Its format byte is not one this gateway writes or reads.
    Format(u8),
    /// It passed its check (or has none) but does not decode.
    Undecodable,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Checksum => f.write_str("its checksum does not match"),
            RecordError::Format(b) => write!(f, "unknown record format {b}"),
            RecordError::Undecodable => f.write_str("it does not decode"),
        }
    }
}

/// The CRC-32 of a key (its parts separated by 0xFF, a byte UTF-8 never contains) and a
/// value's body.
fn checksum(key: &[&[u8]], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (i, part) in key.iter().enumerate() {
        if i > 0 {
            h.update(&[0xFF]);
        }
        h.update(part);
    }
    h.update(body);
    h.finalize()
}

/// Starts a value in `out` (cleared): the format byte and room for the checksum.
fn begin(out: &mut Vec<u8>) {
    out.clear();
    out.push(FORMAT);
    out.extend_from_slice(&[0; 4]);
}

/// Ends a value `begin` started: writes the checksum of `key` and the body.
fn seal(out: &mut [u8], key: &[&[u8]]) {
    let crc = checksum(key, &out[HEADER..]);
    out[1..HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The body of a stored value once its checksum holds (format 2), or the body of an
/// unchecked format 1 value.
fn body<'a>(b: &'a [u8], key: &[&[u8]]) -> Result<&'a [u8], RecordError> {
    match b.first() {
        Some(&FORMAT) if b.len() >= HEADER => {
            let stored = u32::from_le_bytes(b[1..HEADER].try_into().expect("4 bytes"));
            let body = &b[HEADER..];
            if checksum(key, body) == stored {
                Ok(body)
            } else {
                Err(RecordError::Checksum)
            }
        }
        Some(&FORMAT_UNCHECKED) => Ok(&b[1..]),
        Some(&FORMAT) | None => Err(RecordError::Undecodable),
        Some(&other) => Err(RecordError::Format(other)),
    }
}

// ---------------------------------------------------------------------------------------
// Value encodings: little-endian, length-prefixed, a format byte first.

pub(super) struct SessionRecord {
    pub(super) version: Version,
    pub(super) expiry_secs: u32,
    pub(super) offline_since_ms: u64,
}

pub(super) fn version_byte(v: Version) -> u8 {
    match v {
        Version::V31 => 3,
        Version::V311 => 4,
        Version::V5 => 5,
    }
}

/// A `sessions` value of `client_id`.
pub(super) fn encode_session(
    out: &mut Vec<u8>,
    client_id: &str,
    v: Version,
    expiry_secs: u32,
    offline_since_ms: u64,
) {
    begin(out);
    out.push(version_byte(v));
    out.extend_from_slice(&expiry_secs.to_le_bytes());
    out.extend_from_slice(&offline_since_ms.to_le_bytes());
    seal(out, &[client_id.as_bytes()]);
}

pub(super) fn decode_session(b: &[u8], client_id: &str) -> Result<SessionRecord, RecordError> {
    let b = body(b, &[client_id.as_bytes()])?;
    session_body(b).ok_or(RecordError::Undecodable)
}

fn session_body(b: &[u8]) -> Option<SessionRecord> {
    session_fields(&mut Reader(b))
}

fn session_fields(r: &mut Reader<'_>) -> Option<SessionRecord> {
    let version = match r.u8()? {
        3 => Version::V31,
        4 => Version::V311,
        5 => Version::V5,
        _ => return None,
    };
    Some(SessionRecord {
        version,
        expiry_secs: r.u32()?,
        offline_since_ms: r.u64()?,
    })
}

/// The key a fleet record's checksum covers besides the client id, so that a session
/// record (`encode_session`) never passes for one.
const FLEET_RECORD_KEY: &[u8] = b"fleet";

/// A session's whole record in the fleet (`mirror::FleetRecord`): the session record's
/// fields, its subscriptions (filter, options, identifier) and the inbound QoS 2 packet
/// ids awaiting PUBREL, under one checksum.
pub(super) fn encode_fleet_record(out: &mut Vec<u8>, r: &super::mirror::FleetRecord) {
    begin(out);
    out.push(version_byte(r.version));
    out.extend_from_slice(&r.expiry_secs.to_le_bytes());
    out.extend_from_slice(&r.offline_since_ms.to_le_bytes());
    out.extend_from_slice(&(r.subs.len() as u32).to_le_bytes());
    for (filter, options, id) in &r.subs {
        put_bytes(out, filter.as_bytes());
        out.push(*options);
        out.extend_from_slice(&id.to_le_bytes());
    }
    out.extend_from_slice(&(r.inbound_qos2.len() as u32).to_le_bytes());
    for pkid in &r.inbound_qos2 {
        out.extend_from_slice(&pkid.to_le_bytes());
    }
    seal(out, &[r.client_id.as_bytes(), FLEET_RECORD_KEY]);
}

pub(super) fn decode_fleet_record(
    b: &[u8],
    client_id: &str,
) -> Result<super::mirror::FleetRecord, RecordError> {
    let b = body(b, &[client_id.as_bytes(), FLEET_RECORD_KEY])?;
    let mut r = Reader(b);
    let mut decode = || {
        let SessionRecord {
            version,
            expiry_secs,
            offline_since_ms,
        } = session_fields(&mut r)?;
        let n = r.u32()? as usize;
        // Bounded by what is there: each subscription takes at least 9 bytes.
        let mut subs = Vec::with_capacity(n.min(r.0.len() / 9));
        for _ in 0..n {
            let filter = std::str::from_utf8(r.bytes()?).ok()?;
            subs.push((Arc::from(filter), r.u8()?, r.u32()?));
        }
        let n = r.u32()? as usize;
        let mut inbound_qos2 = Vec::with_capacity(n.min(r.0.len() / 2));
        for _ in 0..n {
            inbound_qos2.push(u16::from_le_bytes(r.take(2)?.try_into().ok()?));
        }
        r.0.is_empty().then_some(super::mirror::FleetRecord {
            client_id: Arc::from(client_id),
            version,
            expiry_secs,
            offline_since_ms,
            subs,
            inbound_qos2,
        })
    };
    decode().ok_or(RecordError::Undecodable)
}

/// A `qos2_out` value: the packet id and whether PUBREL went out.
pub(super) fn encode_qos2_out(
    out: &mut Vec<u8>,
    client_id: &str,
    seq: u64,
    pkid: u16,
    released: bool,
) {
    begin(out);
    out.extend_from_slice(&pkid.to_le_bytes());
    out.push(u8::from(released));
    seal(out, &[client_id.as_bytes(), &seq.to_le_bytes()]);
}

pub(super) fn decode_qos2_out(
    b: &[u8],
    client_id: &str,
    seq: u64,
) -> Result<(u16, bool), RecordError> {
    let b = body(b, &[client_id.as_bytes(), &seq.to_le_bytes()])?;
    match b {
        [lo, hi, released @ (0 | 1)] if (*lo, *hi) != (0, 0) => {
            Ok((u16::from_le_bytes([*lo, *hi]), *released == 1))
        }
        _ => Err(RecordError::Undecodable),
    }
}

/// A `qos2_in` value: nothing but the checksum of its key.
pub(super) fn encode_qos2_in(out: &mut Vec<u8>, client_id: &str, pkid: u16) {
    begin(out);
    seal(out, &[client_id.as_bytes(), &pkid.to_le_bytes()]);
}

pub(super) fn decode_qos2_in(b: &[u8], client_id: &str, pkid: u16) -> Result<(), RecordError> {
    match body(b, &[client_id.as_bytes(), &pkid.to_le_bytes()])? {
        [] if pkid != 0 => Ok(()),
        _ => Err(RecordError::Undecodable),
    }
}

/// Length of a subscription value written before checksums: options, identifier.
const SUB_UNCHECKED_LEN: usize = 5;

/// A `subs` value: options byte and subscription identifier.
pub(super) fn encode_sub(out: &mut Vec<u8>, client_id: &str, filter: &str, options: u8, id: u32) {
    begin(out);
    out.push(options);
    out.extend_from_slice(&id.to_le_bytes());
    seal(out, &[client_id.as_bytes(), filter.as_bytes()]);
}

/// Options and identifier of a `subs` value (the old unchecked 5-byte form included).
pub(super) fn decode_sub(
    b: &[u8],
    client_id: &str,
    filter: &str,
) -> Result<(u8, u32), RecordError> {
    let b = if b.len() == SUB_UNCHECKED_LEN {
        b
    } else {
        body(b, &[client_id.as_bytes(), filter.as_bytes()])?
    };
    let mut r = Reader(b);
    (|| Some((r.u8()?, r.u32()?)))().ok_or(RecordError::Undecodable)
}

/// A message stored under `key` (a `messages` row: client id and sequence, little-endian;
/// a retained message: its topic): qos, retain, absolute expiry (wall ms, 0 = none), topic, payload and the MQTT 5
/// properties that travel with it.
pub(super) fn encode_message(
    out: &mut Vec<u8>,
    key: &[&[u8]],
    m: &Message,
    qos: u8,
    retain: bool,
    now: Instant,
    now_wall: u64,
) {
    begin(out);
    out.push(qos);
    out.push(u8::from(retain));
    let expires = m.expires.map_or(0, |e| {
        let left = e.saturating_duration_since(now).as_millis() as u64;
        (now_wall + left).max(1)
    });
    out.extend_from_slice(&expires.to_le_bytes());
    put_bytes(out, m.topic.as_bytes());
    put_bytes(out, &m.payload);
    match m.props.as_deref() {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            out.push(
                p.payload_format_indicator
                    .map_or(0, |v| v.saturating_add(1)),
            );
            put_opt(out, p.content_type.as_deref().map(str::as_bytes));
            put_opt(out, p.response_topic.as_deref().map(str::as_bytes));
            put_opt(out, p.correlation_data.as_deref());
            out.extend_from_slice(&(p.user_properties.len() as u32).to_le_bytes());
            for (k, v) in &p.user_properties {
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
        }
    }
    seal(out, key);
}

/// The message stored under `key` and the QoS it is delivered at.
pub(super) fn decode_message(
    b: &[u8],
    key: &[&[u8]],
    now: Instant,
    now_wall: u64,
) -> Result<(Message, u8), RecordError> {
    let b = body(b, key)?;
    message_body(b, now, now_wall).ok_or(RecordError::Undecodable)
}

fn message_body(b: &[u8], now: Instant, now_wall: u64) -> Option<(Message, u8)> {
    let mut r = Reader(b);
    let qos = r.u8()?;
    let retain = r.u8()? != 0;
    let expires_wall = r.u64()?;
    let topic: Arc<str> = Arc::from(std::str::from_utf8(r.bytes()?).ok()?);
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let props = match r.u8()? {
        0 => None,
        _ => {
            let pfi = r.u8()?;
            let string = |b: Option<&[u8]>| -> Option<Option<String>> {
                match b {
                    None => Some(None),
                    Some(b) => Some(Some(std::str::from_utf8(b).ok()?.to_string())),
                }
            };
            let content_type = string(r.opt()?)?;
            let response_topic = string(r.opt()?)?;
            let correlation_data = r.opt()?.map(Bytes::copy_from_slice);
            let n = r.u32()? as usize;
            let mut user_properties = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let k = std::str::from_utf8(r.bytes()?).ok()?.to_string();
                let v = std::str::from_utf8(r.bytes()?).ok()?.to_string();
                user_properties.push((k, v));
            }
            Some(Box::new(PublishProps {
                payload_format_indicator: pfi.checked_sub(1),
                message_expiry: None,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            }))
        }
    };
    let mut m = Message::new(topic, payload, qos, retain, Origin::Gateway);
    m.props = props;
    if expires_wall != 0 {
        let left = Duration::from_millis(expires_wall.saturating_sub(now_wall));
        m.expires = Some(now + left);
    }
    Some((m, qos))
}

pub(super) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

pub(super) fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(self.bytes()?)),
        }
    }
}
