//! The wire: everything between the shard and its sockets — the mio poll and its events,
//! the listeners, the connection slab, the buffer pool and the scratch buffers, and the
//! per-turn sets of connections to write, to read again, paused, or settling.

use std::collections::HashSet;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Events, Poll};
use slab::Slab;

use crate::buffer::BufferPool;

use super::clock::Clock;
use super::conn::{Conn, ConnBufs, ConnState, Link};

pub(super) struct Wire {
    pub poll: Poll,
    pub events: Events,
    pub listener: Option<TcpListener>,
    pub tls_listener: Option<TcpListener>,
    /// MQTT over WebSocket (`ws_listen`) and over WebSocket over TLS (`wss_listen`).
    pub ws_listener: Option<TcpListener>,
    pub wss_listener: Option<TcpListener>,
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    pub conns: Slab<Conn>,
    pub pool: BufferPool,
    /// Where plain reads land; whole frames are handled from here without a copy.
    pub scratch: Vec<u8>,
    /// Plaintext out of rustls, on its way to the framer.
    pub plain: Vec<u8>,
    /// The record keys of TLS 1.3 connections past their handshake, by connection key
    /// (outside `Conn` and its buffer box: see `records.rs`).
    pub records: std::collections::HashMap<u32, crate::tls::record::RecordKeys>,
    /// Connections with output to write at the end of this turn.
    pub dirty: Vec<u32>,
    /// Connections whose read budget ran out while bytes were still waiting.
    pub reread: Vec<u32>,
    /// The TLS connection whose ciphertext `Shard::tls_feed` is giving to rustls now: a
    /// hand-off to its home shard waits in `deferred_handoff` until `tls_feed` adds the
    /// ciphertext rustls has not taken yet, and sends it.
    pub tls_feeding: Option<usize>,
    pub deferred_handoff: Option<(usize, Box<crate::mailbox::Handoff>)>,
    /// The next turn does not ask the poll for ready sockets: the shard was woken by its
    /// mailbox alone and tokio saw no readiness on the poll's fd (see `Shard::run`).
    pub skip_io_poll: bool,
    /// Connections not read because they are over their inbound rate (connections held
    /// at a paced PUBLISH are in `Pacing`).
    pub paused: HashSet<u32>,
    /// Connections whose buffer box holds only inbound rate debt (see `sweep_settling`).
    pub settling: Vec<u32>,
    /// The tick `settling` was last swept.
    pub settled_at: u64,
    /// Connections in their close grace (`ConnState::Closing`, see `closing.rs`).
    pub closing: usize,
    /// Unsent output of all connections: the sum of their `ConnBufs::out_counted`.
    pub output_bytes: usize,
}

impl Wire {
    /// The listener of connections that come in over `link`.
    pub(super) fn listener_of(&self, link: Link) -> Option<&TcpListener> {
        match link {
            Link::Tcp => self.listener.as_ref(),
            Link::Tls => self.tls_listener.as_ref(),
            Link::Ws => self.ws_listener.as_ref(),
            Link::Wss => self.wss_listener.as_ref(),
        }
    }

    /// Appends encoded output for connection `key`, in a buffer from the pool; it is
    /// written at the end of the turn (`flush_dirty`). On an upgraded WebSocket
    /// connection the bytes `encode` appends become one binary frame.
    pub(super) fn output(
        &mut self,
        clock: &Clock,
        key: usize,
        reserve: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        self.append(clock, key, reserve, true, encode);
    }

    /// Appends bytes that go out as they are (a WebSocket upgrade answer, control frames).
    pub(super) fn output_raw(&mut self, clock: &Clock, key: usize, bytes: &[u8]) {
        self.append(clock, key, bytes.len(), false, |out| {
            out.extend_from_slice(bytes)
        });
    }

