//! ACLs end to end: the default rules (devices/%c/#) and %u rules on a real gateway,
//! SUBACK and PUBACK codes for 3.1.1 and 5, denied PUBLISHes dropped, the metric.

mod common;

use std::time::Duration;

use common::*;
use mqttbytes::v5::SubscribeReasonCode as R5;
use mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);

/// The default rules plus a team tree shared by all clients with the same username.
/// Usernames need a provider that checks credentials: JWT, whose `team` claim is the
/// authenticated username (anonymous stays for the rest).
const ACL: &str = r#"
[auth]
providers = ["anonymous", "jwt"]
[auth.jwt]
secret = "acl-test"
username_claim = "team"
[acl]
enabled = true
no_match = "deny"
rules = [
  { permission = "allow", action = "all", topic = "devices/%c/#" },
  { permission = "allow", action = "all", topic = "teams/%u/#" },
]
"#;

async fn denied(s: &TestServer, action: &str) -> f64 {
    s.metric(&format!("gateway_acl_denied_total{{action=\"{action}\"}}"))
        .await
}

/// A token of the ACL test secret with `claims` and an expiry.
fn token(mut claims: serde_json::Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    claims["exp"] = exp.into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"acl-test"),
    )
    .unwrap()
}

/// A raw 3.1.1 client, connected (optionally with a username, vouched for by the
/// token's `team` claim).
async fn raw_v4(s: &TestServer, id: &str, user: Option<&str>) -> Raw {
    let mut c = mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    if let Some(u) = user {
        c.set_login(u, &token(serde_json::json!({"sub": id, "team": u})));
    }
    connected_v4(s, c).await
}

async fn connected_v4(s: &TestServer, c: mqttbytes::v4::Connect) -> Raw {
    let id = c.client_id.clone();
    let mut raw = Raw::connect(s.mqtt).await;
    raw.send(&encode(|b| c.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success, "{id}")
        }
        other => panic!("expected CONNACK for {id}, got {other:?}"),
    }
    raw
}

