//! MQTT over WebSocket, client side (`--transport ws|wss`; `tls` is a [`Link`] with no
//! WebSocket over a TLS [`Wire`]): the HTTP upgrade, masked
//! binary frames around what a device writes, and the server's frames turned back into
//! the MQTT byte stream the rest of loadgen reads.
//!
//! A device's connection is a [`Link`]: a [`Wire`] (TCP, or TLS over TCP for `wss`) plus,
//! over WebSocket, a little state (the payload left in the current server frame, a buffer
//! that holds only a partial frame header or control frame and is released when empty,
//! and the masking PRNG). Code that reads and writes MQTT bytes calls the link as it
//! called the socket.

use std::io;

use base64::Engine;
use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use crate::fleet::Rng;

mod wire;

pub use wire::{client_config, per_device, TlsOpts, Wire};

/// How devices reach the broker.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// MQTT straight over TCP.
    #[default]
    Tcp,
    /// MQTT over WebSocket (subprotocol `mqtt`) on `--ws-path`.
    Ws,
    /// MQTT over WebSocket over TLS (`--tls-ca` to verify the server).
    Wss,
    /// MQTT over TLS (`--tls-ca` to verify the server).
    Tls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Tls => "tls",
        }
    }

    /// Whether the device's bytes go through TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Wss | Transport::Tls)
    }
}

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Longest upgrade response read.
const MAX_RESPONSE: usize = 8192;
const OP_CONTINUATION: u8 = 0x0;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The WebSocket side of a link.
#[derive(Debug)]
struct WsState {
    /// Server bytes not yet turned into MQTT bytes: a partial frame header or control
    /// frame. Empty (and unallocated) between frames.
    raw: BytesMut,
    /// Payload bytes of the current data frame still to come.
    left: u64,
    /// Control replies (pong, close) to send with the next write.
    replies: Vec<u8>,
    rng: Rng,
}

/// A device's connection: MQTT over TCP, or over a WebSocket on a [`Wire`].
#[derive(Debug)]
pub struct Link {
    wire: Wire,
    ws: Option<WsState>,
}

impl Link {
    /// MQTT straight over `wire` (TCP or TLS).
    pub fn plain(wire: Wire) -> Link {
        Link { wire, ws: None }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.wire.stream
    }

    /// Upgrades `wire` to a WebSocket on `path` (`Host` is `host`); `seed` varies the
    /// key and the masks between devices.
    pub async fn upgrade(
        mut wire: Wire,
        host: &str,
        path: &str,
        seed: u64,
    ) -> Result<Link, String> {
        let mut rng = Rng(seed);
        let key_bytes: Vec<u8> = (0..2).flat_map(|_| rng.next().to_le_bytes()).collect();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        wire.send(upgrade_request(host, path, &key).as_bytes())
            .await
            .map_err(|e| crate::fleet::io_cause("ws_write", &e))?;
        let mut buf = BytesMut::new();
        let head_len = loop {
            if let Some(at) = find_head_end(&buf) {
                break at;
            }
            if buf.len() >= MAX_RESPONSE {
                return Err("ws_response_too_long".into());
            }
            match wire.recv(&mut buf).await {
                Ok(0) => return Err("ws_closed".into()),
                Ok(_) => {}
                Err(e) => return Err(crate::fleet::io_cause("ws_read", &e)),
            }
        };
        check_response(&buf[..head_len], &key)?;
        buf.advance(head_len);
        Ok(Link {
            wire,
            ws: Some(WsState {
                raw: buf,
                left: 0,
                replies: Vec::new(),
                rng,
            }),
        })
    }

