//! Re-sync of the fleet's copy of the persistent sessions after a NATS outage (issue 20):
//! the session changes this node made while it could not write them to JetStream
//! (records, subscriptions added or removed, queued and acknowledged messages, sessions
//! ended, QoS 2 state) reach JetStream once NATS is back, so that a later `kill -9` of the
//! node loses nothing acknowledged after the outage.
//!
//! Each commit group JetStream did not take is kept here, in order, as its changes (the
//! acknowledging task, `acker`, appends it, so the order is the store writer's); while
//! some are kept, later groups are appended too instead of being written past them, and
//! so is a group JetStream took that the mirror wrote before the earlier failure was
//! known (it is written again after the earlier group, so that it stays the newer). The
//! mirror task (`sessions`) writes them again once NATS is up, a batch of at most
//! [`BATCH`] changes per step, each batch acked before the next (so a batch that fails
//! again goes back to the front), between the groups it hands on. What is kept is bounded
//! by `cluster.session_resync_max_mib` of values and subjects: past that, a group is not
//! kept (counted, logged once per outage) and the fleet's copy stays behind until the
//! node's next start writes every session it holds again (`SessionStore::start`).
//!
//! **A session that moved meanwhile.** A device of this node may resume its session on
//! another node while this node is cut off (that node restores the fleet's copy); this
//! node's copy is stale from then on. Before a batch is written again, the fleet's record
//! is read for each client id whose record or restart `Reset` the batch holds: such a
//! change made here more than `cluster.clock_skew_ms` before another node's last write of
//! that session's record is not written over it (counted in
//! `gateway_fleet_session_resync_skipped_total`, logged; a `Reset` would purge the other
//! node's copy), and when the client's last change in the batch is one of them, the copy
//! here ends unless its device is back (`ShardMsg::StaleCopy`: the fleet's copy is left
//! alone), once per re-sync. The registry's late claim of such a session is refused too
//! (`registry.rs`, `takes_over`). A session a survivor took in from this node while it was
//! cut off is not written there, so this node's newer records still go in. The batch's
//! other changes stay: messages queued here reach the client id's subject
//! (docs/CLUSTER.md, "What a partition does"), and a session's end is guarded by the
//! registry already (`SessionStore::gone`).
//!
//! Pushes waiting for a kept group are answered `dropped` (`store_error`) at once, as
//! before: their messages are in this node's store and reach JetStream with the re-sync,
//! but that was not true when they were answered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::acker::Ack;
use super::restore::Written;
use super::session_changes::Change;
use super::sessions::{Failed, SessionStore};

/// Changes written again per step of the re-sync.
pub(super) const BATCH: usize = 1000;

/// Record reads at once when a batch is checked for records made stale elsewhere.
const RECORD_READS_AT_ONCE: usize = 64;

/// How often the mirror task looks for kept changes to write again.
pub(super) const TICK: Duration = Duration::from_millis(200);

/// The changes kept for the re-sync, in order, and what they cost.
pub(super) struct Resync {
    state: Mutex<Kept>,
    max_bytes: u64,
}

#[derive(Default)]
struct Kept {
    changes: VecDeque<Change>,
    bytes: u64,
    /// A group was not kept since the last re-sync finished (logged once).
    overflowed: bool,
    /// When the re-sync now under way began, and how many changes it wrote so far.
    running: Option<(Instant, u64)>,
    /// Sessions whose copy here the re-sync under way ended as stale (once each: a later
    /// batch's older changes must not end a copy its device adopted since).
    ended: HashSet<Arc<str>>,
}

