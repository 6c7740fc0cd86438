//! The `http` auth provider over https: a real gateway on loopback asks an axum webhook
//! served over rustls with a certificate from a test CA. Trusting that CA (`ca_file`) the
//! device gets in; with the system roots the handshake fails, the device is refused with
//! "server unavailable" (fails closed) and the reason names the certificate.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::https::{serve_tls, test_ca, TestCa};
use common::*;
use gateway::auth::webhook::{Webhook, WebhookConfig};
use gateway::auth::{Answer, Request, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V3_OK: u8 = 0x00;
const V3_UNAVAILABLE: u8 = 0x03;

/// An https auth backend allowing password "good"; returns its URL and its call count.
async fn https_backend(
    ca: &TestCa,
) -> (String, Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>) {
    use axum::{routing::post, Json, Router};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/auth",
        post(move |Json(req): Json<serde_json::Value>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                let allow = req["password"].as_str() == Some("good");
                Json(serde_json::json!({"result": if allow { "allow" } else { "deny" }}))
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, failed) = serve_tls(tcp, app, ca);
    (format!("https://{addr}/auth"), calls, failed)
}

fn webhook_toml(url: &str, ca_file: &str) -> String {
    format!(
        "[auth]\nproviders = [\"http\"]\n[auth.http]\nurl = \"{url}\"\ntimeout_ms = 2000\ncache_entries = 0\nca_file = \"{ca_file}\"\n"
    )
}

/// The CONNACK code a 3.1.1 CONNECT with username "u" and `pass` gets.
async fn connack_code(addr: std::net::SocketAddr, id: &str, pass: &str) -> u8 {
    let mut b = BytesMut::new();
    let mut c = mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    c.set_login("u", pass);
    c.write(&mut b).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&b).await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no CONNACK for {id}"))
        .unwrap();
    buf[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_with_the_test_ca_lets_devices_in() {
    let ca = test_ca();
    let dir = tempdir::Dir::new("auth-https");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let (url, calls, _) = https_backend(&ca).await;
    let s = TestServer::start(&webhook_toml(&url, &ca_file.display().to_string()));
    assert_eq!(connack_code(s.mqtt, "dev1", "good").await, V3_OK);
    assert_eq!(connack_code(s.mqtt, "dev2", "bad").await, 0x05);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_with_an_unknown_ca_fails_closed() {
    let ca = test_ca();
    let (url, calls, handshake_failed) = https_backend(&ca).await;
    // The system roots do not know the test CA.
    let s = TestServer::start(&webhook_toml(&url, ""));
    assert_eq!(connack_code(s.mqtt, "dev1", "good").await, V3_UNAVAILABLE);
    // The backend's accept loop notes the failed handshake on its own time, possibly
    // after the gateway has answered (seen in CI): wait for it.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !handshake_failed.load(Ordering::Relaxed) {
        assert!(
            tokio::time::Instant::now() < end,
            "the backend saw no failed handshake"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let refused = s
        .metric("gateway_connect_refused_total{reason=\"auth_unavailable\"}")
        .await;
    assert_eq!(refused, 1.0);
}

/// The reason the shard logs with the client id ("authentication unavailable") says
/// what was wrong: the server's certificate does not check out against `ca_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_named_in_the_reason() {
    let ca = test_ca();
    let (url, _, _) = https_backend(&ca).await;
    let other = test_ca();
    let dir = tempdir::Dir::new("auth-https-other");
    let other_file = dir.0.join("other.pem");
    std::fs::write(&other_file, &other.ca_pem).unwrap();
    let cfg: WebhookConfig = toml::from_str(&format!(
        "url = \"{url}\"\ntimeout_ms = 2000\ncache_entries = 0\ncache_ttl_secs = 1\nca_file = \"{}\"\n",
        other_file.display()
    ))
    .unwrap();
    let hook = Webhook::from_config(&cfg).unwrap();
    let req = Request {
        client_id: "dev1".into(),
        username: Some("u".into()),
        password: Some(bytes::Bytes::from_static(b"good")),
        peer: "127.0.0.1:1".parse().unwrap(),
    };
    match hook.check(&req).await {
        Answer::Decided(Verdict::Unavailable(why)) => {
            assert!(why.contains("invalid peer certificate"), "{why}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}
