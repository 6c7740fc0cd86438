//! What a shard holds: the `Op`s it collects during a loop turn, the `Batch` it hands to
//! the writer without blocking (`StoreHandle`), and the `CommitSignal` on which the writer
//! tells it which sequences are durable.
//!
//! The handle also bounds what the shard holds for the writer: every op costs its strings
//! and payload plus 64 bytes, counted in `CommitSignal::outstanding_bytes` from the end
//! of its turn until the writer finished its commit; at `[store] backlog_max_bytes`
//! (this turn's ops included) the shard refuses pushes the store would have to hold and
//! holds its PUBLISH reads (`shard/durable.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::codec::Version;
use crate::mailbox::{PushOutcome, PushStatus};
use crate::message::Message;

use super::StoreMetrics;

/// One change a shard asks the store to make.
pub enum Op {
    /// Insert or replace a session's record.
    Session {
        client_id: Arc<str>,
        version: Version,
        expiry_secs: u32,
        /// Wall clock ms at which it went offline; 0 while online.
        offline_since_ms: u64,
    },
    /// Delete a session with its subscriptions and messages.
    DeleteSession(Arc<str>),
    Sub {
        client_id: Arc<str>,
        filter: Arc<str>,
        options: u8,
        sub_id: u32,
    },
    DeleteSub {
        client_id: Arc<str>,
        filter: Arc<str>,
    },
    /// A QoS 1/2 message for a session; encoded on the writer thread, not the shard.
    Message {
        client_id: Arc<str>,
        seq: u64,
        msg: Arc<Message>,
        qos: u8,
        retain: bool,
    },
    /// Delete a message (and its QoS 2 state, if any).
    DeleteMessage {
        client_id: Arc<str>,
        seq: u64,
    },
    Retained(Arc<Message>),
    DeleteRetained(Arc<str>),
    /// Stored QoS 2 message `seq` went out under `pkid`; `released`: its PUBREC came and
    /// our PUBREL went out. Deleted with the message.
    Qos2Out {
        client_id: Arc<str>,
        seq: u64,
        pkid: u16,
        released: bool,
    },
    /// An inbound QoS 2 message `pkid` was received (PUBREC sent): a resend of it after a
    /// restart is acknowledged, not routed again.
    Qos2In {
        client_id: Arc<str>,
        pkid: u16,
    },
    /// Its PUBREL came: the packet id is free.
    DeleteQos2In {
        client_id: Arc<str>,
        pkid: u16,
    },
    /// The will of the session's connection (`None`: offline, or none): for the fleet's
    /// copy only (`crate::cluster::session_will`), pushed only with the fleet on; not
    /// written to the local file.
    Will {
        client_id: Arc<str>,
        will: Option<Box<crate::codec::Will>>,
    },
    /// The op, for the local file only: a session adopted from the fleet's copy
    /// (`shard/adopt.rs`) is written here as the fleet already holds it, and written
    /// back to the fleet from no one's copy but the holder's.
    LocalOnly(Box<Op>),
    /// For the fleet's mirror only (not written to the local file): the messages of a
    /// session adopted from the fleet, under their local sequences, are the stream's
    /// messages of these stream sequences, and those of `qos2_out` have their QoS 2
    /// state in the bucket. In the store's order, so that a change made before the
    /// adoption (the end of an earlier copy) cannot undo it.
    Adopted {
        client_id: Arc<str>,
        local_and_stream: Vec<(u64, u64)>,
        qos2_out: Vec<u64>,
    },
    /// For the fleet's mirror only (not written to the local file): the session's whole
    /// record, subscriptions and inbound QoS 2 ids, written as one key whenever any of
    /// them changes (`crate::cluster::sessions`). The local file keeps them as rows
    /// (`Session`, `Sub`, `Qos2In`), which the fleet no longer reads.
    FleetRecord(Box<super::mirror::FleetRecord>),
}

/// A push answer that waits until its messages are durable.
pub type DeferredReply = (oneshot::Sender<Vec<PushOutcome>>, Vec<PushOutcome>);

/// What one shard hands the writer at the end of a loop turn.
#[derive(Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Sent by the writer after the commit that holds `ops`.
    pub replies: Vec<DeferredReply>,
    /// The shard's number for this batch (1, 2, …), published on `signal` once the
    /// commit that holds it is done.
    pub seq: u64,
    pub signal: Option<Arc<CommitSignal>>,
    /// What `ops` cost (`Op::cost`), counted in the shard's backlog until finished.
    pub bytes: u64,
}

