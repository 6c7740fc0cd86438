//! Config reload on the real binary: SIGHUP rotates the TLS certificate (new handshakes
//! see the new one, an open TLS connection keeps working), `POST /v1/admin/reload` admits
//! a user added to the password file and puts new ACL rules in force, and an invalid
//! file changes nothing, names the key and counts as failed.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{passwd, post_json, tempdir, GatewayProcess, Raw};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// A CA and the server certificates it signs for `localhost`.
struct Pki {
    dir: tempdir::Dir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Reload Test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempdir::Dir::new("reload-tls"),
            ca,
            ca_key,
        }
    }

    /// Writes a new server certificate (subject CN `cn`) and key over `server.pem` /
    /// `server.key`; returns the certificate.
    fn issue(&self, cn: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.path("server.pem"), cert.pem()).unwrap();
        std::fs::write(self.path("server.key"), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn toml(&self) -> String {
        format!(
            "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            self.path("server.pem").display().to_string(),
            self.path("server.key").display().to_string()
        )
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(self.client_builder().with_no_client_auth())
    }

    fn client_builder(
        &self,
    ) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
    }

    /// A client configuration trusting this CA and presenting a certificate for `cn`
    /// signed by `issuer`'s CA.
    fn client_config_with_cert(&self, issuer: &Pki, cn: &str) -> Arc<ClientConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer.ca, &issuer.ca_key).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Arc::new(
            self.client_builder()
                .with_client_auth_cert(vec![cert.der().clone()], key)
                .unwrap(),
        )
    }

    /// Writes this CA as `ca.pem` into `dir` and returns the path.
    fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).unwrap();
        path
    }
}

/// A blocking MQTT 3.1.1 client over TLS.
struct TlsClient {
    s: StreamOwned<ClientConnection, std::net::TcpStream>,
    buf: BytesMut,
}

