//! loadgen against a fleet: two real gateways joined through a real `nats-server` with
//! JetStream (Debian's `nats-server` package), devices spread over both nodes with
//! `--targets`, pushes spread over both HTTP APIs; every message must arrive and both
//! nodes must hold devices.

mod common;

use std::time::Duration;

use common::gateway::Gateway;
use common::loadgen_line;
use serde_json::Value;

/// A `nats-server -js` on a free loopback port with its store in a temp directory,
/// killed by its PID on drop.
struct Nats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("loadgen-nats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (apt install nats-server)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server listens");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats { child, port, dir }
    }

    /// Node `node`'s `[cluster]` section on this server.
    fn cluster(&self, node: &str) -> String {
        format!(
            "[cluster]\nenabled = true\nnode_id = \"{node}\"\nnats_url = \"nats://127.0.0.1:{}\"\n",
            self.port
        )
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

/// Both addresses got devices, together all of them.
fn assert_spread(s: &Value, a: &Gateway, b: &Gateway, devices: u64) {
    let per = &s["devices_per_node"];
    let (on_a, on_b) = (u(&per[a.mqtt.to_string()]), u(&per[b.mqtt.to_string()]));
    assert!(on_a > 0 && on_b > 0, "{s}");
    assert_eq!(on_a + on_b, devices, "{s}");
}

#[test]
fn devices_spread_over_two_nodes_and_every_message_arrives() {
    let nats = Nats::start();
    let a = Gateway::start_with("", &nats.cluster("lg-a"));
    let b = Gateway::start_with("", &nats.cluster("lg-b"));
    let targets = format!("{},{}", a.mqtt, b.mqtt);

    // Fan-out: the publisher on node A, its 20 QoS 1 subscribers on A and B.
    let out = loadgen_line(&format!(
        "fanout --target {} --targets {targets} --subscribers 20 --rate 50 --duration 2 \
         --qos 1 --expect-no-loss --drain 10 --json --quiet",
        a.mqtt
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_spread(&s, &a, &b, 20);
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["delivered"]), u(&s["published"]) * 20, "{s}");
    // Half the subscribers are on B: the messages crossed NATS.
    assert!(b.metric("gateway_fleet_messages_total{direction=\"in\"}") > 0.0);

    // Pushes: 20 devices on A and B, requests alternating between the two HTTP APIs in
    // the other order, so each push reaches the node that does not hold its device.
    let out = loadgen_line(&format!(
        "push --targets {targets} --http http://{},http://{} --conns 20 --rate 50 \
         --duration 2 --qos 1 --json --quiet",
        b.http, a.http
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_spread(&s, &a, &b, 20);
    assert_eq!(u(&s["sent"]), 100, "{s}");
    assert_eq!(u(&s["accepted"]), 100, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert!(a.metric("gateway_fleet_requests_served_total") > 0.0);
    assert!(b.metric("gateway_fleet_requests_served_total") > 0.0);
}
