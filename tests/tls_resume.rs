//! TLS session resumption and its count: a rustls client connects, disconnects and
//! reconnects to the real gateway; with tickets (the default) the second handshake is
//! resumed, with `tls_session_tickets = false` it is full again, and
//! `gateway_tls_handshakes_total{kind}` counts each kind (failed ones too).

mod common;

use std::io::Write;
use std::time::Duration;

use common::tls::{Pki, TlsClient};
use common::TestServer;

const T: Duration = Duration::from_secs(10);

fn handshakes(kind: &str) -> String {
    format!("gateway_tls_handshakes_total{{kind=\"{kind}\"}}")
}

/// Connects twice with one client configuration (which keeps the tickets it gets), each
/// time through CONNECT/CONNACK; returns how each handshake went on the client's side.
fn connect_twice(gw: &TestServer, pki: &Pki, tls12: bool) -> [Option<rustls::HandshakeKind>; 2] {
    let tls = gw.tls.expect("tls listener");
    let cfg = pki.client_config(None, tls12);
    let mut kinds = [None, None];
    for kind in &mut kinds {
        let mut c = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
        // The CONNACK comes after the tickets: reading it stores them in `cfg`.
        assert_eq!(c.mqtt_connect("resumer"), Ok(0));
        *kind = c.s.conn.handshake_kind();
    }
    kinds
}

#[tokio::test(flavor = "multi_thread")]
async fn resumed_and_full_handshakes_are_counted() {
    use rustls::HandshakeKind::{Full, Resumed};
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml(""));
    assert_eq!(connect_twice(&gw, &pki, false), [Some(Full), Some(Resumed)]);
    assert_eq!(connect_twice(&gw, &pki, true), [Some(Full), Some(Resumed)]);
    assert_eq!(
        gw.wait_metric(&handshakes("full"), T, |v| v >= 2.0).await,
        2.0
    );
    assert_eq!(gw.metric(&handshakes("resumed")).await, 2.0);
    assert_eq!(gw.metric(&handshakes("failed")).await, 0.0);

    // Plaintext MQTT on the TLS port is a failed handshake.
    let mut s = std::net::TcpStream::connect(gw.tls.unwrap()).unwrap();
    s.write_all(&common::Raw::connect_v4("plain", 30, true))
        .unwrap();
    assert_eq!(
        gw.wait_metric(&handshakes("failed"), T, |v| v >= 1.0).await,
        1.0
    );
    assert_eq!(gw.metric(&handshakes("full")).await, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tickets_every_handshake_is_full() {
    use rustls::HandshakeKind::Full;
    let pki = Pki::new();
    let gw = TestServer::start(&pki.toml("tls_session_tickets = false"));
    assert_eq!(connect_twice(&gw, &pki, false), [Some(Full), Some(Full)]);
    assert_eq!(connect_twice(&gw, &pki, true), [Some(Full), Some(Full)]);
    assert_eq!(
        gw.wait_metric(&handshakes("full"), T, |v| v >= 4.0).await,
        4.0
    );
    assert_eq!(gw.metric(&handshakes("resumed")).await, 0.0);
}
