//! Unit tests of the decoders, by packet family; CONNECT and the never-panic checks have
//! their own files under `tests/`.

use super::*;
use crate::codec::frame_len;

mod connect;
mod never_panic;

/// A frame from a first byte and a hand-written body: adds the Remaining Length.
fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![byte1];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        f.push(b);
        if n == 0 {
            break;
        }
    }
    f.extend_from_slice(body);
    f
}

/// A length-prefixed string or binary field.
fn s(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A CONNECT frame: protocol name, level, flags, keep alive 60, then `rest`.
fn connect(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&s(name), &[level, flags, 0, 60], rest]))
}

fn err(frame: &[u8], v: Version) -> ProtocolError {
    decode(frame, v).unwrap_err()
}

// ---- PUBLISH ----

#[test]
fn publish_v311_qos0_and_qos1() {
    let p = decode(&frame(0x31, &cat(&[&s(b"a/b"), b"hello"])), Version::V311).unwrap();
    let Packet::Publish(p) = p else {
        panic!("not a publish")
    };
    assert_eq!((p.qos, p.retain, p.dup, p.pkid), (0, true, false, 0));
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("a/b", &b"hello"[..]));
    let p = decode(&frame(0x3A, &cat(&[&s(b"a"), &[0, 7], b"x"])), Version::V31).unwrap();
    let Packet::Publish(p) = p else {
        panic!("not a publish")
    };
    assert_eq!(
        (p.qos, p.dup, p.pkid, &p.payload[..]),
        (1, true, 7, &b"x"[..])
    );
    // An empty payload is fine.
    assert!(decode(&frame(0x30, &s(b"a")), Version::V311).is_ok());
}

#[test]
fn publish_v5_properties() {
    let props = cat(&[
        &[0x01, 1],
        &[0x02, 0, 0, 1, 0],
        &[0x23, 0, 4],
        &[0x03],
        &s(b"json"),
        &[0x08],
        &s(b"r/t"),
        &[0x09],
        &s(b"cd"),
        &[0x26],
        &s(b"a"),
        &s(b"b"),
    ]);
    let f = frame(
        0x34,
        &cat(&[&s(b"t"), &[0, 9], &[props.len() as u8], &props, b"{}"]),
    );
    let Packet::Publish(p) = decode(&f, Version::V5).unwrap() else {
        panic!("not a publish")
    };
    assert_eq!((p.qos, p.pkid, p.topic_alias), (2, 9, Some(4)));
    assert_eq!(&p.payload[..], b"{}");
    let pp = p.props.unwrap();
    assert_eq!(pp.payload_format_indicator, Some(1));
    assert_eq!(pp.message_expiry, Some(256));
    assert_eq!(pp.content_type.as_deref(), Some("json"));
    assert_eq!(pp.response_topic.as_deref(), Some("r/t"));
    assert_eq!(pp.correlation_data.as_deref(), Some(&b"cd"[..]));
    assert_eq!(pp.user_properties, vec![("a".into(), "b".into())]);
}

#[test]
fn publish_v5_alias_only_has_no_props() {
    let f = frame(0x30, &cat(&[&s(b""), &[3, 0x23, 0, 1], b"x"]));
    let Packet::Publish(p) = decode(&f, Version::V5).unwrap() else {
        panic!("not a publish")
    };
    assert_eq!(
        (p.topic.as_str(), p.topic_alias, p.props),
        ("", Some(1), None)
    );
}

