//! The fleet without NATS (issue 19 point 5): a node whose NATS is away keeps serving its
//! own devices (device-to-device routing and pushes on the node), answers a push to a
//! device on another node with a clear 503, says so on `/readyz` and in its metrics, and
//! rejoins by itself when NATS is back. (The killed-node half of point 5 is in
//! tests/fleet.rs, a push to a dead node's device, and tests/fleet_haproxy.rs, its
//! devices reconnecting elsewhere.)

mod common;

use std::time::Duration;

use common::fleet::{self, wait_holder, wait_ready_nats_down, DEADLINE};
use common::v4::{self, QoS};
use common::{post_json, GatewayProcess};
use serde_json::{json, Value};

/// Waits until `sample` on `gw` has counted at least one.
async fn wait_counted(gw: &GatewayProcess, sample: &str) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while gw.metric(sample).await < 1.0 {
        assert!(tokio::time::Instant::now() < end, "{sample} stayed 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn push(gw: &GatewayProcess, id: &str, payload: &str) -> (u16, Value) {
    let body = json!({"client_id": id, "topic": "t", "payload": payload, "qos": 1});
    post_json(gw.http, "/v1/push", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_node_says_so_serves_its_own_devices_and_comes_back() {
    let (mut nats, gw, kv) = fleet::start("fleet-away", &["node-a", "node-b"], "").await;
    let (a, b) = (&gw[0], &gw[1]);
    let mut sub = v4::connect(v4::options(a.mqtt, "sub-a")).await;
    sub.subscribe("local/#", QoS::AtLeastOnce).await;
    let publisher = v4::connect(v4::options(a.mqtt, "pub-a")).await;
    let mut far = v4::connect(v4::options(b.mqtt, "far-b")).await;
    wait_holder(&kv, "far-b", Some("node-b")).await;
    wait_ready_nats_down(a, false).await;

    nats.kill();
    wait_ready_nats_down(a, true).await;
    assert_eq!(a.metric("gateway_fleet_nats_connected").await, 0.0);

    // Devices on node A still reach each other, and pushes to them are delivered.
    publisher
        .client
        .publish("local/x", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    let p = sub
        .next_publish(DEADLINE)
        .await
        .expect("local routing works");
    assert_eq!(&p.payload[..], b"still here");
    let (code, v) = push(a, "sub-a", "pushed").await;
    assert_eq!((code, v["status"].as_str()), (200, Some("sent")), "{v}");
    assert!(sub.next_publish(DEADLINE).await.is_some());

    // A device on node B cannot be reached from node A: a clear 503.
    let (code, v) = push(a, "far-b", "x").await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("fleet_unavailable")),
        "{v}"
    );
    // The lease renewals fail and are counted.
    wait_counted(
        a,
        "gateway_fleet_registry_ops_total{op=\"lease\",outcome=\"error\"}",
    )
    .await;

    // NATS back: node A says so by itself and reaches node B's device again.
    nats.respawn();
    wait_ready_nats_down(a, false).await;
    let kv = fleet::registry(&nats).await;
    wait_holder(&kv, "far-b", Some("node-b")).await;
    let (code, v) = push(a, "far-b", "across again").await;
    assert_eq!((code, v["status"].as_str()), (200, Some("sent")), "{v}");
    let p = far.next_publish(DEADLINE).await.expect("the push arrives");
    assert_eq!(&p.payload[..], b"across again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connected_to_two_nodes_while_nats_was_away_keeps_the_later_one() {
    use common::{connect5, Raw};
    let (mut nats, gw, kv) = fleet::start("fleet-heal", &["node-a", "node-b"], "").await;
    let (a, b) = (&gw[0], &gw[1]);
    let (mut old, _) = Raw::connected_v5(b.mqtt, &connect5("split", 60, true, None)).await;
    wait_holder(&kv, "split", Some("node-b")).await;

    nats.kill();
    wait_ready_nats_down(a, true).await;
    wait_ready_nats_down(b, true).await;
    // The second connection is accepted over three seconds later: connected_at counts
    // whole seconds (the tick it was accepted in, on clocks of 1 s ticks; each node's
    // shards share one start, and the two nodes' starts differ), so the order is then
    // certain. Node A cannot tell node B, whose registry entry stays.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (mut new, _) = Raw::connected_v5(a.mqtt, &connect5("split", 60, true, None)).await;
    // Node A's claim failed (not merely waiting for NATS).
    wait_counted(
        a,
        "gateway_events_dropped_total{sink=\"registry\",reason=\"rejected\"}",
    )
    .await;

    // NATS back: both nodes write their devices again; the later connection wins.
    nats.respawn();
    assert_eq!(old.expect_disconnect_v5(DEADLINE).await, 0x8E);
    assert!(old.wait_closed(DEADLINE).await);
    let kv = fleet::registry(&nats).await;
    wait_holder(&kv, "split", Some("node-a")).await;
    assert!(new.ping_v5(DEADLINE).await, "the later connection stays");
    // Counted once node B's arbitration ends (it may come after the close here).
    let lost = "gateway_fleet_arbitration_lost_total";
    assert_eq!(
        common::wait_metric(b.http, lost, DEADLINE, |v| v >= 1.0).await,
        1.0
    );
}

/// A registry queue that overflows drops devices' `connected` changes (here while NATS
/// hangs for a moment, with a queue of 2): the node notices the drop, lists its shards'
/// online devices and writes those it missed, so every one of them is reachable through
/// another node. Nothing failed meanwhile, so no rejoin after an outage wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_whose_registry_changes_were_dropped_are_written_again() {
    let (nats, gw, kv) = fleet::start(
        "fleet-overflow",
        &["node-a", "node-b"],
        "registry_queue_capacity = 2",
    )
    .await;
    let (a, b) = (&gw[0], &gw[1]);
    wait_ready_nats_down(a, false).await;

    // The first `connected` waits on the hung server; the others fill the queue of 2.
    nats.pause();
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(v4::connect(v4::options(a.mqtt, &format!("dev-{i}"))).await);
    }
    wait_counted(
        a,
        "gateway_events_dropped_total{sink=\"registry\",reason=\"queue_full_oldest\"}",
    )
    .await;
    nats.resume();

    for (i, device) in devices.iter_mut().enumerate() {
        let id = format!("dev-{i}");
        wait_holder(&kv, &id, Some("node-a")).await;
        let (code, v) = push(b, &id, "found").await;
        assert_eq!(
            (code, v["status"].as_str()),
            (200, Some("sent")),
            "{id}: {v}"
        );
        let p = device
            .next_publish(DEADLINE)
            .await
            .expect("the push arrives");
        assert_eq!(&p.payload[..], b"found");
    }
    let failed = [
        "gateway_events_dropped_total{sink=\"registry\",reason=\"rejected\"}",
        "gateway_fleet_registry_ops_total{op=\"lease\",outcome=\"error\"}",
    ];
    for sample in failed {
        assert_eq!(a.metric(sample).await, 0.0, "{sample}");
    }
}

/// A NATS server that hangs (stopped, its connections open: as behind a path that drops
/// packets) is counted away after three silent ping intervals (a second here), and a
/// node with persistent sessions in the fleet still admits clean-session devices (the
/// purge of the fleet's copy that a clean start asks for is given up then) and routes
/// between them: its routing connection, whose writes stop once the socket's buffers
/// are full (32 MiB of messages here) and whose queue to NATS then fills (8 messages
/// here), is given up too, so its publishers are not held back waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_nats_hangs_still_serves_its_devices_and_says_nats_is_down() {
    let nats = common::nats::NatsServer::start("fleet-hang");
    drop(nats.client().await);
    let a = common::GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"node-a\"\nnats_url = \"{}\"\nlease_secs = {}\nrouting_queue_capacity = 8\nrequest_timeout_ms = 1000\n[limits]\npublish_rate = 1000000\nbytes_rate = 1073741824\n",
        nats.url(),
        fleet::LEASE_SECS
    ));
    wait_ready_nats_down(&a, false).await;
    let mut sub = v4::connect(v4::options(a.mqtt, "local-sub")).await;
    sub.subscribe("local/+", QoS::AtLeastOnce).await;
    nats.pause();
    let publisher = v4::connect(v4::options(a.mqtt, "during-the-hang")).await;
    let (n, payload) = (4_000, vec![b'x'; 8192]);
    let jobs = publisher.client.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..n {
            let topic = format!("local/{i}");
            let sent = jobs.publish(topic, QoS::AtLeastOnce, false, payload.clone());
            sent.await.unwrap();
        }
    });
    for i in 0..n {
        let p = sub.next_publish(DEADLINE).await;
        assert!(p.is_some(), "only {i} of {n} local messages arrived");
    }
    publishing.await.unwrap();
    wait_ready_nats_down(&a, true).await;
    let route = "gateway_fleet_route_connected";
    assert_eq!(
        common::wait_metric(a.http, route, DEADLINE, |v| v == 0.0).await,
        0.0
    );
    let _later = v4::connect(v4::options(a.mqtt, "once-counted-away")).await;
    nats.resume();
    wait_ready_nats_down(&a, false).await;
}
