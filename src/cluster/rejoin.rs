//! Rejoining the fleet after NATS was away or the registry queue overflowed: every device
//! online here is written into the registry again, arbitrated like a claim (`super::arbiter`)
//! instead of overwriting.
//!
//! While this node could not reach NATS, its registry writes failed, and another node
//! may have claimed one of its devices (the device, or another with the same client id,
//! connected there). For each device online here the entry is read again:
//!
//! - no entry (or a deleted one): it is created by compare-and-set;
//! - this node's: nothing to do;
//! - another node's: the two connections are compared by the time each was accepted
//!   (`connected_at`: whole seconds on the shard's clock, so to a tick, `[shards] tick_ms`;
//!   equal: the larger node id), asking that node on its
//!   `client` subject. The later one wins, as in a takeover: if it is this node's, the
//!   entry is claimed on top of the other's revision and the other node is asked to close
//!   its connection; otherwise this node closes its own (MQTT 5 0x8E, without the will).
//!   A node that does not answer (gone) has no connection to compare.
//!
//! A device the home shard no longer has online is dropped from this node's list of
//! devices here, and its entry is left as it is.
//!
//! After the registry queue overflowed, the list of devices here may miss some whose
//! `connected` was dropped: the rejoin first adds every device the shards have online
//! (`ListClients` pages, `online_on_shards`).
//!
//! A lookup that fails (NATS away again, no answer, a shard that cannot be asked) marks
//! the registry dirty, so the next lease renewal tries again.

use std::sync::Arc;

use bytes::Bytes;

use crate::mailbox::{home_shard, ListRequest, Mailboxes, ShardMsg};

use super::arbiter::{read, write};
use super::registry::key;
use super::{Fleet, RequestError, Service};

/// Devices rejoined at the same time.
const CHUNK: usize = 100;
/// Reads again after a lost compare-and-set at most this often.
const ATTEMPTS: u32 = 4;

/// When a connection was accepted (UNIX seconds) and on which node.
type Stamp<'a> = (u64, &'a str);

impl Fleet {
    /// Writes every device online here into the registry again, each arbitrated against
    /// another node's claim (module doc); how many devices were looked at.
    pub(super) async fn rejoin(self: &Arc<Self>, shards: &Mailboxes) -> usize {
        if self.registry.take_overflowed() {
            match online_on_shards(shards).await {
                Ok(ids) => self.registry.also_here(ids),
                Err(()) => self.registry.mark_overflowed(),
            }
        }
        let ids = self.registry.online_here();
        for chunk in ids.chunks(CHUNK) {
            let each = chunk.iter().map(|id| self.rejoin_one(id.clone(), shards));
            futures_util::future::join_all(each).await;
        }
        ids.len()
    }

    async fn rejoin_one(self: &Arc<Self>, client_id: Arc<str>, shards: &Mailboxes) {
        let Some(mine) = accepted_here(shards, &client_id).await else {
            // Gone since (its `disconnected` was dropped, or is still on its way).
            self.registry.left(&client_id);
            return;
        };
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

/// When this node's home shard accepted `client_id`'s live connection, if it has one.
async fn accepted_here(shards: &Mailboxes, client_id: &str) -> Option<u64> {
    let home = home_shard(client_id, shards.len());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = ShardMsg::ClientInfo {
        client_id: client_id.to_string(),
        reply,
    };
    shards.try_send(home, ask).ok()?;
    let info = answer.await.ok()??;
    info.summary.connected_at.filter(|_| info.summary.online)
}

/// Client ids listed per page when asking the shards which devices are online.
const PAGE: usize = 1_000;

/// Every client id online on the shards now, a bounded page at a time (`Err`: a shard's
/// mailbox was full or it did not answer).
async fn online_on_shards(shards: &Mailboxes) -> Result<Vec<Arc<str>>, ()> {
    let mut ids = Vec::new();
    for shard in 0..shards.len() {
        let mut after = None;
        loop {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let req = ListRequest {
                after: after.take(),
                limit: PAGE,
                scan: 10 * PAGE,
                bytes: usize::MAX,
            };
            let ask = ShardMsg::ListClients {
                req,
                online: Some(true),
                reply,
            };
            shards.try_send(shard, ask).map_err(drop)?;
            let page = answer.await.map_err(drop)?;
            ids.extend(page.items.into_iter().map(|c| Arc::from(c.client_id)));
            match page.covered {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::later;

    #[test]
    fn the_later_connection_wins_and_a_tie_goes_to_the_larger_node_id() {
        assert!(later((10, "a"), None));
        assert!(later((11, "a"), Some((10, "b"))));
        assert!(!later((10, "a"), Some((11, "b"))));
        assert!(later((10, "b"), Some((10, "a"))));
        assert!(!later((10, "a"), Some((10, "b"))));
    }
}
