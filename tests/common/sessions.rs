//! The fleet's persistent sessions in tests (`tests/fleet_sessions.rs`,
//! `tests/fleet_take_in.rs`): gateway processes with their own stores on one
//! `nats-server -js`, persistent devices with queued messages, and checks on what they
//! receive.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde_json::{json, Value};

use super::fleet::{disconnect, persistent as connect};
use super::nats::NatsServer;
use super::v4;
use super::{post_json, GatewayProcess};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// A gateway process in the fleet as `node`, with its own store.
pub fn node(nats: &NatsServer, node: &str) -> GatewayProcess {
    super::fleet::session_node(nats, node)
}

/// Node `node` with its store in `dir`, which outlives the process (a restart keeps it).
pub fn node_with_store(nats: &NatsServer, node: &str, dir: &super::tempdir::Dir) -> GatewayProcess {
    GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"{}\"\nlease_secs = 3\n[store]\npath = \"{}\"\n",
        nats.url(),
        dir.0.display()
    ))
}

/// A `nats-server` and gateway processes named `nodes` on it, and the registry bucket.
pub async fn fleet(tag: &str, nodes: &[&str]) -> (NatsServer, Vec<GatewayProcess>, kv::Store) {
    let nats = NatsServer::start(tag);
    let js = async_nats::jetstream::new(nats.client().await);
    let gateways = nodes.iter().map(|n| node(&nats, n)).collect();
    let kv = js
        .get_key_value("gateway_registry")
        .await
        .expect("registry");
    (nats, gateways, kv)
}

/// Waits until the registry names `node` for `client_id`.
pub async fn wait_registry(kv: &kv::Store, client_id: &str, node: &str) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = kv.get(client_id).await.expect("registry get");
        if v.as_deref() == Some(node.as_bytes()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{client_id} never on {node}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` persistent devices `<tag>-<i>` on `gw`, each subscribed to `t/<id>` at QoS 1, then
/// offline, once the registry names `holder` for each.
pub async fn offline_devices(
    gw: &GatewayProcess,
    kv: &kv::Store,
    tag: &str,
    n: usize,
    holder: &str,
) {
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let (mut c, _) = connect(gw, &id).await;
        c.subscribe(&format!("t/{id}"), v4::QoS::AtLeastOnce).await;
        disconnect(c).await;
    }
    for i in 0..n {
        wait_registry(kv, &format!("{tag}-{i}"), holder).await;
    }
}

/// Pushes `per` QoS 1 messages `m0`.. to each of devices `<tag>-0..n` through `via`, in
/// batches; every one must be answered `queued`.
pub async fn push_queued(via: &GatewayProcess, tag: &str, n: usize, per: usize) {
    let items: Vec<Value> = (0..per)
        .flat_map(|m| {
            (0..n).map(move |i| {
                json!({"client_id": format!("{tag}-{i}"), "topic": format!("t/{tag}-{i}"),
                       "payload": format!("m{m}"), "qos": 1})
            })
        })
        .collect();
    for chunk in items.chunks(500) {
        let (code, v) = post_json(via.http, "/v1/push/batch", &json!({"messages": chunk})).await;
        assert_eq!(code, 200, "{v}");
        for r in v["results"].as_array().expect("results") {
            assert_eq!(r["status"], "queued", "{r}");
        }
    }
}

/// Receives `per` messages on `c` and checks they are `m0`.. in order (a redelivery of
/// the one before, with DUP, is QoS 1's right; nothing else is).
pub async fn expect_in_order(c: &mut v4::Client, id: &str, per: usize) {
    let mut next = 0;
    while next < per {
        let p = c
            .next_publish(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("{id}: message m{next} never came"));
        let got = String::from_utf8_lossy(&p.payload).into_owned();
        if p.dup && next > 0 && got == format!("m{}", next - 1) {
            continue;
        }
        assert_eq!(got, format!("m{next}"), "{id}: out of order");
        next += 1;
    }
}
