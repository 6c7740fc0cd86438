//! The shard's side of routing messages between the nodes of a fleet
//! (`crate::cluster::routing`, only with `[cluster] enabled`): it tells the routing task
//! which filters its index holds (the first subscriber of a filter, the last one gone),
//! offers each message published here to the other nodes, and delivers the messages
//! other nodes published to its subscribers. (The fleet's retained updates arrive as
//! `ShardMsg::FleetRetained` and are decided in `retained.rs` like a device's; shared
//! groups' messages as `ShardMsg::FleetShared`, see `shared.rs`.) Nothing
//! here waits: the offer is a push on a
//! bounded lock-free queue, an interest change a send on an unbounded channel; while the
//! queue is backlogged, publishers are held as for a full outbox (`pacing.rs`).
//!
//! A SUBACK waits until the fleet can reach the subscriber ([`FleetSubacks`]; the
//! routing module doc says why): a SUBSCRIBE that reported a filter new here sends an
//! `Interest::Barrier` with the next ticket after it, and its output (the SUBACK, then
//! retained messages) is held (`held.rs`) until the routing task confirms the ticket,
//! the routing connection is down, or `cluster.request_timeout_ms` passed. So does the
//! CONNACK of a resumed session with subscriptions (one adopted from another node
//! brings its filters here).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::routing::{Interest, RouteDrop};
use crate::message::Message;
use crate::topic::Subscriber;

use super::Shard;

/// This shard's subscribe barriers: the last ticket sent, whether a filter new here was
/// reported since, and the tickets SUBACKs wait for, in order, each with the time it is
/// let go anyway. Tickets and those times only grow.
#[derive(Default)]
pub(super) struct FleetSubacks {
    ticket: u64,
    added: bool,
    waiting: VecDeque<(u64, Instant)>,
}

impl Shard {
    /// Adds `sub` to the index under `filter`; the fleet hears of a filter new here.
    pub(super) fn index_insert(&mut self, filter: &Arc<str>, sub: Subscriber) {
        let fresh = self.services.fleet_route.is_some() && !self.routing.subs.has_filter(filter);
        self.routing.subs.insert(filter, sub);
        if let (true, Some(route)) = (fresh, &self.services.fleet_route) {
            route.interest(Interest::Add(filter.clone()));
            self.fleet_subacks.added = true;
        }
    }

    /// After a SUBSCRIBE (or a CONNACK resuming a session with subscriptions) whose
    /// output starts at `out_len`: if filters new here were reported since the last
    /// barrier, a barrier follows them; if a barrier is not confirmed yet, the output
    /// waits for it. Nothing waits while the routing connection is down.
    pub(super) fn fleet_barrier(&mut self, key: usize, out_len: usize) {
        let Some(route) = &self.services.fleet_route else {
            return;
        };
        let subacks = &mut self.fleet_subacks;
        // Just reconnected, NATS may not hold the filters this shard already had yet.
        // While disconnected nothing waits, and filters added meanwhile stay to be
        // covered by the first barrier once connected.
        let connected = route.connected();
        subacks.added |= connected && !route.subscribed.ready();
        if connected && std::mem::take(&mut subacks.added) {
            subacks.ticket += 1;
            let (shard, ticket) = (self.id as u16, subacks.ticket);
            route.interest(Interest::Barrier { shard, ticket });
            let until = self.clock.now_instant + self.settings.fleet_suback_wait;
            subacks.waiting.push_back((ticket, until));
        }
        // A ticket already let go (waited out, or while the connection was down) holds
        // nothing any more: nothing would release it.
        let ticket = subacks.ticket;
        let pending = subacks.waiting.back().is_some_and(|w| w.0 == ticket);
        if pending && connected && route.subscribed.confirmed(self.id) < ticket {
            self.hold_for_fleet(key, out_len, ticket);
        }
    }

