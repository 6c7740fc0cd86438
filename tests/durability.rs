//! The durable store against the real binary: what the backend was told is `queued`
//! survives `kill -9`; subscriptions and retained messages survive a restart; sessions
//! that expired during the downtime are gone; acknowledged messages are not sent again;
//! a damaged or empty store file stops the start with a clear error, even where redb
//! panics on it; a record whose bytes changed on disk is refused and counted.
//!
//! The other store suites: store_corruption.rs (damaged files and records),
//! store_qos2_restart.rs (shared and QoS 2 state across a restart), store_acks.rs
//! (acknowledgements wait for the commit).

mod common;

use std::time::Duration;

use common::store::*;
use common::{connect5, post_json, session_expiry_props, tempdir, v4, GatewayProcess, Raw};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pushes_survive_kill_9_exactly_once_in_order_and_ttl_is_kept() {
    const DEVICES: usize = 100;
    const PER_DEVICE: usize = 100;
    let dir = tempdir::Dir::new("crash");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);

    // 100 persistent devices subscribe, then go offline.
    for i in 0..DEVICES {
        let (mut c, _) = connect_device(&gw, &format!("dev-{i}")).await;
        c.subscribe(&format!("dev/{i}/cmd"), v4::QoS::AtLeastOnce)
            .await;
        disconnect(c).await;
    }

    // 10,000 QoS 1 pushes in batches of 500. Four senders run at once, each for its own
    // quarter of the devices (so each device's order is defined), and their commits
    // group. Every 10th message has a 1 s TTL that runs out while the gateway is down.
    let senders: Vec<_> = (0..4)
        .map(|g| {
            let http = gw.http;
            tokio::spawn(async move {
                let mut items = Vec::new();
                for k in 0..PER_DEVICE {
                    for i in (g..DEVICES).step_by(4) {
                        let mut m = json!({
                            "client_id": format!("dev-{i}"),
                            "topic": format!("dev/{i}/cmd"),
                            "payload": format!("{i}:{k}"),
                            "qos": 1,
                        });
                        if k % 10 == 0 {
                            m["ttl_secs"] = json!(1);
                        }
                        items.push(m);
                    }
                }
                for batch in items.chunks(500) {
                    let (code, body) =
                        post_json(http, "/v1/push/batch", &json!({ "messages": batch })).await;
                    assert_eq!(code, 200, "{body}");
                    for r in body["results"].as_array().expect("results") {
                        assert_eq!(r["status"], "queued", "{r}");
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    assert!(gw.metric("gateway_store_bytes").await > 0.0);

    kill9(&mut gw);
    // Let the 1 s TTLs run out while the gateway is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gw = GatewayProcess::start(&extra);

    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let gw_mqtt = gw.mqtt;
        tasks.push(tokio::spawn(async move {
            let mut o = v4::options(gw_mqtt, &format!("dev-{i}"));
            o.set_clean_session(false);
            let mut c = v4::connect_raw(o);
            let want: Vec<usize> = (0..PER_DEVICE).filter(|k| k % 10 != 0).collect();
            let mut got: Vec<usize> = Vec::new();
            let mut present = None;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while got.len() < want.len() {
                match tokio::time::timeout_at(deadline, c.events.recv()).await {
                    Ok(Some(Ok(v4::Event::Incoming(v4::Packet::ConnAck(a))))) => {
                        present = Some(a.session_present)
                    }
                    Ok(Some(Ok(v4::Event::Incoming(v4::Packet::Publish(p))))) => {
                        assert_eq!(p.topic, format!("dev/{i}/cmd"));
                        let text = String::from_utf8_lossy(&p.payload).to_string();
                        let k: usize = text
                            .split_once(':')
                            .and_then(|(_, k)| k.parse().ok())
                            .expect("payload i:k");
                        if got.contains(&k) {
                            assert!(p.dup, "dev-{i}: {k} again without DUP");
                            continue;
                        }
                        got.push(k);
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("dev-{i}: {other:?} after {} of {}", got.len(), want.len()),
                }
            }
            // Nothing more: no expired message comes late, no extra copy without DUP.
            if let Some(p) = c.next_publish(Duration::from_millis(300)).await {
                let text = String::from_utf8_lossy(&p.payload).to_string();
                panic!("dev-{i}: unexpected extra message {text} (dup {})", p.dup);
            }
            assert_eq!(present, Some(true), "dev-{i}: session restored");
            assert_eq!(got, want, "dev-{i}: every live message once, in order");
            c.task.abort();
        }));
    }
    for t in tasks {
        t.await.expect("device task");
    }
    // Delivered and acknowledged: the store holds no message any more (the last PUBACKs
    // are read when the shards get to them: polled).
    let queued = common::wait_metric(gw.http, "gateway_queued_messages", T, |v| v == 0.0).await;
    assert_eq!(queued, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_retained_messages_survive_a_restart() {
    let dir = tempdir::Dir::new("retain");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);

    let (mut sub, _) = connect_device(&gw, "listener").await;
    sub.subscribe("news/#", v4::QoS::AtLeastOnce).await;
    disconnect(sub).await;

    let (code, body) = post(
        &gw,
        "/v1/push",
        json!({"topic": "config/site-1", "payload": "v42", "qos": 1, "retain": true}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Replaced, then one deleted by an empty retained message: neither may come back.
    for (t, p) in [("config/old", "x"), ("config/old", "")] {
        let (code, body) = post(
            &gw,
            "/v1/push",
            json!({"topic": t, "payload": p, "qos": 1, "retain": true}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    stop(&mut gw);

    let gw = GatewayProcess::start(&extra);
    // The subscription came back with the session: no SUBSCRIBE after the restart.
    let (mut sub, present) = connect_device(&gw, "listener").await;
    assert!(present, "session present after restart");
    let (code, body) = post(
        &gw,
        "/v1/push",
        json!({"topic": "news/today", "payload": "hello", "qos": 1}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["matched"], 1, "{body}");
    let p = sub.next_publish(T).await.expect("news after restart");
    assert_eq!(p.topic, "news/today");
    assert_eq!(&p.payload[..], b"hello");

    // The retained message is given to a new subscriber; the deleted one is not.
    let mut fresh = v4::connect(v4::options(gw.mqtt, "fresh")).await;
    fresh.subscribe("config/#", v4::QoS::AtLeastOnce).await;
    let r = fresh.next_publish(T).await.expect("retained after restart");
    assert_eq!(r.topic, "config/site-1");
    assert_eq!(&r.payload[..], b"v42");
    assert!(r.retain);
    assert!(
        fresh
            .next_publish(Duration::from_millis(500))
            .await
            .is_none(),
        "a deleted retained message came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_expired_while_down_is_gone_after_restart() {
    let dir = tempdir::Dir::new("expiry");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);

    // Two MQTT 5 sessions: one lives 1 s offline, one an hour.
    for (id, secs) in [("short", 1u32), ("long", 3600)] {
        let c = connect5(id, 30, true, Some(session_expiry_props(secs)));
        let (mut raw, _) = Raw::connected_v5(gw.mqtt, &c).await;
        let ack = raw
            .subscribe_v5(
                1,
                vec![mqttbytes::v5::SubscribeFilter::new(
                    format!("{id}/t"),
                    mqttbytes::QoS::AtLeastOnce,
                )],
            )
            .await;
        assert_eq!(ack.return_codes.len(), 1);
        drop(raw);
    }
    // Once a push to a session is answered `queued` (not `sent`), the shard has seen the
    // device leave, and the commit that holds the push holds the session's offline time
    // too (one writer, commits in order). The short one may have ended already.
    for (id, ok) in [
        ("short", ["queued", "offline"]),
        ("long", ["queued", "queued"]),
    ] {
        loop {
            let (code, body) = post(
                &gw,
                "/v1/push",
                json!({"client_id": id, "topic": format!("{id}/t"), "payload": "p", "qos": 1}),
            )
            .await;
            assert_eq!(code, 200, "{body}");
            if body["status"] != "sent" {
                assert!(
                    ok.contains(&body["status"].as_str().unwrap_or("")),
                    "{body}"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    kill9(&mut gw);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gw = GatewayProcess::start(&extra);

    for (id, want) in [("short", false), ("long", true)] {
        let c = connect5(id, 30, false, Some(session_expiry_props(3600)));
        let (_raw, ack) = Raw::connected_v5(gw.mqtt, &c).await;
        assert_eq!(ack.session_present, want, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_are_not_sent_again_after_kill_9() {
    let dir = tempdir::Dir::new("acked");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);

    let (mut dev, _) = connect_device(&gw, "acker").await;
    for k in 0..5 {
        let (code, body) = post(
            &gw,
            "/v1/push",
            json!({"client_id": "acker", "topic": "a/cmd", "payload": format!("on-{k}"), "qos": 1, "wait_ack": true}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "acked", "{body}");
    }
    disconnect(dev).await;
    // Queued after the acknowledgements on the same shard: once this is answered, the
    // acknowledgements before it are durable too (one writer, commits in order).
    for k in 0..3 {
        let (code, body) = post(
            &gw,
            "/v1/push",
            json!({"client_id": "acker", "topic": "a/cmd", "payload": format!("off-{k}"), "qos": 1}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "queued", "{body}");
    }
    kill9(&mut gw);
    let gw = GatewayProcess::start(&extra);

    (dev, _) = connect_device(&gw, "acker").await;
    for k in 0..3 {
        let p = dev.next_publish(T).await.expect("queued message");
        assert_eq!(
            String::from_utf8_lossy(&p.payload),
            format!("off-{k}"),
            "acknowledged messages must not come again"
        );
    }
    assert!(dev.next_publish(Duration::from_millis(500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_file_stops_growing_when_messages_are_delivered() {
    let gw = common::TestServer::start("");
    let api = |body: Value| {
        let http = gw.http;
        async move { post_json(http, "/v1/push/batch", &body).await }
    };
    let mut sizes = Vec::new();
    for round in 0..8 {
        // Ten offline devices get 300 queued messages each, then take them all.
        for d in 0..10 {
            let mut o = v4::options(gw.mqtt, &format!("grow-{d}"));
            o.set_clean_session(false);
            let c = v4::connect(o).await;
            disconnect(c).await;
        }
        let items: Vec<Value> = (0..3000)
            .map(|k| {
                json!({"client_id": format!("grow-{}", k % 10), "topic": "g/cmd",
                       "payload": format!("{round}-{k}-{}", "x".repeat(200)), "qos": 1})
            })
            .collect();
        for chunk in items.chunks(1000) {
            let (code, body) = api(json!({ "messages": chunk })).await;
            assert_eq!(code, 200, "{body}");
        }
        for d in 0..10 {
            let mut o = v4::options(gw.mqtt, &format!("grow-{d}"));
            o.set_clean_session(false);
            let mut c = v4::connect(o).await;
            for _ in 0..300 {
                assert!(
                    c.next_publish(T).await.is_some(),
                    "round {round} device {d}"
                );
            }
            disconnect(c).await;
        }
        // The acknowledgements are committed once a later queued push is answered.
        let (code, body) = api(json!({"messages": [
            {"client_id": "grow-0", "topic": "g/cmd", "payload": "marker", "qos": 1}
        ]}))
        .await;
        assert_eq!(code, 200, "{body}");
        sizes.push(gw.metric("gateway_store_bytes").await);
    }
    // 8 × 3,000 messages of ~250 bytes went through (6 MB). Freed pages are reused: the
    // file levels off (redb also trims its end, so it moves a little), well below what
    // went through, instead of growing with every round.
    let early = sizes[0].max(sizes[1]);
    assert!(
        sizes[2..].iter().all(|&s| s <= 2.0 * early),
        "store grows: {sizes:?}"
    );
    assert!(
        sizes[7] < 6_000_000.0 / 2.0,
        "store keeps delivered messages: {sizes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Measurements for docs/BENCHMARKS.md (ignored: run them on purpose, in release):
//   cargo test --release --test durability -- --ignored --nocapture --test-threads 1

/// Creates `n` offline persistent sessions (v3.1.1, clean session 0), each subscribed to
/// `dev/{id}/cmd`, with `parallel` clients at a time.
async fn create_sessions(gw: &GatewayProcess, prefix: &str, n: usize, parallel: usize) {
    let addr = gw.mqtt;
    let tasks: Vec<_> = (0..parallel)
        .map(|w| {
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                for i in (w..n).step_by(parallel) {
                    let id = format!("{prefix}-{i}");
                    let mut raw = Raw::connect(addr).await;
                    raw.send(&Raw::connect_v4(&id, 60, false)).await;
                    match raw.next_v4(T).await {
                        Ok(mqttbytes::v4::Packet::ConnAck(_)) => {}
                        other => panic!("{id}: {other:?}"),
                    }
                    raw.send(&Raw::subscribe_v4(&format!("dev/{id}/cmd"), 1, 1))
                        .await;
                    match raw.next_v4(T).await {
                        Ok(mqttbytes::v4::Packet::SubAck(_)) => {}
                        other => panic!("{id}: {other:?}"),
                    }
                    raw.send(&[0xE0, 0]).await; // DISCONNECT
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("session task");
    }
}

/// `total` QoS 1 pushes to the `devices` sessions of `prefix`, in batches of `batch`, from
/// `senders` concurrent senders. Returns (seconds, answers by status).
async fn push_queued(
    gw: &GatewayProcess,
    prefix: &str,
    devices: usize,
    total: usize,
    batch: usize,
    senders: usize,
) -> (f64, std::collections::BTreeMap<String, usize>) {
    let started = std::time::Instant::now();
    let per_sender = total / senders;
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let http = gw.http;
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut counts = std::collections::BTreeMap::new();
                let mut sent = 0;
                while sent < per_sender {
                    let items: Vec<Value> = (sent..(sent + batch).min(per_sender))
                        .map(|k| {
                            let i = (s + k * senders) % devices;
                            json!({"client_id": format!("{prefix}-{i}"),
                                   "topic": format!("dev/{prefix}-{i}/cmd"),
                                   "payload": "0123456789abcdef0123456789abcdef", "qos": 1})
                        })
                        .collect();
                    sent += items.len();
                    let (code, body) =
                        post_json(http, "/v1/push/batch", &json!({ "messages": items })).await;
                    assert_eq!(code, 200, "{body}");
                    for r in body["results"].as_array().expect("results") {
                        let st = r["status"].as_str().unwrap_or("?").to_string();
                        *counts.entry(st).or_insert(0) += 1;
                    }
                }
                counts
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.expect("sender") {
            *counts.entry(k).or_insert(0) += v;
        }
    }
    (started.elapsed().as_secs_f64(), counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for docs/BENCHMARKS.md; run in release"]
async fn measure_queued_pushes_per_second() {
    const DEVICES: usize = 1000;
    const PUSHES: usize = 200_000;
    for (mode, store) in [
        ("store off", "[store]\nenabled = false\n"),
        ("immediate", "[store]\ndurability = \"immediate\"\n"),
        ("eventual", "[store]\ndurability = \"eventual\"\n"),
    ] {
        let dir = tempdir::Dir::new("measure");
        let extra = format!(
            "{store}path = \"{}\"\n[mqtt]\nmax_queued_messages = 1000\n",
            dir.0.join("data").display()
        );
        let gw = GatewayProcess::start(&extra);
        create_sessions(&gw, "q", DEVICES, 32).await;
        let (secs, counts) = push_queued(&gw, "q", DEVICES, PUSHES, 1000, 4).await;
        let commits = if mode == "store off" {
            0.0
        } else {
            gw.metric("gateway_store_commits_total").await
        };
        let bytes = if mode == "store off" {
            0.0
        } else {
            gw.metric("gateway_store_bytes").await
        };
        println!(
            "{}",
            json!({"mode": mode, "pushes": PUSHES, "seconds": (secs * 1000.0).round() / 1000.0,
                   "pushes_per_sec": (PUSHES as f64 / secs).round(), "answers": counts,
                   "store_commits": commits, "store_bytes": bytes})
        );
        assert_eq!(counts.get("queued"), Some(&PUSHES), "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for docs/BENCHMARKS.md; run in release"]
async fn measure_restart_with_100k_sessions() {
    const SESSIONS: usize = 100_000;
    let dir = tempdir::Dir::new("restart");
    let extra = format!("{}[mqtt]\nmax_queued_messages = 1000\n", store_toml(&dir));
    let mut gw = GatewayProcess::start(&extra);
    let t = std::time::Instant::now();
    create_sessions(&gw, "r", SESSIONS, 64).await;
    let create_secs = t.elapsed().as_secs_f64();
    // One queued message per session.
    let (_, counts) = push_queued(&gw, "r", SESSIONS, SESSIONS, 1000, 4).await;
    assert_eq!(counts.get("queued"), Some(&SESSIONS), "{counts:?}");
    let bytes = gw.metric("gateway_store_bytes").await;

    for how in ["kill -9", "SIGTERM"] {
        if how == "kill -9" {
            kill9(&mut gw);
        } else {
            stop(&mut gw);
        }
        let t = std::time::Instant::now();
        gw = GatewayProcess::start(&extra);
        let listening = t.elapsed().as_secs_f64();
        let sessions = gw.metric("gateway_sessions").await;
        let queued = gw.metric("gateway_queued_messages").await;
        println!(
            "{}",
            json!({"stopped_by": how, "stored_sessions": SESSIONS,
                   "create_sessions_secs": (create_secs * 10.0).round() / 10.0,
                   "store_bytes": bytes, "spawn_to_listening_secs": (listening * 1000.0).round() / 1000.0,
                   "restored_sessions": sessions, "restored_queued": queued})
        );
        assert_eq!(sessions as usize, SESSIONS);
        assert_eq!(queued as usize, SESSIONS);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for docs/BENCHMARKS.md; run in release"]
async fn measure_file_size_after_a_drained_backlog() {
    const DEVICES: usize = 1000;
    const PUSHES: usize = 200_000;
    let dir = tempdir::Dir::new("compact");
    let extra = format!("{}[mqtt]\nmax_queued_messages = 1000\n", store_toml(&dir));
    let gw = GatewayProcess::start(&extra);
    create_sessions(&gw, "c", DEVICES, 32).await;
    let (_, counts) = push_queued(&gw, "c", DEVICES, PUSHES, 1000, 4).await;
    assert_eq!(counts.get("queued"), Some(&PUSHES), "{counts:?}");
    let backlog = gw.metric("gateway_store_bytes").await;
    let drained = std::time::Instant::now();
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            let o = device(&gw, &format!("c-{i}"));
            tokio::spawn(async move {
                let mut c = v4::connect(o).await;
                for _ in 0..PUSHES / DEVICES {
                    assert!(c.next_publish(Duration::from_secs(60)).await.is_some());
                }
                disconnect(c).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("drain");
    }
    let drain_secs = drained.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_drain = gw.metric("gateway_store_bytes").await;
    // The writer looks at free space after 10 s without work.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let after_idle = gw.metric("gateway_store_bytes").await;
    let compactions = gw.metric("gateway_store_compactions_total").await;
    println!(
        "{}",
        json!({"queued_messages": PUSHES, "bytes_with_backlog": backlog,
               "drain_secs": (drain_secs * 10.0).round() / 10.0,
               "bytes_after_drain": after_drain, "bytes_after_idle": after_idle,
               "compactions": compactions})
    );
    assert_eq!(gw.metric("gateway_queued_messages").await, 0.0);
}

/// `durability = "eventual"` commits without fsync and fsyncs once per `sync_interval_ms`;
/// a `queued` answer must still mean durable, so it waits for that fsync. Pushes are
/// answered `queued`, the gateway is killed at once, and every one is delivered after
/// the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventual_durability_answers_queued_only_after_the_fsync() {
    const DEVICES: usize = 5;
    const PER_DEVICE: usize = 40;
    let dir = tempdir::Dir::new("eventual");
    let extra = format!(
        "{}durability = \"eventual\"\nsync_interval_ms = 1000\n",
        store_toml(&dir)
    );
    let mut gw = GatewayProcess::start(&extra);
    for i in 0..DEVICES {
        let (mut c, _) = connect_device(&gw, &format!("ev-{i}")).await;
        c.subscribe(&format!("ev/{i}/cmd"), v4::QoS::AtLeastOnce)
            .await;
        disconnect(c).await;
    }
    // Let the sessions' own commit reach the disk, so only the pushes are at stake.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut items = Vec::new();
    for k in 0..PER_DEVICE {
        for i in 0..DEVICES {
            items.push(json!({
                "client_id": format!("ev-{i}"),
                "topic": format!("ev/{i}/cmd"),
                "payload": format!("{i}:{k}"),
                "qos": 1,
            }));
        }
    }
    let (code, body) = post(&gw, "/v1/push/batch", json!({ "messages": items })).await;
    assert_eq!(code, 200, "{body}");
    for r in body["results"].as_array().expect("results") {
        assert_eq!(r["status"], "queued", "{r}");
    }
    kill9(&mut gw);
    let gw = GatewayProcess::start(&extra);
    for i in 0..DEVICES {
        let (mut c, present) = connect_device(&gw, &format!("ev-{i}")).await;
        assert!(present, "ev-{i}: session restored");
        let mut got = Vec::new();
        while got.len() < PER_DEVICE {
            let p = c
                .next_publish(T)
                .await
                .unwrap_or_else(|| panic!("ev-{i}: {} of {PER_DEVICE} after kill -9", got.len()));
            let text = String::from_utf8_lossy(&p.payload).to_string();
            let k: usize = text
                .split_once(':')
                .and_then(|(_, k)| k.parse().ok())
                .expect("i:k");
            if !got.contains(&k) {
                got.push(k);
            }
        }
        assert_eq!(got, (0..PER_DEVICE).collect::<Vec<_>>(), "ev-{i}: in order");
        c.task.abort();
    }
}

/// A session whose device was online when the gateway crashed counts as offline from the
/// restart on, and that is stored: a second crash and restart must not give it its whole
/// expiry again (else frequent restarts would keep an abandoned session forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_online_at_a_crash_expires_across_later_restarts() {
    let dir = tempdir::Dir::new("online-crash");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let c = connect5("was-online", 30, true, Some(session_expiry_props(3)));
    let (_raw, _) = Raw::connected_v5(gw.mqtt, &c).await;
    // The session's record (online) is committed well within this.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    kill9(&mut gw);
    // Restart: the device is gone; its 3 s expiry starts now.
    let mut gw = GatewayProcess::start(&extra);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    kill9(&mut gw);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // 3.5 s after the first restart: expired, even though it never reconnected.
    let gw = GatewayProcess::start(&extra);
    let c = connect5("was-online", 30, false, Some(session_expiry_props(3600)));
    let (_raw, ack) = Raw::connected_v5(gw.mqtt, &c).await;
    assert!(!ack.session_present, "the session outlived its expiry");
}
