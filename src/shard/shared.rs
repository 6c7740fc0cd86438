//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2) across shards.
//!
//! Sessions live on their client id's home shard, but the members of one group may live on
//! any shard, and each message must reach exactly one of them. So every group has one
//! owner shard, `home_shard("{group}/{filter}")`, which alone knows the members and picks
//! one per message (round robin). Every shard sees every publish already, so the owner
//! matches it like any subscription; the other shards ignore shared groups when routing.
//!
//! A member subscribing or leaving (unsubscribe, session end) tells the owner
//! (`SharedJoin`/`SharedLeave`). The owner delivers to a local member directly and hands
//! a remote member's message to its home shard (`DeliverShared`), which queues or sends
//! it like any other, tagged with the group. A message the member cannot take (it is no
//! member any more) or will not finish (it left with the message queued or
//! unacknowledged) goes back to the owner (`SharedBounce`) for another member. Members are
//! known by client id: slab keys are reused.
//!
//! Control messages to other shards wait in a per-shard ordered list when a mailbox is
//! full (bounded by `mailbox_capacity`; beyond that the oldest are dropped and counted as
//! `mailbox_full`), so a shard never blocks and a member's join, leave and bounces reach
//! the owner in the order they were sent.
//!
//! In a fleet (`crate::cluster::routing`) the owner reports each member a group gains or
//! loses here to the fleet's routing, which holds NATS queue subscriptions for the group
//! (one per member, up to a bound, so nodes get its messages by their members); no shard
//! then matches messages against its groups itself: NATS picks one node per message and
//! the owner gets it as `ShardMsg::FleetShared`.

use std::sync::Arc;

use hashbrown::HashMap;
use slab::Slab;

use crate::cluster::routing::Interest;
use crate::mailbox::{home_shard, ShardMsg, SharedBounce, SharedDelivery, SharedMember};
use crate::message::Message;
use crate::metrics::DropReason;
use crate::session::Queued;
use crate::topic::{Subscriber, SubscriptionIndex};

use super::Shard;

/// Bounces after which a message is dropped rather than offered to yet another member
/// (members leaving one after another while it travels).
const MAX_ATTEMPTS: u8 = 8;

/// The groups this shard owns.
#[derive(Default)]
pub(super) struct SharedGroups {
    groups: Slab<Group>,
    by_key: HashMap<Arc<str>, usize>,
    /// Inner filter → group slot (as `Subscriber::session`).
    index: Option<Box<SubscriptionIndex>>,
}

struct Group {
    key: Arc<str>,
    filter: Arc<str>,
    members: Vec<Member>,
    next: usize,
}

struct Member {
    client_id: Arc<str>,
    shard: usize,
    options: u8,
    sub_id: u32,
}

/// The key of group `group` on `filter`: `"{group}/{filter}"` (the shared filter without
/// its `$share/` prefix).
pub(super) fn group_key(group: &str, filter: &str) -> Arc<str> {
    Arc::from(format!("{group}/{filter}"))
}

impl Shard {
    /// Sends a control message to `shard`, or handles it now when it is this one.
    fn send_ctl(&mut self, shard: usize, msg: ShardMsg) {
        if shard == self.id {
            self.handle_msg(msg);
        } else {
            self.routing.ctl_outbox[shard].push_back(msg);
        }
    }

    /// Session `skey` (homed here) joined `$share/{group}/{filter}`.
    pub(super) fn join_shared(
        &mut self,
        skey: usize,
        group: &str,
        filter: &str,
        options: u8,
        sub_id: u32,
    ) {
        let member = SharedMember {
            group: Arc::from(group),
            filter: Arc::from(filter),
            client_id: self.sessions[skey].client_id.clone(),
            shard: self.id,
            options,
            sub_id,
        };
        let owner = home_shard(&group_key(group, filter), self.services.mailboxes.len());
        self.send_ctl(owner, ShardMsg::SharedJoin(Box::new(member)));
    }

    /// `client_id` (homed here) left group `key`; its unfinished QoS 1/2 messages of the
    /// group in `items` go back to the owner for other members.
    pub(super) fn leave_shared(
        &mut self,
        key: &Arc<str>,
        client_id: &Arc<str>,
        items: Vec<Queued>,
    ) {
        let owner = home_shard(key, self.services.mailboxes.len());
        self.send_ctl(
            owner,
            ShardMsg::SharedLeave {
                key: key.clone(),
                client_id: client_id.clone(),
            },
        );
        for item in items {
            self.bounce(key.clone(), client_id.clone(), item.msg, 0);
        }
    }

    fn bounce(&mut self, key: Arc<str>, from: Arc<str>, msg: Arc<Message>, attempts: u8) {
        let owner = home_shard(&key, self.services.mailboxes.len());
        let b = SharedBounce {
            key,
            from,
            msg,
            attempts,
        };
        self.send_ctl(owner, ShardMsg::SharedBounce(Box::new(b)));
    }

