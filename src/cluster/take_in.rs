//! A dead node's persistent sessions, taken in by a survivor. Without this, the session
//! the fleet keeps in JetStream sat there unreachable until its device came back: no
//! node held its subscriptions in NATS (messages published to it were missed) and a
//! push by client id answered `offline`.
//!
//! - **Who.** The node that meets a dead node's registry entry: the sweeper (`sweep`),
//!   for every entry of a node whose lease expired, or a node whose push (or clients
//!   API call) finds the holder gone (`api/fleet.rs`). It claims the entry by
//!   compare-and-set on the revision it read, so one node takes a session in, and a
//!   device that reconnected meanwhile (a newer revision) keeps its node. One take-in
//!   per client id at a time on a node; it runs in a task of its own, so a caller that
//!   gives up (an HTTP client gone) does not cut it short.
//! - **What.** The session is read from JetStream as for a CONNECT (`restore`) and its
//!   home shard adopts it offline (`ShardMsg::TakeIn`): record, subscriptions (to NATS,
//!   so messages published to it are queued again) and queued messages stored here;
//!   pushes by client id answer `queued`; its expiry runs here, counted from when it
//!   went offline (from now if its device was online when its node died). The device
//!   resumes it here or on any node (a handover from this one, as from any live node).
//!   When anything fails after the claim, the entry is given back to the dead node, so
//!   the next sweep or push tries again.
//! - **Its will.** The dead node's will for the client stays with the will watcher
//!   (`session_will`), which publishes it unless the client came back. A session taken
//!   in is not the client coming back, although the registry now names a live node: a
//!   node marks its take-in in the session bucket, `<id>.taken.<node>` = `pending`
//!   before its claim, then the claim's revision; the watcher publishes while the
//!   registry names a node whose mark is `pending` or that revision ([`back_elsewhere`]).
//! - **Against a resume at the same moment.** Handover and takeover requests for a
//!   client id being taken in wait (at most half the request timeout) until its shard
//!   holds the session ([`SessionStore::settled`]). A device that resumed on another
//!   node from JetStream while this node's read was under way: that node's claim comes
//!   after this one's; this node looks at the registry again once the shard has the
//!   session and, when it names another node, ends the copy here (`ShardMsg::TakenOver`,
//!   the same mailbox, so after the adoption) without purging the fleet's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{kv, stream};
use bytes::Bytes;

use crate::mailbox::{home_shard, Mailboxes, ShardMsg, TakenIn};
use crate::store::StoredSession;

use super::registry::key as registry_key;
use super::sessions::{key, SessionStore};

/// What became of a dead node's entry offered to [`SessionStore::take_in`].
#[derive(Debug, PartialEq, Eq)]
pub enum TakeIn {
    /// Its session is on its home shard here, and the registry names this node.
    Here,
    /// The fleet keeps no session for it (or this node keeps none, or it expired): the
    /// stale entry is deleted (by revision); the device is offline.
    Offline,
    /// Another node holds the entry now (the device back there, or another survivor).
    Elsewhere,
}

/// The mark of a take-in under way (before the claim's revision is known).
const PENDING: &str = "pending";

/// A dead node's sessions one sweep step (or one push batch) takes in at once, each a
/// few JetStream reads and writes.
pub const AT_ONCE: usize = 64;

impl SessionStore {
    /// Takes in `client_id`'s session, whose registry entry (at `revision`) names
    /// `dead`, a node whose lease expired. Runs in a task of its own.
    pub async fn take_in(
        self: &Arc<Self>,
        client_id: &str,
        dead: &str,
        revision: u64,
    ) -> Result<TakeIn, String> {
        let (this, id, dead) = (self.clone(), client_id.to_string(), dead.to_string());
        let task = tokio::spawn(async move { this.take_in_once(&id, &dead, revision).await });
        task.await
            .unwrap_or_else(|e| Err(format!("the take-in task failed: {e}")))
    }

