//! gateway: an MQTT 3.1.1/5 and HTTP push gateway built to hold a million idle device
//! connections on one node.
//!
//! The path of a connection reads top to bottom:
//!
//! 1. [`server`] binds one SO_REUSEPORT listener per shard, starts the shards and the
//!    business pool (HTTP API, metrics), and owns shutdown.
//! 2. [`shard`] is an OS thread with its own `mio::Poll` and a slab of connections. It
//!    accepts, reads the CONNECT, and hands the socket to the client id's home shard
//!    ([`mailbox::home_shard`]) through that shard's bounded [`mailbox`].
//! 3. On its home shard the connection gets a [`session`] (kept in a hashbrown map),
//!    its subscriptions go into the shard's [`topic`] index, and its timers live in the
//!    shard's single [`wheel`].
//! 4. Bytes are decoded and encoded by [`codec`]; partial frames and unsent output borrow
//!    buffers from the shard's [`buffer`] pool, so an idle connection holds none.
//! 5. Messages ([`message`]) cross shards as `Arc`s through the mailboxes.
//!
//! The crate face: modules that `main.rs`, the tests, benches, fuzz targets, examples and
//! loadgen use are `pub`; the rest are `pub(crate)`, and `unreachable_pub` is denied, so an
//! item nobody outside can reach must say so and dead code warns.

#![deny(unreachable_pub)]

pub(crate) mod acl;
pub(crate) mod api;
pub mod auth;
pub(crate) mod buffer;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod doctor;
pub mod events;
pub(crate) mod http;
pub(crate) mod https_client;
pub(crate) mod idempotency;
pub mod interest;
pub(crate) mod limits;
pub(crate) mod listen;
pub(crate) mod lockholder;
pub mod logging;
pub mod mailbox;
pub mod message;
pub mod metrics;
pub(crate) mod nats_tls;
pub mod prompt;
pub mod proxy;
pub mod push_json;
pub mod reload;
pub(crate) mod retained_budget;
pub mod server;
pub mod session;
pub mod shard;
pub mod store;
pub mod tls;
pub mod topic;
pub mod wheel;
pub mod ws;
