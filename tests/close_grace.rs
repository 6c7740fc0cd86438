//! A close the client can read (`[mqtt] close_grace_ms`, `close_grace_bytes`): when the
//! gateway ends a connection with something to say, the client reads all of it — its
//! pending output, then the MQTT 5 DISCONNECT — even while it is still sending, and the
//! lingering connection is bounded in time and bytes, counted, and no client any more.
//! Also the CONNACK of a 3.1.1 connection taken over in the turn it was accepted.

mod common;

use std::time::Duration;

use common::{connect5, connect_from, encode, Raw, TestServer};
use mqttbytes::v5::{Packet, PubRel, Publish};
use mqttbytes::QoS;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

fn qos2(pkid: u16) -> Vec<u8> {
    let mut p = Publish::new("grace/t", QoS::ExactlyOnce, vec![b'x'; 16]);
    p.pkid = pkid;
    encode(|b| p.write(b))
}

/// A connected MQTT 5 client that has sent `receive_maximum + 1` QoS 2 PUBLISHes in one
/// go, so the gateway ends it with DISCONNECT 0x93 after the PUBRECs.
async fn over_receive_maximum(gw: &TestServer, id: &str, receive_maximum: u16) -> Raw {
    let (mut c, _) = Raw::connected_v5(gw.mqtt, &connect5(id, 60, true, None)).await;
    let burst: Vec<u8> = (1..=receive_maximum + 1).flat_map(qos2).collect();
    c.send(&burst).await;
    c
}

/// Waits (bounded) for `n` connections in their close grace; the last count seen.
async fn closing(gw: &TestServer, n: f64) -> f64 {
    gw.wait_metric("gateway_closing_connections", T, |v| v == n)
        .await
}

/// Reads until the DISCONNECT, answering every PUBREC with a PUBREL as a client does;
/// the DISCONNECT's reason code, or what came instead (a write error included: a client
/// library gives up on the connection there and never reads the reason).
async fn read_to_disconnect(c: &mut Raw) -> Result<u8, String> {
    loop {
        match c.next_v5(T).await {
            Ok(Packet::PubRec(r)) => {
                let rel = encode(|b| PubRel::new(r.pkid).write(b));
                if let Err(e) = c.stream.write_all(&rel).await {
                    return Err(format!("PUBREL {}: {e}", r.pkid));
                }
            }
            Ok(Packet::Disconnect(d)) => return Ok(d.reason_code as u8),
            Ok(other) => return Err(format!("unexpected {other:?}")),
            Err(e) => return Err(format!("{e} before the DISCONNECT")),
        }
    }
}

#[tokio::test]
async fn a_client_answering_pubrecs_reads_the_disconnect_0x93() {
    let gw = TestServer::start("[mqtt]\nreceive_maximum = 64");
    // Several rounds: without the grace the reset races the client's reads.
    for round in 0..5 {
        let mut c = over_receive_maximum(&gw, &format!("grace-rm-{round}"), 64).await;
        assert_eq!(read_to_disconnect(&mut c).await, Ok(0x93), "round {round}");
        assert!(c.wait_closed(T).await, "round {round}: not closed");
    }
}

/// A gateway with receive maximum 2 and `mqtt` (more `[mqtt]` keys, maybe other tables),
/// and a client it has just ended with DISCONNECT 0x93, read by the client.
async fn ended(mqtt: &str, id: &str) -> (TestServer, Raw) {
    let gw = TestServer::start(&format!("[mqtt]\nreceive_maximum = 2\n{mqtt}"));
    let mut c = over_receive_maximum(&gw, id, 2).await;
    assert_eq!(read_to_disconnect(&mut c).await, Ok(0x93));
    (gw, c)
}

#[tokio::test]
async fn a_client_that_keeps_sending_is_closed_after_the_byte_allowance() {
    // The time bound is far away: only the byte bound can end this grace.
    let (gw, mut c) = ended(
        "close_grace_ms = 60000\nclose_grace_bytes = 4096",
        "grace-bytes",
    )
    .await;
    assert_eq!(closing(&gw, 1.0).await, 1.0, "the ended connection lingers");
    c.send(&[0u8; 8192]).await;
    assert!(c.wait_closed(T).await, "closed after its byte allowance");
    assert_eq!(closing(&gw, 0.0).await, 0.0, "the grace is over");
}

#[tokio::test]
async fn a_client_that_keeps_sending_is_closed_after_the_grace_time() {
    // The byte bound is far away: only the time bound can end this grace.
    let (gw, mut c) = ended(
        "close_grace_ms = 300\nclose_grace_bytes = 16777216\n[shards]\ntick_ms = 100",
        "grace-time",
    )
    .await;
    let deadline = tokio::time::Instant::now() + T;
    let mut closed = false;
    while !closed && tokio::time::Instant::now() < deadline {
        // Keeps trickling bytes; each read returns what is waiting or the close.
        c.send(&[0u8; 16]).await;
        closed = c.wait_closed(Duration::from_millis(50)).await;
    }
    assert!(closed, "still open {T:?} after a 300 ms grace");
    assert_eq!(closing(&gw, 0.0).await, 0.0, "the grace is over");
}

