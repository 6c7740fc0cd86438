//! The API's listings on a shard: a page of its sessions (`GET /v1/clients`), a page of
//! the retained messages whose topic is homed here (`GET /v1/retained`), and forgetting
//! a retained message (`DELETE /v1/retained`).
//!
//! A page is bounded work on the shard: it walks an ordered index (the sessions' client
//! ids, the retained topics) from the cursor and stops after `limit` entries, `scan` keys
//! or `bytes` of payload, whichever comes first, and says how far it looked
//! (`Page::covered`) so the API can merge the shards' pages without gaps. It only clones
//! `Arc`s; the JSON is made on the business pool.

use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::mailbox::{
    home_shard, ClientSummary, ListRequest, Page, PushOutcome, PushStatus, RetainedDeleted,
};
use crate::message::{Message, Origin};
use crate::topic;

use super::Shard;

impl Shard {
    /// The sessions after the cursor, with a live connection or not as `online` asks.
    pub(super) fn list_clients(
        &self,
        req: &ListRequest,
        online: Option<bool>,
    ) -> Page<ClientSummary> {
        let ids = self.sessions.ids_after(req.after.as_deref());
        page(ids, req, |id| {
            let skey = self.sessions.find(id)?;
            let c = self.client_summary(skey as usize);
            online.is_none_or(|o| o == c.online).then_some((c, 0))
        })
    }

    /// The retained messages after the cursor whose topic is homed on this shard (every
    /// shard holds them all; the home shard is the one that stores each), unexpired and
    /// matching `filter` if given.
    pub(super) fn list_retained(
        &self,
        req: &ListRequest,
        filter: Option<&str>,
    ) -> Page<Arc<Message>> {
        let from = req
            .after
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded);
        let topics = self
            .routing
            .retained
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(t, _)| t);
        let shards = self.services.mailboxes.len();
        let now = self.clock.now_instant;
        page(topics, req, |t| {
            let m = self.routing.retained.get(t)?;
            let listed = home_shard(t, shards) == self.id
                && !m.is_expired(now)
                && filter.is_none_or(|f| topic::matches(f, t));
            listed.then(|| (m.clone(), m.payload.len()))
        })
    }

    /// Forgets the retained message of `topic` here; the topic's home shard also deletes
    /// it from the store, as a retained PUBLISH with an empty payload would (but nothing
    /// is delivered to subscribers).
    pub(super) fn delete_retained(&mut self, topic: Arc<str>) -> RetainedDeleted {
        let existed = self.routing.retained.remove(&*topic).is_some();
        self.routing.retained_budget.remove(&topic);
        let mut committed = None;
        if home_shard(&topic, self.services.mailboxes.len()) == self.id {
            let empty = Message::new(topic, Bytes::new(), 0, true, Origin::Gateway);
            self.store_retained_msg(&Arc::new(empty), true);
            committed = self.services.store.as_mut().map(|st| {
                // Answered by the store writer after the commit that holds the delete.
                let (tx, rx) = oneshot::channel();
                let marker = PushOutcome {
                    status: PushStatus::Queued,
                    ack: None,
                };
                st.defer((tx, vec![marker]));
                rx
            });
        }
        RetainedDeleted { existed, committed }
    }
}

/// Walks `keys` in order, keeping what `pick` makes of each key (with its payload bytes),
/// until `req.limit` entries, `req.scan` keys or `req.bytes` bytes are reached.
pub(crate) fn page<'a, T>(
    keys: impl Iterator<Item = &'a Arc<str>>,
    req: &ListRequest,
    mut pick: impl FnMut(&Arc<str>) -> Option<(T, usize)>,
) -> Page<T> {
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for (looked, key) in keys.enumerate() {
        if looked >= req.scan || items.len() >= req.limit || bytes >= req.bytes {
            return Page {
                items,
                covered: last,
            };
        }
        if let Some((item, size)) = pick(key) {
            items.push(item);
            bytes += size;
        }
        last = Some(key.clone());
    }
    Page {
        items,
        covered: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(after: Option<&str>, limit: usize, scan: usize) -> ListRequest {
        ListRequest {
            after: after.map(Arc::from),
            limit,
            scan,
            bytes: usize::MAX,
        }
    }

    fn keys(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("k{i:02}"))).collect()
    }

    #[test]
    fn a_page_stops_at_its_limit_and_says_how_far_it_looked() {
        let k = keys(5);
        let p = page(k.iter(), &req(None, 2, 100), |k| Some((k.clone(), 0)));
        assert_eq!(p.items, vec![k[0].clone(), k[1].clone()]);
        assert_eq!(p.covered.as_deref(), Some("k01"));
        let p = page(k.iter(), &req(None, 10, 100), |k| Some((k.clone(), 0)));
        assert_eq!(p.items.len(), 5);
        assert!(p.covered.is_none(), "the end was reached");
    }

    #[test]
    fn a_page_stops_at_its_scan_bound_even_with_nothing_found() {
        let k = keys(50);
        let p = page(k.iter(), &req(None, 10, 8), |_| None::<((), usize)>);
        assert!(p.items.is_empty());
        assert_eq!(p.covered.as_deref(), Some("k07"));
    }

    #[test]
    fn a_page_stops_once_its_bytes_are_reached_but_holds_one_entry() {
        let k = keys(5);
        let mut r = req(None, 10, 100);
        r.bytes = 1;
        let p = page(k.iter(), &r, |k| Some((k.clone(), 1000)));
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.covered.as_deref(), Some("k00"));
    }
}
