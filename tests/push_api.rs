//! The HTTP push API over real HTTP (reqwest) to real MQTT devices (rumqttc, raw clients):
//! every status, every error code, TTL, order, batches, wait_ack, overload. Idempotency keys
//! are in push_idempotency.rs, the HTTP contract's corners in push_contract.rs.

mod common;

use std::time::{Duration, Instant};

use common::api::{device, Api};
use common::{v4, v5, Raw, TestServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn push_to_a_connected_device_is_sent() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut dev = device(&gw, "dev-sent", false).await;
    let (code, body) = api
        .push(json!({"client_id": "dev-sent", "topic": "devices/dev-sent/cmd", "payload": "reboot", "qos": 1}))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "sent");
    assert!(body["id"].as_str().is_some_and(|s| !s.is_empty()));
    let m = dev
        .next_publish(T)
        .await
        .expect("delivered without a subscription");
    assert_eq!(&m.topic[..], "devices/dev-sent/cmd");
    assert_eq!(&m.payload[..], b"reboot");
    assert_eq!(
        gw.metric("gateway_push_messages_total{status=\"sent\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn unknown_or_offline_devices_are_offline_and_persistent_ones_queue() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let (_, b) = api
        .push(json!({"client_id": "nobody", "topic": "t", "payload": "x", "qos": 1}))
        .await;
    assert_eq!(b["status"], "offline");

    let dev = device(&gw, "dev-q", true).await;
    dev.client.disconnect().await.unwrap();
    gw.wait_metric("gateway_connections", T, |v| v == 0.0).await;
    let (_, b) = api
        .push(json!({"client_id": "dev-q", "topic": "cmd/q", "payload": "q0", "qos": 0}))
        .await;
    assert_eq!(
        b["status"], "offline",
        "QoS 0 to an offline device is not stored"
    );
    let (_, b) = api
        .push(json!({"client_id": "dev-q", "topic": "cmd/q", "payload": "q1", "qos": 1}))
        .await;
    assert_eq!(b["status"], "queued");

    let mut o = v4::options(gw.mqtt, "dev-q");
    o.set_clean_session(false);
    let mut dev = v4::connect(o).await;
    let m = dev
        .next_publish(T)
        .await
        .expect("queued push delivered on reconnect");
    assert_eq!(&m.payload[..], b"q1");
    assert!(
        dev.next_publish(Duration::from_millis(300)).await.is_none(),
        "QoS 0 was stored"
    );
}

#[tokio::test]
async fn wait_ack_reports_acked_or_times_out_with_504() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let _acker = device(&gw, "dev-acks", false).await; // rumqttc PUBACKs automatically
    let (code, b) = api
        .push(json!({"client_id": "dev-acks", "topic": "c", "payload": "x", "qos": 1, "wait_ack": true}))
        .await;
    assert_eq!((code, b["status"].as_str()), (200, Some("acked")), "{b}");

    // A raw device that never sends PUBACK.
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4("dev-silent", 60, true)).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let started = Instant::now();
    let (code, b) = api
        .push(json!({"client_id": "dev-silent", "topic": "c", "payload": "x", "qos": 1, "wait_ack": true, "timeout_ms": 400}))
        .await;
    assert_eq!(code, 504, "{b}");
    assert_eq!(b["error"]["code"], "ack_timeout");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(
        matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::Publish(_))),
        "it was sent"
    );
}

#[tokio::test]
async fn topic_push_reaches_every_subscriber_and_can_retain() {
    let gw = TestServer::start("[shards]\ncount = 3");
    let api = Api::new(&gw);
    let mut subs = Vec::new();
    for i in 0..6 {
        let mut s = device(&gw, &format!("fan-{i}"), false).await;
        s.subscribe("fleet/+/firmware", v4::QoS::AtLeastOnce).await;
        subs.push(s);
    }
    let (code, b) = api
        .push(json!({"topic": "fleet/eu/firmware", "payload": "v2", "qos": 1, "retain": true}))
        .await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["matched"], 6);
    for s in &mut subs {
        assert_eq!(
            &s.next_publish(T).await.expect("fan-out").payload[..],
            b"v2"
        );
    }
    let mut late = device(&gw, "fan-late", false).await;
    late.subscribe("fleet/#", v4::QoS::AtLeastOnce).await;
    let m = late.next_publish(T).await.expect("retained push");
    assert!(m.retain);
    let (_, b) = api
        .push(json!({"topic": "nobody/listens", "payload": "x"}))
        .await;
    assert_eq!(b["matched"], 0);
}

