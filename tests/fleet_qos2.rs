//! QoS 2 exchanges that move with a persistent session between nodes (issue 20): real
//! gateway processes on one real `nats-server -js`, devices speaking raw MQTT 3.1.1 so the
//! test decides when each of PUBREC, PUBREL and PUBCOMP goes out. An exchange begun on
//! node A completes exactly once on node B, after `kill -9` of A or a live takeover.

mod common;

use std::time::Duration;

use async_nats::jetstream::kv;
use common::fleet::{kill_9, registry, session_node, wait_holder, DEADLINE};
use common::nats::NatsServer;
use common::{post_json, v4, GatewayProcess, Raw};
use mqttbytes::v4::Packet;
use serde_json::json;

/// A `nats-server`, nodes A and B with their stores on, the registry and session buckets.
async fn fleet(tag: &str) -> (NatsServer, Vec<GatewayProcess>, kv::Store, kv::Store) {
    let nats = NatsServer::start(tag);
    drop(nats.client().await);
    let gw = vec![session_node(&nats, "node-a"), session_node(&nats, "node-b")];
    let js = async_nats::jetstream::new(nats.client().await);
    let sessions = js.get_key_value("gateway_sessions").await.expect("bucket");
    let reg = registry(&nats).await;
    (nats, gw, reg, sessions)
}

/// PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) for `pkid`.
fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 2, hi, lo]
}

/// A raw MQTT 3.1.1 device `id` on `gw` with clean session 0, and its CONNACK's
/// session-present flag.
async fn device(gw: &GatewayProcess, id: &str) -> (Raw, bool) {
    let mut c = Raw::connect(gw.mqtt).await;
    c.send(&Raw::connect_v4(id, 60, false)).await;
    match c.next_v4(DEADLINE).await {
        Ok(Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success, "{id}");
            (c, a.session_present)
        }
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
}

