//! A dead node's persistent sessions taken in by a survivor (`src/cluster/take_in.rs`):
//! real gateway processes on loopback, each with its own store, on one real
//! `nats-server -js`; the holder is killed with SIGKILL and a surviving node takes its
//! sessions in, keeps their messages, and hands them on.

mod common;

use std::time::{Duration, Instant};

use common::fleet::{disconnect, kill_9, persistent as connect};
use common::nats::NatsServer;
use common::sessions::{
    expect_in_order, fleet, node_with_store, offline_devices, push_queued, wait_registry, DEADLINE,
};
use common::v4;
use common::{post_json, GatewayProcess};
use serde_json::{json, Value};

/// A dead node's persistent sessions are taken in by the surviving node once its lease
/// expired (`src/cluster/take_in.rs`): the registry names the survivor, a message
/// published to a session's subscription and a push by client id are both queued
/// there, and the device resumes with both. The will of a device that was online when
/// its node died is still published: a session taken in is not its device back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_sessions_are_taken_in_and_keep_their_messages() {
    let (_nats, mut gw, kv) = fleet("fs-takein", &["node-a", "node-b"]).await;
    offline_devices(&gw[0], &kv, "orph", 2, "node-a").await;
    let mut watcher = common::v5::connect(common::v5::options(gw[1].mqtt, "takein-watch")).await;
    watcher
        .subscribe("will/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await;
    // Online at the death, its session lasting an hour, its will delayed 4 s: the
    // survivor takes the session in during the delay.
    let online = common::v5::connect_with_will(gw[0].mqtt, "orph-online", 4, 3600).await;
    wait_registry(&kv, "orph-online", "node-a").await;
    kill_9(&mut gw[0]);
    drop(online);

    let b = &gw[1];
    let taken = "gateway_fleet_sessions_taken_in_total";
    let n = common::wait_metric(b.http, taken, DEADLINE, |v| v >= 3.0).await;
    assert_eq!(
        n, 3.0,
        "the three persistent sessions of node A are taken in"
    );
    for id in ["orph-0", "orph-1", "orph-online"] {
        wait_registry(&kv, id, "node-b").await;
    }
    // A message published to orph-0's subscription on node B, and a push to orph-1.
    let publisher = common::v4::connect(common::v4::options(b.mqtt, "takein-pub")).await;
    publisher
        .client
        .publish("t/orph-0", v4::QoS::AtLeastOnce, false, "published")
        .await
        .expect("publish");
    let (code, v) = post_json(
        b.http,
        "/v1/push",
        &json!({"client_id": "orph-1", "topic": "t/orph-1", "payload": "pushed", "qos": 1}),
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    // The will: delayed, and published although the registry names node B.
    let will = watcher
        .next_publish(DEADLINE)
        .await
        .expect("the will of orph-online");
    assert_eq!(&will.topic[..], b"will/orph-online");

    for (id, payload) in [("orph-0", "published"), ("orph-1", "pushed")] {
        let (mut c, present) = connect(b, id).await;
        assert!(present, "{id}: its session was taken in");
        let p = c.next_publish(DEADLINE).await;
        let p = p.unwrap_or_else(|| panic!("{id}: the queued message never came"));
        assert_eq!(&p.payload[..], payload.as_bytes(), "{id}");
        disconnect(c).await;
    }
    let _ = publisher;
}

/// The measurement of the take-in: N offline persistent sessions (`FLEET_TAKEIN_N`,
/// default 100) with 2 queued QoS 1 messages each on node A, `kill -9` of A; prints how
/// long after the kill node B had taken them all in (the lease, 3 s here, included),
/// then pushes a third message to each through B (every one `queued`) and has every
/// device resume on B at once, with its three messages in order (no timing assert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_in_a_dead_nodes_sessions_is_measured() {
    let n: usize = std::env::var("FLEET_TAKEIN_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let (_nats, mut gw, kv) = fleet("fs-takein-n", &["node-a", "node-b"]).await;
    offline_devices(&gw[0], &kv, "ti", n, "node-a").await;
    push_queued(&gw[0], "ti", n, 2).await;
    kill_9(&mut gw[0]);
    let killed = Instant::now();
    let b = std::sync::Arc::new(gw.remove(1));
    let taken = "gateway_fleet_sessions_taken_in_total";
    let wait = DEADLINE + Duration::from_secs(n as u64 / 100);
    let got = common::wait_metric(b.http, taken, wait, |v| v >= n as f64).await;
    assert_eq!(got, n as f64, "every session of node A taken in");
    let taken_secs = killed.elapsed().as_secs_f64();

    let items: Vec<Value> = (0..n)
        .map(|i| json!({"client_id": format!("ti-{i}"), "topic": format!("t/ti-{i}"), "payload": "m2", "qos": 1}))
        .collect();
    for chunk in items.chunks(500) {
        let (code, v) = post_json(b.http, "/v1/push/batch", &json!({"messages": chunk})).await;
        assert_eq!(code, 200, "{v}");
        for r in v["results"].as_array().expect("results") {
            assert_eq!(r["status"], "queued", "{r}");
        }
    }
    let started = Instant::now();
    let resumed = (0..n).map(|i| {
        let b = b.clone();
        tokio::spawn(async move {
            let id = format!("ti-{i}");
            let (mut c, present) = connect(&b, &id).await;
            assert!(present, "{id}");
            expect_in_order(&mut c, &id, 3).await;
        })
    });
    for t in futures_util::future::join_all(resumed).await {
        t.expect("device task");
    }
    println!(
        "fleet take-in: {n} offline persistent sessions x 2 queued QoS 1 messages on a node killed with -9: \
         all taken in by the survivor {taken_secs:.2} s after the kill (lease 3 s); a third message pushed \
         to each through the survivor answered queued; all {n} devices resumed there at once with their 3 \
         messages in order within {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// A session taken in is stored on the node that took it in like its own: after that
/// node restarts (gracefully, then after `kill -9`) the session is still there, with
/// its queued messages and its subscription, and pushes reach it (`queued`). Without
/// the record stored at the take-in, the restart dropped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_in_session_survives_restarts_of_the_node_that_took_it_in() {
    let (nats, mut gw, kv) = fleet("fs-takein-back", &["node-a"]).await;
    let store = common::tempdir::Dir::new("fs-takein-back-b");
    let node_b = |nats: &NatsServer| node_with_store(nats, "node-b", &store);
    let mut b = node_b(&nats);
    offline_devices(&gw[0], &kv, "tib", 1, "node-a").await;
    push_queued(&gw[0], "tib", 1, 1).await;
    kill_9(&mut gw[0]);
    // Node B, the only survivor, sweeps node A's entries and takes the session in.
    wait_registry(&kv, "tib-0", "node-b").await;
    let taken = "gateway_fleet_sessions_taken_in_total";
    assert_eq!(b.metric(taken).await, 1.0);
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(DEADLINE).is_some(), "node B did not stop");
    let mut b = node_b(&nats);
    for payload in ["p0", "p1"] {
        let push = json!({"client_id": "tib-0", "topic": "t/tib-0", "payload": payload, "qos": 1});
        let (code, v) = post_json(b.http, "/v1/push", &push).await;
        assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    }
    kill_9(&mut b);
    let b = node_b(&nats);
    // m0 queued on node A, p0 and p1 pushed to node B between its restarts.
    let (mut c, present) = connect(&b, "tib-0").await;
    assert!(present, "the session taken in is still on node B");
    let mut got = Vec::new();
    while got.len() < 3 {
        let p = c.next_publish(DEADLINE).await;
        let p = p.unwrap_or_else(|| panic!("got only {got:?}"));
        let payload = String::from_utf8_lossy(&p.payload).into_owned();
        // Restored after kill -9, with DUP: a repeat of the one before is QoS 1's.
        if !(p.dup && got.last() == Some(&payload)) {
            got.push(payload);
        }
    }
    assert_eq!(got, ["m0", "p0", "p1"]);
    // Its subscription, taken in too, is in force.
    let (code, v) = post_json(
        b.http,
        "/v1/push",
        &json!({"topic": "t/tib-0", "payload": "live", "qos": 1}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let p = c.next_publish(DEADLINE).await.expect("the live message");
    assert_eq!(&p.payload[..], b"live");
}

/// Without the sweep (`registry_sweep_rate = 0`), the first push that meets a dead
/// node's entry takes the session in: a batch with two messages for the device, sent
/// once the dead node's lease expired, is answered `queued` twice (not `offline`, and
/// not `503 moved` for the second: the first item's take-in here is the one it meets),
/// and the device resumes with both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_takes_in_the_session_of_a_dead_node_without_the_sweep() {
    let (nats, mut gw, kv) = fleet("fs-takein-push", &["node-a"]).await;
    let store = common::tempdir::Dir::new("fs-takein-push-b");
    let b = GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"node-b\"\nnats_url = \"{}\"\nlease_secs = 3\nregistry_sweep_rate = 0\n[store]\npath = \"{}\"\n",
        nats.url(),
        store.0.display()
    ));
    offline_devices(&gw[0], &kv, "tip", 1, "node-a").await;
    kill_9(&mut gw[0]);
    let batch = json!({"messages": [
        {"client_id": "tip-0", "topic": "t/tip-0", "payload": "b0", "qos": 1},
        {"client_id": "tip-0", "topic": "t/tip-0", "payload": "b1", "qos": 1},
    ]});
    let end = Instant::now() + DEADLINE;
    let results = loop {
        let (code, v) = post_json(b.http, "/v1/push/batch", &batch).await;
        assert_eq!(code, 200, "{v}");
        let results = v["results"].as_array().expect("results").clone();
        // 503 node_unreachable until node A's lease expires.
        if results[0]["error"]["code"] != "node_unreachable" {
            break results;
        }
        assert!(Instant::now() < end, "node A's lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for r in &results {
        assert_eq!(r["status"], "queued", "{r}");
    }
    assert_eq!(b.metric("gateway_fleet_sessions_taken_in_total").await, 1.0);
    let (mut c, present) = connect(&b, "tip-0").await;
    assert!(present);
    for payload in ["b0", "b1"] {
        let p = c.next_publish(DEADLINE).await.expect(payload);
        assert_eq!(&p.payload[..], payload.as_bytes());
    }
}

/// A session taken in keeps its messages' place in the fleet's stream: the device
/// resumes it on the node that took it in and acknowledges them there, which deletes
/// them from the stream; after that node is killed too, the device resumes on a third
/// node with only what came after (the take-in's mapping of local to stream sequences
/// reached the mirror; without it the acknowledged messages came again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_after_a_take_in_are_not_delivered_again_on_the_next_node() {
    let (nats, mut gw, kv) = fleet("fs-takein-ack", &["node-a"]).await;
    let dirs = [
        common::tempdir::Dir::new("fs-takein-ack-b"),
        common::tempdir::Dir::new("fs-takein-ack-c"),
    ];
    let mut b = node_with_store(&nats, "node-b", &dirs[0]);
    offline_devices(&gw[0], &kv, "tia", 1, "node-a").await;
    push_queued(&gw[0], "tia", 1, 2).await;
    kill_9(&mut gw[0]);
    wait_registry(&kv, "tia-0", "node-b").await;
    let (mut c, present) = connect(&b, "tia-0").await;
    assert!(present, "taken in by node B");
    expect_in_order(&mut c, "tia-0", 2).await;
    disconnect(c).await;
    // Answered `queued` once JetStream holds it, after the acknowledgements before it.
    let push = json!({"client_id": "tia-0", "topic": "t/tia-0", "payload": "after", "qos": 1});
    let (code, v) = post_json(b.http, "/v1/push", &push).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    kill_9(&mut b);

    let node_c = node_with_store(&nats, "node-c", &dirs[1]);
    let (mut c, present) = connect(&node_c, "tia-0").await;
    assert!(present, "resumed on node C from the fleet's copy");
    let p = c
        .next_publish(DEADLINE)
        .await
        .expect("the message pushed to node B");
    assert_eq!(
        &p.payload[..],
        b"after",
        "m0 and m1 were acknowledged on node B"
    );
    assert!(
        c.next_publish(Duration::from_millis(500)).await.is_none(),
        "a message acknowledged on node B came again"
    );
}
