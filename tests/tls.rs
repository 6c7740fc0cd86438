//! MQTT over TLS against the real gateway: TLS 1.2 and 1.3, client certificates and
//! the CN as client id, a handshake that stalls (it must not block anyone else), the TLS
//! session travelling with its socket to the client id's home shard, PROXY protocol in
//! front of TLS, and mosquitto's clients over TLS. Certificates are generated per test.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{idle_client, suback, Pki, TlsClient};
use common::{tempdir, Raw, TestServer};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

#[tokio::test(flavor = "multi_thread")]
async fn tls12_and_tls13_clients_exchange_messages() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.expect("tls listener");
    for tls12 in [false, true] {
        let tag = if tls12 { "12" } else { "13" };
        let cfg = pki.client_config(None, tls12);
        let mut sub = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        let want = if tls12 {
            rustls::ProtocolVersion::TLSv1_2
        } else {
            rustls::ProtocolVersion::TLSv1_3
        };
        assert_eq!(sub.protocol_version(), Some(want));
        assert_eq!(sub.mqtt_connect(&format!("tls-sub-{tag}")), Ok(0));
        sub.send(&Raw::subscribe_v4(&format!("t/{tag}"), 1, 1))
            .unwrap();
        suback(&mut sub);
        let mut publ = TlsClient::connect(tls, cfg, b"").unwrap();
        assert_eq!(publ.mqtt_connect(&format!("tls-pub-{tag}")), Ok(0));
        publ.send(&Raw::publish_v4(&format!("t/{tag}"), 0, 0, b"over tls"))
            .unwrap();
        let p = sub.expect_publish(Duration::from_secs(10)).unwrap();
        assert_eq!(&p.payload[..], b"over tls");
    }
    // The plain listener keeps working next to the TLS one.
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4("plain", 60, true)).await;
    assert!(matches!(
        raw.recv_v4(Duration::from_secs(10)).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
}

/// CONNECT and SUBSCRIBE in one TLS record: whichever shard reads the CONNECT hands the
/// socket, its TLS session and the bytes after the CONNECT to the client id's home shard.
/// Eight client ids over two shards: some are handed off (all would stay home with
/// probability 1/256 per id pair, and every one must work either way).
#[tokio::test(flavor = "multi_thread")]
async fn tls_session_travels_to_the_home_shard() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.unwrap();
    let cfg = pki.client_config(None, false);
    let mut subs = Vec::new();
    for i in 0..8 {
        let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        let mut bytes = Raw::connect_v4(&format!("roam-{i}"), 60, true);
        bytes.extend(Raw::subscribe_v4(&format!("roam/{i}"), 0, 1));
        c.send(&bytes).unwrap();
        match c.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => assert_eq!(a.code as u8, 0),
            other => panic!("no CONNACK: {other:?}"),
        }
        suback(&mut c);
        subs.push(c);
    }
    let mut publ = TlsClient::connect(tls, cfg, b"").unwrap();
    assert_eq!(publ.mqtt_connect("roam-pub"), Ok(0));
    for i in 0..8 {
        publ.send(&Raw::publish_v4(
            &format!("roam/{i}"),
            0,
            0,
            format!("m{i}").as_bytes(),
        ))
        .unwrap();
    }
    for (i, s) in subs.iter_mut().enumerate() {
        let p = s.expect_publish(Duration::from_secs(10)).unwrap();
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
    }
    let shards = common::metric_value(&gw.metrics().await, "gateway_connections");
    assert_eq!(shards, 9.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_and_cn_as_client_id() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(&format!(
        "{}\ntls_require_client_cert = true\nuse_cn_as_client_id = true",
        pki.ca_toml()
    )));
    let tls = gw.tls.unwrap();

    // A device certificate: the CONNECT's client id is replaced by the CN.
    let cfg = pki.client_config(Some(pki.client("sensor-cn-7")), false);
    let mut dev = TlsClient::connect(tls, cfg, b"").unwrap();
    assert_eq!(dev.mqtt_connect("claims-to-be-someone-else"), Ok(0));
    let (code, body) = common::http_get(gw.http, "/v1/clients/sensor-cn-7").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"online\":true"), "{body}");
    let (code, _) = common::http_get(gw.http, "/v1/clients/claims-to-be-someone-else").await;
    assert_eq!(code, 404);

    // TLS 1.2 as well.
    let cfg = pki.client_config(Some(pki.client("sensor-cn-8")), true);
    let mut dev12 = TlsClient::connect(tls, cfg, b"").unwrap();
    assert_eq!(dev12.mqtt_connect("x"), Ok(0));

    // No certificate: the handshake fails (TLS 1.3 reports it on the first read).
    let failures = gw.metric("gateway_tls_handshake_failures_total").await;
    let cfg = pki.client_config(None, false);
    if let Ok(mut anon) = TlsClient::connect(tls, cfg, b"") {
        assert!(anon.mqtt_connect("anon").is_err());
    }
    // A certificate from another CA: refused too.
    let other = Pki::new();
    let cfg = pki_with_foreign_cert(&pki, &other);
    if let Ok(mut foreign) = TlsClient::connect(tls, cfg, b"") {
        assert!(foreign.mqtt_connect("foreign").is_err());
    }
    gw.wait_metric(
        "gateway_tls_handshake_failures_total",
        Duration::from_secs(5),
        |v| v >= failures + 2.0,
    )
    .await;

    // The devices that did get in are still served.
    dev.send(&[0xc0, 0x00]).unwrap();
    assert!(matches!(
        dev.recv(Duration::from_secs(5)),
        Ok(mqttbytes::v4::Packet::PingResp)
    ));
}

