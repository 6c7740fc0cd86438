//! The wire: everything between the shard and its sockets — the mio poll and its events,
//! the listeners, the connection slab, the buffer pool and the scratch buffers, and the
//! per-turn sets of connections to write, to read again, paused, or settling.

use std::collections::HashSet;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Events, Poll};
use slab::Slab;

use crate::buffer::BufferPool;

use super::conn::Conn;

pub struct Wire {
    pub poll: Poll,
    pub events: Events,
    pub listener: Option<TcpListener>,
    pub tls_listener: Option<TcpListener>,
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    pub conns: Slab<Conn>,
    pub pool: BufferPool,
    /// Where plain reads land; whole frames are handled from here without a copy.
    pub scratch: Vec<u8>,
    /// Plaintext out of rustls, on its way to the framer.
    pub plain: Vec<u8>,
    /// Connections with output to write at the end of this turn.
    pub dirty: Vec<u32>,
    /// Connections whose read budget ran out while bytes were still waiting.
    pub reread: Vec<u32>,
    /// Connections not read because they are over their inbound rate, or hold a
    /// PUBLISH while the gateway is backpressured.
    pub paused: HashSet<u32>,
    /// Connections whose buffer box holds only inbound rate debt (see `sweep_settling`).
    pub settling: Vec<u32>,
    /// The tick `settling` was last swept.
    pub settled_at: u64,
}
