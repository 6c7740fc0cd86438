//! Routing state: the subscription index, retained messages, the shared subscription
//! groups this shard owns, and the per-turn outboxes to the other shards. The routing
//! logic itself is in `delivery.rs` and `shared.rs`.

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::mailbox::ShardMsg;
use crate::message::Message;
use crate::topic::{Subscriber, SubscriptionIndex};

use super::shared::SharedGroups;

pub struct Routing {
    pub subs: SubscriptionIndex,
    /// Subscriptions of all sessions (the `subscriptions` gauge).
    pub subs_total: u64,
    pub retained: HashMap<Arc<str>, Arc<Message>>,
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
    pub fn new(shards: usize) -> Self {
        Routing {
            subs: SubscriptionIndex::new(),
            subs_total: 0,
            retained: HashMap::new(),
            shared: SharedGroups::default(),
            match_buf: Vec::new(),
            outbox: vec![Vec::new(); shards],
            ctl_outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            outbox_blocked: false,
        }
    }
}
