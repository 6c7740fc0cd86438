//! The writer thread: owns the database, drains waiting batches into one write
//! transaction (group commit: one fsync for all of them), then answers the pushes that
//! waited for durability and publishes each shard's commit on its `CommitSignal`.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable};

use crate::config::StoreDurability;
use crate::lockholder::PidFile;

use super::handle::{fail_replies, Batch, DeferredReply, Op};
use super::load::maybe_compact;
use super::metrics::StoreMetrics;
use super::open::now_ms;
use super::records::{
    encode_message, encode_qos2_in, encode_qos2_out, encode_session, encode_sub, MESSAGES, QOS2_IN,
    QOS2_OUT, RETAINED, SESSIONS, SUBS,
};

/// The writer looks at free space after being idle this long.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(10);
/// The writer thread: owns the database, commits batches in groups.
pub(super) struct Writer {
    pub(super) db: Database,
    pub(super) rx: Receiver<Batch>,
    pub(super) durability: StoreDurability,
    pub(super) max_batch: usize,
    pub(super) commit_interval: Duration,
    pub(super) sync_interval: Duration,
    pub(super) metrics: Arc<StoreMetrics>,
    /// A commit failed and nothing has succeeded since (logged once per episode).
    pub(super) failing: bool,
    /// Names this process as the store's holder; after `db` so it goes once the lock has.
    pub(super) _pid_file: PidFile,
}

impl Writer {
    pub(super) fn run(mut self) {
        // With `durability = "eventual"`: when the oldest commit not yet on disk was made,
        // and the answers that wait for it. A non-durable redb commit is lost on kill -9,
        // so a `queued` answer is only released by the fsync that follows (at most
        // `sync_interval` later, even under constant load).
        let mut unsynced_since: Option<Instant> = None;
        let mut held: Vec<DeferredReply> = Vec::new();
        loop {
            let wait = match unsynced_since {
                Some(t) => self.sync_interval.saturating_sub(t.elapsed()),
                None => IDLE_CHECK,
            };
            let first = match self.rx.recv_timeout(wait) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => {
                    if unsynced_since.take().is_some() {
                        self.sync_and_answer(&mut held);
                    } else {
                        maybe_compact(&mut self.db, &self.metrics);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batches = vec![first];
            let mut ops = batches[0].ops.len();
            if !self.commit_interval.is_zero() {
                let deadline = Instant::now() + self.commit_interval;
                while ops < self.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(left) {
                        Ok(b) => {
                            ops += b.ops.len();
                            batches.push(b);
                        }
                        Err(_) => break,
                    }
                }
            }
            while ops < self.max_batch {
                match self.rx.try_recv() {
                    Ok(b) => {
                        ops += b.ops.len();
                        batches.push(b);
                    }
                    Err(_) => break,
                }
            }
            let ok = self.commit(&batches, ops);
            let eventual = self.durability == StoreDurability::Eventual;
            if ok && eventual {
                unsynced_since.get_or_insert_with(Instant::now);
            }
            for b in batches {
                if let Some(signal) = &b.signal {
                    signal.finish(b.seq, ok);
                }
                if !ok {
                    fail_replies(b.replies);
                } else if eventual {
                    held.extend(b.replies);
                } else {
                    for (tx, outcomes) in b.replies {
                        let _ = tx.send(outcomes);
                    }
                }
            }
            if unsynced_since.is_some_and(|t| t.elapsed() >= self.sync_interval) {
                unsynced_since = None;
                self.sync_and_answer(&mut held);
            }
        }
        if unsynced_since.is_some() {
            self.sync_and_answer(&mut held);
        }
        self.metrics.refresh_size();
        tracing::debug!("store writer stopped");
    }

    /// Makes the earlier non-durable commits durable, then releases the answers that
    /// waited for them (or fails them if the fsync failed).
    fn sync_and_answer(&mut self, held: &mut Vec<DeferredReply>) {
        let ok = self.sync();
        let replies = std::mem::take(held);
        if ok {
            for (tx, outcomes) in replies {
                let _ = tx.send(outcomes);
            }
        } else {
            fail_replies(replies);
        }
    }

    /// An empty fsync'ing commit: makes earlier non-durable commits durable.
    fn sync(&mut self) -> bool {
        let r = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|tx| {
                tx.commit()?;
                Ok(())
            });
        if let Err(e) = &r {
            tracing::error!(error = %e, "store sync failed");
        }
        r.is_ok()
    }

    fn commit(&mut self, batches: &[Batch], ops: usize) -> bool {
        if ops == 0 {
            return true;
        }
        let started = Instant::now();
        let result = self.apply(batches);
        match result {
            Ok(()) => {
                if self.failing {
                    tracing::info!("store commits succeed again");
                    self.failing = false;
                }
                self.metrics.commits.inc();
                self.metrics.ops.inc_by(ops as u64);
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.batch_ops.observe(ops as f64);
                true
            }
            Err(e) => {
                self.metrics.errors.inc();
                if !self.failing {
                    tracing::error!(error = %e, file = %self.metrics.path.display(), "store commit failed; pushes are answered dropped/store_error, and after an I/O error redb refuses every later write until the gateway is restarted");
                    self.failing = true;
                }
                false
            }
        }
    }

    /// A write transaction with the configured durability.
    fn begin(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let mut tx = self.db.begin_write()?;
        let durability = match self.durability {
            StoreDurability::Immediate => redb::Durability::Immediate,
            StoreDurability::Eventual => redb::Durability::None,
        };
        tx.set_durability(durability)
            .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        // Saves the allocator state with each commit, so a restart after a crash does not
        // walk the whole file to rebuild it.
        tx.set_quick_repair(true);
        Ok(tx)
    }