    /// Lets go the barrier tickets NATS confirmed, or that waited their time, or all of
    /// them while the routing connection is down (`held.rs` then writes their SUBACKs).
    pub(super) fn fleet_release(&mut self) {
        let Some(route) = &self.services.fleet_route else {
            return;
        };
        let waiting = &mut self.fleet_subacks.waiting;
        if waiting.is_empty() {
            return;
        }
        let confirmed = match route.connected() {
            true => route.subscribed.confirmed(self.id),
            false => u64::MAX,
        };
        let now = self.clock.now_instant;
        while let Some(&(ticket, until)) = waiting.front() {
            if ticket > confirmed && now < until {
                // The loop wakes for it even if nothing else happens.
                self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
                break;
            }
            if ticket > confirmed && confirmed != u64::MAX {
                route.metrics.subacks_waited_out.inc();
                // Counted (gateway_fleet_subacks_waited_out_total); a hung NATS would
                // otherwise log one line per new filter.
                tracing::debug!(shard = self.id, ticket, "fleet: a SUBACK waited cluster.request_timeout_ms for NATS to confirm its subscription; sent without it");
            }
            waiting.pop_front();
            self.held.fleet_released(ticket);
        }
    }

    /// Removes `session` from `filter` in the index; the fleet hears of a filter gone here.
    pub(super) fn index_remove(&mut self, filter: &str, session: u32) -> Option<u8> {
        let removed = self.routing.subs.remove(filter, session);
        if let (Some(_), Some(route)) = (removed, &self.services.fleet_route) {
            if !self.routing.subs.has_filter(filter) {
                route.interest(Interest::Remove(Arc::from(filter)));
            }
        }
        removed
    }

    /// Offers a message published on this shard to the other nodes.
    pub(super) fn offer_to_fleet(&mut self, msg: &Arc<Message>) {
        let Some(route) = &self.services.fleet_route else {
            return;
        };
        if !self.stopping {
            return route.offer(msg);
        }
        // While the routing connection is down the queue cannot drain: nothing waits
        // (what waited goes first, in order, or is counted).
        if !route.connected() {
            self.flush_fleet_backlog(false);
            if let Some(route) = &self.services.fleet_route {
                route.offer(msg);
            }
            return;
        }
        // The stop's wills: their keys in the fleet are emptied as their sessions
        // detach, so no other node would publish one the full queue refused.
        if !self.fleet_backlog.is_empty() || !route.try_offer(msg) {
            self.fleet_backlog.push_back(msg.clone());
        }
    }

    /// While stopping: offers again what the full routing queue refused, in order; true
    /// while some still waits. Once `late` (the drain deadline), or while the routing
    /// connection is down, what waits is dropped and counted
    /// (`gateway_fleet_messages_dropped_total{reason="queue_full"}`).
    pub(super) fn flush_fleet_backlog(&mut self, late: bool) -> bool {
        let Some(route) = self.services.fleet_route.as_ref() else {
            return false;
        };
        if self.fleet_backlog.is_empty() {
            return false;
        }
        let late = late || !route.connected();
        while let Some(msg) = self.fleet_backlog.front() {
            if !route.try_offer(msg) {
                if !late {
                    return true;
                }
                route.metrics.drop_msg(RouteDrop::QueueFull);
            }
            self.fleet_backlog.pop_front();
        }
        false
    }

    /// The fleet's routing queue is backlogged (`RouteHandle::backlogged`): with
    /// `slow_consumer = "pace"` no PUBLISH is read meanwhile (`publish_paced`).
    /// Remembers that it was, so the publishers it held are read again once it is not.
    pub(super) fn fleet_backlogged(&self) -> bool {
        let over = self
            .services
            .fleet_route
            .as_ref()
            .is_some_and(|r| r.backlogged());
        if over {
            self.services.fleet_paced.set(true);
        }
        over
    }

    /// At the end of a turn: true while the routing queue is backlogged (the shard looks
    /// again in a millisecond); once it drained (possibly within the turn that held a
    /// publisher), the publishers held for it are read again.
    pub(super) fn flush_fleet(&mut self) -> bool {
        let waiting = self.flush_fleet_backlog(false);
        let over = self.fleet_backlogged();
        if !over && self.services.fleet_paced.replace(false) {
            self.outbox_unblocked();
        }
        over || waiting
    }

    /// Messages published on other nodes: to this shard's matching sessions (their
    /// retained flag is not a retained update here, and shared groups are per node).
    pub(super) fn on_fleet_publish(&mut self, batch: Vec<Arc<Message>>) {
        for msg in &batch {
            self.route_subscribers(msg);
        }
    }
}
