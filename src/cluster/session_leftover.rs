//! Wills of a node back after a crash within its lease (issue 20): no other node counted
//! it dead, so nobody published the wills its last run left in the session bucket.
//!
//! **Noted at start.** When the store says a process ended without letting go of it (its
//! pid file was left: a crash, `kill -9`), it leaves a marker beside the store file
//! (`gateway.crashed`, `lockholder::crash_marker_of`), which stays until those wills are
//! handled: a start that fails, `store-repair` or a start with the fleet off in between
//! does not forget them. A start that finds the marker notes, before any device
//! connects, the last revision of the session bucket's stream: one request, so the
//! lease is not held up.
//! Every will key of this node written by then and still holding a will is a will of a
//! connection that ended with the crash; anything written later is this run's. Sessions
//! restored as offline leave their keys as the crash left them (`shard/durable.rs`).
//!
//! **Published once the node runs,** in the background: the node's will keys are read
//! (last value per key, one pass, every `lease_secs` until a read succeeds), and each
//! will at or below the noted revision waits its delay, then is published unless its
//! device is back: on another node (the registry), or here (online now, or its key
//! written since: the claim by compare-and-set on the revision read, made just before
//! publishing, fails). So no will sits claimed during its delay, and a stop or crash
//! meanwhile leaves it where the next start finds it. A device back before its will
//! was read (a persistent session, or a connection with a will) has written its key
//! again, so its old will is not published at all: for the usual retained "offline"
//! will, publishing it after the device's "online" would be wrong. A will whose device
//! cannot be told back or not (NATS away, changes still waiting to be written to it, a
//! shard that cannot be asked, a stop) is tried again next tick; the marker goes once every will is settled. At most 256 are looked up and
//! published at once (`SessionStore::will_permits`, shared with the survivors' path).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::mailbox::Mailboxes;

use super::routing::Router;
use super::session_will::{is_claim, parse_will, publish};
use super::sessions::SessionStore;

/// Entries read per request.
const READ_BATCH: usize = 1000;
/// How long the read waits for the next entry.
const READ_WAIT: Duration = Duration::from_secs(10);

/// What the start noted, and how far handling it got.
pub(super) struct Pending {
    /// The stream revision up to which will keys are the last run's.
    up_to: u64,
    /// The crash marker, removed once everything is settled.
    marker: PathBuf,
    /// Whether the keys were read (the wills found are running, or settled).
    read: bool,
    /// The keys of the wills being handled now.
    running: HashSet<String>,
    /// Wills whose device could not be told back or not: handled again next tick.
    retry: HashMap<String, Leftover>,
}

/// A will the last run left: its revision, its value, and when it is due.
type Leftover = (u64, Bytes, Instant);

/// What the wills' tasks share: the bucket, the way to the subscribers, the stop.
struct Ctx {
    kv: kv::Store,
    shards: Mailboxes,
    router: Arc<Router>,
    stop: CancellationToken,
}

/// What became of one of them.
enum Outcome {
    Published,
    Cancelled,
    /// Whether its device is back could not be told: tried again.
    Unknown,
}

impl SessionStore {
    /// At start, before any device connects, with the marker there: notes the bucket's
    /// last revision (see the module doc).
    pub async fn note_leftover_wills(&self, marker: PathBuf) -> Result<(), String> {
        let info = self.kv.get_info().await.map_err(|e| e.to_string())?;
        let pending = Pending {
            up_to: info.state.last_sequence,
            marker,
            read: false,
            running: HashSet::new(),
            retry: HashMap::new(),
        };
        *self.leftover() = Some(pending);
        Ok(())
    }

