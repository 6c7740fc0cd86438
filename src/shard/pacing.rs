//! Flow control per publisher (`[buffers] slow_consumer = "pace"`, the default): a burst
//! loses nothing, and a slow subscriber slows only the publishers whose messages reach it.
//!
//! **Congestion.** A connection is *congested* while its unsent output is above the high
//! watermark or its session's QoS 1/2 queue holds `pace_queued_messages` or more (it
//! does not acknowledge fast enough); it stops being congested once its output is back
//! under the low watermark and its queue under half the mark ([`Shard::settle_congestion`]).
//!
//! **Pacing.** Every message delivered to a congested connection *paces* its publisher
//! (a device session, `Origin::Device`): the pair (connection, publisher) is recorded
//! once, and the publisher's shard counts, per session, the congested connections that
//! pace it. A session with a count is *paced*: the next PUBLISH of its connection is not
//! handled and the connection's later bytes wait (`held`, then TCP carries the wait back
//! to the device), while the acknowledgements and PINGREQs behind it are still handled
//! (`read.rs`, up to the high watermark of held bytes), so a paced client that is also a
//! subscriber keeps acknowledging and cannot pace itself, or a peer pacing it, for ever.
//! When the connection drains or closes it releases its publishers; a session whose
//! count drops to zero has its connection read again at once (no polling).
//!
//! **Across shards.** The counts of another shard's sessions change by messages
//! ([`ShardMsg::Pace`]): the changes of one turn are summed per session and sent once at
//! the end of the turn; a change that finds the mailbox full is kept and merged with the
//! next, never dropped, so every +1 is matched by a -1. The publisher's shard learns of a
//! congestion a turn or two late and may read up to 16 reads of 64 KiB from the
//! publisher meanwhile, and every publisher gets one message in before it is paced:
//! `outbound_max_bytes` (QoS 0) and `paced_max_queued_messages`, the queue bound of a
//! connected session (QoS 1/2), absorb that slack.
//!
//! **Whole shard.** While this shard's batch for another shard waits (that shard's
//! mailbox is full, or holds `mailbox_max_bytes` of messages), no PUBLISH is read on this
//! shard at all: the next shard is the congested subscriber.
//!
//! **Ends.** A connection congested for `write_stall_timeout_secs` without getting back
//! under is closed as `slow_consumer` (`write.rs` keeps its stall clock running while it
//! is congested), which releases the publishers it paced. A publisher's session key may
//! be reused after the session ends: a count left for it paces the new session until the
//! congested connections release it, at most the stall timeout.

use hashbrown::{HashMap, HashSet};

use crate::mailbox::ShardMsg;
use crate::message::Origin;
use crate::metrics::ShardMetrics;

use super::Shard;

/// A device session that publishes, as its messages name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Publisher {
    shard: u16,
    session: u32,
}

/// The shard's pacing state: its congested connections and the publishers they pace,
/// and its own sessions that are paced.
#[derive(Default)]
pub(super) struct Pacing {
    /// Per congested connection of this shard: the publishers its deliveries paced.
    by_conn: HashMap<u32, Vec<Publisher>>,
    /// The (connection, publisher) pairs in `by_conn`, so each is counted once.
    edges: HashSet<(u32, Publisher)>,
    /// Per session of this shard: the congested connections (anywhere) pacing it.
    paced: HashMap<u32, u32>,
    /// Changes to the counts of each other shard's sessions, sent once per turn.
    out: Vec<HashMap<u32, i32>>,
    /// Connections of this shard not read at a PUBLISH, with when (ns) they stopped.
    held: HashMap<u32, u64>,
    /// Sessions released since the held connections were last looked at.
    released: Vec<u32>,
    /// Look at every held connection again (the outbox to another shard unblocked).
    recheck_all: bool,
    /// Congested connections on this shard.
    pub congested: u32,
}

impl Pacing {
    pub(super) fn new(shards: usize) -> Self {
        Pacing {
            out: vec![HashMap::new(); shards],
            ..Default::default()
        }
    }

    /// Connections held at a PUBLISH (the `gateway_paced_publishers` gauge).
    pub(super) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// True if connection `key` is held at a PUBLISH.
    pub(super) fn is_held(&self, key: usize) -> bool {
        self.held.contains_key(&(key as u32))
    }

