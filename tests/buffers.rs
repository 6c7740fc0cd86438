//! Buffers only while busy: idle connections hold none, frames split anywhere or packed
//! many to a read decode the same, the packet size limit is exact, and a slow subscriber
//! loses nothing, its publishers paced instead (the default) — or, with
//! `slow_consumer = "drop"`, only QoS 0 (counted) while its QoS 1 messages wait for it.
//! `tests/flow_control.rs` has the pacing's isolation, fan-in and memory bounds; a
//! held publisher outliving its keep-alive is tested on a manual clock
//! (`src/shard/sim/timed/keepalive.rs`).

mod common;

use std::time::Duration;

use common::{v4, Raw, TestServer};
use mqttbytes::v4::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_thousand_idle_clients_borrow_no_buffers() {
    let gw = TestServer::start("");
    let mut clients = Vec::new();
    for i in 0..1000 {
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.send(&Raw::connect_v4(&format!("idle-{i:05}"), 180, true))
            .await;
        raw.send(&Raw::subscribe_v4(
            &format!("devices/idle-{i:05}/cmd"),
            1,
            1,
        ))
        .await;
        clients.push(raw);
    }
    for raw in &mut clients {
        assert!(matches!(
            raw.recv_v4(T).await,
            Ok(mqttbytes::v4::Packet::ConnAck(_))
        ));
        assert!(matches!(
            raw.recv_v4(T).await,
            Ok(mqttbytes::v4::Packet::SubAck(_))
        ));
    }
    assert_eq!(
        gw.wait_metric("gateway_connections", T, |v| v == 1000.0)
            .await,
        1000.0
    );
    let lent = gw
        .wait_metric("gateway_buffer_pool_bytes{state=\"lent\"}", T, |v| v == 0.0)
        .await;
    assert_eq!(lent, 0.0, "idle connections hold pooled buffers");
}

/// CONNECT, SUBSCRIBE, a QoS 1 PUBLISH to itself (300-byte payload), PINGREQ. The topic
/// is the client's own: a copy of an earlier client's message still crossing shards must
/// not reach a later client that subscribed meanwhile.
fn session_bytes(id: &str) -> Vec<u8> {
    let topic = format!("split/{id}");
    let mut b = Raw::connect_v4(id, 60, true);
    b.extend(Raw::subscribe_v4(&topic, 1, 1));
    b.extend(Raw::publish_v4(&topic, 1, 2, &[b'z'; 300]));
    b.extend([0xc0, 0x00]);
    b
}

