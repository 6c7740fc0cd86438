//! The HTTP push API over real HTTP (reqwest) to real MQTT devices (rumqttc, raw clients):
//! every status, every error code, TTL, order, batches, wait_ack, overload, idempotency.

mod common;

use std::time::{Duration, Instant};

use common::{v4, v5, Raw, TestServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(gw: &TestServer) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{}", gw.http),
            token: None,
        }
    }

    fn with_token(gw: &TestServer, token: &str) -> Api {
        Api {
            token: Some(token.into()),
            ..Api::new(gw)
        }
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, body: Value) -> (u16, Value) {
        self.post("/v1/push", body).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::DELETE, path)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }
}

async fn device(gw: &TestServer, id: &str, persistent: bool) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(!persistent);
    v4::connect(o).await
}

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

// ---------------------------------------------------------------------------------------
// Idempotency keys (issue 16.3).

/// A raw MQTT 3.1.1 device that acknowledges only when told to.
async fn silent_device(gw: &TestServer, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4(id, 60, true)).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    raw
}

/// The packet id of the next PUBLISH the raw device receives.
async fn next_publish_pkid(raw: &mut Raw) -> u16 {
    match raw.recv_v4(T).await {
        Ok(mqttbytes::v4::Packet::Publish(p)) => p.pkid,
        other => panic!("expected a PUBLISH, got {other:?}"),
    }
}

async fn puback(raw: &mut Raw, pkid: u16) {
    let ack = common::encode(|b| mqttbytes::v4::PubAck::new(pkid).write(b));
    raw.send(&ack).await;
}

#[tokio::test]
async fn idempotency_keys_are_scoped_per_target() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut a = device(&gw, "dev-scope-a", false).await;
    let mut b = device(&gw, "dev-scope-b", false).await;
    let (_, first) = api
        .push(json!({"client_id": "dev-scope-a", "topic": "c", "payload": "x", "qos": 1, "idempotency_key": "k"}))
        .await;
    let (code, second) = api
        .push(json!({"client_id": "dev-scope-b", "topic": "c", "payload": "x", "qos": 1, "idempotency_key": "k"}))
        .await;
    assert_eq!(
        (code, second["status"].as_str()),
        (200, Some("sent")),
        "{second}"
    );
    assert_ne!(first["id"], second["id"], "devB got devA's answer");
    assert!(a.next_publish(T).await.is_some());
    assert!(b.next_publish(T).await.is_some(), "devB received nothing");

    // Topic pushes are scoped by topic.
    let mut sub = device(&gw, "dev-scope-sub", false).await;
    sub.subscribe("news/#", rumqttc::QoS::AtLeastOnce).await;
    for topic in ["news/a", "news/b"] {
        let (code, r) = api
            .push(json!({"topic": topic, "payload": "x", "idempotency_key": "k"}))
            .await;
        assert_eq!(
            (code, r["matched"].as_u64()),
            (200, Some(1)),
            "{topic}: {r}"
        );
        assert_eq!(
            sub.next_publish(T).await.map(|p| p.topic),
            Some(topic.into())
        );
    }
}

#[tokio::test]
async fn reusing_a_key_for_a_different_push_is_422() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let body = |payload: &str| json!({"client_id": "dev-reuse", "topic": "c", "payload": payload, "idempotency_key": "k-reuse"});
    let (code, _) = api.push(body("one")).await;
    assert_eq!(code, 200);
    let (code, b) = api.push(body("two")).await;
    assert_eq!(code, 422, "{b}");
    assert_eq!(b["error"]["code"], "idempotency_key_reused");
    assert_eq!(b["error"]["field"], "idempotency_key");
    // The same push again is still answered from the key.
    assert_eq!(api.push(body("one")).await.0, 200);
}

