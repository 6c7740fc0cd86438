//! Unit tests of the encoders: every packet the gateway writes, in both versions, read
//! back by mqttbytes or checked byte for byte.

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
