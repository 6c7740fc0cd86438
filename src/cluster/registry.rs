//! The registry of who is where: client id → node, in a JetStream key-value bucket
//! (`cluster.registry_bucket`), and each node's lease in `<bucket>_nodes`.
//!
//! - **Writes.** [`Registry::follow`] drains the `connected` / `disconnected` events this
//!   node's shards produce (a bounded queue, never waited on by a shard), each client's
//!   in order (different clients' at the same time): a `connected` puts
//!   `<client key> = <node>`. A `disconnected` asks the device's home
//!   shard (through its mailbox, `try_send`) whether the session lives on (a persistent
//!   session, offline): then the entry stays, so pushes from other nodes still reach it
//!   and answer `queued` as this node would; otherwise, and at `session_expired`, the
//!   entry is deleted, only if it still names this node, with the revision read
//!   (compare-and-set), so a device that moved on to another node keeps that node's
//!   entry.
//! - **After an outage.** A failed write marks the registry dirty; once the heartbeat
//!   reaches NATS again, every device online here is written again, arbitrated against
//!   claims other nodes made meanwhile (`super::rejoin`).
//! - **After an overflow.** A full queue (`cluster.registry_queue_capacity`) drops its
//!   oldest change. [`Registry::follow`] sees the drop counted and says so
//!   ([`Registry::overflowed`]); the devices online on the shards but not known here
//!   are then written as in a rejoin (`super::rejoin`).
//! - **Takeover.** A `connected` claims the entry by compare-and-set on its revision
//!   (`super::arbiter`: one winner when two nodes claim at once); one whose entry named
//!   another node before is reported (`taken`), and `crate::cluster` asks that node to
//!   close its connection. A takeover refused by the flapping throttle closes the new
//!   connection here instead (`ShardMsg::FleetThrottled`).
//! - **Leases.** `<bucket>_nodes` keeps entries `lease_secs` at most (the bucket's max
//!   age); each node renews its own every third of that. A node that died stops renewing,
//!   and the entries naming it count as gone once its lease expired
//!   ([`Registry::alive`]); a push that finds such an entry takes the device's
//!   persistent session in (`super::take_in`) or, without one, deletes the entry (again
//!   by revision).
//! - **Reads.** [`Registry::locate`] answers where a client id is held: here when one of
//!   this node's shards reported it connected (an in-memory set, no NATS round trip), else
//!   what the bucket says.
//!
//! Keys are the client id with every byte other than an ASCII letter, digit, `-` or `_`
//! written `=XX` (hex), so any client id is one valid key and the escape is reversible.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::ClusterConfig;
use crate::events::config::DropPolicy;
use crate::events::sink::{Batcher, OutageLog};
use crate::events::{Event, EventKind};
use crate::mailbox::{home_shard, ClientInfo, Mailboxes, ShardMsg};

use super::arbiter::{self, Claim, Throttle};
use super::ops_metrics::RegistryMetrics;

/// The registry buckets and what this node knows it holds.
pub struct Registry {
    pub(super) clients: kv::Store,
    nodes: kv::Store,
    node: Arc<str>,
    /// Client ids connected to this node, as its shards reported them.
    here: Mutex<HashSet<Arc<str>>>,
    /// A registry write failed since the last rejoin (`super::rejoin`).
    dirty: AtomicBool,
    /// Woken when the queue dropped changes (a permit kept until looked at, so a drop
    /// during a look brings another).
    overflow: Notify,
    /// When the newest change the queue dropped happened (Unix ms): the changes of
    /// devices that connected later are still queued, not missed.
    dropped_up_to_ms: AtomicU64,
    /// `cluster.takeover_min_interval_ms`, per client id.
    throttle: Throttle,
    /// The fleet's copy of the sessions (set once the fleet is joined): whether a session
    /// changed on another node (`takes_over`).
    pub(super) sessions: std::sync::OnceLock<std::sync::Weak<super::sessions::SessionStore>>,
    /// `cluster.clock_skew_ms` (`takes_over`).
    clock_skew_ms: u64,
    pub metrics: Arc<RegistryMetrics>,
}

