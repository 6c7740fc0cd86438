//! Rejoining the fleet after NATS was away: every device online here is written into the
//! registry again, arbitrated like a claim (`super::arbiter`) instead of overwriting.
//!
//! While this node could not reach NATS, its registry writes failed, and another node
//! may have claimed one of its devices (the device, or another with the same client id,
//! connected there). For each device online here the entry is read again:
//!
//! - no entry (or a deleted one): it is created by compare-and-set;
//! - this node's: nothing to do;
//! - another node's: the two connections are compared by the time each was accepted
//!   (`connected_at`: whole seconds, the start of the tick it was accepted in, `[shards]
//!   tick_ms`, the same on every shard of a node;
//!   equal: the larger node id), asking that node on its
//!   `client` subject. The later one wins, as in a takeover: if it is this node's, the
//!   entry is claimed on top of the other's revision and the other node is asked to close
//!   its connection; otherwise this node closes its own (MQTT 5 0x8E, without the will).
//!   A node that does not answer (gone) has no connection to compare.
//!
//! A lookup that fails (NATS away again, no answer, a shard that cannot be asked) marks
//! the registry dirty, so the next lease renewal tries again. The rejoin runs in its own
//! task, so the lease is renewed meanwhile however many devices it has to write.
//!
//! **After the registry queue overflowed** (`super::registry`) the devices whose
//! `connected` was dropped are not in the set of devices here, so a rejoin of that set
//! would not find them: [`Fleet::register_missed`] asks the shards which devices are
//! online, a page at a time (`ListClients`), and writes each one not in the set as a
//! rejoin would (its home shard says it is online; another node's entry is arbitrated).
//! A device that went offline since it was listed may be left in the set with an entry
//! naming this node: pushes from other nodes are then answered here, truthfully, and the
//! entry goes with the device's next connection on another node (whose takeover request
//! takes it out of the set).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::mailbox::{home_shard, ClientSummary, ListRequest, Mailboxes, Page, ShardMsg};

use super::arbiter::{read, write};
use super::home::{ask_shard, client_info};
use super::registry::key;
use super::{Fleet, RequestError, Service};

/// Devices rejoined at the same time.
const CHUNK: usize = 100;
/// Reads again after a lost compare-and-set at most this often.
const ATTEMPTS: u32 = 4;
/// Sessions listed per page when looking for the devices an overflow missed.
const PAGE: usize = 1_000;
/// Looks again this long after a listing failed, or after a pass while changes keep
/// being dropped.
const RETRY: Duration = Duration::from_secs(1);
/// How far a shard's `connected_at` (whole seconds from the shards' common start on their
/// tick clock) may run ahead of the Unix time of its `connected` change (the wall clock
/// stepped back since the shards started).
const CLOCK_SLACK_SECS: u64 = 2;

/// When a connection was accepted (UNIX seconds) and on which node.
type Stamp<'a> = (u64, &'a str);

impl Fleet {
    /// Writes every device online here into the registry again, each arbitrated against
    /// another node's claim (module doc); how many devices were looked at.
    pub(super) async fn rejoin(self: &Arc<Self>, shards: &Mailboxes) -> usize {
        let ids = self.registry.online_here();
        for chunk in ids.chunks(CHUNK) {
            if self.stop.is_cancelled() {
                break;
            }
            let each = chunk.iter().map(|id| self.rejoin_one(id.clone(), shards));
            futures_util::future::join_all(each).await;
        }
        ids.len()
    }

    async fn rejoin_one(self: &Arc<Self>, client_id: Arc<str>, shards: &Mailboxes) {
        // Out of the set while its shard is asked, back in if online: a `connected`
        // applied meanwhile puts it back too, so a reconnect is never left out (a
        // `disconnected` applied meanwhile may leave it in: a push then asks its shard).
        let was_here = self.registry.left(&client_id);
        match accepted_here(shards, &client_id).await {
            Ok(Some(mine)) => {
                self.registry.set_here(&client_id, true);
                self.arbitrate(client_id, mine, shards).await;
            }
            // Gone since (its `disconnected` dropped, or on its way).
            Ok(None) => {}
            Err(()) => {
                self.registry.set_here(&client_id, was_here);
                self.registry.mark_dirty();
            }
        }
    }

