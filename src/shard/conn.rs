//! One connection as plain data in its shard's slab: no task, no tokio stream, no timer.
//!
//! An idle connection is this struct and nothing else: its socket, the key of its
//! session, one timer handle on the shard's wheel and a few bytes of state. Buffers are
//! borrowed from the shard's pool only while a frame is half-read or output is unsent.

use std::collections::VecDeque;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use mio::net::TcpStream;

use crate::buffer::ReadSizePredictor;
use crate::codec::Version;
use crate::session::SessionKey;
use crate::wheel::TimerId;

/// The listener a connection came in on: how its bytes are carried. One byte in
/// [`Conn`] (it fits in the struct's padding); the `transport` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Tcp,
    Tls,
    /// MQTT over WebSocket (`ws_listen`).
    Ws,
    /// MQTT over WebSocket over TLS (`wss_listen`).
    Wss,
}

impl Link {
    pub const ALL: [Link; 4] = [Link::Tcp, Link::Tls, Link::Ws, Link::Wss];

    pub fn as_str(self) -> &'static str {
        match self {
            Link::Tcp => "tcp",
            Link::Tls => "tls",
            Link::Ws => "ws",
            Link::Wss => "wss",
        }
    }

    pub fn is_ws(self) -> bool {
        matches!(self, Link::Ws | Link::Wss)
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Link::Tls | Link::Wss)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted with `proxy_protocol` on; waiting for the PROXY header (within the
    /// connect timeout). Not yet counted against `max_connections_per_ip`.
    ProxyHeader,
    /// Accepted on a WebSocket listener (after the PROXY header, and under TLS on wss);
    /// waiting for the HTTP upgrade request within the connect timeout.
    WsUpgrade,
    /// Accepted; waiting for CONNECT within the connect timeout (TLS handshake included).
    Handshake,
    /// CONNECT read; its credentials are being checked off the shard (the shard's
    /// `auth_pending` holds the CONNECT). Not read from until the answer; the connect
    /// timeout still runs.
    Authenticating,
    /// CONNACK sent; the session is attached.
    Active,
    /// Ended, with its last words written and its write side shut down: read and
    /// discarded for the close grace (`closing.rs`), then closed. No session, no buffers;
    /// its one timer is the grace deadline and `max_packet` counts the grace bytes left.
    Closing,
}

impl ConnState {
    /// The first state after accept (or after the PROXY header): a WebSocket connection
    /// upgrades first, any other waits for CONNECT.
    pub fn after_prefix(link: Link) -> Self {
        if link.is_ws() {
            ConnState::WsUpgrade
        } else {
            ConnState::Handshake
        }
    }
}

pub struct Conn {
    pub socket: TcpStream,
    pub peer: Peer,
    /// Its session on this shard, once the CONNECT is accepted.
    pub session: Option<SessionKey>,
    /// The one wheel entry of this connection (connect timeout, keep-alive, write stall).
    pub timer: TimerId,
    /// Tick of accept, then of the last whole packet received (partial frames do not count,
    /// so a byte-at-a-time peer cannot hold the connection open); the wheel re-arms lazily.
    pub last_seen: u32,
    /// Ticks of silence allowed after `last_seen` (connect timeout, then 1.5 × keep-alive).
    pub idle_ticks: u32,
    /// Tick + 1 at which output stopped draining; 0 while the socket takes our bytes.
    pub stall_since: u32,
    /// Tick of accept (connection age).
    pub accepted_at: u32,
    /// The client's MQTT 5 Maximum Packet Size (u32::MAX = none); in `Closing`, the bytes
    /// the close grace still discards.
    pub max_packet: u32,
    /// Effective keep-alive in seconds.
    pub keep_alive: u16,
    /// Outbound QoS 1/2 window: min(client Receive Maximum, `max_inflight`).
    pub window: u16,
    pub version: Version,
    pub state: ConnState,
    pub link: Link,
    pub predictor: ReadSizePredictor,
    /// In the shard's list of connections with output to flush this turn.
    pub dirty: bool,
    /// Congested (`slow_consumer = "pace"`): above the outbound high watermark or the
    /// queue mark, until it is back under both (see `pacing.rs`); its stall clock runs.
    pub congested: bool,
    pub bufs: Option<Box<ConnBufs>>,
}