#[test]
fn publish_errors() {
    let v4 = Version::V311;
    assert_eq!(
        err(&frame(0x36, &cat(&[&s(b"a"), &[0, 1]])), v4),
        ProtocolError::InvalidQoS(3)
    );
    assert_eq!(err(&frame(0x38, &s(b"a")), v4), ProtocolError::DupAtQoS0);
    assert_eq!(
        err(&frame(0x38, &s(b"a")), Version::V5),
        ProtocolError::DupAtQoS0
    );
    assert_eq!(
        err(&frame(0x32, &cat(&[&s(b"a"), &[0, 0]])), v4),
        ProtocolError::ZeroPacketId
    );
    assert_eq!(
        err(&frame(0x30, &s(b"a/+")), v4),
        ProtocolError::WildcardInTopic
    );
    assert_eq!(
        err(&frame(0x30, &s(b"#")), v4),
        ProtocolError::WildcardInTopic
    );
    assert_eq!(err(&frame(0x30, &s(b"")), v4), ProtocolError::EmptyTopic);
    assert_eq!(
        err(&frame(0x30, &cat(&[&s(b""), &[0]])), Version::V5),
        ProtocolError::EmptyTopic
    );
    assert_eq!(
        err(&frame(0x30, &s(&[0xC0, 0x80])), v4),
        ProtocolError::InvalidUtf8
    );
    assert_eq!(
        err(&frame(0x30, &s(b"a\0")), v4),
        ProtocolError::InvalidUtf8
    );
    // Topic length past the end.
    assert!(matches!(
        err(&frame(0x30, &[0, 9, b'a']), v4),
        ProtocolError::Malformed(_)
    ));
}

#[test]
fn publish_v5_property_errors() {
    let with = |props: &[u8], payload: &[u8]| {
        err(
            &frame(
                0x30,
                &cat(&[&s(b"t"), &[props.len() as u8], props, payload]),
            ),
            Version::V5,
        )
    };
    assert_eq!(with(&[0x23, 0, 0], b""), ProtocolError::TopicAliasInvalid);
    assert_eq!(with(&[0x23, 0, 0], b"").reason_code(), 0x94);
    assert_eq!(
        with(&[0x01, 1], &[0xFF, 0xFE]),
        ProtocolError::PayloadFormatInvalid
    );
    assert_eq!(
        with(&[0x01, 2], b""),
        ProtocolError::InvalidPropertyValue(0x01)
    );
    assert_eq!(with(&[0x0B, 1], b""), ProtocolError::InvalidProperty(0x0B));
    assert_eq!(
        with(&[0x11, 0, 0, 0, 1], b""),
        ProtocolError::InvalidProperty(0x11)
    );
    assert_eq!(
        with(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2], b""),
        ProtocolError::DuplicateProperty(0x02)
    );
    assert_eq!(
        with(&cat(&[&[0x08], &s(b"r/#")]), b""),
        ProtocolError::InvalidPropertyValue(0x08)
    );
    assert_eq!(
        with(&cat(&[&[0x03], &s(b"a\0")]), b""),
        ProtocolError::InvalidUtf8
    );
    // Property length 1 but a 5-byte property: mqttbytes would eat the payload.
    let f = frame(0x30, &cat(&[&s(b"t"), &[1, 0x02, 0, 0, 0, 9], b"payload"]));
    assert!(matches!(err(&f, Version::V5), ProtocolError::Malformed(_)));
    // A missing property length.
    assert!(matches!(
        err(&frame(0x30, &s(b"t")), Version::V5),
        ProtocolError::Malformed(_)
    ));
}

// ---- acknowledgements ----

#[test]
fn acks_v311() {
    let v = Version::V311;
    assert_eq!(
        decode(&[0x40, 2, 0, 5], v),
        Ok(Packet::PubAck { pkid: 5, reason: 0 })
    );
    assert_eq!(
        decode(&[0x50, 2, 1, 0], v),
        Ok(Packet::PubRec {
            pkid: 256,
            reason: 0
        })
    );
    assert_eq!(
        decode(&[0x62, 2, 0, 5], v),
        Ok(Packet::PubRel { pkid: 5, reason: 0 })
    );
    assert_eq!(
        decode(&[0x70, 2, 0, 5], v),
        Ok(Packet::PubComp { pkid: 5, reason: 0 })
    );
    assert_eq!(err(&[0x40, 2, 0, 0], v), ProtocolError::ZeroPacketId);
    assert_eq!(err(&[0x60, 2, 0, 5], v), ProtocolError::ReservedFlags(0x60));
    assert_eq!(err(&[0x42, 2, 0, 5], v), ProtocolError::ReservedFlags(0x42));
    assert!(matches!(
        err(&[0x40, 3, 0, 5, 0], v),
        ProtocolError::Malformed(_)
    ));
    assert!(matches!(err(&[0x40, 1, 0], v), ProtocolError::Malformed(_)));
}