#[tokio::test]
async fn ttl_expired_messages_are_never_delivered() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let dev = device(&gw, "dev-ttl", true).await;
    dev.client.disconnect().await.unwrap();
    gw.wait_metric("gateway_connections", T, |v| v == 0.0).await;
    let (_, b) = api
        .push(json!({"client_id": "dev-ttl", "topic": "c", "payload": "stale", "qos": 1, "ttl_secs": 1}))
        .await;
    assert_eq!(b["status"], "queued");
    let (_, b) = api
        .push(json!({"client_id": "dev-ttl", "topic": "c", "payload": "fresh", "qos": 1, "ttl_secs": 60}))
        .await;
    assert_eq!(b["status"], "queued");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut o = v4::options(gw.mqtt, "dev-ttl");
    o.set_clean_session(false);
    let mut dev = v4::connect(o).await;
    assert_eq!(
        &dev.next_publish(T).await.expect("fresh one").payload[..],
        b"fresh"
    );
    assert!(dev.next_publish(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        gw.metric("gateway_messages_dropped_total{reason=\"expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn v5_devices_get_the_remaining_ttl_as_message_expiry() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut dev = v5::connect(v5::options(gw.mqtt, "dev-ttl5")).await;
    api.push(json!({"client_id": "dev-ttl5", "topic": "c", "payload": "x", "ttl_secs": 30}))
        .await;
    let m = dev.next_publish(T).await.expect("delivered");
    let left = m
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry set");
    assert!((29..=30).contains(&left), "{left}");
}

#[tokio::test]
async fn a_thousand_qos1_pushes_arrive_in_order() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut dev = device(&gw, "dev-order", false).await;
    for i in 0..1000 {
        let (code, b) = api
            .push(
                json!({"client_id": "dev-order", "topic": "o", "payload": i.to_string(), "qos": 1}),
            )
            .await;
        assert_eq!(code, 200);
        assert!(b["status"] == "sent" || b["status"] == "queued", "{b}");
    }
    for i in 0..1000 {
        let m = dev
            .next_publish(T)
            .await
            .unwrap_or_else(|| panic!("message {i} missing"));
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            i.to_string(),
            "out of order"
        );
    }
}

