//! MQTT acknowledgements that wait for the store commit: a PUBACK/PUBREC, SUBACK,
//! UNSUBACK or CONNACK answering a packet that changed durable state is not written
//! before the store batch holding that change is committed (fsync'd), so `kill -9`
//! after the client read it loses nothing acknowledged — as an HTTP push answered
//! `queued` already waits for its commit.
//!
//! **On the shard.** Before a packet is handled the shard notes where the connection's
//! output ends, how many store ops the turn has collected and how long an outbox to
//! another shard is ([`Mark`]). If handling it added ops (or, for a PUBLISH, routed the
//! message to the other shards) and output, that output from the noted offset on is
//! *held* (`ConnBufs::holds`) behind the number of the store batch this turn's ops go
//! out in. `transport::write` writes only up to the first hold, so nothing the connection
//! is sent later overtakes the acknowledgement. The store writer publishes each finished
//! batch number on the shard's [`CommitSignal`] and wakes its loop; each turn the shard
//! releases the holds that are done and writes those connections. Nothing blocks: a held
//! connection keeps its output buffer until the commit; an idle connection holds nothing.
//!
//! **Across shards.** A PUBLISH goes to the other shards whose subscriptions may match
//! it, which may store a copy for a persistent session homed there, in a later turn and
//! batch of its own. Only a shard that keeps some session in the store can
//! (`Mailboxes::may_store`, counted before the session's CONNACK), so a PUBLISH routed
//! only to shards without one is not held for them. So the
//! publisher's shard stamps each message batch it hands another shard with a number that
//! grows every turn that routes something; the receiver, once the store changes of the
//! turn that routed it are committed (at once if it had none), answers
//! [`ShardMsg::Committed`] with that stamp. A hold for a PUBLISH routed under stamp `s`
//! is released when, for every other shard `p`, the answered stamp reaches
//! `min(s, the last stamp routed to p)`: every batch that carried a message routed under
//! `s` or earlier is committed there. Answers keep the order of the batches they answer,
//! so a later stamp covers the earlier ones.
//!
//! **Failures.** A batch that failed to commit (or that never reached a writer that is
//! gone), here or on the subscriber's shard, closes the connections whose
//! acknowledgements waited for it, without them (disconnect reason `store_error`): the
//! client sends its packet again on a new connection, the same answer the HTTP API gives
//! with `dropped`/`store_error`.
//!
//! **What is not covered.** A message dropped because another shard's mailbox stayed full
//! (`gateway_messages_dropped_total{reason="mailbox_full"}`, only with `slow_consumer = "drop"`), and
//! a shared-subscription delivery that its group's owner shard forwards to a member homed
//! on a third shard: the acknowledgement covers the owner's turn, not the forwarded copy.
//!
//! Only with `[store] durability = "immediate"`. With `"eventual"` nothing is held for the
//! store.
//!
//! **The fleet.** A SUBACK in a fleet is held the same way until NATS holds the
//! subscriptions of the filters it granted (`Interest::Barrier`, `fleet_route.rs`), so
//! that a message another node publishes after the client read its SUBACK reaches it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::codec::reason;
use crate::mailbox::ShardMsg;
use crate::metrics::DisconnectReason;
use crate::store::CommitSignal;

use super::Shard;

/// The shard's side: whether acknowledgements wait, the connections holding some, and
/// the commit answers exchanged with the other shards.
pub(super) struct Held {
    signal: Option<Arc<CommitSignal>>,
    /// Connections with at least one hold (a key may repeat; stale keys are skipped).
    waiting: Vec<u32>,
    /// The last own `done` value acted on.
    seen: u64,
    /// The stamp of the message batches this turn hands the other shards: one more for
    /// every turn that routed something a hold waits for, so a later answer covers every
    /// earlier batch.
    stamp: u64,
    /// A hold waits for `stamp`: the batches carry it (and are answered) until the
    /// outboxes holding its messages are empty. Otherwise they carry 0 and nobody
    /// answers them, which spares the other shard a wake-up back per batch.
    stamp_wanted: bool,
    /// Per other shard: the last stamp routed to it, the last it answered committed.
    routed: Vec<u64>,
    answered: Vec<u64>,
    /// The highest stamp another shard answered with a failed commit.
    route_failed: u64,
    /// An answer arrived since the holds were last looked at.
    answers_changed: bool,
    /// Batches received this turn: (from, stamp).
    received: Vec<(u16, u64)>,
    /// Answers owed, in order: (own batch that must be committed first, from, stamp).
    owed: VecDeque<(u64, u16, u64)>,
    /// Answers ready to send (the mailbox was full): per shard, (stamp, ok).
    unsent: Vec<Option<(u64, bool)>>,
    /// The highest fleet barrier ticket let go (confirmed by NATS, or waited out):
    /// holds for it or an earlier one are ready.
    fleet: u64,
    /// `fleet` moved since the holds were last looked at.
    fleet_changed: bool,
}

