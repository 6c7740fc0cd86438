//! Who wins a client id across the fleet (issue 19 point 4): two devices with one client
//! id connecting to two nodes at the same instant leave exactly one connected, every
//! time, without the loser's will; a client id flapping between nodes is slowed down.
//! Real gateway processes on one real `nats-server` with JetStream.

mod common;

use std::time::Duration;

use common::fleet::{self, total, wait_applied, DEADLINE};
use common::{connect5, encode, Raw};
use mqttbytes::v5::{LastWill, Packet};
use mqttbytes::QoS;

/// MQTT 5 DISCONNECT reason codes.
const SESSION_TAKEN_OVER: u8 = 0x8E;
const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;

/// The CONNECT of a device `id` with a will on `wills/<id>`.
fn connect_with_will(id: &str) -> Vec<u8> {
    let mut c = connect5(id, 60, true, None);
    c.last_will = Some(LastWill::new(
        format!("wills/{id}"),
        "gone",
        QoS::AtMostOnce,
        false,
    ));
    encode(|b| c.write(b))
}

/// Expects a successful CONNACK on `raw`.
async fn connack(raw: &mut Raw, id: &str) {
    match raw.next_v5(DEADLINE).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(
            a.code,
            mqttbytes::v5::ConnectReturnCode::Success,
            "CONNACK for {id}"
        ),
        other => panic!("expected CONNACK for {id}, got {other:?}"),
    }
}

/// A subscriber to every will on `gw`.
async fn will_watcher(gw: &common::GatewayProcess, id: &str) -> Raw {
    let (mut raw, _) = Raw::connected_v5(gw.mqtt, &connect5(id, 60, true, None)).await;
    let filter = mqttbytes::v5::SubscribeFilter::new("wills/#".into(), QoS::AtMostOnce);
    raw.subscribe_v5(1, vec![filter]).await;
    raw
}

