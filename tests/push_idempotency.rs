//! Idempotency keys on the push API (issue 16.3): scoped per target, a reused key for
//! another push refused, a key kept by a push whose caller left or whose answer timed
//! out, a 503 leaving the key free, and a topic push answered 503 delivered nowhere.

mod common;

use std::time::{Duration, Instant};

use common::api::{device, Api};
use common::{v4, Raw, TestServer};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

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
