//! The events pipeline driven directly, without the shards (tests/events.rs has the whole
//! gateway with MQTT clients): events go through
//! `EventSender::try_emit` to a real webhook (an axum server on a free loopback port,
//! plain and TLS with a test CA). The NATS sink is in tests/events_nats.rs.
//!
//! Outages are real (a closed port, a stopped server), and waits poll for a condition
//! with a generous deadline; backoffs are configured short so the suite stays quick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use gateway::codec::PublishProps;
use gateway::config::Config;
use gateway::events::{Event, EventKind, SeqGen};
use gateway::message::{Message, Origin};
use gateway::metrics::DisconnectReason;
use serde_json::Value;

mod events_support;
#[path = "common/https.rs"]
mod https;
use events_support::receiver::Receiver;
use events_support::{connected, free_listener, numbered, start, wait_until};
use https::{serve_tls, test_ca};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_every_kind_signed_batched_and_in_order() {
    let listener = free_listener().await;
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new("s3cret");
    receiver.serve(listener);
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nwebhook_secret = \"s3cret\"\nbatch_max = 3\nlinger_ms = 100\n"
    ));
    let tx = events.sender.clone();
    assert!(tx.enabled());
    let mut seq = SeqGen::default();
    let props = PublishProps {
        content_type: Some("application/json".into()),
        response_topic: Some("devices/d1/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    let mut text = Message::new(
        "devices/d1/telemetry".into(),
        bytes::Bytes::from_static(b"{\"t\":21.5}"),
        1,
        false,
        Origin::Gateway,
    );
    text.props = Some(Box::new(props));
    let binary = Message::new(
        "devices/d1/telemetry".into(),
        bytes::Bytes::from_static(b"\xff\x00"),
        0,
        true,
        Origin::Gateway,
    );
    let sent = vec![
        connected(&mut seq, "d1", false),
        // A takeover: the old connection's end before the new connection.
        Event::now(
            seq.next_seq(),
            "d1".into(),
            EventKind::Disconnected {
                reason: DisconnectReason::Takeover,
            },
        ),
        connected(&mut seq, "d1", true),
        Event::now(
            seq.next_seq(),
            "d1".into(),
            EventKind::Subscribed {
                filters: vec![("a/+".into(), 1), ("b/#".into(), 0)],
            },
        ),
        Event::now(
            seq.next_seq(),
            "d1".into(),
            EventKind::Unsubscribed {
                filters: vec!["a/+".into()],
            },
        ),
        Event::now(
            seq.next_seq(),
            "d1".into(),
            EventKind::Uplink(Arc::new(text)),
        ),
        Event::now(
            seq.next_seq(),
            "d1".into(),
            EventKind::Uplink(Arc::new(binary)),
        ),
        Event::now(seq.next_seq(), "d1".into(), EventKind::SessionExpired),
    ];
    for e in sent {
        tx.try_emit(e);
    }
    wait_until("8 events", || receiver.events().len() == 8).await;
    let posts = receiver.posts();
    assert!(posts.iter().all(|p| p.signature_ok), "every body is signed");
    assert!(
        posts.iter().all(|p| {
            let n = serde_json::from_slice::<Vec<Value>>(&p.body).unwrap().len();
            (1..=3).contains(&n)
        }),
        "batches hold 1..=batch_max events"
    );
    assert!(posts.len() >= 3, "8 events in batches of at most 3");

    let got = receiver.events();
    let kinds: Vec<&str> = got.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "connected",
            "disconnected",
            "connected",
            "subscribed",
            "unsubscribed",
            "uplink",
            "uplink",
            "session_expired"
        ]
    );
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq increases: {seqs:?}"
    );
    for e in &got {
        assert_eq!(e["client_id"], "d1");
        assert_eq!(e["node"], "node-a");
        assert!(e["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
    let c = &got[0];
    assert_eq!(c["username"], "alice");
    assert_eq!(c["peer"], "10.1.2.3:40000");
    assert_eq!(c["protocol_version"], 5);
    assert_eq!(c["keep_alive"], 60);
    assert_eq!(c["clean_start"], true);
    assert_eq!(c["session_present"], false);
    assert_eq!(got[1]["reason"], "takeover");
    assert_eq!(got[2]["session_present"], true);
    assert_eq!(
        got[3]["filters"],
        serde_json::json!([{"filter": "a/+", "qos": 1}, {"filter": "b/#", "qos": 0}])
    );
    assert_eq!(got[4]["filters"], serde_json::json!(["a/+"]));
    let up = &got[5];
    assert_eq!(up["topic"], "devices/d1/telemetry");
    assert_eq!(up["payload"], "{\"t\":21.5}");
    assert_eq!(up["payload_encoding"], "utf8");
    assert_eq!(up["qos"], 1);
    assert_eq!(up["retain"], false);
    assert_eq!(up["content_type"], "application/json");
    assert_eq!(up["response_topic"], "devices/d1/reply");
    assert_eq!(up["correlation_data"], "AAE=");
    assert_eq!(up["user_properties"], serde_json::json!([["k", "v"]]));
    assert_eq!(got[6]["payload"], "/wA=");
    assert_eq!(got[6]["payload_encoding"], "base64");
    assert_eq!(got[6]["retain"], true);

    // Linger: a lone event goes out although the batch is not full.
    tx.try_emit(numbered(&mut seq, 9));
    wait_until("the lone event", || receiver.events().len() == 9).await;
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&receiver.posts().last().unwrap().body)
            .unwrap()
            .len(),
        1
    );

    // The sink counts a batch once the receiver has answered it: after the receiver
    // holds it.
    let m = events.sink("webhook").unwrap();
    wait_until("9 events counted as sent", || m.sent.get() >= 9).await;
    assert_eq!(m.sent.get(), 9);
    let mut text = String::new();
    events.metrics.render(&mut text);
    assert!(
        text.contains("gateway_events_sent_total{sink=\"webhook\"} 9"),
        "{text}"
    );
    assert!(text.contains("gateway_events_queue_depth{sink=\"webhook\"} 0"));
    assert!(text
        .contains("gateway_events_dropped_total{sink=\"webhook\",reason=\"queue_full_oldest\"} 0"));
    assert!(text.contains("gateway_events_delivery_seconds_count{sink=\"webhook\"} 9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_visible_to_the_receiver_and_counted() {
    let listener = free_listener().await;
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new("the-real-secret");
    receiver.serve(listener);
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nwebhook_secret = \"a-wrong-secret\"\nlinger_ms = 0\n"
    ));
    let mut seq = SeqGen::default();
    events.sender.try_emit(numbered(&mut seq, 1));
    let m = events.sink("webhook").unwrap().clone();
    wait_until("the rejected batch", || m.dropped_count("rejected") == 1).await;
    let posts = receiver.posts();
    assert_eq!(posts.len(), 1, "a 401 is not retried");
    assert!(!posts[0].signature_ok, "the receiver sees the mismatch");
    assert_eq!(m.sent.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_then_back_gets_every_queued_event() {
    // A port that refuses connections until the receiver binds it again.
    let addr = free_listener().await.local_addr().unwrap();
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nwebhook_secret = \"k\"\nbatch_max = 10\nlinger_ms = 0\nretry_max_backoff_ms = 200\nwebhook_timeout_ms = 1000\n"
    ));
    let m = events.sink("webhook").unwrap().clone();
    let mut seq = SeqGen::default();
    for i in 0..25 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    // Down for a while: many failed attempts (100 ms, then 200 ms apart).
    wait_until("a dozen retries", || m.retried.get() >= 12 * 10).await;
    for i in 25..50 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    let receiver = Receiver::new("k");
    receiver.serve(tokio::net::TcpListener::bind(addr).await.unwrap());
    wait_until("all 50 events", || receiver.events().len() >= 50).await;
    let ids: Vec<String> = receiver
        .events()
        .iter()
        .map(|e| e["client_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..50).map(|i| format!("dev-{i}")).collect();
    assert_eq!(ids, want, "every event once, in order");
    // Counted once the receiver has answered the last batch.
    wait_until("50 events counted as sent", || m.sent.get() >= 50).await;
    assert_eq!(m.sent.get(), 50);
    for reason in gateway::events::metrics::DROP_REASONS {
        assert_eq!(m.dropped_count(reason), 0, "{reason}");
    }
}

/// Fills a 5-slot queue while the webhook is down and one event is in flight, then
/// brings it up: returns the client ids delivered and the drops counted for `policy`.
async fn overflow(policy: &str) -> (Vec<String>, u64) {
    let addr = free_listener().await.local_addr().unwrap();
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nbatch_max = 1\nlinger_ms = 0\nqueue_capacity = 5\ndrop_policy = \"{policy}\"\nretry_max_backoff_ms = 100\n"
    ));
    let m = events.sink("webhook").unwrap().clone();
    let mut seq = SeqGen::default();
    events.sender.try_emit(numbered(&mut seq, 0));
    wait_until("event 0 in flight", || m.retried.get() >= 1).await;
    for i in 1..=10 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    let reason = format!("queue_full_{}", policy.trim_start_matches("drop_"));
    assert_eq!(m.dropped_count(&reason), 5);
    let receiver = Receiver::new("");
    receiver.serve(tokio::net::TcpListener::bind(addr).await.unwrap());
    wait_until("the kept events", || receiver.events().len() >= 6).await;
    let ids = receiver
        .events()
        .iter()
        .map(|e| e["client_id"].as_str().unwrap().to_string())
        .collect();
    (ids, m.dropped_count(&reason))
}