async fn expect_session_answers(raw: &mut Raw, what: &str) {
    let mut seen = (false, false, false, false, false);
    for _ in 0..5 {
        match raw.recv_v4(T).await {
            Ok(mqttbytes::v4::Packet::ConnAck(_)) => seen.0 = true,
            Ok(mqttbytes::v4::Packet::SubAck(_)) => seen.1 = true,
            Ok(mqttbytes::v4::Packet::PubAck(a)) if a.pkid == 2 => seen.2 = true,
            Ok(mqttbytes::v4::Packet::Publish(p)) if p.payload.len() == 300 => seen.3 = true,
            Ok(mqttbytes::v4::Packet::PingResp) => seen.4 = true,
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (true, true, true, true, true), "{what}");
}

#[tokio::test]
async fn frames_split_at_every_byte_boundary_decode_the_same() {
    let gw = TestServer::start("");
    let len = session_bytes("split-0000").len();
    for cut in 1..len {
        let bytes = session_bytes(&format!("split-{cut:04}"));
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.stream.set_nodelay(true).unwrap();
        raw.stream.write_all(&bytes[..cut]).await.unwrap();
        raw.stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        raw.stream.write_all(&bytes[cut..]).await.unwrap();
        expect_session_answers(&mut raw, &format!("split at {cut}")).await;
    }
}

#[tokio::test]
async fn one_byte_at_a_time_decodes() {
    let gw = TestServer::start("");
    let bytes = session_bytes("drip");
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.stream.set_nodelay(true).unwrap();
    for b in bytes {
        raw.stream.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    expect_session_answers(&mut raw, "byte by byte").await;
}

#[tokio::test]
async fn many_frames_in_one_read_are_all_answered() {
    let gw = TestServer::start("");
    let mut raw = Raw::connect(gw.mqtt).await;
    let mut bytes = Raw::connect_v4("burst", 60, true);
    for pkid in 1..=500u16 {
        bytes.extend(Raw::publish_v4("burst/t", 1, pkid, b"payload"));
    }
    raw.send(&bytes).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    for pkid in 1..=500u16 {
        match raw.recv_v4(T).await {
            Ok(mqttbytes::v4::Packet::PubAck(a)) => assert_eq!(a.pkid, pkid, "in order"),
            other => panic!("PUBACK {pkid}: {other:?}"),
        }
    }
}

/// A QoS 0 PUBLISH whose whole frame is exactly `total` bytes.
fn publish_of_size(total: usize) -> Vec<u8> {
    // Header: 1 byte type + remaining-length bytes; body: 2 + topic + payload.
    let topic = "max/t";
    let rl_len = |rl: usize| {
        if rl < 128 {
            1
        } else if rl < 16384 {
            2
        } else {
            3
        }
    };
    let mut payload = total - 1 - 2 - topic.len();
    while 1 + rl_len(2 + topic.len() + payload) + 2 + topic.len() + payload > total {
        payload -= 1;
    }
    let p = Raw::publish_v4(topic, 0, 0, &vec![b'm'; payload]);
    assert_eq!(p.len(), total, "built the size asked for");
    p
}

#[tokio::test]
async fn a_packet_of_exactly_max_packet_size_works_and_one_byte_more_closes() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 1024");
    let mut sub = v4::connect(v4::options(gw.mqtt, "max-sub")).await;
    sub.subscribe("max/t", v4::QoS::AtMostOnce).await;

    let mut ok = Raw::connect(gw.mqtt).await;
    ok.send(&Raw::connect_v4("max-ok", 60, true)).await;
    assert!(matches!(
        ok.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    ok.send(&publish_of_size(1024)).await;
    let m = sub
        .next_publish(T)
        .await
        .expect("a packet of exactly max_packet_size is delivered");
    assert_eq!(m.payload.len(), 1024 - 1 - 2 - 2 - 5);

    let mut big = Raw::connect(gw.mqtt).await;
    big.send(&Raw::connect_v4("max-big", 60, true)).await;
    assert!(matches!(
        big.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    big.send(&publish_of_size(1025)).await;
    assert!(
        big.closed_within(T).await,
        "one byte over closes the connection"
    );

    // Only that one: the first publisher is still served.
    ok.send(&publish_of_size(100)).await;
    assert!(sub.next_publish(T).await.is_some());
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"protocol_error\"}")
            .await,
        1.0
    );
}

/// A subscriber to "flood" whose event loop the test does not poll until it wants to
/// read: its socket is not read meanwhile.
async fn stalled_subscriber(gw: &TestServer, qos: rumqttc::QoS) -> rumqttc::EventLoop {
    let mut o = v4::options(gw.mqtt, "slowpoke");
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client.subscribe("flood", qos).await.unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = el.poll().await.unwrap() {
            return el;
        }
    }
}

/// Publishes `n` 1 KiB messages numbered 0.. to "flood" at each of `qos`.
async fn flood(publisher: &v4::Client, n: u32, qos: &[rumqttc::QoS]) {
    let payload = vec![7u8; 1024];
    for i in 0..n {
        let mut p = payload.clone();
        p[..4].copy_from_slice(&i.to_be_bytes());
        for &q in qos {
            publisher
                .client
                .publish("flood", q, false, p.clone())
                .await
                .unwrap();
        }
    }
}

/// Polls the stalled subscriber until it has read `n` messages at `qos`; their numbers.
async fn read_flood(el: &mut rumqttc::EventLoop, n: usize, qos: rumqttc::QoS) -> Vec<u32> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await else {
            panic!("only {} of {n} arrived", got.len());
        };
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev.unwrap() {
            if p.qos == qos {
                got.push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
            }
        }
    }
    got
}