async fn suback_v4(
    raw: &mut Raw,
    pkid: u16,
    filters: &[&str],
) -> Vec<mqttbytes::v4::SubscribeReasonCode> {
    let mut s = mqttbytes::v4::Subscribe::new(filters[0], QoS::AtLeastOnce);
    for f in &filters[1..] {
        s.add((*f).into(), QoS::AtLeastOnce);
    }
    s.pkid = pkid;
    raw.send(&encode(|b| s.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => a.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn default_rules_confine_subscriptions_v3_and_v5() {
    // The default [acl] of config/gateway.toml, turned back on.
    let s = TestServer::start("[acl]\nenabled = true\n");
    let mut c1 = raw_v4(&s, "c1", None).await;
    use mqttbytes::v4::SubscribeReasonCode as R4;
    let ok = R4::Success(QoS::AtLeastOnce);
    let codes = suback_v4(
        &mut c1,
        1,
        &[
            "devices/c1/+",
            "devices/#",
            "devices/c2/cmd",
            "devices/c1/#",
            "other",
        ],
    )
    .await;
    assert_eq!(codes, vec![ok, R4::Failure, R4::Failure, ok, R4::Failure]);

    let (mut c5, _) = Raw::connected_v5(s.mqtt, &connect5("c5", 30, true, None)).await;
    let f = |p: &str| mqttbytes::v5::SubscribeFilter::new(p.into(), QoS::AtLeastOnce);
    let ack = c5
        .subscribe_v5(
            1,
            vec![
                f("devices/c5/cmd"),
                f("devices/+/cmd"),
                f("$share/g/devices/c5/x"),
                f("$share/g/devices/#"),
            ],
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![R5::QoS1, R5::NotAuthorized, R5::QoS1, R5::NotAuthorized]
    );
    assert_eq!(denied(&s, "subscribe").await, 5.0);
    assert_eq!(denied(&s, "publish").await, 0.0);
}

#[tokio::test]
async fn denied_publish_v3_is_acknowledged_and_dropped() {
    let s = TestServer::start(ACL);
    // c2 listens on its own tree and on the team tree.
    let mut c2 = raw_v4(&s, "c2", Some("red")).await;
    let codes = suback_v4(&mut c2, 1, &["devices/c2/#", "teams/red/#"]).await;
    assert!(codes
        .iter()
        .all(|c| *c == mqttbytes::v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)));
    // c1 (same team) writes into c2's tree (denied), then to the team tree (allowed).
    let mut c1 = raw_v4(&s, "c1", Some("red")).await;
    c1.send(&Raw::publish_v4("devices/c2/cmd", 1, 10, b"denied"))
        .await;
    match c1.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::PubAck(a)) => assert_eq!(a.pkid, 10),
        other => panic!("a denied QoS 1 PUBLISH is still acknowledged in 3.1.1: {other:?}"),
    }
    c1.send(&Raw::publish_v4("teams/red/chat", 1, 11, b"allowed"))
        .await;
    match c1.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::PubAck(a)) => assert_eq!(a.pkid, 11),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Both come from c1's shard in order: the first PUBLISH c2 sees is the allowed one.
    match c2.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "teams/red/chat");
            assert_eq!(&p.payload[..], b"allowed");
        }
        other => panic!("expected the allowed PUBLISH, got {other:?}"),
    }
    // QoS 2 denied: PUBREC, and the PUBREL is completed normally.
    c1.send(&Raw::publish_v4("elsewhere", 2, 12, b"denied"))
        .await;
    match c1.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::PubRec(a)) => assert_eq!(a.pkid, 12),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c1.send(&encode(|b| mqttbytes::v4::PubRel::new(12).write(b)))
        .await;
    match c1.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::PubComp(a)) => assert_eq!(a.pkid, 12),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert_eq!(denied(&s, "publish").await, 2.0);
    // A client without a username has no team tree (%u matches nothing).
    let mut lone = raw_v4(&s, "lone", None).await;
    let codes = suback_v4(&mut lone, 2, &["teams/red/#"]).await;
    assert_eq!(codes, vec![mqttbytes::v4::SubscribeReasonCode::Failure]);
}

#[tokio::test]
async fn denied_publish_v5_gets_reason_0x87() {
    let s = TestServer::start(ACL);
    let (mut c, _) = Raw::connected_v5(s.mqtt, &connect5("v5c", 30, true, None)).await;
    let publish = |topic: &str, qos: QoS, pkid: u16| {
        let mut p = mqttbytes::v5::Publish::new(topic, qos, "x");
        p.pkid = pkid;
        encode(|b| p.write(b))
    };
    c.send(&publish("devices/other/x", QoS::AtLeastOnce, 1))
        .await;
    match c.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::PubAck(a)) => {
            assert_eq!(a.pkid, 1);
            assert_eq!(a.reason, mqttbytes::v5::PubAckReason::NotAuthorized);
        }
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    c.send(&publish("devices/other/x", QoS::ExactlyOnce, 2))
        .await;
    match c.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::PubRec(a)) => {
            assert_eq!(a.pkid, 2);
            assert_eq!(a.reason, mqttbytes::v5::PubRecReason::NotAuthorized);
        }
        other => panic!("expected PUBREC 0x87, got {other:?}"),
    }
    c.send(&publish("devices/v5c/x", QoS::AtLeastOnce, 3)).await;
    match c.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::PubAck(a)) => {
            assert_eq!(a.pkid, 3);
            assert_eq!(a.reason, mqttbytes::v5::PubAckReason::Success);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // QoS 0 denied: silently dropped, the connection lives on.
    c.send(&publish("nowhere", QoS::AtMostOnce, 0)).await;
    assert!(c.ping_v5(T).await);
    assert_eq!(denied(&s, "publish").await, 3.0);
}

