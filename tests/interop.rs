//! Interoperability with the Mosquitto command-line clients (Debian: mosquitto-clients).
//! Skipped with a printed reason when the binaries are missing locally; CI installs them,
//! and under CI a missing binary is a failure.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;

fn have(bin: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{bin} missing under CI: .ci/run must install mosquitto-clients"
        );
        eprintln!("SKIPPED: {bin} not installed (apt-get install mosquitto-clients)");
    }
    found
}

/// mosquitto_sub waits for one message; mosquitto_pub sends it; the subscriber prints it.
async fn roundtrip(gw: &TestServer, extra: &[&str], topic: &str) {
    let port = gw.port().to_string();
    let before = gw.metric("gateway_subscriptions").await;
    let mut sub_args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        topic,
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "20",
    ];
    sub_args.extend_from_slice(extra);
    let sub = Command::new("mosquitto_sub")
        .args(&sub_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_subscriptions").await <= before {
        assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut pub_args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        topic,
        "-q",
        "1",
        "-m",
        "hello from mosquitto_pub",
    ];
    pub_args.extend_from_slice(extra);
    let status = Command::new("mosquitto_pub")
        .args(&pub_args)
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success(), "mosquitto_pub failed: {status}");
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub exited with {}",
        out.status
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from mosquitto_pub"
    );
}

#[tokio::test]
async fn mosquitto_clients_v311() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("");
    roundtrip(&gw, &[], "a/b").await;
}

#[tokio::test]
async fn mosquitto_clients_v5() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("");
    roundtrip(&gw, &["-V", "mqttv5"], "v5/a/b").await;
}

#[tokio::test]
async fn mosquitto_retained_and_wildcard() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("");
    let port = gw.port().to_string();
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "house/lamp",
            "-r",
            "-q",
            "1",
            "-m",
            "on",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "house/#",
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "house/lamp on");
}