    fn leftover(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.leftover_wills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Handles the noted wills: every `every`, reads the keys until a read succeeds, then
    /// starts each will found (and each to retry) that is not running; once all are
    /// settled the marker goes. Until `stop`.
    pub(super) async fn handle_leftover_wills(
        self: Arc<Self>,
        shards: Mailboxes,
        router: Arc<Router>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ctx: Option<Arc<Ctx>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some((up_to, read)) = self.leftover().as_ref().map(|p| (p.up_to, p.read)) else {
                return;
            };
            if !self.link.connected() {
                continue;
            }
            let ctx = match &ctx {
                Some(ctx) => ctx.clone(),
                None => match self.will_bucket().await {
                    Ok(kv) => ctx
                        .insert(Arc::new(Ctx {
                            kv,
                            shards: shards.clone(),
                            router: router.clone(),
                            stop: stop.clone(),
                        }))
                        .clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: the session bucket is out of reach; the wills the last run left wait");
                        continue;
                    }
                },
            };
            let found = match read {
                true => Vec::new(),
                false => match self.read_leftover(up_to).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: reading the wills the last run left failed; trying again");
                        continue;
                    }
                },
            };
            let start = self.to_start(found, read);
            for (key, will) in start {
                tokio::spawn(self.clone().own_will(key, will, ctx.clone()));
            }
            self.finish_if_settled().await;
        }
    }

    /// Once the keys were read and every will is settled: the marker goes, and the
    /// handling ends.
    async fn finish_if_settled(&self) {
        let marker = {
            let mut guard = self.leftover();
            let settled = guard
                .as_ref()
                .is_some_and(|p| p.read && p.running.is_empty() && p.retry.is_empty());
            match settled {
                true => guard.take().map(|p| p.marker),
                false => None,
            }
        };
        if let Some(marker) = marker {
            let _ = tokio::fs::remove_file(marker).await;
            tracing::info!("cluster: the wills the last run left are settled");
        }
    }

    /// The wills to start now: those `found` by the first read (`read`: there was one
    /// already), and those to retry; each marked running.
    fn to_start(&self, found: Vec<(String, u64, Bytes)>, read: bool) -> Vec<(String, Leftover)> {
        let mut guard = self.leftover();
        let Some(p) = guard.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut start: HashMap<String, Leftover> = std::mem::take(&mut p.retry);
        if !read {
            tracing::info!(
                wills = found.len(),
                "cluster: publishing the wills the last run left"
            );
            for (key, revision, value) in found {
                start.entry(key).or_insert((revision, value, now));
            }
            p.read = true;
        }
        start.retain(|key, _| p.running.insert(key.clone()));
        self.count_pending(p);
        start.into_iter().collect()
    }

    /// One will the last run left: after its delay, published (claimed by
    /// compare-and-set on the revision read, just before) unless its device is back: on
    /// another node, or here (its key written since, which a claim finds, or online
    /// now). A device back leaves its old will unpublished and the key, if unchanged,
    /// purged. When that cannot be told, it is tried again next tick.
    async fn own_will(
        self: Arc<Self>,
        key: String,
        (revision, value, due): Leftover,
        ctx: Arc<Ctx>,
    ) {
        let outcome = self.settle_own(&key, revision, &value, due, &ctx).await;
        match outcome {
            Outcome::Published => {
                self.metrics.wills.published.inc();
            }
            Outcome::Cancelled => {
                self.metrics.wills.cancelled.inc();
            }
            Outcome::Unknown => {}
        }
        if let Some(p) = self.leftover().as_mut() {
            p.running.remove(&key);
            if matches!(outcome, Outcome::Unknown) {
                p.retry.insert(key, (revision, value, due));
            }
            self.count_pending(p);
        }
        self.finish_if_settled().await;
    }

    fn count_pending(&self, p: &Pending) {
        let n = p.running.len() + p.retry.len();
        self.metrics.wills.crash_pending.set(n as i64);
    }

    async fn settle_own(
        &self,
        key: &str,
        revision: u64,
        value: &Bytes,
        due: Instant,
        ctx: &Ctx,
    ) -> Outcome {
        let Some((client_id, will)) = parse_will(value) else {
            tracing::warn!(
                key,
                "cluster: a will the last run left does not decode; dropped"
            );
            return Outcome::Cancelled;
        };
        let due = due + Duration::from_secs(u64::from(will.delay_secs));
        tokio::select! {
            _ = ctx.stop.cancelled() => return Outcome::Unknown,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let Ok(_permit) = self.will_permits.acquire().await else {
            return Outcome::Unknown;
        };
        // Changes waiting for NATS (after an outage) may be this device's, back here.
        if ctx.stop.is_cancelled() || self.resync.waiting() {
            return Outcome::Unknown;
        }
        let (kv, shards) = (&ctx.kv, &ctx.shards);
        let here = self.link.node.clone();
        let back = match self.link.registry.holder(&client_id).await {
            Ok(holder) if holder.as_deref().is_some_and(|n| *n != *here) => Some(true),
            Ok(_) => online_here(shards, &client_id).await,
            Err(_) => None,
        };
        match back {
            None => return Outcome::Unknown,
            Some(true) => {
                tracing::info!(%client_id, "cluster: a will the last run left is not published: its client is back");
                let _ = kv.purge_expect_revision(key, Some(revision)).await;
                return Outcome::Cancelled;
            }
            Some(false) => {}
        }
        if ctx.stop.is_cancelled() {
            return Outcome::Unknown;
        }
        match claim(kv, key, revision, &here).await {
            Claimed::Yes(claimed) => {
                tracing::info!(%client_id, topic = %will.topic, "cluster: publishing a will the last run left");
                publish(shards, &ctx.router, &will);
                let _ = kv.purge_expect_revision(key, Some(claimed)).await;
                Outcome::Published
            }
            // Written since: the device connected here again, or another node took it.
            Claimed::No => Outcome::Cancelled,
            Claimed::Unknown => Outcome::Unknown,
        }
    }

    /// This node's will keys holding a will written at or before revision `up_to`.
    async fn read_leftover(&self, up_to: u64) -> Result<Vec<(String, u64, Bytes)>, String> {
        let consumer: PullConsumer = self
            .kv
            .create_consumer(super::last_per_subject(
                format!("{}.will.{}.>", self.kv_prefix, self.link.node),
                READ_BATCH as i64,
            ))
            .await
            .map_err(|e| format!("leftover wills consumer: {e}"))?;
        let name = consumer.cached_info().name.clone();
        let left = consumer.cached_info().num_pending;
        let read = self.read_all(&consumer, left, up_to).await;
        let _ = self.kv.delete_consumer(&name).await;
        read
    }

    /// The wills at or below `up_to` among the `left` entries `consumer` delivers.
    async fn read_all(
        &self,
        consumer: &PullConsumer,
        mut left: u64,
        up_to: u64,
    ) -> Result<Vec<(String, u64, Bytes)>, String> {
        let why = |e: &dyn std::fmt::Display| format!("reading the wills the last run left: {e}");
        let prefix = format!("{}.", self.kv_prefix);
        let (mut wills, mut seen) = (Vec::new(), 0u64);
        while left > 0 {
            let fetch = consumer.fetch().max_messages(READ_BATCH).messages();
            let mut batch = fetch.await.map_err(|e| why(&e))?;
            let mut last = None;
            while let Some(m) = tokio::time::timeout(READ_WAIT, batch.next())
                .await
                .map_err(|e| why(&e))?
            {
                let m = m.map_err(|e| why(&e))?;
                let revision = m.info().map_err(|e| why(&e))?.stream_sequence;
                (left, seen) = (left.saturating_sub(1), seen + 1);
                if revision <= up_to && !m.payload.is_empty() && !is_claim(&m.payload) {
                    let key = m.subject.trim_start_matches(&prefix).to_string();
                    wills.push((key, revision, m.payload.clone()));
                }
                last = Some(m);
            }
            let Some(last) = last else {
                // Fewer than counted: something is off (the next pass reads again).
                return Err(why(&format!("{left} entries did not come")));
            };
            let _ = last.ack().await;
            if seen % 100_000 < READ_BATCH as u64 {
                tracing::info!(
                    read = seen,
                    wills = wills.len(),
                    "cluster: reading the wills the last run left"
                );
            }
        }
        Ok(wills)
    }
}

