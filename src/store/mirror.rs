//! A second home for what the writer commits: with the fleet on, every commit group's
//! session changes are handed to a [`Mirror`] (`crate::cluster::sessions` writes them to
//! JetStream) as the writer commits them, and after the commit so are the push answers
//! that promised `queued`, which the mirror sends once the changes are in the fleet as
//! well as on this disk.
//!
//! Also the portable encodings of a session record, a subscription and a message: the
//! store's own record formats (checksummed), so that another node reads back exactly what
//! this one would.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::codec::Version;
use crate::message::Message;

use super::handle::{DeferredReply, Op};
use super::open::StoredSession;
use super::records::{
    decode_fleet_record, decode_message, decode_qos2_in, decode_qos2_out, decode_session,
    decode_sub, encode_fleet_record, encode_message, encode_qos2_in, encode_qos2_out,
    encode_session, encode_sub, put_bytes,
};

/// Where the writer hands each commit group's changes, as it commits them. Called on the
/// writer thread; may block it (that is the backpressure the shards see).
pub trait Mirror: Send + Sync {
    /// The changes of one commit group, in order, before the local commit (so that the
    /// fleet and the disk take them at the same time).
    fn changes(&self, ops: &[&Op]);
    /// The answers that wait for the group just committed (with `durability =
    /// "immediate"`); sent once its changes are in the fleet too.
    fn answers(&self, replies: Vec<DeferredReply>);
}

/// The writer's mirror, set once the fleet has joined (after the store opened).
pub type MirrorSlot = Arc<OnceLock<Box<dyn Mirror>>>;

/// A session record of `client_id`.
pub fn session_bytes(client_id: &str, v: Version, expiry_secs: u32, offline_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    encode_session(&mut out, client_id, v, expiry_secs, offline_ms);
    out
}

/// A session record of `client_id`: version, expiry, offline since (wall ms, 0 = online).
pub fn parse_session(b: &[u8], client_id: &str) -> Option<(Version, u32, u64)> {
    let r = decode_session(b, client_id).ok()?;
    Some((r.version, r.expiry_secs, r.offline_since_ms))
}

/// A session as the fleet keeps it, in one key: its record, its subscriptions (filter,
/// options, identifier) and the inbound QoS 2 packet ids awaiting PUBREL. One key, so
/// that reading a session back is one direct get, not a listing of subjects (which
/// nats-server 2.9 answers by scanning the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRecord {
    pub client_id: Arc<str>,
    pub version: Version,
    pub expiry_secs: u32,
    /// Wall clock ms at which it went offline; 0 while online.
    pub offline_since_ms: u64,
    pub subs: Vec<(Arc<str>, u8, u32)>,
    pub inbound_qos2: Vec<u16>,
}

/// A fleet record, checksummed with its client id.
pub fn fleet_record_bytes(r: &FleetRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + r.subs.iter().map(|s| s.0.len() + 9).sum::<usize>());
    encode_fleet_record(&mut out, r);
    out
}

/// A fleet record of `client_id` written by [`fleet_record_bytes`].
pub fn parse_fleet_record(b: &[u8], client_id: &str) -> Option<FleetRecord> {
    decode_fleet_record(b, client_id).ok()
}

/// A subscription of `client_id`: the filter (length-prefixed), then its record.
pub fn sub_bytes(client_id: &str, filter: &str, options: u8, sub_id: u32) -> Vec<u8> {
    let mut record = Vec::with_capacity(16);
    encode_sub(&mut record, client_id, filter, options, sub_id);
    let mut out = Vec::with_capacity(filter.len() + record.len() + 4);
    put_bytes(&mut out, filter.as_bytes());
    out.extend_from_slice(&record);
    out
}

/// A subscription of `client_id` written by [`sub_bytes`]: filter, options, identifier.
pub fn parse_sub(b: &[u8], client_id: &str) -> Option<(Arc<str>, u8, u32)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let filter = std::str::from_utf8(b.get(4..4 + len)?).ok()?;
    let (options, id) = decode_sub(b.get(4 + len..)?, client_id, filter).ok()?;
    Some((Arc::from(filter), options, id))
}

/// A queued message of `client_id`.
pub fn message_bytes(client_id: &str, m: &Message, qos: u8, retain: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.topic.len() + m.payload.len() + 32);
    let now_wall = super::open::now_ms();
    encode_message(
        &mut out,
        &[client_id.as_bytes()],
        m,
        qos,
        retain,
        Instant::now(),
        now_wall,
    );
    out
}

/// A queued message of `client_id` written by [`message_bytes`], and its QoS.
pub fn parse_message(b: &[u8], client_id: &str) -> Option<(Message, u8)> {
    let now_wall = super::open::now_ms();
    decode_message(b, &[client_id.as_bytes()], Instant::now(), now_wall).ok()
}

