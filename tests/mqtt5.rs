//! The MQTT 5 features the README claims, over real TCP with a byte-level client: No
//! Local, Retain As Published, Retain Handling, DISCONNECT 0x04, property passthrough, the payload format check, what is declined (topic aliases
//! above the maximum, AUTH), `$`-topics, inbound Receive Maximum and the client's Maximum
//! Packet Size. Shared subscriptions, subscription identifiers and topic aliases are
//! tested in tests/mqtt5_more.rs; the Will Delay Interval and Message Expiry on a manual
//! clock in `src/shard/sim/timed/`.
//!
//! Where a test must show that something did NOT arrive, it then sends a sentinel on the
//! same path and asserts the sentinel is the next message: no waiting for silence.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{connect5, encode, session_expiry_props, Raw, TestServer};
use mqttbytes::v5::{
    ConnectProperties, Disconnect, DisconnectReasonCode, LastWill, Publish, PublishProperties,
    RetainForwardRule, SubscribeFilter, SubscribeReasonCode, WillProperties,
};
use mqttbytes::QoS;

const T: Duration = Duration::from_secs(5);

/// A connected MQTT 5 client with a clean start.
async fn client(gw: &TestServer, id: &str) -> Raw {
    Raw::connected_v5(gw.mqtt, &connect5(id, 60, true, None))
        .await
        .0
}

fn filter(path: &str, qos: QoS) -> SubscribeFilter {
    SubscribeFilter::new(path.into(), qos)
}

async fn subscribe(c: &mut Raw, f: SubscribeFilter) {
    let ack = c.subscribe_v5(1, vec![f]).await;
    assert!(
        matches!(
            ack.return_codes[..],
            [SubscribeReasonCode::QoS0 | SubscribeReasonCode::QoS1 | SubscribeReasonCode::QoS2]
        ),
        "subscription granted: {ack:?}"
    );
}

