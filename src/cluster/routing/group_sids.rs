//! The shared groups' queue subscriptions of the groups connection: subscription id →
//! group key (`{group}/{filter}`), which the reader looks up to tell a group's message
//! from a subscriber's.
//!
//! A member leaving a group unsubscribes one of its node's queue subscriptions while
//! NATS may already have sent messages on it (in the socket, or in the reader's buffer).
//! Such a message is still the group's: the node gives it to another member, or counts
//! it `offline`. So an unsubscribed id stays known until the server has answered a PING
//! written after its UNSUB: the server writes to a connection in order, so once that
//! PONG is read, nothing more can arrive on the id. Ids are never reused on a
//! connection, and a new connection starts from an empty table.
//!
//! It also counts the connection's PINGs, the keep-alive ones (`keepalive`) included,
//! and keeps the shards' subscribe barriers (`Interest::Barrier`) until the PONG of the
//! PING written after them: the SUBs written before it are then in force.
//!
//! Invariant: `retiring` is in PING order, and every PING written on the connection
//! after its handshake goes through [`GroupSids::ping`], so the n-th PONG read answers
//! PING n.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

#[derive(Default)]
pub(super) struct GroupSids {
    keys: HashMap<u64, Arc<str>>,
    /// Unsubscribed ids, each with the number of the PING written after its UNSUB.
    retiring: VecDeque<(u64, u64)>,
    /// Barriers (shard, ticket), each with the number of the PING written after it.
    barriers: VecDeque<(u64, u16, u64)>,
    pings: u64,
    pongs: u64,
}

impl GroupSids {
    pub(super) fn insert(&mut self, sid: u64, key: Arc<str>) {
        self.keys.insert(sid, key);
    }

    /// The group of a message that arrived on `sid`, if it is a group's subscription.
    pub(super) fn group(&self, sid: u64) -> Option<Arc<str>> {
        self.keys.get(&sid).cloned()
    }

    /// Ids known, retiring ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// `sids` were just unsubscribed in `out`: writes the PING after which they are
    /// forgotten (when any of them is a group's).
    pub(super) fn retire(&mut self, sids: impl IntoIterator<Item = u64>, out: &mut BytesMut) {
        let ping = self.pings + 1;
        let before = self.retiring.len();
        (self.retiring).extend(
            sids.into_iter()
                .filter(|s| self.keys.contains_key(s))
                .map(|s| (ping, s)),
        );
        if self.retiring.len() > before {
            self.ping(out);
        }
    }

    /// `barriers` follow the SUBs just written to `out`: writes the PING whose PONG
    /// confirms them.
    pub(super) fn barrier(&mut self, barriers: Vec<(u16, u64)>, out: &mut BytesMut) {
        let ping = self.pings + 1;
        (self.barriers).extend(barriers.into_iter().map(|(s, t)| (ping, s, t)));
        self.ping(out);
    }

    /// The barriers not confirmed yet, taken (the connection ended).
    pub(super) fn take_barriers(&mut self) -> Vec<(u16, u64)> {
        self.barriers.drain(..).map(|(_, s, t)| (s, t)).collect()
    }

    /// Writes a PING to `out`.
    pub(super) fn ping(&mut self, out: &mut BytesMut) {
        self.pings += 1;
        out.put_slice(b"PING\r\n");
    }

    /// The server answered the next PING: forgets the ids unsubscribed before it, and
    /// gives the barriers it confirms.
    pub(super) fn ponged(&mut self) -> Vec<(u16, u64)> {
        self.pongs += 1;
        while let Some(&(ping, sid)) = self.retiring.front() {
            if ping > self.pongs {
                break;
            }
            self.retiring.pop_front();
            self.keys.remove(&sid);
        }
        let mut done = Vec::new();
        while let Some(&(ping, shard, ticket)) = self.barriers.front() {
            if ping > self.pongs {
                break;
            }
            self.barriers.pop_front();
            done.push((shard, ticket));
        }
        done
    }

    /// A new connection: nothing subscribed, nothing pinged.
    pub(super) fn clear(&mut self) {
        *self = GroupSids::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsubscribed_group_id_is_known_until_the_pong_of_the_ping_after_it() {
        let (mut g, mut out) = (GroupSids::default(), BytesMut::new());
        for sid in 1..=3 {
            g.insert(sid, Arc::from("g/a"));
        }
        g.retire([3], &mut out);
        assert_eq!(&out[..], b"PING\r\n");
        g.retire([2, 9], &mut out);
        // 9 is no group's: nothing to keep, but 2 is.
        assert_eq!(out.len(), 12);
        g.retire([9], &mut out);
        assert_eq!(out.len(), 12, "no PING for ids that are no group's");
        // A keep-alive PING between them is answered in turn.
        g.ping(&mut out);
        assert!(g.group(3).is_some() && g.group(2).is_some());
        g.ponged();
        assert_eq!((g.group(3), g.group(2).is_some()), (None, true));
        g.ponged();
        assert_eq!((g.group(2), g.len()), (None, 1));
        g.ponged();
        assert_eq!((g.len(), g.pongs), (1, 3));
        assert!(g.group(1).is_some());
        g.clear();
        assert_eq!(g.len(), 0);
    }

    /// A barrier is confirmed by the PONG of the PING written after it, in PING order
    /// with the other PINGs; those of a connection that ended are all given back.
    #[test]
    fn barriers_are_confirmed_by_the_pong_of_their_ping() {
        let (mut g, mut out) = (GroupSids::default(), BytesMut::new());
        g.ping(&mut out);
        g.barrier(vec![(0, 1), (1, 1)], &mut out);
        g.barrier(vec![(0, 2)], &mut out);
        assert_eq!(&out[..], b"PING\r\nPING\r\nPING\r\n");
        assert_eq!(
            g.ponged(),
            [],
            "the keep-alive PING's answer confirms nothing"
        );
        assert_eq!(g.ponged(), [(0, 1), (1, 1)]);
        g.barrier(vec![(1, 2)], &mut out);
        assert_eq!(g.ponged(), [(0, 2)]);
        assert_eq!(g.take_barriers(), [(1, 2)]);
        assert_eq!(g.ponged(), []);
    }
}