/// The first packet either connection gets: `(0, code)` when `a` got a DISCONNECT
/// with `code`, `(1, code)` for `b`.
async fn first_disconnect(a: &mut Raw, b: &mut Raw) -> (usize, u8) {
    let (which, packet) = tokio::select! {
        p = a.next_v5(DEADLINE) => (0, p),
        p = b.next_v5(DEADLINE) => (1, p),
    };
    match packet {
        Ok(Packet::Disconnect(d)) => (which, d.reason_code as u8),
        other => panic!("expected one connection to be taken over, got {other:?} on {which}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_id_connecting_to_two_nodes_at_once_leaves_exactly_one() {
    const ROUNDS: usize = 200;
    let nodes = ["node-a", "node-b"];
    let (_nats, gw, kv) = fleet::start("arb-race", &nodes, "").await;
    let mut watchers = [
        will_watcher(&gw[0], "watch-a").await,
        will_watcher(&gw[1], "watch-b").await,
    ];
    // The watchers' own connects.
    wait_applied(&gw, 2).await;
    for round in 0..ROUNDS {
        let id = format!("race-{round}");
        // Both sockets first, then both CONNECTs at once.
        let (a, b) = tokio::join!(Raw::connect(gw[0].mqtt), Raw::connect(gw[1].mqtt));
        let (mut a, mut b) = (a, b);
        let connect = connect_with_will(&id);
        tokio::join!(a.send(&connect), b.send(&connect));
        tokio::join!(connack(&mut a, &id), connack(&mut b, &id));

        // One of them is taken over (0x8E) and closed ...
        let (loser, code) = first_disconnect(&mut a, &mut b).await;
        assert_eq!(code, SESSION_TAKEN_OVER, "round {round}");
        let (lost, won) = if loser == 0 { (a, b) } else { (b, a) };
        let (mut lost, mut won) = (lost, won);
        assert!(
            lost.wait_closed(DEADLINE).await,
            "round {round}: loser closed"
        );
        // ... and once both nodes applied both connects and the loser's close, the
        // registry names the other, which is still connected.
        wait_applied(&gw, 2 + 4 * round + 3).await;
        let winner = nodes[1 - loser];
        assert_eq!(
            fleet::holder(&kv, &id).await.as_deref(),
            Some(winner),
            "round {round}: the registry and the surviving connection agree"
        );
        assert!(
            won.ping_v5(DEADLINE).await,
            "round {round}: the winner on {winner} stays connected"
        );
        // A clean end, so no will of the winner either.
        won.send(&[0xe0, 0x00]).await;
        assert!(won.wait_closed(DEADLINE).await);
        wait_applied(&gw, 2 + 4 * (round + 1)).await;
    }
    // Every loser was taken over by the other node, and no will was published.
    let lost = total(&gw, "gateway_fleet_arbitration_lost_total").await;
    assert_eq!(lost, ROUNDS as f64);
    for w in &mut watchers {
        let will = w.next_publish_v5(Duration::from_millis(500)).await;
        assert!(will.is_none(), "a loser's will was published: {will:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_flapping_between_nodes_is_slowed_down() {
    const CONNECTS: usize = 20;
    let nodes = ["node-a", "node-b"];
    // Each node takes the client id over from the other at most once a minute.
    let extra = "takeover_min_interval_ms = 60000";
    let (_nats, gw, kv) = fleet::start("arb-flap", &nodes, extra).await;
    let mut conns = Vec::with_capacity(CONNECTS);
    for i in 0..CONNECTS {
        let mut raw = Raw::connect(gw[i % 2].mqtt).await;
        raw.send(&connect_with_will("flap")).await;
        connack(&mut raw, "flap").await;
        conns.push(raw);
    }
    // Every connection but one was closed, each one's change applied.
    wait_applied(&gw, 2 * CONNECTS - 1).await;
    let takeovers = total(&gw, "gateway_fleet_takeovers_total").await;
    let throttled = total(&gw, "gateway_fleet_takeovers_throttled_total").await;
    assert!(
        takeovers <= 2.0,
        "each node took the client id over at most once: {takeovers}"
    );
    assert!(throttled >= 1.0, "the flapping was throttled: {throttled}");
    // The registry was written at most once per connect that was not throttled.
    let updates = total(
        &gw,
        "gateway_fleet_registry_ops_total{op=\"update\",outcome=\"ok\"}",
    )
    .await;
    assert!(updates + throttled <= CONNECTS as f64, "{updates} updates");

    // Exactly one connection is left, on the node the registry names.
    let holder = fleet::holder(&kv, "flap").await.expect("an entry");
    let mut alive = Vec::new();
    let mut rate_exceeded = 0;
    for (i, raw) in conns.iter_mut().enumerate() {
        match raw.next_v5(Duration::from_millis(200)).await {
            Ok(Packet::Disconnect(d)) if d.reason_code as u8 == CONNECTION_RATE_EXCEEDED => {
                rate_exceeded += 1;
            }
            Err("timeout") => alive.push(i),
            _ => {}
        }
    }
    // A throttled connection already replaced by a newer one on its node was closed
    // as taken over; the live one heard 0x9F.
    assert!(
        rate_exceeded >= 1 && rate_exceeded as f64 <= throttled,
        "{rate_exceeded} connections closed with 0x9F, {throttled} throttled"
    );
    assert_eq!(alive.len(), 1, "alive: {alive:?}");
    assert!(conns[alive[0]].ping_v5(DEADLINE).await);
    assert_eq!(holder, nodes[alive[0] % 2]);
}

/// A node whose registry writes lag (its path to NATS hangs) applies a device's
/// `connected` after the device has left it and connected to another node: that late
/// change must not take the client id from the newer connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_connected_does_not_take_the_client_id_from_a_newer_connection() {
    use common::pausable::PausableProxy;
    let (nats, proxy) = PausableProxy::nats("arb-late").await;
    let via_proxy = fleet::cluster_toml(&nats, "node-a", "").replace(&nats.url(), &proxy.url());
    let a = common::GatewayProcess::start(&via_proxy);
    let b = common::GatewayProcess::start(&fleet::cluster_toml(&nats, "node-b", ""));
    let kv = fleet::registry(&nats).await;
    let (_first, _) = Raw::connected_v5(a.mqtt, &connect5("first", 60, true, None)).await;
    fleet::wait_holder(&kv, "first", Some("node-a")).await;

    // Node A's registry task waits on `busy`'s claim while "mover" comes and goes.
    proxy.pause();
    let (_busy, _) = Raw::connected_v5(a.mqtt, &connect5("busy", 60, true, None)).await;
    let (mut old, _) = Raw::connected_v5(a.mqtt, &connect5("mover", 60, true, None)).await;
    old.send(&[0xE0, 0x00]).await;
    assert!(old.wait_closed(DEADLINE).await);
    let (mut new, _) = Raw::connected_v5(b.mqtt, &connect5("mover", 60, true, None)).await;
    fleet::wait_holder(&kv, "mover", Some("node-b")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.resume();

    // Node A applies busy's and mover's changes (its own connect counted first).
    let sent = "gateway_events_sent_total{sink=\"registry\"}";
    let applied = common::wait_metric(a.http, sent, DEADLINE, |v| v >= 4.0).await;
    assert!(applied >= 4.0, "node A applied {applied} changes");
    assert_eq!(fleet::holder(&kv, "mover").await.as_deref(), Some("node-b"));
    assert!(new.ping_v5(DEADLINE).await, "the newer connection stays");

    // A device whose session stays here offline (persistent) keeps the late claim: it
    // left node B for node A and went at once, and node A holds its session now.
    let sleepy = || connect5("sleepy", 60, false, Some(common::session_expiry_props(300)));
    let (mut on_b, _) = Raw::connected_v5(b.mqtt, &sleepy()).await;
    on_b.send(&[0xE0, 0x00]).await;
    assert!(on_b.wait_closed(DEADLINE).await);
    fleet::wait_holder(&kv, "sleepy", Some("node-b")).await;
    proxy.pause();
    let (_busy2, _) = Raw::connected_v5(a.mqtt, &connect5("busy2", 60, true, None)).await;
    let (mut on_a, _) = Raw::connected_v5(a.mqtt, &sleepy()).await;
    on_a.send(&[0xE0, 0x00]).await;
    assert!(on_a.wait_closed(DEADLINE).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.resume();
    fleet::wait_holder(&kv, "sleepy", Some("node-a")).await;
    let applied = common::wait_metric(a.http, sent, DEADLINE, |v| v >= 7.0).await;
    assert!(applied >= 7.0, "node A applied {applied} changes");
    assert_eq!(
        fleet::holder(&kv, "sleepy").await.as_deref(),
        Some("node-a")
    );
}
