//! The client side of the MQTT wire format: what a device sends and what it must read.
//!
//! CONNECT, SUBSCRIBE and PUBLISH are encoded with `mqttbytes` (v4 for 3.1.1, v5 for 5);
//! PINGREQ, PUBACK, PUBREC, PUBREL, PUBCOMP and DISCONNECT are fixed byte strings valid in both versions. Incoming
//! frames are split here (fixed header parsed by hand) and only PUBLISH is decoded by
//! `mqttbytes`; CONNACK, SUBACK, PUBACK, PUBREC, PUBREL, PUBCOMP and DISCONNECT are read by hand because loadgen
//! needs just their codes, and mqttbytes 0.6 refuses the valid short MQTT 5 DISCONNECT
//! (reason code without properties) that a broker sends on takeover or shutdown.

use bytes::{Buf, Bytes, BytesMut};
use mqttbytes::QoS;
use serde::{Deserialize, Serialize};

/// The largest frame a device accepts; a bigger one is a protocol error.
pub const MAX_FRAME: usize = 1 << 20;

/// MQTT protocol level: 4 = 3.1.1, 5 = 5.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    V4,
    V5,
}

impl Protocol {
    pub fn from_level(level: u8) -> Option<Protocol> {
        match level {
            4 => Some(Protocol::V4),
            5 => Some(Protocol::V5),
            _ => None,
        }
    }
}

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// What a device puts in its CONNECT.
pub struct ConnectFields<'a> {
    pub client_id: &'a str,
    pub keep_alive: u16,
    pub clean: bool,
    pub login: Option<(&'a str, &'a str)>,
    /// MQTT 5 Session Expiry Interval (ignored for 3.1.1).
    pub session_expiry: Option<u32>,
    /// A will on this topic (QoS 1, payload `offline`).
    pub will: Option<&'a str>,
}

