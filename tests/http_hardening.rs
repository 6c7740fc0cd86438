//! The HTTP listener under hostile or careless use, over real sockets: who the tokenless
//! `/v1` API answers (issue 16.1), half-sent requests and the connection cap (17.3), body
//! limits and timeouts (16.9, 17.10), and the error shapes of 401 and 405 (16.10).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{v4, GatewayProcess, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// A reqwest client whose connections come from `src` (any 127.x address is loopback).
fn client_from(src: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(src.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn get(c: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = c
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("get");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Sends `head` (and `body`) on a fresh connection and reads the answer's status line
/// and body, up to `T`.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_answer(&mut s).await
}

async fn read_answer(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + T;
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let code = text[9..12].parse().unwrap();
                return (code, text[end + 4..end + 4 + len].to_string());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!(
                "no full answer ({other:?}); got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 16.1: the tokenless API answers only `tokenless_networks` (loopback by default).

/// The default list is loopback (127.0.0.0/8 and ::1), and every test client is on
/// loopback: narrowing the list to 127.0.0.1 makes 127.0.0.2 a "remote" source, so the
/// refusal is exercised over a real connection. (That the default list refuses
/// non-loopback peers is checked on the decision function in `api::tests`.)
#[tokio::test]
async fn tokenless_v1_refuses_other_sources_while_health_and_metrics_answer() {
    let gw = TestServer::start("[http]\ntokenless_networks = [\"127.0.0.1/32\"]\n");
    let remote = client_from("127.0.0.2");
    let (code, body) = get(&remote, gw.http, "/v1/stats").await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"]["code"], "remote_api_disabled");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("[http] tokens") && msg.contains("allow_remote_without_token"),
        "{msg}"
    );
    let r = remote
        .post(format!("http://{}/v1/push", gw.http))
        .json(&json!({"topic": "t", "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "pushes are refused too");
    for open in ["/metrics", "/healthz", "/readyz"] {
        let r = remote
            .get(format!("http://{}{open}", gw.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{open} stays scrapable");
    }
    let local = client_from("127.0.0.1");
    assert_eq!(get(&local, gw.http, "/v1/stats").await.0, 200);
}

#[tokio::test]
async fn allow_remote_without_token_opens_v1_to_every_source() {
    let gw = TestServer::start(
        "[http]\ntokenless_networks = [\"127.0.0.1/32\"]\nallow_remote_without_token = true\n",
    );
    let (code, body) = get(&client_from("127.0.0.2"), gw.http, "/v1/stats").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn the_default_config_answers_v1_on_loopback() {
    let gw = TestServer::start("");
    for src in ["127.0.0.1", "127.0.0.2"] {
        assert_eq!(get(&client_from(src), gw.http, "/v1/stats").await.0, 200);
    }
}

// ---------------------------------------------------------------------------------------
// 16.10: 401 and 405.

#[tokio::test]
async fn with_tokens_a_tokenless_request_is_401_with_www_authenticate_and_the_scheme_is_case_insensitive(
) {
    let gw = TestServer::start("[http]\ntokens = [\"t0k3n\"]\n");
    let c = reqwest::Client::new();
    let url = format!("http://{}/v1/stats", gw.http);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    for auth in ["Bearer t0k3n", "bearer t0k3n", "BEARER t0k3n"] {
        let r = c
            .get(&url)
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{auth}");
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_with_a_json_error() {
    let gw = TestServer::start("");
    let c = reqwest::Client::new();
    for (m, path) in [
        (reqwest::Method::GET, "/v1/push"),
        (reqwest::Method::PUT, "/v1/clients/x"),
        (reqwest::Method::POST, "/metrics"),
    ] {
        let r = c
            .request(m.clone(), format!("http://{}{path}", gw.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{m} {path}");
        let body: Value = r.json().await.expect("a JSON body");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{m} {path}");
    }
}

// ---------------------------------------------------------------------------------------
// 17.3: half-sent requests (slowloris).

/// Opens a connection from 127.0.0.(2 + i % 50) and sends half a request head.
async fn half_sent(i: usize, addr: SocketAddr) -> TcpStream {
    let mut s = common::connect_from(i, addr).await.expect("connect");
    s.write_all(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        .await
        .unwrap();
    s
}

/// 60 half-sent requests against a cap of 20: the gateway never holds more than the cap
/// (counted in its own file descriptors), MQTT devices still connect, the half-sent
/// connections are closed after `header_timeout_ms`, and a normal push is served once
/// the slots free up.
#[tokio::test]
async fn half_sent_requests_are_capped_and_timed_out_and_do_not_stop_mqtt_or_pushes() {
    let gw = GatewayProcess::start("[http]\nmax_connections = 20\nheader_timeout_ms = 1500\n");
    // Settle: one scrape, so lazily opened fds are there before the baseline.
    assert_eq!(common::http_get(gw.http, "/healthz").await.0, 200);
    let baseline = gw.open_fds();
    let mut slow = Vec::new();
    for i in 0..60 {
        slow.push(half_sent(i, gw.http).await);
    }
    // Sample the gateway's fds for a while: never more than the cap above the baseline.
    let mut most = 0;
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        most = most.max(gw.open_fds().saturating_sub(baseline));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= 20 + 2,
        "the gateway held {most} more fds than before the 60 half-sent requests (cap 20): {:?}",
        gw.fd_targets()
    );

    // MQTT is not affected.
    let mut dev = v4::connect(v4::options(gw.mqtt, "dev-slowloris")).await;
    let _ = &mut dev;

    // A well-behaved push gets through once the half-sent ones time out.
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/push", gw.http))
        .json(&json!({"client_id": "dev-slowloris", "topic": "t", "payload": "x"}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the push is served");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["status"],
        "sent",
        "{body} after {:?}",
        started.elapsed()
    );

    // The first half-sent connections were closed by the gateway.
    let mut first = slow.swap_remove(0);
    assert!(
        closed_by_gateway(&mut first).await,
        "a half-sent request was never closed"
    );
}

/// Reads `s` until the gateway closes it (EOF or reset): true if that happens within `T`.
async fn closed_by_gateway(s: &mut TcpStream) -> bool {
    let mut b = vec![0u8; 65536];
    let drained = tokio::time::timeout(T, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    });
    drained.await.is_ok()
}

/// A client that pipelines requests and never reads an answer, with the only connection
/// slot (`max_connections = 1`): once its socket buffers are full the gateway's writes
/// make no progress, and after `write_timeout_ms` the connection is closed, so the slot
/// frees and another client is served. (Without the write deadline the slot is held for
/// as long as the client stays, and the second client waits forever.)
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_closed_after_write_timeout_ms() {
    let gw = GatewayProcess::start("[http]\nmax_connections = 1\nwrite_timeout_ms = 1000\n");
    // A small receive buffer, so the answers back up after a few kilobytes.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&gw.http.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut hog = TcpStream::from_std(sock.into()).unwrap();
    // Enough /metrics answers to fill any loopback buffer many times over.
    let one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    hog.write_all(&one.repeat(2000)).await.unwrap();

    let started = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("http://{}/healthz", gw.http))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("served once the stalled connection is closed");
    assert_eq!(r.status().as_u16(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "served after {waited:?}: the slot was never held, so this shows nothing"
    );

    // The stalled connection was closed: draining it ends (EOF or reset).
    assert!(
        closed_by_gateway(&mut hog).await,
        "the stalled connection was never closed"
    );
}

// ---------------------------------------------------------------------------------------
// 16.9, 17.10: body limits and timeouts.

/// A body whose Content-Length is over the batch limit is refused before it is sent.
#[tokio::test]
async fn an_oversized_batch_is_413_before_its_body_is_read() {
    let gw = TestServer::start(
        "[http]\nmax_batch = 1\n[mqtt]\nmax_packet_size = 1024\nmax_topic_len = 64\n",
    );
    let head = format!(
        "POST /v1/push/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        1 << 30
    );
    let (code, body) = raw(gw.http, head.as_bytes()).await;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
}

/// A body that stops half-way is answered 408 after `body_timeout_ms`.
#[tokio::test]
async fn a_body_that_never_arrives_is_408() {
    let gw = TestServer::start("[http]\nbody_timeout_ms = 300\n");
    let head = "POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"topic\":";
    let (code, body) = raw(gw.http, head.as_bytes()).await;
    assert_eq!(code, 408, "{body}");
    assert!(body.contains("body_timeout"), "{body}");
}

/// A message whose payload is all control bytes (6 bytes each once JSON-escaped) is
/// accepted by the single push exactly when the batch accepts it.
#[tokio::test]
async fn single_push_and_batch_accept_the_same_escaped_message() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 4096\n");
    let payload = "\u{1}".repeat(3000);
    let msg = json!({"topic": "t/esc", "payload": payload});
    assert!(
        msg.to_string().len() > 4096 * 2 + 4096,
        "the body is escaped"
    );
    let c = reqwest::Client::new();
    let r = c
        .post(format!("http://{}/v1/push/batch", gw.http))
        .json(&json!({"messages": [msg.clone()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["results"][0]["matched"], 0, "{b}");
    let r = c
        .post(format!("http://{}/v1/push", gw.http))
        .json(&msg)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let b: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(code, 200, "{b}");
}

#[tokio::test]
async fn content_type_must_be_exactly_application_json() {
    let gw = TestServer::start("");
    let c = reqwest::Client::new();
    let body = r#"{"topic":"t","payload":"x"}"#;
    for (ct, want) in [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/jsonx", 415),
        ("application/json-patch+json", 415),
        ("text/plain", 415),
    ] {
        let r = c
            .post(format!("http://{}/v1/push", gw.http))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{ct}");
    }
}

/// The first stdout line of the real binary, started with `toml`, that contains `needle`
/// (or `None` once it says it listens and 2 s more pass without it).
fn startup_line(toml: &str, needle: &str) -> Option<String> {
    use std::io::BufRead;
    let dir = common::tempdir::Dir::new("startup-log");
    let path = dir.0.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut deadline = Instant::now() + Duration::from_secs(20);
    let mut found = None;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains(needle) {
            found = Some(line);
            break;
        }
        if line.contains("gateway listening") {
            deadline = Instant::now() + Duration::from_secs(2);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

const STARTUP: &str = "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n[store]\nenabled = false\n[log]\nlevel = \"info\"\n";

#[test]
fn an_api_open_to_every_source_is_logged_loudly_and_the_default_says_who_it_answers() {
    let open = STARTUP.replace("[http]\n", "[http]\nallow_remote_without_token = true\n");
    let line = startup_line(&open, "OPEN TO EVERY SOURCE").expect("the warning is logged");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("set [http] tokens"), "{line}");
    let line = startup_line(STARTUP, "/v1 API").expect("the default says who /v1 answers");
    assert!(line.contains("tokenless_networks"), "{line}");
    let wide = STARTUP.replace("[http]\n", "[http]\ntokenless_networks = [\"0.0.0.0/0\"]\n");
    let line = startup_line(&wide, "reaches beyond loopback").expect("a wide list is logged");
    assert!(
        line.contains("WARN") && line.contains("0.0.0.0/0"),
        "{line}"
    );
}

/// Lowers RLIMIT_NOFILE (soft and hard, so the gateway cannot raise it) in the child.
fn limit_fds(cmd: &mut std::process::Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// With few file descriptors (256) and the default cap (1024), HTTP takes at most a
/// quarter of them: 150 half-sent requests leave room for 100 MQTT devices.
#[tokio::test]
async fn half_sent_requests_leave_file_descriptors_for_mqtt() {
    let gw = GatewayProcess::start_with("[http]\nheader_timeout_ms = 60000\n", |cmd| {
        limit_fds(cmd, 256)
    });
    let mut slow = Vec::new();
    for i in 0..150 {
        slow.push(half_sent(i, gw.http).await);
    }
    let mut devices = Vec::new();
    for i in 0..100 {
        let stream = common::connect_from(i + 7, gw.mqtt)
            .await
            .expect("tcp connect");
        let mut dev = common::Raw::from_stream(stream);
        dev.send(&common::Raw::connect_v4(&format!("fd-{i}"), 60, true))
            .await;
        let got = dev.recv_v4(T).await;
        assert!(
            matches!(got, Ok(mqttbytes::v4::Packet::ConnAck(_))),
            "device {i} got {got:?} with {} fds open in the gateway",
            gw.open_fds()
        );
        devices.push(dev);
    }
    assert_eq!(slow.len(), 150);
}
