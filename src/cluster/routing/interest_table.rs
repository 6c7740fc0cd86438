//! This node's NATS subscriptions for its sessions' filters, on one routing connection:
//! a plain filter is subscribed while any shard holds it, a shared group's filter with
//! one queue subscription per member here (up to `cluster.shared_group_subscriptions`),
//! and all of them again, with new ids, on a new connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};

use super::{group_sids, subject, Interest};

/// One filter this node holds: how many hold it here and its NATS subscription ids.
struct Held {
    /// The shards holding a plain filter; the members here of a shared group.
    holders: u32,
    /// The subscription ids of one subscription per subject of the filter: one such set
    /// for a plain filter, one per member up to `sets_per_group` for a shared group.
    sets: Vec<Vec<u64>>,
}

/// This node's NATS subscriptions for its filters.
#[derive(Default)]
pub(super) struct InterestTable {
    filters: HashMap<Arc<str>, Held>,
    next_sid: u64,
    /// Queue subscription sets held per shared group at most
    /// (`cluster.shared_group_subscriptions`; 0 counts as 1).
    sets_per_group: usize,
    /// The queue subscriptions of shared groups: sid → group key (`{group}/{filter}`),
    /// read by the reader to tell a group's message from a subscriber's.
    pub(super) groups: SharedSids,
}

/// Subscription id → shared group key (`group_sids`), shared with the reader.
pub(super) type SharedSids = Arc<Mutex<group_sids::GroupSids>>;

impl InterestTable {
    pub(super) fn new(sets_per_group: usize) -> InterestTable {
        InterestTable {
            sets_per_group,
            ..InterestTable::default()
        }
    }

    /// Applies `change`; appends the SUB/UNSUB lines it needs to `out`.
    ///
    /// A plain filter is subscribed at its first holder (shard) and unsubscribed at its
    /// last. A shared group gets one queue subscription set per member here, up to
    /// `sets_per_group`: NATS picks uniformly among a queue group's subscriptions, so a
    /// node's share of the group's messages follows its number of members.
    pub(super) fn apply(&mut self, change: Interest, prefix: &str, out: &mut BytesMut) {
        let most = match &change {
            Interest::Add(f) | Interest::Remove(f) if f.starts_with("$share/") => {
                self.sets_per_group.max(1)
            }
            _ => 1,
        };
        match change {
            Interest::Add(filter) => {
                let wanted = match self.filters.get_mut(&filter) {
                    Some(held) => {
                        held.holders += 1;
                        held.sets.len() < most
                    }
                    None => {
                        let held = Held {
                            holders: 1,
                            sets: Vec::new(),
                        };
                        self.filters.insert(filter.clone(), held);
                        true
                    }
                };
                if wanted {
                    let sids = self.subscribe(&filter, prefix, out);
                    if let Some(held) = self.filters.get_mut(&filter) {
                        held.sets.push(sids);
                    }
                }
            }
            // Kept by the connection's writer (`Session::apply`), never given here.
            Interest::Barrier { .. } => {}
            Interest::Remove(filter) => {
                let Some(held) = self.filters.get_mut(&filter) else {
                    return;
                };
                held.holders -= 1;
                let keep = (held.holders as usize).min(most);
                let gone: Vec<Vec<u64>> = held.sets.drain(keep.min(held.sets.len())..).collect();
                if held.holders == 0 {
                    self.filters.remove(&filter);
                }
                for sid in gone.iter().flatten() {
                    out.put_slice(format!("UNSUB {sid}\r\n").as_bytes());
                }
                let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
                groups.retire(gone.into_iter().flatten(), out);
            }
        }
    }

