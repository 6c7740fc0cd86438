//! Malformed and abusive input over real TCP against the real gateway. Every case checks
//! two things: the offending connection is closed (after the CONNACK or DISCONNECT with
//! the right reason code, where the protocol has one) or limited, and an honest client
//! connected before the attack is still served, after it and, for the long ones, during.
//!
//! Cases covered elsewhere and not repeated here: the MQTT 3.1.1 forms of garbage, bad
//! remaining length, reserved flags, packet id 0, wildcard topics, invalid UTF-8, second
//! CONNECT and oversize (`mqtt_core.rs`, `malformed_input_closes_only_that_connection`);
//! exactly max_packet_size (`buffers.rs`); half-closed peers left in CLOSE_WAIT and
//! subscribers that never read what is published to them (`reaping.rs`); mass
//! keep-alive expiry (`timers.rs`).

mod common;

use std::time::Duration;

use common::{frame, s, v4, Raw, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

/// An MQTT 3.1.1 client subscribed to its own topic, asked to prove it is still served.
struct Honest {
    c: v4::Client,
    topic: String,
    n: u32,
}

impl Honest {
    async fn start(gw: &TestServer, name: &str) -> Honest {
        let mut c = v4::connect(v4::options(gw.mqtt, &format!("honest-{name}"))).await;
        let topic = format!("honest/{name}");
        c.subscribe(&topic, v4::QoS::AtLeastOnce).await;
        Honest { c, topic, n: 0 }
    }

    /// A QoS 1 PUBLISH to its own topic comes back.
    async fn served(&mut self, when: &str) {
        self.n += 1;
        let payload = format!("{when} #{}", self.n);
        self.c
            .client
            .publish(&self.topic, v4::QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("honest publish queued");
        loop {
            let m = self
                .c
                .next_publish(T)
                .await
                .unwrap_or_else(|| panic!("honest client not served {when}"));
            if m.payload == payload.as_bytes() {
                return;
            }
        }
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A CONNECT with any client id bytes (valid UTF-8 or not) and an optional will topic.
fn connect_bytes(level: u8, id: &[u8], will_topic: Option<&[u8]>) -> Vec<u8> {
    let flags = 0x02 | if will_topic.is_some() { 0x04 } else { 0 };
    let mut body = cat(&[&s(b"MQTT"), &[level, flags, 0, 30]]);
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&s(id));
    if let Some(t) = will_topic {
        if level == 5 {
            body.push(0); // no will properties
        }
        body.extend_from_slice(&s(t));
        body.extend_from_slice(&s(b"bye"));
    }
    frame(0x10, &body)
}

/// A v5 client past its CONNACK, and the Maximum Packet Size it was told.
async fn v5_client(gw: &TestServer, id: &str, keep_alive: u16) -> (Raw, u32) {
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v5(id, keep_alive, None)).await;
    match raw.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v5::ConnectReturnCode::Success, "{id}");
            let max = a
                .properties
                .and_then(|p| p.max_packet_size)
                .unwrap_or(u32::MAX);
            (raw, max)
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
}

async fn v4_client(gw: &TestServer, id: &str, keep_alive: u16) -> Raw {
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4(id, keep_alive, true)).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success, "{id}");
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    raw
}