    async fn take_in_once(
        &self,
        client_id: &str,
        dead: &str,
        revision: u64,
    ) -> Result<TakeIn, String> {
        let id: Arc<str> = Arc::from(client_id);
        if !self.seqs().taking_in.insert(id.clone()) {
            // Another take-in of it here (a push and the sweep): its outcome.
            self.settled(client_id).await;
            if self.taking(client_id) {
                return Err("another take-in of the session here is still under way".into());
            }
            return self.outcome_of_other(client_id, dead).await;
        }
        let _guard = Taking { store: self, id };
        let shards = self
            .shards
            .get()
            .filter(|_| self.keeps.load(Ordering::Acquire));
        let kept = match shards {
            Some(_) => self.kept_in_fleet(client_id).await?,
            None => false,
        };
        let (Some(shards), true) = (shards, kept) else {
            self.link.registry.forget(client_id, revision).await;
            return Ok(TakeIn::Offline);
        };
        self.mark(client_id, PENDING).await?;
        let claimed = match self.claim(client_id, revision).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => {
                self.unmark(client_id).await;
                return self.outcome_of_other(client_id, dead).await;
            }
            Err(e) => {
                self.unmark(client_id).await;
                return Err(e);
            }
        };
        let taken = self.take_in_claimed(client_id, claimed, shards).await;
        if taken.is_err() {
            // Given back: the next sweep or push tries again.
            let back = Bytes::copy_from_slice(dead.as_bytes());
            let clients = &self.link.registry.clients;
            let given = clients.update(registry_key(client_id), back, claimed).await;
            if given.is_ok() {
                self.unmark(client_id).await;
            } else {
                // Still naming this node at the claim: the mark must say so (it may be
                // `pending` still), for the will to be published (the client is not back).
                let _ = self.mark(client_id, &claimed.to_string()).await;
            }
        }
        taken
    }

    /// Claims `client_id`'s entry for this node if it is still at `revision`: the
    /// claim's revision, or `None` if the entry changed since (its device back, here
    /// or elsewhere, or another survivor first).
    async fn claim(&self, client_id: &str, revision: u64) -> Result<Option<u64>, String> {
        let me = Bytes::copy_from_slice(self.link.node.as_bytes());
        let clients = &self.link.registry.clients;
        match clients.update(registry_key(client_id), me, revision).await {
            Ok(claimed) => Ok(Some(claimed)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => match self.link.registry.holder_entry(client_id).await {
                // The write went through although its answer did not come (not the
                // claim of a connection here: that device is back).
                Ok(Some((node, rev)))
                    if *node == *self.link.node && !self.link.registry.is_here(client_id) =>
                {
                    Ok(Some(rev))
                }
                _ => Err(format!("registry: {e}")),
            },
        }
    }

    /// The entry names this node since `claimed`: marks the claim for the will watcher,
    /// reads the session and hands it to its home shard.
    async fn take_in_claimed(
        &self,
        client_id: &str,
        claimed: u64,
        shards: &Mailboxes,
    ) -> Result<TakeIn, String> {
        self.mark(client_id, &claimed.to_string()).await?;
        let Some(stored) = self.load(client_id).await? else {
            // Expired while nobody held it (purged): nothing left to take in.
            self.link.registry.forget(client_id, claimed).await;
            return Ok(TakeIn::Offline);
        };
        let home = home_shard(client_id, shards.len());
        match adopt(shards, home, stored).await {
            TakenIn::Adopted => {}
            TakenIn::AlreadyHere => return Ok(TakeIn::Here),
            TakenIn::Refused => return Err("its shard is stopping".into()),
        }
        // A device that resumed elsewhere from the fleet's copy meanwhile: its node's
        // takeover may have come before the adoption; the copy here ends now.
        if !self.link.registry.names_this_node(client_id).await {
            let client_id = client_id.to_string();
            let _ = shards.send(home, ShardMsg::TakenOver { client_id }).await;
            return Ok(TakeIn::Elsewhere);
        }
        self.metrics.taken_in.inc();
        tracing::info!(
            client_id,
            "cluster: took in the persistent session of a node whose lease expired"
        );
        Ok(TakeIn::Here)
    }

    /// Where `client_id` is now that another take-in of it here settled (or a claim
    /// found its entry changed): here, elsewhere, offline (no entry left); an error if
    /// the entry still names `dead` (that take-in failed; tried again later).
    async fn outcome_of_other(&self, client_id: &str, dead: &str) -> Result<TakeIn, String> {
        let holder = self.link.registry.holder(client_id).await;
        match holder.map_err(|e| format!("registry: {e}"))? {
            Some(node) if *node == *self.link.node => Ok(TakeIn::Here),
            Some(node) if node == dead => Err("its take-in here failed".into()),
            Some(_) => Ok(TakeIn::Elsewhere),
            None => Ok(TakeIn::Offline),
        }
    }

    /// Whether this node takes dead nodes' sessions in (it keeps sessions: the store on).
    pub fn keeps_sessions(&self) -> bool {
        self.keeps.load(Ordering::Acquire) && self.shards.get().is_some()
    }

    /// Whether `client_id` is being taken in here now.
    pub(super) fn taking(&self, client_id: &str) -> bool {
        self.seqs().taking_in.contains(client_id)
    }

    /// Writes this node's take-in mark for `client_id` and waits for JetStream to hold it.
    async fn mark(&self, client_id: &str, value: &str) -> Result<(), String> {
        let subject = mark_subject(&self.kv_prefix, client_id, &self.link.node);
        let ack = (self.js.publish(subject, value.to_string().into()).await)
            .map_err(|e| format!("take-in mark: {e}"))?;
        ack.await.map_err(|e| format!("take-in mark: {e}"))?;
        Ok(())
    }

    /// Removes this node's take-in mark for `client_id` (its claim lost or given back).
    async fn unmark(&self, client_id: &str) {
        let subject = mark_subject(&self.kv_prefix, client_id, &self.link.node);
        let _ = self.remove_key(subject).await;
    }

    /// Waits (at most half the request timeout, so that a handover asked meanwhile can
    /// still answer in time) while `client_id` is being taken in here.
    pub(super) async fn settled(&self, client_id: &str) {
        let until = Instant::now() + self.link.timeout / 2;
        while self.taking(client_id) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Hands `stored` to shard `home` and waits for its answer (refused if it has stopped).
async fn adopt(shards: &Mailboxes, home: usize, stored: StoredSession) -> TakenIn {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stored = Box::new(stored);
    if shards
        .send(home, ShardMsg::TakeIn { stored, reply })
        .await
        .is_err()
    {
        return TakenIn::Refused;
    }
    answer.await.unwrap_or(TakenIn::Refused)
}

/// A take-in under way on this node, until dropped.
struct Taking<'a> {
    store: &'a SessionStore,
    id: Arc<str>,
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.store.seqs().taking_in.remove(&self.id);
    }
}

/// Whether `client_id` is back on another node than `dead`, for a will `dead` left: the
/// registry names a node other than `dead`, and not one that took its session in (its
/// mark `pending`, or the revision of the entry). A read that fails counts as not back.
pub(super) async fn back_elsewhere(
    registry: &super::registry::Registry,
    bucket: &stream::Stream,
    kv_prefix: &str,
    client_id: &str,
    dead: &str,
) -> bool {
    let Ok(Some((node, revision))) = registry.holder_entry(client_id).await else {
        return false;
    };
    if node == dead {
        return false;
    }
    let subject = mark_subject(kv_prefix, client_id, &node);
    match bucket.direct_get_last_for_subject(subject).await {
        Ok(m) => {
            *m.payload != *PENDING.as_bytes() && *m.payload != *revision.to_string().as_bytes()
        }
        Err(e) => e.kind() == stream::DirectGetErrorKind::NotFound,
    }
}

/// The subject of `node`'s take-in mark for `client_id` in the session bucket
/// (`kv_prefix`: `$KV.<bucket>`).
fn mark_subject(kv_prefix: &str, client_id: &str, node: &str) -> String {
    format!("{kv_prefix}.{}.taken.{}", key(client_id), key(node))
}
