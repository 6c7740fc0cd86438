//! Overload protection (`[limits]`): the connect-rate bucket and the handshake cap make
//! excess connections wait in the kernel backlog (and then get in), the per-IP cap
//! refuses and counts, and a client publishing flat out is slowed to its inbound rate by
//! pausing reads, losing nothing, while others stay served.

mod common;

use std::time::{Duration, Instant};

use common::{connect_from, Raw, TestServer};

async fn connack(raw: &mut Raw, timeout: Duration) -> bool {
    matches!(
        raw.recv_v4(timeout).await,
        Ok(mqttbytes::v4::Packet::ConnAck(a)) if a.code == mqttbytes::v4::ConnectReturnCode::Success
    )
}

async fn client(gw: &TestServer, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4(id, 60, true)).await;
    assert!(
        connack(&mut raw, Duration::from_secs(10)).await,
        "{id}: no CONNACK"
    );
    raw
}

#[tokio::test]
async fn connect_rate_makes_a_storm_wait_not_fail() {
    let gw = TestServer::start(
        "[shards]\ncount = 1\n[limits]\nmax_connect_rate = 10\nconnect_burst = 5",
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..25 {
        let addr = gw.mqtt;
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr).await;
            raw.send(&Raw::connect_v4(&format!("storm-{i}"), 60, true))
                .await;
            let ok = connack(&mut raw, Duration::from_secs(30)).await;
            (ok, raw)
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        let (ok, raw) = t.await.unwrap();
        assert!(ok, "a connection of the storm was not let in");
        keep.push(raw);
    }
    // 5 at once, then 10 per second: the last 20 cannot all be in before 2 s.
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "25 connections in {:?} despite max_connect_rate = 10",
        start.elapsed()
    );
    assert!(
        gw.metric("gateway_accept_paused_total{reason=\"connect_rate\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        gw.metric("gateway_connect_refused_total").await,
        0.0,
        "nobody was refused"
    );
}

#[tokio::test]
async fn max_handshaking_holds_new_connections_in_the_backlog() {
    let gw = TestServer::start(
        "[mqtt]\nconnect_timeout_secs = 2\n[shards]\ncount = 1\n[limits]\nmax_handshaking = 3",
    );
    // Three connections that never send CONNECT fill the handshake slots.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(Raw::connect(gw.mqtt).await);
    }
    gw.wait_metric("gateway_connections", Duration::from_secs(5), |v| v >= 3.0)
        .await;
    // An honest client waits (it is not refused) until the silent ones time out.
    let mut honest = Raw::connect(gw.mqtt).await;
    honest.send(&Raw::connect_v4("patient", 60, true)).await;
    assert!(connack(&mut honest, Duration::from_secs(20)).await);
    assert!(
        gw.metric("gateway_disconnects_total{reason=\"connect_timeout\"}")
            .await
            >= 1.0,
        "the honest client got in before any handshake slot was freed"
    );
    assert!(
        gw.metric("gateway_accept_paused_total{reason=\"handshaking\"}")
            .await
            >= 1.0
    );
    for mut s in silent {
        assert!(s.closed_within(Duration::from_secs(10)).await);
    }
}

#[tokio::test]
async fn per_ip_limit_refuses_and_counts() {
    let gw = TestServer::start("[limits]\nmax_connections_per_ip = 2");
    // connect_from(i) binds 127.0.0.(2 + i % 50): 0, 50 and 100 share one address.
    let mut same = Vec::new();
    for i in [0, 50] {
        let mut raw = Raw::from_stream(connect_from(i, gw.mqtt).await.unwrap());
        raw.send(&Raw::connect_v4(&format!("ip-{i}"), 60, true))
            .await;
        assert!(connack(&mut raw, Duration::from_secs(10)).await);
        same.push(raw);
    }
    let mut third = Raw::from_stream(connect_from(100, gw.mqtt).await.unwrap());
    third.send(&Raw::connect_v4("ip-100", 60, true)).await;
    assert!(third.closed_within(Duration::from_secs(10)).await);
    assert_eq!(
        gw.metric("gateway_connect_refused_total{reason=\"per_ip\"}")
            .await,
        1.0
    );
    // Another address is let in; the first address gets a slot back when one closes.
    let mut other = Raw::from_stream(connect_from(1, gw.mqtt).await.unwrap());
    other.send(&Raw::connect_v4("ip-1", 60, true)).await;
    assert!(connack(&mut other, Duration::from_secs(10)).await);
    drop(same.pop());
    gw.wait_metric("gateway_connections", Duration::from_secs(5), |v| v <= 2.0)
        .await;
    let mut again = Raw::from_stream(connect_from(150, gw.mqtt).await.unwrap());
    again.send(&Raw::connect_v4("ip-150", 60, true)).await;
    assert!(connack(&mut again, Duration::from_secs(10)).await);
}