#[test]
fn acks_v5() {
    let v = Version::V5;
    assert_eq!(
        decode(&[0x40, 2, 0, 5], v),
        Ok(Packet::PubAck { pkid: 5, reason: 0 })
    );
    assert_eq!(
        decode(&[0x40, 3, 0, 5, 0x10], v),
        Ok(Packet::PubAck {
            pkid: 5,
            reason: 0x10
        })
    );
    assert_eq!(
        decode(&[0x50, 4, 0, 5, 0x80, 0], v),
        Ok(Packet::PubRec {
            pkid: 5,
            reason: 0x80
        })
    );
    let with_reason_string = frame(0x70, &cat(&[&[0, 5, 0x92, 4, 0x1F], &s(b"x")]));
    assert_eq!(
        decode(&with_reason_string, v),
        Ok(Packet::PubComp {
            pkid: 5,
            reason: 0x92
        })
    );
    assert_eq!(
        decode(&[0x62, 3, 0, 5, 0x92], v),
        Ok(Packet::PubRel {
            pkid: 5,
            reason: 0x92
        })
    );
    // PUBREL cannot carry a PUBACK code.
    assert_eq!(
        err(&[0x62, 3, 0, 5, 0x10], v),
        ProtocolError::InvalidReasonCode(0x10)
    );
    assert_eq!(
        err(&[0x40, 3, 0, 5, 0x05], v),
        ProtocolError::InvalidReasonCode(0x05)
    );
    assert_eq!(err(&[0x40, 3, 0, 0, 0], v), ProtocolError::ZeroPacketId);
    // Trailing bytes after the properties; a property an ack cannot carry.
    assert!(matches!(
        err(&[0x40, 5, 0, 5, 0, 0, 9], v),
        ProtocolError::Malformed(_)
    ));
    assert_eq!(
        err(&[0x40, 7, 0, 5, 0, 3, 0x23, 0, 1], v),
        ProtocolError::InvalidProperty(0x23)
    );
}

// ---- SUBSCRIBE / UNSUBSCRIBE ----

#[test]
fn subscribe_v311() {
    let f = frame(0x82, &cat(&[&[0, 10], &s(b"a/+"), &[1], &s(b"b/#"), &[2]]));
    let Packet::Subscribe {
        pkid,
        filters,
        subscription_id,
    } = decode(&f, Version::V311).unwrap()
    else {
        panic!("not a subscribe")
    };
    assert_eq!((pkid, subscription_id), (10, None));
    assert_eq!(filters.len(), 2);
    assert_eq!((filters[0].filter.as_str(), filters[0].qos), ("a/+", 1));
    assert_eq!((filters[1].filter.as_str(), filters[1].qos), ("b/#", 2));
    assert!(!filters[1].no_local && !filters[1].retain_as_published);
    // Bit 2 is No Local in MQTT 5 but reserved in 3.1.1.
    let f = frame(0x82, &cat(&[&[0, 10], &s(b"a"), &[0b0000_0101]]));
    assert!(matches!(
        err(&f, Version::V311),
        ProtocolError::Malformed(_)
    ));
}

#[test]
fn subscribe_v5_options_and_id() {
    let f = frame(
        0x82,
        &cat(&[&[0, 1], &[2, 0x0B, 42], &s(b"x"), &[0b0010_1101]]),
    );
    let Packet::Subscribe {
        filters,
        subscription_id,
        ..
    } = decode(&f, Version::V5).unwrap()
    else {
        panic!("not a subscribe")
    };
    assert_eq!(subscription_id, Some(42));
    assert_eq!(
        filters[0],
        SubscribeFilter {
            filter: "x".into(),
            qos: 1,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2
        }
    );
}