/// The backend gives up on a `wait_ack` request (closes its socket): the push still owns
/// its key, so the retry does not deliver a second copy and learns the outcome.
#[tokio::test]
async fn a_push_whose_caller_left_still_owns_its_key() {
    let gw = TestServer::start("");
    let mut raw = silent_device(&gw, "dev-left").await;
    let body = json!({"client_id": "dev-left", "topic": "c", "payload": "x", "qos": 1,
        "wait_ack": true, "timeout_ms": 5000, "idempotency_key": "k-left"});
    // The caller sends the request, sees it delivered, and closes its socket.
    let text = body.to_string();
    let mut caller = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let request = format!(
        "POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut caller, request.as_bytes())
        .await
        .unwrap();
    let pkid = next_publish_pkid(&mut raw).await;
    drop(caller);
    // Give the server time to see the close before the PUBACK (only the power of the
    // test to catch a regression depends on it, not its outcome with the fix).
    tokio::time::sleep(Duration::from_millis(200)).await;
    puback(&mut raw, pkid).await;
    let (code, b) = Api::new(&gw).push(body).await;
    assert_eq!((code, b["status"].as_str()), (200, Some("acked")), "{b}");
    assert!(
        raw.recv_v4(Duration::from_millis(500)).await.is_err(),
        "the retry delivered a second copy"
    );
}

/// 504 is not an outcome: a retry after it waits for the outcome, without sending again.
#[tokio::test]
async fn a_retry_after_an_ack_timeout_gets_the_outcome_once_known() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let mut raw = silent_device(&gw, "dev-late").await;
    let body = json!({"client_id": "dev-late", "topic": "c", "payload": "x", "qos": 1,
        "wait_ack": true, "timeout_ms": 300, "idempotency_key": "k-late"});
    let (code, b) = api.push(body.clone()).await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (504, Some("ack_timeout")),
        "{b}"
    );
    let pkid = next_publish_pkid(&mut raw).await;
    // Still unacknowledged: the retry times out too, and sends nothing.
    let (code, _) = api.push(body.clone()).await;
    assert_eq!(code, 504);
    puback(&mut raw, pkid).await;
    let deadline = Instant::now() + T;
    let answer = loop {
        let (code, b) = api.push(body.clone()).await;
        if code == 200 || Instant::now() > deadline {
            break (code, b);
        }
    };
    assert_eq!(
        (answer.0, answer.1["status"].as_str()),
        (200, Some("acked")),
        "{}",
        answer.1
    );
    assert!(
        raw.recv_v4(Duration::from_millis(500)).await.is_err(),
        "a retry delivered a second copy"
    );
}

/// A 503 sent nothing: it is not remembered, so the retry with the key is delivered.
#[tokio::test]
async fn a_key_answered_503_is_free_for_the_retry() {
    let gw = TestServer::start(
        "[shards]\ncount = 1\nmailbox_capacity = 1\n[http]\nbusiness_threads = 2",
    );
    let mut dev = device(&gw, "dev-503", false).await;
    let mut sink = device(&gw, "flood-sink", false).await;
    sink.subscribe("t/#", v4::QoS::AtMostOnce).await;
    let base = format!("http://{}", gw.http);
    // Fill the one-slot mailbox with concurrent topic pushes until a keyed push is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused = None;
    let mut n = 0;
    while refused.is_none() && Instant::now() < deadline {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..32 {
            let url = format!("{base}/v1/push");
            tasks.spawn(async move {
                let r = reqwest::Client::new()
                    .post(&url)
                    .json(&json!({"topic": format!("t/{i}"), "payload": "x"}))
                    .send()
                    .await;
                drop(r);
            });
        }
        n += 1;
        let key = format!("k-503-{n}");
        let body =
            json!({"client_id": "dev-503", "topic": "c", "payload": key, "idempotency_key": key});
        let (code, b) = Api::new(&gw).push(body.clone()).await;
        while tasks.join_next().await.is_some() {}
        if code == 503 {
            assert_eq!(b["error"]["code"], "overloaded");
            refused = Some(body);
        } else {
            let _ = dev.next_publish(T).await;
        }
    }
    let body = refused.expect("no 503 with a one-slot mailbox");
    let (code, b) = Api::new(&gw).push(body.clone()).await;
    assert_eq!((code, b["status"].as_str()), (200, Some("sent")), "{b}");
    let got = dev.next_publish(T).await.expect("the retry is delivered");
    assert_eq!(got.payload, body["payload"].as_str().unwrap().as_bytes());
}