/// The next packet on `c`, which must be what `want` accepts.
async fn expect(c: &mut Raw, what: &str, want: impl Fn(&Packet) -> bool) -> Packet {
    let p = c.next_v4(DEADLINE).await;
    match p {
        Ok(p) if want(&p) => p,
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// Waits until the session bucket holds a value for `key` that `ok` accepts.
async fn wait_bucket(sessions: &kv::Store, key: &str, ok: impl Fn(&[u8]) -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = sessions.get(key).await.expect("bucket get");
        if v.as_deref().is_some_and(&ok) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{key} never in JetStream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The key of `client_id`'s one outbound QoS 2 message in the session bucket, once there.
async fn wait_qos2_out(sessions: &kv::Store, client_id: &str) -> String {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let keys: Vec<String> =
            futures_util::TryStreamExt::try_collect(sessions.keys().await.expect("bucket keys"))
                .await
                .expect("bucket keys");
        let prefix = format!("{client_id}.q2out.");
        if let Some(k) = keys.into_iter().find(|k| k.starts_with(&prefix)) {
            return k;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{prefix}* never in JetStream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes QoS 0 probes on `topic` from `publisher` until `sub` receives one: the
/// subscription's interest has reached the publisher's node.
async fn until_routed(publisher: &mut Raw, sub: &mut v4::Client, topic: &str) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        publisher
            .send(&Raw::publish_v4(topic, 0, 0, b"probe"))
            .await;
        if sub.next_publish(Duration::from_millis(200)).await.is_some() {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "{topic} never routed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_qos2_message_is_routed_once_across_kill_9_of_its_node() {
    let (_nats, mut gw, reg, sessions) = fleet("q2-in").await;
    let mut sub = v4::connect(v4::options(gw[1].mqtt, "q2sub")).await;
    sub.subscribe("q2/in/#", v4::QoS::AtMostOnce).await;
    let (mut publisher, _) = device(&gw[0], "q2pub").await;
    until_routed(&mut publisher, &mut sub, "q2/in/probe").await;

    // PUBLISH QoS 2 on node A: routed at once (to node B's subscriber), PUBREC back.
    publisher
        .send(&Raw::publish_v4("q2/in/x", 2, 7, b"once"))
        .await;
    expect(
        &mut publisher,
        "PUBREC 7",
        |p| matches!(p, Packet::PubRec(r) if r.pkid == 7),
    )
    .await;
    let p = sub.next_publish(DEADLINE).await.expect("the message");
    assert_eq!(&p.payload[..], b"once");
    // The packet id awaiting PUBREL is in JetStream (the session's record); then node A
    // dies.
    wait_bucket(&sessions, "q2pub.rec", |v| {
        gateway::store::mirror::parse_fleet_record(v, "q2pub")
            .is_some_and(|r| r.inbound_qos2 == [7])
    })
    .await;
    wait_holder(&reg, "q2pub", Some("node-a")).await;
    kill_9(&mut gw[0]);

    // The device resumes on node B and sends the PUBLISH again (it saw no PUBCOMP):
    // acknowledged, not routed again; PUBREL completes the exchange.
    let (mut publisher, present) = device(&gw[1], "q2pub").await;
    assert!(present, "no session present on node B");
    let mut again = Raw::publish_v4("q2/in/x", 2, 7, b"once");
    again[0] |= 0x08;
    publisher.send(&again).await;
    expect(
        &mut publisher,
        "PUBREC 7 on node B",
        |p| matches!(p, Packet::PubRec(r) if r.pkid == 7),
    )
    .await;
    publisher.send(&ack(0x62, 7)).await;
    expect(
        &mut publisher,
        "PUBCOMP 7",
        |p| matches!(p, Packet::PubComp(c) if c.pkid == 7),
    )
    .await;
    // The next message the subscriber gets is the one after, not the resend.
    publisher
        .send(&Raw::publish_v4("q2/in/x", 1, 8, b"after"))
        .await;
    let p = sub.next_publish(DEADLINE).await.expect("the next message");
    assert_eq!(&p.payload[..], b"after", "the QoS 2 message came twice");
}

/// A persistent QoS 2 subscriber on node A gets a message, sends PUBREC, gets PUBREL and
/// then moves to node B (`kill`: after `kill -9` of A; else a live takeover): B sends the
/// PUBREL again under the same packet id, never the message, and the exchange ends there.
async fn outbound_qos2_moves(tag: &str, kill: bool) {
    let (_nats, mut gw, reg, sessions) = fleet(tag).await;
    let id = "q2dev";
    let (mut dev, _) = device(&gw[0], id).await;
    dev.send(&Raw::subscribe_v4("q2/out", 2, 1)).await;
    expect(&mut dev, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    wait_holder(&reg, id, Some("node-a")).await;

    // Published at QoS 2 on node A (the push API sends QoS 0/1 only).
    let publisher = v4::connect(v4::options(gw[0].mqtt, "q2src")).await;
    let sent = publisher
        .client
        .publish("q2/out", v4::QoS::ExactlyOnce, false, "once");
    sent.await.expect("publish");
    let Packet::Publish(p) = expect(&mut dev, "PUBLISH", |p| matches!(p, Packet::Publish(_))).await
    else {
        unreachable!()
    };
    assert_eq!(&p.payload[..], b"once");
    dev.send(&ack(0x50, p.pkid)).await;
    expect(
        &mut dev,
        "PUBREL",
        |r| matches!(r, Packet::PubRel(r) if r.pkid == p.pkid),
    )
    .await;
    if kill {
        // Format byte, checksum (4), packet id (2), then 1 once our PUBREL went out. (A
        // live takeover waits for node A's mirror itself.)
        let key = wait_qos2_out(&sessions, id).await;
        wait_bucket(&sessions, &key, |v| v.len() == 8 && v[7] == 1).await;
        kill_9(&mut gw[0]);
    }

    let (mut moved, present) = device(&gw[1], id).await;
    assert!(present, "no session present on node B");
    expect(
        &mut moved,
        "PUBREL again, not the message",
        |r| matches!(r, Packet::PubRel(r) if r.pkid == p.pkid),
    )
    .await;
    moved.send(&ack(0x70, p.pkid)).await;
    // Exchange done: the next message is the next push.
    let push = json!({"topic": "q2/out", "payload": "after", "qos": 1});
    let (code, v) = post_json(gw[1].http, "/v1/push", &push).await;
    assert_eq!(code, 200, "{v}");
    let next = expect(&mut moved, "the next message", |p| {
        matches!(p, Packet::Publish(_))
    })
    .await;
    let Packet::Publish(next) = next else {
        unreachable!()
    };
    assert_eq!(&next.payload[..], b"after", "the QoS 2 message came again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_qos2_exchange_completes_once_after_kill_9_of_its_node() {
    outbound_qos2_moves("q2-out-kill", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_qos2_exchange_completes_once_after_a_live_takeover() {
    outbound_qos2_moves("q2-out-move", false).await;
}

/// A session written by a gateway from before the one-key session record (`<id>.meta`,
/// `<id>.sub.<filter>`, `<id>.q2in.<pkid>`, as those wrote them) is still read back:
/// the device resumes it with its subscription and its inbound QoS 2 packet id awaiting
/// PUBREL (a resend is acknowledged, not routed again), and the node that resumed it
/// writes it again as one record (`<id>.rec`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_written_before_the_one_key_record_is_still_read() {
    use gateway::codec::Version;
    use gateway::store::mirror;
    let (_nats, gw, _reg, sessions) = fleet("q2-old").await;
    let id = "olddev";
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        - 3_600_000;
    let old = [
        (
            format!("{id}.meta"),
            mirror::session_bytes(id, Version::V311, 7200, an_hour_ago),
        ),
        // `old/t` escaped as the old keys were (`=2F` for the slash).
        (
            format!("{id}.sub.old=2Ft"),
            mirror::sub_bytes(id, "old/t", 1, 0),
        ),
        (format!("{id}.q2in.5"), mirror::qos2_in_bytes(id, 5)),
    ];
    for (key, value) in old {
        sessions.put(key, value.into()).await.expect("put");
    }
    let mut watcher = v4::connect(v4::options(gw[0].mqtt, "old-watch")).await;
    watcher.subscribe("old/#", v4::QoS::AtMostOnce).await;

    let (mut dev, present) = device(&gw[0], id).await;
    assert!(present, "the old session was not read");
    // Its subscription: a message to old/t reaches it.
    let publisher = v4::connect(v4::options(gw[0].mqtt, "old-pub")).await;
    publisher
        .client
        .publish("old/t", v4::QoS::AtLeastOnce, false, "to the old session")
        .await
        .expect("publish");
    let p = expect(&mut dev, "the PUBLISH", |p| matches!(p, Packet::Publish(_))).await;
    let Packet::Publish(p) = p else {
        unreachable!()
    };
    assert_eq!(&p.payload[..], b"to the old session");
    dev.send(&ack(0x40, p.pkid)).await;
    let p = watcher
        .next_publish(DEADLINE)
        .await
        .expect("the watcher's copy");
    assert_eq!(&p.payload[..], b"to the old session");
    // Its inbound QoS 2 id 5: the resend is acknowledged, not routed; PUBREL completes.
    let mut again = Raw::publish_v4("old/q2", 2, 5, b"once");
    again[0] |= 0x08;
    dev.send(&again).await;
    expect(
        &mut dev,
        "PUBREC 5",
        |p| matches!(p, Packet::PubRec(r) if r.pkid == 5),
    )
    .await;
    dev.send(&ack(0x62, 5)).await;
    expect(
        &mut dev,
        "PUBCOMP 5",
        |p| matches!(p, Packet::PubComp(c) if c.pkid == 5),
    )
    .await;
    dev.send(&Raw::publish_v4("old/after", 1, 6, b"after"))
        .await;
    let p = watcher
        .next_publish(DEADLINE)
        .await
        .expect("the next message");
    assert_eq!(
        &p.payload[..],
        b"after",
        "the QoS 2 resend was routed again"
    );
    // Written again as one record, with its subscription.
    wait_bucket(&sessions, &format!("{id}.rec"), |v| {
        mirror::parse_fleet_record(v, id).is_some_and(|r| {
            r.subs.len() == 1 && &*r.subs[0].0 == "old/t" && r.inbound_qos2.is_empty()
        })
    })
    .await;
    // A clean start on node B ends the session: its record is emptied, which hides the
    // older keys left beside it, so it is not resumed from them afterwards.
    drop(dev);
    let mut clean = Raw::connect(gw[1].mqtt).await;
    clean.send(&Raw::connect_v4(id, 60, true)).await;
    expect(&mut clean, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await;
    clean.send(&[0xE0, 0]).await;
    wait_bucket(&sessions, &format!("{id}.rec"), <[u8]>::is_empty).await;
    let (_dev, present) = device(&gw[1], id).await;
    assert!(!present, "the ended session came back from its older keys");
}
