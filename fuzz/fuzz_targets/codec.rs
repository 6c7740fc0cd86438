//! Fuzzes the frame decoder: arbitrary bytes, split into frames exactly as a shard splits
//! a connection's byte stream (`codec::frame_len`), each frame decoded as a CONNECT and as
//! a later packet of every protocol version.
//!
//! What must hold, beyond "never panics":
//! - `frame_len` on any prefix of a frame's fixed header is "incomplete" or the same
//!   answer, so a frame split across reads is framed the same as one read whole;
//! - a decoded packet the server also knows how to write (PUBLISH, the four acks, MQTT 5
//!   DISCONNECT) encodes to bytes that decode to the same packet;
//! - every refusal maps to an MQTT 5 error reason code (>= 0x80).
//!
//! The first input byte picks the packet size limit, so the fuzzer explores both the
//! "too large" refusal and deep decoding.

#![no_main]

use gateway::codec::{self, OutPublish, Packet, Version};
use libfuzzer_sys::fuzz_target;

const VERSIONS: [Version; 3] = [Version::V31, Version::V311, Version::V5];

fuzz_target!(|data: &[u8]| {
    let Some((&knob, stream)) = data.split_first() else {
        return;
    };
    let max = match knob & 3 {
        0 => 16,
        1 => 128,
        2 => 4096,
        _ => codec::MAX_REMAINING_LENGTH + 5,
    };
    let mut rest = stream;
    let mut first = true;
    while !rest.is_empty() {
        let len = match codec::frame_len(rest, max) {
            Err(e) => {
                assert!(e.reason_code() >= 0x80);
                break;
            }
            Ok(None) => break,
            Ok(Some(len)) => len,
        };
        check_prefixes(rest, max, len);
        if len > rest.len() {
            break;
        }
        let (frame, tail) = rest.split_at(len);
        if first {
            check_connect(frame);
            first = false;
        }
        for v in VERSIONS {
            check_packet(frame, v);
        }
        rest = tail;
    }
    // The whole input as one frame too: the decoders must refuse a frame whose length
    // disagrees with its header without looking further.
    check_connect(stream);
    for v in VERSIONS {
        check_packet(stream, v);
    }
});

/// Every shorter prefix of a frame's first bytes frames as incomplete or identically.
fn check_prefixes(buf: &[u8], max: usize, len: usize) {
    for cut in 0..buf.len().min(5) {
        match codec::frame_len(&buf[..cut], max) {
            Ok(None) => {}
            Ok(Some(l)) => assert_eq!(l, len, "prefix of {cut} bytes framed differently"),
            Err(e) => panic!("prefix of {cut} bytes refused ({e}) but the whole frame was not"),
        }
    }
}

fn check_connect(frame: &[u8]) {
    match codec::decode_connect(frame) {
        Ok(c) => {
            assert!(c.receive_maximum != 0 && c.max_packet_size != 0);
            if let Some(w) = &c.will {
                assert!(w.qos <= 2);
                assert!(!w.topic.is_empty() && !w.topic.contains(['+', '#', '\0']));
            }
            // Debug never shows the password.
            let _ = format!("{c:?}");
        }
        Err(e) => {
            assert!(e.error.reason_code() >= 0x80);
            let _ = e.connack_code();
            assert!(!e.to_string().is_empty());
        }
    }
}

fn check_packet(frame: &[u8], v: Version) {
    let packet = match codec::decode(frame, v) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.reason_code() >= 0x80, "{e}");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut out = Vec::new();
    match &packet {
        Packet::Publish(p) => {
            assert!(p.qos <= 2 && (p.qos == 0) == (p.pkid == 0));
            assert!(!p.topic.contains(['+', '#', '\0']));
            assert!(!p.topic.is_empty() || p.topic_alias.is_some());
            let out_p = OutPublish {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic: &p.topic,
                pkid: p.pkid,
                payload: &p.payload,
                props: p.props.as_deref(),
                message_expiry: None,
                subscription_ids: &[],
                topic_alias: p.topic_alias,
            };
            let at = codec::encode_publish(&mut out, v, &out_p);
            assert_eq!(out.len(), codec::publish_len(v, &out_p));
            if let Some(at) = at {
                assert_eq!(&out[at..at + 2], &p.pkid.to_be_bytes());
            }
        }
        Packet::PubAck { pkid, reason } => codec::encode_puback(&mut out, v, *pkid, *reason),
        Packet::PubRec { pkid, reason } => codec::encode_pubrec(&mut out, v, *pkid, *reason),
        Packet::PubRel { pkid, reason } => codec::encode_pubrel(&mut out, v, *pkid, *reason),
        Packet::PubComp { pkid, reason } => codec::encode_pubcomp(&mut out, v, *pkid, *reason),
        Packet::Subscribe { pkid, filters, .. } => {
            assert!(*pkid != 0 && !filters.is_empty());
            assert!(filters.iter().all(|f| f.qos <= 2 && f.retain_handling <= 2));
            return;
        }
        Packet::Unsubscribe { pkid, filters } => {
            assert!(*pkid != 0 && !filters.is_empty());
            return;
        }
        Packet::Disconnect { reason, .. } if v == Version::V5 => {
            codec::encode_disconnect(&mut out, *reason, None)
        }
        Packet::Disconnect { .. } | Packet::PingReq | Packet::Auth => return,
    }
    // What the server writes, the server reads back as the same packet (properties the
    // encoders do not write, such as a reason string on an ack, are not compared).
    let again = codec::decode(&out, v)
        .unwrap_or_else(|e| panic!("re-encoded {packet:?} does not decode: {e} ({out:02x?})"));
    let expected = match packet {
        Packet::Disconnect { reason, .. } => Packet::Disconnect {
            reason,
            session_expiry: None,
        },
        p => p,
    };
    assert_eq!(again, expected, "round trip changed the packet");
}