    /// Owner: adds or updates a member.
    pub(super) fn on_shared_join(&mut self, m: SharedMember) {
        let key = group_key(&m.group, &m.filter);
        let shared = &mut self.routing.shared;
        let slot = match shared.by_key.get(&key) {
            Some(&slot) => slot,
            None => {
                let slot = shared.groups.insert(Group {
                    key: key.clone(),
                    filter: m.filter.clone(),
                    members: Vec::new(),
                    next: 0,
                });
                shared.by_key.insert(key.clone(), slot);
                shared
                    .index
                    .get_or_insert_with(|| Box::new(SubscriptionIndex::new()))
                    .insert(
                        &m.filter,
                        Subscriber {
                            session: slot as u32,
                            options: 0,
                            sub_id: 0,
                        },
                    );
                slot
            }
        };
        let g = &mut shared.groups[slot];
        let member = Member {
            client_id: m.client_id,
            shard: m.shard,
            options: m.options,
            sub_id: m.sub_id,
        };
        match g
            .members
            .iter_mut()
            .find(|x| x.client_id == member.client_id)
        {
            Some(x) => *x = member,
            None => {
                g.members.push(member);
                // One per member: the fleet holds a queue subscription per member here.
                if let Some(route) = &self.services.fleet_route {
                    route.interest(Interest::Add(format!("$share/{key}").into()));
                }
            }
        }
    }

    /// Owner: removes a member; the group goes with its last member.
    pub(super) fn on_shared_leave(&mut self, key: &str, client_id: &str) {
        let shared = &mut self.routing.shared;
        let Some(&slot) = shared.by_key.get(key) else {
            return;
        };
        let g = &mut shared.groups[slot];
        let before = g.members.len();
        g.members.retain(|m| &*m.client_id != client_id);
        if g.members.len() < before {
            if let Some(route) = &self.services.fleet_route {
                route.interest(Interest::Remove(format!("$share/{}", g.key).into()));
            }
        }
        if g.members.is_empty() {
            let g = shared.groups.remove(slot);
            shared.by_key.remove(&g.key);
            if let Some(index) = shared.index.as_mut() {
                index.remove(&g.filter, slot as u32);
                if index.is_empty() {
                    shared.index = None;
                }
            }
        }
    }

    /// Owner: one member of each group matching `msg` gets it. Returns the groups matched.
    pub(super) fn route_shared(&mut self, msg: &Arc<Message>) -> usize {
        let Some(index) = self.routing.shared.index.as_ref() else {
            return 0;
        };
        let mut slots: Vec<usize> = Vec::new();
        index.for_each_match(&msg.topic, |s| slots.push(s.session as usize));
        for &slot in &slots {
            self.dispatch_shared(slot, msg, None, 0);
        }
        slots.len()
    }

    /// Owner, in a fleet: NATS picked this node's members of group `key` for `msg`.
    pub(super) fn on_fleet_shared(&mut self, key: &str, msg: &Arc<Message>) {
        match self.routing.shared.by_key.get(key).copied() {
            Some(slot) => self.dispatch_shared(slot, msg, None, 0),
            None => self.services.metrics.drop_msg(DropReason::Offline, 1),
        }
    }

    /// Owner: gives `msg` to the next member of group `slot` (not `exclude` if another
    /// is there), here or on the member's home shard.
    fn dispatch_shared(
        &mut self,
        slot: usize,
        msg: &Arc<Message>,
        exclude: Option<&str>,
        attempts: u8,
    ) {
        let Some(g) = self.routing.shared.groups.get_mut(slot) else {
            return;
        };
        let n = g.members.len();
        if n == 0 {
            return;
        }
        let mut i = g.next % n;
        if n > 1 && exclude == Some(&*g.members[i].client_id) {
            i = (i + 1) % n;
        }
        g.next = i + 1;
        let m = &g.members[i];
        let d = SharedDelivery {
            key: g.key.clone(),
            client_id: m.client_id.clone(),
            msg: msg.clone(),
            qos: msg.qos.min(m.options & 3),
            retain: msg.retain && m.options & 0b1000 != 0,
            sub_id: m.sub_id,
            attempts,
        };
        let shard = m.shard;
        if shard == self.id {
            self.on_deliver_shared(d);
        } else {
            self.routing.ctl_outbox[shard].push_back(ShardMsg::DeliverShared(Box::new(d)));
        }
    }

    /// Member's home shard: delivers a group's message, or bounces it to the owner when
    /// the client is no member (any more).
    pub(super) fn on_deliver_shared(&mut self, d: SharedDelivery) {
        let member = self.sessions.find(&d.client_id).filter(|&skey| {
            self.sessions[skey as usize]
                .subs
                .iter()
                .any(|(f, ..)| f.strip_prefix("$share/") == Some(&*d.key))
        });
        let Some(skey) = member else {
            self.bounce(d.key, d.client_id, d.msg, d.attempts.saturating_add(1));
            return;
        };
        let item = Queued {
            msg: d.msg,
            qos: d.qos,
            retain: d.retain,
            sub_ids: (d.sub_id != 0).then(|| Box::from([d.sub_id])),
            shared: (d.qos > 0).then_some(d.key),
            waiter: None,
            seq: 0,
            dup: false,
        };
        self.deliver_item(skey as usize, item);
    }

    /// Owner: a message a member gave back goes to another member; the member that gave
    /// it back is no member any more.
    pub(super) fn on_shared_bounce(&mut self, b: SharedBounce) {
        self.on_shared_leave(&b.key, &b.from);
        let slot = self.routing.shared.by_key.get(&b.key).copied();
        match slot {
            Some(slot) if b.attempts < MAX_ATTEMPTS => {
                self.dispatch_shared(slot, &b.msg, Some(&b.from), b.attempts)
            }
            _ => self.services.metrics.drop_msg(DropReason::Offline, 1),
        }
    }
}