/// Buffers a busy connection borrows from the shard's pool, and the rarer state that
/// would make every idle [`Conn`] bigger: TLS and inbound rate-limit debt. The box is
/// dropped once it holds nothing. A TLS connection keeps it while rustls runs (its
/// handshake until the CONNECT is answered); it then keeps only its record keys outside
/// it (`shard/records.rs`).
#[derive(Default)]
pub struct ConnBufs {
    /// A partial inbound frame (or a partial PROXY header).
    pub inbuf: Vec<u8>,
    /// Encoded output not yet taken by the socket, from `out_pos`. On a TLS connection
    /// this is plaintext not yet handed to rustls.
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// The part of the shard's `Wire::output_bytes` that is this connection's.
    pub out_counted: usize,
    /// Acknowledgements waiting for the store commit or the fleet (`held.rs`): (offset in
    /// `out`, the shard's store batch, the routing stamp, the fleet barrier ticket).
    /// Nothing from the first offset on is written before those are done, so later
    /// output cannot overtake an acknowledgement.
    pub holds: VecDeque<super::held::Hold>,
    /// Whole frames read but not yet handled because the connection went over its
    /// inbound rate mid-read; handled first when reading resumes.
    pub held: Vec<u8>,
    /// The rustls state of a connection accepted on the TLS listener, until it hands
    /// over to the record layer (`shard/records.rs`).
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// TLS ciphertext read but not yet given to rustls or the record layer (a partial
    /// record, or what followed a pause).
    pub tls_in: Vec<u8>,
    /// Where in its record the ciphertext given to rustls ends.
    pub tls_cursor: crate::tls::record::Cursor,
    /// The TLS 1.3 traffic secrets rustls' key log gave at the handshake, for the
    /// record layer to follow a KeyUpdate (`tls/traffic_secret.rs`).
    pub tls_secrets: Option<Box<crate::tls::traffic_secret::LoggedSecrets>>,
    /// Sealed TLS records the socket has not taken yet (record layer).
    pub tls_out: Vec<u8>,
    /// Inbound rate-limit debt (GCRA theoretical arrival times, see `limits.rs`).
    pub rate: crate::limits::RateDebt,
    /// In the shard's `settling` list: the box holds nothing but rate debt and is dropped
    /// once that has run out (an idle connection must not keep it).
    pub settling: bool,
    /// A WebSocket connection's frame decoder while a frame is half-read (see
    /// `websocket.rs`); between frames it is `None`, so an idle WebSocket holds no box.
    pub ws: Option<super::websocket::WsBusy>,
}

impl ConnBufs {
    /// True when dropping the box loses nothing. `now_ns` is the shard's clock.
    pub fn is_idle(&self, now_ns: u64) -> bool {
        self.holds_only_debt() && self.rate.is_settled(now_ns)
    }

    /// Where the output that may be written now ends (the first held acknowledgement).
    pub fn writable_end(&self) -> usize {
        self.holds.front().map_or(self.out.len(), |h| h.0)
    }

    /// Output bytes behind a held acknowledgement.
    pub fn held_len(&self) -> usize {
        self.out.len() - self.writable_end()
    }

    /// Drops the written head of `out`, keeping the held offsets in step.
    pub fn compact(&mut self) {
        let n = self.out_pos;
        self.out.drain(..n);
        self.out_pos = 0;
        for h in &mut self.holds {
            h.0 -= n;
        }
    }

    /// True when nothing but inbound rate debt keeps the box alive.
    pub fn holds_only_debt(&self) -> bool {
        self.inbuf.is_empty()
            && self.held.is_empty()
            && self.out_pos >= self.out.len()
            && self.tls.is_none()
            && self.tls_in.is_empty()
            && self.tls_out.is_empty()
            && self.ws.is_none()
    }
}

/// A peer address in 8 bytes for IPv4, the common case (a `SocketAddr` takes 32); IPv6
/// addresses are boxed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    V4([u8; 4], u16),
    V6(Box<SocketAddrV6>),
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Peer::V4(ip, port) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(*ip), *port)),
            Peer::V6(a) => SocketAddr::V6(**a),
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(v4) => Peer::V4(v4.ip().octets(), v4.port()),
            SocketAddr::V6(v6) => Peer::V6(Box::new(v6)),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr().fmt(f)
    }
}

impl Conn {
    /// Bytes waiting to be written: unsent output and sealed records, plus 1 while
    /// rustls holds ciphertext.
    pub fn outbound_len(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| {
            b.out.len() - b.out_pos
                + b.tls_out.len()
                + usize::from(b.tls.as_ref().is_some_and(|t| t.wants_write()))
        })
    }

    pub fn is_tls(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.tls.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_is_small() {
        let size = std::mem::size_of::<Conn>();
        // mio's TcpStream is a 4-byte fd in release builds; debug builds add a 12-byte
        // selector id check (which, with the 8-byte alignment, costs 16 there).
        let limit = if cfg!(debug_assertions) { 88 } else { 72 };
        assert!(size <= limit, "Conn is {size} bytes");
        assert_eq!(std::mem::size_of::<Peer>(), 16);
    }

    #[test]
    fn output_behind_a_hold_stays_and_compacting_keeps_the_offsets() {
        let mut b = ConnBufs {
            out: b"0123456789".to_vec(),
            ..Default::default()
        };
        assert_eq!(b.writable_end(), 10);
        b.holds.push_back((6, 1, 0, 0));
        b.holds.push_back((8, 2, 2, 1));
        assert_eq!((b.writable_end(), b.held_len()), (6, 4));
        b.out_pos = 4;
        b.compact();
        assert_eq!(b.out, b"456789");
        assert_eq!(b.holds, [(2, 1, 0, 0), (4, 2, 2, 1)]);
        assert_eq!(&b.out[b.out_pos..b.writable_end()], b"45");
    }

    #[test]
    fn peer_round_trips() {
        for a in ["127.0.0.9:1883", "[::1]:8883"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(Peer::from(addr).addr(), addr);
            assert_eq!(Peer::from(addr).to_string(), a);
        }
    }
}
