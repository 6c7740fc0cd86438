//! A simulated device: a real loopback TCP socket (non-blocking), a hand-rolled MQTT 3.1.1/5 encoder
//! for what it sends and a decoder for what the server sends it. No protocol logic here:
//! the world (`world.rs`) decides what to send and checks what arrives.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// What a client got from the server.
#[derive(Debug)]
pub(super) enum Packet {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish {
        qos: u8,
        pkid: u16,
        topic: String,
        payload: Vec<u8>,
    },
    PubAck,
    PubRec(u16),
    PubRel(u16),
    PubComp,
    SubAck,
    UnsubAck,
    PingResp,
    Disconnect,
}

/// What a CONNECT asks for.
pub(super) struct ConnectSpec<'a> {
    pub client_id: &'a str,
    pub v5: bool,
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    pub expiry: u32,
    /// MQTT 5 Receive Maximum.
    pub receive_max: u16,
    /// A will: topic, QoS, payload, and (MQTT 5) its delay in seconds.
    pub will: Option<(&'a str, u8, Vec<u8>, u32)>,
}

pub(super) struct Client {
    sock: Socket,
    v5: bool,
    inbuf: Vec<u8>,
    /// The server closed the connection (end of stream or an error).
    pub closed: bool,
}

impl Client {
    /// Connects to the shard's listener. On loopback `connect` returns once the kernel has
    /// queued the connection for `accept`, so the next loop turn sees it.
    pub(super) fn connect(addr: SocketAddr, v5: bool) -> Client {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        // Not small: a receive window that reopens by less than a segment waits for the
        // sender's persist timer (wall time); this one reopens in full when drained.
        sock.set_recv_buffer_size(256 * 1024).expect("SO_RCVBUF");
        sock.connect(&addr.into()).expect("connect to the shard");
        sock.set_nonblocking(true).expect("non-blocking");
        sock.set_nodelay(true).expect("nodelay");
        Client {
            sock,
            v5,
            inbuf: Vec::new(),
            closed: false,
        }
    }

    /// Makes closing send a reset (SO_LINGER 0), as a device that vanishes.
    pub(super) fn reset_on_close(&self) {
        let _ = self.sock.set_linger(Some(std::time::Duration::ZERO));
    }

    fn send(&mut self, first: u8, body: &[u8]) {
        self.send_frame(&frame(first, body));
    }