/// Each malformed MQTT 5 packet gets DISCONNECT with its reason code, then the close;
/// only that connection is affected.
#[tokio::test]
async fn malformed_v5_packets_get_their_reason_code_and_close_only_that_connection() {
    const MAX_PACKET: usize = 4096;
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 4096\nmax_topic_len = 64");
    let mut honest = Honest::start(&gw, "v5-malformed").await;

    let long_topic = vec![b't'; 65];
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "continuation bit on the 4th length byte (a 5-byte remaining length)",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0x80, 0x01],
            0x81,
        ),
        (
            "remaining length shorter than the topic it announces",
            frame(0x30, &[0, 9, b'a', b'/']),
            0x81,
        ),
        (
            "SUBSCRIBE with reserved flags 0b0000",
            frame(0x80, &cat(&[&[0, 1, 0], &s(b"a"), &[0]])),
            0x81,
        ),
        (
            "PUBREL with reserved flags 0b0000",
            vec![0x60, 2, 0, 1],
            0x81,
        ),
        (
            "PUBLISH with QoS 3",
            frame(0x36, &cat(&[&s(b"a"), &[0, 1, 0]])),
            0x81,
        ),
        (
            "DUP on a QoS 0 PUBLISH",
            frame(0x38, &cat(&[&s(b"a"), &[0]])),
            0x82,
        ),
        (
            "invalid UTF-8 in the topic",
            frame(0x30, &cat(&[&s(&[0xC3, 0x28]), &[0]])),
            0x81,
        ),
        (
            "U+0000 in the topic",
            frame(0x30, &cat(&[&s(b"a\0b"), &[0]])),
            0x81,
        ),
        (
            "QoS 1 PUBLISH with packet id 0",
            frame(0x32, &cat(&[&s(b"a"), &[0, 0, 0]])),
            0x82,
        ),
        (
            "SUBSCRIBE with packet id 0",
            frame(0x82, &cat(&[&[0, 0, 0], &s(b"a"), &[0]])),
            0x82,
        ),
        (
            "invalid UTF-8 in a SUBSCRIBE filter",
            frame(0x82, &cat(&[&[0, 1, 0], &s(&[0xFF]), &[0]])),
            0x81,
        ),
        ("a second CONNECT", Raw::connect_v5("again", 30, None), 0x82),
        (
            "a packet only servers send (CONNACK)",
            vec![0x20, 3, 0, 0, 0],
            0x82,
        ),
        ("reserved packet type 0", vec![0x00, 0x00], 0x81),
        (
            "topic alias 0",
            frame(0x30, &cat(&[&s(b"a"), &[3, 0x23, 0, 0]])),
            0x94,
        ),
        (
            "topic name longer than max_topic_len",
            frame(0x30, &cat(&[&s(&long_topic), &[0]])),
            0x90,
        ),
        (
            "one byte over the Maximum Packet Size in CONNACK (header alone)",
            // Refused from the fixed header, before any body byte arrives.
            {
                let mut f = frame(0x30, &vec![0; MAX_PACKET - 3 + 1]);
                f.truncate(4);
                f
            },
            0x95,
        ),
    ];
    let n = cases.len();
    for (i, (what, bytes, code)) in cases.into_iter().enumerate() {
        let (mut raw, max) = v5_client(&gw, &format!("bad5-{i}"), 30).await;
        assert_eq!(max as usize, MAX_PACKET, "Maximum Packet Size announced");
        raw.send(&bytes).await;
        assert_eq!(
            raw.expect_disconnect_v5(T).await,
            code,
            "{what}: DISCONNECT reason code"
        );
        assert!(raw.wait_closed(T).await, "{what}: connection not closed");
        honest.served(&format!("after {what}")).await;
    }
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"protocol_error\"}")
            .await,
        n as f64
    );
}

/// What a refused first packet gets before the close.
enum Answer {
    /// Nothing: the protocol has no code for the fault.
    Close,
    /// A 3.1.1 CONNACK with this return code.
    V4(u8),
    /// An MQTT 5 CONNACK with this reason code.
    V5(u8),
}

/// Bad first packets: closed without a CONNACK where the protocol has no code for the
/// fault, with CONNACK 0x02 (3.1.1) / 0x85 (5) for a client id that is not UTF-8.
#[tokio::test]
async fn bad_first_packets_close_the_connection() {
    let gw = TestServer::start("[mqtt]\nmax_packet_size = 4096\nmax_topic_len = 64");
    let mut honest = Honest::start(&gw, "first-packet").await;
    let long_will = vec![b'w'; 65];

    let cases: Vec<(&str, Vec<u8>, Answer)> = vec![
        (
            "PUBLISH before CONNECT",
            Raw::publish_v4("a/b", 0, 0, b"x"),
            Answer::Close,
        ),
        ("PINGREQ before CONNECT", vec![0xC0, 0], Answer::Close),
        (
            "5-byte remaining length before CONNECT",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            Answer::Close,
        ),
        (
            "CONNECT with reserved fixed-header flags",
            {
                let mut c = Raw::connect_v4("flags", 30, true);
                c[0] = 0x12;
                c
            },
            Answer::Close,
        ),
        (
            "CONNECT larger than max_packet_size",
            frame(0x10, &vec![0; 5000])[..8].to_vec(),
            Answer::Close,
        ),
        (
            "3.1.1 client id that is not UTF-8",
            connect_bytes(4, &[0xC3, 0x28], None),
            Answer::V4(0x02),
        ),
        (
            "3.1.1 client id with U+0000",
            connect_bytes(4, b"a\0b", None),
            Answer::V4(0x02),
        ),
        (
            "MQTT 5 client id that is not UTF-8",
            connect_bytes(5, &[0xED, 0xA0, 0x80], None),
            Answer::V5(0x85),
        ),
        (
            "MQTT 5 will topic longer than max_topic_len",
            connect_bytes(5, b"long-will-5", Some(&long_will)),
            Answer::V5(0x90),
        ),
        (
            "3.1.1 will topic longer than max_topic_len",
            connect_bytes(4, b"long-will-4", Some(&long_will)),
            Answer::Close,
        ),
    ];
    for (what, bytes, answer) in cases {
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.send(&bytes).await;
        match answer {
            Answer::Close => assert_eq!(
                raw.next_v4(T).await.err(),
                Some("closed"),
                "{what}: closed without an answer"
            ),
            Answer::V4(code) => match raw.next_v4(T).await {
                Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
                    assert_eq!(a.code as u8, code, "{what}: CONNACK code")
                }
                other => panic!("{what}: expected CONNACK {code:#04x}, got {other:?}"),
            },
            Answer::V5(code) => match raw.next_v5(T).await {
                Ok(mqttbytes::v5::Packet::ConnAck(a)) => {
                    assert_eq!(a.code as u8, code, "{what}: CONNACK code")
                }
                other => panic!("{what}: expected CONNACK {code:#04x}, got {other:?}"),
            },
        }
        assert!(raw.wait_closed(T).await, "{what}: connection not closed");
        honest.served(&format!("after {what}")).await;
    }
}