    /// Subscribes every held filter again (a new connection), with new ids.
    pub(super) fn resubscribe(&mut self, prefix: &str, out: &mut BytesMut) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let filters: Vec<(Arc<str>, usize)> = self
            .filters
            .iter()
            .map(|(f, held)| (f.clone(), held.sets.len()))
            .collect();
        for (filter, n) in filters {
            let sets = (0..n)
                .map(|_| self.subscribe(&filter, prefix, out))
                .collect();
            if let Some(held) = self.filters.get_mut(&filter) {
                held.sets = sets;
            }
        }
    }

    /// SUBs for `filter`'s subjects; for a shared filter `$share/{group}/{f}`, queue
    /// subscriptions for `f`'s subjects in a queue group named after the group key
    /// (hex, so any group and filter is one valid name).
    fn subscribe(&mut self, filter: &str, prefix: &str, out: &mut BytesMut) -> Vec<u64> {
        let (inner, queue) = match crate::topic::parse_shared(filter) {
            Some((_, inner)) => {
                let key = &filter["$share/".len()..];
                let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
                (inner, Some((Arc::<str>::from(key), format!(" q{hex}"))))
            }
            None => (filter, None),
        };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        subject::filter_subjects(inner)
            .into_iter()
            .map(|s| {
                self.next_sid += 1;
                let sid = self.next_sid;
                let q = queue.as_ref().map_or("", |(_, q)| q.as_str());
                out.put_slice(format!("SUB {prefix}.{s}{q} {sid}\r\n").as_bytes());
                if let Some((key, _)) = &queue {
                    groups.insert(sid, key.clone());
                }
                sid
            })
            .collect()
    }

    pub(super) fn subscriptions(&self) -> usize {
        self.filters
            .values()
            .flat_map(|h| &h.sets)
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_is_subscribed_at_its_first_shard_and_unsubscribed_at_its_last() {
        let mut t = InterestTable::default();
        let mut out = BytesMut::new();
        let f: Arc<str> = "a/#".into();
        t.apply(Interest::Add(f.clone()), "p.msg", &mut out);
        assert_eq!(&out[..], b"SUB p.msg.u.a 1\r\nSUB p.msg.u.a.> 2\r\n");
        out.clear();
        t.apply(Interest::Add(f.clone()), "p.msg", &mut out);
        t.apply(Interest::Remove(f.clone()), "p.msg", &mut out);
        assert!(out.is_empty());
        assert_eq!(t.subscriptions(), 2);
        t.apply(Interest::Remove(f), "p.msg", &mut out);
        assert_eq!(&out[..], b"UNSUB 1\r\nUNSUB 2\r\n");
        assert_eq!(t.subscriptions(), 0);
    }

    #[test]
    fn a_shared_group_is_a_queue_subscription_known_by_its_sid() {
        let mut t = InterestTable::default();
        let mut out = BytesMut::new();
        t.apply(Interest::Add("$share/g/a/+".into()), "p.msg", &mut out);
        // The queue group is the hex of the group key "g/a/+".
        assert_eq!(&out[..], b"SUB p.msg.u.a.* q672f612f2b 1\r\n");
        assert_eq!(t.groups.lock().unwrap().group(1).as_deref(), Some("g/a/+"));
        out.clear();
        t.resubscribe("p.msg", &mut out);
        assert_eq!(&out[..], b"SUB p.msg.u.a.* q672f612f2b 2\r\n");
        assert!(t.groups.lock().unwrap().group(1).is_none());
        out.clear();
        // Unsubscribed, and known until the server answered the PING after it.
        t.apply(Interest::Remove("$share/g/a/+".into()), "p.msg", &mut out);
        assert_eq!(&out[..], b"UNSUB 2\r\nPING\r\n");
        assert!(t.groups.lock().unwrap().group(2).is_some());
        t.groups.lock().unwrap().ponged();
        assert_eq!(t.groups.lock().unwrap().len(), 0);
    }

    #[test]
    fn a_shared_group_holds_one_queue_subscription_per_member_up_to_the_bound() {
        let mut t = InterestTable::new(2);
        let (mut out, g): (_, Arc<str>) = (BytesMut::new(), "$share/g/a/#".into());
        for _ in 0..3 {
            t.apply(Interest::Add(g.clone()), "p.msg", &mut out);
        }
        // Two members' worth (the bound), each set one SUB per subject of `a/#`.
        let q = "q672f612f23";
        let subs = format!(
            "SUB p.msg.u.a {q} 1\r\nSUB p.msg.u.a.> {q} 2\r\nSUB p.msg.u.a {q} 3\r\nSUB p.msg.u.a.> {q} 4\r\n"
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), subs);
        assert_eq!((t.subscriptions(), t.groups.lock().unwrap().len()), (4, 4));
        out.clear();
        // Three members, two sets: the first to leave keeps both.
        t.apply(Interest::Remove(g.clone()), "p.msg", &mut out);
        assert!(out.is_empty());
        t.apply(Interest::Remove(g.clone()), "p.msg", &mut out);
        assert_eq!(&out[..], b"UNSUB 3\r\nUNSUB 4\r\nPING\r\n");
        out.clear();
        // A new connection subscribes as many sets as are held.
        t.resubscribe("p.msg", &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
        out.clear();
        t.apply(Interest::Remove(g), "p.msg", &mut out);
        assert_eq!(&out[..], b"UNSUB 5\r\nUNSUB 6\r\nPING\r\n");
        t.groups.lock().unwrap().ponged();
        assert_eq!((t.subscriptions(), t.groups.lock().unwrap().len()), (0, 0));
        // A plain filter is one set however many shards hold it.
        let f: Arc<str> = "b".into();
        t.apply(Interest::Add(f.clone()), "p.msg", &mut out);
        t.apply(Interest::Add(f), "p.msg", &mut out);
        assert_eq!(t.subscriptions(), 1);
    }
}
