//! MQTT over WebSocket (MQTT 3.1.1 and 5.0 section 6): the pieces a WebSocket transport
//! needs, pure and independent of the shard.
//!
//! A WebSocket connection is an ordinary slab entry whose transport turns socket bytes
//! into the plaintext MQTT stream, like TLS does, so the framer, the MQTT layer and every
//! feature work unchanged. Two steps:
//!
//! 1. [`handshake`]: the HTTP upgrade request, read into the connection's pooled buffer
//!    until [`handshake::parse`] accepts it (write the 101 response, keep the bytes after
//!    `consumed` as frames) or refuses it (write the 4xx response, close).
//! 2. [`frame`]: each read is decoded in place by the connection's inline
//!    [`frame::Decoder`] (a few bytes, no buffer); `buf[..plain]` goes to the framer,
//!    control replies go to the output, and outbound MQTT bytes are wrapped in binary
//!    frames by [`frame::frame_in_place`] or [`frame::write_binary`].

pub mod frame;
pub mod handshake;

pub use frame::{Decoded, Decoder, End};
pub use handshake::{Accepted, Policy, Refusal, Upgrade};
