//! The fleet behind HAProxy (issue 19 point 6): Debian's haproxy (/usr/sbin/haproxy) runs
//! the shipped `config/haproxy.cfg`, its addresses rewritten to free loopback ports, in
//! front of two gateway nodes with the PROXY protocol on. Devices connect through it,
//! the gateways see their own addresses, a device sticks to its node by client id, and
//! when a node is killed its devices come back on the other one through HAProxy.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::fleet::{cluster_toml, wait_holder, DEADLINE};
use common::nats::{free_port, NatsServer};
use common::{connect5, connect_from, http_get, GatewayProcess, Raw};
use serde_json::Value;

const DEVICES: usize = 8;

/// haproxy with the shipped config in front of `nodes` (name, gateway), killed by its PID
/// on drop.
struct HaProxy {
    child: Child,
    addr: SocketAddr,
    _dir: common::tempdir::Dir,
}

impl HaProxy {
    fn start(nodes: &[(&str, &GatewayProcess)]) -> HaProxy {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/haproxy.cfg"))
                .expect("config/haproxy.cfg");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = common::tempdir::Dir::new("haproxy");
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, local_config(&shipped, addr, nodes)).unwrap();
        let check = Command::new("/usr/sbin/haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .expect("haproxy runs (apt install haproxy)");
        assert!(
            check.status.success(),
            "the shipped config does not load: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("/usr/sbin/haproxy")
            .args(["-db", "-q", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        HaProxy {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped config for loopback: the frontend on `addr`, one server line per node
/// (its MQTT address, health checks on its HTTP port), checks every 200 ms, limits
/// a test machine allows.
fn local_config(shipped: &str, addr: SocketAddr, nodes: &[(&str, &GatewayProcess)]) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        let line = match t.split_whitespace().next() {
            Some("server") => continue,
            Some("log") if t.contains("stdout") => continue,
            Some("bind") => format!("    bind {addr}"),
            Some("maxconn") => "    maxconn 1000".to_string(),
            _ => line.replace("inter 2s", "inter 200ms"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    for (name, gw) in nodes {
        out.push_str(&format!(
            "    server {name} {} check port {}\n",
            gw.mqtt,
            gw.http.port()
        ));
    }
    out
}

/// A node with the PROXY protocol on (trusting loopback, where HAProxy connects from).
fn node(nats: &NatsServer, name: &str) -> GatewayProcess {
    let mqtt = "[mqtt]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n";
    GatewayProcess::start(&format!("{mqtt}{}", cluster_toml(nats, name, "")))
}

/// Device `i` (client id `hap-<i>`, from 127.0.0.<2 + i>) connected through HAProxy:
/// `None` when the connection is closed before a successful CONNACK.
async fn try_device(proxy: SocketAddr, i: usize) -> Option<Raw> {
    let stream = connect_from(i, proxy).await.ok()?;
    let mut raw = Raw::from_stream(stream);
    let connect = connect5(&format!("hap-{i}"), 60, true, None);
    raw.send(&common::encode(|b| connect.write(b))).await;
    match raw.next_v5(Duration::from_secs(5)).await {
        Ok(mqttbytes::v5::Packet::ConnAck(a))
            if a.code == mqttbytes::v5::ConnectReturnCode::Success =>
        {
            Some(raw)
        }
        _ => None,
    }
}

/// Device `i` through HAProxy, retried until it is accepted (a node that just died is
/// still tried until HAProxy marks it down).
async fn device(proxy: SocketAddr, i: usize) -> Raw {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(raw) = try_device(proxy, i).await {
            return raw;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "hap-{i} never got through HAProxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /v1/clients/hap-<i>` on `gw`.
async fn client_info(gw: &GatewayProcess, i: usize) -> Value {
    let (code, body) = http_get(gw.http, &format!("/v1/clients/hap-{i}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The registry's node for each device.
async fn holders(kv: &async_nats::jetstream::kv::Store) -> Vec<String> {
    let mut out = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let id = format!("hap-{i}");
        let end = tokio::time::Instant::now() + DEADLINE;
        let node = loop {
            if let Some(n) = common::fleet::holder(kv, &id).await {
                break n;
            }
            assert!(tokio::time::Instant::now() < end, "{id} never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        out.push(node);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reach_the_fleet_through_haproxy_and_move_when_a_node_dies() {
    let nats = NatsServer::start("fleet-haproxy");
    drop(nats.client().await);
    let mut gw = [node(&nats, "node-a"), node(&nats, "node-b")];
    let kv = common::fleet::registry(&nats).await;
    let proxy = HaProxy::start(&[("node-a", &gw[0]), ("node-b", &gw[1])]);

    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        devices.push(device(proxy.addr, i).await);
    }
    // Spread over both nodes, each seeing the device's own address, not HAProxy's.
    let at = holders(&kv).await;
    assert!(
        at.contains(&"node-a".into()) && at.contains(&"node-b".into()),
        "{at:?}"
    );
    for (i, node) in at.iter().enumerate() {
        let info = client_info(&gw[usize::from(node == "node-b")], i).await;
        let peer = info["peer"].as_str().unwrap_or_default();
        let ip = format!("127.0.0.{}:", 2 + i);
        assert!(
            peer.starts_with(&ip),
            "hap-{i}: peer {peer}, expected {ip}…"
        );
    }

    // Stickiness: node A's devices reconnect one after another and all land on node A
    // again (round robin alone would alternate them).
    let on_a: Vec<usize> = (0..DEVICES).filter(|&i| at[i] == "node-a").collect();
    for &i in &on_a {
        devices[i].send(&[0xe0, 0x00]).await;
        assert!(devices[i].wait_closed(DEADLINE).await);
        wait_holder(&kv, &format!("hap-{i}"), None).await;
        devices[i] = device(proxy.addr, i).await;
        wait_holder(&kv, &format!("hap-{i}"), Some("node-a")).await;
    }
    assert_eq!(gw[1].metric("gateway_fleet_takeovers_total").await, 0.0);

    // Node A dies: its devices are cut off, reconnect through HAProxy and land on node B,
    // which takes them over in the registry.
    let _ = gw[0].child.kill();
    let _ = gw[0].child.wait();
    for &i in &on_a {
        assert!(devices[i].wait_closed(DEADLINE).await, "hap-{i} cut off");
        devices[i] = device(proxy.addr, i).await;
        wait_holder(&kv, &format!("hap-{i}"), Some("node-b")).await;
        let info = client_info(&gw[1], i).await;
        assert_eq!(
            (info["node"].as_str(), info["online"].as_bool()),
            (Some("node-b"), Some(true)),
            "{info}"
        );
    }
    // Node B's own devices never moved.
    for i in (0..DEVICES).filter(|i| !on_a.contains(i)) {
        assert!(
            devices[i].ping_v5(DEADLINE).await,
            "hap-{i} still on node B"
        );
    }
}
