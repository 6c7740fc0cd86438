//! TLS 1.3 and 1.2 connections past their CONNECT leave rustls for the gateway's own
//! record layer (`src/tls/record.rs`, `src/shard/records.rs`): they keep working both ways,
//! records the layer refuses close them with an alert, and an idle one costs about what
//! a plain one costs.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::tls::{idle_client, suback, Pki, TlsClient};
use common::{GatewayProcess, Raw, TestServer};

const RECORDS: &str = "gateway_tls_record_connections";

/// Polls `metric` until it is `want` (generous deadline: no speed assumed).
async fn wait_for(gw: &TestServer, metric: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = gw.metric(metric).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{metric} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TLS 1.3 and TLS 1.2 connections move to the record layer once connected and still
/// carry small and large (multi-record) messages both ways; closed ones leave the count.
#[tokio::test(flavor = "multi_thread")]
async fn tls_connections_move_to_the_record_layer_and_keep_working() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.expect("tls listener");
    let cfg = pki.client_config(None, false);
    let mut sub = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
    assert_eq!(sub.mqtt_connect("rec-sub"), Ok(0));
    let mut publ = TlsClient::connect(tls, cfg, b"").unwrap();
    assert_eq!(publ.mqtt_connect("rec-pub"), Ok(0));
    let mut old = TlsClient::connect(tls, pki.client_config(None, true), b"").unwrap();
    assert_eq!(old.mqtt_connect("rec-tls12"), Ok(0));
    wait_for(&gw, RECORDS, 3.0).await;

    sub.send(&Raw::subscribe_v4("rec/#", 1, 1)).unwrap();
    suback(&mut sub);
    old.send(&Raw::subscribe_v4("rec/#", 0, 2)).unwrap();
    suback(&mut old);
    for len in [5, 16 * 1024 - 20, 16 * 1024, 100_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        publ.send(&Raw::publish_v4("rec/big", 0, 0, &payload))
            .unwrap();
        for c in [&mut sub, &mut old] {
            let p = c.expect_publish(Duration::from_secs(10)).unwrap();
            assert_eq!(&p.payload[..], &payload[..], "{len} bytes");
        }
    }
    // The TLS 1.2 client publishes to a TLS 1.3 subscriber too.
    old.send(&Raw::publish_v4("rec/old", 0, 0, b"from 1.2"))
        .unwrap();
    let p = sub.expect_publish(Duration::from_secs(10)).unwrap();
    assert_eq!(&p.payload[..], b"from 1.2");
    // And a large one, in several TLS 1.2 records.
    let big: Vec<u8> = (0..70_000).map(|i| (i % 253) as u8).collect();
    old.send(&Raw::publish_v4("rec/old", 0, 0, &big)).unwrap();
    let p = sub.expect_publish(Duration::from_secs(10)).unwrap();
    assert_eq!(&p.payload[..], &big[..]);
    assert_eq!(gw.metric(RECORDS).await, 3.0);

    // A clean close_notify ends one (on either version); the count follows.
    publ.s.conn.send_close_notify();
    publ.s.flush().unwrap();
    wait_for(&gw, RECORDS, 2.0).await;
    old.s.conn.send_close_notify();
    old.s.flush().unwrap();
    wait_for(&gw, RECORDS, 1.0).await;
    drop(sub);
    wait_for(&gw, RECORDS, 0.0).await;
}

/// What the record layer refuses — a tampered record on either version — closes that
/// connection with an alert, counted as a TLS failure; others stay up.
#[tokio::test(flavor = "multi_thread")]
async fn refused_records_close_the_connection_with_an_alert() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.expect("tls listener");
    let cfg = pki.client_config(None, false);
    let mut bystander = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
    assert_eq!(bystander.mqtt_connect("bystander"), Ok(0));
    let mut tampered = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
    assert_eq!(tampered.mqtt_connect("tampered"), Ok(0));
    let mut tampered12 = TlsClient::connect(tls, pki.client_config(None, true), b"").unwrap();
    assert_eq!(tampered12.mqtt_connect("tampered12"), Ok(0));
    wait_for(&gw, RECORDS, 3.0).await;
    let failures = "gateway_tls_handshake_failures_total";
    let before = gw.metric(failures).await;

    // An application-data record that is not from this session.
    tampered
        .s
        .sock
        .write_all(&[
            23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
        ])
        .unwrap();
    let err = tampered.recv(Duration::from_secs(10)).unwrap_err();
    assert!(err.contains("BadRecordMac"), "{err}");
    // The same over TLS 1.2: the alert comes back in a TLS 1.2 record.
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend(1..=40u8);
    tampered12.s.sock.write_all(&forged).unwrap();
    let err = tampered12.recv(Duration::from_secs(10)).unwrap_err();
    assert!(err.contains("BadRecordMac"), "{err}");

    wait_for(&gw, failures, before + 2.0).await;
    wait_for(&gw, RECORDS, 1.0).await;
    bystander.send(&[0xc0, 0]).unwrap();
    assert!(matches!(
        bystander.recv(Duration::from_secs(10)),
        Ok(mqttbytes::v4::Packet::PingResp)
    ));
}

