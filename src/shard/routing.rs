//! Routing state: the subscription index, retained messages, the shared subscription
//! groups this shard owns, and the per-turn outboxes to the other shards. The routing
//! logic itself is in `delivery.rs` and `shared.rs`, the retained messages' order in
//! `retained.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::mailbox::{Mailboxes, ShardMsg};
use crate::message::Message;
use crate::metrics::{DropReason, ShardMetrics};
use crate::retained_budget::RetainedBudget;
use crate::topic::{Subscriber, SubscriptionIndex};

use super::retained::RetainedOrder;
use super::shared::SharedGroups;
use super::Settings;

pub(super) struct Routing {
    pub subs: SubscriptionIndex,
    /// Subscriptions of all sessions (the `subscriptions` gauge).
    pub subs_total: u64,
    /// In topic order, so `GET /v1/retained` pages through it with a cursor.
    pub retained: BTreeMap<Arc<str>, Arc<Message>>,
    /// The byte bounds on `retained` (mirrors it; see `crate::retained_budget`).
    pub retained_budget: RetainedBudget,
    /// Retained updates this shard decided as their topics' home, for the others.
    pub retained_order: RetainedOrder,
    /// The shared subscription groups this shard owns.
    pub shared: SharedGroups,
    /// Subscribers matched by the message being routed (reused across messages).
    pub match_buf: Vec<Subscriber>,
    /// Messages for each other shard, sent as one batch per turn, and what each batch
    /// costs (`Message::cost`).
    pub outbox: Vec<Vec<Arc<Message>>>,
    pub outbox_bytes: Vec<usize>,
    /// Shared-subscription control messages for each other shard, sent in order.
    pub ctl_outbox: Vec<VecDeque<ShardMsg>>,
    /// A batch for another shard found its mailbox full this turn.
    pub outbox_blocked: bool,
}

impl Routing {
    pub(super) fn new(shards: usize, s: &Settings) -> Self {
        Routing {
            subs: SubscriptionIndex::new(),
            subs_total: 0,
            retained: BTreeMap::new(),
            retained_budget: RetainedBudget::new(
                s.max_retained_bytes,
                s.max_retained_bytes_per_client,
            ),
            retained_order: RetainedOrder::new(shards),
            shared: SharedGroups::default(),
            match_buf: Vec::new(),
            outbox: vec![Vec::new(); shards],
            outbox_bytes: vec![0; shards],
            ctl_outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            outbox_blocked: false,
        }
    }

    /// Hands `msg` to shard `shard` with this turn's batch.
    pub(super) fn route_to(&mut self, shard: usize, msg: &Arc<Message>) {
        self.outbox[shard].push(msg.clone());
        self.outbox_bytes[shard] += msg.cost();
    }

