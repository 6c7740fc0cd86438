//! The durable store against the real binary: what the backend was told is `queued`
//! survives `kill -9`; subscriptions and retained messages survive a restart; sessions
//! that expired during the downtime are gone; acknowledged messages are not sent again;
//! a damaged or empty store file stops the start with a clear error, even where redb
//! panics on it; a record whose bytes changed on disk is refused and counted.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::{connect5, post_json, session_expiry_props, tempdir, v4, GatewayProcess, Raw};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

fn store_toml(dir: &tempdir::Dir) -> String {
    format!(
        "[store]\npath = \"{}\"\n",
        dir.0.join("data").display().to_string().replace('\\', "/")
    )
}

async fn post(gw: &GatewayProcess, path: &str, body: Value) -> (u16, Value) {
    post_json(gw.http, path, &body).await
}

fn kill9(gw: &mut GatewayProcess) {
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(T).is_some(), "gateway did not die");
}

fn stop(gw: &mut GatewayProcess) {
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(T).expect("gateway stops on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// A v3.1.1 device with a persistent session (clean_session = false).
fn device(gw: &GatewayProcess, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(false);
    o
}

/// Connects a persistent v4 device and returns it with CONNACK's session-present flag.
async fn connect_device(gw: &GatewayProcess, id: &str) -> (v4::Client, bool) {
    let mut c = v4::connect_raw(device(gw, id));
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Packet::ConnAck(a))))) => {
                return (c, a.session_present)
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }
}

async fn disconnect(c: v4::Client) {
    c.client.disconnect().await.expect("disconnect");
    let mut c = c;
    let _ = c.wait_closed(T).await;
    c.task.abort();
}

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
    // Delivered and acknowledged: the store holds no message any more.
    assert_eq!(gw.metric("gateway_queued_messages").await, 0.0);
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

/// Writes a config for the store in `dir` and runs the gateway (or `args` after it) to its
/// exit: the exit code and stderr.
fn run_on_store(dir: &tempdir::Dir, args: &[&str]) -> (Option<i32>, String) {
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n{}",
            store_toml(dir)
        ),
    )
    .unwrap();
    let mut argv = vec![OsStr::new("--config"), config.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    let (code, _out, err) = common::run_gateway(&argv, Duration::from_secs(20));
    (code, err)
}

/// The documented store error: exit 1, the file named, repair and moving it aside offered,
/// no panic message.
fn assert_store_error(code: Option<i32>, err: &str, file: &std::path::Path) {
    assert_eq!(code, Some(1), "{err}");
    let path = file.display().to_string();
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("gateway store-repair"), "offers repair: {err}");
    assert!(
        err.contains(&format!("mv {path}")),
        "offers moving it aside: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Replaces every occurrence of `from` in `file` by `to` (same length); returns how many.
fn patch_file(file: &std::path::Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(file).expect("store file");
    let mut count = 0;
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + i..at + i + to.len()].copy_from_slice(to);
        at += i + from.len();
        count += 1;
    }
    std::fs::write(file, bytes).expect("write store file");
    count
}

#[test]
fn a_corrupt_store_file_stops_the_start_with_a_clear_error() {
    let dir = tempdir::Dir::new("corrupt");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("gateway.redb");
    let garbage: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&file, garbage).unwrap();

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);

    // The repair command says it cannot help with this one, and fails.
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");

    // Moved aside, the gateway starts with an empty store.
    std::fs::rename(&file, data.join("gateway.redb.broken")).unwrap();
    let gw = GatewayProcess::start(&store_toml(&dir));
    drop(gw);
}

/// Issue 17 item 9: an empty store file is not taken for a new store (it may be one a
/// failed disk or copy truncated): the start stops with the store error and leaves it.
#[test]
fn a_zero_byte_store_file_stops_the_start_with_the_store_error() {
    let dir = tempdir::Dir::new("empty-store");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("gateway.redb");
    std::fs::write(&file, b"").unwrap();

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);
    assert!(err.contains("empty (0 bytes)"), "says why: {err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "left as it was");
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "store-repair on an empty file: {err}");
}