#[tokio::test]
async fn a_lingering_connection_is_counted_but_is_no_client() {
    let reason = "gateway_disconnects_total{reason=\"protocol_error\"}";
    let (gw, c) = ended("close_grace_ms = 60000", "grace-metrics").await;
    // Ended once, at once; still holding a connection slot while it lingers.
    assert_eq!(gw.wait_metric(reason, T, |v| v == 1.0).await, 1.0);
    assert_eq!(closing(&gw, 1.0).await, 1.0);
    assert_eq!(gw.metric("gateway_connections").await, 1.0);
    // The client id reconnects at once; the lingering connection is not taken over.
    let (mut again, ack) =
        Raw::connected_v5(gw.mqtt, &connect5("grace-metrics", 60, false, None)).await;
    assert!(
        !ack.session_present,
        "the session ended with its connection"
    );
    assert!(again.ping_v5(T).await);
    assert_eq!(
        gw.wait_metric("gateway_connections", T, |v| v == 2.0).await,
        2.0
    );
    // The client closes its side: the grace ends, counted as one disconnect, not two.
    drop(c);
    assert_eq!(closing(&gw, 0.0).await, 0.0);
    assert_eq!(
        gw.wait_metric("gateway_connections", T, |v| v == 1.0).await,
        1.0
    );
    assert_eq!(gw.metric(reason).await, 1.0);
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"takeover\"}")
            .await,
        0.0
    );
}

/// What one of many concurrent 3.1.1 connections with the same client id saw: its
/// CONNACK's return code (or why none came), and whether it was closed afterwards.
async fn storm_member(gw: std::net::SocketAddr, i: usize) -> (Result<u8, String>, bool) {
    let stream = connect_from(i, gw).await.expect("tcp connect");
    let mut c = Raw::from_stream(stream);
    c.send(&Raw::connect_v4("grace-storm", 60, true)).await;
    let ack = match c.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => match a.code {
            mqttbytes::v4::ConnectReturnCode::Success => Ok(0),
            refused => Err(format!("refused: {refused:?}")),
        },
        other => Err(format!("{other:?}")),
    };
    let closed = ack.is_ok() && c.wait_closed(Duration::from_secs(3)).await;
    (ack, closed)
}

#[tokio::test]
async fn every_connection_taken_over_in_a_storm_reads_its_connack() {
    let gw = TestServer::start("[limits]\nmax_connect_rate = 0\nmax_handshaking = 0");
    let members: Vec<_> = (0..200)
        .map(|i| tokio::spawn(storm_member(gw.mqtt, i)))
        .collect();
    let mut open = 0;
    for (i, m) in members.into_iter().enumerate() {
        let (ack, closed) = m.await.expect("member task");
        // Every CONNECT is accepted (takeover): each reads its CONNACK before its close.
        assert_eq!(ack, Ok(0), "connection {i}");
        open += usize::from(!closed);
    }
    assert_eq!(open, 1, "exactly the last connection stays");
}

#[tokio::test]
async fn a_shutdown_lets_a_client_still_sending_read_0x8b_and_ends_within_the_drain_timeout() {
    // A grace far longer than the drain timeout: the shutdown cuts it.
    let mut gw = common::GatewayProcess::start(
        "[mqtt]\nclose_grace_ms = 60000\n[shards]\ndrain_timeout_secs = 3",
    );
    let (mut c, _) = Raw::connected_v5(gw.mqtt, &connect5("grace-stop", 60, true, None)).await;
    gw.signal(libc::SIGTERM);
    // The client keeps talking (PINGREQs) while it reads.
    let code = loop {
        if let Err(e) = c.stream.write_all(&[0xc0, 0x00]).await {
            panic!("PINGREQ failed before the DISCONNECT: {e}");
        }
        match c.next_v5(T).await {
            Ok(Packet::PingResp) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(Packet::Disconnect(d)) => break d.reason_code as u8,
            other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
        }
    };
    assert_eq!(code, 0x8B);
    let status = tokio::task::spawn_blocking(move || gw.wait_exit(Duration::from_secs(3 + 10)))
        .await
        .unwrap()
        .expect("gateway exits within drain_timeout_secs + margin");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_lingering_connection_holds_its_per_ip_slot_until_it_is_closed() {
    let (gw, c) = ended(
        "close_grace_ms = 60000\n[limits]\nmax_connections_per_ip = 1",
        "grace-ip",
    )
    .await;
    assert_eq!(closing(&gw, 1.0).await, 1.0);
    // Its address is at its limit while it lingers: a newcomer gets no CONNACK.
    let mut late = Raw::connect(gw.mqtt).await;
    late.send(&encode(|b| connect5("grace-ip-2", 60, true, None).write(b)))
        .await;
    assert!(
        late.next_v5(T).await.is_err(),
        "a connection over the per-IP limit was served"
    );
    drop(c);
    assert_eq!(closing(&gw, 0.0).await, 0.0);
    Raw::connected_v5(gw.mqtt, &connect5("grace-ip-2", 60, true, None)).await;
}