/// Sends a PUBLISH from a client that subscribes to nothing, waiting for its PUBACK at QoS 1.
async fn publish(c: &mut Raw, mut p: Publish) {
    if p.qos != QoS::AtMostOnce && p.pkid == 0 {
        p.pkid = 1;
    }
    c.send(&encode(|b| p.write(b))).await;
    if p.qos == QoS::AtLeastOnce {
        match c.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::PubAck(a)) => assert_eq!(a.pkid, p.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

fn msg(topic: &str, qos: QoS, payload: &str) -> Publish {
    Publish::new(topic, qos, payload.as_bytes().to_vec())
}

/// The PUBLISHes a client receives up to and including the one with payload `sentinel`
/// (which is not returned).
async fn publishes_until(c: &mut Raw, sentinel: &str) -> Vec<Publish> {
    let mut got = Vec::new();
    loop {
        let p = c
            .next_publish_v5(T)
            .await
            .unwrap_or_else(|| panic!("sentinel {sentinel:?} not received; got {got:?}"));
        if &p.payload[..] == sentinel.as_bytes() {
            return got;
        }
        got.push(p);
    }
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn no_local_skips_the_publishers_own_subscription() {
    let gw = TestServer::start("");
    let mut a = client(&gw, "nl-a").await;
    let mut b = client(&gw, "nl-b").await;
    let mut f = filter("nl/t", QoS::AtMostOnce);
    f.set_nolocal(true);
    subscribe(&mut a, f).await;
    subscribe(&mut b, filter("nl/t", QoS::AtMostOnce)).await;

    publish(&mut a, msg("nl/t", QoS::AtMostOnce, "from-a")).await;
    let got = b.next_publish_v5(T).await.expect("b gets a's message");
    assert_eq!(&got.payload[..], b"from-a");

    // a is still subscribed: b's message reaches it, and it is the first thing a gets.
    publish(&mut b, msg("nl/t", QoS::AtMostOnce, "from-b")).await;
    assert_eq!(
        payloads(&publishes_until(&mut a, "from-b").await),
        Vec::<String>::new(),
        "a received its own message despite No Local"
    );
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_messages() {
    let gw = TestServer::start("");
    let mut rap = client(&gw, "rap-yes").await;
    let mut plain = client(&gw, "rap-no").await;
    let mut f = filter("rap/t", QoS::AtLeastOnce);
    f.set_preserve_retain(true);
    subscribe(&mut rap, f).await;
    subscribe(&mut plain, filter("rap/t", QoS::AtLeastOnce)).await;

    let mut publisher = client(&gw, "rap-pub").await;
    let mut m = msg("rap/t", QoS::AtLeastOnce, "retained-live");
    m.retain = true;
    publish(&mut publisher, m).await;
    publish(&mut publisher, msg("rap/t", QoS::AtLeastOnce, "plain-live")).await;

    let r = rap.next_publish_v5(T).await.expect("rap gets it");
    assert_eq!((&r.payload[..], r.retain), (&b"retained-live"[..], true));
    let r = rap
        .next_publish_v5(T)
        .await
        .expect("rap gets the plain one");
    assert_eq!((&r.payload[..], r.retain), (&b"plain-live"[..], false));
    let p = plain.next_publish_v5(T).await.expect("plain gets it");
    assert_eq!(
        (&p.payload[..], p.retain),
        (&b"retained-live"[..], false),
        "without Retain As Published a live message has RETAIN 0"
    );
}

/// Retain Handling (MQTT 5 3.8.3.1): 0 sends retained messages on every SUBSCRIBE, 1 only
/// when the subscription is new, 2 never.
#[tokio::test]
async fn retain_handling_0_1_2_on_subscribe_and_resubscribe() {
    // One shard: retained messages reach other shards asynchronously, and this test is
    // about what a SUBSCRIBE does with the retained store, not about replication.
    let gw = TestServer::start("[shards]\ncount = 1");
    let mut publisher = client(&gw, "rh-pub").await;
    let mut kept = msg("rh/t", QoS::AtLeastOnce, "kept");
    kept.retain = true;
    publish(&mut publisher, kept).await;

    let cases = [
        (RetainForwardRule::OnEverySubscribe, true, true),
        (RetainForwardRule::OnNewSubscribe, true, false),
        (RetainForwardRule::Never, false, false),
    ];
    for (i, (rule, on_first, on_again)) in cases.into_iter().enumerate() {
        let mut c = client(&gw, &format!("rh-{i}")).await;
        for (round, expected) in [("first", on_first), ("again", on_again)] {
            let mut f = filter("rh/t", QoS::AtLeastOnce);
            f.set_retain_forward_rule(rule.clone());
            subscribe(&mut c, f).await;
            let sentinel = format!("sentinel-{i}-{round}");
            publish(&mut publisher, msg("rh/t", QoS::AtLeastOnce, &sentinel)).await;
            let before = publishes_until(&mut c, &sentinel).await;
            if expected {
                assert_eq!(
                    payloads(&before),
                    vec!["kept"],
                    "{rule:?}, {round} SUBSCRIBE sends the retained message"
                );
                assert!(before[0].retain, "retained message sent with RETAIN 1");
            } else {
                assert!(
                    before.is_empty(),
                    "{rule:?}, {round} SUBSCRIBE must not send retained: {:?}",
                    payloads(&before)
                );
            }
        }
    }
}

/// A CONNECT with a will on `topic` (QoS 1) with `delay` and the given session expiry.
fn with_will(id: &str, topic: &str, delay: u32, session_expiry: u32) -> mqttbytes::v5::Connect {
    let mut c = connect5(id, 60, true, Some(session_expiry_props(session_expiry)));
    let mut will = LastWill::new(topic, format!("will-of-{id}"), QoS::AtLeastOnce, false);
    will.properties = Some(WillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    c.last_will = Some(will);
    c
}

/// A subscriber of `will/#`.
async fn will_watcher(gw: &TestServer, id: &str) -> Raw {
    let mut w = client(gw, id).await;
    subscribe(&mut w, filter("will/#", QoS::AtLeastOnce)).await;
    w
}

#[tokio::test]
async fn disconnect_0x04_sends_the_will_and_0x00_does_not() {
    let gw = TestServer::start("");
    let mut watcher = will_watcher(&gw, "dw-watch").await;

    for (id, expiry) in [("dw-with", 0), ("dw-with-session", 30)] {
        let (mut dev, _) = Raw::connected_v5(gw.mqtt, &with_will(id, "will/dw", 0, expiry)).await;
        let d = Disconnect {
            reason_code: DisconnectReasonCode::DisconnectWithWillMessage,
            properties: None,
        };
        dev.send(&encode(|b| d.write(b))).await;
        assert!(dev.wait_closed(T).await);
        let will = watcher
            .next_publish_v5(T)
            .await
            .unwrap_or_else(|| panic!("{id}: DISCONNECT 0x04 publishes the will"));
        assert_eq!(&will.payload[..], format!("will-of-{id}").as_bytes());
    }

    let (mut dev, _) = Raw::connected_v5(gw.mqtt, &with_will("dw-normal", "will/dw", 0, 0)).await;
    dev.send(&encode(|b| Disconnect::new().write(b))).await;
    assert!(dev.wait_closed(T).await);
    let mut publisher = client(&gw, "dw-pub").await;
    publish(
        &mut publisher,
        msg("will/sentinel", QoS::AtLeastOnce, "sentinel"),
    )
    .await;
    assert_eq!(
        payloads(&publishes_until(&mut watcher, "sentinel").await),
        Vec::<String>::new(),
        "normal DISCONNECT 0x00 must not send the will"
    );
}

#[tokio::test]
async fn publish_properties_reach_subscribers_unchanged() {
    let gw = TestServer::start("");
    let mut v5_sub = client(&gw, "pt-sub").await;
    subscribe(&mut v5_sub, filter("pt/#", QoS::AtLeastOnce)).await;
    let mut publisher = client(&gw, "pt-pub").await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("pt/reply/ü".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr\xff")),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("k".into(), "v2".into()),
            ("empty".into(), String::new()),
        ],
        content_type: Some("application/json; charset=utf-8".into()),
        ..common::empty_publish_props()
    };
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut m = msg("pt/t", qos, "{\"a\":1}");
        m.properties = Some(sent.clone());
        if qos == QoS::ExactlyOnce {
            // Complete the inbound QoS 2 exchange by hand.
            m.pkid = 9;
            publisher.send(&encode(|b| m.write(b))).await;
            assert!(matches!(
                publisher.next_v5(T).await,
                Ok(mqttbytes::v5::Packet::PubRec(_))
            ));
            let rel = mqttbytes::v5::PubRel::new(9);
            publisher.send(&encode(|b| rel.write(b))).await;
            assert!(matches!(
                publisher.next_v5(T).await,
                Ok(mqttbytes::v5::Packet::PubComp(_))
            ));
        } else {
            publish(&mut publisher, m).await;
        }
        let got = v5_sub.next_publish_v5(T).await.expect("delivered");
        assert_eq!(&got.payload[..], b"{\"a\":1}");
        assert_eq!(got.properties.as_ref(), Some(&sent), "at {qos:?}");
    }
}

#[tokio::test]
async fn invalid_utf8_with_payload_format_1_is_refused_with_0x99() {
    let gw = TestServer::start("");
    let mut other = client(&gw, "pfi-other").await;
    subscribe(&mut other, filter("pfi/t", QoS::AtMostOnce)).await;

    let mut bad = client(&gw, "pfi-bad").await;
    let mut m = Publish::new("pfi/t", QoS::AtMostOnce, vec![0xff, 0xfe, 0x41]);
    m.properties = Some(PublishProperties {
        payload_format_indicator: Some(1),
        ..common::empty_publish_props()
    });
    bad.send(&encode(|b| m.write(b))).await;
    assert_eq!(bad.expect_disconnect_v5(T).await, 0x99);
    assert!(bad.wait_closed(T).await);

    // The other client is served as before, and the refused message went nowhere.
    assert!(other.ping_v5(T).await);
    let mut publisher = client(&gw, "pfi-pub").await;
    publish(&mut publisher, msg("pfi/t", QoS::AtMostOnce, "fine")).await;
    assert_eq!(
        payloads(&publishes_until(&mut other, "fine").await),
        Vec::<String>::new()
    );
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"protocol_error\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_topic_alias_above_the_maximum_gets_0x94() {
    let gw = TestServer::start("[mqtt]\ntopic_alias_maximum = 0");
    let mut c = client(&gw, "alias").await;
    let mut m = msg("ta/t", QoS::AtMostOnce, "x");
    m.properties = Some(PublishProperties {
        topic_alias: Some(1),
        ..common::empty_publish_props()
    });
    c.send(&encode(|b| m.write(b))).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x94);
    assert!(c.wait_closed(T).await);
}

#[tokio::test]
async fn a_shared_subscription_is_granted_next_to_a_plain_one() {
    let gw = TestServer::start("");
    let mut c = client(&gw, "shared").await;
    let ack = c
        .subscribe_v5(
            3,
            vec![
                filter("$share/g/t", QoS::AtLeastOnce),
                filter("plain/t", QoS::AtLeastOnce),
            ],
        )
        .await;
    assert_eq!(ack.pkid, 3);
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::QoS1, SubscribeReasonCode::QoS1]
    );
    assert!(c.ping_v5(T).await, "still connected");
}