/// The QoS 2 state of `client_id`'s message kept under `key` (in the fleet: its stream
/// sequence): its packet id and whether PUBREL went out.
pub fn qos2_out_bytes(client_id: &str, key: u64, pkid: u16, released: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_qos2_out(&mut out, client_id, key, pkid, released);
    out
}

/// A value written by [`qos2_out_bytes`] for the same client id and key.
pub fn parse_qos2_out(b: &[u8], client_id: &str, key: u64) -> Option<(u16, bool)> {
    decode_qos2_out(b, client_id, key).ok()
}

/// The ops that store session `s`'s QoS 2 state: its messages in flight under their
/// sequences, and its inbound packet ids awaiting PUBREL.
pub fn qos2_ops(s: &StoredSession) -> Vec<Op> {
    let client_id = &s.client_id;
    let out = s.messages.iter().filter_map(|m| {
        let (pkid, released) = m.inflight?;
        Some(Op::Qos2Out {
            client_id: client_id.clone(),
            seq: m.seq,
            pkid,
            released,
        })
    });
    let inbound = s.inbound_qos2.iter().map(|&pkid| Op::Qos2In {
        client_id: client_id.clone(),
        pkid,
    });
    out.chain(inbound).collect()
}

/// Inbound QoS 2 packet id `pkid` of `client_id` is taken (PUBREC went out).
pub fn qos2_in_bytes(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    encode_qos2_in(&mut out, client_id, pkid);
    out
}

/// Whether `b` says inbound packet id `pkid` of `client_id` is taken.
pub fn parse_qos2_in(b: &[u8], client_id: &str, pkid: u16) -> bool {
    decode_qos2_in(b, client_id, pkid).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::message::Origin;

    #[test]
    fn records_read_back_as_written_and_only_for_their_client() {
        let b = session_bytes("dev-1", Version::V5, 3600, 1234);
        assert_eq!(parse_session(&b, "dev-1"), Some((Version::V5, 3600, 1234)));
        assert_eq!(
            parse_session(&b, "dev-2"),
            None,
            "checksummed with its client id"
        );

        let b = sub_bytes("dev-1", "a/+/#", 1, 7);
        let (filter, options, id) = parse_sub(&b, "dev-1").expect("sub");
        assert_eq!((&*filter, options, id), ("a/+/#", 1, 7));
        assert!(parse_sub(&b, "dev-2").is_none());
        assert!(parse_sub(&b[..3], "dev-1").is_none());

        let m = Message::new(
            Arc::from("t/x"),
            Bytes::from_static(b"hi"),
            1,
            false,
            Origin::Gateway,
        );
        let b = message_bytes("dev-1", &m, 1, false);
        let (back, qos) = parse_message(&b, "dev-1").expect("message");
        assert_eq!(
            (&*back.topic, &back.payload[..], qos),
            ("t/x", &b"hi"[..], 1)
        );
        assert!(parse_message(&b, "dev-2").is_none());

        let b = qos2_out_bytes("dev-1", 42, 7, true);
        assert_eq!(parse_qos2_out(&b, "dev-1", 42), Some((7, true)));
        assert_eq!(parse_qos2_out(&b, "dev-1", 43), None, "sealed with its key");
        assert!(parse_qos2_in(&qos2_in_bytes("dev-1", 9), "dev-1", 9));
        assert!(!parse_qos2_in(&qos2_in_bytes("dev-1", 9), "dev-1", 8));
        assert!(!parse_qos2_in(b"", "dev-1", 9), "an empty value frees it");
    }

    #[test]
    fn a_fleet_record_reads_back_whole_and_only_as_itself() {
        let r = FleetRecord {
            client_id: Arc::from("dev-1"),
            version: Version::V5,
            expiry_secs: 3600,
            offline_since_ms: 1234,
            subs: vec![(Arc::from("a/+/#"), 1, 7), (Arc::from("$share/g/b"), 2, 0)],
            inbound_qos2: vec![3, 65535],
        };
        let b = fleet_record_bytes(&r);
        assert_eq!(parse_fleet_record(&b, "dev-1"), Some(r.clone()));
        assert_eq!(
            parse_fleet_record(&b, "dev-2"),
            None,
            "sealed with its client id"
        );
        for cut in [0, 5, b.len() - 1] {
            assert_eq!(parse_fleet_record(&b[..cut], "dev-1"), None, "cut at {cut}");
        }
        // A session record of the same client id is not a fleet record.
        let plain = session_bytes("dev-1", Version::V5, 3600, 1234);
        assert_eq!(parse_fleet_record(&plain, "dev-1"), None);
        let empty = FleetRecord {
            subs: Vec::new(),
            inbound_qos2: Vec::new(),
            ..r
        };
        let b = fleet_record_bytes(&empty);
        assert_eq!(parse_fleet_record(&b, "dev-1"), Some(empty));
    }
}