/// A topic of 65,535 bytes, the most an MQTT string holds: a PUBLISH to it closes the
/// connection (v5: 0x90), a SUBSCRIBE to it is refused in the SUBACK and the
/// connection lives on. The default max_topic_len (1024) applies.
#[tokio::test]
async fn a_topic_of_65535_bytes_is_refused() {
    let gw = TestServer::start("");
    let mut honest = Honest::start(&gw, "long-topic").await;
    let topic = vec![b'/'; 65_535];

    let (mut pub5, _) = v5_client(&gw, "long-pub-5", 30).await;
    pub5.send(&frame(0x30, &cat(&[&s(&topic), &[0], b"x"])))
        .await;
    assert_eq!(pub5.expect_disconnect_v5(T).await, 0x90);
    assert!(pub5.wait_closed(T).await);
    honest.served("after a 65,535-byte v5 topic").await;

    let mut pub4 = v4_client(&gw, "long-pub-4", 30).await;
    pub4.send(&frame(0x30, &cat(&[&s(&topic), b"x"]))).await;
    assert!(pub4.wait_closed(T).await, "3.1.1 long topic closes");
    honest.served("after a 65,535-byte 3.1.1 topic").await;

    let subs_before = gw.metric("gateway_subscriptions").await;
    let (mut sub5, _) = v5_client(&gw, "long-sub-5", 30).await;
    sub5.send(&frame(0x82, &cat(&[&[0, 7, 0], &s(&topic), &[1]])))
        .await;
    match sub5.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::SubAck(a)) => {
            assert_eq!(a.pkid, 7);
            assert_eq!(
                a.return_codes,
                [mqttbytes::v5::SubscribeReasonCode::TopicFilterInvalid]
            );
        }
        other => panic!("expected SUBACK 0x8F, got {other:?}"),
    }
    assert!(sub5.ping_v5(T).await, "the subscriber is still connected");

    let mut sub4 = v4_client(&gw, "long-sub-4", 30).await;
    sub4.send(&frame(0x82, &cat(&[&[0, 8], &s(&topic), &[1]])))
        .await;
    match sub4.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => {
            assert_eq!(a.pkid, 8);
            assert_eq!(
                a.return_codes,
                [mqttbytes::v4::SubscribeReasonCode::Failure]
            );
        }
        other => panic!("expected SUBACK 0x80, got {other:?}"),
    }
    assert_eq!(gw.metric("gateway_subscriptions").await, subs_before);
    honest.served("after 65,535-byte filters").await;
}