/// A client config trusting `pki`'s CA but presenting a certificate from `other`.
fn pki_with_foreign_cert(pki: &Pki, other: &Pki) -> Arc<ClientConfig> {
    pki.client_config(Some(other.client("intruder")), false)
}

/// Half a ClientHello, then silence: the shard keeps serving other TLS clients and closes
/// the stalled one after connect_timeout_secs (rumqttd blocked its accept loop here).
#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshake_blocks_no_one_and_times_out() {
    let pki = Pki::new();
    let gw = TestServer::start(&format!(
        "{}\n[shards]\ncount = 1",
        pki.toml("connect_timeout_secs = 3")
    ));
    let tls = gw.tls.unwrap();
    let cfg = pki.client_config(None, false);

    // Taken before the connect: the gateway's connect timeout cannot have started earlier.
    let opened = Instant::now();
    let mut stalled = pki.stalled_handshake(tls);

    // Meanwhile, on the same (single) shard, other TLS clients connect and are served.
    for i in 0..5 {
        let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        assert_eq!(c.mqtt_connect(&format!("honest-{i}")), Ok(0));
    }
    stalled
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut b = [0u8; 64];
    let still_open = matches!(stalled.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    if opened.elapsed() < Duration::from_secs(2) {
        assert!(
            still_open,
            "the stalled client was closed before its timeout"
        );
    }

    // ... and the stalled one is closed once connect_timeout_secs has passed.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // (A TLS alert may come first; then the end of the stream.)
    let closed = loop {
        match stalled.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => {
                break e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        }
    };
    assert!(closed, "stalled handshake still open");
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "closed before the timeout"
    );
    assert!(
        gw.metric("gateway_disconnects_total{reason=\"connect_timeout\"}")
            .await
            >= 1.0
    );
}

/// Plain bytes (an MQTT CONNECT) on the TLS port: a TLS failure, counted, closed.
#[tokio::test(flavor = "multi_thread")]
async fn plaintext_on_the_tls_port_is_closed() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let mut raw = Raw::connect(gw.tls.unwrap()).await;
    raw.send(&Raw::connect_v4("confused", 60, true)).await;
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    assert!(gw.metric("gateway_tls_handshake_failures_total").await >= 1.0);
}

/// A second gateway whose `tls_listen` is already served by another is refused, naming
/// the key and the address (SO_REUSEPORT would otherwise let it join the port silently).
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_listen_address_in_use_is_refused_naming_it() {
    let pki = Pki::new();
    let first = TestServer::start(&pki.toml(""));
    let taken = first.tls.unwrap();
    let store = tempdir::Dir::new("tls-second");
    let config = common::config(&common::with_store_dir(
        &pki.toml("").replace("127.0.0.1:0", &taken.to_string()),
        &store.0,
    ));
    let err = match gateway::server::Server::start(config, None) {
        Ok(_) => panic!("a second gateway joined the TLS port {taken}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("mqtt.tls_listen") && err.contains(&taken.to_string()),
        "{err}"
    );
}

/// A PROXY v2 header in the clear, then TLS: the header's address is the peer.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_header_precedes_the_client_hello() {
    let pki = Pki::new();
    // The device's address is not loopback: anonymous must be allowed from anywhere.
    let gw = TestServer::start(&pki.toml("proxy_protocol = true\n[auth]\nanonymous = \"always\""));
    let tls = gw.tls.unwrap();
    let src: SocketAddr = "203.0.113.77:40001".parse().unwrap();
    let header = gateway::proxy::encode_v2(src, tls);
    let mut c = TlsClient::connect(tls, pki.client_config(None, false), &header).unwrap();
    assert_eq!(c.mqtt_connect("behind-lb"), Ok(0));
    let (code, body) = common::http_get(gw.http, "/v1/clients/behind-lb").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"peer\":\"203.0.113.77:40001\""), "{body}");
}

