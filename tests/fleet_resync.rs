//! The re-sync of persistent sessions after a NATS outage (issue 20): what a node changed
//! while it was cut off from NATS (a subscription added, one removed, messages queued)
//! reaches JetStream once NATS is back, so a later `kill -9` of the node loses none of
//! it. Real gateway processes, one real `nats-server -js` killed and started again.

mod common;

use std::time::Duration;

use common::fleet::{
    disconnect, in_fleet, kill_9, persistent as device, registry, session_node, sessions_on,
    wait_holder, wait_ready_nats_down, DEADLINE,
};
use common::nats::NatsServer;
use common::{v4, GatewayProcess};

/// Waits until `gw` has written every kept change and at least one.
async fn wait_resynced(gw: &GatewayProcess) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let pending = gw.metric("gateway_fleet_session_resync_pending").await;
        let written = gw
            .metric("gateway_fleet_session_resync_written_total")
            .await;
        if pending == 0.0 && written > 0.0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no re-sync: {pending} pending, {written} written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes one message to each of `topics` (its payload the topic) through
/// `publisher`, in order: the payload of the first that `dev` receives.
async fn first_of(publisher: &v4::Client, dev: &mut v4::Client, topics: &[&str]) -> String {
    for topic in topics {
        let sent = (publisher.client).publish(*topic, v4::QoS::AtLeastOnce, false, *topic);
        sent.await.expect("publish");
    }
    let p = dev.next_publish(DEADLINE).await.expect("a live message");
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_nats_was_away_survive_a_later_kill_9() {
    let mut nats = NatsServer::start("resync");
    drop(nats.client().await);
    let mut gw = [session_node(&nats, "node-a"), session_node(&nats, "node-b")];
    let reg = registry(&nats).await;
    let (mut dev, _) = device(&gw[0], "rs-dev").await;
    dev.subscribe("old/rs", v4::QoS::AtLeastOnce).await;
    disconnect(dev).await;
    wait_holder(&reg, "rs-dev", Some("node-a")).await;

    nats.kill();
    wait_ready_nats_down(&gw[0], true).await;
    // While node A is cut off: the device comes back there, drops its subscription,
    // takes a new one and leaves; then messages are queued for it.
    let (mut dev, present) = device(&gw[0], "rs-dev").await;
    assert!(present);
    dev.client.unsubscribe("old/rs").await.expect("unsubscribe");
    let unsubscribed = dev.wait_for(DEADLINE, |p| matches!(p, v4::Packet::UnsubAck(_)));
    assert!(unsubscribed.await, "no UNSUBACK");
    dev.subscribe("new/rs", v4::QoS::AtLeastOnce).await;
    disconnect(dev).await;
    let mut publisher = v4::connect(v4::options(gw[0].mqtt, "rs-pub")).await;
    for i in 0..5 {
        let sent = publisher
            .client
            .publish("new/rs", v4::QoS::AtLeastOnce, false, format!("m{i}"));
        sent.await.expect("publish");
    }
    // Each message is stored on node A once its PUBACK came.
    for i in 0..5 {
        let acked = publisher.wait_for(DEADLINE, |p| matches!(p, v4::Packet::PubAck(_)));
        assert!(acked.await, "no PUBACK for m{i}");
    }

    nats.respawn();
    wait_ready_nats_down(&gw[0], false).await;
    wait_resynced(&gw[0]).await;
    kill_9(&mut gw[0]);

    // On node B: the session as it was after the outage.
    let (mut dev, present) = device(&gw[1], "rs-dev").await;
    assert!(present, "no session present on node B");
    for i in 0..5 {
        let p = dev
            .next_publish(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("m{i}, queued during the outage, never came"));
        assert_eq!(p.payload, format!("m{i}").as_bytes());
    }
    let b = v4::connect(v4::options(gw[1].mqtt, "rs-pub-b")).await;
    assert_eq!(
        first_of(&b, &mut dev, &["old/rs", "new/rs"]).await,
        "new/rs",
        "the subscription removed during the outage came back, or the new one is missing"
    );
}

/// Connects persistent device `id` to `gw` again and again until the node takes it
/// (a node refuses a resume as unavailable while the session's holder does not answer):
/// the client, with the session present.
async fn resume_when_taken(gw: &GatewayProcess, id: &str) -> v4::Client {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut o = v4::options(gw.mqtt, id);
        o.set_clean_session(false);
        let mut c = v4::connect_raw(o);
        match tokio::time::timeout_at(end, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Packet::ConnAck(a))))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "{id}");
                assert!(a.session_present, "{id}: no session present");
                return c;
            }
            Ok(Some(Err(_))) => c.task.abort(),
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
        assert!(tokio::time::Instant::now() < end, "{id} never resumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node cut off from NATS whose device, meanwhile, resumed its session on another node
/// (after the sweep took it in there): the cut-off node's copy is stale, and its re-sync
/// once NATS is back must not write its record over the live node's. Node A reaches NATS
/// through a proxy that hangs; the device takes `cut/…` on A while A is cut off, then
/// `live/…` on node B; once A has re-synced, B is killed and the device resumes on node C
/// from what the fleet kept: B's subscriptions, not A's. Here the outage lasts until
/// node A's registry writes of the device fail: it does not claim the client id back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_nodes_resync_leaves_a_session_resumed_elsewhere_alone() {
    moved_during_outage("resync-moved", true).await;
}