    /// After each overflow of the registry queue, until stopped: writes the devices
    /// online on the shards that the set of devices here misses (module doc), at most
    /// one pass a [`RETRY`] while changes keep being dropped.
    pub(super) async fn register_missed(self: Arc<Self>, shards: Mailboxes) {
        loop {
            tokio::select! {
                _ = self.registry.overflowed() => {}
                _ = self.stop.cancelled() => return,
            }
            let Some(n) = self.register_online_missing(&shards).await else {
                return;
            };
            tracing::info!(node = %self.node, devices = n, "cluster: devices the registry queue missed written to the registry again");
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Lists each shard's online sessions a page at a time and writes those not in the
    /// set of devices here that connected before the newest dropped change (a later
    /// one's `connected` is still queued); a shard that cannot be asked is asked again
    /// from where it stopped, [`RETRY`] later. How many it wrote; `None` when stopping.
    async fn register_online_missing(self: &Arc<Self>, shards: &Mailboxes) -> Option<usize> {
        let up_to_secs = self.registry.dropped_up_to_ms() / 1000 + CLOCK_SLACK_SECS;
        let mut pages: Vec<OnlinePages> = (0..shards.len()).map(OnlinePages::of).collect();
        let mut written = 0;
        loop {
            let mut failed = false;
            for shard in &mut pages {
                loop {
                    if self.stop.is_cancelled() {
                        return None;
                    }
                    let online = match shard.next(shards).await {
                        Ok(Some(online)) => online,
                        Ok(None) => break,
                        Err(()) => {
                            failed = true;
                            break;
                        }
                    };
                    let missing: Vec<Arc<str>> = (online.iter())
                        .filter(|c| c.connected_at.is_some_and(|t| t <= up_to_secs))
                        .filter(|c| !self.registry.is_here(&c.client_id))
                        .map(|c| Arc::from(c.client_id.as_str()))
                        .collect();
                    for chunk in missing.chunks(CHUNK) {
                        let each = chunk.iter().map(|id| self.register_one(id.clone(), shards));
                        let done = futures_util::future::join_all(each).await;
                        written += done.into_iter().filter(|&w| w).count();
                    }
                }
            }
            if !failed {
                return Some(written);
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = self.stop.cancelled() => return None,
            }
        }
    }

    /// A device listed online but missing here: into the set, and into the registry;
    /// whether it was still online.
    async fn register_one(self: &Arc<Self>, client_id: Arc<str>, shards: &Mailboxes) -> bool {
        match accepted_here(shards, &client_id).await {
            Ok(Some(mine)) => {
                self.registry.set_here(&client_id, true);
                self.arbitrate(client_id, mine, shards).await;
                true
            }
            Ok(None) => false,
            Err(()) => {
                self.registry.mark_overflowed();
                false
            }
        }
    }

    /// Writes `client_id`, accepted here at `mine`, into the registry unless another
    /// node's entry names a later connection (module doc).
    async fn arbitrate(self: &Arc<Self>, client_id: Arc<str>, mine: u64, shards: &Mailboxes) {
        let (k, node, metrics) = (key(&client_id), &*self.node, &self.registry.metrics);
        for _ in 0..ATTEMPTS {
            let Ok((revision, holder)) = read(&self.registry.clients, &k, metrics).await else {
                return self.registry.mark_dirty();
            };
            if let Some(other) = holder.as_deref().filter(|h| *h != node) {
                let theirs = match self.accepted_there(other, &client_id).await {
                    Ok(t) => t,
                    Err(()) => return self.registry.mark_dirty(),
                };
                if !later((mine, node), theirs.map(|t| (t, other))) {
                    return self.lost_while_away(client_id, shards);
                }
            } else if holder.is_some() {
                return;
            }
            match write(&self.registry.clients, &k, node, revision, metrics).await {
                Ok(true) => {
                    if let Some(other) = holder.filter(|h| h != node) {
                        tokio::spawn(self.clone().take_over(other, client_id));
                    }
                    return;
                }
                Ok(false) => continue,
                Err(_) => return self.registry.mark_dirty(),
            }
        }
    }

    /// When `node` accepted its connection of `client_id`: `Ok(None)` when it has none
    /// (or is gone), `Err` when it cannot be asked now.
    async fn accepted_there(&self, node: &str, client_id: &str) -> Result<Option<u64>, ()> {
        let payload = Bytes::copy_from_slice(client_id.as_bytes());
        match self
            .request(node, Service::Client, payload, self.request_timeout)
            .await
        {
            Ok(bytes) => {
                let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let info = &answer["info"];
                Ok(info["connected_at"]
                    .as_u64()
                    .filter(|_| info["online"] == true))
            }
            Err(RequestError::NoResponders) => Ok(None),
            Err(_) => Err(()),
        }
    }

    /// Another node's later connection holds `client_id`: this node's is closed.
    fn lost_while_away(&self, client_id: Arc<str>, shards: &Mailboxes) {
        tracing::info!(%client_id, node = %self.node, "cluster: another node accepted this client id later while NATS was away; closing the connection here");
        if self.registry.left(&client_id) {
            self.registry.metrics.lost.inc();
        }
        let home = home_shard(&client_id, shards.len());
        let msg = ShardMsg::TakenOver {
            client_id: client_id.to_string(),
        };
        let _ = shards.try_send(home, msg);
    }
}

/// Whether the connection stamped `mine` came after `theirs` (none: it wins).
fn later(mine: Stamp, theirs: Option<Stamp>) -> bool {
    theirs.is_none_or(|t| mine > t)
}

/// When this node's home shard accepted `client_id`'s live connection, if it has one
/// (`Err`: the shard could not be asked).
async fn accepted_here(shards: &Mailboxes, client_id: &str) -> Result<Option<u64>, ()> {
    let info = client_info(shards, client_id).await?;
    Ok(info.and_then(|i| i.summary.connected_at.filter(|_| i.summary.online)))
}

/// A shard's online sessions, a page at a time, in client id order.
struct OnlinePages {
    shard: usize,
    /// Where the next page starts (after this client id); `None` with `done`: the end.
    after: Option<Arc<str>>,
    done: bool,
}

impl OnlinePages {
    fn of(shard: usize) -> OnlinePages {
        OnlinePages {
            shard,
            after: None,
            done: false,
        }
    }

    /// The next page (possibly empty: the shard looked at `10 × PAGE` sessions), or
    /// `None` once the shard has shown them all.
    async fn next(&mut self, shards: &Mailboxes) -> Result<Option<Vec<ClientSummary>>, ()> {
        if self.done {
            return Ok(None);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = ListRequest {
            after: self.after.clone(),
            limit: PAGE,
            scan: 10 * PAGE,
            bytes: usize::MAX,
        };
        let ask = ShardMsg::ListClients {
            req,
            online: Some(true),
            reply,
        };
        let page: Page<ClientSummary> = ask_shard(shards, self.shard, ask, answer).await?;
        match page.covered {
            Some(last) => self.after = Some(last),
            None => self.done = true,
        }
        Ok(Some(page.items))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::Bound::{Excluded, Unbounded};
    use std::sync::Arc;

    use super::{later, OnlinePages};
    use crate::mailbox::{ClientSummary, Mailboxes, ShardMsg};
    use crate::shard::list_page;

    fn summary(id: &str) -> ClientSummary {
        ClientSummary {
            client_id: id.to_string(),
            online: true,
            protocol_version: Some(4),
            keep_alive: Some(60),
            connected_at: Some(1),
            peer: None,
            shard: 0,
            queued_messages: 0,
            inflight_messages: 0,
            session_expiry_secs: 0,
        }
    }

    #[tokio::test]
    async fn the_pages_of_a_shard_list_each_online_session_once() {
        let (shards, mut rx) = Mailboxes::new(1, 4);
        // 2,500 online sessions, then 25,000 offline ones (more than a page may look
        // at: empty pages that are not the end), then 7 online ones.
        let mut sessions: BTreeMap<Arc<str>, bool> = BTreeMap::new();
        for i in 0..2_500 + 25_000 + 7 {
            sessions.insert(format!("d{i:06}").into(), !(2_500..27_500).contains(&i));
        }
        let online: Vec<String> = (sessions.iter())
            .filter(|(_, &on)| on)
            .map(|(id, _)| id.to_string())
            .collect();
        // The shard's side, with the shard's own paging.
        let shard = tokio::spawn(async move {
            while let Some(msg) = rx[0].recv().await {
                let ShardMsg::ListClients { req, reply, .. } = msg else {
                    continue;
                };
                let from = req.after.clone().map_or(Unbounded, Excluded);
                let keys = sessions.range((from, Unbounded)).map(|(k, _)| k);
                let page = list_page(keys, &req, |id| sessions[id].then(|| (summary(id), 0)));
                let _ = reply.send(page);
            }
        });
        let (mut pages, mut listed, mut n) = (OnlinePages::of(0), Vec::new(), 0);
        while let Some(page) = pages.next(&shards).await.unwrap() {
            listed.extend(page.into_iter().map(|c| c.client_id));
            n += 1;
        }
        assert_eq!(listed, online);
        // 1,000 + 1,000 online; 500 online and 9,500 offline looked at; 10,000 offline
        // (an empty page, not the end); the last 5,500 offline and 7 online.
        assert_eq!(n, 5);
        drop(shards);
        shard.await.unwrap();
    }

    #[test]
    fn the_later_connection_wins_and_a_tie_goes_to_the_larger_node_id() {
        assert!(later((10, "a"), None));
        assert!(later((11, "a"), Some((10, "b"))));
        assert!(!later((10, "a"), Some((11, "b"))));
        assert!(later((10, "b"), Some((10, "a"))));
        assert!(!later((10, "a"), Some((10, "b"))));
    }
}