/// An id `tag-N` whose home is `shard` of `shards`.
fn id_homed_on(tag: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|id| gateway::mailbox::home_shard(id, shards) == shard)
        .unwrap()
}

/// A topic push answered 503 was delivered nowhere, so the backend's retry cannot
/// duplicate it (issue 17.11): shard 1's one-slot mailbox is kept busy with client pushes
/// while topic pushes go to a subscriber on the idle shard 0.
#[tokio::test]
async fn a_topic_push_answered_503_was_delivered_nowhere() {
    let gw = TestServer::start(
        "[shards]\ncount = 2\nmailbox_capacity = 1\n[http]\nbusiness_threads = 2",
    );
    let mut sub = device(&gw, &id_homed_on("probe-sub", 0, 2), false).await;
    sub.subscribe("probe/#", v4::QoS::AtMostOnce).await;
    let busy = id_homed_on("busy", 1, 2);
    // A subscriber on the busy shard too, so the probes go to both shards (a topic push
    // goes only to the shards whose subscriptions may match it).
    let mut busy_sub = device(&gw, &id_homed_on("probe-sub-1", 1, 2), false).await;
    busy_sub.subscribe("probe/#", v4::QoS::AtMostOnce).await;
    let base = format!("http://{}", gw.http);
    let api = Api::new(&gw);
    let (mut refused, mut answered) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while refused.len() < 20 && Instant::now() < deadline {
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (url, busy) = (format!("{base}/v1/push"), busy.clone());
            flood.spawn(async move {
                let c = reqwest::Client::new();
                for _ in 0..8 {
                    let body = json!({"client_id": busy, "topic": "x", "payload": "x"});
                    let _ = c.post(&url).json(&body).send().await;
                }
            });
        }
        for _ in 0..8 {
            n += 1;
            let (code, b) = api
                .push(json!({"topic": format!("probe/{n}"), "payload": n.to_string()}))
                .await;
            match code {
                503 => refused.push(n.to_string()),
                200 => answered += 1,
                _ => panic!("unexpected answer {code}: {b}"),
            }
        }
        while flood.join_next().await.is_some() {}
    }
    assert!(!refused.is_empty(), "no topic push was refused");
    // The end marker goes through shard 0's mailbox after every probe it accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api
        .push(json!({"topic": "probe/end", "payload": "end"}))
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the end marker was never accepted"
        );
    }
    let mut got = Vec::new();
    loop {
        let p = sub.next_publish(T).await.expect("the end marker arrives");
        if &p.payload[..] == b"end" {
            break;
        }
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let duplicated: Vec<&String> = refused.iter().filter(|r| got.contains(r)).collect();
    assert!(
        duplicated.is_empty(),
        "{} of {} topic pushes answered 503 were delivered ({answered} answered 200): {duplicated:?}",
        duplicated.len(),
        refused.len()
    );
}

// ---------------------------------------------------------------------------------------
// The HTTP contract's corners (issue 17.13).

