//! A real browser over MQTT-over-WebSocket: MQTT.js (the npm `mqtt` package, pinned by
//! tests/browser/package-lock.json) in headless Chromium, against any broker that has a
//! WebSocket listener and a TCP listener.
//!
//! [`browser_roundtrip`] is the whole check, parameterised by the broker: a TCP client
//! subscribes to an "out" topic; Chromium opens tests/browser/page.html (served here,
//! with MQTT.js's browser bundle) which connects over ws, subscribes to an "in" topic and
//! reports each step to this test's small HTTP server; the caller injects a message into
//! "in" (over TCP for Mosquitto; through `/v1/push` for the gateway); the page receives it
//! and publishes "echo:" + it to "out", and the TCP client must receive that.
//!
//! Against the gateway's `ws_listen` it is a normal test: it needs Chromium and `npm ci`
//! in tests/browser (`.ci/run` installs both) and, when either is missing, passes with
//! the reason printed. Against Mosquitto's websockets listener it is ignored: it proves
//! the harness, not the gateway (`cargo test --test browser_ws -- --ignored`, or
//! tests/browser/run.sh).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use common::tempdir::Dir;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Long enough for a cold Chromium start on a loaded machine; only failures wait this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the harness needs that may be missing locally: the reason, or None.
fn missing_prerequisite() -> Option<String> {
    let bundle = browser_dir().join("node_modules/mqtt/dist/mqtt.min.js");
    if !bundle.exists() {
        return Some(format!(
            "{} missing: run `npm ci` in tests/browser",
            bundle.display()
        ));
    }
    match Command::new("chromium").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("chromium not installed (apt-get install chromium)".into()),
    }
}

/// One step the page reported: `(event, detail)`.
type Report = (String, String);

/// Serves the test page, the MQTT.js bundle, and `/report` (whose reports it forwards).
struct PageServer {
    addr: SocketAddr,
    reports: Receiver<Report>,
}

impl PageServer {
    fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind page server");
        let addr = listener.local_addr().unwrap();
        let (tx, reports) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || serve(stream, &tx));
            }
        });
        PageServer { addr, reports }
    }

    /// Waits for the page to report `event`; any `error` report fails the test.
    fn wait_for(&self, event: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok((e, detail)) if e == event => return detail,
                Ok((e, detail)) if e == "error" => panic!("the page reported: {detail}"),
                Ok(_) => {}
                Err(_) => panic!("the page never reported {event:?}"),
            }
        }
    }
}

