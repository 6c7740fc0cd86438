//! The re-sync of persistent sessions after a NATS outage (issue 20): what a node changed
//! while it was cut off from NATS (a subscription added, one removed, messages queued)
//! reaches JetStream once NATS is back, so a later `kill -9` of the node loses none of
//! it. Real gateway processes, one real `nats-server -js` killed and started again.

mod common;

use std::time::Duration;

use common::fleet::{
    disconnect, kill_9, persistent as device, registry, session_node, wait_holder,
    wait_ready_nats_down, DEADLINE,
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
    for topic in ["old/rs", "new/rs"] {
        let sent = b
            .client
            .publish(topic, v4::QoS::AtLeastOnce, false, topic.to_string());
        sent.await.expect("publish");
    }
    let p = dev.next_publish(DEADLINE).await.expect("a live message");
    assert_eq!(
        p.payload,
        "new/rs".as_bytes(),
        "the subscription removed during the outage came back, or the new one is missing"
    );
}