/// Mosquitto's clients (OpenSSL) over mutual TLS, once on TLS 1.3 and once on TLS 1.2:
/// both reach the gateway's own record layer after their CONNECT, so a short message
/// and one of several records (40,000 bytes) cross it in OpenSSL's own framing.
#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_clients_over_mutual_tls() {
    if !(common::have_binary("mosquitto_sub", "mosquitto-clients")
        && common::have_binary("mosquitto_pub", "mosquitto-clients"))
    {
        return;
    }
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(&format!(
        "{}\ntls_require_client_cert = true\nuse_cn_as_client_id = true",
        pki.ca_toml()
    )));
    let big: String = (0..40_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for version in ["tlsv1.3", "tlsv1.2"] {
        for message in ["hello over mutual tls", &big] {
            mosquitto_round_trip(&pki, &gw, version, message).await;
        }
    }
}

/// One `mosquitto_sub` and one `mosquitto_pub` on `version`, `message` between them.
async fn mosquitto_round_trip(pki: &Pki, gw: &TestServer, version: &str, message: &str) {
    let port = gw.tls.unwrap().port().to_string();
    let (sub_cn, pub_cn) = (format!("mosq-sub-{version}"), format!("mosq-pub-{version}"));
    pki.client(&sub_cn);
    pki.client(&pub_cn);
    let path = |f: &str| pki.dir.0.join(f).display().to_string();
    let args = |cn: &str| {
        vec![
            "-h".to_string(),
            "localhost".into(),
            "-p".into(),
            port.clone(),
            "--cafile".into(),
            path("ca.pem"),
            "--cert".into(),
            path(&format!("{cn}.pem")),
            "--key".into(),
            path(&format!("{cn}.key")),
            "--tls-version".into(),
            version.into(),
            "-t".into(),
            format!("mosq/{version}"),
            "-q".into(),
            "1".into(),
        ]
    };
    let subs = gw.metric("gateway_subscriptions").await;
    let sub = std::process::Command::new("mosquitto_sub")
        .args(args(&sub_cn))
        .args(["-C", "1", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub starts");
    gw.wait_metric("gateway_subscriptions", Duration::from_secs(10), |v| {
        v > subs
    })
    .await;
    // The subscriber is known by its certificate's CN, and past rustls: the message
    // reaches it sealed by the record layer.
    let (code, _) = common::http_get(gw.http, &format!("/v1/clients/{sub_cn}")).await;
    assert_eq!(code, 200);
    gw.wait_metric(
        "gateway_tls_record_connections",
        Duration::from_secs(10),
        |v| v >= 1.0,
    )
    .await;
    let status = std::process::Command::new("mosquitto_pub")
        .args(args(&pub_cn))
        .args(["-m", message])
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success(), "{version}");
    let out = sub.wait_with_output().expect("mosquitto_sub exits");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        message,
        "{version}, {} bytes",
        message.len()
    );
}

