//! The fleet on NATS (`[cluster]`): real gateway processes on loopback sharing one real
//! `nats-server` with JetStream. A push sent to any node reaches a device connected to
//! any other with the holding node's exact outcome; the registry follows devices; a node
//! killed with SIGKILL is answered truthfully, never as `sent`.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use common::nats::NatsServer;
use common::v4;
use common::{post_json, GatewayProcess};
use serde_json::{json, Value};

use common::fleet::{registry, wait_holder as wait_registry, DEADLINE};

/// A `nats-server` and gateway processes named `nodes` on it, and the registry bucket.
async fn fleet(tag: &str, nodes: &[&str]) -> (NatsServer, Vec<GatewayProcess>, kv::Store) {
    common::fleet::start(tag, nodes, "").await
}

/// Device `id` connected to `gw`, once the registry names `node` for it.
async fn device_on(gw: &GatewayProcess, id: &str, kv: &kv::Store, node: &str) -> v4::Client {
    let dev = device(gw, id).await;
    wait_registry(kv, id, Some(node)).await;
    dev
}

async fn push(gw: &GatewayProcess, body: Value) -> (u16, Value) {
    post_json(gw.http, "/v1/push", &body).await
}

/// Pushes `body` through `via`, expects `want` and `dev` to receive its payload.
async fn push_arrives(via: &GatewayProcess, dev: &mut v4::Client, body: Value, want: &str) {
    let (code, v) = push(via, body.clone()).await;
    assert_eq!((code, status(&v)), (200, want), "{v}");
    let p = dev.next_publish(DEADLINE).await.expect("the push arrives");
    assert_eq!(
        p.payload,
        body["payload"].as_str().unwrap_or_default().as_bytes()
    );
}

fn status(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("")
}