/// What a claim came to.
enum Claimed {
    /// Ours, at this revision.
    Yes(u64),
    No,
    Unknown,
}

/// Claims `key` by compare-and-set on `revision`, with a value no other claim has
/// (`claimed:<node>:<pid>:<n>`), so that a claim whose answer was lost is told apart
/// from another node's when it is looked up: ours means claimed, the key still at
/// `revision` means not written (unknown: tried again), anything else means not ours.
async fn claim(kv: &kv::Store, key: &str, revision: u64, node: &str) -> Claimed {
    static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = Bytes::from(format!("claimed:{node}:{}:{n}", std::process::id()));
    // Refused or unanswered alike: the key as it is now tells.
    if let Ok(claimed) = kv.update(key, token.clone(), revision).await {
        return Claimed::Yes(claimed);
    }
    match kv.entry(key).await {
        Ok(Some(e)) if e.value == token => Claimed::Yes(e.revision),
        Ok(Some(e)) if e.revision == revision => Claimed::Unknown,
        Ok(_) => Claimed::No,
        Err(_) => Claimed::Unknown,
    }
}

/// Whether `client_id` has a live connection on this node; `None` when its shard cannot
/// be asked (stopping, or its mailbox full) or does not answer (`super::home`).
async fn online_here(shards: &Mailboxes, client_id: &str) -> Option<bool> {
    let info = super::home::client_info(shards, client_id).await.ok()?;
    Some(info.is_some_and(|c| c.summary.online))
}
