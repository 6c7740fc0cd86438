//! MQTT 5 completeness over real TCP with a byte-level client: shared subscriptions
//! across shards (spread, exactly once, redistribution when a member leaves, several
//! groups), subscription identifiers, and topic aliases in both directions.
//!
//! Shared-group joins reach the group's owner shard asynchronously after the SUBACK, so
//! each shared test first publishes warm-up messages until every member got one (round
//! robin reaches each joined member within one round), then the counted messages. Where a
//! test must show nothing more arrived, a sentinel follows on the same path.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{connect5, encode, Raw, TestServer};
use gateway::mailbox::home_shard;
use mqttbytes::v5::{
    ConnectProperties, Packet, Publish, PublishProperties, SubscribeFilter, SubscribeProperties,
    SubscribeReasonCode,
};
use mqttbytes::QoS;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(5);
const SHARDS: usize = 3;

/// A client id homed on `shard` of [`SHARDS`].
fn id_on(shard: usize, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|id| home_shard(id, SHARDS) == shard)
        .unwrap()
}

async fn client(gw: &TestServer, id: &str) -> Raw {
    Raw::connected_v5(gw.mqtt, &connect5(id, 60, true, None))
        .await
        .0
}

async fn sub(c: &mut Raw, filter: &str, qos: QoS) {
    let ack = c
        .subscribe_v5(1, vec![SubscribeFilter::new(filter.into(), qos)])
        .await;
    assert_eq!(ack.return_codes.len(), 1);
    assert!(
        matches!(
            ack.return_codes[0],
            SubscribeReasonCode::QoS0 | SubscribeReasonCode::QoS1 | SubscribeReasonCode::QoS2
        ),
        "{filter} granted: {ack:?}"
    );
}

/// QoS 1 PUBLISH with a fresh packet id; the PUBACK is read by [`publish`].
async fn publish(c: &mut Raw, pkid: u16, topic: &str, payload: &str) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
    p.pkid = pkid;
    c.send(&encode(|b| p.write(b))).await;
    match c.next_v5(T).await {
        Ok(Packet::PubAck(a)) => assert_eq!(a.pkid, pkid),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

/// Reads a member's PUBLISHes (acknowledging them) into `tx` as (member, payload).
fn collect(mut c: Raw, member: usize, tx: mpsc::UnboundedSender<(usize, String)>) {
    tokio::spawn(async move {
        while let Some(p) = c.next_publish_v5(Duration::from_secs(30)).await {
            let s = String::from_utf8_lossy(&p.payload).into_owned();
            if tx.send((member, s)).is_err() {
                return;
            }
        }
    });
}

/// Publishes warm-ups on `topic` until each of `members` got one; returns the next pkid.
async fn warm_up(
    publisher: &mut Raw,
    topic: &str,
    members: usize,
    rx: &mut mpsc::UnboundedReceiver<(usize, String)>,
) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut warmed = HashSet::new();
    let mut pkid = 1;
    while warmed.len() < members {
        assert!(Instant::now() < deadline, "members joined: {warmed:?}");
        publish(publisher, pkid, topic, "warm").await;
        pkid += 1;
        while let Ok(Some((m, p))) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            if p == "warm" {
                warmed.insert(m);
            }
        }
    }
    pkid
}

/// Receives until `want` returns true; everything received, warm-ups left out.
async fn receive_until(
    rx: &mut mpsc::UnboundedReceiver<(usize, String)>,
    want: impl Fn(&[(usize, String)]) -> bool,
) -> Vec<(usize, String)> {
    let mut got = Vec::new();
    while !want(&got) {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((m, p))) if p != "warm" => got.push((m, p)),
            Ok(Some(_)) => {}
            _ => panic!("not everything arrived; got {got:?}"),
        }
    }
    got
}