#[tokio::test]
async fn batch_answers_each_item_and_a_bad_one_does_not_stop_the_rest() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut a = device(&gw, "batch-a", false).await;
    let mut b = device(&gw, "batch-b", false).await;
    let (code, body) = api
        .post(
            "/v1/push/batch",
            json!({"messages": [
                {"client_id": "batch-a", "topic": "x", "payload": "1", "qos": 1},
                {"client_id": "batch-b", "topic": "x", "payload": "2", "qos": 7},
                {"client_id": "batch-b", "topic": "x", "payload": "3"},
                {"client_id": "ghost", "topic": "x", "payload": "4"},
                "not an object"
            ]}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let r = body["results"].as_array().expect("results");
    assert_eq!(r.len(), 5);
    assert_eq!(r[0]["status"], "sent");
    assert_eq!(r[1]["error"]["field"], "messages[1].qos");
    assert_eq!(r[1]["error"]["status"], 400);
    assert_eq!(r[2]["status"], "sent");
    assert_eq!(r[3]["status"], "offline");
    assert_eq!(r[4]["error"]["field"], "messages[4]");
    assert_eq!(&a.next_publish(T).await.unwrap().payload[..], b"1");
    assert_eq!(&b.next_publish(T).await.unwrap().payload[..], b"3");
}

#[tokio::test]
async fn errors_have_the_right_status_and_name_the_field() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 1024\n[http]\nmax_batch = 3");
    let api = Api::new(&gw);
    let raw = |body: &'static str, ct: &'static str| {
        api.http
            .post(format!("{}/v1/push", api.base))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = raw("{not json", "application/json").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = raw("{}", "text/plain").await.unwrap();
    assert_eq!(r.status().as_u16(), 415);
    // A byte that is not UTF-8, in a string or outside one, single or batched.
    for (path, body) in [
        (
            "/v1/push",
            &b"{\"topic\": \"a\", \"payload\": \"\xff\"}"[..],
        ),
        (
            "/v1/push",
            &b"{\"topic\": \"a\", \"payload\": \"x\"}\xff"[..],
        ),
        (
            "/v1/push/batch",
            &b"{\"messages\": [{\"topic\": \"\xc3\"}]}"[..],
        ),
    ] {
        let r = api
            .http
            .post(format!("{}{path}", api.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "invalid_json"
        );
    }

    for (body, field) in [
        (json!({"payload": "x"}), "topic"),
        (json!({"topic": "a/#", "payload": "x"}), "topic"),
        (json!({"topic": "a", "payload": "x", "qos": "1"}), "qos"),
        (
            json!({"topic": "a", "payload": "x", "ttl_secs": -1}),
            "ttl_secs",
        ),
        (
            json!({"topic": "a", "payload": "x", "extra": true}),
            "extra",
        ),
        (
            json!({"topic": "a", "payload": "%%", "encoding": "base64"}),
            "payload",
        ),
    ] {
        let (code, b) = api.push(body.clone()).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(b["error"]["field"], field, "{body} → {b}");
        assert!(b["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (code, b) = api
        .push(json!({"topic": "a", "payload": "x".repeat(2000)}))
        .await;
    assert_eq!((code, b["error"]["field"].as_str()), (413, Some("payload")));
    let msgs: Vec<Value> = (0..4)
        .map(|_| json!({"topic": "a", "payload": "x"}))
        .collect();
    let (code, b) = api
        .post("/v1/push/batch", json!({ "messages": msgs }))
        .await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (413, Some("batch_too_large"))
    );
    let (code, b) = api.get("/v1/clients/ghost").await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert!(
        gw.metric("gateway_push_messages_total{status=\"bad_request\"}")
            .await
            >= 6.0
    );
}

#[tokio::test]
async fn bearer_tokens_guard_v1_but_not_health_or_metrics() {
    let gw = TestServer::start("[http]\ntokens = [\"s3cret\", \"other\"]");
    let (code, b) = Api::new(&gw)
        .push(json!({"topic": "a", "payload": "x"}))
        .await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = Api::with_token(&gw, "wrong")
        .push(json!({"topic": "a", "payload": "x"}))
        .await;
    assert_eq!(code, 401);
    let (code, b) = Api::with_token(&gw, "other")
        .push(json!({"topic": "a", "payload": "x"}))
        .await;
    assert_eq!((code, b["matched"].as_u64()), (200, Some(0)));
    assert_eq!(common::http_get(gw.http, "/metrics").await.0, 200);
    assert_eq!(common::http_get(gw.http, "/healthz").await.0, 200);
    assert_eq!(Api::new(&gw).get("/v1/stats").await.0, 401);
}

#[tokio::test]
async fn a_full_mailbox_is_answered_503_with_retry_after() {
    let gw = TestServer::start(
        "[shards]\ncount = 1\nmailbox_capacity = 1\n[http]\nbusiness_threads = 2",
    );
    // Someone subscribes to the flood's topics: a topic push goes only to the shards
    // whose subscriptions may match it.
    let mut sink = device(&gw, "flood-sink", false).await;
    sink.subscribe("t/#", v4::QoS::AtMostOnce).await;
    let base = format!("http://{}", gw.http);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = None;
    while seen.is_none() && Instant::now() < deadline {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let url = format!("{base}/v1/push");
            tasks.spawn(async move {
                let c = reqwest::Client::new();
                let mut found = None;
                for i in 0..20 {
                    let r = c
                        .post(&url)
                        .json(&json!({"topic": format!("t/{i}"), "payload": "x"}))
                        .send()
                        .await
                        .unwrap();
                    if r.status().as_u16() == 503 {
                        let retry = r
                            .headers()
                            .get("retry-after")
                            .map(|v| v.to_str().unwrap().to_owned());
                        found = Some((retry, r.json::<Value>().await.unwrap()));
                        break;
                    }
                }
                found
            });
        }
        while let Some(r) = tasks.join_next().await {
            if let Some(f) = r.unwrap() {
                seen = Some(f);
            }
        }
    }
    let (retry, body) = seen.expect("no 503 under load with a one-slot mailbox");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        gw.metric("gateway_push_messages_total{status=\"overloaded\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn pushes_reach_devices_on_every_shard() {
    let gw = TestServer::start("[shards]\ncount = 4");
    let api = Api::new(&gw);
    // One device homed on each shard.
    let mut ids = vec![None; 4];
    let mut i = 0;
    while ids.iter().any(Option::is_none) {
        let id = format!("shard-dev-{i}");
        let home = gateway::mailbox::home_shard(&id, 4);
        if ids[home].is_none() {
            ids[home] = Some(id);
        }
        i += 1;
    }
    for (shard, id) in ids.into_iter().enumerate() {
        let id = id.unwrap();
        let mut dev = device(&gw, &id, false).await;
        let (_, b) = api
            .push(json!({"client_id": id, "topic": "s", "payload": shard.to_string()}))
            .await;
        assert_eq!(b["status"], "sent", "shard {shard}");
        assert_eq!(
            &dev.next_publish(T).await.expect("delivered").payload[..],
            shard.to_string().as_bytes()
        );
        let (_, info) = api.get(&format!("/v1/clients/{id}")).await;
        assert_eq!(info["shard"], shard);
    }
}

#[tokio::test]
async fn repeated_idempotency_key_is_delivered_once() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut dev = device(&gw, "dev-idem", false).await;
    let body = json!({"client_id": "dev-idem", "topic": "c", "payload": "once", "qos": 1, "idempotency_key": "k-1"});
    let (_, first) = api.push(body.clone()).await;
    let (_, second) = api.push(body).await;
    assert_eq!(first, second, "the repeat gets the first answer");
    assert_eq!(first["status"], "sent");
    assert_eq!(&dev.next_publish(T).await.unwrap().payload[..], b"once");
    assert!(
        dev.next_publish(Duration::from_millis(500)).await.is_none(),
        "delivered twice"
    );
}

#[tokio::test]
async fn clients_can_be_inspected_and_kicked() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut o = v5::options(gw.mqtt, "dev-info");
    o.set_clean_start(false);
    let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
    props.session_expiry_interval = Some(600);
    o.set_connect_properties(props);
    let mut dev = v5::connect(o).await;
    dev.subscribe("devices/dev-info/cmd", v5::QoS::AtLeastOnce)
        .await;
    let (code, info) = api.get("/v1/clients/dev-info").await;
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["online"], true);
    assert_eq!(info["protocol_version"], 5);
    assert_eq!(info["keep_alive"], 30);
    assert_eq!(info["subscriptions"][0]["filter"], "devices/dev-info/cmd");
    assert_eq!(info["subscriptions"][0]["qos"], 1);
    assert!(info["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(info["connected_at"].as_u64().unwrap() > 1_700_000_000);

    let (code, b) = api.delete("/v1/clients/dev-info").await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["disconnected"], true, "{b}");
    let got = dev.next_incoming(T).await;
    assert!(
        matches!(&got, Some(Err(e)) if e.contains("AdministrativeAction")),
        "{got:?}"
    );
    let (_, info) = api.get("/v1/clients/dev-info").await;
    assert_eq!(info["online"], false, "persistent session stays");
    let (code, b) = api.delete("/v1/clients/dev-info?clear_session=true").await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(
        (&b["disconnected"], &b["session_cleared"]),
        (&json!(false), &json!(true)),
        "an offline session is not disconnected again: {b}"
    );
    assert_eq!(api.get("/v1/clients/dev-info").await.0, 404);
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"admin\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn stats_and_openapi_are_served() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let _d = device(&gw, "dev-stats", false).await;
    let (code, s) = api.get("/v1/stats").await;
    assert_eq!(code, 200);
    assert_eq!(s["connections"], 1);
    assert_eq!(s["sessions"], 1);
    assert_eq!(s["shards"].as_array().unwrap().len(), 2);
    // Without a fleet, scope=fleet is this node alone; another scope is a 400 naming it.
    let (code, f) = api.get("/v1/stats?scope=fleet").await;
    assert_eq!(code, 200, "{f}");
    assert_eq!(f["connections"], 1);
    assert_eq!(f["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(f["nodes"][0]["sessions"], 1);
    let (code, e) = api.get("/v1/stats?scope=world").await;
    assert_eq!(code, 400);
    assert_eq!(e["error"]["field"], "scope");
    let (code, doc) = api.get("/v1/openapi.json").await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/v1/push"]["post"].is_object());
}

/// A `queued` answer waits for the store's commit; a store slower than
/// `answer_timeout_ms` (here: the writer gathers changes for 3 s before committing) gets
/// 504 `answer_timeout` instead of holding the request, and the message is still
/// delivered when the device comes back.
#[tokio::test]
async fn a_slow_store_answers_504_within_answer_timeout() {
    let gw =
        TestServer::start("[http]\nanswer_timeout_ms = 300\n[store]\ncommit_interval_ms = 3000\n");
    let api = Api::new(&gw);
    let dev = device(&gw, "dev-slow-store", true).await;
    dev.client.disconnect().await.unwrap();
    gw.wait_metric("gateway_connections", T, |v| v == 0.0).await;
    let (code, b) = api
        .push(json!({"client_id": "dev-slow-store", "topic": "cmd/s", "payload": "late", "qos": 1}))
        .await;
    assert_eq!(code, 504, "{b}");
    assert_eq!(b["error"]["code"], "answer_timeout", "{b}");
    let mut o = v4::options(gw.mqtt, "dev-slow-store");
    o.set_clean_session(false);
    let mut dev = v4::connect(o).await;
    let m = dev.next_publish(T).await.expect("the push is delivered");
    assert_eq!(&m.payload[..], b"late");
}
