//! The gateway core over real TCP: MQTT 3.1.1 and 5 clients (rumqttc), byte-level raw
//! clients for what a library will not send, and the admin HTTP endpoints.

mod common;

use std::time::Duration;

use common::{v4, v5, Raw, TestServer};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn v4_publish_subscribe_all_qos() {
    let gw = TestServer::start("");
    let mut sub = v4::connect(v4::options(gw.mqtt, "sub-qos")).await;
    sub.subscribe("a/b", v4::QoS::ExactlyOnce).await;
    let publisher = v4::connect(v4::options(gw.mqtt, "pub-qos")).await;
    for (i, qos) in [
        v4::QoS::AtMostOnce,
        v4::QoS::AtLeastOnce,
        v4::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .client
            .publish("a/b", qos, false, format!("m{i}"))
            .await
            .unwrap();
        let p = sub.next_publish(T).await.expect("delivered");
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
        assert_eq!(p.qos, qos, "granted QoS 2 keeps the publisher's QoS");
        assert!(!p.retain);
    }
}

#[tokio::test]
async fn v5_publish_subscribe_and_wildcards() {
    let gw = TestServer::start("");
    let mut sub = v5::connect(v5::options(gw.mqtt, "v5-sub")).await;
    sub.subscribe("sensors/+/temp", v5::QoS::AtLeastOnce).await;
    sub.subscribe("alerts/#", v5::QoS::AtMostOnce).await;
    let publisher = v5::connect(v5::options(gw.mqtt, "v5-pub")).await;
    publisher
        .client
        .publish("sensors/k1/temp", v5::QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let p = sub.next_publish(T).await.expect("+ matched");
    assert_eq!(&p.topic[..], b"sensors/k1/temp");
    assert_eq!(p.qos, v5::QoS::AtLeastOnce);
    publisher
        .client
        .publish("alerts/fire/floor2", v5::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let p = sub.next_publish(T).await.expect("# matched");
    assert_eq!(
        p.qos,
        v5::QoS::AtMostOnce,
        "downgraded to the granted QoS 0"
    );
    publisher
        .client
        .publish("sensors/k1/humidity", v5::QoS::AtMostOnce, false, "no")
        .await
        .unwrap();
    assert!(
        sub.next_publish(Duration::from_millis(500)).await.is_none(),
        "non-matching topic delivered"
    );
}

#[tokio::test]
async fn messages_cross_shards_to_every_subscriber() {
    let gw = TestServer::start("[shards]\ncount = 4");
    let mut subs = Vec::new();
    for i in 0..12 {
        let mut s = v4::connect(v4::options(gw.mqtt, &format!("cross-{i}"))).await;
        s.subscribe("fleet/all", v4::QoS::AtLeastOnce).await;
        subs.push(s);
    }
    let p = v4::connect(v4::options(gw.mqtt, "cross-pub")).await;
    p.client
        .publish("fleet/all", v4::QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    for s in &mut subs {
        assert_eq!(
            &s.next_publish(T)
                .await
                .expect("every shard delivers")
                .payload[..],
            b"hello"
        );
    }
    assert_eq!(gw.metric("gateway_sessions").await, 13.0);
}

/// Waits for the next PUBACK `c` is sent.
async fn puback(c: &mut v4::Client) {
    assert!(
        c.wait_for(T, |p| matches!(p, v4::Packet::PubAck(_))).await,
        "no PUBACK"
    );
}

#[tokio::test]
async fn retained_message_reaches_late_subscriber_and_is_cleared() {
    let gw = TestServer::start("");
    let mut p = v4::connect(v4::options(gw.mqtt, "ret-pub")).await;
    p.client
        .publish("cfg/device9", v4::QoS::AtLeastOnce, true, "v1")
        .await
        .unwrap();
    // The PUBACK waits for the topic's home shard to store the update, and the
    // publisher's shard has it by then (src/shard/retained.rs): with two shards, every
    // shard holds it. (A fixed wait here was too short on a loaded machine.)
    puback(&mut p).await;
    let mut late = v4::connect(v4::options(gw.mqtt, "ret-late")).await;
    late.subscribe("cfg/+", v4::QoS::AtLeastOnce).await;
    let m = late.next_publish(T).await.expect("retained delivered");
    assert!(m.retain, "retained message carries RETAIN");
    assert_eq!(&m.payload[..], b"v1");
    // A live subscriber gets later retained publishes without RETAIN (3.3.1.3).
    p.client
        .publish("cfg/device9", v4::QoS::AtLeastOnce, true, "v2")
        .await
        .unwrap();
    let m = late.next_publish(T).await.expect("live delivery");
    assert!(!m.retain);
    puback(&mut p).await;
    // An empty retained payload clears it.
    p.client
        .publish("cfg/device9", v4::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    late.next_publish(T)
        .await
        .expect("the clearing message is delivered");
    // Live delivery does not wait for the store: the clear is in every shard's copy
    // once its PUBACK came.
    puback(&mut p).await;
    let mut later = v4::connect(v4::options(gw.mqtt, "ret-later")).await;
    later.subscribe("cfg/#", v4::QoS::AtLeastOnce).await;
    assert!(
        later
            .next_publish(Duration::from_millis(500))
            .await
            .is_none(),
        "cleared retained still sent"
    );
}

#[tokio::test]
async fn will_is_sent_on_abnormal_close_only() {
    let gw = TestServer::start("");
    let mut watcher = v4::connect(v4::options(gw.mqtt, "will-watch")).await;
    watcher.subscribe("status/+", v4::QoS::AtLeastOnce).await;

    // Abnormal: the socket just goes away.
    let mut o = v4::options(gw.mqtt, "will-a");
    o.set_last_will(v4::LastWill::new(
        "status/a",
        "gone",
        v4::QoS::AtLeastOnce,
        false,
    ));
    let a = v4::connect(o).await;
    a.task.abort();
    drop(a);
    let m = watcher.next_publish(T).await.expect("will published");
    assert_eq!(&m.topic[..], "status/a");
    assert_eq!(&m.payload[..], b"gone");

    // Normal DISCONNECT: no will.
    let mut o = v4::options(gw.mqtt, "will-b");
    o.set_last_will(v4::LastWill::new(
        "status/b",
        "gone",
        v4::QoS::AtLeastOnce,
        false,
    ));
    let b = v4::connect(o).await;
    b.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        watcher
            .next_publish(Duration::from_millis(500))
            .await
            .is_none(),
        "will sent after DISCONNECT"
    );
}

#[tokio::test]
async fn takeover_closes_the_old_connection_with_0x8e() {
    let gw = TestServer::start("");
    let mut first = v5::connect(v5::options(gw.mqtt, "dup-1")).await;
    let _second = v5::connect(v5::options(gw.mqtt, "dup-1")).await;
    let got = first.next_incoming(T).await;
    assert!(
        // rumqttc reports a server DISCONNECT as an error carrying the reason code.
        matches!(&got, Some(Err(e)) if e.contains("ServerDisconnect") && e.contains("SessionTakenOver")),
        "old connection told 0x8E, got {got:?}"
    );
    assert_eq!(
        gw.wait_metric("gateway_disconnects_total{reason=\"takeover\"}", T, |v| v
            >= 1.0)
            .await,
        1.0
    );
    // The old connection may linger in its close grace until its client closes.
    assert_eq!(
        gw.wait_metric("gateway_connections", T, |v| v == 1.0).await,
        1.0
    );
}

#[tokio::test]
async fn duplicate_reject_policy_refuses_the_newcomer() {
    let gw = TestServer::start("[mqtt]\nduplicate_client_id = \"reject\"");
    let _first = v4::connect(v4::options(gw.mqtt, "dup-r")).await;
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4("dup-r", 30, true)).await;
    match raw.recv_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::BadClientId)
        }
        other => panic!("expected CONNACK 0x02, got {other:?}"),
    }
    assert!(raw.closed_within(T).await);
    assert_eq!(
        gw.metric("gateway_connect_refused_total{reason=\"duplicate\"}")
            .await,
        1.0
    );
    // The refused connection lingers in its close grace (still counted) until then.
    assert_eq!(
        gw.wait_metric("gateway_connections", T, |v| v == 1.0).await,
        1.0,
        "the first connection stays"
    );
}