    /// Writes what the socket takes of `bytes` now; how much it took.
    pub(super) fn write_some(&mut self, bytes: &[u8]) -> usize {
        match self.sock.write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => {
                self.closed = true;
                0
            }
        }
    }

    /// Writes a whole frame (or any bytes) as they are.
    pub(super) fn send_frame(&mut self, frame: &[u8]) {
        // Small frames into a socket the server keeps reading: a short write would mean
        // the harness is wrong, not the shard.
        match self.sock.write_all(frame) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                self.closed = true
            }
            Err(e) => panic!("client write: {e}"),
        }
    }

    pub(super) fn send_connect(&mut self, c: &ConnectSpec) {
        let mut b = Vec::new();
        string(&mut b, "MQTT");
        b.push(if c.v5 { 5 } else { 4 });
        let will_flags = c.will.as_ref().map_or(0, |w| 0x04 | (w.1 << 3));
        b.push(if c.clean { 0x02 } else { 0 } | will_flags);
        b.extend_from_slice(&c.keep_alive.to_be_bytes());
        if c.v5 {
            let mut p = vec![0x11];
            p.extend_from_slice(&c.expiry.to_be_bytes());
            p.push(0x21);
            p.extend_from_slice(&c.receive_max.to_be_bytes());
            varint(&mut b, p.len());
            b.extend_from_slice(&p);
        }
        string(&mut b, c.client_id);
        if let Some((topic, _, payload, delay)) = &c.will {
            if c.v5 {
                b.extend_from_slice(&[5, 0x18]);
                b.extend_from_slice(&delay.to_be_bytes());
            }
            string(&mut b, topic);
            b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            b.extend_from_slice(payload);
        }
        self.send(0x10, &b);
    }

    pub(super) fn send_subscribe(&mut self, pkid: u16, filter: &str, qos: u8) {
        let mut b = pkid.to_be_bytes().to_vec();
        self.no_props(&mut b);
        string(&mut b, filter);
        b.push(qos);
        self.send(0x82, &b);
    }

    pub(super) fn send_unsubscribe(&mut self, pkid: u16, filter: &str) {
        let mut b = pkid.to_be_bytes().to_vec();
        self.no_props(&mut b);
        string(&mut b, filter);
        self.send(0xA2, &b);
    }

    pub(super) fn send_publish(&mut self, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
        let f = self.publish_frame(topic, qos, pkid, payload);
        self.send_frame(&f);
    }

    /// The PUBLISH frame `send_publish` sends.
    pub(super) fn publish_frame(&self, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, topic);
        if qos > 0 {
            b.extend_from_slice(&pkid.to_be_bytes());
        }
        self.no_props(&mut b);
        b.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &b)
    }

    /// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70), success.
    pub(super) fn send_ack(&mut self, first: u8, pkid: u16) {
        self.send(first, &pkid.to_be_bytes());
    }

    pub(super) fn send_ping(&mut self) {
        self.send(0xC0, &[]);
    }

    pub(super) fn send_disconnect(&mut self) {
        self.send(0xE0, &[]);
    }

    fn no_props(&self, b: &mut Vec<u8>) {
        if self.v5 {
            b.push(0);
        }
    }

    /// Reads what the socket holds and decodes the whole frames; true if any byte came or
    /// the server closed it.
    pub(super) fn read(&mut self, out: &mut Vec<Packet>) -> bool {
        let moved = self.fill();
        while let Some((p, used)) = decode(&self.inbuf, self.v5) {
            self.inbuf.drain(..used);
            out.push(p);
        }
        moved
    }

    /// The bytes read and not yet decoded, for a caller that decodes them itself.
    pub(super) fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }

    /// Reads what the socket holds into the input buffer; true if any byte came or the
    /// server closed it.
    pub(super) fn fill(&mut self) -> bool {
        let was_closed = self.closed;
        let mut got = false;
        let mut buf = [0u8; 8192];
        while !self.closed {
            match self.sock.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    got = true;
                    self.inbuf.extend_from_slice(&buf[..n]);
                    // Acknowledge now, not after the delayed-ACK timer (wall time): the
                    // shard's socket gets room, and its writable event, within this call.
                    let _ = self.sock.set_quickack(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
        got || self.closed != was_closed
    }
}

/// A frame: first byte, Remaining Length, body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    varint(&mut frame, body.len());
    frame.extend_from_slice(body);
    frame
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn varint(b: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

/// A varint at `b[0..]`: (value, its length), or `None` if incomplete.
fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for (i, &byte) in b.iter().enumerate().take(4) {
        n |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    assert!(b.len() < 4, "malformed remaining length from the server");
    None
}

/// One whole server packet at the start of `b` and the bytes it took.
fn decode(b: &[u8], v5: bool) -> Option<(Packet, usize)> {
    let first = *b.first()?;
    let (len, n) = read_varint(&b[1..])?;
    let start = 1 + n;
    let body = b.get(start..start + len)?;
    let pkid = || u16::from_be_bytes([body[0], body[1]]);
    let p = match first >> 4 {
        2 => Packet::ConnAck {
            session_present: body[0] & 1 == 1,
            code: body[1],
        },
        3 => publish(first, body, v5),
        4 => Packet::PubAck,
        5 => Packet::PubRec(pkid()),
        6 => Packet::PubRel(pkid()),
        7 => Packet::PubComp,
        9 => Packet::SubAck,
        11 => Packet::UnsubAck,
        13 => Packet::PingResp,
        14 => Packet::Disconnect,
        t => panic!("unexpected packet type {t} from the server"),
    };
    Some((p, start + len))
}

fn publish(first: u8, body: &[u8], v5: bool) -> Packet {
    let qos = (first >> 1) & 3;
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + tlen].to_vec()).expect("utf-8 topic");
    let mut at = 2 + tlen;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    if v5 {
        let (plen, n) = read_varint(&body[at..]).expect("property length");
        at += n + plen;
    }
    Packet::Publish {
        qos,
        pkid,
        topic,
        payload: body[at..].to_vec(),
    }
}
