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
pub mod fleet;
pub mod https;
pub mod nats;
pub mod store;
pub mod tls;
pub mod ws;

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
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(sample).await;
            if pred(v) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

pub mod tempdir {
    /// A scratch directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "gateway-test-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
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

// ---------------------------------------------------------------------------------------
// rumqttc clients whose events arrive on a channel.

pub mod v4 {
    use super::*;
    pub use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
        pub task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects and waits for CONNACK; panics if it does not come.
    pub async fn connect(o: MqttOptions) -> Client {
        let c = connect_raw(o);
        super::expect_connack_v4(c).await
    }

    /// Starts the event loop without waiting for anything.
    pub fn connect_raw(o: MqttOptions) -> Client {
        let (client, mut el) = AsyncClient::new(o, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Client {
            client,
            events,
            task,
        }
    }

    impl Client {
        /// Next incoming PUBLISH within `timeout`.
        pub async fn next_publish(&mut self, timeout: Duration) -> Option<rumqttc::Publish> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(Packet::Publish(p))))) => return Some(p),
                    Ok(Some(Ok(_))) => continue,
                    _ => return None,
                }
            }
        }

        /// Waits for an incoming packet matching `f`.
        pub async fn wait_for(&mut self, timeout: Duration, f: impl Fn(&Packet) -> bool) -> bool {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(p)))) if f(&p) => return true,
                    Ok(Some(Ok(_))) => continue,
                    _ => return false,
                }
            }
        }

        /// Waits until the event loop reports the connection failed.
        pub async fn wait_closed(&mut self, timeout: Duration) -> Option<String> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Err(e))) => return Some(e),
                    Ok(Some(Ok(_))) => continue,
                    Ok(None) => return Some("event loop ended".into()),
                    Err(_) => return None,
                }
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe request");
            assert!(
                self.wait_for(Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_)))
                    .await,
                "no SUBACK for {filter}"
            );
        }
    }
}

pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::Packet;
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
        pub task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub fn connect_raw(o: MqttOptions) -> Client {
        let (client, mut el) = AsyncClient::new(o, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                }
            }
        });
        Client {
            client,
            events,
            task,
        }
    }

    pub async fn connect(o: MqttOptions) -> Client {
        let mut c = connect_raw(o);
        assert!(
            c.wait_for(Duration::from_secs(5), |p| matches!(p, Packet::ConnAck(a) if a.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success)).await,
            "no successful CONNACK"
        );
        c
    }

    impl Client {
        pub async fn wait_for(&mut self, timeout: Duration, f: impl Fn(&Packet) -> bool) -> bool {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(p)))) if f(&p) => return true,
                    Ok(Some(Ok(_))) => continue,
                    _ => return false,
                }
            }
        }

        pub async fn next_publish(
            &mut self,
            timeout: Duration,
        ) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(Packet::Publish(p))))) => return Some(p),
                    Ok(Some(Ok(_))) => continue,
                    _ => return None,
                }
            }
        }

        /// The next packet the server sent, whatever it is.
        pub async fn next_incoming(&mut self, timeout: Duration) -> Option<Result<Packet, String>> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(p)))) => return Some(Ok(p)),
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(e))) => return Some(Err(e)),
                    _ => return None,
                }
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe request");
            assert!(
                self.wait_for(Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_)))
                    .await,
                "no SUBACK for {filter}"
            );
        }
    }
}

async fn expect_connack_v4(mut c: v4::Client) -> v4::Client {
    assert!(
        c.wait_for(Duration::from_secs(5), |p| matches!(p, rumqttc::Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success)).await,
        "no successful CONNACK"
    );
    c
}

// ---------------------------------------------------------------------------------------
// A raw MQTT client for byte-level tests: writes exactly what the test says, decodes what
// the server sends with mqttbytes.

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).await.expect("tcp connect"))
    }

    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// CONNECT bytes for MQTT 3.1.1.
    pub fn connect_v4(id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
        let mut c = mqttbytes::v4::Connect::new(id);
        c.keep_alive = keep_alive;
        c.clean_session = clean;
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b.to_vec()
    }

    /// CONNECT bytes for MQTT 5.
    pub fn connect_v5(
        id: &str,
        keep_alive: u16,
        props: Option<mqttbytes::v5::ConnectProperties>,
    ) -> Vec<u8> {
        let mut c = mqttbytes::v5::Connect::new(id);
        c.keep_alive = keep_alive;
        c.properties = props;
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b.to_vec()
    }

    pub fn publish_v4(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut p =
            mqttbytes::v4::Publish::new(topic, mqttbytes::qos(qos).unwrap(), payload.to_vec());
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b.to_vec()
    }

    pub fn subscribe_v4(filter: &str, qos: u8, pkid: u16) -> Vec<u8> {
        let mut s = mqttbytes::v4::Subscribe::new(filter, mqttbytes::qos(qos).unwrap());
        s.pkid = pkid;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        b.to_vec()
    }

    /// Reads more into the buffer (straight into it: a 64 KiB array here would sit in every
    /// future awaiting a packet and overflow a test thread's stack in deep test helpers).
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), &'static str> {
        self.buf.reserve(65536);
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) => Err("closed"),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("closed"),
            Err(_) => Err("timeout"),
        }
    }

    /// Next MQTT 3.1.1 packet from the server, or Err("closed"/"timeout").
    pub async fn recv_v4(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v4::Packet, &'static str> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match mqttbytes::v4::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill(deadline).await?,
                Err(_) => return Err("undecodable"),
            }
        }
    }

    /// Next MQTT 5 packet from the server, or Err("closed"/"timeout").
    pub async fn recv_v5(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v5::Packet, &'static str> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match mqttbytes::v5::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill(deadline).await?,
                Err(_) => return Err("undecodable"),
            }
        }
    }

    /// True if the server closes the connection within `timeout` (any bytes are skipped).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.fill(deadline).await {
                Ok(()) => continue,
                Err("closed") => return true,
                Err(_) => return false,
            }
        }
    }
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