#[tokio::test]
async fn persistent_session_gets_messages_queued_while_offline() {
    let gw = TestServer::start("");
    let mut o = v4::options(gw.mqtt, "persist-1");
    o.set_clean_session(false);
    let mut dev = v4::connect(o.clone()).await;
    dev.subscribe("cmd/persist-1", v4::QoS::AtLeastOnce).await;
    dev.client.disconnect().await.unwrap();
    gw.wait_metric("gateway_connections", T, |v| v == 0.0).await;

    let backend = v4::connect(v4::options(gw.mqtt, "persist-backend")).await;
    for i in 0..5 {
        backend
            .client
            .publish(
                "cmd/persist-1",
                v4::QoS::AtLeastOnce,
                false,
                format!("c{i}"),
            )
            .await
            .unwrap();
    }
    gw.wait_metric("gateway_queued_messages", T, |v| v == 5.0)
        .await;
    assert_eq!(gw.metric("gateway_queued_messages").await, 5.0);

    let mut dev = v4::connect_raw(o);
    assert!(
        dev.wait_for(
            T,
            |p| matches!(p, v4::Packet::ConnAck(a) if a.session_present)
        )
        .await,
        "session present"
    );
    for i in 0..5 {
        let m = dev
            .next_publish(T)
            .await
            .expect("queued message delivered on reconnect");
        assert_eq!(&m.payload[..], format!("c{i}").as_bytes(), "in order");
    }
    assert_eq!(
        gw.wait_metric("gateway_queued_messages", T, |v| v == 0.0)
            .await,
        0.0
    );
}