/// Issue 17 item 9: a key that is no longer UTF-8 makes redb panic while the start reads
/// the store (it unwraps the key's UTF-8); the start ends with the store error, exit 1,
/// not a panic (exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_redb_panics_on_stops_the_start_with_the_store_error() {
    let dir = tempdir::Dir::new("panic-store");
    let mut gw = GatewayProcess::start(&store_toml(&dir));
    let (mut c, _) = connect_device(&gw, "panic-key-0001").await;
    c.subscribe("panic/key", v4::QoS::AtLeastOnce).await;
    disconnect(c).await;
    stop(&mut gw);
    let file = dir.0.join("data").join("gateway.redb");
    assert!(patch_file(&file, b"panic-key-0001", b"panic-key-\xff001") > 0);

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "store-repair: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 17 item 9: a stored message whose payload bytes changed on disk is refused, not
/// delivered: counted in `gateway_store_corrupt_records_total` and deleted, while the
/// other sessions and messages of the store load and are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_on_disk_is_refused_and_counted_while_the_good_ones_load() {
    let dir = tempdir::Dir::new("corrupt-record");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let ids = ["rec-a", "rec-b", "rec-c"];
    for id in ids {
        let (mut c, _) = connect_device(&gw, id).await;
        c.subscribe(&format!("rec/{id}"), v4::QoS::AtLeastOnce)
            .await;
        disconnect(c).await;
        let push = json!({"client_id": id, "topic": format!("rec/{id}"),
                          "payload": format!("payload-of-{id}-0123456789"), "qos": 1});
        let (code, body) = post(&gw, "/v1/push", push).await;
        assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
    }
    stop(&mut gw);
    let file = dir.0.join("data").join("gateway.redb");
    let changed = patch_file(
        &file,
        b"payload-of-rec-b-0123456789",
        b"payload-of-rec-b-0123456788",
    );
    assert!(changed > 0, "the payload is in the file");

    let gw = GatewayProcess::start(&extra);
    for id in ids {
        let (mut c, present) = connect_device(&gw, id).await;
        assert!(present, "{id}: the session loaded");
        let got = c.next_publish(Duration::from_millis(if id == "rec-b" {
            500
        } else {
            10_000
        }));
        match (id, got.await) {
            ("rec-b", None) => {}
            ("rec-b", Some(p)) => panic!("the corrupt message was delivered: {p:?}"),
            (_, Some(p)) => assert_eq!(p.payload, format!("payload-of-{id}-0123456789")),
            (_, None) => panic!("{id}: its message did not come"),
        }
        c.task.abort();
    }
    assert_eq!(gw.metric("gateway_store_corrupt_records_total").await, 1.0);
}

