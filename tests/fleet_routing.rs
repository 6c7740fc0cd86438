//! Topic routing across the fleet (issue 19 point 2): real gateway processes on loopback
//! sharing one real `nats-server`. A device PUBLISH or an HTTP topic push on one node
//! reaches the matching subscribers on the others once each, in order for QoS 1, and only
//! nodes with a matching subscription receive it (`gateway_fleet_messages_total`).

mod common;

use std::time::Duration;

use common::fleet::until_routed;
use common::nats::NatsServer;
use common::v4::{self, QoS};
use common::{http_get, post_json, GatewayProcess};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn node(nats: &NatsServer, node: &str) -> GatewayProcess {
    node_with(nats, node, "")
}

/// A node with more `[cluster]` settings.
fn node_with(nats: &NatsServer, node: &str, cluster: &str) -> GatewayProcess {
    GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"{}\"\n{cluster}\n[store]\nenabled = false\n",
        nats.url()
    ))
}

async fn fleet(tag: &str, nodes: &[&str]) -> (NatsServer, Vec<GatewayProcess>) {
    let nats = NatsServer::start(tag);
    drop(nats.client().await);
    let gateways = nodes.iter().map(|n| node(&nats, n)).collect();
    (nats, gateways)
}

async fn client(gw: &GatewayProcess, id: &str) -> v4::Client {
    v4::connect(v4::options(gw.mqtt, id)).await
}

fn in_total(gw: &GatewayProcess) -> impl std::future::Future<Output = f64> + '_ {
    gw.metric("gateway_fleet_messages_total{direction=\"in\"}")
}

/// The payloads of the next `n` messages on topics other than `probe`.
async fn receive(sub: &mut v4::Client, n: usize, probe: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = sub
            .next_publish(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} messages arrived: {got:?}", got.len()));
        if p.topic != probe {
            got.push((p.topic, String::from_utf8_lossy(&p.payload).into_owned()));
        }
    }
    got
}