#[tokio::test]
async fn clean_session_discards_state() {
    let gw = TestServer::start("");
    let mut o = v4::options(gw.mqtt, "clean-1");
    o.set_clean_session(false);
    let mut dev = v4::connect(o.clone()).await;
    dev.subscribe("cmd/clean-1", v4::QoS::AtLeastOnce).await;
    dev.client.disconnect().await.unwrap();
    gw.wait_metric("gateway_connections", T, |v| v == 0.0).await;
    o.set_clean_session(true);
    let mut dev = v4::connect_raw(o);
    assert!(
        dev.wait_for(
            T,
            |p| matches!(p, v4::Packet::ConnAck(a) if !a.session_present)
        )
        .await
    );
    let backend = v4::connect(v4::options(gw.mqtt, "clean-backend")).await;
    backend
        .client
        .publish("cmd/clean-1", v4::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    assert!(
        dev.next_publish(Duration::from_millis(500)).await.is_none(),
        "old subscription survived a clean start"
    );
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    let gw = TestServer::start("");
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::publish_v4("a/b", 0, 0, b"x")).await;
    assert!(raw.closed_within(T).await);
}

/// Each malformed input closes only its own connection; a second client is served throughout.
#[tokio::test]
async fn malformed_input_closes_only_that_connection() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 1024");
    let mut healthy = v4::connect(v4::options(gw.mqtt, "healthy")).await;
    healthy.subscribe("ok/#", v4::QoS::AtLeastOnce).await;
    let checker = v4::connect(v4::options(gw.mqtt, "checker")).await;

    let mut oversized = Raw::publish_v4("ok/big", 0, 0, &[7u8; 2000]);
    oversized.truncate(1100);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 16]),
        (
            "wildcard in PUBLISH topic",
            Raw::publish_v4("ok/+", 0, 0, b"x"),
        ),
        ("packet id 0 at QoS 1", {
            let mut p = Raw::publish_v4("ok/x", 1, 1, b"x");
            p[9] = 0; // packet id bytes follow the 2-byte header and the 6-byte topic
            p
        }),
        ("reserved packet type 0", vec![0x00, 0x00]),
        (
            "bad remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        ("oversized packet", oversized),
        ("second CONNECT", Raw::connect_v4("again", 30, true)),
        (
            "invalid UTF-8 topic",
            vec![0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x'],
        ),
        ("SUBSCRIBE with wrong flags", {
            let mut s = Raw::subscribe_v4("ok/x", 0, 1);
            s[0] = 0x80;
            s
        }),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.send(&Raw::connect_v4(&format!("bad-{i}"), 30, true))
            .await;
        assert!(
            matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::ConnAck(_))),
            "{what}: CONNACK"
        );
        raw.send(&bytes).await;
        assert!(raw.closed_within(T).await, "{what}: connection not closed");
        checker
            .client
            .publish("ok/alive", v4::QoS::AtLeastOnce, false, what)
            .await
            .unwrap();
        let m = healthy
            .next_publish(T)
            .await
            .unwrap_or_else(|| panic!("{what}: healthy client not served"));
        assert_eq!(&m.payload[..], what.as_bytes());
    }
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"protocol_error\"}")
            .await,
        9.0
    );
}

