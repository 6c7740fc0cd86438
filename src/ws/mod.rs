//! MQTT over WebSocket (MQTT 3.1.1 and 5.0 section 6): the pieces a WebSocket transport
//! needs, pure and independent of the shard.
//!
//! A WebSocket connection is an ordinary slab entry whose transport turns socket bytes
//! into the plaintext MQTT stream, like TLS does, so the framer, the MQTT layer and every
//! feature work unchanged. Two steps:
//!
//! 1. [`handshake`]: the HTTP upgrade request, read into the connection's pooled buffer
//!    (after the PROXY header, if any; under TLS for wss) until [`handshake::parse`]
//!    accepts it (write the 101 response, keep the bytes after `consumed` as frames) or
//!    refuses it (write the 4xx response, close). It is bounded by
//!    `ws_max_handshake_bytes` here, and in time by the connect timeout like a CONNECT.
//! 2. [`frame`]: each read is decoded in place by the connection's inline
//!    [`frame::Decoder`] (20 bytes, no buffer): `buf[..plain]` goes to the framer exactly
//!    as a plain TCP read would, `replies` (pong, close) go to the output, bytes from
//!    `used` on (at most 125, a control frame not yet whole) are kept like a partial MQTT
//!    packet and passed again in front of the next read, and an [`End`] closes the
//!    connection after the replies are written. Outbound MQTT bytes are wrapped in binary
//!    frames by [`frame::frame_in_place`] (after appending to the output buffer) or
//!    [`frame::write_binary`].
//!
//! The shard composes them in `shard/websocket.rs`; tests/ws_codec.rs, tests/ws_transport.rs
//! and tests/browser_ws.rs drive the gateway's `ws_listen` with tungstenite, raw sockets
//! and MQTT.js in headless Chromium.

pub mod frame;
pub mod handshake;

pub use frame::{Decoded, Decoder, End};
pub use handshake::{Accepted, Policy, Refusal, Upgrade};
