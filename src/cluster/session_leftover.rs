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
//! **Claimed and published once the node runs,** in the background: the node's will keys
//! are read (last value per key, one pass), and each will at or below the noted revision
//! is claimed by compare-and-set on its revision (a survivor that took it first, the
//! lease having run out, keeps it), then published as a survivor would publish it
//! (`session_will::spawn_will`; at most 256 at once), after its delay, unless its device
//! is back: on another node, or online here. A device back before its will is read has written its key
//! again, so its old will is not published at all: for the usual retained "offline"
//! will, publishing it after the device's "online" would be wrong. A pass that did not
//! finish (NATS away, a claim that timed out) is run again every `lease_secs`; the
//! marker goes once one has.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::kv::UpdateErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::mailbox::{home_shard, Mailboxes, ShardMsg};

use super::routing::Router;
use super::session_will::CLAIMED;
use super::sessions::SessionStore;

/// Claims in flight at once.
const CLAIMS_AT_ONCE: usize = 64;
/// Entries read per request.
const READ_BATCH: usize = 1000;

/// What the start noted: the stream revision up to which will keys are the last run's,
/// and the marker to remove once they are handled.
pub(super) struct Pending {
    up_to: u64,
    marker: PathBuf,
}

/// A will the last run left: its key, revision, and value.
type Leftover = (String, u64, Bytes);

impl SessionStore {
    /// At start, before any device connects, with the marker there: notes the bucket's
    /// last revision (see the module doc).
    pub async fn note_leftover_wills(&self, marker: PathBuf) -> Result<(), String> {
        let info = self.kv.get_info().await.map_err(|e| e.to_string())?;
        let up_to = info.state.last_sequence;
        *self
            .leftover_wills
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Pending { up_to, marker });
        Ok(())
    }

    /// Handles the noted wills in passes every `every` until one finishes, or `stop`.
    pub(super) async fn handle_leftover_wills(
        self: Arc<Self>,
        shards: Mailboxes,
        router: Arc<Router>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let up_to = match &*self
                .leftover_wills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
            {
                Some(p) => p.up_to,
                None => return,
            };
            if !self.link.connected() {
                continue;
            }
            match self.leftover_pass(up_to, &shards, &router).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: handling the wills the last run left did not finish; trying again")
                }
            }
        }
        let pending = self
            .leftover_wills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = pending {
            let _ = tokio::fs::remove_file(&p.marker).await;
        }
    }

    /// One pass: reads, claims and publishes; `Err` if something may be left.
    async fn leftover_pass(
        &self,
        up_to: u64,
        shards: &Mailboxes,
        router: &Arc<Router>,
    ) -> Result<(), String> {
        let wills = self.read_leftover(up_to).await?;
        let kv = self.will_bucket().await?;
        let (total, claimed, retry) = (wills.len(), AtomicUsize::new(0), AtomicUsize::new(0));
        futures_util::stream::iter(wills)
            .for_each_concurrent(CLAIMS_AT_ONCE, |(key, revision, value)| {
                let (kv, claimed, retry) = (&kv, &claimed, &retry);
                async move {
                    match kv.update(&key, Bytes::from_static(CLAIMED), revision).await {
                        Ok(revision) => {
                            claimed.fetch_add(1, Ordering::Relaxed);
                            let node = self.link.node.clone();
                            let taken = (key, revision, value);
                            self.spawn_will(kv.clone(), taken, &node, shards, router);
                        }
                        // Written since: its device is back, or a survivor took it.
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                        Err(_) => {
                            retry.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .await;
        let (claimed, retry) = (claimed.into_inner(), retry.into_inner());
        tracing::info!(wills = total, claimed, left_for_next_pass = retry, "cluster: claimed the wills the last run left (the others were written since: their device is back, or another node took them)");
        match retry {
            0 => Ok(()),
            n => Err(format!("{n} claims failed")),
        }
    }

    /// This node's will keys holding a will written at or before revision `up_to`.
    async fn read_leftover(&self, up_to: u64) -> Result<Vec<Leftover>, String> {
        let consumer: PullConsumer = self
            .kv
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::LastPerSubject,
                filter_subject: format!("{}.will.{}.>", self.kv_prefix, self.link.node),
                // nats-server 2.9 refuses a pull consumer without acknowledgements.
                ack_policy: AckPolicy::All,
                max_ack_pending: READ_BATCH as i64,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
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
    ) -> Result<Vec<Leftover>, String> {
        let why = |e: &dyn std::fmt::Display| format!("reading the wills the last run left: {e}");
        let prefix = format!("{}.", self.kv_prefix);
        let (mut wills, mut seen) = (Vec::new(), 0u64);
        while left > 0 {
            let fetch = consumer.fetch().max_messages(READ_BATCH).messages();
            let mut batch = fetch.await.map_err(|e| why(&e))?;
            let mut last = None;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| why(&e))?;
                let revision = m.info().map_err(|e| why(&e))?.stream_sequence;
                (left, seen) = (left.saturating_sub(1), seen + 1);
                if revision <= up_to && !m.payload.is_empty() && *m.payload != *CLAIMED {
                    let key = m.subject.trim_start_matches(&prefix).to_string();
                    wills.push((key, revision, m.payload.clone()));
                }
                last = Some(m);
            }
            let Some(last) = last else {
                // Fewer than counted: keys purged meanwhile (by a survivor).
                tracing::debug!(left, "cluster: the leftover wills' read ended early");
                break;
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

/// Whether `client_id` has a live connection on this node. A shard that cannot be asked
/// (stopping, or its mailbox full for 5 s) counts as yes: no will is published for a
/// device that may be connected.
pub(super) async fn online_here(shards: &Mailboxes, client_id: &str) -> bool {
    let home = home_shard(client_id, shards.len());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = ShardMsg::ClientInfo {
        client_id: client_id.to_string(),
        reply,
    };
    let asked = tokio::time::timeout(Duration::from_secs(5), shards.send(home, ask)).await;
    if !matches!(asked, Ok(Ok(()))) {
        tracing::warn!(%client_id, "cluster: cannot ask the shard whether a client is online; its will from the last run is not published");
        return true;
    }
    match answer.await {
        Ok(Some(c)) => c.summary.online,
        Ok(None) => false,
        Err(_) => true, // the shard is stopping
    }
}
