//! TLS to NATS (`[cluster]` `tls://` URLs, `nats_ca_file`, `nats_cert_file`,
//! `nats_key_file`): two gateway processes on a real `nats-server` that requires TLS and
//! verifies client certificates (mutual TLS), with a throwaway CA made here. A push to a
//! device on the other node goes through the fleet's async-nats client; a device publish
//! reaching a subscriber on the other node goes through the routing connections (the
//! NATS protocol spoken by `cluster::routing::proto`); both must speak TLS or get
//! nothing. A node trusting the wrong CA does not start, and says why and where. The
//! events sink (`[events] nats_url` and its own three TLS keys) reaches the same server.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fleet::{until_routed, DEADLINE, LEASE_SECS};
use common::nats::{free_port, NatsServer};
use common::tls::{params, Pki};
use common::v4::{self, QoS};
use common::{post_json, GatewayProcess};
use serde_json::json;

/// A `nats-server` with JetStream that requires TLS and client certificates, the PKI
/// that signed its certificate, and this CA's client certificate for the gateways.
struct TlsNats {
    _server: NatsServer,
    pki: Pki,
    port: u16,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl TlsNats {
    fn start(tag: &str) -> TlsNats {
        let pki = Pki::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params("nats", vec!["localhost".into(), "127.0.0.1".into()])
            .signed_by(&key, &pki.ca, &pki.ca_key)
            .unwrap();
        let (cert_path, key_path) = (pki.dir.0.join("nats.pem"), pki.dir.0.join("nats.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        pki.client("gateway-node");
        let path = |p: &Path| p.display().to_string();
        let args = vec![
            "--tlsverify".into(),
            "--tlscert".into(),
            path(&cert_path),
            "--tlskey".into(),
            path(&key_path),
            "--tlscacert".into(),
            path(&pki.ca_path),
        ];
        let port = free_port();
        let server = NatsServer::start_with(tag, port, args);
        wait_listening(port);
        TlsNats {
            _server: server,
            client_cert: pki.dir.0.join("gateway-node.pem"),
            client_key: pki.dir.0.join("gateway-node.key"),
            pki,
            port,
        }
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// Node `node`'s `[cluster]` section, trusting `ca`.
    fn node_toml(&self, node: &str, ca: &Path) -> String {
        format!(
            "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"{}\"\nlease_secs = {LEASE_SECS}\n{}[store]\nenabled = false\n",
            self.url(),
            self.tls_keys(ca),
        )
    }

    /// The `nats_ca_file`, `nats_cert_file` and `nats_key_file` keys, trusting `ca`.
    fn tls_keys(&self, ca: &Path) -> String {
        format!(
            "nats_ca_file = {:?}\nnats_cert_file = {:?}\nnats_key_file = {:?}\n",
            ca.display().to_string(),
            self.client_cert.display().to_string(),
            self.client_key.display().to_string(),
        )
    }

    /// A NATS client of this server over mutual TLS.
    async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .add_root_certificates(self.pki.ca_path.clone())
            .add_client_certificate(self.client_cert.clone(), self.client_key.clone())
            .connect(self.url())
            .await
            .expect("a TLS client of nats-server")
    }

    fn node(&self, node: &str) -> GatewayProcess {
        GatewayProcess::start(&self.node_toml(node, &self.pki.ca_path))
    }
}

/// Waits until something accepts TCP connections on `port` (the server's INFO comes in
/// the clear before the TLS handshake, so a connect is all it takes).
fn wait_listening(port: u16) {
    let end = std::time::Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < end,
            "nats-server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pushes to `id` through `via` until the answer is no longer `offline` (the registry
/// names the device's node once its writer ran): that answer's status.
async fn push_until_found(via: &GatewayProcess, id: &str, payload: &str) -> String {
    let body = json!({"client_id": id, "topic": "devices/cmd", "payload": payload, "qos": 1});
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, v) = post_json(via.http, "/v1/push", &body).await;
        let status = v["status"].as_str().unwrap_or_default().to_string();
        if status != "offline" {
            assert_eq!(code, 200, "{v}");
            return status;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{id} stayed offline: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_over_mutual_tls_push_and_route_across() {
    let nats = TlsNats::start("tls-fleet");
    let (a, b) = (nats.node("node-a"), nats.node("node-b"));

    // The async-nats path: a push through B to a device on A, answered by A.
    let mut dev = v4::connect(v4::options(a.mqtt, "dev-tls")).await;
    assert_eq!(push_until_found(&b, "dev-tls", "over tls").await, "sent");
    let p = dev.next_publish(DEADLINE).await.expect("the push arrives");
    assert_eq!(&p.payload[..], b"over tls");

    // The routing path: a device publish on A reaches a subscriber on B.
    let mut sub = v4::connect(v4::options(b.mqtt, "sub-tls")).await;
    sub.subscribe("tls/#", QoS::AtLeastOnce).await;
    let publisher = v4::connect(v4::options(a.mqtt, "pub-tls")).await;
    until_routed(&publisher, &mut sub, "tls/probe").await;
    publisher
        .client
        .publish("tls/data", QoS::AtLeastOnce, false, "routed over tls")
        .await
        .unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let p = sub
            .next_publish(DEADLINE)
            .await
            .expect("the publish arrives");
        if p.topic == "tls/data" {
            assert_eq!(&p.payload[..], b"routed over tls");
            break;
        }
        assert!(tokio::time::Instant::now() < end);
    }
    assert!(
        b.metric("gateway_fleet_messages_total{direction=\"in\"}")
            .await
            >= 1.0
    );
}

#[test]
fn a_node_trusting_another_ca_does_not_join_and_names_the_url() {
    let nats = TlsNats::start("tls-wrong-ca");
    let other = Pki::new();
    let dir = common::tempdir::Dir::new("tls-wrong-ca");
    let path = dir.0.join("gateway.toml");
    let text = common::merge_toml(common::BASE, &nats.node_toml("node-x", &other.ca_path));
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = common::run_gateway(
        &[OsStr::new("--config"), path.as_os_str()],
        Duration::from_secs(60),
    );
    let said = format!("{out}{err}");
    assert_ne!(code, Some(0), "the gateway started: {said}");
    assert!(said.contains(&nats.url()), "names the URL: {said}");
    assert!(
        said.contains("UnknownIssuer") || said.contains("certificate"),
        "says the certificate is not trusted: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_nats_over_mutual_tls() {
    use futures_util::StreamExt;
    let nats = TlsNats::start("tls-events");
    let watcher = nats.client().await;
    let mut events = watcher.subscribe("gw.events.connected.>").await.unwrap();
    watcher.flush().await.unwrap();
    let gw = GatewayProcess::start(&format!(
        "[events]\nnats_url = \"{}\"\nnats_subject_prefix = \"gw\"\nlinger_ms = 0\n{}",
        nats.url(),
        nats.tls_keys(&nats.pki.ca_path)
    ));
    let _dev = v4::connect(v4::options(gw.mqtt, "dev-events")).await;
    let msg = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("the connected event over TLS")
        .unwrap();
    assert_eq!(msg.subject.as_str(), "gw.events.connected.dev-events");
}
