//! PROXY protocol v1/v2 on the MQTT listener (`proxy_protocol = true`): the header's
//! address becomes the connection's peer (seen through `GET /v1/clients/{id}`), headers
//! split over many TCP segments still parse, a missing or garbage header closes the
//! connection, a v2 LOCAL header (a balancer's health check) keeps the socket address,
//! `max_connections_per_ip` counts the header's address, and only `proxy_trusted` peers
//! may send a header.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Raw, TestServer};
use gateway::proxy;
use tokio::io::AsyncWriteExt;

/// Proxied devices have public addresses, so anonymous clients must be allowed from
/// anywhere (the default lets them in from loopback only).
const PROXIED: &str = "[mqtt]\nproxy_protocol = true\n[auth]\nanonymous = \"always\"";

async fn peer_of(gw: &TestServer, id: &str) -> String {
    let (code, body) = common::http_get(gw.http, &format!("/v1/clients/{id}")).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["peer"].as_str().unwrap_or_default().to_string()
}

/// Sends `header` (in pieces of `chunk` bytes when given) and a CONNECT; true on CONNACK.
async fn connect_with(gw: &TestServer, header: &[u8], chunk: Option<usize>, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.stream.set_nodelay(true).unwrap();
    match chunk {
        None => raw.send(header).await,
        Some(n) => {
            for piece in header.chunks(n) {
                raw.stream.write_all(piece).await.unwrap();
                raw.stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    raw.send(&Raw::connect_v4(id, 60, true)).await;
    raw
}

async fn expect_connack(raw: &mut Raw) {
    match raw.recv_v4(Duration::from_secs(10)).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn v1_and_v2_headers_set_the_peer() {
    let gw = TestServer::start(PROXIED);
    let dst: SocketAddr = gw.mqtt;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "v1-tcp4",
            proxy::encode_v1("192.0.2.10:5555".parse().unwrap(), dst),
            "192.0.2.10:5555",
        ),
        (
            "v1-tcp6",
            proxy::encode_v1(
                "[2001:db8::10]:6666".parse().unwrap(),
                "[::1]:1883".parse().unwrap(),
            ),
            "[2001:db8::10]:6666",
        ),
        (
            "v2-tcp4",
            proxy::encode_v2("198.51.100.20:7777".parse().unwrap(), dst),
            "198.51.100.20:7777",
        ),
        (
            "v2-tcp6",
            proxy::encode_v2(
                "[2001:db8::20]:8888".parse().unwrap(),
                "[::1]:1883".parse().unwrap(),
            ),
            "[2001:db8::20]:8888",
        ),
    ];
    let mut keep = Vec::new();
    for (id, header, want) in cases {
        let mut raw = connect_with(&gw, &header, None, id).await;
        expect_connack(&mut raw).await;
        assert_eq!(peer_of(&gw, id).await, want, "{id}");
        keep.push(raw);
    }
}

/// Headers arriving a few bytes per TCP segment, the CONNECT after them.
#[tokio::test]
async fn headers_split_over_segments() {
    let gw = TestServer::start(PROXIED);
    for (i, header) in [
        proxy::encode_v1("192.0.2.30:1000".parse().unwrap(), gw.mqtt),
        proxy::encode_v2(
            "[2001:db8::30]:2000".parse().unwrap(),
            "[::1]:1".parse().unwrap(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        for chunk in [1, 3, 7] {
            let id = format!("split-{i}-{chunk}");
            let mut raw = connect_with(&gw, &header, Some(chunk), &id).await;
            expect_connack(&mut raw).await;
            let want = if i == 0 {
                "192.0.2.30:1000"
            } else {
                "[2001:db8::30]:2000"
            };
            assert_eq!(peer_of(&gw, &id).await, want);
        }
    }
}

/// A v2 LOCAL header (health check) is accepted and the socket's own address is kept.
#[tokio::test]
async fn v2_local_keeps_the_socket_address() {
    let gw = TestServer::start(PROXIED);
    let mut raw = connect_with(&gw, &proxy::encode_v2_local(), None, "health").await;
    expect_connack(&mut raw).await;
    let local = raw.stream.local_addr().unwrap();
    assert_eq!(peer_of(&gw, "health").await, local.to_string());
}

/// With the default `[auth] anonymous = "loopback"`, the header's address is what the
/// rule looks at: a proxied public device without credentials is refused (CONNACK 5),
/// while a v2 LOCAL connection from the proxy's own loopback address is let in.
#[tokio::test]
async fn anonymous_loopback_rule_sees_the_header_address() {
    let gw = TestServer::start("[mqtt]\nproxy_protocol = true");
    let header = proxy::encode_v1("192.0.2.40:1000".parse().unwrap(), gw.mqtt);
    let mut raw = connect_with(&gw, &header, None, "public-anon").await;
    match raw.recv_v4(Duration::from_secs(10)).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 5, got {other:?}"),
    }
    let mut local = connect_with(&gw, &proxy::encode_v2_local(), None, "lb-local").await;
    expect_connack(&mut local).await;
}

#[tokio::test]
async fn missing_or_bad_header_closes_and_others_are_served() {
    let gw = TestServer::start(PROXIED);
    // No header: the CONNECT itself is not a PROXY header.
    let mut bare = connect_with(&gw, b"", None, "bare").await;
    assert!(bare.closed_within(Duration::from_secs(10)).await);
    // Garbage, a truncated-then-wrong v2 signature, an over-long v1 line.
    let mut long_v1 = b"PROXY TCP4 ".to_vec();
    long_v1.extend(std::iter::repeat_n(b'1', 200));
    for bad in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        b"\r\n\r\n\0\r\nQUIX\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec(),
        long_v1,
    ] {
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.send(&bad).await;
        assert!(raw.closed_within(Duration::from_secs(10)).await);
    }
    assert!(gw.metric("gateway_proxy_header_errors_total").await >= 5.0);
    // A v2 header that announces more than proxy_header_max_bytes.
    let mut huge = proxy::encode_v2("1.2.3.4:5".parse().unwrap(), gw.mqtt);
    huge[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&huge).await;
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    // An honest client behind the proxy is served throughout.
    let mut ok = connect_with(
        &gw,
        &proxy::encode_v2("192.0.2.99:1".parse().unwrap(), gw.mqtt),
        None,
        "honest",
    )
    .await;
    expect_connack(&mut ok).await;
}

/// A header that never completes is closed by the connect timeout.
#[tokio::test]
async fn partial_header_times_out() {
    let gw = TestServer::start("[mqtt]\nproxy_protocol = true\nconnect_timeout_secs = 2");
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(b"PROXY TCP4 192.0").await;
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    assert!(
        gw.metric("gateway_disconnects_total{reason=\"connect_timeout\"}")
            .await
            >= 1.0
    );
}

/// `max_connections_per_ip` counts the address the header carries, not the proxy's.
#[tokio::test]
async fn per_ip_limit_uses_the_header_address() {
    let gw =
        TestServer::start("[mqtt]\nproxy_protocol = true\n[limits]\nmax_connections_per_ip = 2\n[auth]\nanonymous = \"always\"");
    let from = |port: u16| {
        proxy::encode_v2(
            SocketAddr::new("192.0.2.50".parse().unwrap(), port),
            gw.mqtt,
        )
    };
    let mut a = connect_with(&gw, &from(1), None, "ip-a").await;
    expect_connack(&mut a).await;
    let mut b = connect_with(&gw, &from(2), None, "ip-b").await;
    expect_connack(&mut b).await;
    let mut c = connect_with(&gw, &from(3), None, "ip-c").await;
    assert!(c.closed_within(Duration::from_secs(10)).await);
    assert_eq!(
        gw.metric("gateway_connect_refused_total{reason=\"per_ip\"}")
            .await,
        1.0
    );
    // Another address through the same proxy is not affected.
    let mut d = connect_with(
        &gw,
        &proxy::encode_v2("192.0.2.51:1".parse().unwrap(), gw.mqtt),
        None,
        "ip-d",
    )
    .await;
    expect_connack(&mut d).await;
    // When one of the two leaves, the address may connect again.
    drop(a);
    let mut e = None;
    for _ in 0..50 {
        let mut r = connect_with(&gw, &from(4), None, "ip-e").await;
        if r.recv_v4(Duration::from_secs(2)).await.is_ok() {
            e = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        e.is_some(),
        "the address stayed blocked after a connection closed"
    );
}

/// Issue 17.6: only `proxy_trusted` peers may send a header. With the list set to
/// 127.0.0.1/32, a header from a socket bound to 127.0.0.2 (claiming the loopback
/// address, which the anonymous loopback rule would admit) is refused and counted; the
/// same header from 127.0.0.1 is accepted. Before, every peer was believed.
#[tokio::test]
async fn a_header_from_an_untrusted_peer_is_refused() {
    let gw =
        TestServer::start("[mqtt]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n");
    let forged = proxy::encode_v1("127.0.0.1:4000".parse().unwrap(), gw.mqtt);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut raw = Raw::from_stream(socket.connect(gw.mqtt).await.unwrap());
    let mut bytes = forged.clone();
    bytes.extend(Raw::connect_v4("forger", 60, true));
    raw.send(&bytes).await;
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    assert_eq!(
        gw.metric("gateway_connect_refused_total{reason=\"proxy_untrusted\"}")
            .await,
        1.0
    );
    let mut ok = connect_with(&gw, &forged, None, "trusted").await;
    expect_connack(&mut ok).await;
    assert_eq!(peer_of(&gw, "trusted").await, "127.0.0.1:4000");
}
