//! Events from the whole gateway: real MQTT clients (rumqttc v4 and v5) connect,
//! subscribe, publish and go away, and a real HTTP server (axum, on a free loopback port)
//! is the webhook. Every event kind arrives with its fields; a takeover's
//! `disconnected(takeover)` comes before the new `connected`; only PUBLISHes matching
//! `uplink_filters` are forwarded; and a webhook that is down for a while gets every
//! event once it is back.
//!
//! Waits poll for a condition with a generous deadline (never a fixed sleep).

mod common;
mod events_support;

use std::time::Duration;

use common::{tempdir, v4, v5, TestServer};
use events_support::receiver::Receiver;
use events_support::{free_listener, wait_until};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, PublishProperties};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A gateway whose `[events]` section is `events` (plus the webhook at `hook`).
fn gateway(hook: std::net::SocketAddr, events: &str, extra: &str) -> TestServer {
    TestServer::start(&format!(
        "[events]\nwebhook_url = \"http://{hook}/hook\"\nwebhook_secret = \"k\"\nlinger_ms = 20\nretry_max_backoff_ms = 200\n{events}\n{extra}"
    ))
}

/// A webhook receiver serving on a free loopback port, and that port.
async fn webhook() -> (Receiver, std::net::SocketAddr) {
    let listener = free_listener().await;
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new("k");
    receiver.serve(listener);
    (receiver, addr)
}

/// The events about `client_id` received so far, in order of arrival.
fn of(receiver: &Receiver, client_id: &str) -> Vec<Value> {
    let events = receiver.events();
    events
        .into_iter()
        .filter(|e| e["client_id"] == client_id)
        .collect()
}

/// The `kind`s of `events`, as a compact list for assertions.
fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["kind"].as_str().unwrap() {
            "disconnected" => format!("disconnected({})", e["reason"].as_str().unwrap()),
            k => k.to_string(),
        })
        .collect()
}

/// Asserts each event's `seq` is above the one before it.
fn assert_ordered(events: &[Value]) {
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq not increasing: {seqs:?}"
    );
}

/// A password file with user `alice` (password `pw`), made by `gateway passwd`.
fn password_file(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("users");
    common::passwd(&file, "alice", "pw");
    file
}