impl Batch {
    /// The commit that held this batch is finished (`ok` says how): the shard hears of
    /// it and its backlog is lighter by the batch.
    pub(super) fn finish(&self, ok: bool, metrics: &StoreMetrics) {
        if let Some(signal) = &self.signal {
            signal.outstanding_bytes.fetch_sub(self.bytes, Relaxed);
            metrics.backlog_less(self.bytes);
            signal.finish(self.seq, ok);
        }
    }
}

impl Op {
    /// Whether the op changes the local file (all but the fleet's own ops: `Will`,
    /// `Adopted`, `FleetRecord`).
    pub fn is_local(&self) -> bool {
        !matches!(
            self.inner(),
            Op::Will { .. } | Op::Adopted { .. } | Op::FleetRecord(_)
        )
    }

    /// The op itself, out of any [`Op::LocalOnly`].
    pub fn inner(&self) -> &Op {
        match self {
            Op::LocalOnly(op) => op.inner(),
            op => op,
        }
    }

    /// Roughly what the op holds in memory: its strings and payload, plus 64 bytes.
    fn cost(&self) -> u64 {
        let strings = match self {
            Op::Session { client_id, .. }
            | Op::DeleteSession(client_id)
            | Op::DeleteMessage { client_id, .. }
            | Op::Qos2Out { client_id, .. }
            | Op::Qos2In { client_id, .. }
            | Op::DeleteQos2In { client_id, .. } => client_id.len(),
            Op::Adopted {
                client_id,
                local_and_stream,
                qos2_out,
            } => client_id.len() + local_and_stream.len() * 16 + qos2_out.len() * 8,
            Op::Sub {
                client_id, filter, ..
            }
            | Op::DeleteSub { client_id, filter } => client_id.len() + filter.len(),
            Op::Message { client_id, msg, .. } => {
                client_id.len() + msg.topic.len() + msg.payload.len()
            }
            Op::Retained(msg) => msg.topic.len() + msg.payload.len(),
            Op::DeleteRetained(topic) => topic.len(),
            Op::Will { client_id, will } => {
                client_id.len() + will.as_ref().map_or(0, |w| w.topic.len() + w.payload.len())
            }
            Op::FleetRecord(r) => {
                r.client_id.len() + r.subs.iter().map(|s| s.0.len() + 8).sum::<usize>()
            }
            Op::LocalOnly(op) => return op.cost(),
        };
        strings as u64 + 64
    }
}

/// How far one shard's batches have been committed, for the MQTT acknowledgements it
/// holds until then (`shard/held.rs`). Written by the store writer after each commit (or
/// by the shard's handle when the writer is gone), read by the shard; `notify` wakes the
/// shard's loop. A permit is stored when the shard is not waiting, so no wake-up is lost.
#[derive(Default)]
pub struct CommitSignal {
    /// The highest batch number whose commit has finished, successfully or not.
    pub done: AtomicU64,
    /// The highest batch number whose commit failed (0: none).
    pub failed: AtomicU64,
    /// What the batches handed over and not yet finished cost (`Op::cost`).
    pub outstanding_bytes: AtomicU64,
    pub notify: tokio::sync::Notify,
}

impl CommitSignal {
    /// Batch `seq` and every earlier one of this shard are finished; `ok` says how.
    pub(super) fn finish(&self, seq: u64, ok: bool) {
        if !ok {
            self.failed.fetch_max(seq, Relaxed);
        }
        // Release: a shard that sees `done` also sees `failed`.
        self.done
            .fetch_max(seq, std::sync::atomic::Ordering::Release);
        self.notify.notify_one();
    }
}

/// A shard's side of the store: the ops of the current turn and the sequence numbers of
/// the messages it stores.
pub struct StoreHandle {
    pub(super) tx: SyncSender<Batch>,
    pub(super) pending: Batch,
    /// Batches the channel did not take yet, oldest first.
    pub(super) backlog: VecDeque<Batch>,
    pub(super) next_seq: u64,
    /// Messages put this run (lets a push see whether it stored something).
    pub puts: u64,
    /// The number of the last batch handed over (or queued in `backlog`).
    pub(super) batch_seq: u64,
    pub(super) signal: Arc<CommitSignal>,
    /// Whether the store is up, and the backlog of every shard (the writer's metrics).
    pub(super) metrics: Arc<StoreMetrics>,
    /// What this turn's ops cost so far (`Op::cost`).
    pub(super) pending_bytes: u64,
    /// This turn's ops that only the fleet's copy takes (`Op::Will`): they change nothing
    /// an acknowledgement must wait for.
    pub(super) pending_fleet_only: usize,
    /// `[store] backlog_max_bytes`.
    pub(super) backlog_max: u64,
    /// The backlog was past its bound at the end of the last turn.
    pub(super) was_over: bool,
}

