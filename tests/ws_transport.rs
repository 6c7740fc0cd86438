//! The gateway's WebSocket transport end to end: every feature works over `ws_listen` as
//! over TCP (authentication, ACL, keep-alive, takeover, the push API, connections handed
//! to their home shard, a PROXY header before the upgrade), and bad input (a slowloris
//! upgrade, garbage instead of an upgrade, an oversized frame, a fragmented control
//! frame, an unmasked frame) closes only the offender while an honest client is served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::ws::{self, assert_served, WsMqtt, WAIT};
use common::{tempdir, Raw};
use mqttbytes::v4::SubscribeReasonCode;

/// The opening bytes of a valid upgrade request for `/mqtt`.
const UPGRADE: &str = "GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

/// A raw socket that has upgraded: what follows is frames, written by the test byte for
/// byte (a client tungstenite would never let us be: unmasked, fragmented control).
fn raw_upgraded(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "upgrade answer cut short");
        answer.push(b[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 101 "), "{answer:?}");
    s
}

/// A masked client frame (mask key 0: the payload is sent as is, still "masked").
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Reads until the server closes the socket; returns everything it sent.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// The close frame at the end of `bytes` carries `code`.
fn ends_with_close(bytes: &[u8], code: u16) -> bool {
    let c = code.to_be_bytes();
    bytes.ends_with(&[0x88, 0x02, c[0], c[1]])
}

#[test]
fn unmasked_and_fragmented_control_frames_close_only_the_offender() {
    let (_gw, addr) = ws::gateway("");
    let mut honest = WsMqtt::new(ws::connect(addr));
    assert_eq!(honest.connect("honest", 30), 0);
    // Unmasked binary frame: 1002.
    let mut s = raw_upgraded(addr);
    s.write_all(&[0x82, 0x02, 0xC0, 0x00]).unwrap();
    assert!(ends_with_close(&read_to_close(&mut s), 1002), "unmasked");
    // A ping without FIN (a fragmented control frame): 1002.
    let mut s = raw_upgraded(addr);
    s.write_all(&masked(0x09, b"frag")).unwrap();
    assert!(
        ends_with_close(&read_to_close(&mut s), 1002),
        "fragmented ping"
    );
    // A control frame split over two writes is fine: pong comes back whole.
    let mut s = raw_upgraded(addr);
    let ping = masked(0x89, b"split ping");
    s.write_all(&ping[..7]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&ping[7..]).unwrap();
    let mut pong = [0u8; 12];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong[..2], [0x8A, 10]);
    assert_eq!(&pong[2..], b"split ping");
    // The honest client never noticed.
    honest.subscribe("still/here");
    honest.send(&Raw::publish_v4("still/here", 0, 0, b"yes"));
    assert_eq!(honest.next_publish().1, b"yes");
    assert_served(addr, "late");
}

#[test]
fn oversized_frame_and_garbage_close_only_the_offender() {
    let (_gw, addr) = ws::gateway("max_packet_size = 1024\n");
    let mut honest = WsMqtt::new(ws::connect(addr));
    assert_eq!(honest.connect("honest", 30), 0);
    // A frame header announcing 1 MiB: refused with 1009 before any of it is sent.
    let mut s = raw_upgraded(addr);
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&header).unwrap();
    assert!(ends_with_close(&read_to_close(&mut s), 1009), "oversized");
    // An MQTT CONNECT instead of an upgrade: 400 and closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&Raw::connect_v4("lost", 30, true)).unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut s)).to_string();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_served(addr, "after-garbage");
    honest.subscribe("ok");
}