#[tokio::test]
async fn an_auth_method_in_connect_gets_connack_0x8c() {
    let gw = TestServer::start("");
    let mut raw = Raw::connect(gw.mqtt).await;
    let c = connect5(
        "auth",
        60,
        true,
        Some(ConnectProperties {
            authentication_method: Some("SCRAM-SHA-1".into()),
            ..session_expiry_props(0)
        }),
    );
    let ack = raw.handshake_v5(&c).await;
    assert_eq!(ack.code as u8, 0x8C);
    assert!(raw.wait_closed(T).await);
}

#[tokio::test]
async fn dollar_topics_match_only_filters_that_name_them() {
    let gw = TestServer::start("");
    let mut hash = client(&gw, "sys-hash").await;
    subscribe(&mut hash, filter("#", QoS::AtMostOnce)).await;
    let mut plus = client(&gw, "sys-plus").await;
    subscribe(&mut plus, filter("+/x", QoS::AtMostOnce)).await;
    let mut sys = client(&gw, "sys-sys").await;
    subscribe(&mut sys, filter("$SYS/#", QoS::AtMostOnce)).await;

    let mut publisher = client(&gw, "sys-pub").await;
    publish(&mut publisher, msg("$SYS/x", QoS::AtLeastOnce, "dollar")).await;
    publish(&mut publisher, msg("a/x", QoS::AtLeastOnce, "plain")).await;

    let got = sys.next_publish_v5(T).await.expect("$SYS/# matches");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("$SYS/x", &b"dollar"[..])
    );
    assert_eq!(
        payloads(&publishes_until(&mut hash, "plain").await),
        Vec::<String>::new(),
        "# matched a $ topic"
    );
    assert_eq!(
        payloads(&publishes_until(&mut plus, "plain").await),
        Vec::<String>::new(),
        "+/x matched a $ topic"
    );
}