impl Resync {
    pub(super) fn new(max_mib: u32) -> Resync {
        Resync {
            state: Mutex::default(),
            max_bytes: u64::from(max_mib) << 20,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether changes are waiting: a new group goes behind them.
    pub(super) fn waiting(&self) -> bool {
        !self.kept().changes.is_empty()
    }

    /// Whether changes are waiting or a re-sync is under way (its last batch may be in
    /// flight with nothing left waiting): a stopping node is not done with JetStream.
    pub(super) fn unfinished(&self) -> bool {
        let kept = self.kept();
        !kept.changes.is_empty() || kept.running.is_some()
    }
}

/// The client id and time (Unix ms, this node's clock) of a record or restart reset made
/// here; `None` for any other change.
fn made_here(c: &Change) -> Option<(&Arc<str>, u64)> {
    match c {
        Change::Record {
            client_id, made_ms, ..
        }
        | Change::Reset { client_id, made_ms } => Some((client_id, *made_ms)),
        _ => None,
    }
}

impl SessionStore {
    /// Keeps a group JetStream did not take (called in order by the acknowledging task).
    pub(super) fn keep_for_resync(&self, group: Vec<Change>) {
        let cost: u64 = group.iter().map(Change::cost).sum();
        let mut kept = self.resync.kept();
        if kept.bytes + cost > self.resync.max_bytes {
            self.metrics.resync_dropped.inc_by(group.len() as u64);
            if !std::mem::replace(&mut kept.overflowed, true) {
                tracing::error!(
                    kept_changes = kept.changes.len(),
                    "cluster: session changes made while NATS is away exceed cluster.session_resync_max_mib; later ones are not re-synced (the fleet's copy stays behind until this node restarts)"
                );
            }
            return;
        }
        kept.bytes += cost;
        kept.changes.extend(group);
        self.metrics.resync_pending.set(kept.changes.len() as i64);
    }

    /// One step of the re-sync, if changes are kept and NATS is up: everything handed to
    /// the acknowledging task before is settled first (its failures kept), then a batch is
    /// written and acked; one that fails goes back to the front.
    pub(super) async fn resync_step(&self, acks: &tokio::sync::mpsc::Sender<Ack>) {
        if !self.link.connected() || !self.resync.waiting() {
            return;
        }
        let mut none = Vec::new();
        // Errors of earlier groups are the acknowledging task's (kept there).
        let _ = self.barrier(acks, &mut none).await;
        let batch = self.take_batch();
        if batch.is_empty() {
            return;
        }
        let batch = match self.without_stale_records(batch).await {
            Ok(batch) => batch,
            Err((batch, e)) => return self.put_back(batch, &e),
        };
        let n = batch.len();
        let mut result = self.apply(batch.clone(), acks).await;
        if result.is_ok() {
            result = self.barrier(acks, &mut none).await;
        }
        // Ends the step's group in the acknowledging task (nothing to keep or answer).
        let _ = acks
            .send(Ack::End {
                changes: 0,
                result: Ok(()),
                kept: None,
            })
            .await;
        match result {
            Ok(()) => self.resynced(n),
            Err(e) => self.put_back(batch, &e),
        }
    }

    /// `batch` without the records (and restart `Reset`s) another node's later write of
    /// the same session made stale (module doc); the copy here of each session whose
    /// last such change in the batch is stale ends, once per re-sync. A read that fails
    /// hands the whole batch back, to be tried again.
    async fn without_stale_records(
        &self,
        batch: Vec<Change>,
    ) -> Result<Vec<Change>, (Vec<Change>, Failed)> {
        // Each client's last record or reset in the batch, by when it was made here.
        let mut last: HashMap<Arc<str>, u64> = HashMap::new();
        for c in &batch {
            if let Some((client_id, made_ms)) = made_here(c) {
                last.insert(client_id.clone(), made_ms);
            }
        }
        if last.is_empty() {
            return Ok(batch);
        }
        let fleet = match self.fleet_records(last.keys().cloned().collect()).await {
            Ok(fleet) => fleet,
            Err(e) => return Err((batch, e)),
        };
        let skew = self.clock_skew_ms;
        let stale = |client_id: &Arc<str>, made_ms: u64| {
            (fleet.get(client_id)).is_some_and(|w| w.elsewhere_after(made_ms, skew))
        };
        let kept: Vec<Change> = (batch.into_iter())
            .filter(|c| match made_here(c) {
                Some((client_id, made_ms)) if stale(client_id, made_ms) => {
                    self.metrics.resync_skipped.inc();
                    false
                }
                _ => true,
            })
            .collect();
        let ended: Vec<Arc<str>> = (last.into_iter())
            .filter(|(client_id, made_ms)| stale(client_id, *made_ms))
            .map(|(client_id, _)| client_id)
            .filter(|client_id| self.resync.kept().ended.insert(client_id.clone()))
            .collect();
        for client_id in &ended {
            tracing::info!(%client_id, "cluster: re-sync: another node wrote this session after this node's last change to it (its device resumed there while NATS was away); the record from here is not written over it, and the copy here ends if its device is not back");
            if let Some(shards) = self.shards.get() {
                super::registry::end_stale_copy(shards, client_id);
            }
        }
        Ok(kept)
    }

    /// When and by whom the fleet's record of each of `ids` was last written (those
    /// that have one), read [`RECORD_READS_AT_ONCE`] at a time.
    async fn fleet_records(
        &self,
        ids: Vec<Arc<str>>,
    ) -> Result<HashMap<Arc<str>, Written>, Failed> {
        let reads = ids.into_iter().map(|id| async move {
            let written = self.record_written(&id).await;
            (id, written)
        });
        let mut reads = futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(reads),
            RECORD_READS_AT_ONCE,
        );
        let mut fleet = HashMap::new();
        while let Some((id, written)) = futures_util::StreamExt::next(&mut reads).await {
            match written {
                Ok(Some(w)) => {
                    fleet.insert(id, w);
                }
                Ok(None) => {}
                Err(e) => return Err((id, format!("session record: {e}"))),
            }
        }
        Ok(fleet)
    }

    fn take_batch(&self) -> Vec<Change> {
        let mut kept = self.resync.kept();
        if kept.running.is_none() {
            tracing::info!(
                changes = kept.changes.len(),
                "cluster: NATS is back; re-syncing the session changes made while it was away"
            );
            kept.running = Some((Instant::now(), 0));
        }
        let n = kept.changes.len().min(BATCH);
        let batch: Vec<Change> = kept.changes.drain(..n).collect();
        kept.bytes = kept
            .bytes
            .saturating_sub(batch.iter().map(Change::cost).sum());
        batch
    }

    fn resynced(&self, n: usize) {
        self.metrics.resync_written.inc_by(n as u64);
        let mut kept = self.resync.kept();
        let left = kept.changes.len();
        self.metrics.resync_pending.set(left as i64);
        let Some((began, done)) = kept.running.as_mut() else {
            return;
        };
        *done += n as u64;
        let (began, done) = (*began, *done);
        if left > 0 {
            tracing::debug!(written = done, left, "cluster: re-sync progress");
            return;
        }
        kept.running = None;
        kept.overflowed = false;
        kept.ended.clear();
        tracing::info!(
            changes = done,
            ms = began.elapsed().as_millis() as u64,
            "cluster: session changes made while NATS was away are in JetStream"
        );
    }

    fn put_back(&self, batch: Vec<Change>, (client_id, e): &Failed) {
        tracing::debug!(%client_id, error = %e, "cluster: a re-sync batch failed; it is tried again");
        let mut kept = self.resync.kept();
        kept.bytes += batch.iter().map(Change::cost).sum::<u64>();
        for c in batch.into_iter().rev() {
            kept.changes.push_front(c);
        }
    }
}