#[tokio::test]
async fn a_will_on_a_denied_topic_refuses_the_connect() {
    let s = TestServer::start(ACL);
    let mut connect = connect5("willy", 30, true, None);
    connect.last_will = Some(mqttbytes::v5::LastWill::new(
        "other/will",
        "bye",
        QoS::AtMostOnce,
        false,
    ));
    let mut raw = Raw::connect(s.mqtt).await;
    let ack = raw.handshake_v5(&connect).await;
    assert_eq!(ack.code, mqttbytes::v5::ConnectReturnCode::NotAuthorized);
    let mut connect = connect5("willy", 30, true, None);
    connect.last_will = Some(mqttbytes::v5::LastWill::new(
        "devices/willy/status",
        "bye",
        QoS::AtMostOnce,
        false,
    ));
    Raw::connected_v5(s.mqtt, &connect).await;
    assert_eq!(denied(&s, "publish").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_pushes_are_not_subject_to_acls() {
    let s = TestServer::start("[acl]\nenabled = true\n");
    let mut c = raw_v4(&s, "pushed", None).await;
    let codes = suback_v4(&mut c, 1, &["devices/pushed/cmd"]).await;
    assert_eq!(
        codes,
        vec![mqttbytes::v4::SubscribeReasonCode::Success(
            QoS::AtLeastOnce
        )]
    );
    // The backend pushes to the device by client id on a topic outside its tree.
    let (code, body) = post_json(
        s.http,
        "/v1/push",
        &serde_json::json!({"client_id": "pushed", "topic": "fleet/all", "payload": "hi", "qos": 0}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    match c.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::Publish(p)) => assert_eq!(p.topic, "fleet/all"),
        other => panic!("expected the pushed PUBLISH, got {other:?}"),
    }
}

/// Issue 17.5: a device with a valid token for `sub = dev-x` that connects with username
/// `carol` is `dev-x` to a `users/%u/#` rule: it reaches its own tree, never carol's.
/// Before, `%u` was the CONNECT's unverified username field.
#[tokio::test]
async fn a_jwt_username_is_the_token_claim_not_the_connect_field() {
    let s = TestServer::start(
        r#"
[auth]
providers = ["jwt"]
[auth.jwt]
secret = "acl-test"
[acl]
enabled = true
no_match = "deny"
rules = [{ permission = "allow", action = "all", topic = "users/%u/#" }]
"#,
    );
    let mut c = mqttbytes::v4::Connect::new("dev-x");
    c.keep_alive = 30;
    c.set_login("carol", &token(serde_json::json!({"sub": "dev-x"})));
    let mut raw = connected_v4(&s, c).await;
    use mqttbytes::v4::SubscribeReasonCode as R4;
    let codes = suback_v4(&mut raw, 1, &["users/carol/#", "users/dev-x/#"]).await;
    assert_eq!(codes, vec![R4::Failure, R4::Success(QoS::AtLeastOnce)]);
    raw.send(&Raw::publish_v4("users/carol/inbox", 1, 2, b"x"))
        .await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::PubAck(a)) => assert_eq!(a.pkid, 2),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    assert_eq!(denied(&s, "publish").await, 1.0);
}

/// Issue 24.2: `deny subscribe test/nosubscribe` with `no_match = "allow"` refuses that
/// filter itself (0x80 / v5 0x87) but grants `#`, which then receives `TopicA` (live and
/// retained) and never `test/nosubscribe`. Before, `#` was refused because the deny rule
/// overlaps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_filters_wildcards_instead_of_refusing_them() {
    let s = TestServer::start(
        r#"
[acl]
enabled = true
no_match = "allow"
rules = [{ permission = "deny", action = "subscribe", topic = "test/nosubscribe" }]
"#,
    );
    let mut publisher = raw_v4(&s, "pub", None).await;
    let publish = |topic: &str, pkid: u16, retain: bool| {
        let mut p = mqttbytes::v4::Publish::new(topic, QoS::AtLeastOnce, topic.as_bytes().to_vec());
        p.pkid = pkid;
        p.retain = retain;
        encode(|b| p.write(b))
    };
    let mut pkid = 0;
    let mut send = async |p: &mut Raw, topic: &str, retain: bool| {
        pkid += 1;
        p.send(&publish(topic, pkid, retain)).await;
        match p.next_v4(T).await {
            Ok(mqttbytes::v4::Packet::PubAck(a)) => assert_eq!(a.pkid, pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    };
    send(&mut publisher, "test/nosubscribe", true).await;
    send(&mut publisher, "TopicR", true).await;

    let mut sub = raw_v4(&s, "analytics", None).await;
    use mqttbytes::v4::SubscribeReasonCode as R4;
    let codes = suback_v4(&mut sub, 1, &["test/nosubscribe", "#"]).await;
    assert_eq!(codes, vec![R4::Failure, R4::Success(QoS::AtLeastOnce)]);
    send(&mut publisher, "test/nosubscribe", false).await;
    send(&mut publisher, "TopicA", false).await;
    // Everything up to the live TopicA (published last) has arrived by then.
    let mut seen = vec![];
    while !seen.contains(&"TopicA".to_string()) {
        match sub.next_v4(T).await {
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    sub.send(&encode(|b| mqttbytes::v4::PubAck::new(p.pkid).write(b)))
                        .await;
                }
                seen.push(p.topic);
            }
            other => panic!("expected PUBLISHes, got {other:?} after {seen:?}"),
        }
    }
    assert!(seen.contains(&"TopicR".to_string()), "{seen:?}");
    assert!(!seen.iter().any(|t| t == "test/nosubscribe"), "{seen:?}");
    assert_eq!(denied(&s, "subscribe").await, 1.0);

    // MQTT 5: the same filter is refused with 0x87, `test/+` granted.
    let (mut c5, _) = Raw::connected_v5(s.mqtt, &connect5("v5sub", 30, true, None)).await;
    let f = |p: &str| mqttbytes::v5::SubscribeFilter::new(p.into(), QoS::AtLeastOnce);
    let ack = c5
        .subscribe_v5(2, vec![f("test/nosubscribe"), f("test/+")])
        .await;
    assert_eq!(ack.return_codes, vec![R5::NotAuthorized, R5::QoS1]);
}

