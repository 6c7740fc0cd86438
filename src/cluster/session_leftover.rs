//! Wills of a node back after a crash within its lease (issue 20): no other node counted
//! it dead, so nobody published the wills its last run left in the session bucket.
//!
//! **Read at start.** When the store says the last run ended without letting go of it
//! (its pid file was left: a crash, `kill -9`), the start reads, before any device
//! connects, the last value and revision of each of this node's will keys in one pass (a
//! short-lived consumer, last value per subject) and keeps the non-empty ones. A clean
//! stop publishes no wills and reads nothing here. Restored sessions that were online at
//! the crash leave their keys as they are (`shard/durable.rs`).
//!
//! **Claimed and published once the node runs.** Each is claimed by compare-and-set on
//! the revision read: a key written since (its device back here, with a new will or
//! none) is not claimed, and a survivor that took it first (the lease had run out) wins
//! it instead. A claimed will is published as a survivor would publish it
//! (`session_will::spawn_will`), after its delay, unless its device is back: on another
//! node, or online here.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::mailbox::{home_shard, Mailboxes, ShardMsg};

use super::routing::Router;
use super::session_will::CLAIMED;
use super::sessions::SessionStore;

/// Claims in flight at once.
const CLAIMS_AT_ONCE: usize = 64;
/// Entries read per request at start.
const READ_BATCH: usize = 1000;

/// A will this node's last run left: its key, the revision read, its value.
pub(super) type Leftover = (String, u64, Bytes);

impl SessionStore {
    /// Reads the wills this node's last run left (see the module doc); how many.
    pub async fn read_leftover_wills(&self) -> Result<usize, String> {
        let filter = format!("{}.will.{}.>", self.kv_prefix, self.link.node);
        let consumer: PullConsumer = self
            .kv
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::LastPerSubject,
                filter_subject: filter,
                // nats-server 2.9 refuses a pull consumer without acknowledgements.
                ack_policy: AckPolicy::All,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("leftover wills consumer: {e}"))?;
        let name = consumer.cached_info().name.clone();
        let left = consumer.cached_info().num_pending;
        let read = self.read_all(&consumer, left).await;
        let _ = self.kv.delete_consumer(&name).await;
        let wills = read?;
        let n = wills.len();
        *self
            .leftover_wills
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = wills;
        Ok(n)
    }

    /// The non-empty, unclaimed values among the `left` entries `consumer` delivers.
    async fn read_all(
        &self,
        consumer: &PullConsumer,
        mut left: u64,
    ) -> Result<Vec<Leftover>, String> {
        let prefix = format!("{}.", self.kv_prefix);
        let (mut wills, mut seen) = (Vec::new(), 0u64);
        while left > 0 {
            let fetch = consumer.fetch().max_messages(READ_BATCH).messages();
            let mut batch = fetch.await.map_err(|e| format!("leftover wills: {e}"))?;
            let mut last = None;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| format!("leftover wills: {e}"))?;
                let revision = m
                    .info()
                    .map_err(|e| format!("leftover wills: {e}"))?
                    .stream_sequence;
                left = left.saturating_sub(1);
                seen += 1;
                if !m.payload.is_empty() && *m.payload != *CLAIMED {
                    let key = m.subject.trim_start_matches(&prefix).to_string();
                    wills.push((key, revision, m.payload.clone()));
                }
                last = Some(m);
            }
            let Some(last) = last else {
                break; // nothing more came
            };
            let _ = last.ack().await;
            if seen % 100_000 < READ_BATCH as u64 {
                tracing::info!(
                    read = seen,
                    wills = wills.len(),
                    "cluster: reading the wills this node's last run left"
                );
            }
        }
        Ok(wills)
    }

    /// Claims and publishes the wills read at start (see the module doc).
    pub(super) async fn publish_leftover_wills(
        &self,
        shards: &Mailboxes,
        router: &std::sync::Arc<Router>,
    ) {
        let wills = std::mem::take(
            &mut *self
                .leftover_wills
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if wills.is_empty() {
            return;
        }
        let kv = match self.will_bucket().await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(error = %e, wills = wills.len(), "cluster: the wills this node's last run left are not published");
                return;
            }
        };
        let total = wills.len();
        let claimed = std::sync::atomic::AtomicUsize::new(0);
        futures_util::stream::iter(wills)
            .for_each_concurrent(CLAIMS_AT_ONCE, |(key, revision, value)| {
                let (kv, claimed) = (&kv, &claimed);
                async move {
                    let claim = kv.update(&key, Bytes::from_static(CLAIMED), revision);
                    if let Ok(revision) = claim.await {
                        claimed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let node = self.link.node.clone();
                        self.spawn_will(kv.clone(), (key, revision, value), &node, shards, router);
                    }
                }
            })
            .await;
        let claimed = claimed.into_inner();
        tracing::info!(wills = total, claimed, "cluster: claimed the wills this node's last run left (the others were written again since, or taken by another node)");
    }
}

/// Whether `client_id` has a live connection on this node. A shard that cannot be asked
/// (its mailbox stays full) counts as yes: no will is published for a device that may
/// be connected.
pub(super) async fn online_here(shards: &Mailboxes, client_id: &str) -> bool {
    let home = home_shard(client_id, shards.len());
    for _ in 0..20 {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = ShardMsg::ClientInfo {
            client_id: client_id.to_string(),
            reply,
        };
        if shards.try_send(home, ask).is_ok() {
            return match answer.await {
                Ok(Some(c)) => c.summary.online,
                Ok(None) => false,
                Err(_) => true, // the shard is stopping
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(%client_id, "cluster: cannot ask the shard whether a client is online; its will from the last run is not published");
    true
}
