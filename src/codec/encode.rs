//! Encoding: server-to-client packets, written by hand straight into a `Vec<u8>`.
//!
//! No allocation beyond the `Vec` growing and no owned strings: the shard encodes a
//! fanned-out PUBLISH once and copies its bytes to every subscriber. Each packet with a
//! variable part is written in two passes over the same code, once into a byte counter
//! ([`Count`]) to learn the lengths the header needs and once into the `Vec`, so the
//! lengths cannot drift from the bytes.
//!
//! Preconditions the caller keeps (MQTT's own limits; nothing here panics if broken):
//! strings and binary fields are at most 65,535 bytes (longer ones are cut at a char
//! boundary so the packet stays well-formed), and a packet fits a Remaining Length of
//! [`MAX_REMAINING_LENGTH`](super::MAX_REMAINING_LENGTH) (check with [`publish_len`]).

use super::{reason, PublishProps, Version};

/// CONNACK properties (MQTT 5 only). Values equal to the spec default are not written:
/// `receive_maximum` 65535, `max_packet_size` `u32::MAX`, `topic_alias_max` 0, and the
/// four "available" flags true.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnAckProps<'a> {
    pub assigned_client_id: Option<&'a str>,
    pub server_keep_alive: Option<u16>,
    pub session_expiry: Option<u32>,
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub topic_alias_max: u16,
    /// 0 or 1; `Some(2)` is not written (the spec forbids it: absent means 2).
    pub max_qos: Option<u8>,
    pub retain_available: bool,
    pub wildcard_available: bool,
    pub subscription_ids_available: bool,
    pub shared_subscriptions_available: bool,
    pub reason_string: Option<&'a str>,
    pub server_reference: Option<&'a str>,
}

impl Default for ConnAckProps<'_> {
    fn default() -> Self {
        ConnAckProps {
            assigned_client_id: None,
            server_keep_alive: None,
            session_expiry: None,
            receive_maximum: u16::MAX,
            max_packet_size: u32::MAX,
            topic_alias_max: 0,
            max_qos: None,
            retain_available: true,
            wildcard_available: true,
            subscription_ids_available: true,
            shared_subscriptions_available: true,
            reason_string: None,
            server_reference: None,
        }
    }
}

/// A PUBLISH to encode, borrowing everything.
#[derive(Clone, Copy, Debug)]
pub struct OutPublish<'a> {
    /// Written only when `qos` > 0 ([MQTT-3.3.1-2]).
    pub dup: bool,
    /// 0..=2 (a larger value is sent as 2).
    pub qos: u8,
    pub retain: bool,
    pub topic: &'a str,
    /// Written when `qos` > 0; may be a placeholder patched later (see [`encode_publish`]).
    pub pkid: u16,
    pub payload: &'a [u8],
    /// MQTT 5 only, like the three fields after it.
    pub props: Option<&'a PublishProps>,
    /// Overrides `props.message_expiry`: the lifetime left when it is sent.
    pub message_expiry: Option<u32>,
    /// 0 and values above 268,435,455 are skipped (not valid identifiers).
    pub subscription_ids: &'a [u32],
    /// `Some(0)` is skipped (not a valid alias).
    pub topic_alias: Option<u16>,
}

/// Largest Variable Byte Integer, also the largest subscription identifier.
const MAX_VARINT: usize = 268_435_455;