/// 10,000 subscriptions from one client: the first max_subscriptions_per_client are
/// granted, the rest get 0x97 (quota exceeded); a filter the session already holds can
/// still be re-subscribed, and the honest client is served throughout.
#[tokio::test]
async fn ten_thousand_subscriptions_stop_at_the_quota() {
    let gw = TestServer::start("");
    let max = gateway::config::Config::default()
        .mqtt
        .max_subscriptions_per_client as usize;
    assert!(max < 10_000, "the default quota is below the attack");
    let mut honest = Honest::start(&gw, "subs").await;
    let subs_before = gw.metric("gateway_subscriptions").await;

    let (mut raw, _) = v5_client(&gw, "greedy", 60).await;
    let mut codes = Vec::new();
    for batch in 0..100u16 {
        let mut body = vec![0, 0, 0];
        body[..2].copy_from_slice(&(batch + 1).to_be_bytes());
        for i in 0..100 {
            body.extend_from_slice(&s(format!("greedy/{batch}/{i}").as_bytes()));
            body.push(1);
        }
        raw.send(&frame(0x82, &body)).await;
        match raw.next_v5(T).await {
            Ok(mqttbytes::v5::Packet::SubAck(a)) => {
                assert_eq!(a.pkid, batch + 1);
                codes.extend(a.return_codes.into_iter().map(|c| c as u8));
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
        if batch % 25 == 0 {
            honest
                .served(&format!("during subscription batch {batch}"))
                .await;
        }
    }
    assert_eq!(codes.len(), 10_000);
    assert!(codes[..max].iter().all(|&c| c == 1), "first {max} granted");
    assert!(
        codes[max..].iter().all(|&c| c == 0x97),
        "the rest refused with 0x97"
    );
    assert_eq!(
        gw.metric("gateway_subscriptions").await - subs_before,
        max as f64
    );
    // At the quota, an existing filter may still be subscribed again (options change).
    raw.send(&frame(
        0x82,
        &cat(&[&[0x30, 0x39, 0], &s(b"greedy/0/0"), &[0]]),
    ))
    .await;
    match raw.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::SubAck(a)) => {
            assert_eq!(a.return_codes.len(), 1);
            assert_eq!(a.return_codes[0] as u8, 0, "re-subscribe granted at QoS 0");
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The granted ones work.
    assert!(raw.ping_v5(T).await);
    honest.served("after 10,000 subscriptions").await;
}

#[tokio::test]
async fn v311_subscriptions_beyond_the_quota_get_0x80() {
    let gw = TestServer::start("[mqtt]\nmax_subscriptions_per_client = 3");
    let mut honest = Honest::start(&gw, "subs4").await;
    let mut raw = v4_client(&gw, "greedy4", 60).await;
    let mut body = vec![0, 9];
    for i in 0..5 {
        body.extend_from_slice(&s(format!("g4/{i}").as_bytes()));
        body.push(0);
    }
    raw.send(&frame(0x82, &body)).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => {
            use mqttbytes::v4::SubscribeReasonCode as C;
            let q0 = C::Success(mqttbytes::QoS::AtMostOnce);
            assert_eq!(a.return_codes, [q0, q0, q0, C::Failure, C::Failure]);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    honest.served("after the 3.1.1 quota").await;
}

/// Slowloris before CONNECT: a CONNECT trickled one byte per second never completes, and
/// the connect timeout, counted from accept and not reset by partial bytes, closes it.
#[tokio::test]
async fn slowloris_connect_is_closed_by_the_connect_timeout() {
    let gw = TestServer::start("[mqtt]\nconnect_timeout_secs = 2\n[shards]\ntick_ms = 100");
    let mut honest = Honest::start(&gw, "slow-connect").await;
    let connect = Raw::connect_v4("slowloris", 30, true);
    let mut raw = Raw::connect(gw.mqtt).await;
    let mut sent = 0;
    let outcome = loop {
        if sent == connect.len() {
            break "the whole CONNECT went through";
        }
        if raw
            .stream
            .write_all(&connect[sent..sent + 1])
            .await
            .is_err()
        {
            break "closed";
        }
        sent += 1;
        honest.served("during a slowloris CONNECT").await;
        // One second for the server to say anything; it must not answer, only close.
        match raw.next_v4(Duration::from_secs(1)).await {
            Err("timeout") => continue,
            Err("closed") => break "closed",
            Err(e) => break e,
            Ok(p) => panic!("answered a partial CONNECT with {p:?}"),
        }
    };
    assert_eq!(outcome, "closed", "after {sent} of {} bytes", connect.len());
    assert!(sent < connect.len());
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"connect_timeout\"}")
            .await,
        1.0
    );
    honest.served("after a slowloris CONNECT").await;
}

/// Slowloris inside a frame after CONNECT: a PUBLISH trickled one byte per second is
/// not a packet, so it does not reset the keep-alive (2 s, closed after 3 s), which ends
/// the connection long before the frame completes; an MQTT 5 client is told 0x8D.
#[tokio::test]
async fn slowloris_frame_is_closed_by_the_keep_alive() {
    let gw = TestServer::start("[shards]\ntick_ms = 100");
    let mut honest = Honest::start(&gw, "slow-frame").await;
    let (mut raw, _) = v5_client(&gw, "slowloris-5", 2).await;
    // 40 bytes: 40 s at one byte per second.
    let publish = frame(0x30, &cat(&[&s(b"slow/topic"), &[0], &[b'x'; 26]]));
    let mut sent = 0;
    let code = loop {
        assert!(
            sent < publish.len(),
            "the whole trickled PUBLISH went through"
        );
        if raw
            .stream
            .write_all(&publish[sent..sent + 1])
            .await
            .is_err()
        {
            panic!("closed without a DISCONNECT after {sent} bytes");
        }
        sent += 1;
        honest.served("during a slowloris PUBLISH").await;
        match raw.next_v5(Duration::from_secs(1)).await {
            Err("timeout") => continue,
            Ok(mqttbytes::v5::Packet::Disconnect(d)) => break d.reason_code as u8,
            other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
        }
    };
    assert_eq!(code, 0x8D, "keep alive timeout");
    assert!(raw.wait_closed(T).await);
    assert!(sent < publish.len());
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"keepalive\"}")
            .await,
        1.0
    );
    honest.served("after a slowloris PUBLISH").await;
}