    /// True if held connections wait to be looked at again (`resume_released`): the
    /// loop must turn again at once rather than wait for a socket or the tick.
    pub(super) fn resume_pending(&self) -> bool {
        !self.released.is_empty() || self.recheck_all
    }

    /// True if any session of this shard is paced.
    pub(super) fn any_paced(&self) -> bool {
        !self.paced.is_empty()
    }

    fn is_paced(&self, session: u32) -> bool {
        self.paced.contains_key(&session)
    }

    /// Adds `delta` to the count of `session`; a count back at zero is released.
    fn apply(&mut self, session: u32, delta: i32) {
        let n = self.paced.get(&session).copied().unwrap_or(0);
        let n = n.saturating_add_signed(delta);
        if n == 0 {
            if self.paced.remove(&session).is_some() {
                self.released.push(session);
            }
        } else {
            self.paced.insert(session, n);
        }
    }
}

impl Shard {
    /// A message from `origin` was just delivered to (or queued for) the session of
    /// connection `ckey`: if that connection is congested, its publisher is paced by it.
    pub(super) fn pace_publisher(&mut self, ckey: usize, origin: Origin) {
        let Origin::Device { shard, session } = origin else {
            return;
        };
        if !self.wire.conns.get(ckey).is_some_and(|c| c.congested) {
            return;
        }
        let p = Publisher { shard, session };
        if !self.pacing.edges.insert((ckey as u32, p)) {
            return;
        }
        self.pacing.by_conn.entry(ckey as u32).or_default().push(p);
        self.change_pace(p, 1);
    }

    fn change_pace(&mut self, p: Publisher, delta: i32) {
        let shard = usize::from(p.shard);
        if shard == self.id {
            self.pacing.apply(p.session, delta);
        } else if let Some(out) = self.pacing.out.get_mut(shard) {
            *out.entry(p.session).or_default() += delta;
        }
    }

    /// Another shard's changes to the counts of this shard's sessions.
    pub(super) fn on_pace(&mut self, changes: Vec<(u32, i32)>) {
        for (session, delta) in changes {
            self.pacing.apply(session, delta);
        }
    }

    /// Sends the turn's count changes to the other shards; true if some must wait for
    /// room in a mailbox (they are kept and merged with the next turn's).
    pub(super) fn flush_pace(&mut self) -> bool {
        let mut waiting = false;
        for shard in 0..self.pacing.out.len() {
            let out = &mut self.pacing.out[shard];
            out.retain(|_, d| *d != 0);
            if out.is_empty() {
                continue;
            }
            let changes: Vec<(u32, i32)> = out.iter().map(|(&s, &d)| (s, d)).collect();
            match self
                .services
                .mailboxes
                .try_send(shard, ShardMsg::Pace(changes))
            {
                Ok(()) => self.pacing.out[shard].clear(),
                Err(_) => waiting = true,
            }
        }
        waiting
    }

    /// Marks connection `key` congested (its output went above the high watermark or its
    /// queue to the mark) and starts its stall clock: it must get back under within
    /// `write_stall_timeout_secs`.
    pub(super) fn note_congested(&mut self, key: usize) {
        if !self.settings.pace {
            return;
        }
        let conn = &mut self.wire.conns[key];
        if conn.congested {
            return;
        }
        conn.congested = true;
        self.pacing.congested += 1;
        if conn.stall_since == 0 {
            self.start_stall_clock(key);
        }
    }

    /// Connection `key` is no longer congested if its output is under the low watermark
    /// and its queue under half the mark: it releases the publishers it paced.
    pub(super) fn settle_congestion(&mut self, key: usize) {
        let Some(conn) = self.wire.conns.get(key).filter(|c| c.congested) else {
            return;
        };
        if conn.outbound_len() > self.settings.low_watermark {
            return;
        }
        let queued = conn
            .session
            .and_then(|s| self.sessions.get(s.index()))
            .map_or(0, |s| s.queued_len());
        if queued > self.settings.pace_queued / 2 {
            return;
        }
        let conn = &mut self.wire.conns[key];
        conn.congested = false;
        conn.stall_since = 0;
        self.pacing.congested -= 1;
        self.release_pacers(key);
    }

    /// Connection `key` is closing: if congested, it no longer is.
    pub(super) fn forget_congestion(&mut self, key: usize) {
        if std::mem::take(&mut self.wire.conns[key].congested) {
            self.pacing.congested -= 1;
            self.release_pacers(key);
        }
        self.unhold(key);
    }

