//! State that must come back exactly after a restart: a restored `$share/` subscription
//! delivers, outbound QoS 2 resumes with PUBREL or DUP under the original packet ids, and
//! an inbound QoS 2 message acknowledged before the restart is not routed again.

mod common;

use std::time::Duration;

use common::store::*;
use common::{tempdir, v4, GatewayProcess, Raw};
use mqttbytes::v4::Packet as P4;

const T: Duration = Duration::from_secs(10);

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
    // The gateway reads the last PUBCOMP when its shard gets to it: polled.
    let queued = common::wait_metric(gw.http, "gateway_queued_messages", T, |v| v == 0.0).await;
    assert_eq!(queued, 0.0);
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