/// Where a connection's output ended, the turn's store ops, and an outbox's length,
/// before a packet.
#[derive(Clone, Copy)]
pub(super) struct Mark {
    out_len: usize,
    ops: usize,
    routed: usize,
}

/// What became of a connection's holds after a commit report.
enum Release {
    Waiting,
    Done,
    Failed,
}

/// One held acknowledgement: its offset in the output, the own store batch it waits for
/// (0: none), the routing stamp every other shard must answer (0: none) and the fleet
/// barrier ticket it waits for (0: none).
pub(super) type Hold = (usize, u64, u64, u64);

impl Held {
    /// `signal` is the shard's store handle's, when acknowledgements wait for commits.
    pub(super) fn new(signal: Option<Arc<CommitSignal>>, shards: usize) -> Held {
        Held {
            signal,
            waiting: Vec::new(),
            seen: 0,
            stamp: 1,
            stamp_wanted: false,
            routed: vec![0; shards],
            answered: vec![0; shards],
            route_failed: 0,
            answers_changed: false,
            received: Vec::new(),
            owed: VecDeque::new(),
            unsent: vec![None; shards],
            fleet: 0,
            fleet_changed: false,
        }
    }

    /// Fleet barrier tickets up to `ticket` are let go.
    pub(super) fn fleet_released(&mut self, ticket: u64) {
        if ticket > self.fleet {
            self.fleet = ticket;
            self.fleet_changed = true;
        }
    }

    /// Completes once the writer has reported a commit since the last call (never
    /// without a store, or with `durability = "eventual"`).
    pub(super) async fn committed(signal: Option<Arc<CommitSignal>>) {
        match signal {
            Some(s) => s.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn signal(&self) -> Option<Arc<CommitSignal>> {
        self.signal.clone()
    }

    /// The highest routing stamp every other shard has answered for: a shard with
    /// nothing unanswered does not limit it.
    fn routed_durable(&self) -> u64 {
        let pending = self.routed.iter().zip(&self.answered);
        pending
            .filter(|(r, a)| r > a)
            .map(|(_, a)| *a)
            .min()
            .unwrap_or(u64::MAX)
    }
}

impl Shard {
    /// Notes connection `key`'s output end, the turn's store ops and an outbox's length
    /// before a packet whose answer must wait for durability; `None` when they do not wait.
    pub(super) fn durable_mark(&self, key: usize) -> Option<Mark> {
        self.held.signal.as_ref()?;
        let ops = self.services.store.as_ref()?.pending_ops();
        let conn = self.wire.conns.get(key)?;
        let out_len = conn.bufs.as_ref().map_or(0, |b| b.out.len());
        let routed = self.routed_to_storing_shards();
        Some(Mark {
            out_len,
            ops,
            routed,
        })
    }

    /// Messages waiting for the other shards that keep sessions in the store: only there
    /// can a routed message be stored, so only their commits hold a PUBACK. (A message
    /// routed only to shards of clean sessions is acknowledged at once.)
    fn routed_to_storing_shards(&self) -> usize {
        let mailboxes = &self.services.mailboxes;
        (self.routing.outbox.iter().enumerate())
            .filter(|&(p, _)| p != self.id && mailboxes.may_store(p))
            .map(|(_, outbox)| outbox.len())
            .sum()
    }

    /// After the packet: if it added store ops or routed a message to the other shards,
    /// and produced output, that output waits for this turn's batch to be committed.
    pub(super) fn hold_if_durable(&mut self, key: usize, mark: Option<Mark>) {
        let Some(mark) = mark else {
            return;
        };
        let Some(store) = self.services.store.as_ref() else {
            return;
        };
        let seq = store.pending_seq();
        let own = if store.pending_ops() > mark.ops {
            seq
        } else {
            0
        };
        let stamp = self.held.stamp;
        let route = if self.routed_to_storing_shards() > mark.routed {
            self.held.stamp_wanted = true;
            stamp
        } else {
            0
        };
        if own == 0 && route == 0 {
            return;
        }
        let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
            return;
        };
        if bufs.out.len() <= mark.out_len {
            return;
        }
        match bufs.holds.back_mut() {
            // An earlier packet of this turn holds already: it waits for both now.
            Some(h) if h.1 == seq || h.2 == stamp => {
                h.1 = h.1.max(own);
                h.2 = h.2.max(route);
            }
            _ => push_hold(
                &mut self.held.waiting,
                &mut bufs.holds,
                key,
                (mark.out_len, own, route, 0),
            ),
        }
    }

    /// After a SUBSCRIBE in a fleet: its output from `out_len` on (the SUBACK, then any
    /// retained messages) waits for fleet barrier `ticket` (with the store hold this
    /// packet may have got, if any: it is the last one, at the same offset).
    pub(super) fn hold_for_fleet(&mut self, key: usize, out_len: usize, ticket: u64) {
        let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
            return;
        };
        if bufs.out.len() <= out_len {
            return;
        }
        match bufs.holds.back_mut() {
            Some(h) if h.0 == out_len => h.3 = h.3.max(ticket),
            _ => push_hold(
                &mut self.held.waiting,
                &mut bufs.holds,
                key,
                (out_len, 0, 0, ticket),
            ),
        }
    }