    /// The publishers connection `key` paced no longer wait for it.
    fn release_pacers(&mut self, key: usize) {
        let Some(list) = self.pacing.by_conn.remove(&(key as u32)) else {
            return;
        };
        for p in list {
            self.pacing.edges.remove(&(key as u32, p));
            self.change_pace(p, -1);
        }
    }

    /// True when connection `key` must not have a PUBLISH handled now: its session is
    /// paced, or this shard's messages for another shard wait for room, or its changes
    /// for the store writer are past their bound (whatever `slow_consumer` says).
    pub(super) fn publish_paced(&self, key: usize) -> bool {
        if self.store_backlogged() {
            return true;
        }
        if !self.settings.pace {
            return false;
        }
        if self.routing.outbox_blocked || self.fleet_backlogged() {
            return true;
        }
        self.pacing.any_paced()
            && self
                .wire
                .conns
                .get(key)
                .and_then(|c| c.session)
                .is_some_and(|s| self.pacing.is_paced(s.index() as u32))
    }

    /// True when frames must be asked about one by one (rate limits, or some publisher
    /// may have to be held).
    pub(super) fn gate_frames(&self) -> bool {
        self.settings.inbound.enabled()
            || (self.settings.pace
                && (self.routing.outbox_blocked
                    || self.pacing.any_paced()
                    || self.fleet_backlogged()))
            || self.store_backlogged()
    }

    /// True if what connection `key` has read but not handled starts with a PUBLISH:
    /// frames held at a pause, or else the start of a frame larger than one read.
    pub(super) fn holds_publish(&self, key: usize) -> bool {
        self.wire
            .conns
            .get(key)
            .filter(|c| c.state == super::ConnState::Active)
            .and_then(|c| c.bufs.as_ref())
            .and_then(|b| b.held.first().or(b.inbuf.first()))
            .is_some_and(|&b| super::packet::type_of(b) == super::packet::PUBLISH)
    }

    /// Stops handling connection `key`'s PUBLISH packets until it is no longer paced.
    pub(super) fn hold_publisher(&mut self, key: usize) {
        let now = self.clock.now_ns();
        if self.pacing.held.try_insert(key as u32, now).is_ok() {
            ShardMetrics::add(&self.services.metrics.publisher_pauses, 1);
        }
    }

    /// Connection `key` is no longer held (resumed or closing): its pause is counted.
    fn unhold(&mut self, key: usize) {
        if let Some(since) = self.pacing.held.remove(&(key as u32)) {
            let ns = self.clock.now_ns().saturating_sub(since);
            ShardMetrics::add(&self.services.metrics.publisher_pause_ns, ns);
        }
    }

    /// The outbox to the other shards is no longer blocked: look at every held publisher.
    pub(super) fn outbox_unblocked(&mut self) {
        self.pacing.recheck_all = true;
    }

    /// Reads again the held connections that are no longer paced: those of the sessions
    /// released since the last look (or all of them after the outbox unblocked).
    pub(super) fn resume_released(&mut self) {
        let keys: Vec<u32> = if std::mem::take(&mut self.pacing.recheck_all) {
            self.pacing.released.clear();
            self.pacing.held.keys().copied().collect()
        } else if self.pacing.released.is_empty() {
            return;
        } else {
            let released = std::mem::take(&mut self.pacing.released);
            released
                .into_iter()
                .filter_map(|s| self.sessions.get(s as usize).and_then(|s| s.conn))
                .map(|c| c.index() as u32)
                .filter(|k| self.pacing.held.contains_key(k))
                .collect()
        };
        for key in keys {
            let key = key as usize;
            if !self.publish_paced(key) {
                self.unhold(key);
                self.resume(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pair_up_and_release_at_zero() {
        let mut p = Pacing::new(2);
        p.apply(7, 1);
        p.apply(7, 1);
        assert!(p.is_paced(7));
        p.apply(7, -1);
        assert!(p.is_paced(7));
        assert!(p.released.is_empty());
        p.apply(7, -1);
        assert!(!p.is_paced(7));
        assert_eq!(p.released, [7]);
        // A late release of an unknown session changes nothing.
        p.apply(8, -1);
        assert!(!p.is_paced(8));
        assert_eq!(p.released, [7]);
    }
}