/// A PINGREQ flood from a client that reads its answers: every PINGREQ is answered, in
/// order, and the honest client is served while it lasts.
#[tokio::test]
async fn a_pingreq_flood_is_answered_and_starves_nobody() {
    const N: usize = 200_000;
    let gw = TestServer::start("");
    let mut honest = Honest::start(&gw, "ping-flood").await;
    let raw = v4_client(&gw, "ping-flooder", 60).await;
    let (mut r, mut w) = raw.stream.into_split();
    let writer = tokio::spawn(async move {
        let burst = [0xC0u8, 0].repeat(1000);
        for _ in 0..N / 1000 {
            w.write_all(&burst).await.expect("flood written");
        }
        w
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut got = 0usize;
        while got < 2 * N {
            let n = r.read(&mut buf).await.expect("PINGRESPs read");
            assert!(n > 0, "flooder closed after {} PINGRESPs", got / 2);
            for (i, &b) in buf[..n].iter().enumerate() {
                let expected = if (got + i).is_multiple_of(2) { 0xD0 } else { 0 };
                assert_eq!(b, expected, "PINGRESP byte {}", got + i);
            }
            got += n;
        }
        r
    });
    let mut rounds = 0;
    while !reader.is_finished() {
        honest.served("during a PINGREQ flood").await;
        rounds += 1;
    }
    let _r = reader.await.expect("every PINGREQ answered");
    let _w = writer.await.unwrap();
    assert!(rounds > 0);
    assert!(
        gw.metric("gateway_packets_received_total{type=\"pingreq\"}")
            .await
            >= N as f64
    );
    honest.served("after a PINGREQ flood").await;
}

/// A PINGREQ flood from a client that never reads: once its unsent answers pass the
/// outbound high watermark the gateway stops reading it, so TCP backpressure stops the
/// flood (the answers do not pile up in memory), and the write-stall timeout closes it.
#[tokio::test]
async fn a_pingreq_flood_that_never_reads_meets_backpressure() {
    // Fixed socket buffers (no autotuning) so the bytes in flight are known.
    let gw = TestServer::start(
        "[mqtt]\nwrite_stall_timeout_secs = 5\n[shards]\ntick_ms = 100\n\
         [tcp]\nrecv_buffer_bytes = 65536\nsend_buffer_bytes = 65536",
    );
    let mut honest = Honest::start(&gw, "deaf-flood").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(65536).unwrap();
    sock.set_send_buffer_size(65536).unwrap();
    let mut raw = Raw::from_stream(sock.connect(gw.mqtt).await.unwrap());
    raw.send(&Raw::connect_v4("deaf-flooder", 60, true)).await;
    assert!(matches!(
        raw.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let burst = [0xC0u8, 0].repeat(32 * 1024);
    // Far more than every buffer on the way holds; without backpressure the gateway
    // would take it all (and hold the answers) until the write stall closes it.
    const LIMIT: usize = 64 << 20;
    let mut written = 0usize;
    while written < LIMIT {
        match tokio::time::timeout(Duration::from_secs(1), raw.stream.write(&burst)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("closed before backpressure, after {written} bytes: {e}"),
            Err(_) => break, // blocked: TCP backpressure reached the flooder
        }
    }
    assert!(
        written < 8 << 20,
        "the flooder wrote {written} bytes before blocking"
    );
    let lent = gw.metric("gateway_buffer_pool_bytes{state=\"lent\"}").await;
    assert!(lent < (1 << 20) as f64, "{lent} bytes of buffers lent");
    honest.served("while the flooder is blocked").await;
    let closed = gw
        .wait_metric(
            "gateway_disconnects_total{reason=\"write_stall\"}",
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(closed, 1.0, "closed for write stall");
    honest.served("after the flooder was closed").await;
}