/// A TLS 1.3 client's KeyUpdates (rustls asks for the gateway's too) are followed on
/// the record layer, with the handshake on a handshake thread (the default) and on the
/// shard, for devices homed on either of two shards (most are handed from the shard that
/// accepted them to their home, secrets and all): messages keep flowing both ways across
/// several generations of keys, and nothing counts as a TLS failure.
#[tokio::test(flavor = "multi_thread")]
async fn key_updates_from_the_client_are_followed_both_ways() {
    for more in ["", "[limits]\ntls_handshakes_on_shards = true\n"] {
        let pki = Pki::new();
        let gw = TestServer::start(&pki.toml(&format!("[shards]\ncount = 2\n{more}")));
        let tls = gw.tls.expect("tls listener");
        let cfg = pki.client_config(None, false);
        let ids = (0..)
            .map(|i| format!("ku-{i}"))
            .filter(|id| gateway::mailbox::home_shard(id, 2) == 0)
            .take(4)
            .chain(
                (0..)
                    .map(|i| format!("ku-{i}"))
                    .filter(|id| gateway::mailbox::home_shard(id, 2) == 1)
                    .take(4),
            );
        let mut devices = Vec::new();
        for id in ids {
            let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
            assert_eq!(c.mqtt_connect(&id), Ok(0));
            c.send(&Raw::subscribe_v4(&format!("ku/{id}"), 0, 1))
                .unwrap();
            suback(&mut c);
            devices.push((id, c));
        }
        wait_for(&gw, RECORDS, 8.0).await;
        let failures = "gateway_tls_handshake_failures_total";
        let before = gw.metric(failures).await;
        for round in 0..5u8 {
            for (id, c) in devices.iter_mut() {
                // The KeyUpdate goes out ahead of the client's next record.
                c.s.conn.refresh_traffic_keys().unwrap();
                c.send(&[0xc0, 0]).unwrap();
                assert!(
                    matches!(
                        c.recv(Duration::from_secs(10)),
                        Ok(mqttbytes::v4::Packet::PingResp)
                    ),
                    "{more:?} {id} round {round}"
                );
            }
            // Each device publishes to the next one's topic, in several records.
            let payload = vec![round; 20_000];
            for i in 0..devices.len() {
                let to = format!("ku/{}", devices[(i + 1) % devices.len()].0);
                devices[i]
                    .1
                    .send(&Raw::publish_v4(&to, 0, 0, &payload))
                    .unwrap();
            }
            for (id, c) in devices.iter_mut() {
                let p = c.expect_publish(Duration::from_secs(10)).unwrap();
                assert_eq!(&p.payload[..], &payload[..], "{more:?} {id} round {round}");
            }
        }
        assert_eq!(gw.metric(failures).await, before, "{more:?}");
        assert_eq!(gw.metric(RECORDS).await, 8.0, "{more:?}");
    }
}