/// Per-connection memory of idle TLS connections against the real binary, compared with
/// the same number of plain ones. Run by hand (the figures go to docs/SECURITY.md):
/// `TLS_MEM_CONNS=2000 cargo test --release --test tls -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_idle_tls_memory() {
    let n: usize = std::env::var("TLS_MEM_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let pki = Pki::new();
    let measure = |tls: bool| {
        let gw = common::GatewayProcess::start(&pki.toml(
            "[limits]\nmax_connect_rate = 0\nmax_handshaking = 0\nmax_connections_per_ip = 0",
        ));
        let tls_addr = gw.tls.expect("the gateway announced tls_addr");
        std::thread::sleep(Duration::from_millis(300));
        let before = gw.rss_bytes();
        let cfg = pki.client_config(None, false);
        let via = Some((tls_addr, &cfg)).filter(|_| tls);
        let _idle: Vec<_> = (0..n)
            .map(|i| idle_client(gw.mqtt, via, &format!("mem-{i}")))
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        let after = gw.rss_bytes();
        (before, after)
    };
    let (pb, pa) = measure(false);
    let (tb, ta) = measure(true);
    let per = |b: u64, a: u64| (a.saturating_sub(b)) as f64 / n as f64;
    println!(
        "{n} idle connections: plain RSS {} -> {} KiB ({:.0} B/conn); TLS 1.3 RSS {} -> {} KiB ({:.0} B/conn); TLS extra {:.0} B/conn",
        pb / 1024,
        pa / 1024,
        per(pb, pa),
        tb / 1024,
        ta / 1024,
        per(tb, ta),
        per(tb, ta) - per(pb, pa)
    );
    assert!(per(tb, ta) > per(pb, pa));
}

/// A reconnecting device resumes its TLS session from a stateless ticket (no full
/// handshake), on TLS 1.3 and 1.2.
#[tokio::test(flavor = "multi_thread")]
async fn reconnect_resumes_the_session() {
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    let tls = gw.tls.unwrap();
    for tls12 in [false, true] {
        let cfg = pki.client_config(None, tls12);
        let mut first = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        assert_eq!(first.mqtt_connect("resume-me"), Ok(0));
        assert_eq!(
            first.s.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        drop(first);
        let mut again = TlsClient::connect(tls, cfg, b"").unwrap();
        assert_eq!(
            again.s.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "tls12 = {tls12}"
        );
        assert_eq!(again.mqtt_connect("resume-me"), Ok(0));
    }
}

/// `gateway check-config` loads the certificate and key too: a wrong path or a key that
/// does not match fails there, before a deploy.
#[test]
fn check_config_loads_the_tls_files() {
    let pki = Pki::new();
    let path = pki.dir.0.join("gw.toml");
    std::fs::write(&path, pki.toml("")).unwrap();
    let (code, out, err) = common::run_gateway(
        &["check-config".as_ref(), path.as_os_str()],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{out}{err}");

    let other = Pki::new();
    let mismatched = pki.toml("").replace(
        &pki.key_path.display().to_string(),
        &other.key_path.display().to_string(),
    );
    std::fs::write(&path, mismatched).unwrap();
    let (code, _, err) = common::run_gateway(
        &["check-config".as_ref(), path.as_os_str()],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("TLS"), "{err}");

    let missing = pki.toml("").replace("server.pem", "nope.pem");
    std::fs::write(&path, missing).unwrap();
    let (code, _, err) = common::run_gateway(
        &["check-config".as_ref(), path.as_os_str()],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("nope.pem"), "{err}");
}

/// The inbound rate limit over TLS: the flood waits (in the socket and inside rustls),
/// nothing is lost, order is kept.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_rate_limit_over_tls_loses_nothing() {
    const N: usize = 60;
    let pki = Pki::new();
    let gw = TestServer::start(
        &pki.toml("[limits]\npublish_rate = 20\npublish_burst = 10\nbytes_rate = 0"),
    );
    let mut sub = Raw::connect(gw.mqtt).await;
    sub.send(&Raw::connect_v4("tls-flood-sub", 60, true)).await;
    assert!(sub.recv_v4(Duration::from_secs(10)).await.is_ok());
    sub.send(&Raw::subscribe_v4("tlsflood/t", 0, 1)).await;
    assert!(sub.recv_v4(Duration::from_secs(10)).await.is_ok());
    let mut flood =
        TlsClient::connect(gw.tls.unwrap(), pki.client_config(None, false), b"").unwrap();
    assert_eq!(flood.mqtt_connect("tls-flooder"), Ok(0));
    let mut bytes = Vec::new();
    for i in 0..N {
        bytes.extend(Raw::publish_v4(
            "tlsflood/t",
            0,
            0,
            format!("{i}").as_bytes(),
        ));
    }
    let start = Instant::now();
    flood.send(&bytes).unwrap();
    for i in 0..N {
        match sub.recv_v4(Duration::from_secs(30)).await {
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], format!("{i}").as_bytes());
                let t = start.elapsed().as_secs_f64();
                assert!((i + 1) as f64 <= 20.0 * t * 1.5 + 11.0, "{i} by {t:.2}s");
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
    assert!(gw.metric("gateway_rate_limit_pauses_total").await >= 1.0);
}

/// TLS and an authentication provider that answers off the shard (JWT runs on the
/// business pool): CONNECT and SUBSCRIBE arrive in one TLS record, the connection waits
/// for the verdict (and may be handed to its home shard first), then the SUBSCRIBE that
/// waited inside rustls is answered. A bad token gets CONNACK 5 over TLS.
#[tokio::test(flavor = "multi_thread")]
async fn tls_with_authentication_off_the_shard() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(
        "[auth]\nproviders = [\"jwt\"]\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"tls-secret\"\n",
    ));
    let tls = gw.tls.unwrap();
    let cfg = pki.client_config(None, false);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let connect = |id: &str, secret: &[u8]| {
        let token = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": id, "exp": exp}),
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        let mut c = mqttbytes::v4::Connect::new(id);
        c.keep_alive = 60;
        c.set_login("device", &token);
        common::encode(|b| c.write(b))
    };
    for i in 0..6 {
        let id = format!("tls-jwt-{i}");
        let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        let mut bytes = connect(&id, b"tls-secret");
        bytes.extend(Raw::subscribe_v4(&format!("tls-jwt/{i}"), 1, 7));
        c.send(&bytes).unwrap();
        match c.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => assert_eq!(a.code as u8, 0, "{id}"),
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
        match c.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::SubAck(a)) => assert_eq!(a.pkid, 7, "{id}"),
            other => panic!("{id}: no SUBACK: {other:?}"),
        }
    }
    let mut bad = TlsClient::connect(tls, cfg, b"").unwrap();
    bad.send(&connect("tls-jwt-bad", b"wrong-secret")).unwrap();
    match bad.recv(Duration::from_secs(10)) {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => assert_eq!(a.code as u8, 5),
        other => panic!("no CONNACK: {other:?}"),
    }
}

