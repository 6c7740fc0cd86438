//! A stand-in for the gateway's WebSocket transport until the shard has one: a loopback
//! listener that runs `gateway::ws` (the upgrade, then the frame decoder and encoder)
//! exactly as the transport will, and relays the plaintext MQTT bytes to the gateway's
//! TCP listener. Real WebSocket clients (tungstenite, MQTT.js in Chromium) talking
//! through it prove the pure codec end to end. Blocking sockets and two threads per
//! connection: a test tool, not the transport's design.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use gateway::ws::frame::{self, Decoder};
use gateway::ws::handshake::{self, Policy, Upgrade};

/// What the bridge enforces, as the `[mqtt]` ws keys and `max_packet_size` will.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    pub path: String,
    pub allowed_origins: Vec<String>,
    pub max_handshake_bytes: usize,
    pub max_payload: u32,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            path: "/mqtt".into(),
            allowed_origins: Vec::new(),
            max_handshake_bytes: 8192,
            max_payload: 1 << 20,
        }
    }
}

/// Starts the bridge to `upstream` (the gateway's MQTT/TCP address); returns its address.
/// Its threads end with their connections.
pub fn start(upstream: SocketAddr, cfg: BridgeConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind bridge");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let cfg = cfg.clone();
            thread::spawn(move || serve(client, upstream, &cfg));
        }
    });
    addr
}

fn serve(mut client: TcpStream, upstream: SocketAddr, cfg: &BridgeConfig) {
    let Some(rest) = upgrade(&mut client, cfg) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let Ok(gw) = TcpStream::connect(upstream) else {
        return;
    };
    let writer = Arc::new(Mutex::new(client.try_clone().unwrap()));
    let down = {
        let (mut gw, writer) = (gw.try_clone().unwrap(), writer.clone());
        thread::spawn(move || downstream(&mut gw, &writer))
    };
    upstream_loop(&mut client, gw, rest, &writer, cfg.max_payload);
    let _ = down.join();
}

/// Reads the upgrade request and answers it; the bytes after it, if accepted.
fn upgrade(client: &mut TcpStream, cfg: &BridgeConfig) -> Option<Vec<u8>> {
    let policy = Policy {
        path: &cfg.path,
        allowed_origins: &cfg.allowed_origins,
        max_bytes: cfg.max_handshake_bytes,
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match handshake::parse(&buf, &policy) {
            Upgrade::Partial => {}
            Upgrade::Accepted(a) => {
                client.write_all(&a.response()).ok()?;
                return Some(buf.split_off(a.consumed));
            }
            Upgrade::Refused(r) => {
                let _ = client.write_all(&r.response());
                return None;
            }
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Client frames in, plaintext MQTT bytes out to the gateway, control replies back,
/// honouring the decoder's contract (unconsumed bytes are passed again).
fn upstream_loop(
    client: &mut TcpStream,
    mut gw: TcpStream,
    first: Vec<u8>,
    writer: &Mutex<TcpStream>,
    max_payload: u32,
) {
    let mut dec = Decoder::default();
    let mut buf = first;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut replies = Vec::new();
        let d = dec.decode(&mut buf, max_payload, &mut replies);
        let plain_ok = gw.write_all(&buf[..d.plain]).is_ok();
        if !replies.is_empty() {
            let _ = writer.lock().unwrap().write_all(&replies);
        }
        if d.end.is_some() || !plain_ok {
            break;
        }
        buf.drain(..d.used);
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = gw.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Gateway bytes out to the client, one binary frame per read.
fn downstream(gw: &mut TcpStream, writer: &Mutex<TcpStream>) {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match gw.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut out = Vec::with_capacity(n + frame::MAX_SERVER_HEADER);
                frame::write_binary(&mut out, &chunk[..n]);
                if writer.lock().unwrap().write_all(&out).is_err() {
                    break;
                }
            }
        }
    }
    let _ = writer.lock().unwrap().shutdown(Shutdown::Both);
}