/// The same with an outage shorter than a JetStream request's timeout: node A's registry
/// write of the device's `connected` waits and is applied once NATS answers, after node
/// B's claim. It must not take the client id back (which would end B's newer copy and
/// hand A's stale one on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_connected_of_a_stale_copy_does_not_take_a_resumed_session_back() {
    moved_during_outage("resync-late", false).await;
}

async fn moved_during_outage(tag: &str, until_registry_writes_fail: bool) {
    use common::fleet::LEASE_SECS;
    use common::pausable::PausableProxy;
    let (nats, proxy) = PausableProxy::nats(tag).await;
    let a = GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"node-a\"\nnats_url = \"{}\"\nlease_secs = {LEASE_SECS}\nrequest_timeout_ms = 1000\n",
        proxy.url()
    ));
    let mut b = session_node(&nats, "node-b");
    let c = session_node(&nats, "node-c");
    let reg = registry(&nats).await;
    let (mut dev, _) = device(&a, "rs-moved").await;
    dev.subscribe("old/rs-moved", v4::QoS::AtLeastOnce).await;
    disconnect(dev).await;
    wait_holder(&reg, "rs-moved", Some("node-a")).await;
    let end = tokio::time::Instant::now() + DEADLINE;
    while !in_fleet(&nats, "rs-moved").await {
        assert!(
            tokio::time::Instant::now() < end,
            "rs-moved never in the fleet"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.pause();
    wait_ready_nats_down(&a, true).await;
    // On node A, cut off: the device is back, takes a subscription and leaves.
    let (mut dev, present) = device(&a, "rs-moved").await;
    assert!(present);
    dev.subscribe("cut/rs-moved", v4::QoS::AtLeastOnce).await;
    disconnect(dev).await;
    // Its registry writes fail (they wait for NATS no longer than a JetStream request's
    // timeout): node A does not claim the client id back once NATS is back.
    let rejected = "gateway_events_dropped_total{sink=\"registry\",reason=\"rejected\"}";
    if until_registry_writes_fail {
        let failed = common::wait_metric(a.http, rejected, DEADLINE, |v| v >= 1.0).await;
        assert!(
            failed >= 1.0,
            "node A's registry writes did not fail: {failed}"
        );
    }
    // Then on node B (once A's lease expired and its sessions were taken in), more than
    // `cluster.clock_skew_ms` (1 s) later, as a device that moves between nodes is.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut dev = resume_when_taken(&b, "rs-moved").await;
    dev.subscribe("live/rs-moved", v4::QoS::AtLeastOnce).await;
    disconnect(dev).await;
    wait_holder(&reg, "rs-moved", Some("node-b")).await;

    proxy.resume();
    wait_ready_nats_down(&a, false).await;
    if !until_registry_writes_fail {
        // Node A applies the device's `connected` and `disconnected` of the outage now
        // (the two before it were applied then).
        let sent = "gateway_events_sent_total{sink=\"registry\"}";
        let applied = common::wait_metric(a.http, sent, DEADLINE, |v| v >= 4.0).await;
        assert!(applied >= 4.0, "node A applied {applied} registry changes");
        let holder = common::fleet::holder(&reg, "rs-moved").await;
        assert_eq!(holder.as_deref(), Some("node-b"), "node A took it back");
        assert_eq!(a.metric(rejected).await, 0.0, "the outage was too long");
    }
    wait_resynced(&a).await;
    let skipped = a.metric("gateway_fleet_session_resync_skipped_total").await;
    assert!(skipped >= 1.0, "node A's stale record was not skipped");
    // Node A's copy ended (the device it served has nothing left there to resume).
    let end = tokio::time::Instant::now() + DEADLINE;
    while sessions_on(&a).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "node A kept its stale copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_9(&mut b);

    let mut dev = resume_when_taken(&c, "rs-moved").await;
    let publisher = v4::connect(v4::options(c.mqtt, "rs-moved-pub")).await;
    assert_eq!(
        first_of(&publisher, &mut dev, &["cut/rs-moved", "live/rs-moved"]).await,
        "live/rs-moved",
        "the fleet kept node A's stale subscriptions instead of node B's"
    );
    assert!(
        dev.next_publish(Duration::from_millis(500)).await.is_none(),
        "the subscription made on the cut-off node came back"
    );
}