/// A TLS session to `addr` with `cfg`, handshake done, as a blocking stream.
fn tls_stream(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<StreamOwned<ClientConnection, std::net::TcpStream>> {
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
        .map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(StreamOwned::new(conn, sock))
}

#[tokio::test(flavor = "multi_thread")]
async fn wss_with_client_certificates_and_cn_as_client_id() {
    let pki = Pki::new();
    // wss only (no tls_listen): the certificate is loaded for it alone.
    let gw = TestServer::start(&format!(
        "[mqtt]\nwss_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n{}\n\
         tls_require_client_cert = true\nuse_cn_as_client_id = true\n[shards]\ncount = 4\n",
        pki.cert_path.display().to_string(),
        pki.key_path.display().to_string(),
        pki.ca_toml()
    ));
    let wss = gw.wss.expect("wss listener");
    let url = format!("wss://localhost:{}/mqtt", wss.port());
    // Several devices, so most are handed to another home shard with their TLS and
    // WebSocket state.
    let mut devices = Vec::new();
    for i in 0..4 {
        let cn = format!("wss-dev-{i}");
        let cfg = pki.client_config(Some(pki.client(&cn)), i % 2 == 1);
        let stream = tls_stream(wss, cfg).unwrap();
        let mut dev = common::ws::WsMqtt::new(common::ws::upgrade(&url, stream));
        assert_eq!(dev.connect("claims-another-id", 30), 0);
        let (code, body) = common::http_get(gw.http, &format!("/v1/clients/{cn}")).await;
        assert_eq!(code, 200, "{body}");
        dev.subscribe(&format!("to/{cn}"));
        devices.push((cn, dev));
    }
    let body =
        serde_json::json!({"client_id": "wss-dev-0", "topic": "to/wss-dev-0", "payload": "pushed"});
    let (code, answer) = common::post_json(gw.http, "/v1/push", &body).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(devices[0].1.next_publish().1, b"pushed");
    for (cn, dev) in devices.iter_mut() {
        dev.send(&Raw::publish_v4(&format!("to/{cn}"), 0, 0, b"echo"));
        assert_eq!(dev.next_publish(), (format!("to/{cn}"), b"echo".to_vec()));
    }
    // No client certificate: no WebSocket.
    if let Ok(s) = tls_stream(wss, pki.client_config(None, false)) {
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(&*url).unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        assert!(
            tungstenite::client(req, s).is_err(),
            "upgraded without a certificate"
        );
    }
    let wss_connects = gw.metric("gateway_connects_total{transport=\"wss\"}").await;
    assert_eq!(wss_connects, 4.0);
}
