//! Wills that survive their node (issue 20): the will of an online session is in
//! JetStream, and when its node dies (`kill -9`, its lease expires) exactly one surviving
//! node publishes it, after its delay (none for a session that ends with its
//! connection), unless the device came back elsewhere; a session that ended cleanly
//! leaves none, and a device without a will writes nothing.
//! Real gateway processes (three nodes) on one real `nats-server -js`.

mod common;

use std::time::Duration;

use async_nats::jetstream::kv;
use common::fleet::{disconnect, kill_9, persistent, session_node, total, DEADLINE, LEASE_SECS};
use common::nats::NatsServer;
use common::{connect5, encode, session_expiry_props, v4, v5, GatewayProcess, Raw};
use mqttbytes::v5::{LastWill, Packet as V5Packet};
use mqttbytes::QoS;

const PUBLISHED: &str = "gateway_fleet_dead_node_wills_published_total";
const CANCELLED: &str = "gateway_fleet_dead_node_wills_cancelled_total";

/// Waits until the session bucket's `key` holds a value `ok` accepts.
async fn wait_will(sessions: &kv::Store, key: &str, ok: impl Fn(&[u8]) -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = sessions.get(key).await.expect("bucket get");
        if v.as_deref().is_some_and(&ok) {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "{key}: {v:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the session bucket holds no value under `key` (purged).
async fn wait_purged(sessions: &kv::Store, key: &str) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while sessions.get(key).await.expect("bucket get").is_some() {
        assert!(tokio::time::Instant::now() < end, "{key} was not purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Persistent 3.1.1 device `id` on `gw` with a will on `will/<id>`.
async fn with_will(gw: &GatewayProcess, id: &str) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(false);
    let will = format!("will/{id}");
    o.set_last_will(v4::LastWill::new(will, id, v4::QoS::AtLeastOnce, false));
    common::fleet::connack(v4::connect_raw(o), id).await.0
}

/// Clean-session 3.1.1 device `id` on `gw` with a will on `will/<id>`.
async fn clean_with_will(gw: &GatewayProcess, id: &str) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    let will = format!("will/{id}");
    o.set_last_will(v4::LastWill::new(will, id, v4::QoS::AtLeastOnce, false));
    v4::connect(o).await
}

/// Persistent MQTT 5 device `id` on `gw` whose will waits `delay` seconds.
async fn with_delayed_will(gw: &GatewayProcess, id: &str, delay: u32) -> v5::Client {
    with_will_v5(gw, id, delay, 300).await
}

/// MQTT 5 device `id` on `gw` whose session lasts `expiry` seconds offline and whose
/// will waits `delay` seconds.
async fn with_will_v5(gw: &GatewayProcess, id: &str, delay: u32, expiry: u32) -> v5::Client {
    v5::connect_with_will(gw.mqtt, id, delay, expiry).await
}

/// Waits for the wills of `ids` on `sub` (probes aside), in any order, and checks each
/// carries its client id as payload.
async fn expect_wills(sub: &mut v4::Client, ids: &[&str]) {
    let mut wills = Vec::new();
    while wills.len() < ids.len() {
        let p = sub.next_publish(DEADLINE).await;
        let p = p.unwrap_or_else(|| panic!("a dead node's will; came: {wills:?}"));
        if p.topic != "will/probe" {
            wills.push((p.topic, String::from_utf8_lossy(&p.payload).into_owned()));
        }
    }
    wills.sort();
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| (format!("will/{id}"), id.to_string()))
        .collect();
    assert_eq!(wills, expected);
}

/// Publishes a marker on `will/marker` through `gw` and checks it is the next message
/// `sub` gets: nothing else (`what`) came after the wills.
async fn expect_marker(gw: &GatewayProcess, sub: &mut v4::Client, what: &str) {
    let marker = v4::connect(v4::options(gw.mqtt, &format!("marker-{}", gw.mqtt.port()))).await;
    let sent = marker
        .client
        .publish("will/marker", v4::QoS::AtLeastOnce, false, "end");
    sent.await.expect("marker");
    let p = sub.next_publish(DEADLINE).await.expect("the marker");
    assert_eq!(p.topic, "will/marker", "{what}: {p:?}");
}

/// Publishes probes on `will/probe` from `from` until `sub` gets one.
async fn until_routed(from: &GatewayProcess, sub: &mut v4::Client) {
    let p = v4::connect(v4::options(
        from.mqtt,
        &format!("probe-{}", from.mqtt.port()),
    ))
    .await;
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let sent = p
            .client
            .publish("will/probe", v4::QoS::AtMostOnce, false, "p");
        sent.await.expect("probe");
        if sub.next_publish(Duration::from_millis(200)).await.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no route from {}",
            from.mqtt
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_wills_are_published_once_unless_the_device_came_back() {
    let nats = NatsServer::start("wills");
    drop(nats.client().await);
    let mut gw: Vec<GatewayProcess> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| session_node(&nats, n))
        .collect();
    let js = async_nats::jetstream::new(nats.client().await);
    let sessions = js.get_key_value("gateway_sessions").await.expect("bucket");
    let mut sub = v4::connect(v4::options(gw[1].mqtt, "will-sub")).await;
    sub.subscribe("will/#", v4::QoS::AtLeastOnce).await;
    until_routed(&gw[2], &mut sub).await;
    until_routed(&gw[1], &mut sub).await;

    // On node A: w1 with a will, w2 with a will delayed 8 s, w3 that leaves cleanly.
    let _w1 = with_will(&gw[0], "w1").await;
    let _w2 = with_delayed_will(&gw[0], "w2", 8).await;
    let w3 = with_will(&gw[0], "w3").await;
    disconnect(w3).await;
    // w4 ends its session on DISCONNECT (MQTT 5, session expiry set to 0): no will either.
    let mut w4 = Raw::connect(gw[0].mqtt).await;
    let mut c = connect5("w4", 60, false, Some(session_expiry_props(300)));
    c.last_will = Some(LastWill::new("will/w4", "w4", QoS::AtLeastOnce, false));
    w4.send(&encode(|b| c.write(b))).await;
    let ack = w4.next_v5(DEADLINE).await;
    assert!(matches!(ack, Ok(V5Packet::ConnAck(_))), "w4: {ack:?}");
    wait_will(&sessions, "will.node-a.w4", |v| !v.is_empty()).await;
    // DISCONNECT 0x00 with Session Expiry Interval (0x11) 0.
    w4.send(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0]).await;
    assert!(w4.wait_closed(DEADLINE).await);
    wait_will(&sessions, "will.node-a.w4", |v| v.is_empty()).await;
    wait_will(&sessions, "will.node-a.w1", |v| !v.is_empty()).await;
    wait_will(&sessions, "will.node-a.w2", |v| !v.is_empty()).await;
    wait_will(&sessions, "will.node-a.w3", |v| v.is_empty()).await;
    // Sessions that end with their connection: v1 (3.1.1 clean session) and v2 (MQTT 5,
    // session expiry 0, a will delay longer than this test: it ends with its session)
    // keep their wills while online; v3 leaves cleanly; v4 has no will and writes
    // nothing (it connects before v5, whose will is written after anything of v4's).
    let _v1 = clean_with_will(&gw[0], "v1").await;
    let _v2 = with_will_v5(&gw[0], "v2", 600, 0).await;
    let v3 = clean_with_will(&gw[0], "v3").await;
    disconnect(v3).await;
    let _v4 = v4::connect(v4::options(gw[0].mqtt, "v4")).await;
    let _v5 = clean_with_will(&gw[0], "v5").await;
    wait_will(&sessions, "will.node-a.v3", |v| v.is_empty()).await;
    for id in ["v1", "v2", "v5"] {
        wait_will(&sessions, &format!("will.node-a.{id}"), |v| !v.is_empty()).await;
    }
    let v4_will = sessions.get("will.node-a.v4").await.expect("bucket get");
    assert_eq!(v4_will, None, "a device without a will wrote one");

    kill_9(&mut gw[0]);
    // w2 comes back on node B within its will delay: its will is not published.
    let (_w2, present) = persistent(&gw[1], "w2").await;
    assert!(present, "w2: no session present on node B");

    expect_wills(&mut sub, &["v1", "v2", "v5", "w1"]).await;
    // Both survivors have looked (w2's delay is over and it was not published) ...
    let end = tokio::time::Instant::now() + DEADLINE;
    while total(&gw[1..], CANCELLED).await < 1.0 {
        assert!(tokio::time::Instant::now() < end, "w2's will never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and only one published each of the four.
    assert_eq!(total(&gw[1..], PUBLISHED).await, 4.0);
    expect_marker(
        &gw[1],
        &mut sub,
        "a will came twice, or w2's, w3's or v3's came",
    )
    .await;
    // The survivor that published a will purged its claim.
    for id in ["w1", "v1"] {
        wait_purged(&sessions, &format!("will.node-a.{id}")).await;
    }
}

/// A node that crashed and started again before its lease expired publishes the wills
/// its last run left (no other node took them: the lease never expired), a clean
/// session's and a persistent session's alike, one whose session expired during its
/// delay too, except that of a device back on it within its will's delay, whose new will
/// stays; a node stopped cleanly publishes its devices' wills as it stops, and none when
/// it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_a_crash_within_its_lease_publishes_its_last_runs_wills() {
    let nats = NatsServer::start("wills-back");
    drop(nats.client().await);
    let store = common::tempdir::Dir::new("wills-back-a");
    // A lease far longer than the restart: node B never counts A dead.
    let node_a = || {
        GatewayProcess::start(&format!(
            "[cluster]\nenabled = true\nnode_id = \"node-a\"\nnats_url = \"{}\"\nlease_secs = 60\n[store]\npath = \"{}\"\n",
            nats.url(),
            store.0.display()
        ))
    };
    let mut a = node_a();
    let b = session_node(&nats, "node-b");
    let js = async_nats::jetstream::new(nats.client().await);
    let sessions = js.get_key_value("gateway_sessions").await.expect("bucket");
    let mut sub = v4::connect(v4::options(b.mqtt, "back-sub")).await;
    sub.subscribe("will/#", v4::QoS::AtLeastOnce).await;
    until_routed(&a, &mut sub).await;

    let _r1 = clean_with_will(&a, "r1").await;
    let _r2 = with_will(&a, "r2").await;
    // r4's will waits 15 s: it comes back within them. r5's waits 8 s, but its session
    // expires 2 s after the restart, and its end does not lose it.
    let r4 = with_delayed_will(&a, "r4", 15).await;
    let r5 = with_will_v5(&a, "r5", 8, 2).await;
    for id in ["r1", "r2", "r4", "r5"] {
        wait_will(&sessions, &format!("will.node-a.{id}"), |v| !v.is_empty()).await;
    }
    kill_9(&mut a);
    drop((r4, r5));
    // A start without the fleet in between does not make A forget the crash.
    let crashed = store.0.join("gateway.crashed");
    let mut alone = GatewayProcess::start(&format!("[store]\npath = \"{}\"\n", store.0.display()));
    assert!(crashed.exists(), "no crash marker");
    alone.signal(libc::SIGTERM);
    assert!(
        alone.wait_exit(DEADLINE).is_some(),
        "the lone node did not stop"
    );
    let mut a = node_a();
    // Once A has read r4's will (it waits its delay), r4 connects to A again (with a
    // new will).
    let pending = "gateway_fleet_crash_wills_pending";
    let read = common::wait_metric(a.http, pending, DEADLINE, |v| v >= 1.0).await;
    assert!(read >= 1.0, "A never read the wills");
    let _r4 = with_delayed_will(&a, "r4", 15).await;
    expect_wills(&mut sub, &["r1", "r2", "r5"]).await;
    let end = tokio::time::Instant::now() + DEADLINE;
    while total(std::slice::from_ref(&a), CANCELLED).await < 1.0 {
        assert!(tokio::time::Instant::now() < end, "r4's will never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its new will stays: only its old will would have been purged.
    let r4_will = sessions.get("will.node-a.r4").await.expect("bucket get");
    assert!(
        r4_will.as_deref().is_some_and(|v| v.len() > 16),
        "r4's new will: {r4_will:?}"
    );
    assert_eq!(total(std::slice::from_ref(&a), PUBLISHED).await, 3.0);
    assert_eq!(total(std::slice::from_ref(&b), PUBLISHED).await, 0.0);
    // Their claims were purged.
    for id in ["r1", "r2", "r5"] {
        wait_purged(&sessions, &format!("will.node-a.{id}")).await;
    }
    expect_marker(&b, &mut sub, "a will came twice, or r4's came").await;
    let end = tokio::time::Instant::now() + DEADLINE;
    while crashed.exists() {
        assert!(tokio::time::Instant::now() < end, "the crash marker stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A clean stop publishes the wills of the devices it disconnects (`[mqtt]
    // wills_on_stop`): r3's, and r4's although its delay has not passed (no node would
    // publish it later). Once: the next start publishes neither.
    let _r3 = clean_with_will(&a, "r3").await;
    wait_will(&sessions, "will.node-a.r3", |v| !v.is_empty()).await;
    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(DEADLINE).is_some(), "node A did not stop");
    expect_wills(&mut sub, &["r3", "r4"]).await;
    assert!(!crashed.exists(), "a clean stop left a crash marker");
    wait_will(&sessions, "will.node-a.r3", |v| v.is_empty()).await;
    let a = node_a();
    until_routed(&a, &mut sub).await;
    assert!(!crashed.exists(), "a start after a clean stop saw a crash");
    expect_marker(&b, &mut sub, "a will came again after a clean stop").await;
    assert_eq!(total(std::slice::from_ref(&a), PUBLISHED).await, 0.0);
}

/// A node stopped cleanly with more wills than its routing queue holds
/// (`routing_queue_capacity = 64`) gets every one to the other node, once: those the full
/// queue refuses wait on their shard and are offered again while it drains (before,
/// about two thirds were dropped and counted `queue_full`). And its will keys are all
/// emptied in JetStream before it gives up its lease, so no survivor publishes them
/// again: the stop's one commit group (one shard) empties more keys than the 5,000
/// publishes async-nats lets await their acks, which stalled the session mirror for good
/// until `ACK_PART` (`cluster/sessions.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_gets_out_more_wills_than_its_routing_queue_holds() {
    const DEVICES: usize = 5200;
    let nats = NatsServer::start("wills-stop");
    let mut a = GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"node-a\"\nnats_url = \"{}\"\nrouting_queue_capacity = 64\n[shards]\ncount = 1\n[limits]\nmax_connections_per_ip = 0\nmax_connect_rate = 0\n",
        nats.url()
    ));
    let b = session_node(&nats, "node-b");
    let mut sub = v4::connect(v4::options(b.mqtt, "stop-sub")).await;
    sub.subscribe("will/#", v4::QoS::AtLeastOnce).await;
    until_routed(&a, &mut sub).await;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("s{i}")).collect();
    let mut devices = Vec::new();
    for id in &ids {
        let mut c = mqttbytes::v4::Connect::new(id);
        c.keep_alive = 60;
        let will = mqttbytes::v4::LastWill::new(
            format!("will/{id}"),
            id.as_str(),
            QoS::AtLeastOnce,
            false,
        );
        c.last_will = Some(will);
        let mut raw = Raw::connect(a.mqtt).await;
        raw.send(&encode(|b| c.write(b))).await;
        let connack = raw.next_v4(DEADLINE).await;
        assert!(
            matches!(connack, Ok(mqttbytes::v4::Packet::ConnAck(_))),
            "{id}: {connack:?}"
        );
        devices.push(raw);
    }
    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(DEADLINE).is_some(), "node A did not stop");
    let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    ids.sort_unstable(); // as expect_wills sorts what came
    expect_wills(&mut sub, &ids).await;
    // Node A gave up its lease only once its wills' keys were empty: node B, which
    // looks at the leases every LEASE_SECS, finds A gone and nothing to publish.
    tokio::time::sleep(Duration::from_secs(2 * u64::from(LEASE_SECS) + 1)).await;
    expect_marker(&b, &mut sub, "a will came twice").await;
    assert_eq!(total(std::slice::from_ref(&b), PUBLISHED).await, 0.0);
}
