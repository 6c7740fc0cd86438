//! Retained messages in one order per topic (issue 17.7): concurrent retained PUBLISHes to
//! one topic from devices homed on different shards leave every shard's copy and the
//! store with the same value, and `max_retained_messages` bounds the retained topics of
//! the whole gateway, the same ones on every shard and after a restart. The byte bounds
//! (issue 17.8) still hold when the topic's home is another shard than the device's.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use gateway::mailbox::home_shard;
use mqttbytes::v5::PubAckReason;
use mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);
const SHARDS: usize = 2;

/// The retained messages a fresh subscriber is given: topic → payload.
type Retained = BTreeMap<String, Vec<u8>>;

/// One client id homed on each shard, `"{prefix}-{n}"`.
fn ids_per_shard(prefix: &str) -> Vec<String> {
    (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|n| format!("{prefix}-{n}"))
                .find(|id| home_shard(id, SHARDS) == shard)
                .expect("an id for every shard")
        })
        .collect()
}

/// `n` topics `"t/{i}"` whose home is `shard`.
fn topics_homed(shard: usize, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("t/{i}"))
        .filter(|t| home_shard(t, SHARDS) == shard)
        .take(n)
        .collect()
}

/// A gateway with two shards and its store in `dir` (so it can be started again on it),
/// without inbound rate limits (the devices publish bursts).
fn start(dir: &tempdir::Dir, mqtt: &str) -> TestServer {
    let path = dir.0.join("data").display().to_string();
    TestServer::start(&format!(
        "[shards]\ncount = {SHARDS}\n[store]\npath = \"{path}\"\n\
         [limits]\npublish_rate = 0\nbytes_rate = 0\n[mqtt]\n{mqtt}"
    ))
}

async fn connect_v4(s: &TestServer, id: &str) -> Raw {
    let mut c = Raw::connect(s.mqtt).await;
    c.send(&Raw::connect_v4(id, 30, true)).await;
    match c.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success, "{id}");
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    c
}

/// QoS 0 messages (to no subscriber) sent after the retained ones in the same write: the
/// shard takes a while over them before it hands the turn's batch to the other shard, so
/// each shard has read its own device's retained update before the other's arrives.
const NOISE: usize = 300;