async fn device(gw: &GatewayProcess, id: &str) -> v4::Client {
    v4::connect(v4::options(gw.mqtt, id)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_any_node_reaches_a_device_on_another_with_its_exact_outcome() {
    let (_nats, gw, kv) = fleet("fleet-push", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let mut dev = device_on(a, "dev-1", &kv, "node-a").await;

    // Sent through node B, delivered by node A.
    let (code, v) = push(
        b,
        json!({"client_id": "dev-1", "topic": "devices/dev-1/cmd", "payload": "hello", "qos": 1}),
    )
    .await;
    assert_eq!((code, status(&v)), (200, "sent"), "{v}");
    let p = dev.next_publish(DEADLINE).await.expect("the push arrives");
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        ("devices/dev-1/cmd", &b"hello"[..])
    );

    // wait_ack: node A waits for the device's PUBACK.
    let ack_me = json!({"client_id": "dev-1", "topic": "t", "payload": "ack me", "qos": 1, "wait_ack": true});
    push_arrives(b, &mut dev, ack_me, "acked").await;
    let answered = "gateway_fleet_requests_total{outcome=\"answered\"}";
    assert_eq!(b.metric(answered).await, 2.0, "node B forwarded both");
    assert_eq!(a.metric("gateway_fleet_requests_served_total").await, 2.0);

    // Any node says where the device is and what it looks like there.
    for via in [a, b] {
        let (code, body) = common::http_get(via.http, "/v1/clients/dev-1").await;
        let info: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            (info["node"].as_str(), info["online"].as_bool()),
            (Some("node-a"), Some(true)),
            "{body}"
        );
    }
    assert_eq!(common::http_get(b.http, "/v1/clients/nobody").await.0, 404);

    // A client id nobody holds.
    let (code, v) = push(
        b,
        json!({"client_id": "nobody", "topic": "t", "payload": "x"}),
    )
    .await;
    assert_eq!((code, status(&v)), (200, "offline"), "{v}");

    // A clean disconnect removes the entry: node B then answers for itself.
    dev.client.disconnect().await.unwrap();
    wait_registry(&kv, "dev-1", None).await;
    let (code, v) = push(
        b,
        json!({"client_id": "dev-1", "topic": "t", "payload": "x"}),
    )
    .await;
    assert_eq!((code, status(&v)), (200, "offline"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spread_over_nodes_keeps_one_answer_per_item_in_order() {
    let (_nats, gw, kv) = fleet("fleet-batch", &["node-a", "node-b", "node-c"]).await;
    let b = &gw[1];
    let mut on_a = device_on(&gw[0], "on-a", &kv, "node-a").await;
    let mut on_b = device_on(b, "on-b", &kv, "node-b").await;
    let mut on_c = device_on(&gw[2], "on-c", &kv, "node-c").await;
    let item = |id: &str, n: u32| json!({"client_id": id, "topic": format!("devices/{id}"), "payload": format!("{n}"), "qos": 1});
    let messages = vec![
        item("on-c", 0),
        item("on-a", 1),
        item("nobody", 2),
        item("on-b", 3),
        item("on-c", 4),
        json!({"client_id": "on-a", "topic": "devices/on-a", "payload": "5", "qos": 7}),
        item("on-a", 6),
    ];
    let (code, v) = post_json(b.http, "/v1/push/batch", &json!({ "messages": messages })).await;
    assert_eq!(code, 200, "{v}");
    let results = v["results"].as_array().expect("results");
    let got: Vec<&str> = results
        .iter()
        .map(|r| {
            r["status"]
                .as_str()
                .or(r["error"]["code"].as_str())
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(
        got,
        [
            "sent",
            "sent",
            "offline",
            "sent",
            "sent",
            "invalid_field",
            "sent"
        ],
        "{v}"
    );
    // Each device got its own, in order.
    for (dev, want) in [(&mut on_a, ["1", "6"]), (&mut on_c, ["0", "4"])] {
        for w in want {
            let p = dev
                .next_publish(DEADLINE)
                .await
                .expect("a batch item arrives");
            assert_eq!(&p.payload[..], w.as_bytes());
        }
    }
    let p = on_b
        .next_publish(DEADLINE)
        .await
        .expect("the local item arrives");
    assert_eq!(&p.payload[..], b"3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_device_on_a_killed_node_is_answered_truthfully() {
    let (_nats, mut gw, kv) = fleet("fleet-kill", &["node-a", "node-b"]).await;
    let mut dev = device_on(&gw[0], "dev-k", &kv, "node-a").await;
    let (a, b) = gw.split_at_mut(1);
    let (a, b) = (&mut a[0], &b[0]);
    let (code, v) = push(
        b,
        json!({"client_id": "dev-k", "topic": "t", "payload": "x", "qos": 1}),
    )
    .await;
    assert_eq!((code, status(&v)), (200, "sent"), "{v}");
    assert!(dev.next_publish(DEADLINE).await.is_some());

    // SIGKILL: no goodbye to NATS, the registry entry stays behind.
    let _ = a.child.kill();
    let _ = a.child.wait();

    // Every answer is true: the node is unreachable (503) until its lease expires, then
    // the device is offline; never `sent`.
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut seen_offline = false;
    while !seen_offline {
        let asked = tokio::time::Instant::now();
        let (code, v) = push(
            b,
            json!({"client_id": "dev-k", "topic": "t", "payload": "x", "qos": 1}),
        )
        .await;
        // Well within the request timeout: "no responders" is immediate.
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "took {:?}",
            asked.elapsed()
        );
        match (code, status(&v), v["error"]["code"].as_str()) {
            (503, _, Some("node_unreachable")) => {}
            (200, "offline", _) => seen_offline = true,
            other => panic!("untruthful answer for a dead node: {other:?} {v}"),
        }
        assert!(tokio::time::Instant::now() < end, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stale entry is gone.
    wait_registry(&kv, "dev-k", None).await;
    let gone = "gateway_fleet_requests_total{outcome=\"no_responders\"}";
    assert!(b.metric(gone).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_cleanly_leaves_the_registry() {
    let (nats, mut gw, kv) = fleet("fleet-stop", &["node-a"]).await;
    let a = &mut gw[0];
    let js = async_nats::jetstream::new(nats.client().await);
    let leases = js.get_key_value("gateway_registry_nodes").await.unwrap();
    assert!(
        leases.get("node-a").await.unwrap().is_some(),
        "node-a holds a lease"
    );
    let _dev = device_on(a, "dev-s", &kv, "node-a").await;

    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(DEADLINE).is_some(), "the node stops");
    wait_registry(&kv, "dev-s", None).await;
    assert!(
        leases.get("node-a").await.unwrap().is_none(),
        "the lease is given up"
    );
}

/// With `startup_wait_secs = 0`, one attempt: a node that cannot reach NATS exits 1 and
/// says why. (With the default it keeps trying: the next test.)
#[test]
fn a_fleet_node_without_nats_does_not_start_and_says_why() {
    let (code, text) = start_without_nats("fleet-no-nats", 0);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cluster: cannot connect to NATS"), "{text}");
}

/// Runs a node whose NATS is nowhere, with `startup_wait_secs = wait`, to its exit: its
/// exit code and its output.
fn start_without_nats(tag: &str, wait: u32) -> (Option<i32>, String) {
    let port = common::nats::free_port();
    let dir = common::tempdir::Dir::new(tag);
    let path = dir.0.join("gateway.toml");
    let toml = format!(
        "{}\n[cluster]\nenabled = true\nstartup_wait_secs = {wait}\nnats_url = \"nats://127.0.0.1:{port}\"\n[store]\nenabled = false\n",
        common::BASE
    );
    std::fs::write(&path, toml).unwrap();
    let (code, out, err) = common::run_gateway(
        &["--config".as_ref(), path.as_os_str()],
        Duration::from_secs(30),
    );
    (code, format!("{out}{err}"))
}

/// A node started before its NATS server keeps trying (`startup_wait_secs`, 60 by
/// default) and joins once NATS is up: it announces its addresses only after NATS
/// started, takes its lease and serves devices through the fleet's registry. With a
/// short wait and no NATS at all it gives up, naming the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_joins_once_nats_is_up() {
    let port = common::nats::free_port();
    let toml = format!(
        "[cluster]\nenabled = true\nnode_id = \"early\"\nnats_url = \"nats://127.0.0.1:{port}\"\n[store]\nenabled = false\n"
    );
    let starting = std::thread::spawn(move || {
        let gw = GatewayProcess::start(&toml);
        (gw, Instant::now())
    });
    // The node is trying (connection refused) while NATS is not there.
    std::thread::sleep(Duration::from_secs(2));
    let nats = NatsServer::start_on("fleet-early", port);
    let nats_started = Instant::now();
    let (gw, announced) = starting.join().expect("the node starts once NATS is up");
    assert!(
        announced > nats_started,
        "the node announced its addresses before NATS was up"
    );
    let kv = registry(&nats).await;
    let dev = v4::connect(v4::options(gw.mqtt, "early-dev")).await;
    wait_registry(&kv, "early-dev", Some("early")).await;
    drop(dev);

    // No NATS at all, two seconds of waiting: it gives up and says how long it tried.
    let (code, text) = start_without_nats("fleet-no-nats-wait", 2);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("cannot join the fleet yet, trying again"),
        "{text}"
    );
    assert!(text.contains("cluster.startup_wait_secs"), "{text}");
}

/// `GET /v1/stats?scope=fleet` on one node answers for both: each node's figures and
/// their totals; without the scope, the receiving node only. A node killed with -9 (its
/// lease still held) is listed with its error and left out of the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_stats_answer_for_every_node() {
    let (_nats, mut gw, _kv) = fleet("fleet-stats", &["node-a", "node-b"]).await;
    let _a1 = v4::connect(v4::options(gw[0].mqtt, "stats-a1")).await;
    let _b1 = v4::connect(v4::options(gw[1].mqtt, "stats-b1")).await;
    let _b2 = v4::connect(v4::options(gw[1].mqtt, "stats-b2")).await;
    let url = |gw: &GatewayProcess, q: &str| format!("http://{}/v1/stats{q}", gw.http);
    let get = |u: String| async move {
        let r = reqwest::get(u).await.expect("stats");
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (code, here) = get(url(&gw[0], "")).await;
    assert_eq!(
        (code, here["connections"].clone()),
        (200, json!(1)),
        "{here}"
    );
    let (code, all) = get(url(&gw[0], "?scope=fleet")).await;
    assert_eq!(code, 200, "{all}");
    assert_eq!(all["connections"], 3, "{all}");
    let nodes = all["nodes"].as_array().unwrap();
    let of = |id: &str| nodes.iter().find(|n| n["node"] == id).cloned();
    assert_eq!(of("node-a").unwrap()["connections"], 1, "{all}");
    assert_eq!(of("node-b").unwrap()["connections"], 2, "{all}");
    assert_eq!(of("node-b").unwrap()["shards"].as_array().unwrap().len(), 2);

    // Node B dies; its lease lasts a little longer: listed with an error, not counted.
    common::fleet::kill_9(&mut gw[1]);
    let (code, all) = get(url(&gw[0], "?scope=fleet")).await;
    assert_eq!(code, 200, "{all}");
    assert_eq!(all["connections"], 1, "{all}");
    // Its lease (3 s, not given up by a killed node) still names it.
    let b = all["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "node-b");
    assert!(b.is_some_and(|b| b["error"].is_string()), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_an_offline_persistent_session_on_another_node_is_queued_there() {
    let (_nats, gw, kv) = fleet("fleet-queued", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let mut o = v4::options(a.mqtt, "dev-p");
    o.set_clean_session(false);
    let dev = v4::connect(o.clone()).await;
    wait_registry(&kv, "dev-p", Some("node-a")).await;
    dev.client.disconnect().await.unwrap();
    // Node A's registry writer has applied the disconnect (its second change).
    common::fleet::wait_applied(std::slice::from_ref(a), 2).await;
    // The session lives on at node A, so its entry stays and node A answers.
    wait_registry(&kv, "dev-p", Some("node-a")).await;
    let (code, v) = push(
        b,
        json!({"client_id": "dev-p", "topic": "devices/dev-p", "payload": "later", "qos": 1}),
    )
    .await;
    assert_eq!((code, status(&v)), (200, "queued"), "{v}");
    // Back on node A, the device gets it.
    let mut dev = v4::connect(o).await;
    let p = dev
        .next_publish(DEADLINE)
        .await
        .expect("the queued push arrives");
    assert_eq!(&p.payload[..], b"later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connecting_to_another_node_takes_it_over() {
    use common::{connect5, Raw};
    let (_nats, gw, kv) = fleet("fleet-takeover", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let (mut old, _) = Raw::connected_v5(a.mqtt, &connect5("dev-t", 60, true, None)).await;
    wait_registry(&kv, "dev-t", Some("node-a")).await;

    let mut new = device(b, "dev-t").await;
    // Node A closes its connection: MQTT 5 DISCONNECT 0x8E, session taken over.
    assert_eq!(old.expect_disconnect_v5(DEADLINE).await, 0x8E);
    assert!(old.wait_closed(DEADLINE).await);
    wait_registry(&kv, "dev-t", Some("node-b")).await;
    assert_eq!(b.metric("gateway_fleet_takeovers_total").await, 1.0);
    assert!(
        a.metric("gateway_disconnects_total{reason=\"takeover\"}")
            .await
            >= 1.0,
        "counted as a takeover on node A"
    );
    // Pushes through either node reach the new connection.
    for via in [a, b] {
        let body = json!({"client_id": "dev-t", "topic": "t", "payload": "here", "qos": 1});
        push_arrives(via, &mut new, body, "sent").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holding_nodes_errors_come_back_unchanged() {
    let (_nats, gw, kv) = fleet("fleet-errors", &["node-a", "node-b"]).await;
    let b = &gw[1];
    // A device that never acknowledges.
    let mut o = v4::options(gw[0].mqtt, "dev-silent");
    o.set_manual_acks(true);
    let mut dev = v4::connect(o).await;
    wait_registry(&kv, "dev-silent", Some("node-a")).await;
    let body = json!({"client_id": "dev-silent", "topic": "t", "payload": "x", "qos": 1, "wait_ack": true, "timeout_ms": 300});
    let (code, v) = push(b, body).await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (504, Some("ack_timeout")),
        "{v}"
    );
    assert!(
        dev.next_publish(DEADLINE).await.is_some(),
        "it was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_devices_on_two_nodes_all_get_their_batch_item() {
    const N: usize = 200;
    let (_nats, gw, kv) = fleet("fleet-many", &["node-a", "node-b"]).await;
    let mut devices = Vec::with_capacity(N);
    for i in 0..N {
        devices.push(device(&gw[i % 2], &format!("many-{i}")).await);
    }
    for i in 0..N {
        let node = ["node-a", "node-b"][i % 2];
        wait_registry(&kv, &format!("many-{i}"), Some(node)).await;
    }
    let messages: Vec<Value> = (0..N)
        .map(|i| json!({"client_id": format!("many-{i}"), "topic": "t", "payload": format!("{i}"), "qos": 1}))
        .collect();
    let (code, v) = post_json(
        gw[0].http,
        "/v1/push/batch",
        &json!({ "messages": messages }),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), N);
    assert!(results.iter().all(|r| r["status"] == "sent"), "{v}");
    for (i, dev) in devices.iter_mut().enumerate() {
        let p = dev
            .next_publish(DEADLINE)
            .await
            .expect("each device gets its item");
        assert_eq!(p.payload, format!("{i}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_push_to_another_node_is_sent_once() {
    let (_nats, gw, kv) = fleet("fleet-keyed", &["node-a", "node-b"]).await;
    let mut dev = device_on(&gw[0], "dev-key", &kv, "node-a").await;
    let body = json!({"client_id": "dev-key", "topic": "t", "payload": "once", "qos": 1, "idempotency_key": "k1"});
    let (code, first) = push(&gw[1], body.clone()).await;
    assert_eq!((code, status(&first)), (200, "sent"), "{first}");
    let (code, again) = push(&gw[1], body).await;
    assert_eq!(
        (code, &again),
        (200, &first),
        "the repeat gets the first outcome"
    );
    let p = dev.next_publish(DEADLINE).await.expect("delivered");
    assert_eq!(&p.payload[..], b"once");
    assert!(
        dev.next_publish(Duration::from_millis(300)).await.is_none(),
        "delivered once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_node_serves_its_own_devices_and_rejoins_after() {
    let (mut nats, gw, kv) = fleet("fleet-outage", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let mut dev = device_on(a, "dev-o", &kv, "node-a").await;
    assert_eq!(a.metric("gateway_fleet_nats_connected").await, 1.0);
    nats.kill();

    // Its own device is still served; a device it cannot place is a clear 503.
    let body = json!({"client_id": "dev-o", "topic": "t", "payload": "local", "qos": 1});
    push_arrives(a, &mut dev, body, "sent").await;
    let (code, v) = push(
        a,
        json!({"client_id": "elsewhere", "topic": "t", "payload": "x"}),
    )
    .await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("fleet_unavailable")),
        "{v}"
    );
    assert_eq!(a.metric("gateway_fleet_nats_connected").await, 0.0);
    // A device that connects meanwhile cannot be registered yet.
    let mut late = device(a, "dev-late").await;
    // Its registry write failed (not merely waiting for NATS).
    let failed = "gateway_events_dropped_total{sink=\"registry\",reason=\"rejected\"}";
    let end = tokio::time::Instant::now() + DEADLINE;
    while a.metric(failed).await < 1.0 {
        assert!(tokio::time::Instant::now() < end, "the write never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    nats.respawn();
    let kv = registry(&nats).await;
    // Once NATS is back, node A writes its devices again: node B reaches both.
    wait_registry(&kv, "dev-late", Some("node-a")).await;
    wait_registry(&kv, "dev-o", Some("node-a")).await;
    assert_eq!(a.metric("gateway_fleet_nats_connected").await, 1.0);
    let body = json!({"client_id": "dev-late", "topic": "t", "payload": "back", "qos": 1});
    push_arrives(b, &mut late, body, "sent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_disconnects_a_device_on_another() {
    use common::{connect5, Raw};
    let (_nats, gw, kv) = fleet("fleet-kick", &["node-a", "node-b"]).await;
    let (mut dev, _) = Raw::connected_v5(gw[0].mqtt, &connect5("dev-d", 60, true, None)).await;
    wait_registry(&kv, "dev-d", Some("node-a")).await;
    let delete = |id: &str| {
        reqwest::Client::new()
            .delete(format!("http://{}/v1/clients/{id}", gw[1].http))
            .send()
    };
    let r = delete("dev-d").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["disconnected"], true, "{v}");
    // Node A closed it: MQTT 5 DISCONNECT 0x98, administrative action.
    assert_eq!(dev.expect_disconnect_v5(DEADLINE).await, 0x98);
    wait_registry(&kv, "dev-d", None).await;
    assert_eq!(delete("nobody").await.unwrap().status(), 404);
}