fn ids(range: impl IntoIterator<Item = usize>) -> Vec<String> {
    range.into_iter().map(|i| format!("dev-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_the_oldest_and_counts() {
    let (got, dropped) = overflow("drop_oldest").await;
    assert_eq!(got, ids([0, 6, 7, 8, 9, 10]));
    assert_eq!(dropped, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_the_newest_and_counts() {
    let (got, dropped) = overflow("drop_newest").await;
    assert_eq!(got, ids(0..=5));
    assert_eq!(dropped, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_trusts_the_configured_ca_only() {
    let ca = test_ca();
    let dir = std::env::temp_dir().join(format!("events-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let receiver = Receiver::new("k");
    let (addr, handshake_failed) = serve_tls(free_listener().await, receiver.router(), &ca);
    let url = format!("https://{addr}/hook");

    // With the test CA: delivered over TLS.
    let events = start(&format!(
        "webhook_url = \"{url}\"\nwebhook_secret = \"k\"\nwebhook_ca_file = \"{}\"\nlinger_ms = 0\n",
        ca_file.display()
    ));
    let mut seq = SeqGen::default();
    events.sender.try_emit(numbered(&mut seq, 1));
    wait_until("the event over https", || receiver.events().len() == 1).await;
    assert!(receiver.posts()[0].signature_ok);

    // With the system roots the test CA is unknown: the handshake fails and is retried.
    let untrusting = start(&format!(
        "webhook_url = \"{url}\"\nlinger_ms = 0\nretry_max_backoff_ms = 100\n"
    ));
    untrusting.sender.try_emit(numbered(&mut seq, 2));
    let m = untrusting.sink("webhook").unwrap().clone();
    wait_until("a failed TLS attempt", || m.retried.get() >= 1).await;
    wait_until("the server's failed handshake", || {
        handshake_failed.load(Ordering::Relaxed)
    })
    .await;
    assert_eq!(receiver.events().len(), 1);
    assert_eq!(m.sent.get(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A whole gateway with a webhook sink: `/metrics` has the events families, and events
/// still queued at shutdown (waiting out a long linger) are delivered by the last flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_exports_event_metrics_and_flushes_at_shutdown() {
    let listener = free_listener().await;
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new("k");
    receiver.serve(listener);
    let config = Config::from_toml_str(&format!(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n[shards]\ncount = 1\n[store]\nenabled = false\n[log]\nlevel = \"warn\"\n[events]\nwebhook_url = \"http://{addr}/hook\"\nwebhook_secret = \"k\"\nlinger_ms = 60000\n"
    ))
    .unwrap();
    let server = tokio::task::spawn_blocking(move || {
        gateway::server::Server::start(config, None).expect("gateway starts")
    })
    .await
    .unwrap();
    let sender = server.event_sender();
    assert!(sender.enabled());
    let metrics = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gateway_events_sent_total{sink=\"webhook\"} 0"),
        "{metrics}"
    );
    let mut seq = SeqGen::default();
    for i in 0..3 {
        sender.try_emit(numbered(&mut seq, i));
    }
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    assert_eq!(receiver.events().len(), 3, "flushed at shutdown");
    assert!(receiver.posts().iter().all(|p| p.signature_ok));
}

/// At shutdown a dead webhook gets one last attempt per batch; what it did not take is
/// counted as dropped (`shutdown`), and the sink stops without waiting out its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_left_at_shutdown_are_counted() {
    let addr = free_listener().await.local_addr().unwrap();
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nbatch_max = 2\nlinger_ms = 0\nretry_max_backoff_ms = 60000\n"
    ));
    let m = events.sink("webhook").unwrap().clone();
    let mut seq = SeqGen::default();
    for i in 0..5 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    wait_until("a failed attempt", || m.retried.get() >= 2).await;
    tokio::task::spawn_blocking(move || events.close(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(m.dropped_count("shutdown"), 5);
    assert_eq!(m.sent.get(), 0);
}

/// A webhook that does not answer within `webhook_timeout_ms` is retried; the batch is
/// delivered once it answers in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_times_out_and_is_retried() {
    let hung = Arc::new(AtomicBool::new(true));
    let received = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let app = {
        let (hung, received) = (hung.clone(), received.clone());
        Router::new().route(
            "/hook",
            post(move |body: Bytes| async move {
                if hung.swap(false, Ordering::SeqCst) {
                    // Far longer than the timeout: only the first request hangs.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                received.lock().unwrap().push(body);
                StatusCode::NO_CONTENT
            }),
        )
    };
    let listener = free_listener().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let events = start(&format!(
        "webhook_url = \"http://{addr}/hook\"\nwebhook_timeout_ms = 300\nlinger_ms = 0\nretry_max_backoff_ms = 100\n"
    ));
    let m = events.sink("webhook").unwrap().clone();
    let mut seq = SeqGen::default();
    events.sender.try_emit(numbered(&mut seq, 7));
    wait_until("delivery after the timeout", || m.sent.get() == 1).await;
    assert!(m.retried.get() >= 1);
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "the hung request never completed");
    let v: Vec<Value> = serde_json::from_slice(&got[0]).unwrap();
    assert_eq!(v[0]["client_id"], "dev-7");
}