    fn apply(&mut self, batches: &[Batch]) -> Result<(), redb::Error> {
        let tx = self.begin()?;
        let mut t = Tables {
            sessions: tx.open_table(SESSIONS)?,
            subs: tx.open_table(SUBS)?,
            messages: tx.open_table(MESSAGES)?,
            retained: tx.open_table(RETAINED)?,
            qos2_out: tx.open_table(QOS2_OUT)?,
            qos2_in: tx.open_table(QOS2_IN)?,
            buf: Vec::with_capacity(256),
            now: Instant::now(),
            now_wall: now_ms(),
        };
        for op in batches.iter().flat_map(|b| &b.ops) {
            t.apply(op)?;
        }
        drop(t);
        tx.commit()?;
        Ok(())
    }
}

/// The tables of one write transaction, and what encoding values needs.
struct Tables<'tx> {
    sessions: redb::Table<'tx, &'static str, &'static [u8]>,
    subs: redb::Table<'tx, (&'static str, &'static str), &'static [u8]>,
    messages: redb::Table<'tx, (&'static str, u64), &'static [u8]>,
    retained: redb::Table<'tx, &'static str, &'static [u8]>,
    qos2_out: redb::Table<'tx, (&'static str, u64), &'static [u8]>,
    qos2_in: redb::Table<'tx, (&'static str, u16), &'static [u8]>,
    buf: Vec<u8>,
    now: Instant,
    now_wall: u64,
}

impl Tables<'_> {
    fn apply(&mut self, op: &Op) -> Result<(), redb::Error> {
        let buf = &mut self.buf;
        match op {
            Op::Session {
                client_id,
                version,
                expiry_secs,
                offline_since_ms,
            } => {
                encode_session(buf, client_id, *version, *expiry_secs, *offline_since_ms);
                self.sessions.insert(&**client_id, buf.as_slice())?;
            }
            Op::DeleteSession(id) => {
                self.sessions.remove(&**id)?;
                self.remove_client_rows(id)?;
            }
            Op::Sub {
                client_id,
                filter,
                options,
                sub_id,
            } => {
                encode_sub(buf, client_id, filter, *options, *sub_id);
                self.subs
                    .insert((&**client_id, &**filter), buf.as_slice())?;
            }
            Op::DeleteSub { client_id, filter } => {
                self.subs.remove((&**client_id, &**filter))?;
            }
            Op::Message {
                client_id,
                seq,
                msg,
                qos,
                retain,
            } => {
                let key: [&[u8]; 2] = [client_id.as_bytes(), &seq.to_le_bytes()];
                encode_message(buf, &key, msg, *qos, *retain, self.now, self.now_wall);
                self.messages.insert((&**client_id, *seq), buf.as_slice())?;
            }
            Op::DeleteMessage { client_id, seq } => {
                self.messages.remove((&**client_id, *seq))?;
                self.qos2_out.remove((&**client_id, *seq))?;
            }
            Op::Retained(msg) => {
                let key: [&[u8]; 1] = [msg.topic.as_bytes()];
                encode_message(buf, &key, msg, msg.qos, true, self.now, self.now_wall);
                self.retained.insert(&*msg.topic, buf.as_slice())?;
            }
            Op::DeleteRetained(topic) => {
                self.retained.remove(&**topic)?;
            }
            Op::Qos2Out {
                client_id,
                seq,
                pkid,
                released,
            } => {
                encode_qos2_out(buf, client_id, *seq, *pkid, *released);
                self.qos2_out.insert((&**client_id, *seq), buf.as_slice())?;
            }
            Op::Qos2In { client_id, pkid } => {
                encode_qos2_in(buf, client_id, *pkid);
                self.qos2_in.insert((&**client_id, *pkid), buf.as_slice())?;
            }
            Op::DeleteQos2In { client_id, pkid } => {
                self.qos2_in.remove((&**client_id, *pkid))?;
            }
        }
        Ok(())
    }

    /// Deletes a client's subscriptions, messages and QoS 2 state (its session row is
    /// deleted by the caller).
    fn remove_client_rows(&mut self, id: &str) -> Result<(), redb::Error> {
        let filters: Vec<String> = self
            .subs
            .range((id, "")..)?
            .map_while(|r| {
                let (k, _) = r.ok()?;
                let (cid, f) = k.value();
                (cid == id).then(|| f.to_string())
            })
            .collect();
        for f in filters {
            self.subs.remove((id, f.as_str()))?;
        }
        for seq in keys_of(&self.messages, id)? {
            self.messages.remove((id, seq))?;
            self.qos2_out.remove((id, seq))?;
        }
        for pkid in keys_of(&self.qos2_in, id)? {
            self.qos2_in.remove((id, pkid))?;
        }
        Ok(())
    }
}

/// The second key parts of client `id`'s rows in a table keyed (client id, number).
fn keys_of<N>(
    table: &redb::Table<'_, (&'static str, N), &'static [u8]>,
    id: &str,
) -> Result<Vec<N>, redb::Error>
where
    N: redb::Key + for<'a> redb::Value<SelfType<'a> = N> + Copy + Bounded + 'static,
{
    Ok(table
        .range((id, N::MIN)..=(id, N::MAX))?
        .filter_map(|r| r.ok().map(|(k, _)| k.value().1))
        .collect())
}

/// The smallest and largest numbers of a key part.
trait Bounded {
    const MIN: Self;
    const MAX: Self;
}

impl Bounded for u64 {
    const MIN: u64 = 0;
    const MAX: u64 = u64::MAX;
}

impl Bounded for u16 {
    const MIN: u16 = 0;
    const MAX: u16 = u16::MAX;
}
