//! The shard's sessions: the slab they live in, the client-id index that finds them and
//! the client ids in order (for paging through `GET /v1/clients`), kept in step (a
//! session is in both indexes exactly while it is in the slab).

use std::collections::BTreeSet;
use std::ops::{Bound, Index, IndexMut};
use std::sync::Arc;

use slab::Slab;

use crate::codec::Version;
use crate::session::{ClientIds, Session};

#[derive(Default)]
pub(super) struct Sessions {
    slab: Slab<Session>,
    by_client: ClientIds,
    /// The client ids in order (shares the session's `Arc`: about 26 bytes a session,
    /// measured for a million random ids).
    ordered: BTreeSet<Arc<str>>,
    /// Messages queued in all sessions (the `queued_messages` gauge).
    pub queued_total: u64,
}

impl Sessions {
    /// The key of `client_id`'s session.
    pub(super) fn find(&self, client_id: &str) -> Option<u32> {
        self.by_client.get(client_id, &self.slab)
    }

    /// A new, empty session for `client_id` (which has none).
    pub(super) fn open(&mut self, client_id: &str, v: Version) -> usize {
        let skey = self.slab.insert(Session::new(Arc::from(client_id), v));
        self.by_client.insert(skey as u32, &self.slab);
        self.ordered.insert(self.slab[skey].client_id.clone());
        skey
    }

    /// Takes session `skey` out of the slab and the index.
    pub(super) fn remove(&mut self, skey: usize) -> Option<Session> {
        let id = self.slab.get(skey)?.client_id.clone();
        // The index compares against the session's own id: remove it first.
        self.by_client.remove(&id, &self.slab);
        self.ordered.remove(&id);
        Some(self.slab.remove(skey))
    }

    pub(super) fn get(&self, skey: usize) -> Option<&Session> {
        self.slab.get(skey)
    }

    pub(super) fn get_mut(&mut self, skey: usize) -> Option<&mut Session> {
        self.slab.get_mut(skey)
    }

    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Every session with its key, in slab order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &Session)> {
        self.slab.iter()
    }

    /// The client ids after `after` (all of them for `None`), in order.
    pub(super) fn ids_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.ordered.range::<str, _>((from, Bound::Unbounded))
    }
}

impl Index<usize> for Sessions {
    type Output = Session;
    fn index(&self, skey: usize) -> &Session {
        &self.slab[skey]
    }
}

impl IndexMut<usize> for Sessions {
    fn index_mut(&mut self, skey: usize) -> &mut Session {
        &mut self.slab[skey]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_the_slab() {
        let mut s = Sessions::default();
        let a = s.open("a", Version::V5);
        let b = s.open("b", Version::V311);
        assert_eq!(s.find("a"), Some(a as u32));
        assert_eq!(s.find("b"), Some(b as u32));
        assert_eq!(s.remove(a).map(|x| x.client_id), Some(Arc::from("a")));
        assert_eq!(s.find("a"), None);
        assert!(s.remove(a).is_none());
        assert_eq!(s.len(), 1);
        assert_eq!(&*s[b].client_id, "b");
        let c = s.open("c", Version::V5);
        let after = |s: &Sessions, x| s.ids_after(x).map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(after(&s, None), ["b", "c"]);
        assert_eq!(after(&s, Some("b")), ["c"]);
        assert_eq!(after(&s, Some("a")), ["b", "c"]);
        s.remove(c);
        assert_eq!(after(&s, Some("b")), Vec::<String>::new());
    }
}