/// Where encoded bytes go: the output `Vec`, or a [`Count`] of how many there would be.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A sink that only counts bytes.
struct Count(usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

fn byte(w: &mut impl Sink, v: u8) {
    w.put(&[v]);
}

fn two(w: &mut impl Sink, v: u16) {
    w.put(&v.to_be_bytes());
}

fn four(w: &mut impl Sink, v: u32) {
    w.put(&v.to_be_bytes());
}

/// A Variable Byte Integer; never more than 4 bytes.
fn varint(w: &mut impl Sink, mut n: usize) {
    let mut buf = [0u8; 4];
    let mut len = 0;
    while len < 4 {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 && len < 3 {
            b |= 0x80;
        }
        buf[len] = b;
        len += 1;
        if n == 0 {
            break;
        }
    }
    w.put(&buf[..len]);
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A string cut to 65,535 bytes at a char boundary, so its length fits its prefix.
fn clamp_str(s: &str) -> &str {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn string(w: &mut impl Sink, s: &str) {
    let s = clamp_str(s);
    two(w, s.len() as u16);
    w.put(s.as_bytes());
}

fn binary(w: &mut impl Sink, b: &[u8]) {
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    two(w, b.len() as u16);
    w.put(b);
}

/// CONNACK. `code` is the 3.1/3.1.1 return code (0..=5) or the MQTT 5 reason code;
/// properties are written only for MQTT 5. Session Present is sent only with success
/// ([MQTT-3.2.2-4], [MQTT-3.2.2-6]) and never in 3.1, which has no such flag.
pub fn encode_connack(
    out: &mut Vec<u8>,
    version: Version,
    session_present: bool,
    code: u8,
    props: &ConnAckProps,
) {
    let present = u8::from(session_present && code == 0 && version != Version::V31);
    if version != Version::V5 {
        out.extend_from_slice(&[0x20, 0x02, present, code]);
        return;
    }
    let mut count = Count(0);
    connack_props(&mut count, props);
    let props_len = count.0;
    out.reserve(5 + 2 + 4 + props_len);
    byte(out, 0x20);
    varint(out, 2 + varint_len(props_len) + props_len);
    byte(out, present);
    byte(out, code);
    varint(out, props_len);
    connack_props(out, props);
}

fn connack_props(w: &mut impl Sink, p: &ConnAckProps) {
    if let Some(v) = p.session_expiry {
        byte(w, 0x11);
        four(w, v);
    }
    if p.receive_maximum != u16::MAX {
        byte(w, 0x21);
        two(w, p.receive_maximum);
    }
    if let Some(q) = p.max_qos.filter(|&q| q < 2) {
        byte(w, 0x24);
        byte(w, q);
    }
    if !p.retain_available {
        byte(w, 0x25);
        byte(w, 0);
    }
    if p.max_packet_size != u32::MAX {
        byte(w, 0x27);
        four(w, p.max_packet_size);
    }
    if let Some(id) = p.assigned_client_id {
        byte(w, 0x12);
        string(w, id);
    }
    if p.topic_alias_max != 0 {
        byte(w, 0x22);
        two(w, p.topic_alias_max);
    }
    if let Some(s) = p.reason_string {
        byte(w, 0x1F);
        string(w, s);
    }
    if !p.wildcard_available {
        byte(w, 0x28);
        byte(w, 0);
    }
    if !p.subscription_ids_available {
        byte(w, 0x29);
        byte(w, 0);
    }
    if !p.shared_subscriptions_available {
        byte(w, 0x2A);
        byte(w, 0);
    }
    if let Some(v) = p.server_keep_alive {
        byte(w, 0x13);
        two(w, v);
    }
    if let Some(s) = p.server_reference {
        byte(w, 0x1C);
        string(w, s);
    }
}

/// PUBLISH. Returns, when QoS > 0, the offset from the start of this packet in `out` of
/// its 2-byte packet id, so the shard can encode once and patch the id per subscriber:
/// `out[start + at..start + at + 2].copy_from_slice(&pkid.to_be_bytes())`.
pub fn encode_publish(out: &mut Vec<u8>, version: Version, p: &OutPublish) -> Option<usize> {
    let qos = p.qos.min(2);
    let props_len = publish_props_len(version, p);
    let remaining = publish_remaining(p, props_len);
    let start = out.len();
    out.reserve(5 + remaining);
    byte(
        out,
        0x30 | (u8::from(p.dup && qos > 0) << 3) | (qos << 1) | u8::from(p.retain),
    );
    varint(out, remaining);
    string(out, p.topic);
    let pkid_at = (qos > 0).then(|| {
        let at = out.len() - start;
        two(out, p.pkid);
        at
    });
    if let Some(len) = props_len {
        varint(out, len);
        publish_props(out, p);
    }
    out.extend_from_slice(p.payload);
    pkid_at
}

/// Size of the PUBLISH [`encode_publish`] would write, header included (what MQTT 5's
/// Maximum Packet Size limits).
pub fn publish_len(version: Version, p: &OutPublish) -> usize {
    let remaining = publish_remaining(p, publish_props_len(version, p));
    1 + varint_len(remaining) + remaining
}

/// Length of the property section (without its own length), `None` before MQTT 5.
fn publish_props_len(version: Version, p: &OutPublish) -> Option<usize> {
    (version == Version::V5).then(|| {
        let mut count = Count(0);
        publish_props(&mut count, p);
        count.0
    })
}

fn publish_remaining(p: &OutPublish, props_len: Option<usize>) -> usize {
    let pkid = if p.qos > 0 { 2 } else { 0 };
    let props = props_len.map_or(0, |n| varint_len(n) + n);
    2 + clamp_str(p.topic).len() + pkid + props + p.payload.len()
}

fn publish_props(w: &mut impl Sink, p: &OutPublish) {
    let props = p.props;
    if let Some(v) = props.and_then(|pp| pp.payload_format_indicator) {
        byte(w, 0x01);
        byte(w, v);
    }
    if let Some(v) = p.message_expiry.or(props.and_then(|pp| pp.message_expiry)) {
        byte(w, 0x02);
        four(w, v);
    }
    if let Some(pp) = props {
        if let Some(s) = &pp.content_type {
            byte(w, 0x03);
            string(w, s);
        }
        if let Some(s) = &pp.response_topic {
            byte(w, 0x08);
            string(w, s);
        }
        if let Some(b) = &pp.correlation_data {
            byte(w, 0x09);
            binary(w, b);
        }
        for (k, v) in &pp.user_properties {
            byte(w, 0x26);
            string(w, k);
            string(w, v);
        }
    }
    for &id in p.subscription_ids {
        if (1..=MAX_VARINT).contains(&(id as usize)) {
            byte(w, 0x0B);
            varint(w, id as usize);
        }
    }
    if let Some(alias) = p.topic_alias.filter(|&a| a != 0) {
        byte(w, 0x23);
        two(w, alias);
    }
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, and in MQTT 5 the reason code unless it
/// is 0 (with no properties both may be left out, spec 3.4.2.1). 3.1.1 has no reason.
fn encode_ack(out: &mut Vec<u8>, byte1: u8, version: Version, pkid: u16, reason: u8) {
    let [hi, lo] = pkid.to_be_bytes();
    if version == Version::V5 && reason != reason::SUCCESS {
        out.extend_from_slice(&[byte1, 3, hi, lo, reason]);
    } else {
        out.extend_from_slice(&[byte1, 2, hi, lo]);
    }
}

pub fn encode_puback(out: &mut Vec<u8>, version: Version, pkid: u16, reason: u8) {
    encode_ack(out, 0x40, version, pkid, reason);
}

pub fn encode_pubrec(out: &mut Vec<u8>, version: Version, pkid: u16, reason: u8) {
    encode_ack(out, 0x50, version, pkid, reason);
}

pub fn encode_pubrel(out: &mut Vec<u8>, version: Version, pkid: u16, reason: u8) {
    encode_ack(out, 0x62, version, pkid, reason);
}

pub fn encode_pubcomp(out: &mut Vec<u8>, version: Version, pkid: u16, reason: u8) {
    encode_ack(out, 0x70, version, pkid, reason);
}

/// SUBACK with one code per filter. The MQTT 5 codes may be passed for 3.1/3.1.1 too:
/// there anything but granted QoS 0..=2 becomes the one failure code 0x80.
pub fn encode_suback(out: &mut Vec<u8>, version: Version, pkid: u16, codes: &[u8]) {
    let v5 = version == Version::V5;
    let remaining = 2 + usize::from(v5) + codes.len();
    out.reserve(5 + remaining);
    byte(out, 0x90);
    varint(out, remaining);
    two(out, pkid);
    if v5 {
        byte(out, 0); // no properties
        out.extend_from_slice(codes);
    } else {
        out.extend(
            codes
                .iter()
                .map(|&c| if c <= 2 { c } else { reason::V3_SUBACK_FAILURE }),
        );
    }
}

/// UNSUBACK. 3.1/3.1.1 has no codes: only the packet id is written.
pub fn encode_unsuback(out: &mut Vec<u8>, version: Version, pkid: u16, codes: &[u8]) {
    if version != Version::V5 {
        let [hi, lo] = pkid.to_be_bytes();
        out.extend_from_slice(&[0xB0, 2, hi, lo]);
        return;
    }
    let remaining = 3 + codes.len();
    out.reserve(5 + remaining);
    byte(out, 0xB0);
    varint(out, remaining);
    two(out, pkid);
    byte(out, 0); // no properties
    out.extend_from_slice(codes);
}

pub fn encode_pingresp(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xD0, 0]);
}

/// DISCONNECT from the server, MQTT 5 only (3.1.1 has none; the caller checks). A
/// normal disconnection without a reason string is the 2-byte form; otherwise the
/// property length is always written, even when 0: the spec allows leaving it out, but
/// some decoders (mqttbytes 0.6 among them) refuse that form.
pub fn encode_disconnect(out: &mut Vec<u8>, reason: u8, reason_string: Option<&str>) {
    let Some(text) = reason_string else {
        if reason == reason::NORMAL_DISCONNECTION {
            out.extend_from_slice(&[0xE0, 0]);
        } else {
            out.extend_from_slice(&[0xE0, 2, reason, 0]);
        }
        return;
    };
    let text = clamp_str(text);
    let props_len = 1 + 2 + text.len();
    let remaining = 1 + varint_len(props_len) + props_len;
    out.reserve(5 + remaining);
    byte(out, 0xE0);
    varint(out, remaining);
    byte(out, reason);
    varint(out, props_len);
    byte(out, 0x1F);
    string(out, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, frame_len, MAX_REMAINING_LENGTH};
    use bytes::{Bytes, BytesMut};
    use mqttbytes::{v4, v5, QoS};

    /// The mqttbytes fixed header of a whole encoded frame.
    fn header(frame: &[u8]) -> mqttbytes::FixedHeader {
        mqttbytes::check(frame.iter(), usize::MAX).expect("a complete frame")
    }

    /// Asserts `frame` is exactly one frame and returns it as `Bytes` for mqttbytes.
    fn whole(frame: &[u8]) -> Bytes {
        assert_eq!(frame_len(frame, usize::MAX), Ok(Some(frame.len())));
        Bytes::copy_from_slice(frame)
    }

    fn out_publish<'a>(topic: &'a str, payload: &'a [u8], qos: u8) -> OutPublish<'a> {
        OutPublish {
            dup: false,
            qos,
            retain: false,
            topic,
            pkid: if qos > 0 { 1 } else { 0 },
            payload,
            props: None,
            message_expiry: None,
            subscription_ids: &[],
            topic_alias: None,
        }
    }

    #[test]
    fn connack_v311_round_trip() {
        for (present, code) in [(true, 0), (false, 0), (false, 5)] {
            let mut out = Vec::new();
            encode_connack(
                &mut out,
                Version::V311,
                present,
                code,
                &ConnAckProps::default(),
            );
            let ack = v4::ConnAck::read(header(&out), whole(&out)).unwrap();
            assert_eq!(ack.session_present, present);
            assert_eq!(ack.code as u8, code);
        }
    }

    #[test]
    fn connack_session_present_only_with_success_and_not_in_v31() {
        let mut out = Vec::new();
        encode_connack(&mut out, Version::V311, true, 2, &ConnAckProps::default());
        assert_eq!(out, [0x20, 2, 0, 2]);
        out.clear();
        encode_connack(&mut out, Version::V31, true, 0, &ConnAckProps::default());
        assert_eq!(out, [0x20, 2, 0, 0]);
        out.clear();
        encode_connack(&mut out, Version::V5, true, 0x87, &ConnAckProps::default());
        assert_eq!(out, [0x20, 3, 0, 0x87, 0]);
    }

    #[test]
    fn connack_v5_default_props_are_empty() {
        let mut out = Vec::new();
        encode_connack(&mut out, Version::V5, true, 0, &ConnAckProps::default());
        assert_eq!(out, [0x20, 3, 1, 0, 0]);
        let ack = v5::ConnAck::read(header(&out), whole(&out)).unwrap();
        assert!(ack.session_present);
        assert_eq!(ack.properties, None);
    }

    #[test]
    fn connack_v5_round_trip_with_every_property() {
        let props = ConnAckProps {
            assigned_client_id: Some("auto-1"),
            server_keep_alive: Some(180),
            session_expiry: Some(3600),
            receive_maximum: 32,
            max_packet_size: 65536,
            topic_alias_max: 10,
            max_qos: Some(1),
            retain_available: false,
            wildcard_available: false,
            subscription_ids_available: false,
            shared_subscriptions_available: false,
            reason_string: Some("welcome"),
            server_reference: Some("other:1883"),
        };
        let mut out = vec![0xAA]; // something already in the buffer
        encode_connack(&mut out, Version::V5, false, 0, &props);
        let frame = &out[1..];
        let ack = v5::ConnAck::read(header(frame), whole(frame)).unwrap();
        assert!(!ack.session_present);
        assert_eq!(ack.code as u8, 0);
        let p = ack.properties.unwrap();
        assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-1"));
        assert_eq!(p.server_keep_alive, Some(180));
        assert_eq!(p.session_expiry_interval, Some(3600));
        assert_eq!(p.receive_max, Some(32));
        assert_eq!(p.max_packet_size, Some(65536));
        assert_eq!(p.topic_alias_max, Some(10));
        assert_eq!(p.max_qos, Some(1));
        assert_eq!(p.retain_available, Some(0));
        assert_eq!(p.wildcard_subscription_available, Some(0));
        assert_eq!(p.subscription_identifiers_available, Some(0));
        assert_eq!(p.shared_subscription_available, Some(0));
        assert_eq!(p.reason_string.as_deref(), Some("welcome"));
        assert_eq!(p.server_reference.as_deref(), Some("other:1883"));
    }

    #[test]
    fn connack_v5_max_qos_2_is_not_sent() {
        let props = ConnAckProps {
            max_qos: Some(2),
            ..ConnAckProps::default()
        };
        let mut out = Vec::new();
        encode_connack(&mut out, Version::V5, false, 0, &props);
        assert_eq!(out, [0x20, 3, 0, 0, 0]);
    }

    #[test]
    fn publish_v311_round_trip() {
        for qos in 0..=2u8 {
            let p = OutPublish {
                retain: true,
                dup: true,
                pkid: 0x1234,
                ..out_publish("a/b", b"hello", qos)
            };
            let mut out = Vec::new();
            let at = encode_publish(&mut out, Version::V311, &p);
            assert_eq!(out.len(), publish_len(Version::V311, &p));
            let got = v4::Publish::read(header(&out), whole(&out)).unwrap();
            assert_eq!(got.topic, "a/b");
            assert_eq!(&got.payload[..], b"hello");
            assert_eq!(got.qos as u8, qos);
            assert!(got.retain);
            // DUP only with QoS > 0.
            assert_eq!(got.dup, qos > 0);
            assert_eq!(at.is_some(), qos > 0);
            if qos > 0 {
                assert_eq!(got.pkid, 0x1234);
            }
        }
    }

    #[test]
    fn publish_pkid_offset_patches_the_id() {
        let p = out_publish("t/x", b"payload", 1);
        for v in [Version::V311, Version::V5] {
            let mut out = vec![1, 2, 3];
            let start = out.len();
            let at = encode_publish(&mut out, v, &p).unwrap();
            out[start + at..start + at + 2].copy_from_slice(&0xBEEFu16.to_be_bytes());
            let Ok(crate::codec::Packet::Publish(got)) = decode(&out[start..], v) else {
                panic!("patched frame does not decode")
            };
            assert_eq!(got.pkid, 0xBEEF);
            assert_eq!(&got.payload[..], b"payload");
        }
    }

    #[test]
    fn publish_v5_round_trip_with_props() {
        let props = PublishProps {
            payload_format_indicator: Some(1),
            message_expiry: Some(600),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/1".into()),
            correlation_data: Some(Bytes::from_static(&[0, 1, 2])),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        };
        let p = OutPublish {
            props: Some(&props),
            message_expiry: Some(42),
            topic_alias: Some(3),
            ..out_publish("dev/1", b"{}", 1)
        };
        let mut out = Vec::new();
        encode_publish(&mut out, Version::V5, &p);
        assert_eq!(out.len(), publish_len(Version::V5, &p));
        let got = v5::Publish::read(header(&out), whole(&out)).unwrap();
        assert_eq!(
            (got.topic.as_str(), &got.payload[..], got.pkid),
            ("dev/1", &b"{}"[..], 1)
        );
        let pp = got.properties.unwrap();
        assert_eq!(pp.payload_format_indicator, Some(1));
        // The remaining lifetime replaces the original expiry.
        assert_eq!(pp.message_expiry_interval, Some(42));
        assert_eq!(pp.content_type.as_deref(), Some("application/json"));
        assert_eq!(pp.response_topic.as_deref(), Some("reply/1"));
        assert_eq!(pp.correlation_data.as_deref(), Some(&[0u8, 1, 2][..]));
        assert_eq!(pp.user_properties, props.user_properties);
        assert_eq!(pp.topic_alias, Some(3));
        // Without the override the stored expiry is sent.
        let p = OutPublish {
            message_expiry: None,
            ..p
        };
        out.clear();
        encode_publish(&mut out, Version::V5, &p);
        let got = v5::Publish::read(header(&out), whole(&out)).unwrap();
        assert_eq!(got.properties.unwrap().message_expiry_interval, Some(600));
    }

    /// Checked byte by byte: mqttbytes 0.6 miscounts Subscription Identifiers when it
    /// reads them (it counts each identifier byte twice and stops early).
    #[test]
    fn publish_v5_subscription_ids() {
        let p = OutPublish {
            subscription_ids: &[1, 300, 0, 2_000_000, 300_000_000],
            ..out_publish("t", b"x", 0)
        };
        let mut out = Vec::new();
        encode_publish(&mut out, Version::V5, &p);
        assert_eq!(out.len(), publish_len(Version::V5, &p));
        // 0 and values above 268,435,455 are not identifiers: skipped.
        let props = [0x0B, 1, 0x0B, 0xAC, 0x02, 0x0B, 0x80, 0x89, 0x7A];
        let mut want = vec![
            0x30,
            (3 + 1 + props.len() + 1) as u8,
            0,
            1,
            b't',
            props.len() as u8,
        ];
        want.extend_from_slice(&props);
        want.push(b'x');
        assert_eq!(out, want);
    }

    #[test]
    fn publish_v5_without_props_has_a_zero_property_length() {
        let p = out_publish("t", b"x", 0);
        let mut out = Vec::new();
        encode_publish(&mut out, Version::V5, &p);
        assert_eq!(out, [0x30, 5, 0, 1, b't', 0, b'x']);
        let got = v5::Publish::read(header(&out), whole(&out)).unwrap();
        assert_eq!(got.properties, None);
        // The props of 3.1.1 subscribers are never written.
        let props = PublishProps {
            message_expiry: Some(1),
            ..PublishProps::default()
        };
        let p = OutPublish {
            props: Some(&props),
            subscription_ids: &[5],
            ..p
        };
        out.clear();
        encode_publish(&mut out, Version::V311, &p);
        assert_eq!(out, [0x30, 4, 0, 1, b't', b'x']);
    }

    #[test]
    fn publish_len_across_remaining_length_sizes() {
        for size in [0, 100, 121, 122, 200, 16_380, 16_400, 2_100_000] {
            let payload = vec![7u8; size];
            for v in [Version::V311, Version::V5] {
                let p = out_publish("topic", &payload, 2);
                let mut out = Vec::new();
                encode_publish(&mut out, v, &p);
                assert_eq!(out.len(), publish_len(v, &p), "size {size} {v:?}");
                assert_eq!(frame_len(&out, usize::MAX), Ok(Some(out.len())));
            }
        }
    }

    #[test]
    fn overlong_strings_are_cut_at_a_char_boundary() {
        // 'é' is 2 bytes: 40,000 of them cannot all fit a 65,535-byte string.
        let topic = "é".repeat(40_000);
        let p = out_publish(&topic, b"x", 0);
        let mut out = Vec::new();
        encode_publish(&mut out, Version::V311, &p);
        assert_eq!(out.len(), publish_len(Version::V311, &p));
        let got = v4::Publish::read(header(&out), whole(&out)).unwrap();
        assert_eq!(got.topic.len(), 65_534);
        assert_eq!(&got.payload[..], b"x");
    }

    #[test]
    fn acks_round_trip() {
        let mut out = Vec::new();
        encode_puback(&mut out, Version::V311, 7, 0x10);
        assert_eq!(v4::PubAck::read(header(&out), whole(&out)).unwrap().pkid, 7);
        assert_eq!(out.len(), 4, "3.1.1 has no reason code");
        out.clear();
        encode_pubrec(&mut out, Version::V311, 8, 0);
        assert_eq!(v4::PubRec::read(header(&out), whole(&out)).unwrap().pkid, 8);
        out.clear();
        encode_pubrel(&mut out, Version::V311, 9, 0);
        assert_eq!(v4::PubRel::read(header(&out), whole(&out)).unwrap().pkid, 9);
        assert_eq!(out[0], 0x62);
        out.clear();
        encode_pubcomp(&mut out, Version::V311, 10, 0);
        assert_eq!(
            v4::PubComp::read(header(&out), whole(&out)).unwrap().pkid,
            10
        );

        out.clear();
        encode_puback(&mut out, Version::V5, 7, 0);
        assert_eq!(
            out,
            [0x40, 2, 0, 7],
            "success without properties is the short form"
        );
        out.clear();
        encode_puback(&mut out, Version::V5, 7, reason::NO_MATCHING_SUBSCRIBERS);
        let a = v5::PubAck::read(header(&out), whole(&out)).unwrap();
        assert_eq!((a.pkid, a.reason as u8), (7, 0x10));
        out.clear();
        encode_pubrec(&mut out, Version::V5, 8, reason::QUOTA_EXCEEDED);
        let a = v5::PubRec::read(header(&out), whole(&out)).unwrap();
        assert_eq!((a.pkid, a.reason as u8), (8, 0x97));
        out.clear();
        encode_pubrel(&mut out, Version::V5, 9, reason::PACKET_ID_NOT_FOUND);
        let a = v5::PubRel::read(header(&out), whole(&out)).unwrap();
        assert_eq!((a.pkid, a.reason as u8), (9, 0x92));
        out.clear();
        encode_pubcomp(&mut out, Version::V5, 10, reason::PACKET_ID_NOT_FOUND);
        let a = v5::PubComp::read(header(&out), whole(&out)).unwrap();
        assert_eq!((a.pkid, a.reason as u8), (10, 0x92));
    }

    #[test]
    fn suback_round_trip() {
        let mut out = Vec::new();
        encode_suback(
            &mut out,
            Version::V311,
            5,
            &[0, 1, 2, 0x80, reason::TOPIC_FILTER_INVALID],
        );
        let s = v4::SubAck::read(header(&out), whole(&out)).unwrap();
        assert_eq!(s.pkid, 5);
        use v4::SubscribeReasonCode::{Failure, Success};
        assert_eq!(
            s.return_codes,
            vec![
                Success(QoS::AtMostOnce),
                Success(QoS::AtLeastOnce),
                Success(QoS::ExactlyOnce),
                Failure,
                Failure
            ]
        );
        out.clear();
        encode_suback(
            &mut out,
            Version::V5,
            6,
            &[1, reason::SHARED_SUBS_NOT_SUPPORTED],
        );
        let s = v5::SubAck::read(header(&out), whole(&out)).unwrap();
        assert_eq!(s.pkid, 6);
        assert_eq!(s.return_codes.len(), 2);
        assert_eq!(s.return_codes[0], v5::SubscribeReasonCode::QoS1);
        assert_eq!(
            s.return_codes[1],
            v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
        );
    }

    #[test]
    fn unsuback_round_trip() {
        let mut out = Vec::new();
        encode_unsuback(&mut out, Version::V311, 5, &[0, 0x11]);
        assert_eq!(out, [0xB0, 2, 0, 5]);
        assert_eq!(
            v4::UnsubAck::read(header(&out), whole(&out)).unwrap().pkid,
            5
        );
        out.clear();
        encode_unsuback(
            &mut out,
            Version::V5,
            6,
            &[0, reason::NO_SUBSCRIPTION_EXISTED],
        );
        let u = v5::UnsubAck::read(header(&out), whole(&out)).unwrap();
        assert_eq!(u.pkid, 6);
        assert_eq!(
            u.reasons,
            vec![
                v5::UnsubAckReason::Success,
                v5::UnsubAckReason::NoSubscriptionExisted
            ]
        );
    }

    #[test]
    fn pingresp_round_trip() {
        let mut out = Vec::new();
        encode_pingresp(&mut out);
        let mut stream = BytesMut::from(&out[..]);
        assert_eq!(v4::read(&mut stream, 10), Ok(v4::Packet::PingResp));
        let mut stream = BytesMut::from(&out[..]);
        assert_eq!(v5::read(&mut stream, 10), Ok(v5::Packet::PingResp));
    }

    #[test]
    fn disconnect_round_trip() {
        let mut out = Vec::new();
        encode_disconnect(&mut out, reason::NORMAL_DISCONNECTION, None);
        assert_eq!(out, [0xE0, 0]);
        out.clear();
        encode_disconnect(&mut out, reason::KEEP_ALIVE_TIMEOUT, None);
        let d = v5::Disconnect::read(header(&out), whole(&out)).unwrap();
        assert_eq!(d.reason_code as u8, 0x8D);
        assert_eq!(d.properties, None);
        out.clear();
        encode_disconnect(&mut out, reason::SERVER_SHUTTING_DOWN, Some("bye"));
        let d = v5::Disconnect::read(header(&out), whole(&out)).unwrap();
        assert_eq!(d.reason_code as u8, 0x8B);
        assert_eq!(d.properties.unwrap().reason_string.as_deref(), Some("bye"));
    }

    #[test]
    fn varint_encoding_matches_its_length() {
        for n in [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING_LENGTH,
        ] {
            let mut out = Vec::new();
            varint(&mut out, n);
            assert_eq!(out.len(), varint_len(n), "{n}");
            // Decoded back through the frame header parser.
            let mut frame = vec![0x30];
            frame.extend_from_slice(&out);
            assert_eq!(frame_len(&frame, usize::MAX), Ok(Some(1 + out.len() + n)));
        }
    }
}