/// Why a push the store would have to hold is refused (answered 503 with this code): the
/// store is down.
pub const REFUSED_DOWN: &str = "store_unavailable";
/// The shard's backlog of changes for the writer is past `[store] backlog_max_bytes`.
pub const REFUSED_BACKLOG: &str = "store_backlog";

impl StoreHandle {
    /// Why a message the store would have to hold is refused now, if it is: the store is
    /// down (a failed commit, not yet reopened), or this shard's backlog is past its bound.
    pub fn refusal(&self) -> Option<&'static str> {
        if !self.metrics.up() {
            Some(REFUSED_DOWN)
        } else if self.over_bound() {
            Some(REFUSED_BACKLOG)
        } else {
            None
        }
    }

    /// This shard holds `[store] backlog_max_bytes` or more of changes for the writer
    /// (this turn's included).
    pub fn over_bound(&self) -> bool {
        self.signal.outstanding_bytes.load(Relaxed) + self.pending_bytes >= self.backlog_max
    }

    /// At the end of a turn: true once when the backlog got back under its bound since
    /// the last call (the publishers held for it may be read again).
    pub fn back_under_bound(&mut self) -> bool {
        let over = self.over_bound();
        std::mem::replace(&mut self.was_over, over) && !over
    }

    pub fn push(&mut self, op: Op) {
        if matches!(op.inner(), Op::Message { .. }) {
            self.puts += 1;
        }
        self.pending_bytes += op.cost();
        self.pending_fleet_only += usize::from(!op.is_local());
        self.pending.ops.push(op);
    }

    /// A fresh message sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Holds `reply` until this turn's ops are committed.
    pub fn defer(&mut self, reply: DeferredReply) {
        self.pending.replies.push(reply);
    }

    /// Ops collected this turn so far that change the local file (a packet that added
    /// some changed durable state).
    pub fn pending_ops(&self) -> usize {
        self.pending.ops.len() - self.pending_fleet_only
    }

    /// The number the batch of this turn's ops will carry (see [`CommitSignal`]).
    pub fn pending_seq(&self) -> u64 {
        self.batch_seq + 1
    }

    /// Where the writer says how far this shard's batches are committed.
    pub fn signal(&self) -> &Arc<CommitSignal> {
        &self.signal
    }

    /// Offers this turn's batch (and any older ones) to the writer without blocking.
    /// True if some are still waiting (retry next turn).
    pub fn flush(&mut self) -> bool {
        if !self.pending.ops.is_empty() || !self.pending.replies.is_empty() {
            self.batch_seq += 1;
            let mut b = std::mem::take(&mut self.pending);
            b.seq = self.batch_seq;
            b.signal = Some(self.signal.clone());
            b.bytes = std::mem::take(&mut self.pending_bytes);
            self.pending_fleet_only = 0;
            self.signal.outstanding_bytes.fetch_add(b.bytes, Relaxed);
            self.metrics.backlog_more(b.bytes);
            self.backlog.push_back(b);
        }
        while let Some(b) = self.backlog.pop_front() {
            match self.tx.try_send(b) {
                Ok(()) => {}
                Err(TrySendError::Full(b)) => {
                    self.backlog.push_front(b);
                    return true;
                }
                Err(TrySendError::Disconnected(b)) => {
                    // The writer is gone (it logged why): nothing more becomes durable.
                    b.finish(false, &self.metrics);
                    fail_replies(b.replies);
                }
            }
        }
        false
    }

    /// At shard exit: hands everything over, waiting for room if need be.
    pub fn close(mut self) {
        self.flush();
        for b in self.backlog.drain(..) {
            if let Err(e) = self.tx.send(b) {
                e.0.finish(false, &self.metrics);
                fail_replies(e.0.replies);
            }
        }
    }
}

/// Answers pushes whose messages could not be made durable: `queued` was not earned.
pub fn fail_replies(replies: Vec<DeferredReply>) {
    for (tx, mut outcomes) in replies {
        for o in &mut outcomes {
            if o.status == PushStatus::Queued {
                o.status = PushStatus::Dropped("store_error");
                o.ack = None;
            }
        }
        let _ = tx.send(outcomes);
    }
}