/// Sends the retained QoS 1 `(topic, payload)`s and [`NOISE`] in one write, then waits
/// for every PUBACK.
async fn publish_retained(c: &mut Raw, msgs: &[(String, String)]) {
    let mut bytes = Vec::new();
    for (i, (topic, payload)) in msgs.iter().enumerate() {
        let mut p = mqttbytes::v4::Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes());
        p.retain = true;
        p.pkid = i as u16 + 1;
        bytes.extend(encode(|b| p.write(b)));
    }
    for _ in 0..NOISE {
        bytes.extend(Raw::publish_v4("noise", 0, 0, b"n"));
    }
    c.send(&bytes).await;
    for _ in msgs {
        match c.next_v4(T).await {
            Ok(mqttbytes::v4::Packet::PubAck(_)) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// What a fresh subscriber `id` to `filter` is given: the retained messages its shard
/// holds when it subscribes, sent with the SUBACK (taken until 300 ms pass without one).
async fn retained_seen_by(s: &TestServer, id: &str, filter: &str) -> Retained {
    let mut c = connect_v4(s, id).await;
    c.send(&Raw::subscribe_v4(filter, 0, 1)).await;
    let mut seen = Retained::new();
    let mut subscribed = false;
    loop {
        let wait = if subscribed {
            Duration::from_millis(300)
        } else {
            T
        };
        match c.next_v4(wait).await {
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                assert!(p.retain, "{id}: a live message on {}", p.topic);
                seen.insert(p.topic, p.payload.to_vec());
            }
            Ok(mqttbytes::v4::Packet::SubAck(_)) => subscribed = true,
            Ok(_) => {}
            Err(e) => {
                assert!(subscribed, "{id}: no SUBACK ({e})");
                return seen;
            }
        }
    }
}

/// The retained messages a subscriber homed on each shard is given, looked at again
/// until every shard holds `expected` topics, the same messages (or `3 × T` passed).
/// The PUBACKs do not wait for a topic's home shard to decide and the other shards to
/// apply the decision, and a subscriber is given only what its shard holds when it
/// subscribes: on a loaded machine one look can come too early.
async fn retained_per_shard(s: &TestServer, filter: &str, expected: usize) -> Vec<Retained> {
    let deadline = tokio::time::Instant::now() + 3 * T;
    loop {
        let mut out = Vec::new();
        for id in ids_per_shard("probe") {
            out.push(retained_seen_by(s, &id, filter).await);
        }
        let agreed = out.iter().all(|c| c.len() == expected && *c == out[0]);
        if agreed || tokio::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every shard's copy and the store after a restart must hold `expected` topics, the
/// same messages; returns them.
async fn assert_one_copy(
    s: TestServer,
    dir: &tempdir::Dir,
    mqtt: &str,
    expected: usize,
) -> Retained {
    let shards = retained_per_shard(&s, "t/#", expected).await;
    for (shard, copy) in shards.iter().enumerate() {
        assert_eq!(
            copy.len(),
            expected,
            "shard {shard} holds {} retained topics: {:?}",
            copy.len(),
            copy.keys()
        );
        assert_eq!(
            copy, &shards[0],
            "shard {shard}'s retained messages differ from shard 0's"
        );
    }
    drop(s);
    let s = start(dir, mqtt);
    let restarted = retained_per_shard(&s, "t/#", expected).await;
    assert_eq!(
        restarted[0], shards[0],
        "the store holds other retained messages"
    );
    shards[0].clone()
}

#[tokio::test]
async fn concurrent_retained_updates_from_different_shards_leave_one_value() {
    let dir = tempdir::Dir::new("retained-order");
    let s = start(&dir, "");
    let ids = ids_per_shard("pub");
    let (mut a, mut b) = (connect_v4(&s, &ids[0]).await, connect_v4(&s, &ids[1]).await);
    const TRIALS: usize = 30;
    for trial in 0..TRIALS {
        // Each device sets the topic in one burst, both at once.
        let burst = |who: &str| -> Vec<(String, String)> {
            (0..3)
                .map(|k| (format!("t/{trial}"), format!("{who}-{trial}-{k}")))
                .collect()
        };
        let (from_a, from_b) = (burst("a"), burst("b"));
        tokio::join!(
            publish_retained(&mut a, &from_a),
            publish_retained(&mut b, &from_b)
        );
    }
    let agreed = assert_one_copy(s, &dir, "", TRIALS).await;
    // Each topic ends with one device's last update.
    for (topic, payload) in agreed {
        let p = String::from_utf8(payload).expect("utf-8");
        assert!(p.ends_with("-2"), "{topic} ended with {p}");
    }
}

#[tokio::test]
async fn max_retained_messages_bounds_the_whole_gateway_the_same_on_every_shard() {
    const MQTT: &str = "max_retained_messages = 4\n";
    let dir = tempdir::Dir::new("retained-max");
    let s = start(&dir, MQTT);
    // Three topics homed on each shard: each shard's share of 4 is 2.
    let topics: Vec<String> = (0..SHARDS)
        .flat_map(|shard| topics_homed(shard, 3))
        .collect();
    let ids = ids_per_shard("pub");
    let (mut a, mut b) = (connect_v4(&s, &ids[0]).await, connect_v4(&s, &ids[1]).await);
    // One device sets the six topics in one order, the other in the reverse order.
    let from_a: Vec<_> = topics.iter().map(|t| (t.clone(), "a".into())).collect();
    let from_b: Vec<_> = topics
        .iter()
        .rev()
        .map(|t| (t.clone(), "b".into()))
        .collect();
    tokio::join!(
        publish_retained(&mut a, &from_a),
        publish_retained(&mut b, &from_b)
    );
    let kept = assert_one_copy(s, &dir, MQTT, 4).await;
    for shard in 0..SHARDS {
        let homed = kept.keys().filter(|t| home_shard(t, SHARDS) == shard);
        assert_eq!(homed.count(), 2, "shard {shard}'s share: {:?}", kept.keys());
    }
}

/// Retained QoS 1 PUBLISHes from a v5 client in one write, each `(topic, cost)` with a
/// payload making its retained cost (topic + payload) `cost`; their PUBACK reasons.
async fn retain_v5(c: &mut Raw, msgs: &[(&str, usize)]) -> Vec<PubAckReason> {
    let mut bytes = Vec::new();
    for (i, (topic, cost)) in msgs.iter().enumerate() {
        let payload = vec![b'x'; cost - topic.len()];
        let mut p = mqttbytes::v5::Publish::new(*topic, QoS::AtLeastOnce, payload);
        p.retain = true;
        p.pkid = i as u16 + 1;
        bytes.extend(encode(|b| p.write(b)));
    }
    c.send(&bytes).await;
    let mut reasons = Vec::new();
    for _ in msgs {
        match c.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::PubAck(a)) => reasons.push(a.reason),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    reasons
}

/// Waits until shard 0 keeps a retained message on `topic` (its home shard decided it and
/// shard 0 applied the decision): a subscriber homed on shard 0 is sent it.
async fn wait_retained_on_shard_0(s: &TestServer, topic: &str) {
    let id = &ids_per_shard("probe")[0];
    let deadline = tokio::time::Instant::now() + T;
    for pkid in 1.. {
        let mut c = connect_v4(s, id).await;
        c.send(&Raw::subscribe_v4(topic, 0, pkid)).await;
        assert!(matches!(
            c.next_v4(T).await,
            Ok(mqttbytes::v4::Packet::SubAck(_))
        ));
        if let Ok(mqttbytes::v4::Packet::Publish(_)) = c.next_v4(Duration::from_millis(100)).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic} never retained on shard 0"
        );
    }
}

/// A v5 device homed on shard 0.
async fn device_on_shard_0(s: &TestServer) -> Raw {
    let id = &ids_per_shard("dev")[0];
    Raw::connected_v5(s.mqtt, &connect5(id, 30, true, None))
        .await
        .0
}

#[tokio::test]
async fn a_devices_retained_bytes_count_before_the_topics_home_shard_decides() {
    use PubAckReason::{QuotaExceeded, Success};
    let dir = tempdir::Dir::new("retained-bytes");
    let s = start(&dir, "max_retained_bytes_per_client = 1000\n");
    let mut a = device_on_shard_0(&s).await;
    // Two topics homed on the other shard, in one write: the second passes the bound
    // though the home's decision on the first has not come back yet.
    let far = topics_homed(1, 2);
    let reasons = retain_v5(&mut a, &[(&far[0], 600), (&far[1], 600)]).await;
    assert_eq!(reasons, [Success, QuotaExceeded]);
    assert_one_copy(s, &dir, "", 1).await;
}

#[tokio::test]
async fn a_topic_refused_by_count_does_not_count_against_its_publishers_bytes() {
    use PubAckReason::Success;
    const MQTT: &str = "max_retained_messages = 2\nmax_retained_bytes_per_client = 1000\n";
    let dir = tempdir::Dir::new("retained-refused");
    let s = start(&dir, MQTT);
    let mut a = device_on_shard_0(&s).await;
    let (far, near) = (topics_homed(1, 2), topics_homed(0, 1));
    // Shard 1's share is one topic: the second is delivered but not retained (MQTT has
    // no refusal for it), and its 300 bytes must not stay counted for the device.
    let reasons = retain_v5(&mut a, &[(&far[0], 600), (&far[1], 300)]).await;
    assert_eq!(reasons, [Success, Success]);
    // The PUBACKs do not wait for shard 1's decisions (nothing is stored there): wait
    // until shard 0 has applied them before the device publishes again.
    wait_retained_on_shard_0(&s, &far[0]).await;
    assert_eq!(retain_v5(&mut a, &[(&near[0], 300)]).await, [Success]);
    let kept = assert_one_copy(s, &dir, MQTT, 2).await;
    let topics: Vec<_> = kept.keys().cloned().collect();
    let mut expected = vec![far[0].clone(), near[0].clone()];
    expected.sort();
    assert_eq!(topics, expected);
}
