//! The fleet's one record per persistent session (`<id>.rec`, `src/cluster/sessions.rs`)
//! against a real `nats-server -js` whose `max_payload` is small: a session whose record
//! NATS refuses is logged and left out of the fleet, and the other sessions' changes go
//! on being written.

mod common;

use std::time::Duration;

use common::fleet::{disconnect, persistent as connect, session_node, DEADLINE};
use common::nats::{free_port, NatsServer};
use common::sessions::wait_registry;
use common::{post_json, v4};
use serde_json::json;

/// A device subscribed to more and longer filters than NATS's `max_payload` can carry
/// in one record: its record is refused by NATS (logged, skipped) and does not hold the
/// mirror, so a push to another persistent session is still answered `queued` (which
/// waits for the fleet to hold it) and that session's record is in the bucket. Before,
/// the refused record failed its commit group again and again in the re-sync, and
/// every later change waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_natss_max_payload_does_not_hold_the_other_sessions() {
    let dir = common::tempdir::Dir::new("nats-small-payload");
    let conf = dir.0.join("nats.conf");
    std::fs::write(&conf, "max_payload: 8192\n").expect("nats config");
    let nats = NatsServer::start_with(
        "fs-payload",
        free_port(),
        vec!["-c".into(), conf.display().to_string()],
    );
    drop(nats.client().await);
    let gw = session_node(&nats, "node-a");
    let js = async_nats::jetstream::new(nats.client().await);
    let registry = js
        .get_key_value("gateway_registry")
        .await
        .expect("registry");
    let sessions = js.get_key_value("gateway_sessions").await.expect("bucket");

    // 20 filters of ~600 bytes: a record of ~12 KB, above the 8 KB max_payload.
    let (mut big, _) = connect(&gw, "big").await;
    for i in 0..20 {
        let filter = format!("big/{i}/{}", "x".repeat(600));
        big.subscribe(&filter, v4::QoS::AtLeastOnce).await;
    }
    disconnect(big).await;
    wait_registry(&registry, "big", "node-a").await;

    let (mut small, _) = connect(&gw, "small").await;
    small.subscribe("t/small", v4::QoS::AtLeastOnce).await;
    disconnect(small).await;
    let (code, v) = tokio::time::timeout(
        DEADLINE,
        post_json(
            gw.http,
            "/v1/push",
            &json!({"client_id": "small", "topic": "t/small", "payload": "after", "qos": 1}),
        ),
    )
    .await
    .expect("the push answered in time");
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    let end = tokio::time::Instant::now() + DEADLINE;
    while sessions.get("small.rec").await.expect("get").is_none() {
        assert!(
            tokio::time::Instant::now() < end,
            "small's record never reached the fleet"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // big's records went in while they fitted; the larger ones were refused and the
    // record emptied instead: no older record of it stays in the fleet.
    let big = sessions.get("big.rec").await.expect("get");
    assert_eq!(big.as_deref(), Some(&b""[..]), "big's record is not empty");
    let refused = r#"gateway_fleet_session_changes_total{outcome="too_large"}"#;
    let n = common::wait_metric(gw.http, refused, DEADLINE, |v| v >= 1.0).await;
    assert!(n >= 1.0);

    // A message queued for big goes to the stream (it fits), without a record beside
    // it. big then resumes on node B: the fleet keeps no session for it, so it starts
    // afresh there, and the message is deleted rather than left for a later session.
    let (code, v) = post_json(
        gw.http,
        "/v1/push",
        &json!({"client_id": "big", "topic": "big/0/x", "payload": "stale", "qos": 1}),
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    let msgs = js
        .get_stream("gateway_session_messages")
        .await
        .expect("stream");
    let subject = "gateway.fleet.smsg.big";
    assert!(msgs.direct_get_last_for_subject(subject).await.is_ok());
    let b = session_node(&nats, "node-b");
    let (mut big, present) = connect(&b, "big").await;
    assert!(!present, "big resumed a session the fleet does not keep");
    assert!(
        big.next_publish(Duration::from_millis(300)).await.is_none(),
        "a message of the session NATS could not keep came"
    );
    let left = msgs.direct_get_last_for_subject(subject).await;
    assert!(left.is_err(), "big's old message stays in the stream");
}

/// The measurement of a restart's rewrite of a node's sessions to the fleet: N offline
/// persistent sessions (`FLEET_RESTART_N`, default 100) with 2 queued QoS 1 messages
/// each on node A, which is killed with SIGKILL and started again. At start it ends and
/// writes again every session it restored (`SessionStore::start`), before anything else
/// its mirror does; a push answered `queued` waits for that. Prints how long after the
/// start a push through A was answered `queued` (no timing assert). Then A is killed
/// again and the first and last devices resume on node B from what the rewrite left in
/// JetStream, each with its three messages in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarts_rewrite_of_its_sessions_is_measured() {
    use common::sessions::{expect_in_order, node_with_store, offline_devices, push_queued};
    let n: usize = std::env::var("FLEET_RESTART_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let nats = NatsServer::start("fs-rewrite");
    drop(nats.client().await);
    let store = common::tempdir::Dir::new("fs-rewrite-a");
    let mut a = node_with_store(&nats, "node-a", &store);
    let js = async_nats::jetstream::new(nats.client().await);
    let registry = js
        .get_key_value("gateway_registry")
        .await
        .expect("registry");
    offline_devices(&a, &registry, "rw", n, "node-a").await;
    push_queued(&a, "rw", n, 2).await;
    common::fleet::kill_9(&mut a);

    let started = std::time::Instant::now();
    let a = node_with_store(&nats, "node-a", &store);
    let ready = started.elapsed();
    let (code, v) = post_json(
        a.http,
        "/v1/push",
        &json!({"client_id": "rw-0", "topic": "t/rw-0", "payload": "m2", "qos": 1}),
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    let answered = started.elapsed();
    let last = format!("rw-{}", n - 1);
    let (code, v) = post_json(
        a.http,
        "/v1/push",
        &json!({"client_id": last, "topic": format!("t/{last}"), "payload": "m2", "qos": 1}),
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("queued")), "{v}");
    let mut a = a;
    common::fleet::kill_9(&mut a);
    let b = session_node(&nats, "node-b");
    for id in ["rw-0", last.as_str()] {
        let (mut c, present) = connect(&b, id).await;
        assert!(present, "{id} not resumed on node B");
        expect_in_order(&mut c, id, 3).await;
    }
    println!(
        "fleet restart: {n} persistent sessions x 2 queued QoS 1 messages, node killed with -9 and started again: ready {:.2} s after the start, a push through it answered queued {:.2} s after the start (the rewrite of its sessions to the fleet comes first)",
        ready.as_secs_f64(),
        answered.as_secs_f64()
    );
}
