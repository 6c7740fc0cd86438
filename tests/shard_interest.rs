//! Routing between shards by interest (`[shards] interest_buckets`): a message is handed
//! only to the shards holding a subscription that may match it, and never misses one —
//! not a subscription made just before the message, not a shared group whose owner shard
//! holds no member. Counted by `gateway_shard_handoff_messages_total`.
//!
//! Client ids are chosen by their home shard (`gateway::mailbox::home_shard`), so each
//! test knows which shards a message must reach.

mod common;

use std::time::Duration;

use common::{connect_from, post_json, Raw, TestServer};
use gateway::mailbox::home_shard;
use mqttbytes::v4::Packet;
use serde_json::json;

const T: Duration = Duration::from_secs(10);
const SHARDS: usize = 4;

fn config(interest_buckets: u32) -> String {
    format!(
        "[shards]\ncount = {SHARDS}\ninterest_buckets = {interest_buckets}\n\
         [limits]\npublish_rate = 0\nbytes_rate = 0\n"
    )
}

/// The first client id `{prefix}-{n}` whose home shard is `shard`.
fn id_on(prefix: &str, shard: usize) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| home_shard(id, SHARDS) == shard)
        .expect("some id lands on every shard")
}

async fn device(gw: &TestServer, i: usize, id: &str) -> Raw {
    let mut raw = Raw::from_stream(connect_from(i, gw.mqtt).await.expect("connect"));
    raw.send(&Raw::connect_v4(id, 60, true)).await;
    assert!(matches!(raw.recv_v4(T).await, Ok(Packet::ConnAck(_))));
    raw
}

async fn subscribe(dev: &mut Raw, filter: &str, pkid: u16) {
    dev.send(&Raw::subscribe_v4(filter, 0, pkid)).await;
    match dev.recv_v4(T).await {
        Ok(Packet::SubAck(a)) => assert_eq!(a.pkid, pkid),
        other => panic!("no SUBACK for {filter}: {other:?}"),
    }
}

async fn expect_publish(dev: &mut Raw, topic: &str) {
    match dev.recv_v4(T).await {
        Ok(Packet::Publish(p)) => assert_eq!(p.topic, topic),
        other => panic!("expected a PUBLISH on {topic}, got {other:?}"),
    }
}

/// 24 devices, each subscribed to its own topic, one publisher sending one message to
/// each: every device gets its message; returns the hand-offs between shards and how
/// many devices live on another shard than the publisher.
async fn one_message_per_device(interest_buckets: u32) -> (f64, usize) {
    let gw = TestServer::start(&config(interest_buckets));
    let ids: Vec<String> = (0..24).map(|i| format!("dev-{i}")).collect();
    let mut devs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut d = device(&gw, i, id).await;
        subscribe(&mut d, &format!("dev/{id}/cmd"), 1).await;
        devs.push(d);
    }
    let publisher_id = "publisher";
    let mut publisher = device(&gw, 99, publisher_id).await;
    for id in &ids {
        publisher
            .send(&Raw::publish_v4(&format!("dev/{id}/cmd"), 0, 0, b"x"))
            .await;
    }
    for (id, d) in ids.iter().zip(devs.iter_mut()) {
        expect_publish(d, &format!("dev/{id}/cmd")).await;
    }
    let elsewhere = (ids.iter())
        .filter(|id| home_shard(id, SHARDS) != home_shard(publisher_id, SHARDS))
        .count();
    let handoffs = gw.metric("gateway_shard_handoff_messages_total").await;
    (handoffs, elsewhere)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_handed_only_to_the_shard_of_its_subscriber() {
    let (handoffs, elsewhere) = one_message_per_device(1 << 20).await;
    assert!(elsewhere > 0 && elsewhere < 24, "ids spread over shards");
    assert_eq!(
        handoffs, elsewhere as f64,
        "one hand-off per message whose subscriber lives on another shard"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_filter_off_every_message_goes_to_every_shard() {
    let (handoffs, _) = one_message_per_device(0).await;
    assert_eq!(handoffs, (24 * (SHARDS - 1)) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_right_after_the_suback_reaches_the_new_subscriber() {
    let gw = TestServer::start(&config(1 << 20));
    let sub_id = id_on("sub", 1);
    let pub_id = id_on("pub", 2);
    let mut sub = device(&gw, 1, &sub_id).await;
    let mut publisher = device(&gw, 2, &pub_id).await;
    for round in 0..50u16 {
        let topic = format!("race/{round}/x");
        subscribe(&mut sub, &topic, round + 1).await;
        publisher.send(&Raw::publish_v4(&topic, 0, 0, b"x")).await;
        expect_publish(&mut sub, &topic).await;
    }
    // The wildcard form too: a filter that only a prefix of the topic names.
    subscribe(&mut sub, "late/#", 99).await;
    publisher
        .send(&Raw::publish_v4("late/a/b", 0, 0, b"x"))
        .await;
    expect_publish(&mut sub, "late/a/b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_is_reached_through_its_owner_shard() {
    let gw = TestServer::start(&config(1 << 20));
    // The member, the group's owner and the publisher on three different shards.
    let group = (0..)
        .map(|n| format!("g{n}"))
        .find(|g| home_shard(&format!("{g}/jobs/+"), SHARDS) == 3)
        .expect("a group owned by shard 3");
    let mut member = device(&gw, 1, &id_on("member", 1)).await;
    subscribe(&mut member, &format!("$share/{group}/jobs/+"), 1).await;
    let mut publisher = device(&gw, 2, &id_on("pub", 2)).await;
    publisher.send(&Raw::publish_v4("jobs/1", 0, 0, b"x")).await;
    expect_publish(&mut member, "jobs/1").await;

    // A topic push finds the group too, and a topic nobody subscribed is matched by none.
    let (code, b) = post_json(
        gw.http,
        "/v1/push",
        &json!({"topic": "jobs/2", "payload": "y", "qos": 0}),
    )
    .await;
    assert_eq!((code, b["matched"].as_u64()), (200, Some(1)), "{b}");
    expect_publish(&mut member, "jobs/2").await;
    let (code, b) = post_json(
        gw.http,
        "/v1/push",
        &json!({"topic": "nobody/here", "payload": "y", "qos": 0}),
    )
    .await;
    assert_eq!((code, b["matched"].as_u64()), (200, Some(0)), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_last_subscriber_leaves_no_message_is_handed_on() {
    let gw = TestServer::start(&config(1 << 20));
    let mut sub = device(&gw, 1, &id_on("sub", 1)).await;
    subscribe(&mut sub, "room/+/temp", 1).await;
    let mut publisher = device(&gw, 2, &id_on("pub", 2)).await;
    publisher
        .send(&Raw::publish_v4("room/1/temp", 0, 0, b"x"))
        .await;
    expect_publish(&mut sub, "room/1/temp").await;
    assert_eq!(gw.metric("gateway_shard_handoff_messages_total").await, 1.0);
    // The session ends (clean session, disconnect): its subscription goes with it.
    sub.send(&[0xE0, 0]).await;
    assert!(sub.closed_within(T).await);
    gw.wait_metric("gateway_sessions", T, |v| v == 1.0).await;
    for i in 0..10 {
        publisher
            .send(&Raw::publish_v4(&format!("room/{i}/temp"), 0, 0, b"x"))
            .await;
    }
    // A ping answered after the publishes: they were all read and routed.
    publisher.send(&[0xC0, 0]).await;
    assert!(matches!(publisher.recv_v4(T).await, Ok(Packet::PingResp)));
    assert_eq!(gw.metric("gateway_shard_handoff_messages_total").await, 1.0);
}