#[tokio::test]
async fn with_drop_a_slow_subscriber_loses_only_qos0_and_gets_every_qos1_once_it_reads() {
    let gw = TestServer::start(
        "[tcp]\nsend_buffer_bytes = 4096\n[buffers]\noutbound_high_watermark = 8192\noutbound_low_watermark = 2048\nslow_consumer = \"drop\"\n[mqtt]\nmax_queued_messages = 1000",
    );
    let mut el = stalled_subscriber(&gw, rumqttc::QoS::AtLeastOnce).await;
    let publisher = v4::connect(v4::options(gw.mqtt, "flooder")).await;
    flood(
        &publisher,
        300,
        &[rumqttc::QoS::AtLeastOnce, rumqttc::QoS::AtMostOnce],
    )
    .await;
    let dropped = gw
        .wait_metric(
            "gateway_messages_dropped_total{reason=\"slow_consumer\"}",
            T,
            |v| v > 0.0,
        )
        .await;
    assert!(
        dropped > 0.0,
        "QoS 0 above the high watermark is dropped and counted"
    );

    // Now read: every QoS 1 message arrives, once, in order.
    let qos1 = read_flood(&mut el, 300, rumqttc::QoS::AtLeastOnce).await;
    assert_eq!(qos1, (0..300).collect::<Vec<_>>());
    assert_eq!(
        gw.metric("gateway_messages_dropped_total{reason=\"queue_full\"}")
            .await,
        0.0
    );
}

/// Pacing with a slow subscriber, `[shards] count = 1` so the publisher's shard sees
/// the congestion at once: on two shards it sees it up to a loop turn late, and when the
/// machine is busy that turn can be long enough to read everything the publisher sent
/// (which the subscriber's `outbound_max_bytes` then holds: nothing is lost, but there
/// was no pause to count; `pacing_across_shards_loses_nothing` covers that case).
const PACE_ONE_SHARD: &str = "[tcp]\nsend_buffer_bytes = 4096\n[buffers]\noutbound_high_watermark = 8192\noutbound_low_watermark = 2048\n[limits]\npublish_rate = 0\nbytes_rate = 0\n[shards]\ncount = 1";

#[tokio::test]
async fn a_slow_subscriber_paces_its_publisher_and_loses_nothing() {
    let gw = TestServer::start(PACE_ONE_SHARD);
    // A small receive window, so the kernel cannot take it all and end the congestion.
    let mut sub = small_window_subscriber(&gw).await;
    // 1 MiB of QoS 0 for a subscriber that reads nothing meanwhile: far more than its
    // high watermark and both sockets' buffers.
    let publisher = v4::connect(v4::options(gw.mqtt, "flooder")).await;
    const N: u32 = 1000;
    flood(&publisher, N, &[rumqttc::QoS::AtMostOnce]).await;
    let pauses = gw
        .wait_metric("gateway_publisher_pauses_total", T, |v| v >= 1.0)
        .await;
    assert!(
        pauses >= 1.0,
        "the publisher is paced, not the subscriber shed"
    );
    let congested = gw
        .wait_metric("gateway_congested_connections", T, |v| v >= 1.0)
        .await;
    assert!(congested >= 1.0);

    // Meanwhile other clients are served: CONNECT, SUBSCRIBE, PINGREQ are still read.
    let mut bystander = v4::connect(v4::options(gw.mqtt, "bystander")).await;
    bystander
        .client
        .subscribe("elsewhere", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        bystander
            .wait_for(T, |p| matches!(p, rumqttc::Packet::SubAck(_)))
            .await
    );

    // Now read: every message arrives, once, in order, and nothing was dropped.
    let got = read_raw_flood(&mut sub, N as usize).await;
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert_eq!(
        gw.metric("gateway_messages_dropped_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
    let congested = gw
        .wait_metric("gateway_congested_connections", T, |v| v == 0.0)
        .await;
    assert_eq!(
        congested, 0.0,
        "congestion ends once the subscriber drained"
    );
}

/// Reads `n` PUBLISHes from a raw subscriber; their numbers.
async fn read_raw_flood(sub: &mut Raw, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match sub.recv_v4(Duration::from_secs(20)).await {
            Ok(Packet::Publish(p)) => {
                got.push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()))
            }
            Ok(_) => {}
            Err(e) => panic!("{e} after {} of {n}", got.len()),
        }
    }
    got
}