    fn append(
        &mut self,
        clock: &Clock,
        key: usize,
        reserve: usize,
        frame: bool,
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let bufs = conn.bufs.get_or_insert_with(Default::default);
        if bufs.out.capacity() == 0 {
            bufs.out = self.pool.take(reserve);
        } else {
            self.pool.reserve(&mut bufs.out, reserve, clock.now);
        }
        let start = bufs.out.len();
        encode(&mut bufs.out);
        if frame && conn.link.is_ws() && conn.state != ConnState::WsUpgrade {
            crate::ws::frame::frame_in_place(&mut bufs.out, start);
        }
        recount_output(&mut self.output_bytes, conn);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key as u32);
        }
    }

    /// Queues connection `key` for writing at the end of the turn, if it has output.
    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty && conn.outbound_len() > 0 {
                conn.dirty = true;
                self.dirty.push(key as u32);
            }
        }
    }

    /// True when connection `key` holds frames read past a pause.
    pub(super) fn is_holding(&self, key: usize) -> bool {
        self.conns
            .get(key)
            .and_then(|c| c.bufs.as_ref())
            .is_some_and(|b| !b.held.is_empty())
    }

    pub(super) fn take_held(&mut self, key: usize) -> Vec<u8> {
        match self.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) {
            Some(b) => std::mem::take(&mut b.held),
            None => Vec::new(),
        }
    }

    pub(super) fn put_held(&mut self, key: usize, held: Vec<u8>) {
        let bufs = self.conns[key].bufs.get_or_insert_with(Default::default);
        bufs.held = held;
    }

    /// Keeps a partial frame (or PROXY header) for the next read.
    pub(super) fn put_inbuf(&mut self, clock: &Clock, key: usize, inbuf: Vec<u8>) {
        let bufs = self.conns[key].bufs.get_or_insert_with(Default::default);
        bufs.inbuf = inbuf;
        self.release_idle_bufs(clock, key);
    }

    /// Drops a connection's buffer box once it holds nothing; one that holds only rate
    /// debt goes on the `settling` list, to be dropped when the debt has run out.
    pub(super) fn release_idle_bufs(&mut self, clock: &Clock, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(b) = conn.bufs.as_mut() else {
            return;
        };
        if b.is_idle(clock.now_ns()) {
            if let Some(b) = conn.bufs.take() {
                give_bufs(&mut self.pool, &mut self.output_bytes, *b, clock.now);
            }
        } else if !b.settling && b.holds_only_debt() {
            // Only rate debt left (every read charges the byte rate): drop the box when
            // the debt has run out, or every connection that spoke once keeps ~110 bytes.
            b.settling = true;
            self.settling.push(key as u32);
        }
    }

    /// Once per tick: drops the buffer boxes whose rate debt has run out; keeps waiting on
    /// those still in debt; forgets those that got busy again (they come back here when
    /// they are idle once more).
    pub(super) fn sweep_settling(&mut self, clock: &Clock) {
        if self.settling.is_empty() || self.settled_at == clock.now {
            return;
        }
        self.settled_at = clock.now;
        let now_ns = clock.now_ns();
        let mut keys = std::mem::take(&mut self.settling);
        keys.retain(|&key| {
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return false;
            };
            let Some(b) = conn.bufs.as_mut().filter(|b| b.settling) else {
                return false;
            };
            if !b.holds_only_debt() {
                b.settling = false;
                return false;
            }
            if !b.rate.is_settled(now_ns) {
                return true;
            }
            if let Some(b) = conn.bufs.take() {
                give_bufs(&mut self.pool, &mut self.output_bytes, *b, clock.now);
            }
            false
        });
        self.settling = keys;
    }
}

/// Returns a connection's buffers to the pool (its TLS state, if any, is dropped), and
/// takes its unsent output out of the shard's `output_bytes`.
pub(super) fn give_bufs(pool: &mut BufferPool, output_bytes: &mut usize, b: ConnBufs, now: u64) {
    *output_bytes -= b.out_counted;
    pool.give(b.inbuf, now);
    pool.give(b.out, now);
    pool.give(b.held, now);
    pool.give(b.tls_in, now);
    pool.give(b.tls_out, now);
    if let Some(ws) = b.ws {
        pool.give(ws.carry, now);
    }
}

/// Brings the shard's `output_bytes` up to date with connection `conn`'s unsent output.
pub(super) fn recount_output(output_bytes: &mut usize, conn: &mut Conn) {
    if let Some(b) = conn.bufs.as_mut() {
        let now = b.out.len() - b.out_pos.min(b.out.len());
        *output_bytes = *output_bytes - b.out_counted + now;
        b.out_counted = now;
    }
}