impl TlsClient {
    fn connect(addr: SocketAddr, cfg: Arc<ClientConfig>, id: &str) -> TlsClient {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        let mut conn =
            ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        let mut c = TlsClient {
            s: StreamOwned::new(conn, sock),
            buf: BytesMut::new(),
        };
        c.send(&Raw::connect_v4(id, 60, true));
        match c.recv() {
            mqttbytes::v4::Packet::ConnAck(a) => assert_eq!(a.code as u8, 0, "{id}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    /// The certificate the server showed in the handshake.
    fn server_cert(&self) -> CertificateDer<'static> {
        self.s.conn.peer_certificates().unwrap()[0].clone()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
        self.s.flush().unwrap();
    }

    fn recv(&mut self) -> mqttbytes::v4::Packet {
        loop {
            match mqttbytes::v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("undecodable: {e:?}"),
            }
            let mut tmp = [0u8; 4096];
            match self.s.read(&mut tmp) {
                Ok(0) => panic!("closed"),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

/// Polls until the metric `sample` reaches `want`.
async fn wait_metric(gw: &GatewayProcess, sample: &str, want: f64) {
    let deadline = Instant::now() + T;
    loop {
        let v = gw.metric(sample).await;
        if v >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} stayed {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RELOADS_OK: &str = "gateway_config_reloads_total{result=\"ok\"}";
const RELOADS_FAILED: &str = "gateway_config_reloads_total{result=\"failed\"}";

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_the_certificate_and_open_tls_connections_stay() {
    let pki = Pki::new();
    let first = pki.issue("gateway-1");
    let gw = GatewayProcess::start(&pki.toml());
    let tls = gw.tls.expect("tls listener");
    let mut old = TlsClient::connect(tls, pki.client_config(), "old-conn");
    assert_eq!(old.server_cert(), first);
    old.send(&Raw::subscribe_v4("rot/#", 0, 1));
    assert!(matches!(old.recv(), mqttbytes::v4::Packet::SubAck(_)));

    let second = pki.issue("gateway-2");
    gw.signal(libc::SIGHUP);
    wait_metric(&gw, RELOADS_OK, 1.0).await;

    // A fresh client: one that resumes its earlier session gets no certificate at all.
    let mut new = TlsClient::connect(tls, pki.client_config(), "new-conn");
    assert_eq!(
        new.server_cert(),
        second,
        "a new handshake sees the new certificate"
    );
    new.send(&Raw::publish_v4("rot/x", 0, 0, b"after rotation"));
    match old.recv() {
        mqttbytes::v4::Packet::Publish(p) => assert_eq!(&p.payload[..], b"after rotation"),
        other => panic!("the open connection got {other:?}"),
    }
    assert_eq!(
        old.server_cert(),
        first,
        "the open connection kept its handshake"
    );
    assert_eq!(gw.metric(RELOADS_FAILED).await, 0.0);
}

/// The CONNACK code for a 3.1.1 CONNECT with credentials.
async fn connack(addr: SocketAddr, id: &str, user: &str, pass: &str) -> u8 {
    let mut c = mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    c.set_login(user, pass);
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&b).await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    buf[3]
}

async fn reload(gw: &GatewayProcess) -> (u16, serde_json::Value) {
    post_json(gw.http, "/v1/admin/reload", &serde_json::json!({})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_endpoint_admits_a_user_added_to_the_password_file() {
    let dir = tempdir::Dir::new("reload-passwd");
    let file = dir.0.join("users");
    passwd(&file, "alice", "a-pass");
    let gw = GatewayProcess::start(&format!(
        "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = {:?}\n",
        file.display().to_string()
    ));
    assert_eq!(connack(gw.mqtt, "a1", "alice", "a-pass").await, 0);
    assert_eq!(
        connack(gw.mqtt, "b1", "bob", "b-pass").await,
        5,
        "bob unknown yet"
    );

    passwd(&file, "bob", "b-pass");
    // A listen address changed in the same file is named, not applied.
    gw.edit_config("[mqtt]\nlisten = \"127.0.0.1:1\"\n");
    let (code, body) = reload(&gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"], serde_json::json!(["auth"]), "{body}");
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["mqtt.listen"]),
        "{body}"
    );
    assert_eq!(
        connack(gw.mqtt, "b2", "bob", "b-pass").await,
        0,
        "bob admitted"
    );
    assert_eq!(connack(gw.mqtt, "a2", "alice", "a-pass").await, 0);
    assert_eq!(gw.metric(RELOADS_OK).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_puts_new_acl_rules_in_force() {
    let open = "[acl]\nenabled = true\nno_match = \"allow\"\nrules = []\n";
    let gw = GatewayProcess::start(open);
    let denied = "gateway_acl_denied_total{action=\"publish\"}";
    let mut p = Raw::connect(gw.mqtt).await;
    p.send(&Raw::connect_v4("acl-pub", 60, true)).await;
    assert!(matches!(
        p.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    p.send(&Raw::publish_v4("locked/a", 1, 1, b"x")).await;
    assert!(matches!(
        p.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::PubAck(_))
    ));
    assert_eq!(gw.metric(denied).await, 0.0);

    gw.edit_config(
        "[acl]\nenabled = true\nno_match = \"allow\"\n\
         rules = [{ permission = \"deny\", action = \"publish\", topic = \"locked/#\" }]\n",
    );
    let (code, body) = reload(&gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"], serde_json::json!(["acl"]), "{body}");
    // The same, still open, connection is judged by the new rules.
    p.send(&Raw::publish_v4("locked/b", 1, 2, b"x")).await;
    wait_metric(&gw, denied, 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_changes_nothing_and_names_the_key() {
    let pki = Pki::new();
    let first = pki.issue("gateway-1");
    let gw = GatewayProcess::start(&pki.toml());
    let tls = gw.tls.expect("tls listener");

    // A value out of its rules.
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    gw.edit_config("[acl]\nno_match = \"maybe\"\n");
    let (code, body) = reload(&gw).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["field"], "acl.no_match", "{body}");
    assert_eq!(gw.metric(RELOADS_FAILED).await, 1.0);

    // A certificate file that is not there: the old certificate stays in use.
    std::fs::write(gw.config_path(), &good).unwrap();
    gw.edit_config(&format!(
        "[mqtt]\ntls_cert = {:?}\n",
        pki.path("missing.pem").display().to_string()
    ));
    let (code, body) = reload(&gw).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["field"], "mqtt.tls_cert", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.pem"),
        "{body}"
    );
    assert_eq!(gw.metric(RELOADS_FAILED).await, 2.0);
    assert_eq!(gw.metric(RELOADS_OK).await, 0.0);
    let c = TlsClient::connect(tls, pki.client_config(), "still-old");
    assert_eq!(c.server_cert(), first);
    // The same through SIGHUP: counted, and the process keeps serving.
    gw.signal(libc::SIGHUP);
    wait_metric(&gw, RELOADS_FAILED, 3.0).await;
    let c = TlsClient::connect(tls, pki.client_config(), "after-hup");
    assert_eq!(c.server_cert(), first);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_takes_the_api_token_and_needs_a_config_file() {
    let gw = common::TestServer::start("[http]\ntokens = [\"r3load\"]\n");
    let url = format!("http://{}/v1/admin/reload", gw.http);
    let client = reqwest::Client::new();
    let r = client.post(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "no token, no reload");
    // Started in-process from a config with no file behind it: nothing to read again.
    let r = client
        .post(&url)
        .bearer_auth("r3load")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_config_file", "{body}");
    assert_eq!(gw.metric(RELOADS_FAILED).await, 1.0);
}

/// Whether a TLS handshake and MQTT CONNECT with `cfg` succeed.
fn handshake_ok(addr: SocketAddr, cfg: Arc<ClientConfig>) -> bool {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            return false;
        }
    }
    // TLS 1.3 reports a refused client certificate after the handshake, on the next read.
    let mut s = StreamOwned::new(conn, sock);
    if s.write_all(&Raw::connect_v4("ca-probe", 60, true)).is_err() {
        return false;
    }
    let mut b = [0u8; 4];
    s.read_exact(&mut b).is_ok() && b[0] == 0x20 && b[3] == 0
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_swaps_the_client_ca_for_new_handshakes() {
    let server = Pki::new();
    server.issue("gateway");
    let (old_ca, new_ca) = (Pki::new(), Pki::new());
    let ca_file = old_ca.write_ca(&server.dir.0);
    let gw = GatewayProcess::start(&format!(
        "{}tls_client_ca = {:?}\ntls_require_client_cert = true\n",
        server.toml(),
        ca_file.display().to_string()
    ));
    let tls = gw.tls.expect("tls listener");
    let by_old = || server.client_config_with_cert(&old_ca, "dev-old");
    let by_new = || server.client_config_with_cert(&new_ca, "dev-new");
    assert!(handshake_ok(tls, by_old()));
    assert!(
        !handshake_ok(tls, by_new()),
        "the new CA is not trusted yet"
    );
    let mut open = TlsClient::connect(tls, by_old(), "kept");

    new_ca.write_ca(&server.dir.0);
    let (code, body) = reload(&gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"], serde_json::json!(["mqtt.tls"]), "{body}");
    assert!(
        handshake_ok(tls, by_new()),
        "the new CA signs new handshakes"
    );
    assert!(!handshake_ok(tls, by_old()), "the old CA no longer does");
    // The connection made under the old CA stays up.
    open.send(&Raw::subscribe_v4("still/here", 0, 1));
    assert!(matches!(open.recv(), mqttbytes::v4::Packet::SubAck(_)));
}

/// An HS256 token for client id `sub`, valid ten minutes, signed with `secret`.
fn token(sub: &str, secret: &[u8]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_rotates_the_jwt_secret() {
    let jwt = |secret: &str| {
        format!("[auth]\nproviders = [\"jwt\"]\n[auth.jwt]\nsecret = \"{secret}\"\n")
    };
    let gw = GatewayProcess::start(&jwt("first-secret"));
    let (old, new) = (token("d1", b"first-secret"), token("d1", b"second-secret"));
    assert_eq!(connack(gw.mqtt, "d1", "u", &old).await, 0);
    assert_eq!(connack(gw.mqtt, "d1", "u", &new).await, 5);

    gw.edit_config(&jwt("second-secret"));
    gw.signal(libc::SIGHUP);
    wait_metric(&gw, RELOADS_OK, 1.0).await;
    assert_eq!(connack(gw.mqtt, "d1", "u", &new).await, 0, "the new secret");
    assert_eq!(
        connack(gw.mqtt, "d1", "u", &old).await,
        5,
        "not the old one"
    );
}
