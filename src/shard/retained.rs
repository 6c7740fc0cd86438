//! Retained messages in one order per topic, and `max_retained_messages` gateway-wide.
//!
//! Every shard keeps a full copy of the retained messages, so a SUBSCRIBE never asks
//! another shard. Two devices on different shards may set one topic in the same moment;
//! if each shard applied its own devices' updates at once and the others' a turn later,
//! the copies (and the store) would keep different values. So each topic has one
//! **home shard**, `hash(topic) % shards` (`mailbox::home_shard`, as for the store), that
//! decides: every retained message reaches it (a device's PUBLISH and a will are routed
//! to every shard, a topic push from the API goes to every shard), it applies them in the
//! order they reach it, writes that to the store, and hands each decision to every other
//! shard in [`ShardMsg::Retained`] batches, which they apply in the same order (one
//! mailbox per shard keeps a sender's order). Other shards ignore the retained flag of
//! the messages they route. Live delivery to subscribers is unchanged: only the retained
//! copy follows the home shard.
//!
//! So a retained update is in the publisher's own shard's copy a mailbox round trip to
//! the home shard later (at once when it is the home). With `durability = "immediate"`
//! a PUBACK still waits for the home shard's commit, and that shard sends its decision
//! before it answers (unless the publisher's shard's mailbox was full at that moment),
//! so the publisher's shard has applied it when the PUBACK goes out;
//! a third shard gets the decision in the same turn but may apply it a moment after.
//! Decisions not yet sent keep only the latest of each topic (`RetainedOrder`), so what
//! waits for a full mailbox is bounded by the number of topics, and none is dropped.
//!
//! **`max_retained_messages`** is a gateway-wide bound without locks: each home shard
//! decides on its own topics within its share, `max / shards` (the first `max % shards`
//! shards one more), so the shares add up to the bound and no shard waits for another.
//! The trade-off: a new topic can be refused while the gateway as a whole holds fewer
//! than `max`, when its home's share is full (topics spread by hash, so with many topics
//! the shares fill within a few percent of each other; with fewer than `shards` allowed,
//! some shards' topics are never retained). An expired message counts until a
//! subscriber or an update finds it expired.
//!
//! **The byte bounds** (`crate::retained_budget`) are decided on the publisher's shard,
//! before the home: its budget counts its own devices' updates at once (and again,
//! idempotently, when the home's decision comes back), so a device cannot pass its bound
//! by publishing faster than the round trip. When the home refuses a new topic by count,
//! it sends the publisher's shard a deletion of the topic, which clears that count.

use std::sync::Arc;

use hashbrown::HashMap;

use crate::mailbox::{home_shard, Mailboxes, ShardMsg};
use crate::message::{Message, Origin};
use crate::retained_budget::cost;

use super::Shard;

/// The decisions of this shard, as the home of its topics, not yet handed to the others.
pub(super) struct RetainedOrder {
    /// Per shard: the latest decided update of each topic (an empty payload deletes).
    pending: Vec<HashMap<Arc<str>, Arc<Message>>>,
    /// Retained topics homed on this shard; counted on first use (after the restore).
    homed: Option<usize>,
}

impl RetainedOrder {
    pub(super) fn new(shards: usize) -> Self {
        RetainedOrder {
            pending: (0..shards).map(|_| HashMap::new()).collect(),
            homed: None,
        }
    }

    /// Queues `msg` (a decision) for shard `shard`, replacing an older one of its topic.
    fn queue(&mut self, shard: usize, msg: &Arc<Message>) {
        self.pending[shard].insert(msg.topic.clone(), msg.clone());
    }

    /// Sends each shard the decisions waiting for it; true if some must be retried.
    pub(super) fn flush(&mut self, mailboxes: &Mailboxes) -> bool {
        let mut waiting = false;
        for (shard, pending) in self.pending.iter_mut().enumerate() {
            if pending.is_empty() {
                continue;
            }
            let batch: Vec<_> = pending.drain().map(|(_, m)| m).collect();
            if let Err(ShardMsg::Retained(batch)) =
                mailboxes.try_send(shard, ShardMsg::Retained(batch))
            {
                pending.extend(batch.into_iter().map(|m| (m.topic.clone(), m)));
                waiting = true;
            }
        }
        waiting
    }
}

/// Shard `id`'s share of `max` retained topics among `shards`.
fn share(max: usize, id: usize, shards: usize) -> usize {
    let shards = shards.max(1);
    max / shards + usize::from(id < max % shards)
}

