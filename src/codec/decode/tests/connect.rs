//! CONNECT decoding: 3.1, 3.1.1 and 5, flags, properties, wills and what is refused.

use super::*;

#[test]
fn connect_v311_with_will_and_login() {
    // user name, password, will retain, will QoS 1, will, clean session.
    let rest = cat(&[
        &s(b"dev-1"),
        &s(b"alarm"),
        &s(b"gone"),
        &s(b"user"),
        &s(b"pw"),
    ]);
    let c = decode_connect(&connect(b"MQTT", 4, 0b1110_1110, &rest)).unwrap();
    assert_eq!(c.version, Version::V311);
    assert_eq!(c.client_id, "dev-1");
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.username.as_deref(), Some("user"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    let w = c.will.unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
        ("alarm", &b"gone"[..], 1, true)
    );
    assert_eq!(w.props, None);
    assert_eq!(c.receive_maximum, 65535);
    assert_eq!(c.max_packet_size, u32::MAX);
    assert!(c.request_problem_info);
}

#[test]
fn connect_mqtt31_mqisdp() {
    let c = decode_connect(&connect(b"MQIsdp", 3, 0b0000_0010, &s(b"old-client"))).unwrap();
    assert_eq!(c.version, Version::V31);
    assert_eq!(c.client_id, "old-client");
    assert!(c.clean_start);
}

#[test]
fn connect_binary_password() {
    let pw = [0xFF, 0x00, 0xC3, 0x28, 0x80];
    let rest = cat(&[&s(b"id"), &s(b"u"), &s(&pw)]);
    let c = decode_connect(&connect(b"MQTT", 4, 0b1100_0000, &rest)).unwrap();
    assert_eq!(c.password.as_deref(), Some(&pw[..]));
}

#[test]
fn connect_empty_username_is_kept() {
    let rest = cat(&[&s(b"id"), &s(b"")]);
    let c = decode_connect(&connect(b"MQTT", 4, 0b1000_0000, &rest)).unwrap();
    assert_eq!(c.username.as_deref(), Some(""));
    assert_eq!(c.password, None);
}

#[test]
fn connect_password_without_username() {
    let rest = cat(&[&s(b"id"), &s(b"pw")]);
    let e = decode_connect(&connect(b"MQTT", 4, 0b0100_0000, &rest)).unwrap_err();
    assert_eq!(
        e.error,
        ProtocolError::Protocol("password without user name")
    );
    // 3.1.1 has no return code for it: close without CONNACK.
    assert_eq!(e.version, None);
    // MQTT 5 allows it.
    let rest5 = cat(&[&[0], &s(b"id"), &s(b"pw")]);
    let c = decode_connect(&connect(b"MQTT", 5, 0b0100_0000, &rest5)).unwrap();
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn connect_v5_properties() {
    let props = cat(&[
        &[0x11, 0, 0, 0x0E, 0x10], // session expiry 3600
        &[0x21, 0, 10],            // receive maximum 10
        &[0x27, 0, 0, 0x10, 0],    // maximum packet size 4096
        &[0x22, 0, 5],             // topic alias maximum 5
        &[0x17, 0],                // request problem information 0
        // Two user properties with one key: allowed.
        &[0x26],
        &s(b"k"),
        &s(b"v"),
        &[0x26],
        &s(b"k"),
        &s(b"w"),
        // Authentication method.
        &[0x15],
        &s(b"SCRAM"),
    ]);
    let rest = cat(&[&[props.len() as u8], &props, &s(b"c5")]);
    let c = decode_connect(&connect(b"MQTT", 5, 0b0000_0000, &rest)).unwrap();
    assert_eq!(c.version, Version::V5);
    assert!(!c.clean_start);
    assert_eq!(c.session_expiry, 3600);
    assert_eq!(c.receive_maximum, 10);
    assert_eq!(c.max_packet_size, 4096);
    assert_eq!(c.topic_alias_max, 5);
    assert!(!c.request_problem_info);
    assert_eq!(c.auth_method.as_deref(), Some("SCRAM"));
    assert_eq!(
        c.user_properties,
        vec![("k".into(), "v".into()), ("k".into(), "w".into())]
    );
}

#[test]
fn connect_v5_will_properties() {
    let will_props = cat(&[
        &[0x18, 0, 0, 0, 30], // will delay 30
        &[0x01, 1],           // payload is UTF-8
        &[0x02, 0, 0, 0, 60], // message expiry 60
        &[0x03],
        &s(b"text/plain"),
        &[0x08],
        &s(b"reply/here"),
        &[0x09],
        &s(&[1, 2, 3]),
    ]);
    let rest = cat(&[
        &[0],
        &s(b"c"),
        &[will_props.len() as u8],
        &will_props,
        &s(b"t/w"),
        &s(b"bye"),
    ]);
    let c = decode_connect(&connect(b"MQTT", 5, 0b0001_0100, &rest)).unwrap();
    let w = c.will.unwrap();
    assert_eq!(w.qos, 2);
    assert_eq!(w.delay_secs, 30);
    let p = w.props.unwrap();
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.message_expiry, Some(60));
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
    assert_eq!(p.correlation_data.as_deref(), Some(&[1u8, 2, 3][..]));
}

