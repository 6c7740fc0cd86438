//! MQTT over WebSocket clients for the tests: tungstenite (an independent implementation)
//! carrying MQTT packets built and decoded with mqttbytes, against a gateway started
//! with `ws_listen` (and `wss_listen` in tests/tls.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::{Raw, TestServer};

/// Long enough for a loaded machine; only failures wait this long.
pub const WAIT: Duration = Duration::from_secs(30);

/// A gateway with a WebSocket listener on a free loopback port; `extra` is more `[mqtt]`
/// TOML (keys only) followed by any other sections.
pub fn gateway(extra: &str) -> (TestServer, SocketAddr) {
    let gw = TestServer::start(&format!("[mqtt]\nws_listen = \"127.0.0.1:0\"\n{extra}"));
    let addr = gw.ws.expect("ws listener");
    (gw, addr)
}

/// A tungstenite WebSocket that offers the `mqtt` subprotocol, over any stream.
pub fn upgrade<S: Read + Write>(url: &str, stream: S) -> WebSocket<S> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tungstenite::client(req, stream).expect("upgrade accepted");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    ws
}

/// A WebSocket to `addr` over plain TCP (reads time out after [`WAIT`]).
pub fn connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    upgrade(&format!("ws://{addr}/mqtt"), stream)
}

/// Reads binary messages until `want` MQTT bytes have come; returns them.
pub fn read_bytes<S: Read + Write>(ws: &mut WebSocket<S>, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        match ws.read().expect("read") {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

/// The close code the server ends with.
pub fn close_code<S: Read + Write>(ws: &mut WebSocket<S>) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

/// An MQTT 3.1.1 client over a WebSocket: packets out as binary frames, packets in
/// decoded from the frames' bytes, whatever their boundaries.
pub struct WsMqtt<S: Read + Write> {
    pub ws: WebSocket<S>,
    buf: BytesMut,
}

impl<S: Read + Write> WsMqtt<S> {
    pub fn new(ws: WebSocket<S>) -> Self {
        WsMqtt {
            ws,
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.ws.send(Message::binary(bytes.to_vec())).unwrap();
    }

    /// The next packet; Err("closed") when the connection ends (close frame or EOF).
    pub fn recv(&mut self) -> Result<mqttbytes::v4::Packet, &'static str> {
        loop {
            match mqttbytes::v4::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return Err("undecodable"),
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => self.buf.extend_from_slice(&b),
                Ok(Message::Close(_)) => return Err("closed"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("timeout")
                }
                Err(_) => return Err("closed"),
            }
        }
    }

    /// Sends CONNECT (3.1.1) and returns the CONNACK's return code.
    pub fn connect(&mut self, id: &str, keep_alive: u16) -> u8 {
        self.send(&Raw::connect_v4(id, keep_alive, true));
        self.connack()
    }

    pub fn connack(&mut self) -> u8 {
        match self.recv() {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => a.code as u8,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to `filter` at QoS 0 and returns the SUBACK's return codes.
    pub fn subscribe(&mut self, filter: &str) -> Vec<mqttbytes::v4::SubscribeReasonCode> {
        self.send(&Raw::subscribe_v4(filter, 0, 1));
        loop {
            match self.recv() {
                Ok(mqttbytes::v4::Packet::SubAck(a)) => return a.return_codes,
                Ok(_) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH's topic and payload.
    pub fn next_publish(&mut self) -> (String, Vec<u8>) {
        loop {
            match self.recv() {
                Ok(mqttbytes::v4::Packet::Publish(p)) => return (p.topic, p.payload.to_vec()),
                Ok(_) => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// True when the connection ends within `within` (the socket's read timeout must be
    /// shorter than that for a silent peer to be noticed).
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.recv() {
                Err("closed") => return true,
                _ => continue,
            }
        }
        false
    }
}

/// An honest WebSocket client is served: it connects, subscribes and gets its own
/// message back.
pub fn assert_served(addr: SocketAddr, id: &str) {
    let mut c = WsMqtt::new(connect(addr));
    assert_eq!(c.connect(id, 30), 0, "{id}: CONNACK accepted");
    let topic = format!("served/{id}");
    c.subscribe(&topic);
    c.send(&Raw::publish_v4(&topic, 0, 0, b"still here"));
    assert_eq!(c.next_publish(), (topic, b"still here".to_vec()), "{id}");
}
