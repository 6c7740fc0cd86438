//! Interoperability with the Mosquitto command-line clients (Debian: mosquitto-clients).
//! Skipped with a printed reason when the binaries are missing locally; CI installs them,
//! and under CI a missing binary is a failure.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;

fn have(bin: &str) -> bool {
    common::have_binary(bin, "mosquitto-clients")
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
    assert_eq!(output_of(sub).await, "hello from mosquitto_pub");
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

/// Runs `mosquitto_pub` with `args` after `-h 127.0.0.1 -p PORT -V mqttv5 -q 1`.
fn mosquitto_pub_v5(gw: &TestServer, args: &[&str]) {
    let port = gw.port().to_string();
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args(args)
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success(), "mosquitto_pub {args:?} failed: {status}");
}

/// Starts a v5 `mosquitto_sub` with `args` and waits until the gateway counts its
/// subscription.
async fn mosquitto_sub_v5(gw: &TestServer, args: &[&str]) -> std::process::Child {
    let port = gw.port().to_string();
    let before = gw.metric("gateway_subscriptions").await;
    let child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_subscriptions").await <= before {
        assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

async fn output_of(child: std::process::Child) -> String {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub exited with {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// mosquitto_sub 2.0 has no option for No Local (`-D subscribe` takes only the
/// subscription-identifier and user-property properties; No Local is covered byte-level
/// in tests/mqtt5.rs), so this checks the other v5 SUBSCRIBE property it can send.
#[tokio::test]
async fn mosquitto_v5_subscription_identifier_comes_back_on_the_message() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("");
    let sub = mosquitto_sub_v5(
        &gw,
        &[
            "-t",
            "si/t",
            "-C",
            "1",
            "-W",
            "20",
            "-F",
            "%S %p",
            "-D",
            "subscribe",
            "subscription-identifier",
            "42",
        ],
    )
    .await;
    mosquitto_pub_v5(&gw, &["-t", "si/t", "-m", "from another client"]);
    assert_eq!(output_of(sub).await, "42 from another client");
}

#[tokio::test]
async fn mosquitto_v5_message_expiry_is_forwarded() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("");
    let sub = mosquitto_sub_v5(&gw, &["-t", "exp/t", "-C", "1", "-W", "20", "-F", "%E %p"]).await;
    mosquitto_pub_v5(
        &gw,
        &[
            "-t",
            "exp/t",
            "-m",
            "expiring",
            "-D",
            "publish",
            "message-expiry-interval",
            "5",
        ],
    );
    let out = output_of(sub).await;
    let (expiry, payload) = out.split_once(' ').expect("'%E %p' output");
    assert_eq!(payload, "expiring");
    let left: u32 = expiry
        .parse()
        .unwrap_or_else(|_| panic!("expiry in {out:?}"));
    assert!((1..=5).contains(&left), "remaining expiry {left}");
}

#[tokio::test]
async fn mosquitto_v5_shared_subscription_splits_messages_between_two_subscribers() {
    if !(have("mosquitto_sub") && have("mosquitto_pub")) {
        return;
    }
    let gw = TestServer::start("[shards]\ncount = 2");
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut child = mosquitto_sub_v5(&gw, &["-t", "$share/g/sh/t", "-W", "60"]).await;
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((i, line)).is_err() {
                    return;
                }
            }
        });
        subs.push(child);
    }
    let recv = |timeout: Duration| rx.recv_timeout(timeout).ok();
    // Joins reach the group's owner after the SUBACK: warm up until both got one.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut warmed = std::collections::HashSet::new();
    while warmed.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both subscribers joined: {warmed:?}"
        );
        mosquitto_pub_v5(&gw, &["-t", "sh/t", "-m", "warm"]);
        while let Some((i, line)) = recv(Duration::from_millis(300)) {
            if line == "warm" {
                warmed.insert(i);
            }
        }
    }
    for n in 0..10 {
        mosquitto_pub_v5(&gw, &["-t", "sh/t", "-m", &format!("m{n}")]);
    }
    // One sentinel each (round robin), after everything else each one got.
    mosquitto_pub_v5(&gw, &["-t", "sh/t", "-m", "end"]);
    mosquitto_pub_v5(&gw, &["-t", "sh/t", "-m", "end"]);
    let mut lines: Vec<(usize, String)> = Vec::new();
    while lines.iter().filter(|(_, l)| l == "end").count() < 2 {
        match recv(Duration::from_secs(10)) {
            Some((_, l)) if l == "warm" => {}
            Some(got) => lines.push(got),
            None => panic!("missing messages; got {lines:?}"),
        }
    }
    for mut child in subs {
        let _ = child.kill();
        let _ = child.wait();
    }
    let real: Vec<&String> = lines
        .iter()
        .map(|(_, l)| l)
        .filter(|l| *l != "end")
        .collect();
    assert_eq!(real.len(), 10, "10 messages in total: {lines:?}");
    for n in 0..10 {
        let m = format!("m{n}");
        assert_eq!(
            real.iter().filter(|l| ***l == m).count(),
            1,
            "{m} exactly once: {lines:?}"
        );
    }
    let by: std::collections::HashSet<usize> = lines.iter().map(|(i, _)| *i).collect();
    assert_eq!(by.len(), 2, "both subscribers got messages");
}
