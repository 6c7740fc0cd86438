//! The HTTP webhook provider end to end: allow, deny and cache; packets sent with or after
//! the CONNECT wait for the verdict and are read once, in order; a hanging or down backend
//! answers Server unavailable and stalls nobody; the webhook's ACL; a late verdict does not
//! take over a newer connection.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::auth::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_webhook_allow_deny_and_cache() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    assert_eq!(
        code(s.mqtt, false, "w1", Some("u"), Some("good")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "w2", Some("u"), Some("bad")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(
        code(s.mqtt, false, "w3", Some("u"), Some("bad")).await,
        V3_NOT_AUTHORIZED
    );
    // "ignore" and no later provider: refused.
    assert_eq!(
        code(s.mqtt, true, "w4", Some("u"), Some("ignore")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);
    // The same credentials again: answered from the cache, allow and deny alike.
    assert_eq!(
        code(s.mqtt, true, "w1", Some("u"), Some("good")).await,
        0x00
    );
    assert_eq!(
        code(s.mqtt, false, "w2", Some("u"), Some("bad")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        b.calls.load(Ordering::SeqCst),
        4,
        "cache hits do not call the backend"
    );
    // Anonymous from loopback is decided on the shard, without the backend.
    assert_eq!(code(s.mqtt, false, "anon", None, None).await, V3_OK);
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);
    assert_eq!(refused(&s, "auth").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_with_the_connect_wait_for_the_answer_in_order() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    let mut raw = Raw::connect(s.mqtt).await;
    // CONNECT, SUBSCRIBE, PUBLISH to it (QoS 1) and PINGREQ in one write.
    let mut bytes = connect_bytes(false, "order1", Some("u"), Some("good"));
    bytes.extend(Raw::subscribe_v4("o/1", 1, 7));
    bytes.extend(Raw::publish_v4("o/1", 1, 8, b"hi"));
    bytes.extend([0xc0, 0x00]);
    raw.send(&bytes).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        match raw.next_v4(T).await {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
                assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success);
                seen.push("connack")
            }
            Ok(mqttbytes::v4::Packet::SubAck(a)) => {
                assert_eq!(a.pkid, 7);
                seen.push("suback")
            }
            Ok(mqttbytes::v4::Packet::PubAck(a)) => {
                assert_eq!(a.pkid, 8);
                seen.push("puback")
            }
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"hi");
                seen.push("publish")
            }
            Ok(mqttbytes::v4::Packet::PingResp) => seen.push("pingresp"),
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen[0], "connack", "{seen:?}");
    assert_eq!(seen[1], "suback", "{seen:?}");
    assert_eq!(*seen.last().unwrap(), "pingresp", "{seen:?}");
    assert!(
        seen.contains(&"puback") && seen.contains(&"publish"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_while_waiting_are_read_once_accepted() {
    // What the client sent while its CONNECT was being checked sits unread in the
    // socket; once accepted it must be read without waiting for new bytes or the tick
    // (60 s here, so a read that waited for it would miss T).
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[mqtt]\nconnect_timeout_secs = 60\n[shards]\ntick_ms = 60000\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut raw = Raw::connect(s.mqtt).await;
    raw.send(&connect_bytes(false, "gated", Some("u"), Some("gate")))
        .await;
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Sent while the gateway waits for the backend.
    let mut later = Raw::subscribe_v4("g/1", 0, 3);
    later.extend([0xc0, 0x00]);
    raw.send(&later).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.gate.notify_one();
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(
        matches!(raw.next_v4(T).await, Ok(mqttbytes::v4::Packet::SubAck(a)) if a.pkid == 3),
        "SUBACK after acceptance"
    );
    assert!(
        matches!(raw.next_v4(T).await, Ok(mqttbytes::v4::Packet::PingResp)),
        "PINGRESP after the SUBACK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_answers_server_unavailable_and_stalls_nobody() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    // Two clients whose backend call hangs, one per version.
    let slow5 = tokio::spawn(connack(s.mqtt, true, "slow5", Some("u"), Some("hang")));
    let slow4 = tokio::spawn(connack(s.mqtt, false, "slow4", Some("u"), Some("hang")));
    // While the backend holds both requests, others are served: anonymous on the shard,
    // and a cached device.
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut anon = v4::connect(v4::options(s.mqtt, "anon-during")).await;
    anon.client
        .publish("x/y", v4::QoS::AtLeastOnce, false, "p")
        .await
        .unwrap();
    assert!(
        anon.wait_for(T, |p| matches!(p, v4::Packet::PubAck(_)))
            .await,
        "anonymous client served while the backend hangs"
    );
    assert_eq!(slow5.await.unwrap().0, V5_UNAVAILABLE);
    assert_eq!(slow4.await.unwrap().0, V3_UNAVAILABLE);
    assert_eq!(refused(&s, "auth_unavailable").await, 2.0);
    assert_eq!(refused(&s, "auth").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_backend_answers_server_unavailable() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = TestServer::start(&webhook_config(&format!("http://127.0.0.1:{port}/auth")));
    assert_eq!(
        code(s.mqtt, true, "d5", Some("u"), Some("good")).await,
        V5_UNAVAILABLE
    );
    assert_eq!(
        code(s.mqtt, false, "d4", Some("u"), Some("good")).await,
        V3_UNAVAILABLE
    );
    // Unavailable answers are not cached: still unavailable, still asked.
    assert_eq!(
        code(s.mqtt, false, "d4", Some("u"), Some("good")).await,
        V3_UNAVAILABLE
    );
    assert_eq!(refused(&s, "auth_unavailable").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_acl_applies_to_that_connection() {
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[acl]\nenabled = true\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut connect = connect5("hook1", 30, true, None);
    connect.set_login("u", "acl");
    let (mut raw, _) = Raw::connected_v5(s.mqtt, &connect).await;
    let f =
        |path: &str| mqttbytes::v5::SubscribeFilter::new(path.into(), mqttbytes::QoS::AtLeastOnce);
    // The webhook's lists replace the default rules (which would allow devices/hook1/#).
    let ack = raw
        .subscribe_v5(1, vec![f("down/hook1"), f("devices/hook1/#")])
        .await;
    use mqttbytes::v5::SubscribeReasonCode as R;
    assert_eq!(ack.return_codes, vec![R::QoS1, R::NotAuthorized]);
    for (pkid, topic, reason) in [
        (2, "up/hook1", mqttbytes::v5::PubAckReason::Success),
        (
            3,
            "devices/hook1/x",
            mqttbytes::v5::PubAckReason::NotAuthorized,
        ),
    ] {
        let mut p = mqttbytes::v5::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, "x");
        p.pkid = pkid;
        raw.send(&common::encode(|b| p.write(b))).await;
        match raw.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::PubAck(a)) => assert_eq!(a.reason, reason, "{topic}"),
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }
}

/// A device gives up on a connection whose verdict is slow and comes back on a new one,
/// which is let in first. When the old verdict arrives it must not take the new
/// connection over: the old one is closed without a CONNACK, the new one keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_verdict_does_not_take_over_a_newer_connection() {
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[shards]\ntick_ms = 100\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut old = TcpStream::connect(s.mqtt).await.unwrap();
    old.write_all(&connect_bytes(false, "flaky", Some("u"), Some("gate")))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Accepted a few ticks later than the old one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, mut new) = connack(s.mqtt, false, "flaky", Some("u"), Some("good")).await;
    assert_eq!(code, V3_OK);
    b.gate.notify_waiters();
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(T, old.read(&mut buf))
        .await
        .expect("the old connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "the old connection got no CONNACK: {:?}", &buf[..n]);
    // The new connection was not taken over: PINGREQ → PINGRESP.
    new.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(T, new.read_exact(&mut pong))
        .await
        .expect("PINGRESP")
        .expect("the new connection is open");
    assert_eq!(pong, [0xD0, 0x00]);
}
