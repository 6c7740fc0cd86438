//! `--tls` (MQTT over TLS) for `connect`, `storm` and `push`, run as the real binary
//! against a real gateway's TLS listener on loopback that requires client certificates
//! (mutual TLS): the server is verified with `--ca`, each device presents `--tls-cert`,
//! and with `--tls-resume on` a storm's reconnects resume their TLS sessions (the
//! gateway's own `gateway_tls_handshakes_total{kind}` says so too), with `off` they do
//! not. Small, bounded numbers: a smoke test, not a benchmark.

use std::path::PathBuf;

mod common;

use common::gateway::Gateway;
use common::{loadgen_line, u};

/// The PEM files of one test: the CA, and the devices' certificate and key.
struct Files {
    dir: PathBuf,
    ca: String,
    cert: String,
    key: String,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway with a mutual-TLS listener, and the files a device needs for it.
fn tls_gateway(tag: &str) -> (Gateway, Files) {
    let dir = std::env::temp_dir().join(format!("loadgen-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ((ca, cert, key), (client_cert, client_key)) =
        common::pki::with_client(&dir, "loadgen-device");
    let gw = Gateway::start_with(
        &format!(
            "tls_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\ntls_require_client_cert = true",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ),
        "",
    );
    let files = Files {
        ca: ca.display().to_string(),
        cert: client_cert.display().to_string(),
        key: client_key.display().to_string(),
        dir,
    };
    (gw, files)
}

/// The TLS options of a device, as loadgen arguments.
fn tls_args(f: &Files) -> String {
    format!(
        "--tls --ca {} --tls-cert {} --tls-key {}",
        f.ca, f.cert, f.key
    )
}

#[test]
fn connect_over_mutual_tls() {
    let (gw, f) = tls_gateway("connect");
    let out = loadgen_line(&format!(
        "connect --target {} {} --conns 40 --rate 2000 --hold 1 --json --quiet",
        gw.tls.unwrap(),
        tls_args(&f)
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(s["transport"], "tls", "{s}");
    assert_eq!(u(&s["connected"]), 40, "{s}");
    assert_eq!(u(&s["tls_handshakes"]["full"]), 40, "{s}");
    assert_eq!(u(&s["tls_handshakes"]["resumed"]), 0, "{s}");
    assert_eq!(gw.metric("gateway_connects_total{transport=\"tls\"}"), 40.0);
}

/// One storm round without backoff: every device drops and reconnects once.
fn storm(gw: &Gateway, f: &Files, resume: &str) -> serde_json::Value {
    let out = loadgen_line(&format!(
        "storm --target {} {} --tls-resume {resume} --conns 30 --connect-rate 2000 --backoff none --round-timeout 30 --settle 0 --json --quiet",
        gw.tls.unwrap(),
        tls_args(f)
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["connected"]), 30, "{s}");
    let rounds = s["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 1, "{s}");
    assert_eq!(u(&rounds[0]["back"]), 30, "{s}");
    s
}

#[test]
fn storm_reconnects_resume_with_tickets_and_not_without() {
    let (gw, f) = tls_gateway("storm");
    let resumed = "gateway_tls_handshakes_total{kind=\"resumed\"}";
    let full = "gateway_tls_handshakes_total{kind=\"full\"}";

    let s = storm(&gw, &f, "on");
    assert_eq!(u(&s["tls_handshakes"]["full"]), 30, "{s}");
    assert!(u(&s["tls_handshakes"]["resumed"]) >= 30, "{s}");
    assert!(gw.metric(resumed) >= 30.0);
    assert_eq!(gw.metric(full), 30.0);

    let s = storm(&gw, &f, "off");
    assert!(u(&s["tls_handshakes"]["full"]) >= 60, "{s}");
    assert_eq!(u(&s["tls_handshakes"]["resumed"]), 0, "{s}");
    assert!(gw.metric(full) >= 90.0);
}

#[test]
fn push_over_tls_delivers_every_message() {
    let (gw, f) = tls_gateway("push");
    let out = loadgen_line(&format!(
        "push --target {} {} --http http://{} --conns 20 --rate 100 --duration 1 --qos 1 --json --quiet",
        gw.tls.unwrap(),
        tls_args(&f),
        gw.http
    ));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["devices_connected"]), 20, "{s}");
    assert_eq!(u(&s["delivered"]), 100, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["tls_handshakes"]["full"]), 20, "{s}");
}