/// An idle TLS 1.3 or TLS 1.2 connection costs at most 2 KiB of resident memory more
/// than a plain one (with rustls kept for life it was ~7.6 KiB more; `tls_idle_memory.sh` measures
/// the figure at scale). Both gateways are fresh processes, measured the same way.
#[test]
fn an_idle_tls_connection_costs_about_what_a_plain_one_costs() {
    let n = 600;
    let pki = Pki::new();
    // None: plain; Some(tls12): TLS of that version.
    let measure = |tls: Option<bool>| {
        let gw = GatewayProcess::start(&pki.toml(
            "[limits]\nmax_connect_rate = 0\nmax_handshaking = 0\nmax_connections_per_ip = 0",
        ));
        let tls_addr = gw.tls.expect("the gateway announced tls_addr");
        let cfg = pki.client_config(None, tls == Some(true));
        // Warm up (first handshake, pools, thread stacks) before the baseline.
        let warm = TlsClient::connect(tls_addr, cfg.clone(), b"").unwrap();
        drop(warm);
        std::thread::sleep(Duration::from_millis(300));
        let before = gw.rss_bytes();
        let via = Some((tls_addr, &cfg)).filter(|_| tls.is_some());
        let _idle: Vec<_> = (0..n)
            .map(|i| idle_client(gw.mqtt, via, &format!("idle-{i}")))
            .collect();
        // Settled: every TLS connection on the record layer (it is idle by then).
        let deadline = Instant::now() + Duration::from_secs(60);
        let rt = tokio::runtime::Runtime::new().unwrap();
        while tls.is_some() && rt.block_on(gw.metric(RECORDS)) != n as f64 {
            assert!(Instant::now() < deadline, "not all on the record layer");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        gw.rss_bytes().saturating_sub(before) as f64 / n as f64
    };
    let plain = measure(None);
    let tls13 = measure(Some(false));
    let tls12 = measure(Some(true));
    println!(
        "{n} idle connections: plain {plain:.0} B/conn, TLS 1.3 {tls13:.0}, TLS 1.2 {tls12:.0}"
    );
    for (version, tls) in [("1.3", tls13), ("1.2", tls12)] {
        assert!(
            tls - plain <= 2048.0,
            "an idle TLS {version} connection costs {:.0} B more than a plain one",
            tls - plain
        );
    }
}

/// A read that ends inside a record right after the CONNECT: the partial record is
/// inside rustls, so the connection must not leave rustls until the record is whole —
/// also on the home shard after a handoff (eight ids over two shards: some are handed
/// off). The rest of the record arrives after the CONNACK and is read whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_split_after_the_connect_is_read_whole() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.expect("tls listener");
    let cfg = pki.client_config(None, false);
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        let records = |c: &mut TlsClient, plain: &[u8]| {
            c.s.conn.writer().write_all(plain).unwrap();
            let mut wire = Vec::new();
            while c.s.conn.wants_write() {
                c.s.conn.write_tls(&mut wire).unwrap();
            }
            wire
        };
        let mut first = records(&mut c, &Raw::connect_v4(&format!("split-{i}"), 60, true));
        let second = records(&mut c, &Raw::subscribe_v4(&format!("split/{i}"), 0, 1));
        first.extend_from_slice(&second[..3]);
        c.s.sock.write_all(&first).unwrap();
        match c.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => assert_eq!(a.code as u8, 0),
            other => panic!("no CONNACK: {other:?}"),
        }
        c.s.sock.write_all(&second[3..]).unwrap();
        suback(&mut c);
        clients.push(c);
    }
    wait_for(&gw, RECORDS, 8.0).await;
}

/// A paused connection keeps the ciphertext it has not handled yet: a flood of
/// one-record PUBLISHes over TLS 1.2 and TLS 1.3 (both on the record layer: the rest of
/// a read waits in `tls_in`) under a publish rate loses nothing and keeps order.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_tls_flood_loses_nothing_on_either_layer() {
    const N: usize = 40;
    let pki = Pki::new();
    let gw = TestServer::start(
        &pki.toml("[limits]\npublish_rate = 40\npublish_burst = 5\nbytes_rate = 0"),
    );
    let mut sub = Raw::connect(gw.mqtt).await;
    sub.send(&Raw::connect_v4("flood-sub", 60, true)).await;
    assert!(sub.recv_v4(Duration::from_secs(10)).await.is_ok());
    sub.send(&Raw::subscribe_v4("flood/t", 0, 1)).await;
    assert!(sub.recv_v4(Duration::from_secs(10)).await.is_ok());
    for tls12 in [true, false] {
        let mut flood =
            TlsClient::connect(tls_of(&gw), pki.client_config(None, tls12), b"").unwrap();
        assert_eq!(flood.mqtt_connect(&format!("flooder-{tls12}")), Ok(0));
        wait_for(&gw, RECORDS, 1.0).await;
        // One TLS record per PUBLISH, all written at once.
        let mut wire = Vec::new();
        for i in 0..N {
            let payload = format!("{i:04}").repeat(250);
            let publish = Raw::publish_v4("flood/t", 0, 0, payload.as_bytes());
            flood.s.conn.writer().write_all(&publish).unwrap();
            while flood.s.conn.wants_write() {
                flood.s.conn.write_tls(&mut wire).unwrap();
            }
        }
        flood.s.sock.write_all(&wire).unwrap();
        for i in 0..N {
            match sub.recv_v4(Duration::from_secs(30)).await {
                Ok(mqttbytes::v4::Packet::Publish(p)) => {
                    assert_eq!(
                        &p.payload[..4],
                        format!("{i:04}").as_bytes(),
                        "tls12 {tls12}"
                    );
                    assert_eq!(p.payload.len(), 1000);
                }
                other => panic!("message {i} (tls12 {tls12}): {other:?}"),
            }
        }
    }
    assert!(gw.metric("gateway_rate_limit_pauses_total").await >= 2.0);
}

fn tls_of(gw: &TestServer) -> std::net::SocketAddr {
    gw.tls.expect("tls listener")
}