/// Publishes `jobs/0` … `jobs/{n-1}` at QoS 1, each with its number as the payload.
async fn publish_jobs(publisher: &v4::Client, n: u32) {
    for i in 0..n {
        publisher
            .client
            .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
}

/// Nothing but probes arrives within a short while.
async fn nothing_more(sub: &mut v4::Client, probe: &str) {
    while let Some(p) = sub.next_publish(Duration::from_millis(500)).await {
        assert_eq!(p.topic, probe, "an unexpected message arrived: {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_other_nodes_once_each_and_only_interested_ones() {
    let (_nats, gw) = fleet("route-once", &["node-a", "node-b", "node-c"]).await;
    let (a, b, c) = (&gw[0], &gw[1], &gw[2]);
    let publisher = client(a, "pub-a").await;
    // Overlapping filters on node B: each message matches both, and is delivered once.
    let mut sub_b = client(b, "sub-b").await;
    sub_b.subscribe("sensors/+/temp", QoS::AtLeastOnce).await;
    sub_b.subscribe("sensors/#", QoS::AtLeastOnce).await;
    // A local subscriber on node A gets each message once too (NATS does not echo).
    let mut sub_a = client(a, "sub-a").await;
    sub_a.subscribe("sensors/#", QoS::AtLeastOnce).await;
    let probe = "sensors/probe/temp";
    until_routed(&publisher, &mut sub_b, probe).await;

    for i in 0..10 {
        let qos = if i % 2 == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let topic = format!("sensors/{i}/temp");
        publisher
            .client
            .publish(topic, qos, false, format!("m{i}"))
            .await
            .unwrap();
    }
    let want: Vec<(String, String)> = (0..10)
        .map(|i| (format!("sensors/{i}/temp"), format!("m{i}")))
        .collect();
    assert_eq!(receive(&mut sub_b, 10, probe).await, want);
    assert_eq!(receive(&mut sub_a, 10, probe).await, want);
    nothing_more(&mut sub_b, probe).await;
    nothing_more(&mut sub_a, probe).await;

    // Node B received the second copies through its other subscription and dropped them.
    let dups = b
        .metric("gateway_fleet_messages_dropped_total{reason=\"duplicate\"}")
        .await;
    assert!(dups >= 10.0, "duplicates dropped on node B: {dups}");
    assert!(in_total(b).await >= 10.0);
    assert!(
        a.metric("gateway_fleet_messages_total{direction=\"out\"}")
            .await
            >= 10.0
    );
    // Node C holds no subscription: NATS sent it nothing.
    assert_eq!(in_total(c).await, 0.0);
    assert_eq!(c.metric("gateway_fleet_route_subscriptions").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_push_on_one_node_reaches_a_subscriber_on_another() {
    let (_nats, gw) = fleet("route-push", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = client(a, "pub-a").await;
    let mut sub_b = client(b, "sub-b").await;
    sub_b.subscribe("cmd/#", QoS::AtLeastOnce).await;
    let probe = "cmd/probe";
    until_routed(&publisher, &mut sub_b, probe).await;

    let body = json!({"topic": "cmd/all", "payload": "reboot", "qos": 1});
    let (code, v) = post_json(a.http, "/v1/push", &body).await;
    assert_eq!(code, 200, "{v}");
    let got = receive(&mut sub_b, 1, probe).await;
    assert_eq!(got, [("cmd/all".to_string(), "reboot".to_string())]);
    nothing_more(&mut sub_b, probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_of_one_publisher_keep_their_order_on_another_node() {
    let (_nats, gw) = fleet("route-order", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = client(a, "pub-a").await;
    let mut sub_b = client(b, "sub-b").await;
    // Two overlapping filters: two NATS subscriptions that both carry every message.
    sub_b.subscribe("order/#", QoS::AtLeastOnce).await;
    sub_b.subscribe("order/+", QoS::AtLeastOnce).await;
    // A second subscriber on another topic of the same publisher, on another filter.
    let probe = "order/probe";
    until_routed(&publisher, &mut sub_b, probe).await;

    for i in 0..200 {
        let topic = if i % 3 == 0 { "order/x" } else { "order/y" };
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let got: Vec<String> = receive(&mut sub_b, 200, probe)
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    nothing_more(&mut sub_b, probe).await;
}

/// A SUBACK on one node means the other nodes reach the subscriber: a message published
/// on node A right after a device on node B read the SUBACK of a filter new to B
/// arrives, every time (without the SUBACK waiting for NATS to hold the subscription,
/// about 6% were lost: `loadgen/scripts/fleet_suback_race.sh`). Each round is a new device and a new filter, so
/// each SUBSCRIBE gives node B a filter NATS has not seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_elsewhere_right_after_the_suback_arrives() {
    use common::Raw;
    let (_nats, gw) = fleet("route-suback", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    // While a routing connection is still coming up a SUBACK does not wait (nothing
    // could be promised then): start once both are up.
    for node in [a, b] {
        let connected = "gateway_fleet_route_connected";
        common::wait_metric(node.http, connected, DEADLINE, |v| v == 1.0).await;
    }
    let (mut publisher, _) = Raw::connected_v4(a.mqtt, "suback-pub", true).await;
    for round in 0..150 {
        let (mut sub, _) = Raw::connected_v4(b.mqtt, &format!("suback-{round}"), true).await;
        let topic = format!("suback/{round}");
        sub.send(&Raw::subscribe_v4(&topic, 0, 1)).await;
        assert!(matches!(
            sub.next_v4(DEADLINE).await,
            Ok(mqttbytes::v4::Packet::SubAck(_))
        ));
        publisher
            .send(&Raw::publish_v4(&topic, 0, 0, b"right after"))
            .await;
        match sub.next_v4(DEADLINE).await {
            Ok(mqttbytes::v4::Packet::Publish(p)) => assert_eq!(p.topic, topic),
            other => panic!("round {round}: {other:?} instead of the message"),
        }
    }
}

/// A SUBACK whose subscription NATS does not confirm (the node's path to NATS hangs)
/// goes after `request_timeout_ms`, counted, well before the hung connection is given
/// up; a SUBSCRIBE to the same filter right after is answered at once, not held behind
/// the ticket already let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suback_nats_does_not_confirm_goes_after_the_request_timeout() {
    use common::pausable::PausableProxy;
    use common::Raw;
    use mqttbytes::v4::Packet;
    let (_nats, proxy) = PausableProxy::nats("route-suback-hang").await;
    let b = GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"node-b\"\nnats_url = \"{}\"\nrequest_timeout_ms = 1500\n[store]\nenabled = false\n",
        proxy.url()
    ));
    let connected = "gateway_fleet_route_connected";
    common::wait_metric(b.http, connected, DEADLINE, |v| v == 1.0).await;
    let (mut sub, _) = Raw::connected_v4(b.mqtt, "hang-sub", true).await;
    // Confirmed while NATS answers.
    sub.send(&Raw::subscribe_v4("hang/a", 0, 1)).await;
    assert!(matches!(sub.next_v4(DEADLINE).await, Ok(Packet::SubAck(_))));

    proxy.pause();
    sub.send(&Raw::subscribe_v4("hang/b", 0, 2)).await;
    assert!(matches!(sub.next_v4(DEADLINE).await, Ok(Packet::SubAck(_))));
    let waited = "gateway_fleet_subacks_waited_out_total";
    assert_eq!(b.metric(waited).await, 1.0);
    sub.send(&Raw::subscribe_v4("hang/b", 0, 3)).await;
    assert!(matches!(sub.next_v4(DEADLINE).await, Ok(Packet::SubAck(_))));
    // Both came while the routing connection was still up (it is given up after three
    // silent intervals, 4.5 s here): the timeout let them go, not the connection's end.
    assert_eq!(b.metric(connected).await, 1.0);
    proxy.resume();
}

/// Waits until `gw` holds `n` NATS subscriptions for its filters.
async fn subscriptions_become(gw: &GatewayProcess, n: f64) {
    let sample = "gateway_fleet_route_subscriptions";
    let end = tokio::time::Instant::now() + DEADLINE;
    while gw.metric(sample).await != n {
        assert!(
            tokio::time::Instant::now() < end,
            "{sample} never became {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_ends_the_nodes_interest() {
    let (_nats, gw) = fleet("route-unsub", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = client(a, "pub-a").await;
    let mut sub_b = client(b, "sub-b").await;
    sub_b.subscribe("gone/+", QoS::AtLeastOnce).await;
    sub_b.subscribe("kept/+", QoS::AtLeastOnce).await;
    until_routed(&publisher, &mut sub_b, "gone/probe").await;
    subscriptions_become(b, 2.0).await;

    sub_b.client.unsubscribe("gone/+").await.unwrap();
    subscriptions_become(b, 1.0).await;
    while sub_b
        .next_publish(Duration::from_millis(200))
        .await
        .is_some()
    {}
    let before = in_total(b).await;
    for i in 0..20 {
        publisher
            .client
            .publish(format!("gone/{i}"), QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
    }
    // The publisher's later messages come after: once a probe arrived, the others
    // would have too.
    let probes = until_routed(&publisher, &mut sub_b, "kept/probe").await;
    let arrived = in_total(b).await - before;
    assert!(
        arrived <= f64::from(probes),
        "node B still received messages it has no subscriber for: {arrived} in, {probes} probes"
    );
}

/// The payload of `gw`'s retained message for `topic`, as its API lists it.
async fn retained_on(gw: &GatewayProcess, topic: &str) -> Option<String> {
    let (code, body) = http_get(gw.http, "/v1/retained?limit=1000").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["retained"]
        .as_array()?
        .iter()
        .find(|m| m["topic"] == topic)
        .and_then(|m| m["payload"].as_str().map(str::to_string))
}

/// Waits until `gw` holds `want` as the retained message of `topic`.
async fn wait_retained(gw: &GatewayProcess, topic: &str, want: Option<&str>) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = retained_on(gw, topic).await;
        if got.as_deref() == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "retained {topic}: {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_and_its_clear_reach_every_node() {
    let (nats, mut gw) = fleet("route-retained", &["node-a", "node-b"]).await;
    let publisher = client(&gw[0], "pub-a").await;
    publisher
        .client
        .publish("status/lamp", QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    wait_retained(&gw[1], "status/lamp", Some("on")).await;
    // A later subscriber on node B gets it, flagged retained.
    let mut sub_b = client(&gw[1], "sub-b").await;
    sub_b.subscribe("status/#", QoS::AtLeastOnce).await;
    let p = sub_b
        .next_publish(DEADLINE)
        .await
        .expect("the retained message");
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.retain),
        ("status/lamp", &b"on"[..], true)
    );

    // A node that joins later has it too.
    gw.push(node(&nats, "node-c"));
    wait_retained(&gw[2], "status/lamp", Some("on")).await;

    // A clear on node A clears it everywhere.
    publisher
        .client
        .publish("status/lamp", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    for g in &gw {
        wait_retained(g, "status/lamp", None).await;
    }
    let mut late = client(&gw[2], "late-c").await;
    late.subscribe("status/#", QoS::AtLeastOnce).await;
    assert!(late
        .next_publish(Duration::from_millis(500))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_retained_message_through_the_api_deletes_it_on_every_node() {
    let (_nats, gw) = fleet("route-retained-delete", &["node-a", "node-b"]).await;
    let publisher = client(&gw[0], "pub-a").await;
    publisher
        .client
        .publish("cfg/mode", QoS::AtLeastOnce, true, "eco")
        .await
        .unwrap();
    wait_retained(&gw[1], "cfg/mode", Some("eco")).await;
    let url = format!("http://{}/v1/retained?topic=cfg/mode", gw[0].http);
    let resp = reqwest::Client::new().delete(url).send().await.unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
    for g in &gw {
        wait_retained(g, "cfg/mode", None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retained_updates_on_two_nodes_end_with_one_value_everywhere() {
    let (_nats, gw) = fleet("route-retained-race", &["node-a", "node-b"]).await;
    let pub_a = client(&gw[0], "pub-a").await;
    let pub_b = client(&gw[1], "pub-b").await;
    for i in 0..50 {
        for (p, n) in [(&pub_a, "a"), (&pub_b, "b")] {
            p.client
                .publish("race/t", QoS::AtMostOnce, true, format!("{n}{i}"))
                .await
                .unwrap();
        }
    }
    // Both nodes settle on the same last value.
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (a, b) = (
            retained_on(&gw[0], "race/t").await,
            retained_on(&gw[1], "race/t").await,
        );
        if a.is_some() && a == b && a.as_deref().is_some_and(|v| v.ends_with("49")) {
            // Still the same a moment later: settled.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = (
                retained_on(&gw[0], "race/t").await,
                retained_on(&gw[1], "race/t").await,
            );
            if again == (a.clone(), b.clone()) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "retained race/t: {a:?} on A, {b:?} on B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_with_members_on_two_nodes_gets_each_message_once() {
    let (_nats, gw) = fleet("route-share", &["node-a", "node-b", "node-c"]).await;
    let (a, b, c) = (&gw[0], &gw[1], &gw[2]);
    // One member on the publisher's node, one on another; the publisher is on node A.
    let publisher = client(a, "pub-a").await;
    let mut members = [client(a, "member-a").await, client(b, "member-b").await];
    for m in &mut members {
        m.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await;
    }
    // Probes until each member got one: both nodes' queue subscriptions are in place.
    let probe = "jobs/probe";
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut probed = [false, false];
    while probed != [true, true] {
        assert!(
            tokio::time::Instant::now() < end,
            "probes reached {probed:?}"
        );
        publisher
            .client
            .publish(probe, QoS::AtMostOnce, false, "probe")
            .await
            .unwrap();
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(p) = m.next_publish(Duration::from_millis(100)).await {
                probed[i] |= p.topic == probe;
            }
        }
    }

    let n = 40;
    publish_jobs(&publisher, n).await;
    // Each message reaches exactly one member, fleet-wide.
    let mut got: Vec<Vec<u32>> = vec![Vec::new(), Vec::new()];
    let end = tokio::time::Instant::now() + DEADLINE;
    while got.iter().map(Vec::len).sum::<usize>() < n as usize {
        assert!(tokio::time::Instant::now() < end, "received {got:?}");
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(p) = m.next_publish(Duration::from_millis(100)).await {
                if p.topic != probe {
                    got[i].push(String::from_utf8_lossy(&p.payload).parse().unwrap());
                }
            }
        }
    }
    for (i, m) in members.iter_mut().enumerate() {
        while let Some(p) = m.next_publish(Duration::from_millis(500)).await {
            assert_eq!(p.topic, probe, "member {i} got one more: {p:?}");
        }
    }
    let mut all: Vec<u32> = got.concat();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "received {got:?}");
    assert!(
        got.iter().all(|g| !g.is_empty()),
        "one member got nothing: {got:?}"
    );
    assert_eq!(in_total(c).await, 0.0);
}

/// NATS picks uniformly among a queue group's subscriptions and a node holds one per
/// member it has: a node with one member of a group gets about a quarter of its messages
/// when another node has three (half, when NATS picked among nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_a_groups_messages_by_their_members() {
    let (_nats, gw) = fleet("route-share-weight", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = client(a, "pub-a").await;
    let mut members = vec![client(a, "member-a").await];
    for i in 0..3 {
        members.push(client(b, &format!("member-b{i}")).await);
    }
    for m in &mut members {
        m.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await;
    }
    // One queue subscription per member (the filter is one subject).
    let held = "gateway_fleet_route_subscriptions";
    assert_eq!(
        common::wait_metric(a.http, held, DEADLINE, |v| v == 1.0).await,
        1.0
    );
    assert_eq!(
        common::wait_metric(b.http, held, DEADLINE, |v| v == 3.0).await,
        3.0
    );
    // Probes until node A's member got one: its subscription is in place at NATS. Node
    // B's were written before the wait above ended; the wide bound below absorbs any lag.
    let probe = "jobs/probe";
    let end = tokio::time::Instant::now() + DEADLINE;
    'probing: loop {
        assert!(tokio::time::Instant::now() < end, "no probe reached node A");
        publisher
            .client
            .publish(probe, QoS::AtMostOnce, false, "probe")
            .await
            .unwrap();
        while let Some(p) = members[0].next_publish(Duration::from_millis(100)).await {
            if p.topic == probe {
                break 'probing;
            }
        }
    }

    let n = 400;
    publish_jobs(&publisher, n as u32).await;
    let mut got = vec![0usize; members.len()];
    let end = tokio::time::Instant::now() + DEADLINE;
    while got.iter().sum::<usize>() < n {
        assert!(tokio::time::Instant::now() < end, "received {got:?} of {n}");
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(p) = m.next_publish(Duration::from_millis(50)).await {
                got[i] += usize::from(p.topic != probe);
            }
        }
    }
    assert_eq!(got.iter().sum::<usize>(), n, "received {got:?}");
    // Node A's share: 100 expected (a binomial of 400 at 1/4, standard deviation 8.7);
    // picking among nodes would give 200.
    assert!((50..=150).contains(&got[0]), "node A's member got {got:?}");
    assert!(
        got[1..].iter().all(|&g| g > 0),
        "a member on B got nothing: {got:?}"
    );

    // A member on B leaves while jobs stream in: whatever NATS had already given its
    // queue subscription still reaches the group, through another member.
    let jobs = publisher.client.clone();
    let stream = tokio::spawn(async move {
        for i in n..2 * n {
            let (topic, payload) = (format!("jobs/{i}"), format!("{i}"));
            jobs.publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    members[3]
        .client
        .unsubscribe("$share/workers/jobs/+")
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    while seen.len() < n {
        assert!(
            tokio::time::Instant::now() < end,
            "{} of jobs {n}..{} arrived",
            seen.len(),
            2 * n
        );
        for m in &mut members {
            while let Some(p) = m.next_publish(Duration::from_millis(50)).await {
                let job: usize = String::from_utf8_lossy(&p.payload).parse().unwrap_or(0);
                if job >= n {
                    seen.insert(job);
                }
            }
        }
    }
    stream.await.unwrap();
    assert_eq!(
        common::wait_metric(b.http, held, DEADLINE, |v| v == 2.0).await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_comes_back_with_its_subscriptions_after_nats_restarts() {
    let (mut nats, gw) = fleet("route-restart", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = client(a, "pub-a").await;
    let mut sub_b = client(b, "sub-b").await;
    sub_b.subscribe("alarm/+", QoS::AtLeastOnce).await;
    until_routed(&publisher, &mut sub_b, "alarm/before").await;

    nats.kill();
    let end = tokio::time::Instant::now() + DEADLINE;
    while b.metric("gateway_fleet_route_connected").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "the routing never saw NATS go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nats.respawn();
    // Node B subscribes again on its own: messages from A reach its subscriber again.
    until_routed(&publisher, &mut sub_b, "alarm/after").await;
    assert_eq!(b.metric("gateway_fleet_route_connected").await, 1.0);
    assert_eq!(b.metric("gateway_fleet_route_subscriptions").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_routing_queue_drops_for_other_nodes_only_and_counts() {
    let nats = NatsServer::start("route-full");
    drop(nats.client().await);
    let mut nats = nats;
    let a = node_with(&nats, "node-a", "routing_queue_capacity = 1");
    let publisher = client(&a, "pub-a").await;
    let mut local = client(&a, "sub-a").await;
    local.subscribe("full/+", QoS::AtLeastOnce).await;
    nats.kill();
    let end = tokio::time::Instant::now() + DEADLINE;
    while a.metric("gateway_fleet_route_connected").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "the routing never saw NATS go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..20 {
        publisher
            .client
            .publish(format!("full/{i}"), QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
    }
    // The local subscriber gets every one; one waits for NATS, the others are counted.
    assert_eq!(receive(&mut local, 20, "").await.len(), 20);
    let sample = "gateway_fleet_messages_dropped_total{reason=\"queue_full\"}";
    let end = tokio::time::Instant::now() + DEADLINE;
    while a.metric(sample).await < 19.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "{sample}: {}",
            a.metric(sample).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.metric(sample).await, 19.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_and_the_expiry_travel_to_another_node() {
    use common::v5;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let (_nats, gw) = fleet("route-props", &["node-a", "node-b"]).await;
    let (a, b) = (&gw[0], &gw[1]);
    let publisher = v5::connect(v5::options(a.mqtt, "pub-a")).await;
    let mut sub = v5::connect(v5::options(b.mqtt, "sub-b")).await;
    sub.subscribe("props/#", v5::QoS::AtLeastOnce).await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: None,
        response_topic: Some("props/reply/ü".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    };
    // Probes until node B's subscription is in NATS; then the message with properties.
    let end = tokio::time::Instant::now() + DEADLINE;
    let got = loop {
        assert!(tokio::time::Instant::now() < end, "nothing reached node B");
        publisher
            .client
            .publish_with_properties("props/t", v5::QoS::AtLeastOnce, false, "{}", sent.clone())
            .await
            .unwrap();
        if let Some(p) = sub.next_publish(Duration::from_millis(300)).await {
            break p;
        }
    };
    let props = got.properties.expect("properties");
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(props.response_topic, sent.response_topic);
    assert_eq!(props.correlation_data, sent.correlation_data);
    assert_eq!(props.user_properties, sent.user_properties);
    assert_eq!(props.content_type, sent.content_type);
    // What is left of the expiry: never more than it was sent with.
    let left = props.message_expiry_interval.expect("expiry");
    assert!((3500..=3600).contains(&left), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogged_routing_queue_paces_the_publisher_instead_of_dropping() {
    let nats = NatsServer::start("route-pace");
    drop(nats.client().await);
    // A small queue and no inbound rate limit: a burst fills the queue at once unless
    // the publisher waits for it.
    let a = node_with(
        &nats,
        "node-a",
        "routing_queue_capacity = 4\n[limits]\npublish_rate = 0",
    );
    let b = node(&nats, "node-b");
    let publisher = client(&a, "pub-a").await;
    let mut sub_b = client(&b, "sub-b").await;
    sub_b.subscribe("burst/+", QoS::AtMostOnce).await;
    until_routed(&publisher, &mut sub_b, "burst/probe").await;

    let n = 2000;
    for i in 0..n {
        publisher
            .client
            .publish("burst/x", QoS::AtMostOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let got: Vec<String> = receive(&mut sub_b, n, "burst/probe")
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    let sample = "gateway_fleet_messages_dropped_total{reason=\"queue_full\"}";
    assert_eq!(a.metric(sample).await, 0.0);
}
