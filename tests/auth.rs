//! Authentication providers end to end: a real gateway on loopback, raw MQTT clients that
//! read the exact CONNACK code, the real `gateway passwd` binary, JWTs signed in the test
//! and a real HTTP webhook server started by the test.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

const V3_OK: u8 = 0x00;
const V3_UNAVAILABLE: u8 = 0x03;
const V3_NOT_AUTHORIZED: u8 = 0x05;
const V5_BAD_CREDENTIALS: u8 = 0x86;
const V5_UNAVAILABLE: u8 = 0x88;

/// CONNECT bytes with optional username and password, MQTT 3.1.1 or 5.
fn connect_bytes(v5: bool, id: &str, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    let mut b = BytesMut::new();
    if v5 {
        let mut c = mqttbytes::v5::Connect::new(id);
        c.keep_alive = 30;
        if let Some(u) = user {
            c.set_login(u, pass.unwrap_or(""));
        }
        c.write(&mut b).unwrap();
    } else {
        let mut c = mqttbytes::v4::Connect::new(id);
        c.keep_alive = 30;
        if let Some(u) = user {
            c.set_login(u, pass.unwrap_or(""));
        }
        c.write(&mut b).unwrap();
    }
    if user.is_none() {
        if let Some(p) = pass {
            // mqttbytes ties the password to a username; build the flags by hand for a
            // password-only MQTT 5 CONNECT (3.1.1 forbids it).
            assert!(v5, "3.1.1 has no password without username");
            return v5_password_only(id, p);
        }
    }
    b.to_vec()
}

/// An MQTT 5 CONNECT with a password and no username.
fn v5_password_only(id: &str, pass: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02 | 0x40, 0, 30, 0];
    body.extend(common::s(id.as_bytes()));
    body.extend(common::s(pass.as_bytes()));
    common::frame(0x10, &body)
}

/// Connects, sends the CONNECT and returns the CONNACK code (byte 3 in both versions)
/// and the still open stream.
async fn connack(
    addr: SocketAddr,
    v5: bool,
    id: &str,
    user: Option<&str>,
    pass: Option<&str>,
) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_bytes(v5, id, user, pass))
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no CONNACK for {id}"))
        .unwrap_or_else(|e| panic!("closed without CONNACK for {id}: {e}"));
    assert_eq!(buf[0], 0x20, "CONNACK for {id}");
    (buf[3], s)
}

async fn code(addr: SocketAddr, v5: bool, id: &str, user: Option<&str>, pass: Option<&str>) -> u8 {
    connack(addr, v5, id, user, pass).await.0
}

async fn refused(s: &TestServer, reason: &str) -> f64 {
    s.metric(&format!(
        "gateway_connect_refused_total{{reason=\"{reason}\"}}"
    ))
    .await
}