    /// Writes MQTT bytes (over WebSocket: as one masked binary frame, after any pending
    /// control replies).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.ws {
            None => self.wire.send(bytes).await,
            Some(ws) => {
                let mut out = std::mem::take(&mut ws.replies);
                let mask = ws.rng.next() as u32;
                client_frame(OP_BINARY, bytes, mask.to_be_bytes(), &mut out);
                self.wire.send(&out).await
            }
        }
    }

    /// Reads MQTT bytes into `buf`, waiting until some arrive; `Ok(0)` is the end.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            let Some(ws) = &mut self.ws else {
                return self.wire.recv(buf).await;
            };
            if !ws.raw.is_empty() {
                let n = ws.deframe(buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            if self.wire.recv(&mut ws.raw).await? == 0 {
                return Ok(0);
            }
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.wire.stream.readable().await
    }

    /// One non-blocking read into `buf` (at least `reserve` bytes of room). Over
    /// WebSocket, a read that brought only frame overhead answers `WouldBlock`, so the
    /// caller waits for readiness again (cleared only if the read found the socket drained,
    /// `wire::read_drained`; else tokio re-polls at once).
    pub fn try_read_buf(&mut self, buf: &mut BytesMut, reserve: usize) -> io::Result<usize> {
        let Some(ws) = &mut self.ws else {
            return self.wire.try_recv(buf, reserve);
        };
        if self.wire.try_recv(&mut ws.raw, reserve)? == 0 {
            return Ok(0);
        }
        let n = ws.deframe(buf)?;
        if ws.raw.is_empty() {
            ws.raw = BytesMut::new();
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Control replies waiting to be sent (pongs to the server's pings).
    pub fn has_replies(&self) -> bool {
        self.ws.as_ref().is_some_and(|w| !w.replies.is_empty())
    }

    /// Sends waiting control replies.
    pub async fn flush_replies(&mut self) -> io::Result<()> {
        match &mut self.ws {
            Some(ws) if !ws.replies.is_empty() => {
                let out = std::mem::take(&mut ws.replies);
                self.wire.send(&out).await
            }
            _ => Ok(()),
        }
    }

    /// Ends politely: over WebSocket a close frame (1000) after `last`, then FIN.
    pub async fn close(&mut self, last: &[u8]) {
        let _ = self.write_all(last).await;
        if let Some(ws) = &mut self.ws {
            let mut out = Vec::new();
            let mask = ws.rng.next() as u32;
            client_frame(
                OP_CLOSE,
                &1000u16.to_be_bytes(),
                mask.to_be_bytes(),
                &mut out,
            );
            let _ = self.wire.send(&out).await;
        }
        self.wire.shutdown().await;
    }
}

fn upgrade_request(host: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
}

/// Where the response head ends (after its blank line), if it has.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A 101 with the right `Sec-WebSocket-Accept` for `key`, or the cause of failure.
fn check_response(head: &[u8], key: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("ws_bad_response".into()),
    }
    match resp.code {
        Some(101) => {}
        Some(code) => return Err(format!("ws_refused_{code}")),
        None => return Err("ws_bad_response".into()),
    }
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(accept_for(key).as_bytes()) {
        return Err("ws_bad_accept".into());
    }
    Ok(())
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Appends one final, masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len <= 125 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

impl WsState {
    /// Moves the MQTT bytes of the server frames in `raw` to `plain`; keeps a partial
    /// header or control frame. Returns how many MQTT bytes it moved.
    fn deframe(&mut self, plain: &mut BytesMut) -> io::Result<usize> {
        let mut moved = 0;
        loop {
            if self.left > 0 {
                let n = (self.left as usize).min(self.raw.len());
                if n == 0 {
                    return Ok(moved);
                }
                plain.extend_from_slice(&self.raw[..n]);
                self.raw.advance(n);
                self.left -= n as u64;
                moved += n;
                continue;
            }
            let Some((opcode, header, len)) = parse_server_header(&self.raw)? else {
                return Ok(moved);
            };
            match opcode {
                OP_BINARY | OP_CONTINUATION => {
                    self.raw.advance(header);
                    self.left = len;
                }
                OP_PING | OP_PONG | OP_CLOSE => {
                    let whole = header + len as usize;
                    if self.raw.len() < whole {
                        return Ok(moved);
                    }
                    let payload = self.raw[header..whole].to_vec();
                    self.raw.advance(whole);
                    if opcode == OP_CLOSE {
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "ws_close"));
                    }
                    if opcode == OP_PING {
                        let mask = self.rng.next() as u32;
                        client_frame(OP_PONG, &payload, mask.to_be_bytes(), &mut self.replies);
                    }
                }
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "ws_bad_opcode")),
            }
        }
    }
}

/// A server frame header at the front of `raw`: (opcode, header length, payload length),
/// or `None` when it is not all there. Server frames must not be masked.
fn parse_server_header(raw: &[u8]) -> io::Result<Option<(u8, usize, u64)>> {
    if raw.len() < 2 {
        return Ok(None);
    }
    if raw[1] & 0x80 != 0 || raw[0] & 0x70 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "ws_bad_frame"));
    }
    let (header, len) = match raw[1] & 0x7F {
        126 if raw.len() >= 4 => (4, u16::from_be_bytes([raw[2], raw[3]]) as u64),
        127 if raw.len() >= 10 => (10, u64::from_be_bytes(raw[2..10].try_into().unwrap())),
        126 | 127 => return Ok(None),
        n => (2, n as u64),
    };
    Ok(Some((raw[0] & 0x0F, header, len)))
}

#[cfg(test)]
mod tests;
