//! MQTT over WebSocket against the gateway's `ws_listen`, with an independent WebSocket
//! client (tungstenite) and raw sockets: the upgrade, the frame codec in the shard's
//! WebSocket transport, and bad input closing only the offender.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Raw;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use common::ws::{close_code, connect as ws_connect, gateway as ws_gateway, read_bytes};

#[test]
fn mqtt_packets_split_across_frames_and_packed_in_one() {
    let (_gw, addr) = ws_gateway("");
    let mut ws = ws_connect(addr);
    let connect = Raw::connect_v4("ws-split", 30, true);
    let (a, b) = connect.split_at(5);
    ws.send(Message::binary(a.to_vec())).unwrap();
    ws.send(Message::binary(b.to_vec())).unwrap();
    assert_eq!(read_bytes(&mut ws, 4), [0x20, 0x02, 0x00, 0x00], "CONNACK");
    // SUBSCRIBE, a PUBLISH to it and a PINGREQ in one frame.
    let mut packed = Raw::subscribe_v4("ws/echo", 0, 1);
    packed.extend(Raw::publish_v4("ws/echo", 0, 0, b"round trip"));
    packed.extend([0xC0, 0x00]);
    ws.send(Message::binary(packed)).unwrap();
    let publish = Raw::publish_v4("ws/echo", 0, 0, b"round trip");
    let want = 5 + publish.len() + 2;
    let got = read_bytes(&mut ws, want);
    assert_eq!(&got[..5], [0x90, 0x03, 0x00, 0x01, 0x00], "SUBACK");
    assert_eq!(&got[5..5 + publish.len()], &publish[..], "the PUBLISH back");
    assert_eq!(&got[want - 2..], [0xD0, 0x00], "PINGRESP");
}

#[test]
fn ping_is_answered_and_close_is_echoed() {
    let (_gw, addr) = ws_gateway("");
    let mut ws = ws_connect(addr);
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("{other:?}"),
    }
    ws.close(None).unwrap();
    assert_eq!(close_code(&mut ws), None, "an empty close is echoed empty");
}

#[test]
fn text_frames_close_with_1003() {
    let (_gw, addr) = ws_gateway("");
    let mut ws = ws_connect(addr);
    ws.send(Message::text("{\"mqtt\": false}")).unwrap();
    assert_eq!(close_code(&mut ws), Some(CloseCode::Unsupported));
}

#[test]
fn a_frame_over_the_packet_limit_closes_with_1009() {
    let (_gw, addr) = ws_gateway("max_packet_size = 1024\n");
    let mut ws = ws_connect(addr);
    ws.send(Message::binary(vec![0x30; 1025])).unwrap();
    assert_eq!(close_code(&mut ws), Some(CloseCode::Size));
}

/// Sends `request` raw and returns the status line of the answer.
fn raw_upgrade(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(request);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}

#[test]
fn bad_upgrades_get_a_4xx_and_are_closed() {
    let (_gw, addr) = ws_gateway(
        "ws_max_handshake_bytes = 512\nws_allowed_origins = [\"https://dash.example\"]\n",
    );
    let ok = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n";
    let cases = [
        (
            format!("GET /other HTTP/1.1\r\n{ok}\r\n"),
            "HTTP/1.1 404 Not Found",
        ),
        (
            format!("GET /mqtt HTTP/1.1\r\n{ok}Origin: https://evil.example\r\n\r\n"),
            "HTTP/1.1 403 Forbidden",
        ),
        (
            "GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "HTTP/1.1 426 Upgrade Required",
        ),
        (
            format!("GET /mqtt HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(600)),
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ];
    for (request, status) in cases {
        assert_eq!(raw_upgrade(addr, request.as_bytes()), status);
    }
    // Garbage (an MQTT CONNECT sent to the WebSocket port) gets 400.
    let garbage = Raw::connect_v4("lost", 30, true);
    assert_eq!(raw_upgrade(addr, &garbage), "HTTP/1.1 400 Bad Request");
}