#[tokio::test]
async fn shared_group_across_shards_gets_each_message_once_spread_over_members() {
    let gw = TestServer::start("[shards]\ncount = 3");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut homes = HashSet::new();
    for shard in 0..SHARDS {
        let id = id_on(shard, "member");
        homes.insert(home_shard(&id, SHARDS));
        let mut c = client(&gw, &id).await;
        sub(&mut c, "$share/workers/jobs/+", QoS::AtLeastOnce).await;
        collect(c, shard, tx.clone());
    }
    assert_eq!(homes.len(), 3, "one member on each shard");
    let mut p = client(&gw, "shared-publisher").await;
    let mut pkid = warm_up(&mut p, "jobs/x", 3, &mut rx).await;
    for i in 0..30 {
        publish(&mut p, pkid, "jobs/x", &format!("m{i}")).await;
        pkid += 1;
    }
    // Three sentinels: one per member by round robin, after everything else it got.
    for _ in 0..3 {
        publish(&mut p, pkid, "jobs/x", "end").await;
        pkid += 1;
    }
    let got = receive_until(&mut rx, |g| {
        g.iter().filter(|(_, p)| p == "end").count() == 3
    })
    .await;
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut per_member = [0usize; SHARDS];
    for (m, p) in &got {
        if p != "end" {
            *count.entry(p.as_str()).or_default() += 1;
            per_member[*m] += 1;
        }
    }
    assert_eq!(count.len(), 30, "every message arrived: {got:?}");
    assert!(count.values().all(|&n| n == 1), "exactly once: {count:?}");
    assert!(
        per_member.iter().all(|&n| n > 0),
        "spread over all members: {per_member:?}"
    );
    let ends: HashSet<usize> = got
        .iter()
        .filter(|(_, p)| p == "end")
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(ends.len(), 3, "round robin gave each member a sentinel");
}

#[tokio::test]
async fn a_leaving_member_hands_its_unacknowledged_messages_to_another() {
    let gw = TestServer::start("[shards]\ncount = 3");
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The member that never acknowledges, and the one that does, on different shards.
    let mut silent = client(&gw, &id_on(0, "silent")).await;
    sub(&mut silent, "$share/g/work", QoS::AtLeastOnce).await;
    let mut good = client(&gw, &id_on(1, "good")).await;
    sub(&mut good, "$share/g/work", QoS::AtLeastOnce).await;
    collect(good, 1, tx.clone());
    let mut p = client(&gw, &id_on(2, "pub")).await;

    // Warm up until the silent member holds one unacknowledged message: then both joined.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pkid = 1;
    let mut held = Vec::new();
    while held.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the silent member never got a message"
        );
        publish(&mut p, pkid, "work", "warm").await;
        pkid += 1;
        if let Ok(Packet::Publish(m)) = silent.next_v5(Duration::from_millis(200)).await {
            held.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
    for i in 0..10 {
        publish(&mut p, pkid, "work", &format!("m{i}")).await;
        pkid += 1;
    }
    // Round robin over two members: the silent one gets every other message, five of
    // the ten, and never acknowledges them.
    let mut silent_got = HashSet::new();
    while silent_got.len() < 5 {
        match silent.next_v5(T).await {
            Ok(Packet::Publish(m)) if &m.payload[..] != b"warm" => {
                silent_got.insert(String::from_utf8_lossy(&m.payload).into_owned());
            }
            Ok(_) => {}
            Err(e) => panic!("silent member got {silent_got:?}, then {e}"),
        }
    }
    drop(silent); // session expiry 0: the session ends with the connection
    let got = receive_until(&mut rx, |g| {
        (0..10).all(|i| g.iter().any(|(_, p)| *p == format!("m{i}")))
    })
    .await;
    for m in &silent_got {
        assert!(
            got.iter().any(|(_, p)| p == m),
            "{m} redelivered to the other member"
        );
    }
}