#[test]
fn connect_refuses_unknown_protocols() {
    let e = decode_connect(&connect(b"MQTT", 6, 2, &s(b"c"))).unwrap_err();
    assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(6));
    assert_eq!((e.version, e.connack_code()), (Some(Version::V311), 0x01));
    let e = decode_connect(&connect(b"MQTT", 3, 2, &s(b"c"))).unwrap_err();
    assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(3));
    let e = decode_connect(&connect(b"MQIsdp", 4, 2, &s(b"c"))).unwrap_err();
    assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(4));
    let e = decode_connect(&connect(b"HTTP", 4, 2, &s(b"c"))).unwrap_err();
    assert_eq!(
        (e.version, e.error),
        (None, ProtocolError::UnknownProtocolName)
    );
}

#[test]
fn connect_must_come_first() {
    let e = decode_connect(&frame(0x30, &cat(&[&s(b"t"), b"x"]))).unwrap_err();
    assert_eq!(
        (e.version, e.error),
        (None, ProtocolError::UnexpectedPacket("PUBLISH"))
    );
    let e = decode_connect(&[0xC0, 0]).unwrap_err();
    assert_eq!(e.error, ProtocolError::UnexpectedPacket("PINGREQ"));
}

#[test]
fn connect_flag_rules() {
    let mut bad_header = connect(b"MQTT", 4, 2, &s(b"c"));
    bad_header[0] = 0x11;
    assert_eq!(
        decode_connect(&bad_header).unwrap_err().error,
        ProtocolError::ReservedFlags(0x11)
    );
    let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0011, &s(b"c"))).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
    // Will QoS 1 without the will flag; will retain without it.
    let e = decode_connect(&connect(b"MQTT", 4, 0b0000_1010, &s(b"c"))).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
    let e = decode_connect(&connect(b"MQTT", 4, 0b0010_0010, &s(b"c"))).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
    // Will QoS 3.
    let rest = cat(&[&s(b"c"), &s(b"t"), &s(b"p")]);
    let e = decode_connect(&connect(b"MQTT", 4, 0b0001_1110, &rest)).unwrap_err();
    assert_eq!(e.error, ProtocolError::InvalidQoS(3));
    // In MQTT 5 the same refusal is answered with a CONNACK.
    let rest5 = cat(&[&[0], &s(b"c"), &[0], &s(b"t"), &s(b"p")]);
    let e = decode_connect(&connect(b"MQTT", 5, 0b0001_1110, &rest5)).unwrap_err();
    assert_eq!((e.version, e.connack_code()), (Some(Version::V5), 0x81));
}