#[tokio::test]
async fn push_fields_refuse_null_nul_and_over_long_topics() {
    let gw = TestServer::start("[mqtt]\nmax_topic_len = 32\n");
    let api = Api::new(&gw);
    for (body, field) in [
        (
            json!({"topic": "t", "payload": "x", "ttl_secs": null}),
            "ttl_secs",
        ),
        (json!({"topic": "t", "payload": "x", "qos": null}), "qos"),
        (
            json!({"client_id": "a\u{0}b", "topic": "t", "payload": "x"}),
            "client_id",
        ),
        (json!({"topic": "t".repeat(33), "payload": "x"}), "topic"),
        (
            json!({"messages": [{"topic": "t".repeat(33), "payload": "x"}]}),
            "messages[0].topic",
        ),
    ] {
        let (code, b) = if body.get("messages").is_some() {
            let (_, b) = api.post("/v1/push/batch", body).await;
            (
                b["results"][0]["error"]["status"].as_u64().unwrap_or(0) as u16,
                b["results"][0].clone(),
            )
        } else {
            api.push(body).await
        };
        assert_eq!(
            (code, b["error"]["field"].as_str()),
            (400, Some(field)),
            "{b}"
        );
    }
    let (code, b) = api
        .push(json!({"topic": "t".repeat(32), "payload": "x"}))
        .await;
    assert_eq!(code, 200, "{b}");
}

#[tokio::test]
async fn client_routes_answer_bad_queries_in_json_and_take_the_id_as_a_query_parameter() {
    let gw = TestServer::start("[mqtt]\nmax_client_id_len = 65535\n");
    let api = Api::new(&gw);
    let (code, b) = api
        .get("/v1/clients/x?clear_session=true&clear_session=false")
        .await;
    assert_eq!(
        (code, b["error"]["field"].as_str()),
        (400, Some("clear_session")),
        "{b}"
    );
    let (code, b) = api
        .delete("/v1/clients/x?clear_session=true&clear_session=true")
        .await;
    assert_eq!(code, 400, "{b}");
    assert_eq!(b["error"]["field"], "clear_session");
    let (code, b) = api.get("/v1/clients?client_id=a&client_id=b").await;
    assert_eq!(
        (code, b["error"]["field"].as_str()),
        (400, Some("client_id")),
        "{b}"
    );
    // Without a client id it is the paged list of clients (issue 22).
    assert_eq!(api.get("/v1/clients").await.0, 200);

    // The id as a query parameter (a device with a `/` in its id, say).
    let (code, b) = api.get("/v1/clients?client_id=a%2Fb").await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{b}"
    );

    // A 65,535-byte id does not fit an HTTP/1 URI (414): it goes in a JSON body.
    let long = "d".repeat(65_535);
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4(&long, 60, true)).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let r = api
        .req(reqwest::Method::GET, "/v1/clients")
        .json(&json!({"client_id": long}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["online"], true);
    let r = api
        .req(reqwest::Method::DELETE, "/v1/clients")
        .json(&json!({"client_id": long, "clear_session": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (&b["disconnected"], &b["session_cleared"]),
        (&json!(true), &json!(true))
    );
    assert!(raw.closed_within(T).await, "kicked");
    assert_eq!(api.get("/v1/clients?client_id=nobody").await.0, 404);
}

/// `gateway_push_requests_total` counts HTTP requests, `gateway_push_messages_total`
/// the messages in them (issue 16.12: a batch of 3 was counted as 3 requests).
#[tokio::test]
async fn push_metrics_count_requests_and_messages_apart() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let item = json!({"topic": "m/t", "payload": "x"});
    let (code, _) = api
        .post("/v1/push/batch", json!({"messages": [item, item, item]}))
        .await;
    assert_eq!(code, 200);
    let (code, _) = api.push(json!({"topic": "m/t"})).await;
    assert_eq!(code, 400);
    let metric = |s: &'static str| gw.metric(s);
    assert_eq!(
        metric("gateway_push_requests_total{endpoint=\"batch\",code=\"200\"}").await,
        1.0
    );
    assert_eq!(
        metric("gateway_push_requests_total{endpoint=\"push\",code=\"400\"}").await,
        1.0
    );
    assert_eq!(
        metric("gateway_push_messages_total{status=\"matched\"}").await,
        3.0
    );
    assert_eq!(
        metric("gateway_push_messages_total{status=\"bad_request\"}").await,
        1.0
    );
}
