//! A TLS device whose CONNECT is read on a shard other than its client id's home shard
//! moves there with everything it sent: the plaintext after the CONNECT, what rustls still
//! holds, and the ciphertext read but not yet given to rustls (rustls takes 4 KB at a
//! time, so a device that sends its CONNECT and ~20 KB of publishes in one write right
//! after its handshake has most of its bytes in that last part). Half the devices send it
//! right after the handshake, half in the same write as their TLS Finished (then the TLS
//! handshake thread reads it with the Finished and hands the rest back with the
//! connection), and devices over WebSocket over TLS (wss).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use common::tls::{suback, Pki, TlsClient};
use common::ws::{self, WsMqtt};
use common::Raw;
use common::{GatewayProcess, TestServer};
use gateway::mailbox::home_shard;

const PUBLISHES: usize = 40;

#[test]
fn a_device_handed_to_its_home_shard_loses_nothing_it_sent_with_its_connect() {
    first_flights_arrive_whole("", false);
}

#[test]
fn the_same_with_the_handshakes_on_the_shards() {
    first_flights_arrive_whole("[limits]\ntls_handshakes_on_shards = true\n", false);
}

#[test]
fn the_same_with_the_password_checked_off_the_shard() {
    // The CONNECT waits for the business pool's answer on the home shard; what came
    // with it is read once the device is in.
    let dir = std::env::temp_dir().join(format!("tls-handoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["passwd", users.to_str().unwrap(), "dev", "--password", "pw"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    first_flights_arrive_whole(
        &format!(
            "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = \"{}\"\n",
            users.display()
        ),
        true,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CONNECT as `id`, with the login `dev`/`pw` if `login`.
fn connect(id: &str, login: bool) -> Vec<u8> {
    let mut c = mqttbytes::v4::Connect::new(id);
    c.keep_alive = 60;
    if login {
        c.set_login("dev", "pw");
    }
    let mut out = bytes::BytesMut::new();
    c.write(&mut out).unwrap();
    out.to_vec()
}

/// Devices homed on each shard send their CONNECT and PUBLISHES publishes in one write
/// after the handshake; a subscriber gets every one, in order.
fn first_flights_arrive_whole(extra: &str, login: bool) {
    let pki = Pki::new();
    let gw = GatewayProcess::start(&format!("{}\n[shards]\ncount = 2\n{extra}", pki.toml("")));
    let tls = gw.tls.unwrap();
    let cfg = pki.client_config(None, false);
    let mut sub = subscriber(tls, cfg.clone(), login);
    for (i, id) in device_ids().iter().enumerate() {
        let publishes = publishes(id);
        let mut device = match i % 2 {
            0 => {
                let mut d = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
                d.send(&[connect(id, login), publishes].concat()).unwrap();
                d
            }
            _ => with_the_finished(tls, cfg.clone(), &connect(id, login), &publishes),
        };
        match device.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => assert_eq!(a.code as u8, 0, "{id}"),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
        all_arrive(&mut sub, id);
    }
}

#[test]
fn the_same_over_websocket_over_tls() {
    // The WebSocket frame carrying the first flight is decoded from rustls' plaintext on
    // the accepting shard; the rest of its ciphertext goes along with the decoder state.
    let pki = Pki::new();
    let gw = TestServer::start(&format!(
        "{}\n[shards]\ncount = 2\n",
        pki.toml("wss_listen = \"127.0.0.1:0\"")
    ));
    let (tls, wss) = (gw.tls.unwrap(), gw.wss.unwrap());
    let cfg = pki.client_config(None, false);
    let mut sub = subscriber(tls, cfg.clone(), false);
    let url = format!("wss://localhost:{}/mqtt", wss.port());
    for id in device_ids() {
        let stream = TlsClient::connect(wss, cfg.clone(), b"").unwrap().s;
        let mut device = WsMqtt::new(ws::upgrade(&url, stream));
        device.send(&[connect(&id, false), publishes(&id)].concat());
        assert_eq!(device.connack(), 0, "{id}");
        all_arrive(&mut sub, &id);
    }
}

/// A TLS subscriber to `carry/#`.
fn subscriber(tls: std::net::SocketAddr, cfg: Arc<ClientConfig>, login: bool) -> TlsClient {
    let mut sub = TlsClient::connect(tls, cfg, b"").unwrap();
    sub.send(&connect("carry-sub", login)).unwrap();
    assert!(matches!(
        sub.recv(Duration::from_secs(10)),
        Ok(mqttbytes::v4::Packet::ConnAck(a)) if a.code as u8 == 0
    ));
    sub.send(&common::frame(
        0x82,
        &[&[0, 1, 0, 7][..], b"carry/#", &[0]].concat(),
    ))
    .unwrap();
    suback(&mut sub);
    sub
}

/// Four client ids homed on each of two shards: whichever shard accepts a device, some
/// are handed over.
fn device_ids() -> Vec<String> {
    let homed = |shard| {
        (0..)
            .map(|i| format!("carry-{i}"))
            .filter(move |id| home_shard(id, 2) == shard)
            .take(4)
    };
    homed(0).chain(homed(1)).collect()
}

/// `PUBLISHES` QoS 0 publishes to `carry/<id>`, ~500 bytes each, numbered.
fn publishes(id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..PUBLISHES {
        let payload = format!("{id}/{n:03}/{}", "x".repeat(480));
        out.extend(Raw::publish_v4(
            &format!("carry/{id}"),
            0,
            0,
            payload.as_bytes(),
        ));
    }
    out
}

/// `sub` gets device `id`'s publishes, all of them, in order.
fn all_arrive(sub: &mut TlsClient, id: &str) {
    for n in 0..PUBLISHES {
        let p = sub
            .expect_publish(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{id}: publish {n} of {PUBLISHES}: {e}"));
        let expected = format!("{id}/{n:03}/");
        assert!(
            p.payload.starts_with(expected.as_bytes()),
            "{id}: publish {n}"
        );
    }
}

/// A TLS client that writes its handshake's Finished, `connect` (a record of its own) and
/// `then` in one write.
fn with_the_finished(
    addr: std::net::SocketAddr,
    cfg: Arc<ClientConfig>,
    connect: &[u8],
    then: &[u8],
) -> TlsClient {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(cfg, name).unwrap();
    while conn.is_handshaking() {
        if conn.wants_write() {
            conn.write_tls(&mut sock).unwrap();
            continue;
        }
        conn.read_tls(&mut sock).unwrap();
        conn.process_new_packets().unwrap();
    }
    conn.writer().write_all(connect).unwrap();
    conn.writer().write_all(then).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    sock.write_all(&out).unwrap();
    TlsClient {
        s: StreamOwned::new(conn, sock),
        buf: Default::default(),
    }
}