pub fn connect(p: Protocol, f: &ConnectFields, out: &mut BytesMut) -> Result<(), String> {
    match p {
        Protocol::V4 => {
            let mut c = mqttbytes::v4::Connect::new(f.client_id);
            c.keep_alive = f.keep_alive;
            c.clean_session = f.clean;
            if let Some((u, pw)) = f.login {
                c.set_login(u, pw);
            }
            c.last_will = f
                .will
                .map(|t| mqttbytes::v4::LastWill::new(t, "offline", QoS::AtLeastOnce, false));
            c.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
        Protocol::V5 => {
            let mut c = mqttbytes::v5::Connect::new(f.client_id);
            c.keep_alive = f.keep_alive;
            c.clean_session = f.clean;
            if let Some((u, pw)) = f.login {
                c.set_login(u, pw);
            }
            c.last_will = f
                .will
                .map(|t| mqttbytes::v5::LastWill::new(t, "offline", QoS::AtLeastOnce, false));
            if let Some(secs) = f.session_expiry {
                c.properties = Some(mqttbytes::v5::ConnectProperties {
                    session_expiry_interval: Some(secs),
                    receive_maximum: None,
                    max_packet_size: None,
                    topic_alias_max: None,
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: Vec::new(),
                    authentication_method: None,
                    authentication_data: None,
                });
            }
            c.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
    }
}

pub fn subscribe(
    p: Protocol,
    pkid: u16,
    filter: &str,
    qos_level: u8,
    out: &mut BytesMut,
) -> Result<(), String> {
    match p {
        Protocol::V4 => {
            let mut s = mqttbytes::v4::Subscribe::new(filter, qos(qos_level));
            s.pkid = pkid;
            s.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
        Protocol::V5 => {
            let mut s = mqttbytes::v5::Subscribe::new(filter, qos(qos_level));
            s.pkid = pkid;
            s.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
    }
}

pub fn publish(
    p: Protocol,
    topic: &str,
    qos_level: u8,
    pkid: u16,
    payload: Bytes,
    out: &mut BytesMut,
) -> Result<(), String> {
    match p {
        Protocol::V4 => {
            let mut m = mqttbytes::v4::Publish::from_bytes(topic, qos(qos_level), payload);
            m.pkid = pkid;
            m.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
        Protocol::V5 => {
            let mut m = mqttbytes::v5::Publish::from_bytes(topic, qos(qos_level), payload);
            m.pkid = pkid;
            m.write(out).map(drop).map_err(|e| format!("{e:?}"))
        }
    }
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// Normal disconnection; in MQTT 5 a Remaining Length of 0 means reason 0x00.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// PUBACK for `pkid`; in MQTT 5 a Remaining Length of 2 means reason 0x00 (success).
pub fn puback(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

/// PUBREC for `pkid` (a QoS 2 subscriber's answer to PUBLISH).
pub fn pubrec(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x50, 0x02, hi, lo]
}

/// PUBREL for `pkid` (a QoS 2 publisher's answer to PUBREC).
pub fn pubrel(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x62, 0x02, hi, lo]
}

/// PUBCOMP for `pkid` (a QoS 2 subscriber's answer to PUBREL).
pub fn pubcomp(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x70, 0x02, hi, lo]
}

/// A packet a device receives, reduced to what loadgen acts on.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    ConnAck {
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    /// A PUBLISH, reduced to the loadgen stamp at the start of its payload (`None` if
    /// the payload carries none: a message loadgen did not send).
    Publish {
        qos: u8,
        pkid: u16,
        stamp: Option<(u64, u64)>,
    },
    PubAck {
        pkid: u16,
    },
    /// The broker's PUBREC of a QoS 2 PUBLISH; the publisher answers PUBREL.
    PubRec {
        pkid: u16,
    },
    /// The broker's PUBREL of a QoS 2 delivery; the subscriber answers PUBCOMP.
    PubRel {
        pkid: u16,
    },
    /// The broker's PUBCOMP: the end of a QoS 2 PUBLISH.
    PubComp {
        pkid: u16,
    },
    PingResp,
    /// DISCONNECT from the server with its reason (0 for 3.1.1, which has none).
    Disconnect {
        reason: u8,
    },
    /// Anything else a client may legally ignore here (PUBREC, UNSUBACK, AUTH, ...).
    Other(u8),
}

/// Takes the next whole frame off `buf`: `Ok(None)` when more bytes are needed.
pub fn next(p: Protocol, buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    let Some((header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header_len + remaining;
    if total > MAX_FRAME {
        return Err(format!("frame of {total} bytes"));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let byte1 = buf[0];
    if byte1 >> 4 == 3 {
        // The hot path of every fan-out and push run: parsed in place, nothing copied
        // or reference-counted.
        let packet = publish_in_place(p, byte1, &buf[header_len..total]);
        buf.advance(total);
        return packet.map(Some);
    }
    let frame = buf.split_to(total).freeze();
    let mut body = frame.slice(header_len..);
    let short = |what: &str| format!("short {what}");
    let packet = match byte1 >> 4 {
        2 => {
            if body.len() < 2 {
                return Err(short("CONNACK"));
            }
            Incoming::ConnAck { code: body[1] }
        }
        4 => {
            if body.len() < 2 {
                return Err(short("PUBACK"));
            }
            Incoming::PubAck {
                pkid: body.get_u16(),
            }
        }
        5..=7 => {
            if body.len() < 2 {
                return Err(short("PUBREC/PUBREL/PUBCOMP"));
            }
            let pkid = body.get_u16();
            match byte1 >> 4 {
                5 => Incoming::PubRec { pkid },
                6 => Incoming::PubRel { pkid },
                _ => Incoming::PubComp { pkid },
            }
        }
        9 => {
            if body.len() < 2 {
                return Err(short("SUBACK"));
            }
            let pkid = body.get_u16();
            if p == Protocol::V5 {
                let Some((len_len, props)) = varint(&body)? else {
                    return Err(short("SUBACK properties"));
                };
                if body.len() < len_len + props {
                    return Err(short("SUBACK properties"));
                }
                body.advance(len_len + props);
            }
            Incoming::SubAck {
                pkid,
                codes: body.to_vec(),
            }
        }
        13 => Incoming::PingResp,
        14 => Incoming::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        other => Incoming::Other(other),
    };
    Ok(Some(packet))
}

/// The variable header and payload of a PUBLISH (`body` is the frame after its fixed
/// header).
fn publish_in_place(p: Protocol, byte1: u8, body: &[u8]) -> Result<Incoming, String> {
    let malformed = || "malformed PUBLISH".to_string();
    let qos = (byte1 >> 1) & 3;
    if qos == 3 || body.len() < 2 {
        return Err(malformed());
    }
    let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    let mut pkid = 0;
    if qos > 0 {
        let id = body.get(at..at + 2).ok_or_else(malformed)?;
        pkid = u16::from_be_bytes([id[0], id[1]]);
        at += 2;
    }
    if p == Protocol::V5 {
        let rest = body.get(at..).ok_or_else(malformed)?;
        let (len_len, props) = varint(rest)?.ok_or_else(malformed)?;
        at += len_len + props;
    }
    let payload = body.get(at..).ok_or_else(malformed)?;
    Ok(Incoming::Publish {
        qos,
        pkid,
        stamp: parse_stamp(payload),
    })
}

/// `(fixed header length, remaining length)`, or `None` if the header is incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    Ok(varint(&buf[1..])?.map(|(len_len, remaining)| (1 + len_len, remaining)))
}

/// An MQTT variable byte integer: `(bytes used, value)`, `None` if incomplete.
fn varint(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let mut value = 0usize;
    for (i, &b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((i + 1, value)));
        }
    }
    if buf.len() >= 4 {
        return Err("malformed remaining length".into());
    }
    Ok(None)
}

/// The sequence number and send time (ns since the UNIX epoch) loadgen writes at the
/// start of every payload as `"<seq>:<ns>"`, followed by padding.
pub fn stamp(seq: u64, sent_ns: u64, size: usize) -> String {
    let mut s = String::new();
    stamp_into(&mut s, seq, sent_ns, size);
    s
}

/// [`stamp`], appended to `s`.
pub fn stamp_into(s: &mut String, seq: u64, sent_ns: u64, size: usize) {
    use std::fmt::Write;
    let start = s.len();
    let _ = write!(s, "{seq}:{sent_ns}");
    if s.len() - start < size {
        s.push(' ');
        while s.len() - start < size {
            s.push('.');
        }
    }
}

pub fn parse_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let (seq, rest) = decimal(payload)?;
    let (ns, rest) = decimal(rest.strip_prefix(b":")?)?;
    match rest.first() {
        None | Some(b' ') => Some((seq, ns)),
        Some(_) => None,
    }
}

/// A leading run of ASCII digits as a u64 and what follows it; `None` if there is no
/// digit or the number overflows.
fn decimal(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..digits] {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((v, &b[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_publish(p: Protocol) {
        let mut out = BytesMut::new();
        publish(
            p,
            "devices/a/cmd",
            1,
            7,
            Bytes::from(stamp(42, 99, 40)),
            &mut out,
        )
        .unwrap();
        out.extend_from_slice(&PINGREQ[..1]);
        let got = next(p, &mut out).unwrap().unwrap();
        assert_eq!(
            got,
            Incoming::Publish {
                qos: 1,
                pkid: 7,
                stamp: Some((42, 99))
            }
        );
        // The half PINGREQ left over is not a frame yet.
        assert_eq!(next(p, &mut out).unwrap(), None);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn qos2_handshake_packets() {
        // The broker's PUBREL (fixed header flags 0b0010) is read in both versions.
        for p in [Protocol::V4, Protocol::V5] {
            let mut buf = BytesMut::from(&[0x62, 0x02, 0x01, 0x02][..]);
            assert_eq!(
                next(p, &mut buf).unwrap(),
                Some(Incoming::PubRel { pkid: 0x0102 })
            );
        }
        let mut buf = BytesMut::from(&[0x50, 0x02, 0x00, 0x09, 0x70, 0x03, 0x00, 0x09, 0x00][..]);
        assert_eq!(
            next(Protocol::V5, &mut buf).unwrap(),
            Some(Incoming::PubRec { pkid: 9 })
        );
        // MQTT 5 may add a reason code after the packet id.
        assert_eq!(
            next(Protocol::V5, &mut buf).unwrap(),
            Some(Incoming::PubComp { pkid: 9 })
        );
        assert_eq!(pubrec(0x0102), [0x50, 0x02, 0x01, 0x02]);
        assert_eq!(pubrel(0x0102), [0x62, 0x02, 0x01, 0x02]);
        assert_eq!(pubcomp(7), [0x70, 0x02, 0x00, 0x07]);
    }

    #[test]
    fn publish_roundtrips_in_both_versions() {
        roundtrip_publish(Protocol::V4);
        roundtrip_publish(Protocol::V5);
    }

    #[test]
    fn reads_acks_by_hand() {
        let mut b = BytesMut::from(&[0x20, 0x02, 0x00, 0x05][..]);
        assert_eq!(
            next(Protocol::V4, &mut b),
            Ok(Some(Incoming::ConnAck { code: 5 }))
        );
        // MQTT 5 CONNACK with a property section.
        let mut b = BytesMut::from(&[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x0A][..]);
        assert_eq!(
            next(Protocol::V5, &mut b),
            Ok(Some(Incoming::ConnAck { code: 0 }))
        );
        let mut b = BytesMut::from(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x80][..]);
        assert_eq!(
            next(Protocol::V5, &mut b),
            Ok(Some(Incoming::SubAck {
                pkid: 1,
                codes: vec![0x80]
            }))
        );
        let mut b = BytesMut::from(&[0x90, 0x03, 0x00, 0x01, 0x01][..]);
        assert_eq!(
            next(Protocol::V4, &mut b),
            Ok(Some(Incoming::SubAck {
                pkid: 1,
                codes: vec![1]
            }))
        );
        let mut b = BytesMut::from(&[0xE0, 0x01, 0x8E, 0xD0, 0x00][..]);
        assert_eq!(
            next(Protocol::V5, &mut b),
            Ok(Some(Incoming::Disconnect { reason: 0x8E }))
        );
        assert_eq!(next(Protocol::V5, &mut b), Ok(Some(Incoming::PingResp)));
        assert!(b.is_empty());
    }

    #[test]
    fn refuses_oversized_and_malformed_headers() {
        let mut b = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(next(Protocol::V4, &mut b).is_err());
        let mut b = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(next(Protocol::V4, &mut b).is_err());
    }

    #[test]
    fn stamps_parse_with_and_without_padding() {
        assert_eq!(parse_stamp(stamp(1, 2, 0).as_bytes()), Some((1, 2)));
        assert_eq!(stamp(1, 2, 10), "1:2 ......");
        assert_eq!(parse_stamp(b"hello"), None);
        assert_eq!(parse_stamp(stamp(7, 9, 30).as_bytes()), Some((7, 9)));
        assert_eq!(parse_stamp(b"1:2x"), None);
        assert_eq!(parse_stamp(b"1:"), None);
        assert_eq!(parse_stamp(b"99999999999999999999:1"), None);
    }

    #[test]
    fn publish_is_parsed_in_place_and_checked() {
        // QoS 0: no packet id; the stamp follows the topic directly.
        let mut out = BytesMut::new();
        publish(
            Protocol::V4,
            "t",
            0,
            0,
            Bytes::from(stamp(5, 6, 0)),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            next(Protocol::V4, &mut out),
            Ok(Some(Incoming::Publish {
                qos: 0,
                pkid: 0,
                stamp: Some((5, 6))
            }))
        );
        assert!(out.is_empty());
        // A topic length running past the frame, and QoS 3, are errors, not panics.
        let mut b = BytesMut::from(&[0x30, 0x03, 0x00, 0x09, b't'][..]);
        assert!(next(Protocol::V4, &mut b).is_err());
        let mut b = BytesMut::from(&[0x36, 0x03, 0x00, 0x01, b't'][..]);
        assert!(next(Protocol::V4, &mut b).is_err());
        // QoS 1 without room for its packet id.
        let mut b = BytesMut::from(&[0x32, 0x03, 0x00, 0x01, b't'][..]);
        assert!(next(Protocol::V4, &mut b).is_err());
    }
}