#[tokio::test]
async fn exceeding_our_receive_maximum_with_qos2_gets_0x93() {
    let gw = TestServer::start("[mqtt]\nreceive_maximum = 2");
    let (mut c, ack) = Raw::connected_v5(gw.mqtt, &connect5("rm", 60, true, None)).await;
    assert_eq!(ack.properties.and_then(|p| p.receive_max), Some(2));
    for pkid in 1..=2u16 {
        let mut m = msg("rm/t", QoS::ExactlyOnce, "q2");
        m.pkid = pkid;
        c.send(&encode(|b| m.write(b))).await;
        match c.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::PubRec(r)) => assert_eq!(r.pkid, pkid),
            other => panic!("expected PUBREC {pkid}, got {other:?}"),
        }
    }
    let mut m = msg("rm/t", QoS::ExactlyOnce, "q2");
    m.pkid = 3;
    c.send(&encode(|b| m.write(b))).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x93);
    assert!(c.wait_closed(T).await);
}

#[tokio::test]
async fn messages_above_the_clients_maximum_packet_size_are_dropped() {
    let gw = TestServer::start("");
    let small = connect5(
        "mp-small",
        60,
        true,
        Some(ConnectProperties {
            max_packet_size: Some(100),
            ..session_expiry_props(0)
        }),
    );
    let (mut c, _) = Raw::connected_v5(gw.mqtt, &small).await;
    subscribe(&mut c, filter("mp/t", QoS::AtLeastOnce)).await;
    let mut publisher = client(&gw, "mp-pub").await;
    let big = "x".repeat(500);
    publish(&mut publisher, msg("mp/t", QoS::AtMostOnce, &big)).await;
    publish(&mut publisher, msg("mp/t", QoS::AtLeastOnce, &big)).await;
    publish(&mut publisher, msg("mp/t", QoS::AtLeastOnce, "small")).await;
    assert_eq!(
        payloads(&publishes_until(&mut c, "small").await),
        Vec::<String>::new(),
        "a packet above the client's Maximum Packet Size was sent"
    );
    assert_eq!(
        gw.metric("gateway_messages_dropped_total{reason=\"too_large\"}")
            .await,
        2.0
    );
    assert!(c.ping_v5(T).await, "the client stays connected");
}