#[test]
fn subscribe_errors() {
    let v5 = Version::V5;
    let sub = |body: &[u8], v| err(&frame(0x82, body), v);
    assert_eq!(sub(&[0, 1, 0], v5), ProtocolError::NoFilters);
    assert_eq!(sub(&[0, 1], Version::V311), ProtocolError::NoFilters);
    assert_eq!(
        sub(&cat(&[&[0, 0, 0], &s(b"a"), &[0]]), v5),
        ProtocolError::ZeroPacketId
    );
    assert_eq!(
        sub(&cat(&[&[0, 1, 0], &s(b"a"), &[3]]), v5),
        ProtocolError::InvalidQoS(3)
    );
    assert_eq!(
        sub(&cat(&[&[0, 1], &s(b"a"), &[3]]), Version::V311),
        ProtocolError::InvalidQoS(3)
    );
    assert!(matches!(
        sub(&cat(&[&[0, 1, 0], &s(b"a"), &[0x40]]), v5),
        ProtocolError::Malformed(_)
    ));
    assert_eq!(
        sub(&cat(&[&[0, 1, 0], &s(b"a"), &[0x30]]), v5),
        ProtocolError::Protocol("retain handling 3")
    );
    assert_eq!(
        sub(&cat(&[&[0, 1, 2, 0x0B, 0], &s(b"a"), &[0]]), v5),
        ProtocolError::SubscriptionIdZero
    );
    assert_eq!(
        sub(&cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s(b"a"), &[0]]), v5),
        ProtocolError::DuplicateProperty(0x0B)
    );
    assert_eq!(
        sub(&cat(&[&[0, 1, 0], &s(&[0xFF]), &[0]]), v5),
        ProtocolError::InvalidUtf8
    );
    // A filter without its options byte.
    assert!(matches!(
        sub(&cat(&[&[0, 1, 0], &s(b"a")]), v5),
        ProtocolError::Malformed(_)
    ));
    // Wrong fixed-header flags.
    assert_eq!(
        err(
            &frame(0x80, &cat(&[&[0, 1], &s(b"a"), &[0]])),
            Version::V311
        ),
        ProtocolError::ReservedFlags(0x80)
    );
}

#[test]
fn unsubscribe_both_versions() {
    let f = frame(0xA2, &cat(&[&[0, 3], &s(b"a/b"), &s(b"c/#")]));
    assert_eq!(
        decode(&f, Version::V311),
        Ok(Packet::Unsubscribe {
            pkid: 3,
            filters: vec!["a/b".into(), "c/#".into()]
        })
    );
    let f = frame(0xA2, &cat(&[&[0, 3, 0], &s(b"a/b")]));
    assert_eq!(
        decode(&f, Version::V5),
        Ok(Packet::Unsubscribe {
            pkid: 3,
            filters: vec!["a/b".into()]
        })
    );
}

#[test]
fn unsubscribe_errors() {
    assert_eq!(
        err(&frame(0xA2, &[0, 3]), Version::V311),
        ProtocolError::NoFilters
    );
    assert_eq!(
        err(&frame(0xA2, &[0, 3, 0]), Version::V5),
        ProtocolError::NoFilters
    );
    assert_eq!(
        err(&frame(0xA2, &cat(&[&[0, 0], &s(b"a")])), Version::V311),
        ProtocolError::ZeroPacketId
    );
    assert_eq!(
        err(&frame(0xA2, &cat(&[&[0, 0, 0], &s(b"a")])), Version::V5),
        ProtocolError::ZeroPacketId
    );
    assert_eq!(
        err(&frame(0xA0, &cat(&[&[0, 1], &s(b"a")])), Version::V311),
        ProtocolError::ReservedFlags(0xA0)
    );
    assert_eq!(
        err(&frame(0xA2, &cat(&[&[0, 1], &s(b"a\0")])), Version::V311),
        ProtocolError::InvalidUtf8
    );
    assert_eq!(
        err(&frame(0xA2, &cat(&[&[0, 1, 0], &s(&[0xFF])])), Version::V5),
        ProtocolError::InvalidUtf8
    );
    assert_eq!(
        err(
            &frame(0xA2, &cat(&[&[0, 1, 2, 0x0B, 1], &s(b"a")])),
            Version::V5
        ),
        ProtocolError::InvalidProperty(0x0B)
    );
}

// ---- PINGREQ, DISCONNECT, AUTH, packet types ----

