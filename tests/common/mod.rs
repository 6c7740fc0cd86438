//! Shared test harness: a real gateway on loopback (in-process or as the real binary),
//! real MQTT clients (rumqttc v4/v5 and a raw TCP client built on mqttbytes for the
//! byte-level cases), and a real HTTP client.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gateway::config::Config;
use gateway::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub mod api;
pub mod auth;
pub mod fleet;
pub mod https;
pub mod nats;
pub mod pausable;
mod raw;
pub mod sessions;
pub mod store;
pub mod tempdir;
pub mod tls;
pub mod v4;
pub mod v5;
pub mod ws;

pub use raw::Raw;

/// The config every test starts from: loopback, ephemeral ports, two shards.
pub const BASE: &str = r#"
[mqtt]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[shards]
count = 2
[log]
level = "warn"
# The default ACL confines devices to devices/<client id>/#; the suites use arbitrary
# topics, so they run without it. tests/acl.rs turns it back on.
[acl]
enabled = false
"#;

/// `extra` TOML merged over `base` section by section (keys of `extra` win).
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut base: toml::Table = base.parse().expect("base toml");
    let extra: toml::Table = extra.parse().expect("extra toml");
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => b.extend(e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    toml::to_string(&base).expect("toml")
}

/// Merges `extra` TOML (whole sections) over [`BASE`].
pub fn config(extra: &str) -> Config {
    Config::from_toml_str(&merge_toml(BASE, extra)).expect("valid test config")
}

/// `extra` with `[store] path` set to `dir` unless it names a path itself: every test
/// gateway gets its own durable store (redb locks its file), removed with the test.
pub fn with_store_dir(extra: &str, dir: &std::path::Path) -> String {
    let mut t: toml::Table = extra.parse().expect("extra toml");
    let store = t
        .entry("store")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(st) = store {
        st.entry("path")
            .or_insert_with(|| toml::Value::String(dir.join("data").display().to_string()));
    }
    toml::to_string(&t).expect("toml")
}

/// A gateway running inside the test process.
pub struct TestServer {
    server: Option<Server>,
    pub mqtt: SocketAddr,
    /// The TLS listener, when the config sets `mqtt.tls_listen`.
    pub tls: Option<SocketAddr>,
    /// The WebSocket listeners, when the config sets `mqtt.ws_listen` / `mqtt.wss_listen`.
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub http: SocketAddr,
    /// Its store directory (dropped after the server: field order).
    _store: tempdir::Dir,
}

impl TestServer {
    pub fn start(extra: &str) -> TestServer {
        let dir = tempdir::Dir::new("store");
        let server =
            Server::start(config(&with_store_dir(extra, &dir.0)), None).expect("server starts");
        TestServer {
            mqtt: server.mqtt_addr,
            tls: server.tls_addr,
            ws: server.ws_addr,
            wss: server.wss_addr,
            http: server.http_addr,
            server: Some(server),
            _store: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.mqtt.port()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.http, "/metrics").await.1
    }

    /// The value of one sample, e.g. `gateway_disconnects_total{reason="keepalive"}`;
    /// for a per-shard gauge name without labels, the sum over shards.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Polls a metric until `pred` holds or `timeout` passes; returns the last value.
    pub async fn wait_metric(
        &self,
        sample: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        wait_metric(self.http, sample, timeout, pred).await
    }
}

/// Polls `sample` on the `/metrics` of `http` until `pred` holds or `timeout` passes;
/// returns the last value (a `GatewayProcess`'s, for one: its `http`).
pub async fn wait_metric(
    http: SocketAddr,
    sample: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric_value(&http_get(http, "/metrics").await.1, sample);
        if pred(v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            // Runtimes may not be dropped inside an async context: stop from a plain thread.
            let _ = std::thread::spawn(move || s.shutdown()).join();
        }
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    let mut sum = 0.0;
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let bare = name.split('{').next().unwrap_or(name);
        if name == sample || (!sample.contains('{') && bare == sample) {
            sum += value.parse::<f64>().unwrap_or(f64::NAN);
            found = true;
        }
    }
    assert!(found, "metric {sample} not found in:\n{text}");
    sum
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("http get");
    let code = resp.status().as_u16();
    (code, resp.text().await.expect("body"))
}