/// A raw QoS 0 subscriber to "flood" with a 4 KiB receive buffer (the kernel would
/// otherwise take megabytes for it while the test does not read).
async fn small_window_subscriber(gw: &TestServer) -> Raw {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut sub = Raw::from_stream(socket.connect(gw.mqtt).await.unwrap());
    sub.send(&Raw::connect_v4("slowpoke", 60, true)).await;
    assert!(matches!(sub.recv_v4(T).await, Ok(Packet::ConnAck(_))));
    sub.send(&Raw::subscribe_v4("flood", 0, 1)).await;
    assert!(matches!(sub.recv_v4(T).await, Ok(Packet::SubAck(_))));
    sub
}

#[tokio::test]
async fn pacing_across_shards_loses_nothing() {
    let gw = TestServer::start(
        "[tcp]\nsend_buffer_bytes = 4096\n[buffers]\noutbound_high_watermark = 8192\noutbound_low_watermark = 2048\n[limits]\npublish_rate = 0\nbytes_rate = 0\n[shards]\ncount = 2",
    );
    // Publisher and subscriber on different shards (the home shard comes from the
    // client id).
    assert_ne!(
        gateway::mailbox::home_shard("slowpoke", 2),
        gateway::mailbox::home_shard("firehose", 2)
    );
    let mut el = stalled_subscriber(&gw, rumqttc::QoS::AtMostOnce).await;
    let publisher = v4::connect(v4::options(gw.mqtt, "firehose")).await;
    const N: u32 = 1000;
    flood(&publisher, N, &[rumqttc::QoS::AtMostOnce]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = read_flood(&mut el, N as usize, rumqttc::QoS::AtMostOnce).await;
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert_eq!(
        gw.metric("gateway_messages_dropped_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_trickling_subscriber_is_closed_as_a_slow_consumer_after_the_stall_timeout() {
    let gw = TestServer::start(
        "[tcp]\nsend_buffer_bytes = 4096\n[buffers]\noutbound_high_watermark = 32768\noutbound_low_watermark = 2048\n[limits]\npublish_rate = 0\nbytes_rate = 0\n[mqtt]\nwrite_stall_timeout_secs = 2\n[shards]\ntick_ms = 100",
    );
    let mut sub = small_window_subscriber(&gw).await;
    let publisher = v4::connect(v4::options(gw.mqtt, "flooder")).await;
    flood(&publisher, 400, &[rumqttc::QoS::AtMostOnce]).await;
    gw.wait_metric("gateway_publisher_pauses_total", T, |v| v >= 1.0)
        .await;
    // 1 KiB every 100 ms: the socket takes bytes well within every 2 s, but getting back
    // from the high watermark (32 KiB) to the low one (2 KiB) takes longer than the
    // stall timeout (2 s). Pacing every publisher to such a subscriber is bounded by
    // that timeout, not by the subscriber's patience.
    let started = tokio::time::Instant::now();
    let mut chunk = [0u8; 1024];
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // (What the kernel already holds for it is still readable after the close.)
        let _ = tokio::time::timeout(T, sub.stream.read(&mut chunk)).await;
        let stalls = gw
            .metric("gateway_disconnects_total{reason=\"slow_consumer\"}")
            .await;
        if stalls >= 1.0 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
    };
    assert!(closed, "closed as a slow consumer while still trickling");
    // Its congestion went with it: the publisher is read again.
    let congested = gw
        .wait_metric("gateway_congested_connections", T, |v| v == 0.0)
        .await;
    assert_eq!(congested, 0.0);
    let handled = gw
        .wait_metric("gateway_packets_received_total{type=\"publish\"}", T, |v| {
            v >= 400.0
        })
        .await;
    assert_eq!(handled, 400.0);
}
