//! Helpers of the store suites (tests/durability.rs, store_*.rs): a gateway process with a
//! store in a temp dir, stopped cleanly or killed, and persistent v3.1.1 devices.

use std::time::Duration;

use mqttbytes::v4::Packet as P4;
use serde_json::Value;

use super::{post_json, tempdir, v4, GatewayProcess, Raw};

const T: Duration = Duration::from_secs(10);

pub fn store_toml(dir: &tempdir::Dir) -> String {
    format!(
        "[store]\npath = \"{}\"\n",
        dir.0.join("data").display().to_string().replace('\\', "/")
    )
}

pub async fn post(gw: &GatewayProcess, path: &str, body: Value) -> (u16, Value) {
    post_json(gw.http, path, &body).await
}

pub fn kill9(gw: &mut GatewayProcess) {
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(T).is_some(), "gateway did not die");
}

pub fn stop(gw: &mut GatewayProcess) {
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(T).expect("gateway stops on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// A v3.1.1 device with a persistent session (clean_session = false).
pub fn device(gw: &GatewayProcess, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(false);
    o
}

/// Connects a persistent v4 device and returns it with CONNACK's session-present flag.
pub async fn connect_device(gw: &GatewayProcess, id: &str) -> (v4::Client, bool) {
    let mut c = v4::connect_raw(device(gw, id));
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Packet::ConnAck(a))))) => {
                return (c, a.session_present)
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }
}

pub async fn disconnect(c: v4::Client) {
    c.client.disconnect().await.expect("disconnect");
    let mut c = c;
    let _ = c.wait_closed(T).await;
    c.task.abort();
}

/// A raw 3.1.1 connection with a persistent (or clean) session, after its CONNACK.
pub async fn raw_connect(gw: &GatewayProcess, id: &str, clean: bool) -> (Raw, bool) {
    let mut r = Raw::connect(gw.mqtt).await;
    r.send(&Raw::connect_v4(id, 60, clean)).await;
    match r.recv_v4(T).await {
        Ok(P4::ConnAck(a)) => (r, a.session_present),
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
}

pub async fn expect_v4(r: &mut Raw, what: &str, f: impl Fn(&P4) -> bool) -> P4 {
    loop {
        match r.recv_v4(T).await {
            Ok(p) if f(&p) => return p,
            Ok(_) => continue,
            Err(e) => panic!("no {what}: {e}"),
        }
    }
}
