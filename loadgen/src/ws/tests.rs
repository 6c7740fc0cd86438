//! loadgen's client frames read by the gateway's WebSocket decoder, and the gateway's
//! server frames read back by loadgen: two independent codecs checked against each other
//! (the Mosquitto test in tests/over_websocket.rs checks loadgen against a third).

use gateway::ws::frame::{self, Decoder};
use gateway::ws::handshake;

use super::*;

#[test]
fn accept_matches_the_gateway_and_rfc_6455() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    assert_eq!(accept_for(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(accept_for(key), handshake::accept_key(key));
}

#[test]
fn the_upgrade_request_is_accepted_by_the_gateway_parser() {
    let req = upgrade_request("127.0.0.1:8083", "/mqtt", "dGhlIHNhbXBsZSBub25jZQ==");
    let policy = handshake::Policy {
        path: "/mqtt",
        allowed_origins: &[],
        max_bytes: 8192,
    };
    match handshake::parse(req.as_bytes(), &policy) {
        handshake::Upgrade::Accepted(a) => {
            assert_eq!(a.protocol, "mqtt");
            let resp = a.response();
            let end = find_head_end(&resp).unwrap();
            check_response(&resp[..end], "dGhlIHNhbXBsZSBub25jZQ==").unwrap();
            assert_eq!(
                check_response(&resp[..end], "AAAAAAAAAAAAAAAAAAAAAA=="),
                Err("ws_bad_accept".into())
            );
        }
        other => panic!("refused: {other:?}"),
    }
    let refused = handshake::Refusal::Path.response();
    let end = find_head_end(&refused).unwrap();
    assert_eq!(
        check_response(&refused[..end], "x"),
        Err("ws_refused_404".into())
    );
}

#[test]
fn client_frames_decode_in_the_gateway() {
    for len in [0usize, 5, 125, 126, 65_535, 65_536] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
        let mut wire = Vec::new();
        client_frame(OP_BINARY, &payload, [9, 8, 7, 6], &mut wire);
        let mut replies = Vec::new();
        let d = Decoder::default().decode(&mut wire, 1 << 20, &mut replies);
        assert_eq!((d.end, d.used), (None, wire.len()), "len {len}");
        assert_eq!(&wire[..d.plain], &payload[..], "len {len}");
    }
}

fn ws_state() -> WsState {
    WsState {
        raw: BytesMut::new(),
        left: 0,
        replies: Vec::new(),
        rng: Rng(1),
    }
}

#[test]
fn server_frames_split_anywhere_deframe_to_the_mqtt_bytes() {
    let mut wire = Vec::new();
    frame::write_binary(&mut wire, &[0x20, 0x02, 0x00, 0x00]);
    wire.extend_from_slice(&[0x89, 0x02, b'h', b'i']); // a server ping
    frame::write_binary(&mut wire, &vec![0x42; 300]);
    let mut want = vec![0x20, 0x02, 0x00, 0x00];
    want.extend(vec![0x42; 300]);
    for cut in 0..wire.len() {
        let mut ws = ws_state();
        let mut plain = BytesMut::new();
        for part in [&wire[..cut], &wire[cut..]] {
            ws.raw.extend_from_slice(part);
            ws.deframe(&mut plain).unwrap();
        }
        assert_eq!(&plain[..], &want[..], "cut at {cut}");
        assert!(ws.raw.is_empty() && ws.left == 0);
        // The pong goes back masked, with the ping's payload.
        let mut pong = ws.replies.clone();
        let mut replies = Vec::new();
        let d = Decoder::default().decode(&mut pong, 125, &mut replies);
        assert_eq!((d.plain, d.end), (0, None), "a pong is no data");
        assert_eq!(ws.replies[0], 0x8A);
    }
}

#[test]
fn a_server_close_or_a_masked_server_frame_ends_the_link() {
    let mut ws = ws_state();
    let mut close = Vec::new();
    frame::write_close(&mut close, Some(1000));
    ws.raw.extend_from_slice(&close);
    let e = ws.deframe(&mut BytesMut::new()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);

    let mut ws = ws_state();
    let mut masked = Vec::new();
    client_frame(OP_BINARY, b"x", [1, 2, 3, 4], &mut masked);
    ws.raw.extend_from_slice(&masked);
    assert_eq!(
        ws.deframe(&mut BytesMut::new()).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
}