#[test]
fn slowloris_upgrade_is_closed_at_the_connect_timeout() {
    let (gw, addr) = ws::gateway("connect_timeout_secs = 1\n");
    // Taken before the connect: the gateway's timer cannot have started earlier.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut closed = false;
    // One byte of the upgrade every 100 ms: never whole before the connect timeout.
    for b in UPGRADE.as_bytes().iter().take(200) {
        if slow.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match slow.read(&mut buf) {
            Ok(0) | Err(_) if started.elapsed() > Duration::from_millis(900) => {
                if matches!(slow.read(&mut buf), Ok(0)) {
                    closed = true;
                    break;
                }
            }
            _ => {}
        }
        if started.elapsed() > WAIT {
            break;
        }
    }
    assert!(closed, "the slow upgrade was not closed");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    assert_served(addr, "patient");
    drop(gw);
}

#[test]
fn keep_alive_closes_a_silent_websocket_client() {
    let (_gw, addr) = ws::gateway("");
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut c = WsMqtt::new(ws::upgrade(&format!("ws://{addr}/mqtt"), stream));
    assert_eq!(c.connect("sleepy", 1), 0);
    // 1.5 × 1 s of silence, with a generous margin.
    assert!(c.closed_within(WAIT), "still open after keep-alive");
}

#[test]
fn takeover_and_home_shard_handoff_over_websocket() {
    // Four shards: most client ids live on another shard than the one that accepts them.
    let (_gw, addr) = ws::gateway("[shards]\ncount = 4\n");
    let mut clients: Vec<_> = (0..8)
        .map(|i| {
            let mut c = WsMqtt::new(ws::connect(addr));
            assert_eq!(c.connect(&format!("dev-{i}"), 30), 0);
            c.subscribe(&format!("to/dev-{i}"));
            c
        })
        .collect();
    let mut publisher = WsMqtt::new(ws::connect(addr));
    assert_eq!(publisher.connect("publisher", 30), 0);
    for i in 0..8 {
        publisher.send(&Raw::publish_v4(&format!("to/dev-{i}"), 0, 0, b"hi"));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.next_publish(), (format!("to/dev-{i}"), b"hi".to_vec()));
    }
    // The same client id again takes over: the first connection is closed.
    let mut again = WsMqtt::new(ws::connect(addr));
    assert_eq!(again.connect("dev-0", 30), 0);
    assert!(
        clients[0].closed_within(WAIT),
        "old connection not taken over"
    );
    assert_eq!(again.subscribe("to/dev-0").len(), 1);
}

