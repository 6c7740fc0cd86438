//! The durable store: persistent sessions, their QoS 1/2 messages and retained messages
//! survive a crash or restart.
//!
//! **Why redb.** It is pure Rust, embedded (no server, one file), ACID with copy-on-write
//! B-trees and a checksummed commit, and reuses the pages that deletes free. sled is
//! unmaintained on its stable line and its beta has known space-amplification issues;
//! fjall (an LSM) writes faster but needs compaction threads and a directory of files
//! for a workload whose rows mostly die young (queued, then acknowledged); RocksDB is C++
//! behind FFI and a long build. Our write rate is bounded by fsyncs, not by the tree, and
//! group commit turns many pushes into one fsync, so a B-tree is enough.
//!
//! **Threads.** The [`Database`] is owned by one OS thread, the store writer. Shards never
//! touch it: during a loop turn a shard collects small [`Op`]s in its [`StoreHandle`] and at
//! the end of the turn hands them over as one [`Batch`] with `try_send` on a bounded
//! channel. A full channel does not block the shard: it keeps the batch and offers it
//! again next turn (the HTTP answers waiting on it wait longer, which is the backpressure
//! a backend sees). What a shard holds for the writer is bounded by `[store]
//! backlog_max_bytes` (`handle`: each op's cost counts until its commit is finished):
//! past it the shard refuses QoS 1/2 pushes to persistent sessions (503 `store_backlog`)
//! and reads no PUBLISH until the writer has caught up. A failed commit makes the store
//! down until the writer has reopened it (`writer`); pushes get 503 `store_unavailable`
//! meanwhile. The writer drains every waiting batch (up to
//! `[store] max_batch` ops) into ONE write transaction, commits it — one fsync for all of
//! them — and only then sends the push answers that waited for durability.
//!
//! **Layout.** Keys are chosen so an acknowledgement is the delete of one key:
//! - `sessions`: client id → version, session expiry, offline-since (wall clock ms; 0 =
//!   online when last written).
//! - `subs`: (client id, filter) → options byte, subscription identifier.
//! - `messages`: (client id, sequence) → one queued or in-flight QoS 1/2 message with
//!   its absolute expiry. Sequences grow per gateway run and across restarts, so a
//!   session's rows read back in delivery order.
//! - `retained`: topic → message.
//! - `qos2_out`: (client id, sequence) → packet id and whether PUBREL went out, of a
//!   stored QoS 2 message in flight; deleted with the message.
//! - `qos2_in`: (client id, packet id) of an inbound QoS 2 message whose PUBREC went out,
//!   until its PUBREL.
//!
//! Sessions with expiry 0 and QoS 0 messages are never written. Every value carries a
//! CRC-32 of its key and itself (`records`): a record damaged on disk is refused at start,
//! counted and deleted, never delivered.
//!
//! **What waits for the disk.** A push answered `queued` for a persistent session waits
//! for the commit that holds its message. With `durability = "immediate"` so do the MQTT
//! acknowledgements of changes (PUBACK/PUBREC, SUBACK, UNSUBACK, CONNACK): the writer
//! publishes every finished batch on its shard's [`CommitSignal`] and the shard releases
//! them (`shard/held.rs`). A `sent` answer does not: the message is already
//! on the device's socket; it is stored in the same group commit anyway and kept until the
//! PUBACK deletes it, so a crash before the acknowledgement redelivers it. Messages
//! restored after a restart lose their subscription identifiers and shared-group tag, and
//! the first `max_inflight` of each session go out with DUP set (they may have been sent
//! before the crash). A QoS 2 message is deleted at PUBCOMP; one caught between PUBREC and
//! PUBCOMP by a restart is resumed exactly, as on a reconnect: PUBREL again under its
//! packet id (not the message), and one sent but not yet PUBREC'd goes out again under its
//! own packet id with DUP set (`qos2_out`); an inbound QoS 2 message resent after a restart
//! whose PUBREC went out before it is acknowledged and not routed again (`qos2_in`).
//! PUBREC and PUBREL wait for the commit of that state (with `"immediate"`); the packet id
//! of a PUBLISH sent does not, so after a `kill -9` in the turn that sent it the message
//! may go out under a new id, as before. Wills are not stored.
//!
//! **Start.** [`open`] loads everything before any shard accepts a connection, deletes
//! what expired while the gateway was down, compacts the file when free pages dominate,
//! and gives every shard its sessions ([`Loaded`]). A damaged file stops the start with
//! [`OpenError`], also where redb panics on it, and so does an empty one.
//!
//! **In a fleet** the writer also hands every commit group's session changes to the
//! fleet's mirror (`mirror`, set by `crate::cluster::sessions`) as it commits them, and
//! the `queued` answers after the commit: those wait for JetStream too.
//!
//! The parts: `handle` (what a shard holds: ops, batches, the commit signal), `writer`
//! (the writer thread and group commit), `open` (opening, lock errors, repair, `Store`),
//! `guard` (redb's panics on a damaged file made errors),
//! `load` (restore at start, purge, compaction), `records` (tables and value encodings)
//! and `metrics` (`StoreMetrics`).
//!
//! [`Database`]: redb::Database

mod guard;
mod handle;
mod load;
mod metrics;
pub mod mirror;
mod open;
mod qos2;
mod records;
#[cfg(test)]
mod tests;
mod writer;

pub use self::handle::{
    fail_replies, Batch, CommitSignal, DeferredReply, Op, StoreHandle, REFUSED_BACKLOG,
    REFUSED_DOWN,
};
pub use self::metrics::StoreMetrics;
pub use self::open::{
    file_of, now_ms, open, repair, Loaded, OpenError, OpenErrorKind, Store, StoredMessage,
    StoredSession,
};

/// The database file inside `[store] path`.
pub const FILE_NAME: &str = "gateway.redb";