/// POSTs a JSON body (no bearer token) and returns the status and the JSON answer
/// (`null` if the answer is not JSON).
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(body)
        .send()
        .await
        .expect("http post");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The real `gateway` binary, started with a config file; killed on drop if still running.
pub struct GatewayProcess {
    pub child: Child,
    pub mqtt: SocketAddr,
    /// The TLS listener, when the config sets `mqtt.tls_listen`.
    pub tls: Option<SocketAddr>,
    pub http: SocketAddr,
    _dir: tempdir::Dir,
}

impl GatewayProcess {
    /// Starts the binary with BASE + `extra` as its config and waits for its listening line.
    /// Starts the binary with BASE + `extra` as its config and waits for its listening line.
    pub fn start(extra: &str) -> GatewayProcess {
        GatewayProcess::start_with(extra, |_| {})
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What each open fd points at (for failure messages).
    pub fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/statm", self.pid())).unwrap_or_default();
        s.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&http_get(self.http, "/metrics").await.1, sample)
    }

    /// The config file the process was started with (a reload reads it again).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.0.join("gateway.toml")
    }

    /// Merges `extra` TOML (whole sections) into the config file on disk.
    pub fn edit_config(&self, extra: &str) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, merge_toml(&text, extra)).unwrap();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn expect_connack_v4(mut c: v4::Client) -> v4::Client {
    assert!(
        c.wait_for(Duration::from_secs(5), |p| matches!(p, rumqttc::Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success)).await,
        "no successful CONNACK"
    );
    c
}

// ---------------------------------------------------------------------------------------
// Helpers for the lifecycle, timer and MQTT 5 tests (tests/lifecycle.rs, tests/timers.rs,
// tests/mqtt5.rs).

/// Connects from 127.0.0.(2 + i % 50), so thousands of connections never run out of
/// ephemeral ports on one source address.
pub async fn connect_from(i: usize, target: SocketAddr) -> std::io::Result<TcpStream> {
    let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 50) as u8);
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(std::net::IpAddr::V4(src), 0))?;
    s.connect(target).await
}