#[tokio::test]
async fn v5_protocol_errors_get_a_disconnect_reason_code() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 1024");
    // Oversized packet → DISCONNECT 0x95.
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5("v5-big", 30, None)).await;
    assert!(matches!(
        raw.recv_v5(T).await,
        Ok(mqttbytes::v5::Packet::ConnAck(_))
    ));
    let mut p = mqttbytes::v5::Publish::new("a/b", mqttbytes::QoS::AtMostOnce, vec![1u8; 2000]);
    p.pkid = 0;
    let mut b = bytes::BytesMut::new();
    p.write(&mut b).unwrap();
    raw.send(&b[..1100]).await;
    match raw.recv_v5(T).await {
        Ok(mqttbytes::v5::Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason_code,
                mqttbytes::v5::DisconnectReasonCode::PacketTooLarge
            )
        }
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(raw.closed_within(T).await);

    // Wildcard in a PUBLISH topic → DISCONNECT 0x90 (topic name invalid) or 0x82.
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5("v5-wild", 30, None)).await;
    assert!(matches!(
        raw.recv_v5(T).await,
        Ok(mqttbytes::v5::Packet::ConnAck(_))
    ));
    let p = mqttbytes::v5::Publish::new("a/#", mqttbytes::QoS::AtMostOnce, vec![1u8]);
    let mut b = bytes::BytesMut::new();
    p.write(&mut b).unwrap();
    raw.send(&b).await;
    match raw.recv_v5(T).await {
        Ok(mqttbytes::v5::Packet::Disconnect(d)) => assert!(
            matches!(
                d.reason_code,
                mqttbytes::v5::DisconnectReasonCode::TopicNameInvalid
                    | mqttbytes::v5::DisconnectReasonCode::ProtocolError
            ),
            "{:?}",
            d.reason_code
        ),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn mqtt_3_1_mqisdp_clients_are_accepted() {
    let gw = TestServer::start("");
    // CONNECT, protocol "MQIsdp" level 3, clean session, keep-alive 30, client id "old".
    let mut pkt = vec![0x10, 0];
    pkt.extend_from_slice(&[0x00, 0x06]);
    pkt.extend_from_slice(b"MQIsdp");
    pkt.extend_from_slice(&[0x03, 0x02, 0x00, 0x1e, 0x00, 0x03]);
    pkt.extend_from_slice(b"old");
    pkt[1] = (pkt.len() - 2) as u8;
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&pkt).await;
    match raw.recv_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw.send(&[0xc0, 0x00]).await; // PINGREQ
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::PingResp)
    ));
}

#[tokio::test]
async fn unsupported_protocol_level_is_refused_with_0x01() {
    let gw = TestServer::start("");
    let mut pkt = vec![0x10, 0, 0x00, 0x04];
    pkt.extend_from_slice(b"MQTT");
    pkt.extend_from_slice(&[0x07, 0x02, 0x00, 0x1e, 0x00, 0x01, b'x']);
    pkt[1] = (pkt.len() - 2) as u8;
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&pkt).await;
    match raw.recv_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(
                a.code,
                mqttbytes::v4::ConnectReturnCode::RefusedProtocolVersion
            )
        }
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
    assert!(raw.closed_within(T).await);
}

#[tokio::test]
async fn empty_client_id_gets_an_assigned_id_in_v5_and_needs_clean_session_in_v4() {
    let gw = TestServer::start("");
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5("", 30, None)).await;
    match raw.recv_v5(T).await {
        Ok(mqttbytes::v5::Packet::ConnAck(a)) => {
            let id = a
                .properties
                .and_then(|p| p.assigned_client_identifier)
                .expect("assigned id");
            assert!(!id.is_empty());
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4("", 30, false)).await;
    match raw.recv_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::BadClientId)
        }
        other => panic!("expected CONNACK 0x02, got {other:?}"),
    }
}

