//! MQTT acknowledgements that wait for the store commit: a PUBACK/PUBREC, SUBACK,
//! UNSUBACK or CONNACK answering a packet that changed durable state is not written
//! before the store batch holding that change is committed (fsync'd), so `kill -9`
//! after the client read it loses nothing acknowledged — as an HTTP push answered
//! `queued` already waits for its commit.
//!
//! How: before a packet is handled the shard notes where the connection's output ends
//! and how many store ops the turn has collected ([`Mark`]); if handling it added ops and
//! output, the output from that offset on is *held* behind the number of the store batch
//! the turn's ops will go out in (`ConnBufs::holds`). `transport::write` writes only up to
//! the first hold, so nothing the connection is sent later overtakes the acknowledgement.
//! The store writer publishes each committed batch number on the shard's
//! [`CommitSignal`] and wakes its loop; each turn the shard releases the holds that are
//! committed and writes those connections. Nothing blocks: a held connection just keeps
//! its output buffer (it is not idle) until the commit; an idle connection holds nothing.
//!
//! A batch that failed to commit (or that never reached a writer that is gone) closes the
//! connections whose acknowledgements waited for it, without them: the client sends its
//! packet again on a new connection (QoS 1/2 PUBLISH resend, SUBSCRIBE again), the same
//! answer the HTTP API gives with `dropped`/`store_error`.
//!
//! Only with `[store] durability = "immediate"`. With `"eventual"` nothing is held: an
//! acknowledgement means the change is in memory and committed without fsync; it reaches
//! the disk within `sync_interval_ms`, and a crash before that loses it.
//!
//! Cross-shard: a PUBLISH whose matching persistent subscriber is homed on another shard
//! is stored by that shard in a later turn of its own; this hold covers only the
//! publisher's shard's commit (see the README's durability section).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::codec::reason;
use crate::metrics::DisconnectReason;
use crate::store::CommitSignal;

use super::Shard;

/// The shard's side: whether acknowledgements wait, and the connections holding some.
pub struct Held {
    signal: Option<Arc<CommitSignal>>,
    /// Connections with at least one hold (a key may repeat; stale keys are skipped).
    waiting: Vec<u32>,
    /// The last `done` value acted on.
    seen: u64,
}

/// What became of a connection's holds after a commit report.
enum Release {
    Waiting,
    Done,
    Failed,
}

/// Where a connection's output ended and how many store ops the turn had, before a packet.
#[derive(Clone, Copy)]
pub struct Mark {
    out_len: usize,
    ops: usize,
}

impl Held {
    /// `signal` is the shard's store handle's, when acknowledgements wait for commits.
    pub fn new(signal: Option<Arc<CommitSignal>>) -> Held {
        Held {
            signal,
            waiting: Vec::new(),
            seen: 0,
        }
    }

    /// Completes once the writer has reported a commit since the last call (never
    /// without a store, or with `durability = "eventual"`).
    pub async fn committed(signal: Option<Arc<CommitSignal>>) {
        match signal {
            Some(s) => s.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    pub fn signal(&self) -> Option<Arc<CommitSignal>> {
        self.signal.clone()
    }
}

impl Shard {
    /// Notes connection `key`'s output end and the turn's store ops before a packet whose
    /// answer must wait for durability; `None` when acknowledgements do not wait.
    pub(super) fn durable_mark(&self, key: usize) -> Option<Mark> {
        self.held.signal.as_ref()?;
        let ops = self.services.store.as_ref()?.pending_ops();
        let conn = self.wire.conns.get(key)?;
        let out_len = conn.bufs.as_ref().map_or(0, |b| b.out.len());
        Some(Mark { out_len, ops })
    }

    /// After the packet: if it added store ops and output, that output waits for the
    /// commit of this turn's batch.
    pub(super) fn hold_if_durable(&mut self, key: usize, mark: Option<Mark>) {
        let Some(mark) = mark else {
            return;
        };
        let Some(store) = self.services.store.as_ref() else {
            return;
        };
        if store.pending_ops() == mark.ops {
            return;
        }
        let seq = store.pending_seq();
        let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
            return;
        };
        if bufs.out.len() <= mark.out_len {
            return;
        }
        if bufs.holds.back().is_some_and(|h| h.1 == seq) {
            // An earlier packet of this turn holds already; its hold covers this output.
            return;
        }
        if bufs.holds.is_empty() {
            self.held.waiting.push(key as u32);
        }
        bufs.holds.push_back((mark.out_len, seq));
    }

    /// Once per turn, before the writes: releases the holds whose batch is committed (the
    /// connection is written this turn) and closes the connections whose batch failed.
    pub(super) fn release_held(&mut self) {
        let Some(signal) = self.held.signal.as_ref() else {
            return;
        };
        let done = signal.done.load(Ordering::Acquire);
        if done == self.held.seen {
            return;
        }
        self.held.seen = done;
        let failed = signal.failed.load(Ordering::Relaxed);
        let mut waiting = std::mem::take(&mut self.held.waiting);
        waiting.sort_unstable();
        waiting.dedup();
        let mut lost = Vec::new();
        waiting.retain(|&key| match self.release(key as usize, done, failed) {
            Release::Waiting => true,
            Release::Done => false,
            Release::Failed => {
                lost.push(key);
                false
            }
        });
        self.held.waiting = waiting;
        for key in lost {
            self.close_unacknowledged(key as usize);
        }
    }

    /// Releases connection `key`'s holds up to batch `done` (marking it for writing).
    fn release(&mut self, key: usize, done: u64, failed: u64) -> Release {
        let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
            return Release::Done;
        };
        if bufs.holds.front().is_some_and(|h| h.1 <= failed) {
            return Release::Failed;
        }
        let before = bufs.holds.len();
        while bufs.holds.front().is_some_and(|h| h.1 <= done) {
            bufs.holds.pop_front();
        }
        let left = bufs.holds.len();
        if left < before {
            self.wire.mark_dirty(key);
        }
        if left == 0 {
            Release::Done
        } else {
            Release::Waiting
        }
    }

    /// The store could not commit what this connection's acknowledgement promised.
    fn close_unacknowledged(&mut self, key: usize) {
        let client = self.client_id_of(key);
        tracing::warn!(shard = self.id, client_id = %client, "store commit failed: closing the connection without its acknowledgement");
        self.close_conn(key, DisconnectReason::StoreError, Some(reason::UNSPECIFIED));
    }
}