/// Issue 24 part 3: a `$share/` subscription restored from the store works. Two persistent
/// members subscribe before a restart and never again; after it, the group's messages
/// published while they are offline and once they are back each reach exactly one member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_shared_subscription_delivers_after_a_restart() {
    let dir = tempdir::Dir::new("shared-restart");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let members = ["worker-1", "worker-2"];
    for id in members {
        let (mut c, _) = connect_device(&gw, id).await;
        c.subscribe("$share/workers/jobs/#", v4::QoS::AtLeastOnce)
            .await;
        disconnect(c).await;
    }
    stop(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let mut producer = v4::connect(v4::options(gw.mqtt, "producer")).await;
    let sender = producer.client.clone();
    let publish = |k: usize| {
        let client = sender.clone();
        async move {
            client
                .publish(
                    format!("jobs/{k}"),
                    v4::QoS::AtLeastOnce,
                    false,
                    format!("job-{k}"),
                )
                .await
                .expect("publish");
        }
    };
    // While both members are offline: queued in their restored sessions (PUBACKed
    // before they come back).
    for k in 0..5 {
        publish(k).await;
    }
    for k in 0..5 {
        let acked = producer
            .wait_for(T, |p| matches!(p, v4::Packet::PubAck(_)))
            .await;
        assert!(acked, "PUBACK {k} of the offline publishes");
    }
    let mut workers = Vec::new();
    for id in members {
        let (c, present) = connect_device(&gw, id).await;
        assert!(present, "{id}: session present after restart");
        workers.push(c);
    }
    for k in 5..10 {
        publish(k).await;
    }
    let want: Vec<String> = (0..10).map(|k| format!("job-{k}")).collect();
    let mut got: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while got.len() < want.len() && tokio::time::Instant::now() < deadline {
        for w in &mut workers {
            if let Some(p) = w.next_publish(Duration::from_millis(100)).await {
                assert!(p.topic.starts_with("jobs/"), "{}", p.topic);
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
    }
    for w in &mut workers {
        if let Some(p) = w.next_publish(Duration::from_millis(300)).await {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    got.sort_by_key(|p| p[4..].parse::<usize>().unwrap_or(usize::MAX));
    assert_eq!(
        got, want,
        "each job to exactly one member of the restored group"
    );
}

/// A QoS 2 acknowledgement from the client: PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70).
fn ack_bytes(first: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [first, 2, hi, lo]
}

/// Publishes `topic` at QoS 2 from `publisher` through the whole exchange.
async fn publish_qos2(publisher: &mut Raw, topic: &str, pkid: u16) {
    publisher
        .send(&Raw::publish_v4(topic, 2, pkid, topic.as_bytes()))
        .await;
    expect_v4(
        publisher,
        "PUBREC",
        |p| matches!(p, P4::PubRec(r) if r.pkid == pkid),
    )
    .await;
    publisher.send(&ack_bytes(0x62, pkid)).await;
    expect_v4(
        publisher,
        "PUBCOMP",
        |p| matches!(p, P4::PubComp(c) if c.pkid == pkid),
    )
    .await;
}

/// The next PUBLISH `r` gets: its topic, packet id and DUP flag.
async fn next_publish_v4(r: &mut Raw, what: &str) -> (String, u16, bool) {
    match expect_v4(r, what, |p| matches!(p, P4::Publish(_))).await {
        P4::Publish(p) => (p.topic, p.pkid, p.dup),
        _ => unreachable!(),
    }
}

/// Issue 24 part 3: outbound QoS 2 state survives a restart exactly. A persistent
/// subscriber holds one message past PUBREC (the gateway's PUBREL came) and one before it.
/// After a restart it gets the PUBREL again under the first one's packet id, not the
/// message (which it would deliver twice), and the second message again with DUP under
/// its original packet id (which its duplicate check goes by).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_qos2_state_survives_a_restart_exactly() {
    let dir = tempdir::Dir::new("qos2-out");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let (released, published) = leave_qos2_in_flight(&gw).await;
    stop(&mut gw);
    let gw = GatewayProcess::start(&extra);
    resume_qos2_in_flight(&gw, released, published).await;
}

/// A persistent subscriber of `q2/#` ends up with one QoS 2 message past PUBREC and one
/// before it: their packet ids.
async fn leave_qos2_in_flight(gw: &GatewayProcess) -> (u16, u16) {
    let (mut sub, _) = raw_connect(gw, "q2-out", false).await;
    sub.send(&Raw::subscribe_v4("q2/#", 2, 1)).await;
    expect_v4(&mut sub, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    let (mut publisher, _) = raw_connect(gw, "q2-out-pub", true).await;
    // Two finished first, so the next ids are not the first ones a fresh start gives.
    for (k, topic) in ["q2/warm-1", "q2/warm-2"].into_iter().enumerate() {
        publish_qos2(&mut publisher, topic, k as u16 + 1).await;
        let (_, pkid, _) = next_publish_v4(&mut sub, topic).await;
        sub.send(&ack_bytes(0x50, pkid)).await;
        expect_v4(
            &mut sub,
            "PUBREL",
            |p| matches!(p, P4::PubRel(r) if r.pkid == pkid),
        )
        .await;
        sub.send(&ack_bytes(0x70, pkid)).await;
    }
    publish_qos2(&mut publisher, "q2/released", 3).await;
    let (topic, released, _) = next_publish_v4(&mut sub, "q2/released").await;
    assert_eq!(topic, "q2/released");
    sub.send(&ack_bytes(0x50, released)).await;
    expect_v4(
        &mut sub,
        "PUBREL",
        |p| matches!(p, P4::PubRel(r) if r.pkid == released),
    )
    .await;
    publish_qos2(&mut publisher, "q2/published", 4).await;
    let (topic, published, _) = next_publish_v4(&mut sub, "q2/published").await;
    assert_eq!(topic, "q2/published");
    assert!(released > 2 && published > 2, "ids {released}, {published}");
    (released, published)
}

/// After the restart: PUBREL for `released`, `published` again with DUP, both under
/// their packet ids, and nothing else.
async fn resume_qos2_in_flight(gw: &GatewayProcess, released: u16, published: u16) {
    let (mut sub, present) = raw_connect(gw, "q2-out", false).await;
    assert!(present, "session present after restart");
    match sub.recv_v4(T).await {
        Ok(P4::PubRel(r)) => assert_eq!(r.pkid, released, "PUBREL under its packet id"),
        other => panic!("expected PUBREL {released} first, got {other:?}"),
    }
    match sub.recv_v4(T).await {
        Ok(P4::Publish(p)) => {
            assert_eq!(p.topic, "q2/published");
            assert_eq!(
                p.pkid, published,
                "the same packet id as before the restart"
            );
            assert!(p.dup, "DUP set");
        }
        other => panic!("expected q2/published again, got {other:?}"),
    }
    sub.send(&ack_bytes(0x70, released)).await;
    sub.send(&ack_bytes(0x50, published)).await;
    expect_v4(
        &mut sub,
        "PUBREL",
        |p| matches!(p, P4::PubRel(r) if r.pkid == published),
    )
    .await;
    sub.send(&ack_bytes(0x70, published)).await;
    match sub.recv_v4(Duration::from_millis(500)).await {
        Err("timeout") => {}
        other => panic!("nothing more expected, got {other:?}"),
    }
    assert_eq!(gw.metric("gateway_queued_messages").await, 0.0);
}

/// Issue 24 part 3: an inbound QoS 2 message whose PUBREC was sent is not delivered twice
/// after a restart. The publisher (persistent) did not see the PUBREC and sends the
/// PUBLISH again with DUP after the restart: it is acknowledged, not routed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_qos2_message_acknowledged_before_a_restart_is_not_routed_again() {
    let dir = tempdir::Dir::new("qos2-in");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let (mut publisher, _) = raw_connect(&gw, "q2-in", false).await;
    publisher
        .send(&Raw::publish_v4("q2in/x", 2, 9, b"once"))
        .await;
    expect_v4(
        &mut publisher,
        "PUBREC",
        |p| matches!(p, P4::PubRec(r) if r.pkid == 9),
    )
    .await;
    stop(&mut gw);
    let gw = GatewayProcess::start(&extra);
    resend_qos2_after_restart(&gw).await;
}

/// The publisher sends its QoS 2 message again with DUP and finishes it, then a marker:
/// a watcher subscribed since the restart gets the marker first.
async fn resend_qos2_after_restart(gw: &GatewayProcess) {
    let (mut watcher, _) = raw_connect(gw, "q2-in-watch", true).await;
    watcher.send(&Raw::subscribe_v4("q2in/#", 1, 1)).await;
    expect_v4(&mut watcher, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    let (mut publisher, present) = raw_connect(gw, "q2-in", false).await;
    assert!(present, "session present after restart");
    let mut again = Raw::publish_v4("q2in/x", 2, 9, b"once");
    again[0] |= 0x08; // DUP
    publisher.send(&again).await;
    expect_v4(
        &mut publisher,
        "PUBREC",
        |p| matches!(p, P4::PubRec(r) if r.pkid == 9),
    )
    .await;
    publisher.send(&ack_bytes(0x62, 9)).await;
    expect_v4(
        &mut publisher,
        "PUBCOMP",
        |p| matches!(p, P4::PubComp(c) if c.pkid == 9),
    )
    .await;
    publisher
        .send(&Raw::publish_v4("q2in/marker", 1, 10, b"marker"))
        .await;
    expect_v4(
        &mut publisher,
        "PUBACK",
        |p| matches!(p, P4::PubAck(a) if a.pkid == 10),
    )
    .await;
    let (topic, _, _) = next_publish_v4(&mut watcher, "the marker").await;
    assert_eq!(
        topic, "q2in/marker",
        "the resent QoS 2 message was routed again"
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

// ---------------------------------------------------------------------------------------
// MQTT acknowledgements wait for the store commit (issue 17 item 2): each scenario kills
// the gateway the moment the acknowledgement is read, restarts it, and checks that what
// was acknowledged is there.

use mqttbytes::v4::Packet as P4;

/// A publisher id and a subscriber id homed on the same shard of `shards`, or (`same`
/// false) on different ones: then the subscriber's copy is stored by another shard than
/// the one that acknowledges the PUBLISH.
fn publisher_and_subscriber(prefix: &str, shards: usize, same: bool) -> (String, String) {
    let a = format!("{prefix}-pub");
    let home = gateway::mailbox::home_shard(&a, shards);
    let b = (0..)
        .map(|i| format!("{prefix}-sub-{i}"))
        .find(|b| (gateway::mailbox::home_shard(b, shards) == home) == same)
        .expect("some id has the home wanted");
    (a, b)
}

const SHARDS: usize = 2;

fn acks_toml(dir: &tempdir::Dir) -> String {
    format!("{}\n[shards]\ncount = {SHARDS}\n", store_toml(dir))
}

/// A raw 3.1.1 connection with a persistent (or clean) session, after its CONNACK.
async fn raw_connect(gw: &GatewayProcess, id: &str, clean: bool) -> (Raw, bool) {
    let mut r = Raw::connect(gw.mqtt).await;
    r.send(&Raw::connect_v4(id, 60, clean)).await;
    match r.recv_v4(T).await {
        Ok(P4::ConnAck(a)) => (r, a.session_present),
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
}

async fn expect_v4(r: &mut Raw, what: &str, f: impl Fn(&P4) -> bool) -> P4 {
    loop {
        match r.recv_v4(T).await {
            Ok(p) if f(&p) => return p,
            Ok(_) => continue,
            Err(e) => panic!("no {what}: {e}"),
        }
    }
}

/// Subscribes `id` (persistent) to `filter` at QoS 1, disconnects it, and waits until
/// that is durable: a push queued for it afterwards is answered after a later commit of
/// the same shard (one writer, commits in order). Its reconnection skips that push.
async fn offline_subscriber(gw: &GatewayProcess, id: &str, filter: &str) {
    let (mut r, _) = raw_connect(gw, id, false).await;
    r.send(&Raw::subscribe_v4(filter, 1, 1)).await;
    expect_v4(&mut r, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    r.send(&[0xe0, 0]).await;
    assert!(r.closed_within(T).await);
    let (code, body) = post(
        gw,
        "/v1/push",
        json!({"client_id": id, "topic": "sync", "payload": "sync", "qos": 1}),
    )
    .await;
    assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
}

/// Reconnects persistent `id` and collects the payloads queued for it (but the sync
/// push), acknowledging each, until `n` arrived or nothing more comes.
async fn queued_payloads(gw: &GatewayProcess, id: &str, n: usize) -> Vec<String> {
    let (mut r, present) = raw_connect(gw, id, false).await;
    assert!(present, "{id}: session present after restart");
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(P4::Publish(p)) = r.recv_v4(Duration::from_secs(3)).await else {
            break;
        };
        r.send(&common::encode(|b| {
            mqttbytes::v4::PubAck::new(p.pkid).write(b)
        }))
        .await;
        let payload = String::from_utf8_lossy(&p.payload).to_string();
        if payload != "sync" {
            got.push(payload);
        }
    }
    got
}

/// A QoS 1 push to `topic`: the number of sessions it matched.
async fn topic_push(gw: &GatewayProcess, topic: &str, payload: &str) -> u64 {
    let (code, body) = post(
        gw,
        "/v1/push",
        json!({"topic": topic, "payload": payload, "qos": 1}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body["matched"].as_u64().expect("matched")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_means_the_message_for_an_offline_subscriber_survives_kill_9() {
    puback_survives_kill_9(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_for_a_subscriber_homed_on_another_shard_survives_kill_9() {
    puback_survives_kill_9(false).await;
}

/// One QoS 1 PUBLISH, `kill -9` once its PUBACK is read, three times: the offline
/// subscriber (on the publisher's home shard, or `same` false: on another) gets it.
async fn puback_survives_kill_9(same: bool) {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("puback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let (publisher, sub) = publisher_and_subscriber(&format!("pa{trial}"), SHARDS, same);
        offline_subscriber(&gw, &sub, "acks/one").await;

        let (mut p, _) = raw_connect(&gw, &publisher, true).await;
        p.send(&Raw::publish_v4("acks/one", 1, 7, b"acknowledged"))
            .await;
        expect_v4(
            &mut p,
            "PUBACK",
            |p| matches!(p, P4::PubAck(a) if a.pkid == 7),
        )
        .await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let got = queued_payloads(&gw, &sub, 1).await;
        assert_eq!(
            got,
            ["acknowledged"],
            "trial {trial}: a PUBACKed message was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_pubacked_messages_survives_kill_9_after_the_last_puback() {
    pubacked_stream_survives_kill_9(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubacked_stream_to_a_subscriber_homed_on_another_shard_survives_kill_9() {
    pubacked_stream_survives_kill_9(false).await;
}

/// 300 QoS 1 PUBLISHes in one write, `kill -9` once the last PUBACK is read: the offline
/// subscriber (on the publisher's home shard, or `same` false: on another) gets them all.
async fn pubacked_stream_survives_kill_9(same: bool) {
    const N: u16 = 300;
    let dir = tempdir::Dir::new("pubstream");
    let extra = acks_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let (publisher, sub) = publisher_and_subscriber("ps", SHARDS, same);
    offline_subscriber(&gw, &sub, "acks/stream").await;

    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    let mut burst = Vec::new();
    for i in 1..=N {
        burst.extend(Raw::publish_v4(
            "acks/stream",
            1,
            i,
            format!("m{i}").as_bytes(),
        ));
    }
    p.send(&burst).await;
    let mut acked = 0;
    while acked < N {
        expect_v4(&mut p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
        acked += 1;
    }
    kill9(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, N as usize).await;
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "PUBACKed messages lost: the last one received is {:?}",
        got.last()
    );
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacked_streams_from_every_shard_survive_kill_9() {
    // Three shards: a message is routed only to the shards whose subscriptions may match
    // it, so some publishers' shards hand it to one shard and not the other.
    const SHARDS: usize = 3;
    const PUBLISHERS: usize = 6;
    const N: u16 = 100;
    let dir = tempdir::Dir::new("pubmany");
    let extra = format!("{}\n[shards]\ncount = {SHARDS}\n", store_toml(&dir));
    let mut gw = GatewayProcess::start(&extra);
    offline_subscriber(&gw, "many-sub", "acks/many").await;
    let mut tasks = Vec::new();
    for k in 0..PUBLISHERS {
        // Publisher k is homed on shard k % SHARDS: they publish on every shard at once.
        let id = (0..)
            .map(|j| format!("many-pub-{k}-{j}"))
            .find(|id| gateway::mailbox::home_shard(id, SHARDS) == k % SHARDS)
            .expect("an id for each shard");
        let (mut p, _) = raw_connect(&gw, &id, true).await;
        tasks.push(tokio::spawn(async move {
            let mut burst = Vec::new();
            for i in 1..=N {
                let payload = format!("{k}-{i}");
                burst.extend(Raw::publish_v4("acks/many", 1, i, payload.as_bytes()));
            }
            p.send(&burst).await;
            for _ in 0..N {
                expect_v4(&mut p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    kill9(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let total = PUBLISHERS * N as usize;
    let got = queued_payloads(&gw, "many-sub", total).await;
    assert_eq!(got.len(), total, "PUBACKed messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connack_and_suback_mean_the_session_and_subscription_survive_kill_9() {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("suback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let id = format!("sa{trial}");
        let mut r = Raw::connect(gw.mqtt).await;
        // CONNECT and SUBSCRIBE in one write: the SUBACK is read right after the CONNACK.
        let mut both = Raw::connect_v4(&id, 60, false);
        both.extend(Raw::subscribe_v4("acks/sub", 1, 3));
        r.send(&both).await;
        expect_v4(&mut r, "CONNACK", |p| matches!(p, P4::ConnAck(_))).await;
        expect_v4(&mut r, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let matched = topic_push(&gw, "acks/sub", "after").await;
        assert_eq!(matched, 1, "trial {trial}: subscription lost");
        let got = queued_payloads(&gw, &id, 1).await;
        assert_eq!(got, ["after"], "trial {trial}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsuback_means_the_subscription_stays_gone_after_kill_9() {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("unsuback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let id = format!("ua{trial}");
        offline_subscriber(&gw, &id, "acks/unsub").await;
        let (mut r, _) = raw_connect(&gw, &id, false).await;
        let unsub = mqttbytes::v4::Unsubscribe {
            pkid: 4,
            topics: vec!["acks/unsub".into()],
        };
        r.send(&common::encode(|b| unsub.write(b))).await;
        expect_v4(&mut r, "UNSUBACK", |p| matches!(p, P4::UnsubAck(_))).await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let matched = topic_push(&gw, "acks/unsub", "x").await;
        assert_eq!(matched, 0, "trial {trial}: unsubscribed yet matched");
    }
}

/// QoS 1 PUBLISH → PUBACK round trips to a topic nobody subscribes (nothing stored), to
/// one with an offline persistent subscriber on the publisher's home shard and to one with
/// a subscriber homed on the other shard (each stores a message): the latency the commit
/// wait adds. Prints p50/p90/p99 of each and the store's mean commit time.
/// `cargo test --test durability measure_qos1_round_trip -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_qos1_round_trip_with_a_persistent_subscriber() {
    let dir = tempdir::Dir::new("rtt");
    // No inbound publish rate (its 100/s default would pace the round trips).
    let gw = GatewayProcess::start(&format!("{}[limits]\npublish_rate = 0\n", acks_toml(&dir)));
    let (publisher, near) = publisher_and_subscriber("rtt", SHARDS, true);
    let (_, far) = publisher_and_subscriber("rtt", SHARDS, false);
    offline_subscriber(&gw, &near, "acks/near").await;
    offline_subscriber(&gw, &far, "acks/far").await;
    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    p.stream.set_nodelay(true).expect("nodelay");
    for topic in ["acks/nobody", "acks/near", "acks/far"] {
        let commits = gw.metric("gateway_store_commit_seconds_count").await;
        let secs = gw.metric("gateway_store_commit_seconds_sum").await;
        let rtt = round_trips(&mut p, topic, 500).await;
        let commits = gw.metric("gateway_store_commit_seconds_count").await - commits;
        let secs = gw.metric("gateway_store_commit_seconds_sum").await - secs;
        let at = |q: f64| rtt[((rtt.len() as f64 * q) as usize).min(rtt.len() - 1)];
        println!(
            "QoS 1 round trip to {topic}, {} sequential: p50 {:?} p90 {:?} p99 {:?}; \
             {commits} commits, mean {:.2} ms",
            rtt.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            secs * 1000.0 / commits.max(1.0)
        );
    }
}

/// `n` sequential QoS 1 PUBLISH → PUBACK round trips, sorted.
async fn round_trips(p: &mut Raw, topic: &str, n: u16) -> Vec<Duration> {
    let mut rtt = Vec::with_capacity(n as usize);
    for pkid in 1..=n {
        let t = std::time::Instant::now();
        p.send(&Raw::publish_v4(topic, 1, pkid, b"x")).await;
        expect_v4(p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
        rtt.push(t.elapsed());
    }
    rtt.sort();
    rtt
}

/// Makes `cmd` start with writes past `bytes` of any file failing (EFBIG; SIGXFSZ
/// ignored), so the store's commits fail once its file must grow beyond that.
fn limit_file_size(cmd: &mut std::process::Command, bytes: libc::rlim_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls: signal, setrlimit.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_closes_the_connection_without_its_puback() {
    const PAYLOAD: usize = 900 * 1024;
    let dir = tempdir::Dir::new("efbig");
    let extra = format!(
        "{}[limits]\npublish_rate = 0\nbytes_rate = 0\n",
        acks_toml(&dir)
    );
    let mut gw = GatewayProcess::start_with(&extra, |c| limit_file_size(c, 16 << 20));
    let (publisher, sub) = publisher_and_subscriber("efbig", SHARDS, true);
    offline_subscriber(&gw, &sub, "acks/big").await;
    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    let mut acked = Vec::new();
    let mut closed = false;
    for i in 1..=40u16 {
        let mut payload = vec![b'.'; PAYLOAD];
        payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
        p.send(&Raw::publish_v4("acks/big", 1, i, &payload)).await;
        match p.recv_v4(T).await {
            Ok(P4::PubAck(a)) => acked.push(a.pkid),
            Err("closed") => {
                closed = true;
                break;
            }
            other => panic!("publish {i}: {other:?}"),
        }
    }
    assert!(
        closed,
        "the store never failed: every publish was acknowledged"
    );
    let refused = gw
        .metric("gateway_disconnects_total{reason=\"store_error\"}")
        .await;
    assert_eq!(refused, 1.0, "counted as a store error");
    kill9(&mut gw);

    // Without the limit: every acknowledged message is there.
    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, acked.len() + 1).await;
    let got: Vec<u16> = got.iter().map(|p| p[..8].parse().unwrap()).collect();
    for pkid in &acked {
        assert!(
            got.contains(pkid),
            "PUBACKed message {pkid} lost: got {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_eventual_durability_a_puback_does_not_wait_and_a_graceful_stop_keeps_it() {
    let dir = tempdir::Dir::new("eventual-ack");
    // An fsync only every minute: a PUBACK that waited for it would not come within T.
    let extra = format!(
        "{}durability = \"eventual\"\nsync_interval_ms = 60000\n[shards]\ncount = {SHARDS}\n",
        store_toml(&dir)
    );
    let mut gw = GatewayProcess::start(&extra);
    let (publisher, sub) = publisher_and_subscriber("ev", SHARDS, false);
    let (mut s, _) = raw_connect(&gw, &sub, false).await;
    s.send(&Raw::subscribe_v4("acks/eventual", 1, 1)).await;
    expect_v4(&mut s, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    s.send(&[0xe0, 0]).await;
    assert!(s.closed_within(T).await);

    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    p.send(&Raw::publish_v4("acks/eventual", 1, 9, b"kept"))
        .await;
    expect_v4(
        &mut p,
        "PUBACK",
        |p| matches!(p, P4::PubAck(a) if a.pkid == 9),
    )
    .await;
    stop(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, 1).await;
    assert_eq!(got, ["kept"], "a graceful stop keeps what was acknowledged");
}