#[tokio::test]
async fn v5_connack_announces_limits_and_server_keep_alive() {
    let gw = TestServer::start(
        "[mqtt]\nmax_keepalive_secs = 60\nreceive_maximum = 10\nmax_packet_size = 4096",
    );
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5("ka-cap", 600, None)).await;
    match raw.recv_v5(T).await {
        Ok(mqttbytes::v5::Packet::ConnAck(a)) => {
            let p = a.properties.expect("properties");
            assert_eq!(p.server_keep_alive, Some(60), "capped keep-alive announced");
            assert_eq!(p.receive_max, Some(10));
            assert_eq!(p.max_packet_size, Some(4096));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn qos2_inbound_is_routed_exactly_once() {
    let gw = TestServer::start("");
    let mut sub = v4::connect(v4::options(gw.mqtt, "q2-sub")).await;
    sub.subscribe("q2/t", v4::QoS::ExactlyOnce).await;
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4("q2-pub", 30, true)).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let publish = Raw::publish_v4("q2/t", 2, 7, b"once");
    raw.send(&publish).await;
    assert!(matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::PubRec(r)) if r.pkid == 7));
    // Resent before PUBREL (DUP): acknowledged again, not routed again.
    let mut dup = publish.clone();
    dup[0] |= 0x08;
    raw.send(&dup).await;
    assert!(matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::PubRec(r)) if r.pkid == 7));
    raw.send(&[0x62, 0x02, 0x00, 0x07]).await; // PUBREL 7
    assert!(matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::PubComp(c)) if c.pkid == 7));
    assert_eq!(
        &sub.next_publish(T).await.expect("delivered").payload[..],
        b"once"
    );
    assert!(
        sub.next_publish(Duration::from_millis(500)).await.is_none(),
        "QoS 2 delivered twice"
    );
}

/// The outbound window: with Receive Maximum 2 the gateway sends 2 QoS 1 messages and
/// waits for PUBACKs before sending more.
#[tokio::test]
async fn v5_receive_maximum_limits_unacked_messages() {
    let gw = TestServer::start("");
    let props = mqttbytes::v5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: Some(2),
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    };
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5("window", 30, Some(props))).await;
    assert!(matches!(
        raw.recv_v5(T).await,
        Ok(mqttbytes::v5::Packet::ConnAck(_))
    ));
    let mut s = mqttbytes::v5::Subscribe::new("w/t", mqttbytes::QoS::AtLeastOnce);
    s.pkid = 1;
    let mut b = bytes::BytesMut::new();
    s.write(&mut b).unwrap();
    raw.send(&b).await;
    assert!(matches!(
        raw.recv_v5(T).await,
        Ok(mqttbytes::v5::Packet::SubAck(_))
    ));
    let publisher = v4::connect(v4::options(gw.mqtt, "window-pub")).await;
    for i in 0..5 {
        publisher
            .client
            .publish("w/t", v4::QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..2 {
        match raw.recv_v5(T).await {
            Ok(mqttbytes::v5::Packet::Publish(p)) => ids.push(p.pkid),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(
        raw.recv_v5(Duration::from_millis(500)).await.is_err(),
        "a third message exceeded Receive Maximum"
    );
    let mut ack = bytes::BytesMut::new();
    mqttbytes::v5::PubAck::new(ids[0]).write(&mut ack).unwrap();
    raw.send(&ack).await;
    assert!(
        matches!(raw.recv_v5(T).await, Ok(mqttbytes::v5::Packet::Publish(_))),
        "window reopened after PUBACK"
    );
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let gw = TestServer::start("");
    let (code, body) = common::http_get(gw.http, "/healthz").await;
    assert_eq!(code, 200);
    assert!(body.contains("ok"));
    assert_eq!(common::http_get(gw.http, "/readyz").await.0, 200);
    let _c = v4::connect(v4::options(gw.mqtt, "metrics-1")).await;
    let text = gw.metrics().await;
    assert!(text.contains("# TYPE gateway_connections gauge"));
    assert_eq!(common::metric_value(&text, "gateway_connections"), 1.0);
    assert!(common::metric_value(&text, "gateway_connects_total") >= 1.0);
    assert!(text.contains("gateway_disconnects_total{reason=\"keepalive\"}"));
    assert!(common::metric_value(&text, "process_resident_memory_bytes") > 0.0);
}