/// A filtered subscription (issue 24.2) keeps its mark in the store: after a restart the
/// restored `#` of a persistent session still receives `TopicA` and not
/// `test/nosubscribe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_subscription_stays_filtered_after_a_restart() {
    let dir = tempdir::Dir::new("acl-restart");
    let extra = format!(
        "[store]\npath = \"{}\"\n[acl]\nenabled = true\nno_match = \"allow\"\n\
         rules = [{{ permission = \"deny\", action = \"subscribe\", topic = \"test/nosubscribe\" }}]\n",
        dir.0.join("data").display()
    );
    let persistent = |gw: &GatewayProcess| {
        let mut o = v4::options(gw.mqtt, "analytics");
        o.set_clean_session(false);
        o
    };
    let mut gw = GatewayProcess::start(&extra);
    let mut sub = v4::connect(persistent(&gw)).await;
    sub.subscribe("#", v4::QoS::AtLeastOnce).await;
    let _ = sub.client.disconnect().await;
    let _ = tokio::time::timeout(T, sub.task).await;
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(T).expect("stops on SIGTERM").success());

    let gw = GatewayProcess::start(&extra);
    let mut sub = v4::connect(persistent(&gw)).await;
    let publisher = v4::connect(v4::options(gw.mqtt, "pub")).await;
    for topic in ["test/nosubscribe", "TopicA"] {
        publisher
            .client
            .publish(
                topic,
                v4::QoS::AtLeastOnce,
                false,
                topic.as_bytes().to_vec(),
            )
            .await
            .unwrap();
    }
    // The subscription is the restored one (no SUBSCRIBE after the restart), and the
    // denied topic, published first, does not come before TopicA.
    let p = sub.next_publish(T).await.expect("TopicA after the restart");
    assert_eq!(p.topic, "TopicA");
}
