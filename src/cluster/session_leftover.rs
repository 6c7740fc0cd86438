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
//! (`session_will::will_task`; at most 256 at once), after its delay, unless its device
//! is back: on another node, or here (its key written since the claim, or online now);
//! when that cannot be told, the claim is given back. A device back before its will is
//! read (a persistent session, or a connection with a will) has written its key again,
//! so its old will is not published at all: for the usual retained "offline" will,
//! publishing it after the device's "online" would be wrong. What a pass did not settle
//! (a failed read, a claim that failed or timed out, a claim given back) is taken up by
//! the next pass, every `lease_secs`; the marker goes once a pass settled everything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::kv::{self, UpdateErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::mailbox::{home_shard, Mailboxes, ShardMsg};

use super::routing::Router;
use super::session_will::{Settled, CLAIMED};
use super::sessions::SessionStore;

/// Claims in flight at once.
const CLAIMS_AT_ONCE: usize = 64;
/// Entries read per request.
const READ_BATCH: usize = 1000;
/// How long the read waits for the next entry.
const READ_WAIT: Duration = Duration::from_secs(10);

/// What the start noted: the stream revision up to which will keys are the last run's,
/// the marker to remove once they are handled, and the wills a pass could not settle.
pub(super) struct Pending {
    up_to: u64,
    marker: PathBuf,
    retry: Vec<Retry>,
}

/// A will a pass could not settle: its key and value (its claim may or may not have
/// been written, or was given back).
type Retry = (String, Bytes);

/// A will the last run left: its key, revision, and value.
type Leftover = (String, u64, Bytes);

/// A will to hand to `will_task`: claimed by this pass, or (`true`) found claimed
/// already by an earlier pass whose claim timed out.
type Claim = (Leftover, bool);

impl SessionStore {
    /// At start, before any device connects, with the marker there: notes the bucket's
    /// last revision (see the module doc).
    pub async fn note_leftover_wills(&self, marker: PathBuf) -> Result<(), String> {
        let info = self.kv.get_info().await.map_err(|e| e.to_string())?;
        let up_to = info.state.last_sequence;
        let pending = Pending {
            up_to,
            marker,
            retry: Vec::new(),
        };
        *self.leftover() = Some(pending);
        Ok(())
    }

    fn leftover(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.leftover_wills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Handles the noted wills in passes every `every` until one settles them all (then
    /// the marker goes), or `stop`.
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
            let Some((up_to, retry)) = self
                .leftover()
                .as_mut()
                .map(|p| (p.up_to, std::mem::take(&mut p.retry)))
            else {
                return;
            };
            if !self.link.connected() {
                self.keep_for_retry(retry);
                continue;
            }
            let pass = self.leftover_pass(up_to, retry.clone(), &shards, &router, &stop);
            match pass.await {
                Ok(left) if left.is_empty() && !stop.is_cancelled() => break,
                Ok(left) => {
                    tracing::info!(
                        wills = left.len(),
                        "cluster: some wills the last run left are not settled yet; trying again"
                    );
                    self.keep_for_retry(left);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: handling the wills the last run left did not finish; trying again");
                    self.keep_for_retry(retry);
                }
            }
        }
        let done = self.leftover().take();
        if let Some(p) = done {
            let _ = tokio::fs::remove_file(&p.marker).await;
        }
    }

    fn keep_for_retry(&self, mut retry: Vec<Retry>) {
        if let Some(p) = self.leftover().as_mut() {
            p.retry.append(&mut retry);
        }
    }

    /// One pass: reads (and looks up the wills left to retry), claims, and awaits what
    /// became of each claimed will; the wills left unsettled.
    async fn leftover_pass(
        &self,
        up_to: u64,
        retry: Vec<Retry>,
        shards: &Mailboxes,
        router: &Arc<Router>,
        stop: &CancellationToken,
    ) -> Result<Vec<Retry>, String> {
        let kv = self.will_bucket().await?;
        let mut wills: Vec<Claim> = self
            .read_leftover(up_to)
            .await?
            .into_iter()
            .map(|w| (w, false))
            .collect();
        let (again, unknown) = again(&kv, retry).await;
        wills.extend(again);
        let total = wills.len();
        let left = std::sync::Mutex::new(unknown);
        let tasks = std::sync::Mutex::new(Vec::new());
        futures_util::stream::iter(wills)
            .for_each_concurrent(CLAIMS_AT_ONCE, |((key, revision, value), ours)| {
                let (kv, left, tasks) = (&kv, &left, &tasks);
                async move {
                    if stop.is_cancelled() {
                        return;
                    }
                    let claimed = match ours {
                        true => Ok(revision),
                        false => kv.update(&key, Bytes::from_static(CLAIMED), revision).await,
                    };
                    match claimed {
                        Ok(revision) => {
                            let node = self.link.node.clone();
                            let taken = (key.clone(), revision, value.clone());
                            let task = self.will_task(kv.clone(), taken, &node, shards, router);
                            let task = tokio::spawn(task);
                            tasks
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((task, (key, value)));
                        }
                        // Written since: its device is back, or a survivor took it.
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                        Err(_) => left
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((key, value)),
                    }
                }
            })
            .await;
        let tasks = tasks.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut left = left.into_inner().unwrap_or_else(|p| p.into_inner());
        let claimed = tasks.len();
        tracing::info!(wills = total, claimed, "cluster: claimed the wills the last run left (the others were written since: their device is back, or another node took them)");
        for (task, will) in tasks {
            if !matches!(task.await, Ok(Settled::Published | Settled::Cancelled)) {
                left.push(will);
            }
        }
        Ok(left)
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
            while let Some(m) = tokio::time::timeout(READ_WAIT, batch.next())
                .await
                .map_err(|e| why(&e))?
            {
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

/// The wills an earlier pass left unsettled, as they stand now: still the will (claimed
/// again at its revision), or still `claimed` (an earlier claim that timed out was
/// written: ours); anything else was written since, and is left alone.
/// Those that could not be looked up are kept for the next pass.
async fn again(kv: &kv::Store, retry: Vec<Retry>) -> (Vec<Claim>, Vec<Retry>) {
    let (mut wills, mut unknown) = (Vec::new(), Vec::new());
    for (key, value) in retry {
        match kv.entry(&key).await {
            Ok(Some(e)) if e.value == value => wills.push(((key, e.revision, value), false)),
            Ok(Some(e)) if *e.value == *CLAIMED => wills.push(((key, e.revision, value), true)),
            Ok(_) => {}
            Err(_) => unknown.push((key, value)),
        }
    }
    (wills, unknown)
}

/// Whether `client_id` has a live connection on this node; `None` when the shard cannot
/// be asked (stopping, or its mailbox full for 5 s) or does not answer within 5 s.
pub(super) async fn online_here(shards: &Mailboxes, client_id: &str) -> Option<bool> {
    let home = home_shard(client_id, shards.len());
    if shards.is_closed(home) {
        return None;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = ShardMsg::ClientInfo {
        client_id: client_id.to_string(),
        reply,
    };
    let limit = Duration::from_secs(5);
    let asked = tokio::time::timeout(limit, shards.send(home, ask)).await;
    if !matches!(asked, Ok(Ok(()))) {
        return None;
    }
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(info)) => Some(info.is_some_and(|c| c.summary.online)),
        _ => None,
    }
}