/// Where a client id is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// On this node, or nowhere in the registry (this node then answers for itself).
    Here,
    /// On `node`, by the registry entry of `revision`.
    Elsewhere { node: String, revision: u64 },
}

/// Opens bucket `name`, creating it (one value per key, entries kept at most `max_age`,
/// zero = for ever) if it does not exist yet.
///
/// The bucket's stream is created directly, as a key-value bucket's stream is
/// (`KV_<name>` on `$KV.<name>.>`): async-nats's `create_key_value` first reads the
/// account's JetStream info, which it cannot parse from a nats-server before 2.10
/// (Debian's is 2.9).
pub(super) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: std::time::Duration,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    let created = js.create_stream(config).await;
    // Another node may have created it in between: open it either way.
    js.get_key_value(name).await.map_err(|e| {
        let why = created
            .err()
            .map_or_else(|| e.to_string(), |c| c.to_string());
        format!("cluster: cannot open the key-value bucket {name}: {why}")
    })
}

/// The registry key of `client_id`.
pub fn key(client_id: &str) -> String {
    crate::events::nats::escape(client_id, '=')
}

/// The client id of a registry key made by [`key`].
pub fn client_id_of(key: &str) -> Option<String> {
    crate::events::nats::unescape(key, b'=')
}

impl Registry {
    /// Opens (or creates) the two buckets.
    pub(super) async fn open(
        client: &async_nats::Client,
        config: &ClusterConfig,
        node: Arc<str>,
    ) -> Result<Registry, String> {
        let js = async_nats::jetstream::new(client.clone());
        let clients_name = config.registry_bucket.clone();
        let nodes_name = format!("{}_nodes", config.registry_bucket);
        let clients = open_bucket(&js, &clients_name, Default::default()).await?;
        let nodes = open_bucket(&js, &nodes_name, config.lease()).await?;
        Ok(Registry {
            clients,
            nodes,
            node,
            here: Mutex::new(HashSet::new()),
            dirty: AtomicBool::new(false),
            overflow: Notify::new(),
            dropped_up_to_ms: AtomicU64::new(0),
            throttle: Throttle::new(config.takeover_min_interval()),
            sessions: std::sync::OnceLock::new(),
            clock_skew_ms: config.clock_skew_ms(),
            metrics: Arc::default(),
        })
    }

    /// Writes (or renews) this node's lease.
    pub(super) async fn renew_lease(&self) -> Result<(), kv::PutError> {
        let put = self.nodes.put(&*self.node, Bytes::from_static(b"alive"));
        let result = put.await.map(drop);
        self.metrics.count("lease", result.is_ok());
        result
    }

    /// Gives this node's lease up (on a clean shutdown).
    pub(super) async fn drop_lease(&self) {
        if let Err(e) = self.nodes.delete(&*self.node).await {
            tracing::warn!(node = %self.node, error = %e, "cluster: cannot give up the lease");
        }
    }

    /// Whether a registry write failed since the last rejoin (and clears it).
    pub(super) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    /// A registry write failed: the next lease renewal rejoins (`super::rejoin`).
    pub(super) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// When the newest change the queue dropped happened (Unix ms).
    pub(super) fn dropped_up_to_ms(&self) -> u64 {
        self.dropped_up_to_ms.load(Ordering::SeqCst)
    }

    /// Waits until the queue dropped changes (at once if it did since the last look).
    pub(super) async fn overflowed(&self) {
        self.overflow.notified().await;
    }

    /// Devices missed after an overflow are to be looked for (again).
    pub(super) fn mark_overflowed(&self) {
        self.overflow.notify_one();
    }

    /// The client ids online here now.
    pub(super) fn online_here(&self) -> Vec<Arc<str>> {
        let here = self.here.lock().unwrap_or_else(|p| p.into_inner());
        here.iter().cloned().collect()
    }

    /// The lease bucket (`super::sweep` lists it and keeps its marker there).
    pub(super) fn leases(&self) -> &kv::Store {
        &self.nodes
    }

    /// This node's id.
    pub(super) fn node_id(&self) -> &Arc<str> {
        &self.node
    }

    /// Whether `node` holds a lease now.
    pub async fn alive(&self, node: &str) -> Result<bool, kv::EntryError> {
        Ok(self.nodes.get(node).await?.is_some())
    }