#[test]
fn pingreq_and_disconnect() {
    assert_eq!(decode(&[0xC0, 0], Version::V311), Ok(Packet::PingReq));
    assert_eq!(
        err(&[0xC1, 0], Version::V311),
        ProtocolError::ReservedFlags(0xC1)
    );
    assert!(matches!(
        err(&[0xC0, 1, 0], Version::V311),
        ProtocolError::Malformed(_)
    ));
    let normal = Packet::Disconnect {
        reason: 0,
        session_expiry: None,
    };
    assert_eq!(decode(&[0xE0, 0], Version::V311), Ok(normal.clone()));
    assert_eq!(decode(&[0xE0, 0], Version::V5), Ok(normal));
    assert!(matches!(
        err(&[0xE0, 1, 0], Version::V311),
        ProtocolError::Malformed(_)
    ));
    assert_eq!(
        err(&[0xE2, 0], Version::V5),
        ProtocolError::ReservedFlags(0xE2)
    );
}

#[test]
fn disconnect_v5_forms() {
    let v = Version::V5;
    // The short form mqttbytes refuses: a reason code and nothing else.
    assert_eq!(
        decode(&[0xE0, 1, 0x04], v),
        Ok(Packet::Disconnect {
            reason: 4,
            session_expiry: None
        })
    );
    assert_eq!(
        decode(&[0xE0, 2, 0x00, 0], v),
        Ok(Packet::Disconnect {
            reason: 0,
            session_expiry: None
        })
    );
    let f = [0xE0, 7, 0x00, 5, 0x11, 0, 0, 0, 30];
    assert_eq!(
        decode(&f, v),
        Ok(Packet::Disconnect {
            reason: 0,
            session_expiry: Some(30)
        })
    );
    // 0x8E (session taken over) is the server's to send.
    assert_eq!(
        err(&[0xE0, 1, 0x8E], v),
        ProtocolError::InvalidReasonCode(0x8E)
    );
    assert!(matches!(
        err(&[0xE0, 3, 0, 0, 1], v),
        ProtocolError::Malformed(_)
    ));
    assert_eq!(err(&[0xE0, 4, 0, 2, 0x23, 0], v).reason_code(), 0x81);
}

#[test]
fn auth_only_in_v5() {
    assert_eq!(decode(&[0xF0, 0], Version::V5), Ok(Packet::Auth));
    let f = frame(0xF0, &cat(&[&[0x18, 8, 0x15], &s(b"SCRAM")]));
    assert_eq!(decode(&f, Version::V5), Ok(Packet::Auth));
    assert_eq!(
        err(&[0xF0, 1, 0x05], Version::V5),
        ProtocolError::InvalidReasonCode(0x05)
    );
    assert_eq!(
        err(&[0xF0, 0], Version::V311),
        ProtocolError::UnknownPacketType(15)
    );
}

#[test]
fn packet_types_a_client_must_not_send() {
    for v in [Version::V31, Version::V311, Version::V5] {
        assert_eq!(err(&[0x00, 0], v), ProtocolError::UnknownPacketType(0));
        assert_eq!(
            err(&[0x20, 2, 0, 0], v),
            ProtocolError::UnexpectedPacket("CONNACK")
        );
        assert_eq!(
            err(&[0x90, 3, 0, 1, 0], v),
            ProtocolError::UnexpectedPacket("SUBACK")
        );
        assert_eq!(
            err(&[0xB0, 2, 0, 1], v),
            ProtocolError::UnexpectedPacket("UNSUBACK")
        );
        assert_eq!(
            err(&[0xD0, 0], v),
            ProtocolError::UnexpectedPacket("PINGRESP")
        );
        let second = connect(b"MQTT", 4, 2, &s(b"c"));
        assert_eq!(err(&second, v), ProtocolError::UnexpectedPacket("CONNECT"));
        assert_eq!(err(&second, v).reason_code(), 0x82);
    }
}

#[test]
fn frame_must_be_exactly_one_packet() {
    assert!(matches!(
        err(&[0xC0, 0, 0xC0], Version::V311),
        ProtocolError::Malformed(_)
    ));
    assert!(matches!(
        err(&[0x40, 2, 0], Version::V311),
        ProtocolError::Malformed(_)
    ));
    assert!(matches!(
        err(&[], Version::V311),
        ProtocolError::Malformed(_)
    ));
}