    /// Where connection `key`'s output ends now.
    pub(super) fn output_len(&self, key: usize) -> usize {
        let bufs = self.wire.conns.get(key).and_then(|c| c.bufs.as_ref());
        bufs.map_or(0, |b| b.out.len())
    }

    /// Messages still in an outbox were routed this turn or earlier; true if there are.
    fn note_routed(&mut self) -> bool {
        let mut any = false;
        for (p, outbox) in self.routing.outbox.iter().enumerate() {
            if !outbox.is_empty() {
                self.held.routed[p] = self.held.routed[p].max(self.held.stamp);
                any = true;
            }
        }
        any
    }

    /// At the end of a turn, before the outboxes go: the stamp their batches carry (0 when
    /// acknowledgements do not wait or no hold waits for them), and the answers owed for
    /// the batches received this turn (after this turn's store batch, if it has ops; else
    /// after those owed before).
    pub(super) fn route_stamp(&mut self) -> u64 {
        if self.held.signal.is_none() {
            return 0;
        }
        let Some(store) = self.services.store.as_ref() else {
            return 0;
        };
        let after = if store.pending_ops() > 0 {
            store.pending_seq()
        } else {
            self.held.owed.back().map_or(0, |o| o.0)
        };
        for (from, stamp) in std::mem::take(&mut self.held.received) {
            self.held.owed.push_back((after, from, stamp));
        }
        if !self.held.stamp_wanted {
            return 0;
        }
        let stamp = self.held.stamp;
        if self.note_routed() {
            self.held.stamp += 1;
        }
        stamp
    }

    /// After the outboxes were flushed: once none holds messages any more, the next
    /// batches carry no stamp until a hold waits for one again.
    pub(super) fn outboxes_flushed(&mut self, waiting: bool) {
        if !waiting {
            self.held.stamp_wanted = false;
        }
    }

    /// A batch of messages from shard `from` was routed here: it is owed an answer.
    pub(super) fn note_remote(&mut self, from: u16, stamp: u64) {
        if stamp != 0 && self.held.signal.is_some() {
            self.held.received.push((from, stamp));
        }
    }

    /// Shard `from` committed what our batches up to `stamp` stored there (or failed to).
    pub(super) fn on_committed(&mut self, from: u16, stamp: u64, ok: bool) {
        let p = usize::from(from);
        if let Some(a) = self.held.answered.get_mut(p) {
            *a = (*a).max(stamp);
            self.held.answers_changed = true;
        }
        if !ok {
            self.held.route_failed = self.held.route_failed.max(stamp);
        }
    }