impl Shard {
    /// A retained message this shard routes (published here, from another shard, or
    /// pushed by the backend). Its topic's home shard decides; the others wait for that.
    pub(super) fn order_retained(&mut self, msg: &Arc<Message>) {
        let shards = self.services.mailboxes.len();
        let publisher = self.local_publisher(msg);
        if let Some(client) = &publisher {
            self.reserve_retained_bytes(msg, client);
        }
        if home_shard(&msg.topic, shards) != self.id {
            return;
        }
        let new_topic = !self.routing.retained.contains_key(&*msg.topic);
        if !msg.payload.is_empty() && new_topic && !self.retained_share_left() {
            tracing::warn!(shard = self.id, topic = %msg.topic, "max_retained_messages reached (this shard's share); not retained");
            self.undo_reservation(msg);
            return;
        }
        self.apply_retained(msg);
        for shard in (0..shards).filter(|&s| s != self.id) {
            self.routing.retained_order.queue(shard, msg);
        }
    }

    /// The home shard's decisions, in its order.
    pub(super) fn on_retained(&mut self, updates: Vec<Arc<Message>>) {
        for m in &updates {
            self.apply_retained(m);
        }
    }

    /// A retained message (or, with an empty payload, its deletion) into this shard's
    /// copy, its byte budget and, on the topic's home shard, the store.
    fn apply_retained(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            self.forget_retained(&msg.topic);
            self.store_retained_msg(msg, true);
            return;
        }
        let old = self.routing.retained.insert(msg.topic.clone(), msg.clone());
        if old.is_none() {
            self.count_homed(&msg.topic, 1);
        }
        let owner = self.local_publisher(msg);
        let bytes = cost(&msg.topic, &msg.payload);
        self.routing.retained_budget.set(&msg.topic, bytes, owner);
        self.store_retained_msg(msg, false);
    }

    /// `topic` holds no retained message here any more (deleted, or found expired).
    pub(super) fn forget_retained(&mut self, topic: &str) {
        if self.routing.retained.remove(topic).is_some() {
            self.count_homed(topic, -1);
        }
        self.routing.retained_budget.remove(topic);
    }

    /// A device of this shard set `msg`: its bytes count for it at once, so its next
    /// retained PUBLISH is judged with this one (the home's decision sets them again).
    fn reserve_retained_bytes(&mut self, msg: &Message, client: &Arc<str>) {
        if msg.payload.is_empty() {
            self.routing.retained_budget.remove(&msg.topic);
        } else {
            let bytes = cost(&msg.topic, &msg.payload);
            let owner = Some(client.clone());
            self.routing.retained_budget.set(&msg.topic, bytes, owner);
        }
    }

    /// The home refused `msg` (a new topic): the publisher's shard counted its bytes in
    /// `reserve_retained_bytes`, so it gets the topic's deletion (no-op for its copy).
    fn undo_reservation(&mut self, msg: &Message) {
        let Origin::Device { shard, .. } = msg.origin else {
            return;
        };
        let shard = usize::from(shard);
        if shard == self.id {
            self.routing.retained_budget.remove(&msg.topic);
            return;
        }
        let delete = Message::new(
            msg.topic.clone(),
            bytes::Bytes::new(),
            0,
            true,
            Origin::Gateway,
        );
        self.routing.retained_order.queue(shard, &Arc::new(delete));
    }

    /// Whether this shard, as a home, may hold one more retained topic.
    fn retained_share_left(&mut self) -> bool {
        let shards = self.services.mailboxes.len();
        let share = share(self.settings.max_retained, self.id, shards);
        self.homed_topics() < share
    }

    /// Retained topics homed on this shard (counted once, then kept up to date).
    fn homed_topics(&mut self) -> usize {
        if let Some(n) = self.routing.retained_order.homed {
            return n;
        }
        let shards = self.services.mailboxes.len();
        let n = (self.routing.retained.keys())
            .filter(|t| home_shard(t, shards) == self.id)
            .count();
        self.routing.retained_order.homed = Some(n);
        n
    }

    /// A topic came (`+1`) or went (`-1`) in this shard's copy.
    fn count_homed(&mut self, topic: &str, change: isize) {
        let shards = self.services.mailboxes.len();
        if home_shard(topic, shards) != self.id {
            return;
        }
        if let Some(n) = &mut self.routing.retained_order.homed {
            *n = n.saturating_add_signed(change);
        }
    }

    /// The client id of the device on this shard that published `msg`, if any.
    fn local_publisher(&self, msg: &Message) -> Option<Arc<str>> {
        match msg.origin {
            Origin::Device { shard, session } if usize::from(shard) == self.id => self
                .sessions
                .get(session as usize)
                .map(|s| s.client_id.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_the_bound() {
        for (max, shards) in [(0, 1), (1, 4), (10, 3), (100_000, 7), (5, 5)] {
            let total: usize = (0..shards).map(|id| share(max, id, shards)).sum();
            assert_eq!(total, max, "{max} over {shards}");
            let most = (0..shards).map(|id| share(max, id, shards)).max();
            assert!(most.unwrap_or(0) <= max / shards + 1);
        }
    }
}