    /// Sends each other shard its control messages and retained decisions (`retained.rs`),
    /// then its batch of messages (from shard `from`, with `stamp`: see `held.rs`); true
    /// if some must be retried. A batch
    /// waits while the other shard's mailbox is full or already holds
    /// `mailbox_max_bytes` of messages (unless it holds none: one batch always goes).
    /// What waits stays for the next turn; with `slow_consumer = "pace"` no PUBLISH is
    /// read meanwhile (`outbox_blocked`), so it stops growing; with `"drop"` never more
    /// than a mailbox's worth (the oldest are dropped and counted).
    pub(super) fn flush(
        &mut self,
        mailboxes: &Mailboxes,
        metrics: &ShardMetrics,
        s: &Settings,
        (from, stamp): (u16, u64),
    ) -> bool {
        let mut waiting = self.flush_ctl(mailboxes, metrics, s);
        waiting |= self.retained_order.flush(mailboxes);
        self.outbox_blocked = false;
        for shard in 0..self.outbox.len() {
            if self.outbox[shard].is_empty() {
                continue;
            }
            let bytes = self.outbox_bytes[shard];
            let queued = mailboxes.routed_bytes(shard);
            let sent = if queued > 0 && queued + bytes > s.mailbox_max_bytes {
                false
            } else {
                let batch = std::mem::take(&mut self.outbox[shard]);
                let n = batch.len() as u64;
                let msg = ShardMsg::Publish {
                    from,
                    stamp,
                    batch,
                    bytes,
                };
                let counted = || {
                    ShardMetrics::add(&metrics.handoff_messages, n);
                    ShardMetrics::add(&metrics.handoff_batches, 1);
                };
                match mailboxes.send_routed(shard, msg, bytes, counted) {
                    Ok(()) => true,
                    Err(ShardMsg::Publish { batch, .. }) => {
                        self.outbox[shard] = batch;
                        false
                    }
                    Err(_) => unreachable!("send_routed gives back what it was given"),
                }
            };
            if sent {
                self.outbox_bytes[shard] = 0;
                continue;
            }
            self.outbox_blocked = true;
            waiting = true;
            if !s.pace {
                let cap = (s.mailbox_capacity, s.mailbox_max_bytes);
                let dropped = drop_oldest(&mut self.outbox[shard], cap);
                self.outbox_bytes[shard] -= dropped.1;
                metrics.drop_msg(DropReason::MailboxFull, dropped.0);
            }
        }
        waiting
    }

    /// Shared-subscription control messages, in order, for each other shard.
    pub(super) fn flush_ctl(
        &mut self,
        mailboxes: &Mailboxes,
        metrics: &ShardMetrics,
        s: &Settings,
    ) -> bool {
        let cap = s.mailbox_capacity.max(1);
        let mut waiting = false;
        for (shard, list) in self.ctl_outbox.iter_mut().enumerate() {
            while let Some(msg) = list.pop_front() {
                if let Err(msg) = mailboxes.try_send(shard, msg) {
                    list.push_front(msg);
                    break;
                }
            }
            if list.len() > cap {
                let excess = list.len() - cap;
                list.drain(..excess);
                metrics.drop_msg(DropReason::MailboxFull, excess as u64);
            }
            waiting |= !list.is_empty();
        }
        waiting
    }
}

/// Drops the oldest of `batch` beyond `max_len` messages or `max_bytes` bytes (the last
/// message always stays); returns how many and their bytes.
fn drop_oldest(
    batch: &mut Vec<Arc<Message>>,
    (max_len, max_bytes): (usize, usize),
) -> (u64, usize) {
    let mut total: usize = batch.iter().map(|m| m.cost()).sum();
    let mut n = batch.len().saturating_sub(max_len);
    let mut dropped = batch[..n].iter().map(|m| m.cost()).sum::<usize>();
    total -= dropped;
    while total > max_bytes && n + 1 < batch.len() {
        let c = batch[n].cost();
        total -= c;
        dropped += c;
        n += 1;
    }
    batch.drain(..n);
    (n as u64, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Origin;

    fn msg(payload: usize) -> Arc<Message> {
        let body = bytes::Bytes::from(vec![0u8; payload]);
        Arc::new(Message::new(
            Arc::from("t"),
            body,
            0,
            false,
            Origin::Gateway,
        ))
    }

    #[test]
    fn drop_oldest_keeps_the_newest_within_both_bounds() {
        let mut batch: Vec<_> = (0..10).map(|_| msg(100)).collect();
        let cost = batch[0].cost();
        assert_eq!(drop_oldest(&mut batch, (8, usize::MAX)), (2, 2 * cost));
        assert_eq!(batch.len(), 8);
        assert_eq!(drop_oldest(&mut batch, (100, 3 * cost)), (5, 5 * cost));
        assert_eq!(batch.len(), 3);
        // The newest message always stays, however big.
        assert_eq!(drop_oldest(&mut batch, (100, 1)), (2, 2 * cost));
        assert_eq!(batch.len(), 1);
    }
}