/// An MQTT 5 client with a username connects with a session expiry of one second,
/// subscribes, unsubscribes, publishes on a forwarded and a not forwarded topic, and
/// disconnects; an MQTT 3.1.1 client connects. Every event arrives with its fields, a
/// client's in `seq` order, and the session expires after its second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_from_real_clients_with_its_fields() {
    let (receiver, hook) = webhook().await;
    let dir = tempdir::Dir::new("events-users");
    let users = password_file(&dir.0);
    let s = gateway(
        hook,
        "include_subscriptions = true\nuplink_filters = [\"devices/+/telemetry\"]",
        &format!(
            "[auth]\nproviders = [\"anonymous\", \"password_file\"]\n[auth.password_file]\npath = \"{}\"",
            users.display()
        ),
    );

    let mut o = v5::options(s.mqtt, "dev-5");
    o.set_credentials("alice", "pw");
    o.set_clean_start(false);
    o.set_keep_alive(Duration::from_secs(20));
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(1);
    o.set_connect_properties(props);
    let mut c5 = v5::connect(o).await;
    c5.subscribe("cmd/#", v5::QoS::AtLeastOnce).await;
    c5.client.unsubscribe("cmd/#").await.unwrap();
    assert!(
        c5.wait_for(WAIT, |p| matches!(p, v5::Packet::UnsubAck(_)))
            .await,
        "no UNSUBACK"
    );
    let publish_props = PublishProperties {
        content_type: Some("application/json".into()),
        response_topic: Some("devices/dev-5/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("unit".into(), "C".into())],
        ..Default::default()
    };
    let client = &c5.client;
    client
        .publish("other/topic", v5::QoS::AtLeastOnce, false, "not forwarded")
        .await
        .unwrap();
    client
        .publish_with_properties(
            "devices/dev-5/telemetry",
            v5::QoS::AtLeastOnce,
            false,
            "{\"t\":21.5}",
            publish_props,
        )
        .await
        .unwrap();
    client
        .publish(
            "devices/dev-5/telemetry",
            v5::QoS::AtMostOnce,
            true,
            vec![0xffu8, 0],
        )
        .await
        .unwrap();
    let acked = c5
        .wait_for(WAIT, |p| matches!(p, v5::Packet::PubAck(_)))
        .await
        && c5
            .wait_for(WAIT, |p| matches!(p, v5::Packet::PubAck(_)))
            .await;
    assert!(acked, "both QoS 1 PUBLISHes acknowledged");
    c5.client.disconnect().await.unwrap();

    let _c4 = v4::connect(v4::options(s.mqtt, "dev-4")).await;

    let want = [
        "connected",
        "subscribed",
        "unsubscribed",
        "uplink",
        "uplink",
        "disconnected(client)",
        "session_expired",
    ];
    wait_until("dev-5's seven events", || of(&receiver, "dev-5").len() >= 7).await;
    wait_until("dev-4's connected", || !of(&receiver, "dev-4").is_empty()).await;
    let got = of(&receiver, "dev-5");
    assert_eq!(kinds(&got), want);
    assert_ordered(&got);
    assert!(receiver.posts().iter().all(|p| p.signature_ok), "signed");

    let c = &got[0];
    assert_eq!(c["username"], "alice");
    assert_eq!(c["protocol_version"], 5);
    assert_eq!(c["keep_alive"], 20);
    assert_eq!(c["clean_start"], false);
    assert_eq!(c["session_present"], false);
    let peer: std::net::SocketAddr = c["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback(), "{peer}");
    assert!(c["node"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(c["time_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        got[1]["filters"],
        serde_json::json!([{"filter": "cmd/#", "qos": 1}])
    );
    assert_eq!(got[2]["filters"], serde_json::json!(["cmd/#"]));

    let text = &got[3];
    assert_eq!(text["topic"], "devices/dev-5/telemetry");
    assert_eq!(text["payload"], "{\"t\":21.5}");
    assert_eq!(text["payload_encoding"], "utf8");
    assert_eq!(
        (text["qos"].as_u64(), text["retain"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(text["content_type"], "application/json");
    assert_eq!(text["response_topic"], "devices/dev-5/reply");
    assert_eq!(text["correlation_data"], "AQI=");
    assert_eq!(text["user_properties"], serde_json::json!([["unit", "C"]]));
    let binary = &got[4];
    assert_eq!(binary["payload"], "/wA=");
    assert_eq!(binary["payload_encoding"], "base64");
    assert_eq!(
        (binary["qos"].as_u64(), binary["retain"].as_bool()),
        (Some(0), Some(true))
    );
    assert!(
        receiver
            .events()
            .iter()
            .all(|e| e["topic"] != "other/topic"),
        "a topic no uplink filter matches is not forwarded"
    );

    let c4 = &of(&receiver, "dev-4")[0];
    assert_eq!(c4["kind"], "connected");
    assert_eq!(c4["protocol_version"], 4);
    assert_eq!(c4["username"], Value::Null);
    assert_eq!(c4["clean_start"], true);
}

/// Without `include_subscriptions` and `uplink_filters` (the defaults) only the
/// lifecycle events are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_uplink_are_off_by_default() {
    let (receiver, hook) = webhook().await;
    let s = gateway(hook, "", "");
    let mut c = v4::connect(v4::options(s.mqtt, "quiet")).await;
    c.subscribe("devices/quiet/#", v4::QoS::AtLeastOnce).await;
    c.client
        .publish("devices/quiet/telemetry", v4::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    c.client.disconnect().await.unwrap();
    wait_until("disconnected", || of(&receiver, "quiet").len() >= 2).await;
    // The disconnect follows the PUBLISH and SUBSCRIBE on the same connection: anything
    // they produced would have been queued before it.
    assert_eq!(
        kinds(&of(&receiver, "quiet")),
        ["connected", "disconnected(client)"]
    );
}

/// A second connection with the same client id takes the session over: the receiver
/// gets the old connection's `disconnected(takeover)` before the new `connected`, in
/// arrival order and in `seq` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_disconnects_the_old_before_the_new_connects() {
    let (receiver, hook) = webhook().await;
    let s = gateway(hook, "", "");
    let mut o = v4::options(s.mqtt, "twin");
    o.set_clean_session(false);
    let _old = v4::connect(o.clone()).await;
    let _new = v4::connect(o).await;
    wait_until("three events", || of(&receiver, "twin").len() >= 3).await;
    let got = of(&receiver, "twin");
    assert_eq!(
        kinds(&got),
        ["connected", "disconnected(takeover)", "connected"]
    );
    assert_ordered(&got);
    assert_eq!(got[2]["session_present"], true);
}

/// The webhook is down (its port refuses connections) while devices come and go, long
/// enough for many failed attempts; once it is back every event arrives, each client's
/// in order, and nothing is counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_for_a_while_then_back_gets_every_event() {
    let hook = free_listener().await.local_addr().unwrap();
    let s = gateway(hook, "batch_max = 7", "");
    let clients = 20;
    for i in 0..clients {
        let mut c = v4::connect(v4::options(s.mqtt, &format!("churn-{i}"))).await;
        c.client.disconnect().await.unwrap();
        c.wait_closed(WAIT).await;
    }
    let retried = "gateway_events_retried_total{sink=\"webhook\"}";
    let tries = s.wait_metric(retried, WAIT * 2, |v| v >= 10.0).await;
    assert!(tries >= 10.0, "the webhook was retried ({tries})");
    let receiver = Receiver::new("k");
    receiver.serve(tokio::net::TcpListener::bind(hook).await.unwrap());
    wait_until("every event", || receiver.events().len() >= 2 * clients).await;
    for i in 0..clients {
        let got = of(&receiver, &format!("churn-{i}"));
        assert_eq!(
            kinds(&got),
            ["connected", "disconnected(client)"],
            "churn-{i}"
        );
        assert_ordered(&got);
    }
    // Counted once the receiver has answered the last batch: after it holds the events.
    let sent = "gateway_events_sent_total{sink=\"webhook\"}";
    let want = (2 * clients) as f64;
    assert_eq!(s.wait_metric(sent, WAIT, |v| v >= want).await, want);
    let metrics = s.metrics().await;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("gateway_events_dropped_total"))
    {
        assert!(line.ends_with(" 0"), "nothing dropped: {line}");
    }
}

/// A kick through the API ends the connection with `disconnected(admin)`; a clean start
/// then replaces the offline session without a `session_expired` (only an expiry that
/// passes yields one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_is_admin_and_a_clean_start_is_no_expiry() {
    let (receiver, hook) = webhook().await;
    let s = gateway(hook, "", "");
    let mut o = v4::options(s.mqtt, "kicked");
    o.set_clean_session(false);
    let mut c = v4::connect(o).await;
    let url = format!("http://{}/v1/clients/kicked", s.http);
    let answer = reqwest::Client::new().delete(url).send().await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    c.wait_closed(WAIT).await;
    let _clean = v4::connect(v4::options(s.mqtt, "kicked")).await;
    wait_until("three events", || of(&receiver, "kicked").len() >= 3).await;
    let got = of(&receiver, "kicked");
    assert_eq!(
        kinds(&got),
        ["connected", "disconnected(admin)", "connected"]
    );
    assert_eq!(got[2]["clean_start"], true);
    assert_eq!(got[2]["session_present"], false);
    assert_ordered(&got);
}