#[test]
fn connect_utf8_rules() {
    let e = decode_connect(&connect(b"MQTT", 4, 2, &s(&[0xC3, 0x28]))).unwrap_err();
    assert_eq!(e.error, ProtocolError::InvalidClientId);
    assert_eq!((e.version, e.connack_code()), (Some(Version::V311), 0x02));
    let e = decode_connect(&connect(b"MQTT", 4, 2, &s(b"a\0b"))).unwrap_err();
    assert_eq!(e.error, ProtocolError::InvalidClientId);
    let e = decode_connect(&connect(b"MQTT", 5, 2, &cat(&[&[0], &s(&[0xFF])]))).unwrap_err();
    assert_eq!((e.version, e.connack_code()), (Some(Version::V5), 0x85));
    let rest = cat(&[&s(b"c"), &s(&[0xED, 0xA0, 0x80])]); // an encoded surrogate
    let e = decode_connect(&connect(b"MQTT", 4, 0b1000_0010, &rest)).unwrap_err();
    assert_eq!(e.error, ProtocolError::InvalidUtf8);
    let rest = cat(&[&s(b"c"), &s(&[0xFF]), &s(b"p")]);
    let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0110, &rest)).unwrap_err();
    assert_eq!(e.error, ProtocolError::InvalidUtf8);
}

#[test]
fn connect_will_topic_rules() {
    for (topic, want) in [
        (&b"a/+"[..], ProtocolError::WildcardInTopic),
        (b"a/#", ProtocolError::WildcardInTopic),
        (b"", ProtocolError::EmptyTopic),
    ] {
        let rest = cat(&[&s(b"c"), &s(topic), &s(b"p")]);
        let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0110, &rest)).unwrap_err();
        assert_eq!(e.error, want);
    }
    // A UTF-8 will payload that is not UTF-8.
    let rest = cat(&[&[0], &s(b"c"), &[2, 0x01, 1], &s(b"t"), &s(&[0xFF])]);
    let e = decode_connect(&connect(b"MQTT", 5, 0b0000_0110, &rest)).unwrap_err();
    assert_eq!(
        (e.connack_code(), e.error),
        (0x99, ProtocolError::PayloadFormatInvalid)
    );
}

#[test]
fn connect_v5_property_rules() {
    let with = |props: &[u8]| {
        let rest = cat(&[&[props.len() as u8], props, &s(b"c")]);
        decode_connect(&connect(b"MQTT", 5, 2, &rest)).unwrap_err()
    };
    assert_eq!(
        with(&[0x21, 0, 0]).error,
        ProtocolError::InvalidPropertyValue(0x21)
    );
    assert_eq!(with(&[0x21, 0, 0]).connack_code(), 0x82);
    assert_eq!(
        with(&[0x27, 0, 0, 0, 0]).error,
        ProtocolError::InvalidPropertyValue(0x27)
    );
    assert_eq!(
        with(&[0x17, 2]).error,
        ProtocolError::InvalidPropertyValue(0x17)
    );
    assert_eq!(
        with(&[0x21, 0, 1, 0x21, 0, 2]).error,
        ProtocolError::DuplicateProperty(0x21)
    );
    // Topic Alias belongs to PUBLISH, not CONNECT.
    assert_eq!(
        with(&[0x23, 0, 1]).error,
        ProtocolError::InvalidProperty(0x23)
    );
    assert_eq!(
        with(&[0x16, 0, 1, 9]).error,
        ProtocolError::Protocol("authentication data without a method")
    );
    // A property running past the declared section.
    let rest = cat(&[&[2, 0x11, 0, 0, 0], &s(b"c")]);
    let e = decode_connect(&connect(b"MQTT", 5, 2, &rest)).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
}

#[test]
fn connect_trailing_or_missing_bytes() {
    let e = decode_connect(&connect(b"MQTT", 4, 2, &cat(&[&s(b"c"), b"x"]))).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
    // User name flag without a user name.
    let e = decode_connect(&connect(b"MQTT", 4, 0b1000_0010, &s(b"c"))).unwrap_err();
    assert!(matches!(e.error, ProtocolError::Malformed(_)));
    // A frame shorter than its header says.
    let mut f = connect(b"MQTT", 4, 2, &s(b"c"));
    f.pop();
    assert!(matches!(
        decode_connect(&f).unwrap_err().error,
        ProtocolError::Malformed(_)
    ));
}