#[tokio::test]
async fn default_anonymous_is_loopback_only_and_credentials_need_a_provider() {
    // BASE keeps the default [auth]: providers = ["anonymous"], anonymous = "loopback".
    let s = TestServer::start("");
    assert_eq!(code(s.mqtt, false, "anon4", None, None).await, V3_OK);
    assert_eq!(code(s.mqtt, true, "anon5", None, None).await, 0x00);
    // Credentials are not anonymous's to judge, and no other provider is configured.
    assert_eq!(
        code(s.mqtt, false, "u4", Some("user"), Some("pw")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(s.mqtt, true, "u5", Some("user"), Some("pw")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(refused(&s, "auth").await, 2.0);
}

#[tokio::test]
async fn anonymous_never_and_always() {
    let never = TestServer::start("[auth]\nanonymous = \"never\"\n");
    assert_eq!(
        code(never.mqtt, false, "a", None, None).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(never.mqtt, true, "b", None, None).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(refused(&never, "auth").await, 2.0);
    let always = TestServer::start("[auth]\nanonymous = \"always\"\n");
    assert_eq!(code(always.mqtt, false, "a", None, None).await, V3_OK);
    assert_eq!(code(always.mqtt, true, "b", None, None).await, 0x00);
    // Not configured at all: nobody gets in.
    let none = TestServer::start("[auth]\nproviders = []\n");
    assert_eq!(
        code(none.mqtt, false, "a", None, None).await,
        V3_NOT_AUTHORIZED
    );
}

/// Runs `gateway passwd FILE USER`, the password on stdin or via --password.
fn passwd(file: &std::path::Path, user: &str, stdin: Option<&str>, flag: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.arg("passwd").arg(file).arg(user);
    if let Some(p) = flag {
        cmd.arg("--password").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut sin = child.stdin.take().unwrap();
        if let Some(p) = stdin {
            writeln!(sin, "{p}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "gateway passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn password_file_made_by_gateway_passwd() {
    let dir = tempdir::Dir::new("passwd");
    let file = dir.0.join("users");
    std::fs::write(&file, "# devices\n").unwrap();
    passwd(&file, "alice", Some("s3cret"), None);
    passwd(&file, "bob", None, Some("hunter2"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# devices\n"), "comment kept: {text}");
    assert!(text.contains("alice:$argon2id$"), "{text}");
    let bob_line = text
        .lines()
        .find(|l| l.starts_with("bob:"))
        .unwrap()
        .to_string();

    let cfg = format!(
        "[auth]\nproviders = [\"anonymous\", \"password_file\"]\n[auth.password_file]\npath = \"{}\"\n",
        file.display()
    );
    let s = TestServer::start(&cfg);
    assert_eq!(
        code(s.mqtt, false, "a1", Some("alice"), Some("s3cret")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "b1", Some("bob"), Some("hunter2")).await,
        0x00
    );
    assert_eq!(
        code(s.mqtt, false, "a2", Some("alice"), Some("wrong")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(s.mqtt, true, "a3", Some("alice"), Some("wrong")).await,
        V5_BAD_CREDENTIALS
    );
    // Unknown user: the file ignores it and nobody else decides.
    assert_eq!(
        code(s.mqtt, true, "c1", Some("carol"), Some("x")).await,
        V5_BAD_CREDENTIALS
    );
    // Anonymous still works from loopback ahead of the file.
    assert_eq!(code(s.mqtt, false, "anon", None, None).await, V3_OK);
    assert_eq!(refused(&s, "auth").await, 3.0);
    drop(s);

    // Changing alice's password keeps bob's line untouched; the new password works.
    passwd(&file, "alice", Some("n3w"), None);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&bob_line), "{text}");
    assert_eq!(text.matches("alice:").count(), 1, "{text}");
    let s = TestServer::start(&cfg);
    assert_eq!(
        code(s.mqtt, false, "a4", Some("alice"), Some("n3w")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, false, "a5", Some("alice"), Some("s3cret")).await,
        V3_NOT_AUTHORIZED
    );
}

#[test]
fn a_bad_password_file_stops_the_start_naming_file_and_line() {
    let dir = tempdir::Dir::new("badpasswd");
    let file = dir.0.join("users");
    std::fs::write(&file, "# ok\nalice:not-a-hash\n").unwrap();
    let cfg = config(&format!(
        "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = \"{}\"\n",
        file.display()
    ));
    let err = match gateway::server::Server::start(cfg, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started with a bad password file"),
    };
    assert!(err.contains(&format!("{}:2", file.display())), "{err}");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"test-secret"),
    )
    .unwrap()
}

const JWT_HS: &str = r#"
[auth]
providers = ["jwt"]
[auth.jwt]
algorithm = "HS256"
secret = "test-secret"
leeway_secs = 0
[acl]
enabled = true
"#;

#[tokio::test]
async fn jwt_hs256_allow_deny_expiry_and_subject() {
    let s = TestServer::start(JWT_HS);
    let good = |id: &str| hs256(serde_json::json!({"sub": id, "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "d1", Some("any"), Some(&good("d1"))).await,
        V3_OK
    );
    // MQTT 5 allows a password without a username.
    assert_eq!(
        code(s.mqtt, true, "d2", None, Some(&good("d2"))).await,
        0x00
    );
    // sub is another device.
    assert_eq!(
        code(s.mqtt, true, "d3", Some("any"), Some(&good("d1"))).await,
        V5_BAD_CREDENTIALS
    );
    // Expired.
    let old = hs256(serde_json::json!({"sub": "d4", "exp": now() - 600}));
    assert_eq!(
        code(s.mqtt, false, "d4", Some("any"), Some(&old)).await,
        V3_NOT_AUTHORIZED
    );
    // Signed with another secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "d5", "exp": now() + 600}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    assert_eq!(
        code(s.mqtt, true, "d5", Some("any"), Some(&forged)).await,
        V5_BAD_CREDENTIALS
    );
    // Anonymous is not in the providers: no credentials, no entry.
    assert_eq!(
        code(s.mqtt, false, "d6", None, None).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(refused(&s, "auth").await, 4.0);
}

#[tokio::test]
async fn jwt_acl_claims_apply_to_that_connection() {
    let s = TestServer::start(JWT_HS);
    let token = hs256(serde_json::json!({
        "sub": "fleet1", "exp": now() + 600,
        "publish": ["fleet/%c/up"], "subscribe": ["fleet/%c/down/#"],
    }));
    // A 3.1.1 CONNACK is exactly the 4 bytes `connack` read.
    let (c, stream) = connack(s.mqtt, false, "fleet1", Some("u"), Some(&token)).await;
    assert_eq!(c, V3_OK);
    let mut raw = Raw::from_stream(stream);
    // Allowed by the claim; devices/fleet1/# would be allowed by the default rules, but
    // the claim replaces them for SUBSCRIBE.
    let mut sub = mqttbytes::v4::Subscribe::new("fleet/fleet1/down/+", mqttbytes::QoS::AtLeastOnce);
    sub.add("devices/fleet1/#".into(), mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    raw.send(&common::encode(|b| sub.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            vec![
                mqttbytes::v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
                mqttbytes::v4::SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(
        s.metric("gateway_acl_denied_total{action=\"subscribe\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn jwt_rs256_with_a_public_key_file() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let cfg = format!(
        "[auth]\nproviders = [\"jwt\"]\n[auth.jwt]\nalgorithm = \"RS256\"\npublic_key_file = \"{data}/jwt_rs256_public.pem\"\n"
    );
    let s = TestServer::start(&cfg);
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(format!("{data}/jwt_rs256_private.pem")).unwrap())
            .unwrap();
    let rs =
        |claims: serde_json::Value| encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    let good = rs(serde_json::json!({"sub": "r1", "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "r1", Some("x"), Some(&good)).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "r2", Some("x"), Some(&good)).await,
        V5_BAD_CREDENTIALS
    );
    let expired = rs(serde_json::json!({"sub": "r3", "exp": now() - 600}));
    assert_eq!(
        code(s.mqtt, true, "r3", None, Some(&expired)).await,
        V5_BAD_CREDENTIALS
    );
    // An HS256 token is refused by an RS256 provider (no algorithm confusion).
    let hs = hs256(serde_json::json!({"sub": "r4", "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "r4", Some("x"), Some(&hs)).await,
        V3_NOT_AUTHORIZED
    );
}

/// A tiny auth backend: the password says what to answer. `calls` counts requests;
/// "hang" never answers (until the test ends).
struct Backend {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    hanging: Arc<AtomicUsize>,
    /// Releases the requests with password "gate" (they then allow).
    gate: Arc<tokio::sync::Notify>,
}

async fn backend() -> Backend {
    use axum::{routing::post, Json, Router};
    let calls = Arc::new(AtomicUsize::new(0));
    let hanging = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (c, h, g) = (calls.clone(), hanging.clone(), gate.clone());
    let app = Router::new().route(
        "/auth",
        post(move |Json(req): Json<serde_json::Value>| {
            let (c, h, g) = (c.clone(), h.clone(), g.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                assert!(req["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
                let answer = match req["password"].as_str() {
                    Some("good") => serde_json::json!({"result": "allow"}),
                    Some("acl") => serde_json::json!({"result": "allow",
                        "acl": {"publish": ["up/%c"], "subscribe": ["down/%c"]}}),
                    Some("ignore") => serde_json::json!({"result": "ignore"}),
                    Some("named") => serde_json::json!({"result": "allow", "username": "hooked"}),
                    Some("gate") => {
                        h.fetch_add(1, Ordering::SeqCst);
                        g.notified().await;
                        serde_json::json!({"result": "allow"})
                    }
                    Some("hang") => {
                        h.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        unreachable!()
                    }
                    _ => serde_json::json!({"result": "deny"}),
                };
                Json(answer)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Backend {
        addr,
        calls,
        hanging,
        gate,
    }
}

fn webhook_config(url: &str) -> String {
    format!(
        "[auth]\nproviders = [\"anonymous\", \"http\"]\n[auth.http]\nurl = \"{url}\"\ntimeout_ms = 1000\ncache_entries = 100\ncache_ttl_secs = 600\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_webhook_allow_deny_and_cache() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    assert_eq!(
        code(s.mqtt, false, "w1", Some("u"), Some("good")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "w2", Some("u"), Some("bad")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(
        code(s.mqtt, false, "w3", Some("u"), Some("bad")).await,
        V3_NOT_AUTHORIZED
    );
    // "ignore" and no later provider: refused.
    assert_eq!(
        code(s.mqtt, true, "w4", Some("u"), Some("ignore")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);
    // The same credentials again: answered from the cache, allow and deny alike.
    assert_eq!(
        code(s.mqtt, true, "w1", Some("u"), Some("good")).await,
        0x00
    );
    assert_eq!(
        code(s.mqtt, false, "w2", Some("u"), Some("bad")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        b.calls.load(Ordering::SeqCst),
        4,
        "cache hits do not call the backend"
    );
    // Anonymous from loopback is decided on the shard, without the backend.
    assert_eq!(code(s.mqtt, false, "anon", None, None).await, V3_OK);
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);
    assert_eq!(refused(&s, "auth").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_with_the_connect_wait_for_the_answer_in_order() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    let mut raw = Raw::connect(s.mqtt).await;
    // CONNECT, SUBSCRIBE, PUBLISH to it (QoS 1) and PINGREQ in one write.
    let mut bytes = connect_bytes(false, "order1", Some("u"), Some("good"));
    bytes.extend(Raw::subscribe_v4("o/1", 1, 7));
    bytes.extend(Raw::publish_v4("o/1", 1, 8, b"hi"));
    bytes.extend([0xc0, 0x00]);
    raw.send(&bytes).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        match raw.next_v4(T).await {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
                assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success);
                seen.push("connack")
            }
            Ok(mqttbytes::v4::Packet::SubAck(a)) => {
                assert_eq!(a.pkid, 7);
                seen.push("suback")
            }
            Ok(mqttbytes::v4::Packet::PubAck(a)) => {
                assert_eq!(a.pkid, 8);
                seen.push("puback")
            }
            Ok(mqttbytes::v4::Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"hi");
                seen.push("publish")
            }
            Ok(mqttbytes::v4::Packet::PingResp) => seen.push("pingresp"),
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen[0], "connack", "{seen:?}");
    assert_eq!(seen[1], "suback", "{seen:?}");
    assert_eq!(*seen.last().unwrap(), "pingresp", "{seen:?}");
    assert!(
        seen.contains(&"puback") && seen.contains(&"publish"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_while_waiting_are_read_once_accepted() {
    // What the client sent while its CONNECT was being checked sits unread in the
    // socket; once accepted it must be read without waiting for new bytes or the tick
    // (60 s here, so a read that waited for it would miss T).
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[mqtt]\nconnect_timeout_secs = 60\n[shards]\ntick_ms = 60000\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut raw = Raw::connect(s.mqtt).await;
    raw.send(&connect_bytes(false, "gated", Some("u"), Some("gate")))
        .await;
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Sent while the gateway waits for the backend.
    let mut later = Raw::subscribe_v4("g/1", 0, 3);
    later.extend([0xc0, 0x00]);
    raw.send(&later).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.gate.notify_one();
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(
        matches!(raw.next_v4(T).await, Ok(mqttbytes::v4::Packet::SubAck(a)) if a.pkid == 3),
        "SUBACK after acceptance"
    );
    assert!(
        matches!(raw.next_v4(T).await, Ok(mqttbytes::v4::Packet::PingResp)),
        "PINGRESP after the SUBACK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_answers_server_unavailable_and_stalls_nobody() {
    let b = backend().await;
    let s = TestServer::start(&webhook_config(&format!("http://{}/auth", b.addr)));
    // Two clients whose backend call hangs, one per version.
    let slow5 = tokio::spawn(connack(s.mqtt, true, "slow5", Some("u"), Some("hang")));
    let slow4 = tokio::spawn(connack(s.mqtt, false, "slow4", Some("u"), Some("hang")));
    // While the backend holds both requests, others are served: anonymous on the shard,
    // and a cached device.
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut anon = v4::connect(v4::options(s.mqtt, "anon-during")).await;
    anon.client
        .publish("x/y", v4::QoS::AtLeastOnce, false, "p")
        .await
        .unwrap();
    assert!(
        anon.wait_for(T, |p| matches!(p, v4::Packet::PubAck(_)))
            .await,
        "anonymous client served while the backend hangs"
    );
    assert_eq!(slow5.await.unwrap().0, V5_UNAVAILABLE);
    assert_eq!(slow4.await.unwrap().0, V3_UNAVAILABLE);
    assert_eq!(refused(&s, "auth_unavailable").await, 2.0);
    assert_eq!(refused(&s, "auth").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_backend_answers_server_unavailable() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = TestServer::start(&webhook_config(&format!("http://127.0.0.1:{port}/auth")));
    assert_eq!(
        code(s.mqtt, true, "d5", Some("u"), Some("good")).await,
        V5_UNAVAILABLE
    );
    assert_eq!(
        code(s.mqtt, false, "d4", Some("u"), Some("good")).await,
        V3_UNAVAILABLE
    );
    // Unavailable answers are not cached: still unavailable, still asked.
    assert_eq!(
        code(s.mqtt, false, "d4", Some("u"), Some("good")).await,
        V3_UNAVAILABLE
    );
    assert_eq!(refused(&s, "auth_unavailable").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_acl_applies_to_that_connection() {
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[acl]\nenabled = true\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut connect = connect5("hook1", 30, true, None);
    connect.set_login("u", "acl");
    let (mut raw, _) = Raw::connected_v5(s.mqtt, &connect).await;
    let f =
        |path: &str| mqttbytes::v5::SubscribeFilter::new(path.into(), mqttbytes::QoS::AtLeastOnce);
    // The webhook's lists replace the default rules (which would allow devices/hook1/#).
    let ack = raw
        .subscribe_v5(1, vec![f("down/hook1"), f("devices/hook1/#")])
        .await;
    use mqttbytes::v5::SubscribeReasonCode as R;
    assert_eq!(ack.return_codes, vec![R::QoS1, R::NotAuthorized]);
    for (pkid, topic, reason) in [
        (2, "up/hook1", mqttbytes::v5::PubAckReason::Success),
        (
            3,
            "devices/hook1/x",
            mqttbytes::v5::PubAckReason::NotAuthorized,
        ),
    ] {
        let mut p = mqttbytes::v5::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, "x");
        p.pkid = pkid;
        raw.send(&common::encode(|b| p.write(b))).await;
        match raw.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::PubAck(a)) => assert_eq!(a.reason, reason, "{topic}"),
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }
}

/// A device gives up on a connection whose verdict is slow and comes back on a new one,
/// which is let in first. When the old verdict arrives it must not take the new
/// connection over: the old one is closed without a CONNACK, the new one keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_verdict_does_not_take_over_a_newer_connection() {
    let b = backend().await;
    let s = TestServer::start(&format!(
        "{}[shards]\ntick_ms = 100\n",
        webhook_config(&format!("http://{}/auth", b.addr))
    ));
    let mut old = TcpStream::connect(s.mqtt).await.unwrap();
    old.write_all(&connect_bytes(false, "flaky", Some("u"), Some("gate")))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while b.hanging.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Accepted a few ticks later than the old one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, mut new) = connack(s.mqtt, false, "flaky", Some("u"), Some("good")).await;
    assert_eq!(code, V3_OK);
    b.gate.notify_waiters();
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(T, old.read(&mut buf))
        .await
        .expect("the old connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "the old connection got no CONNACK: {:?}", &buf[..n]);
    // The new connection was not taken over: PINGREQ → PINGRESP.
    new.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(T, new.read_exact(&mut pong))
        .await
        .expect("PINGRESP")
        .expect("the new connection is open");
    assert_eq!(pong, [0xD0, 0x00]);
}

// ---------------------------------------------------------------------------------------
// Password storms (issue 17.1): the argon2 bound holds whatever times out, unknown users
// cost what known ones cost, and a storm from one address backs off.

/// `users` file with alice:`password`, hashed slower than the default (t = 8 passes of
/// 19 MiB) so that many queued checks reach their connect deadline mid-hash.
fn slow_password_file(dir: &std::path::Path, password: &str) -> std::path::PathBuf {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let params = argon2::Params::new(19_456, 8, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon.hash_password(password.as_bytes(), &salt).unwrap();
    let file = dir.join("users");
    std::fs::write(&file, format!("alice:{hash}\n")).unwrap();
    file
}

/// The process's thread count (`Threads:` of /proc/PID/status).
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Opens `n` connections from `src` (spread over about `spread`), each sending a CONNECT
/// for `user` with a wrong password; they stay open (nobody reads) until dropped.
async fn storm(
    target: SocketAddr,
    src: [u8; 4],
    user: &str,
    n: usize,
    spread: Duration,
) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((src, 0))).unwrap();
        let Ok(mut c) = s.connect(target).await else {
            continue;
        };
        let bytes = connect_bytes(false, &format!("storm-{i}"), Some(user), Some("wrong"));
        if c.write_all(&bytes).await.is_ok() {
            open.push(c);
        }
        tokio::time::sleep(spread / n as u32).await;
    }
    open
}

/// Connects alice with her password from 127.0.0.1 until one is let in (CONNACK 0) or
/// `within` passes; true if she got in.
async fn honest_gets_in(mqtt: SocketAddr, within: Duration) -> bool {
    let end = std::time::Instant::now() + within;
    let mut i = 0;
    while std::time::Instant::now() < end {
        i += 1;
        let attempt = async {
            let mut s = TcpStream::connect(mqtt).await.ok()?;
            let id = format!("honest-{i}");
            s.write_all(&connect_bytes(false, &id, Some("alice"), Some("right")))
                .await
                .ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf[3])
        };
        if let Ok(Some(0)) = tokio::time::timeout(Duration::from_secs(15), attempt).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// 300 wrong-password CONNECTs for a known user while the process's threads and RSS are
/// sampled: with 2 business threads, never more than 2 hashes run at once even though
/// most checks reach their 1 s connect deadline while queued or mid-hash (before the
/// fix each timed-out check released its permit while its hash ran on, and threads and
/// memory grew with the storm). Afterwards the honest user gets in and memory is back
/// near where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_storm_keeps_hashes_threads_and_memory_bounded() {
    let dir = tempdir::Dir::new("storm");
    let file = slow_password_file(&dir.0, "right");
    let gw = GatewayProcess::start(&format!(
        "[mqtt]\nconnect_timeout_secs = 1\n[http]\nbusiness_threads = 2\n\
         [auth]\nproviders = [\"password_file\"]\nfailure_backoff_after = 0\n\
         [auth.password_file]\npath = \"{}\"\n",
        file.display()
    ));
    let pid = gw.pid();
    // Warm up: one honest check (its blocking thread and memory area exist from now on).
    assert!(honest_gets_in(gw.mqtt, T).await, "alice before the storm");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base_threads, base_rss) = (threads(pid), gw.rss_bytes());

    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let rss = move || {
            let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 4096
        };
        tokio::spawn(async move {
            let (mut max_threads, mut max_rss) = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                max_threads = max_threads.max(threads(pid));
                max_rss = max_rss.max(rss());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (max_threads, max_rss)
        })
    };
    let open = storm(
        gw.mqtt,
        [127, 0, 0, 2],
        "alice",
        300,
        Duration::from_secs(4),
    )
    .await;
    // Let every queued check reach its deadline and every started hash end.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(open);
    sampling.store(false, Ordering::Relaxed);
    let (max_threads, max_rss) = sampler.await.unwrap();
    const MIB: u64 = 1 << 20;
    eprintln!(
        "storm: threads {base_threads} -> max {max_threads}; RSS {} MiB -> max {} MiB",
        base_rss / MIB,
        max_rss / MIB
    );
    // 2 hashing threads at most, and slack for the runtime's own (a store or HTTP
    // helper thread starting meanwhile); before the fix this run reached base + 33.
    assert!(
        max_threads <= base_threads + 2 + 4,
        "threads grew from {base_threads} to {max_threads} during the storm"
    );
    // At most 2 memory areas of 19 MiB, plus connection buffers and slack.
    assert!(
        max_rss <= base_rss + 2 * 19 * MIB + 48 * MIB,
        "RSS grew from {} MiB to {} MiB during the storm",
        base_rss / MIB,
        max_rss / MIB
    );
    assert!(
        honest_gets_in(gw.mqtt, Duration::from_secs(60)).await,
        "alice after the storm"
    );
    let after = gw.rss_bytes();
    eprintln!("storm: RSS after {} MiB", after / MIB);
    assert!(
        after <= base_rss + 2 * 19 * MIB + 32 * MIB,
        "RSS after the storm {} MiB, before {} MiB",
        after / MIB,
        base_rss / MIB
    );
}

/// The CONNACK code of one CONNECT from `src` and how long it took.
async fn timed_code(
    mqtt: SocketAddr,
    src: [u8; 4],
    id: &str,
    user: &str,
    pass: &str,
) -> (u8, Duration) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((src, 0))).unwrap();
    let mut s = s.connect(mqtt).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(&connect_bytes(false, id, Some(user), Some(pass)))
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .expect("CONNACK")
        .unwrap();
    (buf[3], started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// An unknown username is hashed against a dummy hash: it takes about as long as a
/// known user with a wrong password (before, ~0.1 ms against a full argon2 hash, which
/// told an attacker which usernames exist). Compared as medians with a wide margin
/// (a third), so a busy machine does not make it flaky.
#[tokio::test]
async fn unknown_users_take_as_long_as_wrong_passwords() {
    let dir = tempdir::Dir::new("enum");
    let file = slow_password_file(&dir.0, "right");
    let s = TestServer::start(&format!(
        "[auth]\nproviders = [\"password_file\"]\nfailure_backoff_after = 0\n\
         [auth.password_file]\npath = \"{}\"\n",
        file.display()
    ));
    let (mut known, mut unknown) = (vec![], vec![]);
    for i in 0..5 {
        let (c, t) = timed_code(s.mqtt, [127, 0, 0, 1], &format!("k{i}"), "alice", "wrong").await;
        assert_eq!(c, V3_NOT_AUTHORIZED);
        known.push(t);
        let (c, t) = timed_code(s.mqtt, [127, 0, 0, 1], &format!("u{i}"), "mallory", "wrong").await;
        assert_eq!(c, V3_NOT_AUTHORIZED);
        unknown.push(t);
    }
    let (k, u) = (median(known), median(unknown));
    assert!(
        u * 3 >= k,
        "unknown user {u:?}, known user with a wrong password {k:?}"
    );
}

/// A storm of wrong passwords from one address backs off after
/// `failure_backoff_after` failures: its later checks are refused without hashing, and
/// the honest user on another address gets in while the storm is still running. The
/// storming address is refused even with the right password until the back-off ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_from_one_address_backs_off_and_the_honest_user_gets_in() {
    let dir = tempdir::Dir::new("backoff");
    let file = slow_password_file(&dir.0, "right");
    let s = TestServer::start(&format!(
        "[http]\nbusiness_threads = 2\n\
         [auth]\nproviders = [\"password_file\"]\nfailure_backoff_after = 5\nfailure_backoff_secs = 600\n\
         [auth.password_file]\npath = \"{}\"\n",
        file.display()
    ));
    let mqtt = s.mqtt;
    let storming = tokio::spawn(async move {
        storm(
            mqtt,
            [127, 0, 0, 3],
            "alice",
            200,
            Duration::from_millis(300),
        )
        .await
    });
    // Without the back-off, 200 slow checks queue ahead of her for longer than the 10 s
    // connect timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        honest_gets_in(mqtt, Duration::from_secs(5)).await,
        "alice during the storm"
    );
    let (code, _) = timed_code(mqtt, [127, 0, 0, 3], "late", "alice", "right").await;
    assert_eq!(
        code, V3_NOT_AUTHORIZED,
        "the storming address is backed off"
    );
    drop(storming.await.unwrap());
}

/// Issue 17.5 for the other providers: `%u` is the password file's user, the name the
/// webhook answered (or, without one, the username it allowed), and nothing for an
/// anonymous client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_u_is_the_name_each_provider_vouched_for() {
    let dir = tempdir::Dir::new("pct-u");
    let file = dir.0.join("users");
    std::fs::write(&file, "").unwrap();
    passwd(&file, "alice", None, Some("s3cret"));
    let b = backend().await;
    let s = TestServer::start(&format!(
        "[auth]\nproviders = [\"anonymous\", \"password_file\", \"http\"]\nfailure_backoff_after = 0\n\
         [auth.password_file]\npath = \"{}\"\n\
         [auth.http]\nurl = \"http://{}/auth\"\ntimeout_ms = 1000\n\
         [acl]\nenabled = true\nno_match = \"deny\"\n\
         rules = [{{ permission = \"allow\", action = \"all\", topic = \"users/%u/#\" }}]\n",
        file.display(),
        b.addr
    ));
    use mqttbytes::v4::SubscribeReasonCode as R4;
    let ok = R4::Success(mqttbytes::QoS::AtLeastOnce);
    let cases = [
        // The password file's user.
        ("p1", Some(("alice", "s3cret")), [ok, R4::Failure]),
        // The webhook names "hooked" whatever username was sent.
        ("h1", Some(("carol", "named")), [R4::Failure, ok]),
        // The webhook allowed "carol" without naming anyone: carol it is.
        ("h2", Some(("carol", "good")), [R4::Failure, R4::Failure]),
        // Anonymous: no %u at all.
        ("a1", None, [R4::Failure, R4::Failure]),
    ];
    for (id, login, want) in cases {
        let (user, pass) = login.unzip();
        let (code, stream) = connack(s.mqtt, false, id, user, pass).await;
        assert_eq!(code, V3_OK, "{id}");
        let mut raw = Raw::from_stream(stream);
        let codes = suback(&mut raw, 1, &["users/alice/#", "users/hooked/#"]).await;
        assert_eq!(codes, want, "{id}");
        if id == "h2" {
            assert_eq!(suback(&mut raw, 2, &["users/carol/#"]).await, vec![ok]);
        }
    }
}

/// SUBSCRIBE to `filters` (QoS 1, 3.1.1) and the SUBACK's codes.
async fn suback(
    raw: &mut Raw,
    pkid: u16,
    filters: &[&str],
) -> Vec<mqttbytes::v4::SubscribeReasonCode> {
    let mut sub = mqttbytes::v4::Subscribe::new(filters[0], mqttbytes::QoS::AtLeastOnce);
    for f in &filters[1..] {
        sub.add((*f).into(), mqttbytes::QoS::AtLeastOnce);
    }
    sub.pkid = pkid;
    raw.send(&common::encode(|b| sub.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => a.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}