    pub(super) fn is_here(&self, client_id: &str) -> bool {
        self.here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(client_id)
    }

    /// Where `client_id` is held.
    pub async fn locate(&self, client_id: &str) -> Result<Located, kv::EntryError> {
        if self.is_here(client_id) {
            return Ok(Located::Here);
        }
        Ok(match self.clients.entry(key(client_id)).await? {
            Some(e) if e.operation == kv::Operation::Put && *e.value != *self.node.as_bytes() => {
                Located::Elsewhere {
                    node: String::from_utf8_lossy(&e.value).into_owned(),
                    revision: e.revision,
                }
            }
            _ => Located::Here,
        })
    }

    /// Deletes `client_id`'s entry if it is still the one of `revision` (a stale entry
    /// of a node whose lease expired).
    pub async fn forget(&self, client_id: &str, revision: u64) {
        let deleted = self
            .clients
            .delete_expect_revision(key(client_id), Some(revision))
            .await;
        tracing::debug!(
            client_id,
            revision,
            ok = deleted.is_ok(),
            "cluster: stale registry entry removed"
        );
    }

    /// Applies the shards' `connected` / `disconnected` / `session_expired` in order until
    /// the events stop; `taken(node, client id)` for each device that another node held
    /// when it connected here; a throttled takeover closes the new connection here.
    pub(super) async fn follow(
        self: Arc<Self>,
        changes: Batcher,
        shards: Mailboxes,
        taken: impl Fn(String, Arc<str>) + Send,
    ) {
        let (mut batch, mut log) = (Vec::new(), OutageLog::default());
        // Counted from 0: the shards run, and may fill the queue, before this task starts.
        let (overflow, mut dropped) = (DropPolicy::DropOldest.reason(), 0);
        while changes.next(&mut batch).await {
            let now_dropped = changes.queue.metrics.dropped_count(overflow);
            if now_dropped > dropped {
                let up_to = changes.queue.newest_dropped_ms.load(Ordering::SeqCst);
                self.dropped_up_to_ms.fetch_max(up_to, Ordering::SeqCst);
                tracing::warn!(node = %self.node, dropped = now_dropped - dropped, "cluster: the registry queue was full and dropped changes (cluster.registry_queue_capacity); the devices online here that it missed are written to the registry again");
                dropped = now_dropped;
                self.mark_overflowed();
            }
            // Each client's changes in order; different clients' at the same time.
            let per_client = by_client(batch.drain(..));
            let (this, shards) = (&*self, &shards);
            let applied = per_client.iter().map(|events| async move {
                let mut out = Vec::with_capacity(events.len());
                for event in events {
                    out.push((event.client_id.clone(), this.apply(event, shards).await));
                }
                out
            });
            for (client_id, result) in futures_util::future::join_all(applied)
                .await
                .into_iter()
                .flatten()
            {
                match result {
                    Ok(claim) => {
                        match claim {
                            Some(Claim::Won { before: Some(node) }) => taken(node, client_id),
                            Some(Claim::Throttled { holder }) => {
                                throttled(shards, client_id, &holder)
                            }
                            _ => {}
                        }
                        log.succeeded(changes.name);
                        changes.queue.metrics.sent.inc();
                    }
                    Err(e) => {
                        log.failed(changes.name, &e);
                        changes.dropped("rejected", 1);
                        self.dirty.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Applies one change: a `connected`'s claim (`super::arbiter`).
    async fn apply(&self, event: &Event, shards: &Mailboxes) -> Result<Option<Claim>, String> {
        let id = &event.client_id;
        match &event.kind {
            EventKind::Connected(_) => {
                self.set_here(id, true);
                let (k, node) = (key(id), &self.node);
                let accepted_ms = event.time_ms;
                let still_here = || self.takes_over(shards, id, accepted_ms);
                let checks = (&self.throttle, still_here);
                let claim = arbiter::claim(&self.clients, &k, node, checks, &self.metrics);
                let claim = claim.await?;
                if !matches!(claim, Claim::Won { .. }) {
                    self.set_here(id, false);
                }
                Ok(Some(claim))
            }
            EventKind::Disconnected { .. } => {
                self.set_here(id, false);
                match session_lives_on(shards, id).await {
                    true => Ok(None),
                    false => self.release(id).await.map(|()| None),
                }
            }
            EventKind::SessionExpired => {
                // Offline already; its `disconnected` may have been dropped.
                self.set_here(id, false);
                self.release(id).await.map(|()| None)
            }
            _ => Ok(None),
        }
    }

    /// The node the registry names for `client_id`, if any.
    pub async fn holder(&self, client_id: &str) -> Result<Option<String>, kv::EntryError> {
        let entry = self.holder_entry(client_id).await?;
        Ok(entry.map(|(node, _)| node))
    }

    /// The node the registry names for `client_id`, with the entry's revision.
    pub async fn holder_entry(
        &self,
        client_id: &str,
    ) -> Result<Option<(String, u64)>, kv::EntryError> {
        let entry = self.clients.entry(key(client_id)).await?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (String::from_utf8_lossy(&e.value).into_owned(), e.revision)))
    }

    /// Whether the registry names this node for `client_id` (a read error counts as
    /// yes: nothing is closed on a guess).
    pub async fn names_this_node(&self, client_id: &str) -> bool {
        match self.holder(client_id).await {
            Ok(holder) => holder.as_deref() == Some(&*self.node),
            Err(_) => true,
        }
    }

    /// `client_id` is no longer online here (taken over by another node); true if it was.
    pub(super) fn left(&self, client_id: &str) -> bool {
        self.here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id)
    }

    pub(super) fn set_here(&self, client_id: &Arc<str>, here: bool) {
        let mut set = self.here.lock().unwrap_or_else(|p| p.into_inner());
        if here {
            set.insert(client_id.clone());
        } else {
            set.remove(client_id);
        }
    }

    /// Deletes `client_id`'s entry if it names this node, by the revision read (also the
    /// entry of a session that ended while the device was offline).
    async fn release(&self, client_id: &str) -> Result<(), String> {
        let k = key(client_id);
        let entry = self.clients.entry(k.clone()).await;
        self.metrics.count("get", entry.is_ok());
        match entry.map_err(|e| format!("get {client_id}: {e}"))? {
            Some(e) if e.operation == kv::Operation::Put && *e.value == *self.node.as_bytes() => {
                // Another node's claim in between makes this fail, as it should.
                let deleted = self.clients.delete_expect_revision(k, Some(e.revision));
                match deleted.await {
                    Ok(()) => self.metrics.count("delete", true),
                    Err(_) => self.metrics.conflict_on("delete"),
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A takeover of `client_id` from `holder` refused by the flapping throttle: the new
/// connection here is closed (MQTT 5 0x9F) by its home shard, and the registry keeps
/// naming `holder`.
fn throttled(shards: &Mailboxes, client_id: Arc<str>, holder: &str) {
    tracing::info!(%client_id, holder, "cluster: client id moved here from another node again within takeover_min_interval_ms; the new connection is closed");
    let home = home_shard(&client_id, shards.len());
    let _ = shards.try_send(home, ShardMsg::FleetThrottled { client_id });
}

/// `events` grouped by client id, each client's in their order.
fn by_client(events: impl Iterator<Item = Arc<Event>>) -> Vec<Vec<Arc<Event>>> {
    let mut index: std::collections::HashMap<Arc<str>, usize> = Default::default();
    let mut groups: Vec<Vec<Arc<Event>>> = Vec::new();
    for e in events {
        let i = *index.entry(e.client_id.clone()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(e);
    }
    groups
}

impl Registry {
    /// Whether a `connected` of `client_id` accepted here at `accepted_ms` (Unix ms) may
    /// take the client id from the node whose entry the claim found: its session must
    /// still be here (`session_lives_on`); and when its device has left since and the
    /// fleet keeps sessions, no other node may have written the session's record more
    /// than `clock_skew_ms` after this connection was accepted. Such a write means the
    /// device went on to that node after connecting here, and this `connected` is applied
    /// late (this node was cut off from NATS, or its registry queue was behind): the
    /// offline copy here is stale, and taking the client id would end the other node's
    /// newer one. The copy here ends instead, the fleet's left alone
    /// (`ShardMsg::StaleCopy`). A session a survivor took in from a dead node is not
    /// written there, so a copy here that is newer than the fleet's still takes it; this
    /// node's own writes (its record at the connect) never count; and the old node of an
    /// ordinary handover wrote its record before this connection was accepted, which the
    /// skew allowance keeps from looking later (`restore::Written`).
    async fn takes_over(&self, shards: &Mailboxes, client_id: &str, accepted_ms: u64) -> bool {
        // As `session_lives_on`, but for a session that is here and offline.
        match ask_home(shards, client_id).await {
            Ok(Some(info)) if !info.summary.online => {}
            Ok(info) => return info.is_some(),
            Err(full) => return full,
        }
        let sessions = self.sessions.get().and_then(std::sync::Weak::upgrade);
        let Some(sessions) = sessions.filter(|s| s.keeps_sessions()) else {
            return true;
        };
        match sessions.record_written(client_id).await {
            Ok(Some(w)) if w.elsewhere_after(accepted_ms, self.clock_skew_ms) => {}
            Ok(_) => return true,
            Err(e) => {
                // Not known: the session here takes it, as before this check.
                tracing::debug!(client_id, error = %e, "cluster: cannot read a session record to arbitrate a late claim");
                return true;
            }
        }
        tracing::info!(client_id, "cluster: a device that connected here went on to another node before this node's registry write was applied; that node keeps the client id and the offline copy here ends");
        end_stale_copy(shards, client_id);
        false
    }
}

/// Asks `client_id`'s home shard to end its offline copy of the session, which another
/// node holds now (the fleet's copy is left alone). A full mailbox leaves the copy, as
/// before this was done: it ends at its expiry, without purging the fleet's.
pub(super) fn end_stale_copy(shards: &Mailboxes, client_id: &str) {
    let home = home_shard(client_id, shards.len());
    let msg = ShardMsg::StaleCopy {
        client_id: client_id.into(),
    };
    if shards.try_send(home, msg).is_err() {
        tracing::debug!(
            client_id,
            "cluster: a stale copy of a session is left to expire (its shard's mailbox is full)"
        );
    }
}

/// Whether `client_id` still has a session on its home shard here (asked through the
/// shard's mailbox). A full mailbox counts as yes: the entry then stays, and a push
/// through it is answered by this node, truthfully. A stopped shard (the node is
/// shutting down) has no session any more.
async fn session_lives_on(shards: &Mailboxes, client_id: &str) -> bool {
    match ask_home(shards, client_id).await {
        Ok(info) => info.is_some(),
        Err(full) => full,
    }
}

/// What `client_id`'s home shard knows of it, or `Err(full)` when it cannot be asked:
/// its mailbox is full (`true`) or closed (the node is stopping, `false`).
async fn ask_home(shards: &Mailboxes, client_id: &str) -> Result<Option<ClientInfo>, bool> {
    let home = home_shard(client_id, shards.len());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = ShardMsg::ClientInfo {
        client_id: client_id.to_string(),
        reply,
    };
    if shards.try_send(home, ask).is_err() {
        return Err(!shards.is_closed(home));
    }
    Ok(answer.await.ok().flatten())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::key;

    #[test]
    fn changes_keep_their_order_per_client() {
        use crate::events::{Event, EventKind};
        let ev = |id: &str, n: u64| Arc::new(Event::now(n, id.into(), EventKind::SessionExpired));
        let events = vec![ev("a", 1), ev("b", 2), ev("a", 3), ev("c", 4), ev("b", 5)];
        let groups = super::by_client(events.into_iter());
        let seqs: Vec<Vec<u64>> = groups
            .iter()
            .map(|g| g.iter().map(|e| e.seq).collect())
            .collect();
        assert_eq!(seqs, [vec![1, 3], vec![2, 5], vec![4]]);
    }

    #[test]
    fn any_client_id_is_one_reversible_key() {
        assert_eq!(key("dev-1_a"), "dev-1_a");
        assert_eq!(key("a.b/c d"), "a=2Eb=2Fc=20d");
        assert_eq!(key("x=y"), "x=3Dy");
        assert_eq!(key("é"), "=C3=A9");
        // Distinct ids stay distinct, `=` itself included.
        assert_ne!(key("=2E"), key("."));
    }
}