/// 100 QoS 0 PUBLISHes written at once by a client limited to 20/s (burst 10): the
/// subscriber sees them arrive at about that rate, all of them, in order; meanwhile
/// another client is answered at once.
#[tokio::test]
async fn inbound_rate_is_enforced_by_pausing_reads_without_loss() {
    const N: usize = 100;
    const RATE: f64 = 20.0;
    const BURST: f64 = 10.0;
    let gw = TestServer::start("[limits]\npublish_rate = 20\npublish_burst = 10\nbytes_rate = 0");
    let mut sub = client(&gw, "flood-sub").await;
    sub.send(&Raw::subscribe_v4("flood/t", 0, 1)).await;
    assert!(matches!(
        sub.recv_v4(Duration::from_secs(10)).await,
        Ok(mqttbytes::v4::Packet::SubAck(_))
    ));
    let mut flood = client(&gw, "flooder").await;
    let mut bytes = Vec::new();
    for i in 0..N {
        bytes.extend(Raw::publish_v4("flood/t", 0, 0, format!("{i}").as_bytes()));
    }
    let start = Instant::now();
    flood.send(&bytes).await;

    let mut other = client(&gw, "bystander").await;
    let mut got = 0usize;
    let mut checked_bystander = false;
    while got < N {
        match sub.recv_v4(Duration::from_secs(30)).await {
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], format!("{got}").as_bytes(), "out of order");
                got += 1;
                let t = start.elapsed().as_secs_f64();
                assert!(
                    got as f64 <= RATE * t * 1.5 + BURST + 1.0,
                    "{got} messages after {t:.2}s exceed {RATE}/s"
                );
            }
            Ok(_) => continue,
            Err(e) => panic!("only {got} of {N} messages arrived: {e}"),
        }
        if got == 2 * BURST as usize && !checked_bystander {
            // The flooder is paused now; the bystander is served without waiting for it.
            other.send(&[0xc0, 0x00]).await;
            assert!(matches!(
                other.recv_v4(Duration::from_secs(5)).await,
                Ok(mqttbytes::v4::Packet::PingResp)
            ));
            checked_bystander = true;
        }
    }
    assert!(checked_bystander);
    assert!(gw.metric("gateway_rate_limit_pauses_total").await >= 1.0);
    assert_eq!(gw.metric("gateway_messages_dropped_total").await, 0.0);
    // The flooder itself is still connected and served.
    flood.send(&[0xc0, 0x00]).await;
    assert!(matches!(
        flood.recv_v4(Duration::from_secs(10)).await,
        Ok(mqttbytes::v4::Packet::PingResp)
    ));
}

/// The byte rate alone: 64 KiB/s with a 16 KiB burst, 256 KiB of PUBLISHes.
#[tokio::test]
async fn inbound_byte_rate_paces_large_publishes() {
    let gw =
        TestServer::start("[limits]\npublish_rate = 0\nbytes_rate = 65536\nbytes_burst = 16384");
    let mut sub = client(&gw, "bytes-sub").await;
    sub.send(&Raw::subscribe_v4("bytes/t", 0, 1)).await;
    assert!(sub.recv_v4(Duration::from_secs(10)).await.is_ok());
    let mut publ = client(&gw, "bytes-pub").await;
    let payload = vec![b'x'; 8 * 1024];
    let start = Instant::now();
    let mut bytes = Vec::new();
    for _ in 0..32 {
        bytes.extend(Raw::publish_v4("bytes/t", 0, 0, &payload));
    }
    let writer = tokio::spawn(async move {
        publ.send(&bytes).await;
        publ
    });
    for got in 1..=32usize {
        match sub.recv_v4(Duration::from_secs(30)).await {
            Ok(mqttbytes::v4::Packet::Publish(_)) => {}
            other => panic!("message {got} missing: {other:?}"),
        }
    }
    // 256 KiB at 64 KiB/s after a 16 KiB burst (plus one read's overshoot): well over 2 s.
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "256 KiB took only {:?}",
        start.elapsed()
    );
    assert!(gw.metric("gateway_rate_limit_pauses_total").await >= 1.0);
    let _ = writer.await;
}