impl Raw {
    /// [`Raw::recv_v5`] behind a box. `recv_v5` keeps a 64 KiB read buffer in its future,
    /// and a debug build gives every awaited future of an async fn its own stack slot, so a
    /// test awaiting it a dozen times overflows the 2 MiB test thread stack; these
    /// wrappers keep the caller's future a pointer wide.
    pub async fn next_v5(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v5::Packet, &'static str> {
        Box::pin(self.recv_v5(timeout)).await
    }

    /// [`Raw::recv_v4`] behind a box (see [`Raw::next_v5`]).
    pub async fn next_v4(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v4::Packet, &'static str> {
        Box::pin(self.recv_v4(timeout)).await
    }

    /// [`Raw::closed_within`] behind a box (see [`Raw::next_v5`]).
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        Box::pin(self.closed_within(timeout)).await
    }

    /// Sends `connect` and returns the server's first packet, which must be a CONNACK.
    pub async fn handshake_v5(
        &mut self,
        connect: &mqttbytes::v5::Connect,
    ) -> mqttbytes::v5::ConnAck {
        self.send(&encode(|b| connect.write(b))).await;
        match self.next_v5(Duration::from_secs(5)).await {
            Ok(mqttbytes::v5::Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK for {}, got {other:?}", connect.client_id),
        }
    }

    /// Connects a raw MQTT 5 client and panics unless the CONNACK is a success.
    pub async fn connected_v5(
        addr: SocketAddr,
        connect: &mqttbytes::v5::Connect,
    ) -> (Raw, mqttbytes::v5::ConnAck) {
        let mut raw = Raw::connect(addr).await;
        let ack = raw.handshake_v5(connect).await;
        assert_eq!(
            ack.code,
            mqttbytes::v5::ConnectReturnCode::Success,
            "CONNACK for {}",
            connect.client_id
        );
        (raw, ack)
    }

    /// Sends a SUBSCRIBE and returns its SUBACK (PUBLISHes that come first are an error).
    pub async fn subscribe_v5(
        &mut self,
        pkid: u16,
        filters: Vec<mqttbytes::v5::SubscribeFilter>,
    ) -> mqttbytes::v5::SubAck {
        let mut s = mqttbytes::v5::Subscribe::new_many(filters);
        s.pkid = pkid;
        self.send(&encode(|b| s.write(b))).await;
        match self.next_v5(Duration::from_secs(5)).await {
            Ok(mqttbytes::v5::Packet::SubAck(a)) => a,
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    /// Next MQTT 5 PUBLISH within `timeout`, acknowledging QoS 1 with PUBACK and QoS 2
    /// with PUBREC (the PUBREL is answered by PUBCOMP). Other packets are skipped; `None`
    /// on timeout or close.
    pub async fn next_publish_v5(&mut self, timeout: Duration) -> Option<mqttbytes::v5::Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_v5(left).await {
                Ok(mqttbytes::v5::Packet::Publish(p)) => {
                    match p.qos {
                        mqttbytes::QoS::AtMostOnce => {}
                        mqttbytes::QoS::AtLeastOnce => {
                            let ack = mqttbytes::v5::PubAck::new(p.pkid);
                            self.send(&encode(|b| ack.write(b))).await;
                        }
                        mqttbytes::QoS::ExactlyOnce => {
                            let rec = mqttbytes::v5::PubRec::new(p.pkid);
                            self.send(&encode(|b| rec.write(b))).await;
                        }
                    }
                    return Some(p);
                }
                Ok(mqttbytes::v5::Packet::PubRel(r)) => {
                    let comp = mqttbytes::v5::PubComp::new(r.pkid);
                    self.send(&encode(|b| comp.write(b))).await;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Next MQTT 5 packet; a DISCONNECT's reason code as a number (mqttbytes' enum
    /// `as u8`), for assertions on the exact code.
    pub async fn expect_disconnect_v5(&mut self, timeout: Duration) -> u8 {
        match self.next_v5(timeout).await {
            Ok(mqttbytes::v5::Packet::Disconnect(d)) => d.reason_code as u8,
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
    }

    /// PINGREQ, then waits for PINGRESP (skipping anything else); false on close/timeout.
    pub async fn ping_v5(&mut self, timeout: Duration) -> bool {
        self.send(&[0xc0, 0x00]).await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_v5(left).await {
                Ok(mqttbytes::v5::Packet::PingResp) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
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
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
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
