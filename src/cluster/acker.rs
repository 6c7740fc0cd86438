//! The acknowledgements of the session mirror's publishes (`sessions`), awaited by a task
//! of their own, in order, so that the mirror sends the next commit group's changes while
//! JetStream still acks the previous group's: at 2,000 pushes/s a `queued` answer then
//! waits for its own group's acks, not for every group before it in turn.
//!
//! The mirror asks for a barrier (everything published so far acked, and the stream
//! sequences of its messages known) before a delete or a purge, which may concern what it
//! published: an acknowledged message is deleted by that sequence, and a purge must come
//! after the puts it removes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{fail_replies, DeferredReply};

use super::session_changes::Change;
use super::sessions::{Failed, Pending, SessionStore};

/// How long each ack of a group that already failed is awaited ([`SessionStore::settle`]).
const AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(50);

/// What the mirror hands the acknowledging task, in order.
pub(super) enum Ack {
    /// Publishes of the current commit group, whose acks are awaited in order.
    Part(Pending),
    /// Everything handed over before is acked: the current group's outcome so far.
    Barrier(oneshot::Sender<Result<(), Failed>>),
    /// The current group ended (`result`: how applying it went, besides its acks);
    /// `kept`: its changes, kept for the re-sync if it failed (`session_resync`); `None`
    /// only for a re-sync step's end (it keeps nothing, and is no handed group).
    End {
        changes: usize,
        result: Result<(), Failed>,
        kept: Option<Vec<Change>>,
    },
    /// The answers waiting for the group that just ended.
    Answers(Vec<DeferredReply>),
}

impl SessionStore {
    /// Awaits the acks handed over, group by group, and answers each group's pushes
    /// (failed if JetStream did not take the group).
    pub(super) async fn ack_all(self: Arc<Self>, mut rx: mpsc::Receiver<Ack>) {
        let (mut group, mut last, mut failing) = (Ok(()), Ok(()), false);
        while let Some(ack) = rx.recv().await {
            match ack {
                Ack::Part(pending) => {
                    // Settled after a failure too, for what JetStream did take (the
                    // acks already here; the others not waited for).
                    let patience = group.is_err().then_some(AFTER_FAILURE);
                    let settled = self.settle(pending, patience).await;
                    group = group.and(settled);
                }
                Ack::Barrier(tx) => {
                    let _ = tx.send(group.clone());
                }
                Ack::End {
                    changes,
                    result,
                    kept,
                } => {
                    let ended = std::mem::replace(&mut group, Ok(())).and(result);
                    self.metrics.changes(changes, ended.is_ok());
                    log_transition(&ended, &mut failing);
                    // The end of a group the store writer handed (`groups_handed`); a
                    // re-sync step's end keeps nothing and is not one, and the answers
                    // that follow are not its own (a step may run between a group's
                    // changes and its answers).
                    let handed = kept.is_some();
                    if handed {
                        last = ended.clone();
                    }
                    // A group JetStream took, but applied before an earlier group's
                    // failure was known here (changes wait for the re-sync: all of them
                    // older), is kept too: written again after the earlier one, so that
                    // none of the earlier changes (a session's record, its end) lands
                    // over its newer ones.
                    let replay = ended.is_err() || self.resync.waiting();
                    if let (true, Some(kept)) = (replay, kept) {
                        self.keep_for_resync(kept);
                    }
                    if handed {
                        self.groups_done.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Ack::Answers(replies) if last.is_ok() => {
                    for (tx, outcomes) in replies {
                        let _ = tx.send(outcomes);
                    }
                }
                Ack::Answers(replies) => fail_replies(replies),
            }
        }
    }

    /// Waits, until `deadline`, for every commit group handed to the mirror so far to be
    /// written to JetStream, the re-sync's included: a stopping node must not give up
    /// its lease while its wills' keys may still hold the wills it published itself (a
    /// survivor would publish them again). True if they were.
    pub async fn written(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let done = self.groups_done.load(Ordering::Acquire);
            if done >= self.groups_handed.load(Ordering::Acquire) && !self.resync.unfinished() {
                return true;
            }
            // NATS away: what is left waits for the re-sync, which cannot run.
            if tokio::time::Instant::now() >= deadline || !self.link.connected() {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Waits until everything handed to `acks` so far, and `pending`, is acked.
    pub(super) async fn barrier(
        &self,
        acks: &mpsc::Sender<Ack>,
        pending: &mut Pending,
    ) -> Result<(), Failed> {
        let gone = || (Arc::from("-"), "the mirror is stopping".to_string());
        if !pending.is_empty() {
            let part = Ack::Part(std::mem::take(pending));
            acks.send(part).await.map_err(|_| gone())?;
        }
        let (tx, rx) = oneshot::channel();
        acks.send(Ack::Barrier(tx)).await.map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// Logs once when session changes stop reaching JetStream, and once when they do again.
fn log_transition(last: &Result<(), Failed>, failing: &mut bool) {
    match last {
        Ok(()) if std::mem::take(failing) => {
            tracing::info!("cluster: session changes reach JetStream again");
        }
        Err((client_id, e)) if !std::mem::replace(failing, true) => {
            tracing::warn!(%client_id, error = %e, "cluster: cannot write session changes to JetStream; pushes waiting for them answer dropped (store_error)");
        }
        _ => {}
    }
}
