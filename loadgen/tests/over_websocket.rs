//! `--transport ws` against an independent server: Mosquitto's websockets listener
//! (Debian's mosquitto, started here on loopback with a TCP and a websockets listener and
//! killed by its PID). This proves loadgen's client side of MQTT over WebSocket without
//! the gateway's own WebSocket code. Skipped with a printed reason when mosquitto is not
//! installed locally; under CI (which installs it) a missing binary fails.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{loadgen_line, u};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

struct Mosquitto {
    child: Child,
    tcp: SocketAddr,
    ws: SocketAddr,
    dir: PathBuf,
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
    /// Starts Mosquitto, or `None` (with the reason printed) when it is not installed.
    fn start(tag: &str) -> Option<Mosquitto> {
        if !std::path::Path::new(MOSQUITTO).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{MOSQUITTO} missing under CI"
            );
            eprintln!("skipped: {MOSQUITTO} not installed (apt-get install mosquitto)");
            return None;
        }
        let dir =
            std::env::temp_dir().join(format!("loadgen-mosquitto-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tcp_port, ws_port) = free_ports();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {tcp_port} 127.0.0.1\nlistener {ws_port} 127.0.0.1\n\
                 protocol websockets\nallow_anonymous true\nmax_keepalive 65535\n"
            ),
        )
        .unwrap();
        let child = Command::new(MOSQUITTO)
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
            dir,
        };
        for addr in [m.tcp, m.ws] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(addr).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "mosquitto never listened on {addr}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn connect_holds_websocket_connections_and_answers_keepalive() {
    let Some(m) = Mosquitto::start("connect") else {
        return;
    };
    let target = m.ws.to_string();
    let out = loadgen_line(&format!(
        "connect --target {target} --transport ws --conns 60 --rate 1000 --hold 2 --keepalive 1 --json --quiet"
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(s["transport"], "ws", "{s}");
    assert_eq!(u(&s["connected"]), 60, "{s}");
    assert_eq!(u(&s["failed"]), 0, "{s}");
    assert_eq!(u(&s["live_at_end"]), 60, "{s}");
    assert_eq!(u(&s["subscribe_latency_ms"]["count"]), 60, "{s}");
    // PINGREQ every 0.75 s over two seconds: answered over the WebSocket.
    assert!(u(&s["pongs"]) >= 60, "{s}");
}

#[test]
fn fanout_to_websocket_subscribers_from_a_tcp_publisher() {
    let Some(m) = Mosquitto::start("fanout") else {
        return;
    };
    let (ws, tcp) = (m.ws.to_string(), m.tcp.to_string());
    let out = loadgen_line(&format!(
        "fanout --target {ws} --transport ws --publisher-target {tcp} --subscribers 20 --rate 50 --duration 2 --qos 1 --json --quiet"
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["subscribed"]), 20, "{s}");
    assert_eq!(u(&s["published"]), 100, "{s}");
    assert_eq!(u(&s["delivered"]), 2000, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
}

#[test]
fn churn_probes_upgrade_and_connect_over_websocket() {
    let Some(m) = Mosquitto::start("churn") else {
        return;
    };
    let target = m.ws.to_string();
    let out = loadgen_line(&format!(
        "churn --target {target} --transport ws --count 40 --rate 500 --mode mqtt --wait-connack --json --quiet"
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["probes"]), 40, "{s}");
    assert_eq!(u(&s["completed"]), 40, "{s}");
    assert_eq!(u(&s["failed"]), 0, "{s}");
}

#[test]
fn a_websocket_client_at_a_plain_mqtt_port_fails_with_a_named_cause() {
    let Some(m) = Mosquitto::start("mismatch") else {
        return;
    };
    // The TCP listener reads the upgrade request as a malformed CONNECT and closes.
    let target = m.tcp.to_string();
    let out = loadgen_line(&format!(
        "connect --target {target} --transport ws --conns 5 --rate 100 --hold 0 --connect-timeout 5 --json --quiet"
    ));
    let s = out.summary();
    assert_eq!(u(&s["connected"]), 0, "{s}");
    assert_eq!(u(&s["failed"]), 5, "{s}");
    let failures = s["failures"].as_object().unwrap();
    assert!(failures.keys().all(|k| k.starts_with("ws_")), "{s}");
}
