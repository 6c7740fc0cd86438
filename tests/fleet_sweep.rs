//! Sweeping a dead node's registry entries (`src/cluster/sweep.rs`), with real gateway
//! processes on a real `nats-server` with JetStream: a node killed with SIGKILL leaves its
//! entries behind; once its lease expired a surviving node deletes them (by revision, in
//! bounded steps), and a device that reconnected to another node meanwhile keeps its
//! entry.

mod common;

use std::time::Duration;

use common::fleet::{holder, wait_holder, DEADLINE};
use common::v4;

/// Devices on the node that is killed.
const N: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_entries_are_swept_and_a_device_back_elsewhere_keeps_its_own() {
    // 50 entries read a second: steps of 5, so the sweep takes several steps.
    let extra = "registry_sweep_rate = 50\n";
    let (_nats, mut gw, kv) =
        common::fleet::start("fleet-sweep", &["node-a", "node-b"], extra).await;
    let mut devices = Vec::new();
    for i in 0..N {
        devices.push(v4::connect(v4::options(gw[1].mqtt, &format!("sw-{i}"))).await);
    }
    let back = v4::connect(v4::options(gw[1].mqtt, "sw-back")).await;
    for i in 0..N {
        wait_holder(&kv, &format!("sw-{i}"), Some("node-b")).await;
    }
    wait_holder(&kv, "sw-back", Some("node-b")).await;

    // SIGKILL: no goodbye to NATS, every entry stays behind.
    let _ = gw[1].child.kill();
    let _ = gw[1].child.wait();
    drop((devices, back));
    // One device comes back on node A before the lease of B expires.
    let _back = v4::connect(v4::options(gw[0].mqtt, "sw-back")).await;
    wait_holder(&kv, "sw-back", Some("node-a")).await;

    // Lease (3 s) + noticing (every second) + the sweep (31 entries at 50 a second).
    for i in 0..N {
        wait_holder(&kv, &format!("sw-{i}"), None).await;
    }
    let a = &gw[0];
    let swept = "gateway_fleet_registry_swept_total";
    let end = tokio::time::Instant::now() + DEADLINE;
    while a.metric(swept).await < N as f64 {
        assert!(
            tokio::time::Instant::now() < end,
            "swept {}",
            a.metric(swept).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.metric(swept).await, N as f64, "only node B's entries");
    assert_eq!(holder(&kv, "sw-back").await.as_deref(), Some("node-a"));
    // The marker is given back when the sweep is done.
    let js = async_nats::jetstream::new(_nats.client().await);
    let leases = js.get_key_value("gateway_registry_nodes").await.unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    while leases.get("sweep.marker").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < end, "the sweep marker stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
