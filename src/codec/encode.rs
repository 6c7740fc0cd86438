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
mod tests;
