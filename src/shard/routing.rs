//! Routing state: the subscription index, retained messages, the shared subscription
//! groups this shard owns, and the per-turn outboxes to the other shards. The routing
//! logic itself is in `delivery.rs` and `shared.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::mailbox::{Mailboxes, ShardMsg};
use crate::message::Message;
use crate::metrics::{DropReason, ShardMetrics};
use crate::retained_budget::RetainedBudget;
use crate::topic::{Subscriber, SubscriptionIndex};

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
    /// The shared subscription groups this shard owns.
    pub shared: SharedGroups,
    /// Subscribers matched by the message being routed (reused across messages).
    pub match_buf: Vec<Subscriber>,
    /// Messages for each other shard, sent as one batch per turn.
    pub outbox: Vec<Vec<Arc<Message>>>,
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
            shared: SharedGroups::default(),
            match_buf: Vec::new(),
            outbox: vec![Vec::new(); shards],
            ctl_outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            outbox_blocked: false,
        }
    }

    /// Sends each other shard its control messages, then its batch of messages (from
    /// shard `from`, with `stamp`: see `held.rs`); true if some must be retried. What does
    /// not fit stays for the next turn, but never more than a mailbox's worth (the oldest
    /// are dropped and counted), except messages with backpressure on (no PUBLISH is read
    /// meanwhile, so the batch stops growing).
    pub(super) fn flush(
        &mut self,
        mailboxes: &Mailboxes,
        metrics: &ShardMetrics,
        s: &Settings,
        (from, stamp): (u16, u64),
    ) -> bool {
        let mut waiting = self.flush_ctl(mailboxes, metrics, s.mailbox_capacity.max(1));
        self.outbox_blocked = false;
        for shard in 0..self.outbox.len() {
            if self.outbox[shard].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outbox[shard]);
            let msg = ShardMsg::Publish { from, stamp, batch };
            if let Err(ShardMsg::Publish { mut batch, .. }) = mailboxes.try_send(shard, msg) {
                self.outbox_blocked = true;
                if !s.backpressure {
                    drop_oldest(&mut batch, s.mailbox_capacity, metrics);
                }
                self.outbox[shard] = batch;
                waiting = true;
            }
        }
        waiting
    }

    /// Shared-subscription control messages, in order, for each other shard.
    fn flush_ctl(&mut self, mailboxes: &Mailboxes, metrics: &ShardMetrics, cap: usize) -> bool {
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

/// Drops the oldest of `batch` beyond `cap`, counted as mailbox-full drops.
fn drop_oldest<T>(batch: &mut Vec<T>, cap: usize, metrics: &ShardMetrics) {
    if batch.len() > cap {
        let excess = batch.len() - cap;
        batch.drain(..excess);
        metrics.drop_msg(DropReason::MailboxFull, excess as u64);
    }
}