    /// Sends the answers whose commits are done; true if some must be retried.
    pub(super) fn flush_echoes(&mut self) -> bool {
        let Some(signal) = self.held.signal.as_ref() else {
            return false;
        };
        let done = signal.done.load(Ordering::Acquire);
        let failed = signal.failed.load(Ordering::Relaxed);
        while let Some(&(after, from, stamp)) = self.held.owed.front() {
            if after > done {
                break;
            }
            self.held.owed.pop_front();
            let ok = after == 0 || after > failed;
            let slot = &mut self.held.unsent[usize::from(from)];
            *slot = Some(slot.map_or((stamp, ok), |(s, o)| (s.max(stamp), o && ok)));
        }
        let mut waiting = false;
        for to in 0..self.held.unsent.len() {
            let Some((stamp, ok)) = self.held.unsent[to] else {
                continue;
            };
            let msg = ShardMsg::Committed {
                from: self.id as u16,
                stamp,
                ok,
            };
            if self.services.mailboxes.try_send(to, msg).is_ok() {
                self.held.unsent[to] = None;
            } else {
                waiting = true;
            }
        }
        waiting
    }

    /// Once per turn, before the writes: releases the holds that are done (the connection
    /// is written this turn) and closes the connections whose batch failed.
    pub(super) fn release_held(&mut self) {
        self.fleet_release();
        let (done, failed) = match self.held.signal.as_ref() {
            Some(s) => (
                s.done.load(Ordering::Acquire),
                s.failed.load(Ordering::Relaxed),
            ),
            None if self.held.fleet_changed => (u64::MAX, 0),
            None => return,
        };
        if done == self.held.seen && !self.held.answers_changed && !self.held.fleet_changed {
            return;
        }
        self.held.seen = done;
        self.held.answers_changed = false;
        self.held.fleet_changed = false;
        let routed = if self.held.signal.is_some() {
            self.note_routed();
            self.held.routed_durable()
        } else {
            u64::MAX
        };
        let route_failed = self.held.route_failed;
        let fleet = self.held.fleet;
        let ready = move |h: &Hold| (h.1 <= done) && (h.2 <= routed) && (h.3 <= fleet);
        let lost = move |h: &Hold| (h.1 != 0 && h.1 <= failed) || (h.2 != 0 && h.2 <= route_failed);
        let mut waiting = std::mem::take(&mut self.held.waiting);
        waiting.sort_unstable();
        waiting.dedup();
        let mut closing = Vec::new();
        waiting.retain(|&key| match self.release(key as usize, ready, lost) {
            Release::Waiting => true,
            Release::Done => false,
            Release::Failed => {
                closing.push(key);
                false
            }
        });
        self.held.waiting = waiting;
        for key in closing {
            self.close_unacknowledged(key as usize);
        }
    }

    /// Releases connection `key`'s holds that are `ready` (marking it for writing), in
    /// order; `Failed` when the first one not ready is `lost`.
    fn release(
        &mut self,
        key: usize,
        ready: impl Fn(&Hold) -> bool,
        lost: impl Fn(&Hold) -> bool,
    ) -> Release {
        let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
            return Release::Done;
        };
        let before = bufs.holds.len();
        while bufs.holds.front().is_some_and(|h| ready(h) && !lost(h)) {
            bufs.holds.pop_front();
        }
        if bufs.holds.front().is_some_and(&lost) {
            return Release::Failed;
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

/// Appends `hold` to connection `key`'s holds; a connection's first hold puts it among
/// the connections `waiting`.
fn push_hold(waiting: &mut Vec<u32>, holds: &mut VecDeque<Hold>, key: usize, hold: Hold) {
    if holds.is_empty() {
        waiting.push(key as u32);
    }
    holds.push_back(hold);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shards_with_unanswered_batches_limit_what_is_durable() {
        let mut h = Held::new(None, 3);
        assert_eq!(
            h.routed_durable(),
            u64::MAX,
            "nothing routed: nothing to wait for"
        );
        h.routed = vec![0, 5, 3];
        h.answered = vec![0, 4, 3];
        // Shard 1 answered up to 4 of 5: holds routed under 4 or earlier are done there;
        // shard 2 answered everything routed to it.
        assert_eq!(h.routed_durable(), 4);
        h.answered[1] = 5;
        assert_eq!(h.routed_durable(), u64::MAX);
    }
}
