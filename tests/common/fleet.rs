//! A fleet for the tests that need several gateway processes on one real `nats-server`
//! with JetStream (tests/fleet_arbitration.rs, tests/fleet_haproxy.rs): starting the
//! nodes, the registry bucket, and waiting for what the registry and the nodes' registry
//! writers say.

use std::time::Duration;

use async_nats::jetstream::kv;

use super::nats::NatsServer;
use super::{v4, GatewayProcess};

pub const DEADLINE: Duration = Duration::from_secs(30);
/// Short, so a killed node's lease expires quickly in the tests.
pub const LEASE_SECS: u32 = 3;

/// The `[cluster]` section of node `node` on `nats`, with `extra` keys.
pub fn cluster_toml(nats: &NatsServer, node: &str, extra: &str) -> String {
    format!(
        "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"{}\"\nlease_secs = {LEASE_SECS}\n{extra}\n[store]\nenabled = false\n",
        nats.url()
    )
}

/// A `nats-server` and gateway processes named `nodes` on it (each with the `[cluster]`
/// keys `extra`), and the registry bucket.
pub async fn start(
    tag: &str,
    nodes: &[&str],
    extra: &str,
) -> (NatsServer, Vec<GatewayProcess>, kv::Store) {
    let nats = NatsServer::start(tag);
    // The gateways do not start without NATS: wait until it accepts connections.
    drop(nats.client().await);
    let gateways = nodes
        .iter()
        .map(|n| GatewayProcess::start(&cluster_toml(&nats, n, extra)))
        .collect();
    let kv = registry(&nats).await;
    (nats, gateways, kv)
}

/// Node `node` on `nats` with the default store on, so that its persistent sessions are
/// mirrored to JetStream (tests/fleet_sessions.rs, tests/fleet_qos2.rs).
pub fn session_node(nats: &NatsServer, node: &str) -> GatewayProcess {
    GatewayProcess::start(&format!(
        "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"{}\"\nlease_secs = {LEASE_SECS}\n",
        nats.url()
    ))
}

pub async fn registry(nats: &NatsServer) -> kv::Store {
    let js = async_nats::jetstream::new(nats.client().await);
    js.get_key_value("gateway_registry")
        .await
        .expect("registry bucket")
}

/// The node the registry names for `client_id`, if any.
pub async fn holder(kv: &kv::Store, client_id: &str) -> Option<String> {
    let v = kv.get(client_id).await.expect("registry get");
    v.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Waits until the registry names `node` for `client_id` (`None`: no entry).
pub async fn wait_holder(kv: &kv::Store, client_id: &str, node: Option<&str>) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = holder(kv, client_id).await;
        if v.as_deref() == node {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "registry entry of {client_id}: {v:?}, expected {node:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of `sample` over `nodes`.
pub async fn total(nodes: &[GatewayProcess], sample: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += n.metric(sample).await;
    }
    sum
}

/// Waits until the registry writers of `nodes` have applied `n` changes together.
pub async fn wait_applied(nodes: &[GatewayProcess], n: usize) {
    let sample = "gateway_events_sent_total{sink=\"registry\"}";
    let end = tokio::time::Instant::now() + DEADLINE;
    while total(nodes, sample).await < n as f64 {
        assert!(
            tokio::time::Instant::now() < end,
            "the registry writers never applied {n} changes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `/readyz` on `gw` answers 200 and its body does (`true`) or does not
/// mention NATS being down.
pub async fn wait_ready_nats_down(gw: &GatewayProcess, down: bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, body) = super::http_get(gw.http, "/readyz").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!((code, v["status"].as_str()), (200, Some("ready")), "{body}");
        if (v["nats"] == "down") == down {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "/readyz: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kill -9` of a gateway process (by its PID).
pub fn kill_9(gw: &mut GatewayProcess) {
    let _ = gw.child.kill();
    let _ = gw.child.wait();
}

/// Connects persistent (clean session 0) device `id` to `gw`: the client and CONNACK's
/// session-present flag.
pub async fn persistent(gw: &GatewayProcess, id: &str) -> (v4::Client, bool) {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(false);
    connack(v4::connect_raw(o), id).await
}

/// Waits for `c`'s successful CONNACK: the client and its session-present flag.
pub async fn connack(mut c: v4::Client, id: &str) -> (v4::Client, bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(end, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Packet::ConnAck(a))))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "{id}");
                return (c, a.session_present);
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }
}

/// A clean DISCONNECT, once the connection is closed.
pub async fn disconnect(mut c: v4::Client) {
    c.client.disconnect().await.expect("disconnect");
    let _ = c.wait_closed(DEADLINE).await;
    c.task.abort();
}

/// Publishes QoS 0 probes to `topic` through `publisher` until `subscriber` receives
/// one: then the subscriber's node holds its NATS subscription for `topic`. Returns the
/// number of probes sent.
pub async fn until_routed(publisher: &v4::Client, subscriber: &mut v4::Client, topic: &str) -> u32 {
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut sent = 0;
    loop {
        publisher
            .client
            .publish(topic, v4::QoS::AtMostOnce, false, "probe")
            .await
            .unwrap();
        sent += 1;
        while let Some(p) = subscriber.next_publish(Duration::from_millis(200)).await {
            if p.topic == topic {
                return sent;
            }
        }
        assert!(tokio::time::Instant::now() < end, "{topic} never routed");
    }
}

/// The sessions `gw` holds (its shards' `gateway_sessions`, summed).
pub async fn sessions_on(gw: &GatewayProcess) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", gw.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    (text.lines())
        .filter(|l| l.starts_with("gateway_sessions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether the fleet keeps a session record for `client_id` (an ended session's is
/// emptied).
pub async fn in_fleet(nats: &NatsServer, client_id: &str) -> bool {
    let js = async_nats::jetstream::new(nats.client().await);
    let kv = js.get_key_value("gateway_sessions").await.expect("bucket");
    let record = kv.get(format!("{client_id}.rec")).await.expect("get");
    record.is_some_and(|r| !r.is_empty())
}
