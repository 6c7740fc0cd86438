//! Helpers of the authentication suites (tests/auth*.rs): raw CONNECTs that read the exact
//! CONNACK code, the real `gateway passwd` binary, and a webhook backend started by the test.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const T: Duration = Duration::from_secs(10);

pub const V3_OK: u8 = 0x00;
pub const V3_UNAVAILABLE: u8 = 0x03;
pub const V3_NOT_AUTHORIZED: u8 = 0x05;
pub const V5_BAD_CREDENTIALS: u8 = 0x86;
pub const V5_UNAVAILABLE: u8 = 0x88;

/// CONNECT bytes with optional username and password, MQTT 3.1.1 or 5.
pub fn connect_bytes(v5: bool, id: &str, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
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
pub fn v5_password_only(id: &str, pass: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02 | 0x40, 0, 30, 0];
    body.extend(super::s(id.as_bytes()));
    body.extend(super::s(pass.as_bytes()));
    super::frame(0x10, &body)
}

/// Connects, sends the CONNECT and returns the CONNACK code (byte 3 in both versions)
/// and the still open stream.
pub async fn connack(
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

pub async fn code(
    addr: SocketAddr,
    v5: bool,
    id: &str,
    user: Option<&str>,
    pass: Option<&str>,
) -> u8 {
    connack(addr, v5, id, user, pass).await.0
}

pub async fn refused(s: &TestServer, reason: &str) -> f64 {
    s.metric(&format!(
        "gateway_connect_refused_total{{reason=\"{reason}\"}}"
    ))
    .await
}

pub fn passwd(file: &std::path::Path, user: &str, stdin: Option<&str>, flag: Option<&str>) {
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

/// A tiny auth backend: the password says what to answer. `calls` counts requests;
/// "hang" never answers (until the test ends).
pub struct Backend {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub hanging: Arc<AtomicUsize>,
    /// Releases the requests with password "gate" (they then allow).
    pub gate: Arc<tokio::sync::Notify>,
}

pub async fn backend() -> Backend {
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

pub fn webhook_config(url: &str) -> String {
    format!(
        "[auth]\nproviders = [\"anonymous\", \"http\"]\n[auth.http]\nurl = \"{url}\"\ntimeout_ms = 1000\ncache_entries = 100\ncache_ttl_secs = 600\n"
    )
}

/// SUBSCRIBE to `filters` (QoS 1, 3.1.1) and the SUBACK's codes.
pub async fn suback(
    raw: &mut Raw,
    pkid: u16,
    filters: &[&str],
) -> Vec<mqttbytes::v4::SubscribeReasonCode> {
    let mut sub = mqttbytes::v4::Subscribe::new(filters[0], mqttbytes::QoS::AtLeastOnce);
    for f in &filters[1..] {
        sub.add((*f).into(), mqttbytes::QoS::AtLeastOnce);
    }
    sub.pkid = pkid;
    raw.send(&super::encode(|b| sub.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => a.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}