/// The bytes of one packet encoded by mqttbytes, e.g. `encode(|b| publish.write(b))`.
pub fn encode(write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Vec<u8> {
    let mut b = BytesMut::new();
    write(&mut b).expect("mqttbytes encodes the packet");
    b.to_vec()
}

/// An MQTT 5 CONNECT with a client id, keep-alive, clean start and properties.
pub fn connect5(
    id: &str,
    keep_alive: u16,
    clean_start: bool,
    props: Option<mqttbytes::v5::ConnectProperties>,
) -> mqttbytes::v5::Connect {
    let mut c = mqttbytes::v5::Connect::new(id);
    c.keep_alive = keep_alive;
    c.clean_session = clean_start;
    c.properties = props;
    c
}

/// MQTT 5 CONNECT properties with only Session Expiry Interval set (others default).
pub fn session_expiry_props(secs: u32) -> mqttbytes::v5::ConnectProperties {
    mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(secs),
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

impl GatewayProcess {
    /// Like [`GatewayProcess::start`], letting the caller adjust the command first (for
    /// example lower a resource limit in `pre_exec`).
    pub fn start_with(extra: &str, configure: impl FnOnce(&mut Command)) -> GatewayProcess {
        let dir = tempdir::Dir::new("proc");
        let path = dir.0.join("gateway.toml");
        let base = merge_toml(BASE, "[log]\nlevel = \"info\"");
        std::fs::write(&path, merge_toml(&base, &with_store_dir(extra, &dir.0))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn gateway");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // GATEWAY_TEST_LOG=1 echoes each process's log to stderr, prefixed by its pid.
        let echo = std::env::var_os("GATEWAY_TEST_LOG").map(|_| child.id());
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(pid) = echo {
                    eprintln!("[{pid}] {line}");
                }
                if line.contains("gateway listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gateway announces its addresses");
        let plain = strip_ansi(&line);
        let field = |name: &str| -> SocketAddr {
            let start = plain.find(&format!("{name}=")).expect("address field") + name.len() + 1;
            plain[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .expect("address")
        };
        let tls = plain.contains("tls_addr=").then(|| field("tls_addr"));
        GatewayProcess {
            mqtt: field("mqtt_addr"),
            tls,
            http: field("http_addr"),
            child,
            _dir: dir,
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Adds (or changes) `user` with password `pass` in the password file `file`, with
/// `gateway passwd FILE USER --password PASS`; panics with its stderr if that fails.
pub fn passwd(file: &std::path::Path, user: &str, pass: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .arg("--password")
        .arg(pass)
        .output()
        .expect("gateway passwd runs");
    assert!(
        out.status.success(),
        "gateway passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the `gateway` binary with `args` to completion (killed after `timeout`, which
/// then panics): (exit code, stdout, stderr).
pub fn run_gateway(args: &[&std::ffi::OsStr], timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    // Read both pipes on their own threads so a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let mut bytes = Vec::new();
                let _ = r.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway {args:?} still running after {timeout:?}");
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    (
        status.code(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------
// A gateway whose /metrics reports a real logger's dropped lines.

impl TestServer {
    /// Like [`TestServer::start`], but hands `log` to the server so that
    /// `gateway_log_lines_dropped_total` counts the lines that logger dropped.
    pub fn start_with_log(extra: &str, log: &gateway::logging::LogGuard) -> TestServer {
        let dir = tempdir::Dir::new("store");
        let server = Server::start(config(&with_store_dir(extra, &dir.0)), Some(log))
            .expect("server starts");
        TestServer {
            mqtt: server.mqtt_addr,
            tls: server.tls_addr,
            ws: server.ws_addr,
            wss: server.wss_addr,
            http: server.http_addr,
            server: Some(server),
            _store: dir,
        }
    }
}

/// Makes `cmd` start with a soft RLIMIT_NOFILE of at most `low`, and the hard limit too
/// when `hard` (the gateway raises its soft limit to the hard one at start).
pub fn limit_nofile(cmd: &mut Command, low: libc::rlim_t, hard: bool) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // getrlimit/setrlimit, which are async-signal-safe, on its own stack data.
    unsafe {
        cmd.pre_exec(move || {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            l.rlim_cur = low.min(l.rlim_max);
            if hard {
                l.rlim_max = l.rlim_cur;
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The exit code `gateway doctor` owes for its report `out`: 1 when an item is LOW, else 0.
pub fn doctor_exit_code(out: &str) -> Option<i32> {
    let low = out
        .lines()
        .any(|l| l.split_whitespace().last() == Some("LOW"));
    Some(if low { 1 } else { 0 })
}

/// True if `bin` is on PATH. Otherwise the test is skipped with a printed reason, except
/// under CI (`CI` set), where a missing binary is a failure: `.ci/run` must install the
/// Debian `package`.
pub fn have_binary(bin: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{bin} missing under CI: .ci/run must install the Debian package {package}"
        );
        eprintln!("SKIPPED: {bin} not installed (apt-get install {package})");
    }
    found
}

/// MQTT 5 PUBLISH properties with nothing set, for `..empty_publish_props()` in tests.
pub fn empty_publish_props() -> mqttbytes::v5::PublishProperties {
    mqttbytes::v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}

/// A hand-built MQTT frame: first byte, Remaining Length (written here, not by the
/// gateway's encoder), body. For byte-level tests of malformed and unusual packets.
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![byte1];
    let mut n = body.len();
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        f.push(b);
        if n == 0 {
            break;
        }
    }
    f.extend_from_slice(body);
    f
}

/// An MQTT string: 2-byte length, bytes.
pub fn s(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}