#[tokio::test]
async fn two_groups_on_one_filter_each_get_every_message() {
    let gw = TestServer::start("[shards]\ncount = 3");
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    for (i, shard) in [0, 1].into_iter().enumerate() {
        let mut c = client(&gw, &id_on(shard, "g1")).await;
        sub(&mut c, "$share/one/s/t", QoS::AtLeastOnce).await;
        collect(c, i, tx1.clone());
    }
    let mut c = client(&gw, &id_on(2, "g2")).await;
    sub(&mut c, "$share/two/s/t", QoS::AtLeastOnce).await;
    collect(c, 0, tx2.clone());
    let mut p = client(&gw, "two-groups-pub").await;
    let mut pkid = warm_up(&mut p, "s/t", 2, &mut rx1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Group two may have joined later than group one: warm it up too.
    let mut two_warm = false;
    while !two_warm {
        assert!(Instant::now() < deadline, "group two never got a message");
        while let Ok(Some((_, m))) =
            tokio::time::timeout(Duration::from_millis(200), rx2.recv()).await
        {
            two_warm |= m == "warm";
        }
        if !two_warm {
            publish(&mut p, pkid, "s/t", "warm").await;
            pkid += 1;
        }
    }
    for i in 0..10 {
        publish(&mut p, pkid, "s/t", &format!("m{i}")).await;
        pkid += 1;
    }
    let all = |g: &[(usize, String)]| (0..10).all(|i| g.iter().any(|(_, p)| *p == format!("m{i}")));
    let one = receive_until(&mut rx1, all).await;
    let two = receive_until(&mut rx2, all).await;
    assert_eq!(one.len(), 10, "group one: each message once: {one:?}");
    assert_eq!(two.len(), 10, "group two: each message once: {two:?}");
    assert!(one.iter().any(|(m, _)| *m == 0) && one.iter().any(|(m, _)| *m == 1));
}

#[tokio::test]
async fn shared_subscription_details_connack_retained_and_no_local() {
    // One shard: the retained message is stored before the subscriptions are made (with
    // more, it could still be on its way to the group's owner and arrive live).
    let gw = TestServer::start("[shards]\ncount = 1");
    let (mut c, ack) = Raw::connected_v5(gw.mqtt, &connect5("details", 60, true, None)).await;
    let props = ack.properties.expect("CONNACK properties");
    assert_ne!(props.shared_subscription_available, Some(0));
    assert_ne!(props.subscription_identifiers_available, Some(0));
    assert_eq!(props.topic_alias_max, Some(16));
    // A retained message is not sent to a new shared subscription; a plain one gets it.
    let mut p = client(&gw, "details-pub").await;
    let mut r = Publish::new("d/t", QoS::AtLeastOnce, b"kept".to_vec());
    r.retain = true;
    r.pkid = 1;
    p.send(&encode(|b| r.write(b))).await;
    assert!(matches!(p.next_v5(T).await, Ok(Packet::PubAck(_))));
    sub(&mut c, "$share/g/d/t", QoS::AtLeastOnce).await;
    sub(&mut c, "d/+", QoS::AtLeastOnce).await;
    let first = c.next_publish_v5(T).await.expect("retained via d/+");
    assert!(first.retain && &first.payload[..] == b"kept");
    // An invalid shared filter is refused in the SUBACK.
    let ack = c
        .subscribe_v5(
            2,
            vec![SubscribeFilter::new("$share//x".into(), QoS::AtMostOnce)],
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::TopicFilterInvalid]
    );
    // No Local on a shared subscription is a protocol error.
    let mut f = SubscribeFilter::new("$share/g/nl".into(), QoS::AtMostOnce);
    f.nolocal = true;
    let mut s = mqttbytes::v5::Subscribe::new_many(vec![f]);
    s.pkid = 3;
    c.send(&encode(|b| s.write(b))).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x82);
}