/// Answers one request (`Connection: close`).
fn serve(stream: TcpStream, reports: &Sender<Report>) {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The rest of the request head is not needed; read it so the client is not reset.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (status, kind, body) = match path {
        "/page.html" => (200, "text/html", read(&browser_dir().join("page.html"))),
        "/mqtt.min.js" => (
            200,
            "text/javascript",
            read(&browser_dir().join("node_modules/mqtt/dist/mqtt.min.js")),
        ),
        "/report" => {
            let _ = reports.send(parse_report(query));
            (204, "text/plain", Vec::new())
        }
        _ => (404, "text/plain", b"not found".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = &stream;
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `event=...&detail=...` from the page's URLSearchParams.
fn parse_report(query: &str) -> Report {
    let mut report = (String::new(), String::new());
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "event" => report.0 = url_decode(v),
            "detail" => report.1 = url_decode(v),
            _ => {}
        }
    }
    report
}

/// application/x-www-form-urlencoded decoding (`+` is a space, `%XX` a byte).
fn url_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Headless Chromium on one URL, in its own process group and a fresh profile; killed
/// (the group, by its id) on drop.
struct Chromium {
    child: Child,
    _profile: Dir,
}

impl Chromium {
    fn open(url: &str) -> Chromium {
        let profile = Dir::new("chromium-profile");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        Chromium {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of the process group this test created for Chromium.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A TCP MQTT client subscribed to `topic`, forwarding the payloads it receives.
fn tcp_subscriber(tcp: SocketAddr, topic: &str) -> (Client, Receiver<Vec<u8>>) {
    let mut opts = MqttOptions::new("browser-test-tcp", tcp.ip().to_string(), tcp.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(opts, 10);
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let (tx, rx) = mpsc::channel();
    let (subscribed_tx, subscribed) = mpsc::channel();
    thread::spawn(move || {
        for event in conn.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    subscribed
        .recv_timeout(STEP_TIMEOUT)
        .expect("the TCP subscriber never got its SUBACK");
    (client, rx)
}

/// The whole browser check against a broker: `ws_url` is its WebSocket endpoint (e.g.
/// `ws://127.0.0.1:8083/mqtt`), `tcp` its MQTT/TCP listener, and `inject` sends a
/// message to a topic (over MQTT, or through the gateway's push API).
pub fn browser_roundtrip(ws_url: &str, tcp: SocketAddr, inject: &dyn Fn(&str, &[u8])) {
    let (topic_in, topic_out) = ("browser/in", "browser/out");
    let (_tcp_client, from_browser) = tcp_subscriber(tcp, topic_out);
    let pages = PageServer::start();
    let url = format!(
        "http://{}/page.html?url={ws_url}&in={topic_in}&out={topic_out}",
        pages.addr
    );
    let _chromium = Chromium::open(&url);
    pages.wait_for("connected");
    assert_eq!(pages.wait_for("subscribed"), topic_in);
    inject(topic_in, b"hello-browser");
    assert_eq!(pages.wait_for("received"), "hello-browser");
    let echoed = from_browser
        .recv_timeout(STEP_TIMEOUT)
        .expect("the TCP client never received the browser's publish");
    assert_eq!(echoed, b"echo:hello-browser");
}

/// Mosquitto with a TCP and a websockets listener on loopback; killed by PID on drop.
struct Mosquitto {
    child: Child,
    tcp: SocketAddr,
    ws: SocketAddr,
    _dir: Dir,
}

/// Two distinct ports free right now (Mosquitto's websockets listener cannot bind
/// port 0); both are held while the second is picked, so they differ.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let dir = Dir::new("mosquitto");
        let (tcp_port, ws_port) = free_ports();
        let conf = dir.0.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {tcp_port} 127.0.0.1\nlistener {ws_port} 127.0.0.1\n\
                 protocol websockets\nallow_anonymous true\n"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let m = Mosquitto {
            child,
            tcp: SocketAddr::from(([127, 0, 0, 1], tcp_port)),
            ws: SocketAddr::from(([127, 0, 0, 1], ws_port)),
            _dir: dir,
        };
        wait_listening(m.tcp);
        wait_listening(m.ws);
        m
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes one QoS 1 message over MQTT/TCP and waits for its PUBACK.
fn publish_over_tcp(tcp: SocketAddr, topic: &str, payload: &[u8]) {
    let opts = MqttOptions::new("browser-test-injector", tcp.ip().to_string(), tcp.port());
    let (client, mut conn) = Client::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
        .unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    for event in conn.iter() {
        assert!(Instant::now() < deadline, "no PUBACK");
        if let Ok(Event::Incoming(Packet::PubAck(_))) = event {
            break;
        }
        event.expect("injector connection");
    }
    let _ = client.disconnect();
}

#[test]
#[ignore = "needs Chromium and `npm ci` in tests/browser; run by tests/browser/run.sh"]
fn mqtt_js_in_chromium_over_mosquitto_websockets() {
    if let Some(why) = missing_prerequisite() {
        panic!("cannot run the browser test: {why}");
    }
    let broker = Mosquitto::start();
    let ws_url = format!("ws://{}/mqtt", broker.ws);
    browser_roundtrip(&ws_url, broker.tcp, &|topic, payload| {
        publish_over_tcp(broker.tcp, topic, payload)
    });
}

/// POSTs `body` (JSON) to `path` over a plain HTTP/1.1 connection; returns the status.
fn post_json(http: SocketAddr, path: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(http).expect("connect to the HTTP API");
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn mqtt_js_in_chromium_over_the_gateways_ws_listener() {
    if let Some(why) = missing_prerequisite() {
        println!("SKIPPED mqtt_js_in_chromium_over_the_gateways_ws_listener: {why}");
        return;
    }
    let gw = common::TestServer::start("[mqtt]\nws_listen = \"127.0.0.1:0\"\n");
    let ws = gw.ws.expect("ws listener");
    let ws_url = format!("ws://{ws}/mqtt");
    browser_roundtrip(&ws_url, gw.mqtt, &|topic, payload| {
        let body = serde_json::json!({
            "topic": topic,
            "payload": String::from_utf8_lossy(payload),
            "qos": 1,
        });
        let status = post_json(gw.http, "/v1/push", &body.to_string());
        assert_eq!(status, 200, "POST /v1/push");
    });
}