#[test]
fn push_api_reaches_a_websocket_client() {
    let (gw, addr) = ws::gateway("");
    let mut c = WsMqtt::new(ws::connect(addr));
    assert_eq!(c.connect("pushed", 30), 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = serde_json::json!({
        "client_id": "pushed", "topic": "cmd/pushed", "payload": "over ws", "qos": 1,
    });
    let (status, answer) = rt.block_on(common::post_json(gw.http, "/v1/push", &body));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(c.next_publish(), ("cmd/pushed".into(), b"over ws".to_vec()));
    let text = rt.block_on(gw.metrics());
    let ws_connects = common::metric_value(&text, "gateway_connects_total{transport=\"ws\"}");
    assert!(ws_connects >= 1.0, "{text}");
}

/// `users` with alice:`password` (argon2id, the cheapest the gateway accepts is fine).
fn password_file(dir: &std::path::Path) -> std::path::PathBuf {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(b"secret", &salt)
        .unwrap();
    let file = dir.join("users");
    std::fs::write(&file, format!("alice:{hash}\n")).unwrap();
    file
}

fn connect_as(addr: SocketAddr, id: &str, user: &str, pass: &str) -> (WsMqtt<TcpStream>, u8) {
    let mut c = mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    c.set_login(user, pass);
    let mut b = bytes::BytesMut::new();
    c.write(&mut b).unwrap();
    let mut ws = WsMqtt::new(ws::connect(addr));
    ws.send(&b);
    let code = ws.connack();
    (ws, code)
}

#[test]
fn password_auth_and_acl_over_websocket() {
    let dir = tempdir::Dir::new("wsauth");
    let file = password_file(&dir.0);
    let (_gw, addr) = ws::gateway(&format!(
        "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = {:?}\n\
         [acl]\nenabled = true\nno_match = \"deny\"\n\
         rules = [{{ permission = \"allow\", action = \"all\", topic = \"devices/%c/#\" }}]\n",
        file.display().to_string()
    ));
    let (_, code) = connect_as(addr, "dev", "alice", "wrong");
    assert_eq!(code, 5, "bad password: not authorized");
    let (mut c, code) = connect_as(addr, "dev", "alice", "secret");
    assert_eq!(code, 0);
    let codes = c.subscribe("devices/other/#");
    assert_eq!(
        codes,
        [SubscribeReasonCode::Failure],
        "ACL denies another's topic"
    );
    let codes = c.subscribe("devices/dev/#");
    assert!(matches!(codes[..], [SubscribeReasonCode::Success(_)]));
}

#[test]
fn proxy_header_before_the_upgrade_sets_the_peer() {
    // Proxied devices have public addresses: anonymous clients allowed from anywhere.
    let (gw, addr) = ws::gateway("proxy_protocol = true\n[auth]\nanonymous = \"always\"\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 8083\r\n")
        .unwrap();
    let mut c = WsMqtt::new(ws::upgrade(&format!("ws://{addr}/mqtt"), s));
    assert_eq!(c.connect("proxied", 30), 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(common::http_get(gw.http, "/v1/clients/proxied"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("203.0.113.7"), "{body}");
    // Without a header the connection is closed, and others are still served.
    let mut bare = TcpStream::connect(addr).unwrap();
    bare.set_read_timeout(Some(WAIT)).unwrap();
    bare.write_all(UPGRADE.as_bytes()).unwrap();
    let answer = read_to_close(&mut bare);
    assert!(
        !answer.starts_with(b"HTTP/1.1 101"),
        "upgraded without a PROXY header"
    );
    c.subscribe("x");
}

#[test]
fn idle_websocket_clients_borrow_no_buffers() {
    let (gw, addr) = ws::gateway("");
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut c = WsMqtt::new(ws::connect(addr));
        assert_eq!(c.connect(&format!("idle-ws-{i}"), 180), 0);
        c.subscribe(&format!("devices/idle-ws-{i}/cmd"));
        clients.push(c);
    }
    // One whose last control frame came in two pieces: the carried bytes go back too.
    let mut s = raw_upgraded(addr);
    let ping = masked(0x89, b"in two");
    s.write_all(&ping[..4]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&ping[4..]).unwrap();
    let mut pong = [0u8; 8];
    s.read_exact(&mut pong).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lent = rt.block_on(gw.wait_metric(
        "gateway_buffer_pool_bytes{state=\"lent\"}",
        WAIT,
        |v| v == 0.0,
    ));
    assert_eq!(lent, 0.0, "idle WebSocket connections hold pooled buffers");
    drop(clients);
}

/// A masked client frame of any length (mask key 0).
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn a_frame_half_read_at_connect_travels_to_the_home_shard() {
    // Four shards and eight client ids: most CONNECTs are handed to another shard, in the
    // middle of the next frame's header.
    let (_gw, addr) = ws::gateway("[shards]\ncount = 4\n");
    for i in 0..8 {
        let id = format!("half-{i}");
        let mut s = raw_upgraded(addr);
        let mut first = masked_binary(&Raw::connect_v4(&id, 30, true));
        let subscribe = masked_binary(&Raw::subscribe_v4(&format!("devices/{id}/cmd"), 0, 1));
        first.extend_from_slice(&subscribe[..3]);
        s.write_all(&first).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&subscribe[3..]).unwrap();
        // CONNACK and SUBACK, each in its own unmasked binary frame.
        let mut got = [0u8; 13];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got[..6], [0x82, 4, 0x20, 2, 0, 0], "{id}: CONNACK");
        assert_eq!(got[6..], [0x82, 5, 0x90, 3, 0, 1, 0], "{id}: SUBACK");
    }
}