#[tokio::test]
async fn v311_clients_may_use_shared_subscriptions() {
    let gw = TestServer::start("[shards]\ncount = 2");
    let mut c = Raw::connect(gw.mqtt).await;
    c.send(&Raw::connect_v4("v3-shared", 60, true)).await;
    assert!(matches!(
        c.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    c.send(&Raw::subscribe_v4("$share/g/v3/t", 1, 1)).await;
    match c.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => {
            assert_eq!(
                a.return_codes,
                vec![mqttbytes::v4::SubscribeReasonCode::Success(
                    QoS::AtLeastOnce
                )]
            )
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut p = client(&gw, "v3-shared-pub").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pkid = 1;
    loop {
        assert!(
            Instant::now() < deadline,
            "the v3.1.1 member never got a message"
        );
        publish(&mut p, pkid, "v3/t", "hi").await;
        pkid += 1;
        if let Ok(mqttbytes::v4::Packet::Publish(m)) = c.next_v4(Duration::from_millis(200)).await {
            assert_eq!(&m.payload[..], b"hi");
            break;
        }
    }
}

fn sub_with_id(filter: &str, id: Option<usize>, pkid: u16) -> Vec<u8> {
    let mut s = mqttbytes::v5::Subscribe::new(filter, QoS::AtLeastOnce);
    s.pkid = pkid;
    s.properties = id.map(|id| SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    });
    encode(|b| s.write(b))
}

async fn suback(c: &mut Raw) {
    assert!(matches!(c.next_v5(T).await, Ok(Packet::SubAck(_))));
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_publish_with_all_their_ids() {
    let gw = TestServer::start("");
    let mut c = client(&gw, "subids").await;
    c.send(&sub_with_id("si/+", Some(3), 1)).await;
    suback(&mut c).await;
    c.send(&sub_with_id("si/#", Some(7), 2)).await;
    suback(&mut c).await;
    let mut p = client(&gw, "subids-pub").await;
    publish(&mut p, 1, "si/x", "one").await;
    publish(&mut p, 2, "si/x", "sentinel").await;
    let m = c.next_publish_v5(T).await.expect("publish");
    assert_eq!(&m.payload[..], b"one");
    let mut ids = m.properties.expect("properties").subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![3, 7]);
    let next = c.next_publish_v5(T).await.expect("sentinel");
    assert_eq!(&next.payload[..], b"sentinel", "one copy only");

    // Re-subscribing si/# without an id removes its id.
    c.send(&sub_with_id("si/#", None, 3)).await;
    suback(&mut c).await;
    publish(&mut p, 3, "si/x", "two").await;
    let m = c.next_publish_v5(T).await.expect("publish");
    assert_eq!(
        m.properties.expect("properties").subscription_identifiers,
        vec![3]
    );
    // A topic only si/# matches now carries no id at all.
    publish(&mut p, 4, "si/x/y", "three").await;
    let m = c.next_publish_v5(T).await.expect("publish");
    assert_eq!(&m.payload[..], b"three");
    assert!(m
        .properties
        .is_none_or(|pp| pp.subscription_identifiers.is_empty()));
}

fn aliased(topic: &str, alias: u16, payload: &str) -> Vec<u8> {
    let mut m = Publish::new(topic, QoS::AtMostOnce, payload.as_bytes().to_vec());
    m.properties = Some(PublishProperties {
        topic_alias: Some(alias),
        ..common::empty_publish_props()
    });
    encode(|b| m.write(b))
}

#[tokio::test]
async fn inbound_topic_aliases_are_set_reused_and_checked() {
    let gw = TestServer::start("");
    let mut s = client(&gw, "alias-sub").await;
    sub(&mut s, "ta/#", QoS::AtMostOnce).await;
    let mut c = client(&gw, "alias-pub").await;
    c.send(&aliased("ta/one", 1, "set")).await;
    c.send(&aliased("", 1, "reuse")).await;
    c.send(&aliased("ta/two", 16, "max")).await;
    c.send(&aliased("", 16, "max-reuse")).await;
    for (topic, payload) in [
        ("ta/one", "set"),
        ("ta/one", "reuse"),
        ("ta/two", "max"),
        ("ta/two", "max-reuse"),
    ] {
        let m = s.next_publish_v5(T).await.expect("publish");
        assert_eq!((&m.topic[..], &m.payload[..]), (topic, payload.as_bytes()));
    }
    assert!(c.ping_v5(T).await, "still connected");

    // Above our Topic Alias Maximum (16): 0x94.
    c.send(&aliased("ta/x", 17, "x")).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x94);
    // Alias 0: 0x94.
    let mut c = client(&gw, "alias-zero").await;
    c.send(&aliased("ta/x", 0, "x")).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x94);
    // An alias used before it was set: protocol error. Aliases do not outlive a connection.
    let mut c = client(&gw, "alias-pub").await;
    c.send(&aliased("", 1, "x")).await;
    assert_eq!(c.expect_disconnect_v5(T).await, 0x82);
}

#[tokio::test]
async fn outbound_topic_aliases_send_the_topic_once_then_the_alias() {
    let gw = TestServer::start("");
    let props = ConnectProperties {
        topic_alias_max: Some(5),
        ..common::session_expiry_props(0)
    };
    let (mut s, _) =
        Raw::connected_v5(gw.mqtt, &connect5("alias-out", 60, true, Some(props))).await;
    sub(&mut s, "out/#", QoS::AtMostOnce).await;
    let mut p = client(&gw, "alias-out-pub").await;
    for (i, topic) in ["out/a", "out/a", "out/b", "out/a"].into_iter().enumerate() {
        publish(&mut p, i as u16 + 1, topic, &format!("{i}")).await;
    }
    let mut seen: Vec<(String, Option<u16>)> = Vec::new();
    for _ in 0..4 {
        let m = s.next_publish_v5(T).await.expect("publish");
        let alias = m.properties.and_then(|pp| pp.topic_alias);
        seen.push((m.topic.clone(), alias));
    }
    let a = seen[0].1.expect("first message carries an alias");
    assert_eq!(seen[0].0, "out/a");
    assert_eq!(seen[1], (String::new(), Some(a)), "then the alias alone");
    let b = seen[2].1.expect("a new topic gets its own alias");
    assert_ne!(a, b);
    assert_eq!(seen[2].0, "out/b");
    assert_eq!(seen[3], (String::new(), Some(a)));
    assert!((1..=5).contains(&a) && (1..=5).contains(&b));

    // A client that allows none gets plain topics.
    let mut plain = client(&gw, "alias-none").await;
    sub(&mut plain, "out/#", QoS::AtMostOnce).await;
    publish(&mut p, 9, "out/a", "plain").await;
    let m = plain.next_publish_v5(T).await.expect("publish");
    assert_eq!(m.topic, "out/a");
    assert!(m.properties.is_none_or(|pp| pp.topic_alias.is_none()));
}
