//! The writer thread: owns the database, drains waiting batches into one write
//! transaction (group commit: one fsync for all of them), then answers the pushes that
//! waited for durability and publishes each shard's commit on its `CommitSignal`.
//!
//! **Recovery.** After a failed commit redb refuses every later write, so the writer
//! answers that group as failed and then reopens the database with backoff (`recover`):
//! meanwhile the store is down (`StoreMetrics::up`, `gateway_store_up 0`), batches that
//! arrive are answered as failed at once, and the changes of every failed batch are kept
//! (up to `max_batch`; past that the writer stops taking batches and the shards hold
//! theirs) and written first, in order, once a reopened database takes a commit. So the
//! file never misses a change the shards' memory made, even one whose answer failed.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable};

use crate::config::StoreDurability;
use crate::lockholder::PidFile;

use super::guard::quietly;
use super::handle::{fail_replies, Batch, Op};
use super::load::maybe_compact;
use super::metrics::StoreMetrics;
use super::open::{now_ms, open_db};
use super::records::{
    encode_message, encode_qos2_in, encode_qos2_out, encode_session, encode_sub, MESSAGES, QOS2_IN,
    QOS2_OUT, RETAINED, SESSIONS, SUBS,
};

/// The writer looks at free space after being idle this long.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(10);
/// The writer thread: owns the database, commits batches in groups.
pub(super) struct Writer {
    /// None only while a reopen after a failure has not succeeded.
    pub(super) db: Option<Database>,
    pub(super) rx: Receiver<Batch>,
    pub(super) durability: StoreDurability,
    pub(super) max_batch: usize,
    pub(super) commit_interval: Duration,
    pub(super) sync_interval: Duration,
    pub(super) metrics: Arc<StoreMetrics>,
    /// The first and the longest wait between reopens after a failure.
    pub(super) backoff: (Duration, Duration),
    /// With `durability = "eventual"`: when the oldest commit not yet on disk was made,
    /// and its changes and the answers that wait for it. A non-durable redb commit is
    /// lost on kill -9 (and on a reopen), so a `queued` answer is only released by the
    /// fsync that follows (at most `sync_interval` later, even under constant load).
    pub(super) unsynced_since: Option<Instant>,
    pub(super) unsynced: Batch,
    /// Names this process as the store's holder; after `db` so it goes once the lock has.
    pub(super) pid_file: Option<PidFile>,
    /// The fleet's copy of the sessions, if set (`mirror`).
    pub(super) mirror: super::mirror::MirrorSlot,
}

impl Writer {
    pub(super) fn run(mut self) {
        loop {
            let wait = match self.unsynced_since {
                Some(t) => self.sync_interval.saturating_sub(t.elapsed()),
                None => IDLE_CHECK,
            };
            let first = match self.rx.recv_timeout(wait) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => {
                    if self.unsynced_since.is_some() {
                        if !self.sync_and_answer() && !self.recover(Vec::new()) {
                            break;
                        }
                    } else if let Some(db) = self.db.as_mut() {
                        maybe_compact(db, &self.metrics);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batches = self.gather(first);
            // NATS takes the changes while the disk does.
            self.mirror_changes(&batches);
            // Wills are the fleet's only: a group of nothing else needs no transaction,
            // and nothing of it waits for an fsync.
            let local = batches.iter().flat_map(|b| &b.ops).filter(|o| o.is_local());
            let local = local.count();
            let ok = self.commit(&batches, local);
            let eventual = self.durability == StoreDurability::Eventual && local > 0;
            self.mirror_answers(&mut batches, ok && !eventual);
            let mut failed = Vec::new();
            for b in &mut batches {
                if !ok {
                    failed.append(&mut b.ops);
                } else if eventual {
                    // Kept until the fsync: a reopen after a failure loses non-durable
                    // commits, and they are written again then.
                    self.unsynced.ops.append(&mut b.ops);
                }
            }
            if ok && eventual {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
            for b in batches {
                b.finish(ok, &self.metrics);
                if !ok {
                    fail_replies(b.replies);
                } else if eventual {
                    self.unsynced.replies.extend(b.replies);
                } else {
                    for (tx, outcomes) in b.replies {
                        let _ = tx.send(outcomes);
                    }
                }
            }
            if !ok && !self.recover(failed) {
                break;
            }
            if self.sync_due() && !self.sync_and_answer() && !self.recover(Vec::new()) {
                break;
            }
        }
        if self.unsynced_since.is_some() {
            self.sync_and_answer();
        }
        self.metrics.refresh_size();
        tracing::debug!("store writer stopped");
    }

    /// Hands the group's changes to the mirror, if one is set, before they are committed.
    fn mirror_changes(&self, batches: &[Batch]) {
        if let Some(mirror) = self.mirror.get() {
            let ops: Vec<&Op> = batches.iter().flat_map(|b| &b.ops).collect();
            mirror.changes(&ops);
        }
    }

    /// After the commit: when `durable` (it made the group durable here), the answers
    /// that wait for it go to the mirror, which sends them once the group's changes are
    /// in the fleet too.
    fn mirror_answers(&self, batches: &mut [Batch], durable: bool) {
        if let (Some(mirror), true) = (self.mirror.get(), durable) {
            mirror.answers(
                batches
                    .iter_mut()
                    .flat_map(|b| b.replies.drain(..))
                    .collect(),
            );
        }
    }

    /// `first` and every batch waiting (for `commit_interval` more if set), up to
    /// `max_batch` changes.
    fn gather(&mut self, first: Batch) -> Vec<Batch> {
        let mut ops = first.ops.len();
        let mut batches = vec![first];
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
        batches
    }

    /// With `eventual`: the fsync is due `sync_interval` after the oldest commit not yet
    /// on disk, or once `max_batch` changes wait for it (they are kept until then).
    fn sync_due(&self) -> bool {
        self.unsynced_since
            .is_some_and(|t| t.elapsed() >= self.sync_interval)
            || self.unsynced.ops.len() >= self.max_batch
    }

    /// Makes the earlier non-durable commits durable, then releases the answers that
    /// waited for them. False if the fsync failed (the answers are failed by `recover`).
    fn sync_and_answer(&mut self) -> bool {
        if !self.sync() {
            self.metrics.errors.inc();
            return false;
        }
        self.unsynced_since = None;
        self.unsynced.ops.clear();
        for (tx, outcomes) in std::mem::take(&mut self.unsynced.replies) {
            let _ = tx.send(outcomes);
        }
        true
    }

    /// An empty fsync'ing commit: makes earlier non-durable commits durable.
    fn sync(&mut self) -> bool {
        let r = self.db().and_then(|db| {
            db.begin_write()?.commit()?;
            Ok(())
        });
        if let Err(e) = &r {
            tracing::error!(error = %e, file = %self.metrics.path.display(), "store sync failed; the store is down until the writer has reopened it");
        }
        r.is_ok()
    }

    fn db(&self) -> Result<&Database, redb::Error> {
        self.db
            .as_ref()
            .ok_or_else(|| redb::Error::Corrupted("the store is not open".into()))
    }

    /// The store is down after a failed commit: answers arriving batches as failed while
    /// it waits, reopens the database with doubling backoff and writes the changes of the
    /// failed batches (`redo`) first. True once it is back; false if the shards are gone
    /// (the gateway stops) before it came back.
    fn recover(&mut self, failed: Vec<Op>) -> bool {
        self.metrics.set_up(false);
        // The non-durable commits since the last fsync are lost with the database too:
        // their answers fail, their changes are written again first.
        self.unsynced_since = None;
        fail_replies(std::mem::take(&mut self.unsynced.replies));
        let mut redo = std::mem::take(&mut self.unsynced);
        redo.ops.extend(failed);
        let started = Instant::now();
        let (mut delay, longest) = self.backoff;
        let mut attempts = 0u32;
        loop {
            if !self.wait_down(delay, &mut redo) {
                tracing::warn!(
                    unwritten = redo.ops.len(),
                    "the gateway stops while the store is down: changes of failed commits are not written"
                );
                return false;
            }
            attempts += 1;
            match self.reopen().and_then(|()| self.write_redo(&redo)) {
                Ok(()) => {
                    self.metrics.set_up(true);
                    tracing::info!(
                        file = %self.metrics.path.display(),
                        attempts,
                        down_ms = started.elapsed().as_millis() as u64,
                        rewritten = redo.ops.len(),
                        "store recovered: reopened and committing again"
                    );
                    return true;
                }
                Err(e) => {
                    delay = (delay * 2).min(longest);
                    tracing::warn!(
                        error = %e,
                        attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        "store still down: reopening it failed"
                    );
                }
            }
        }
    }

    /// Waits `delay` while the store is down, answering each batch that arrives as failed
    /// and keeping its changes in `redo` (up to `max_batch`; past that batches stay in
    /// the channel). False if the channel closed.
    fn wait_down(&mut self, delay: Duration, redo: &mut Batch) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            if redo.ops.len() >= self.max_batch {
                std::thread::sleep(left);
                return true;
            }
            match self.rx.recv_timeout(left) {
                Ok(mut b) => {
                    redo.ops.append(&mut b.ops);
                    b.finish(false, &self.metrics);
                    fail_replies(b.replies);
                }
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Closes the failed database (its lock and pid file go with it) and opens it again.
    fn reopen(&mut self) -> Result<(), String> {
        if let Some(db) = self.db.take() {
            // A database that failed may fail again closing: caught, never fatal.
            let _ = quietly(move || drop(db));
        }
        self.pid_file = None;
        let (db, pid_file) = open_db(&self.metrics.path, false).map_err(|e| e.message)?;
        self.db = Some(db);
        self.pid_file = Some(pid_file);
        Ok(())
    }

    /// The first commit of a reopened database: the changes of the failed batches, made
    /// durable (even empty, it proves the disk takes writes again).
    fn write_redo(&mut self, redo: &Batch) -> Result<(), String> {
        let r = self.apply(std::slice::from_ref(redo));
        let r = r.map_err(|e| e.to_string()).and_then(|()| {
            let eventual = self.durability == StoreDurability::Eventual;
            if eventual && !self.sync() {
                return Err("fsync failed".to_string());
            }
            Ok(())
        });
        if r.is_err() {
            self.metrics.errors.inc();
        }
        r
    }

    /// Commits the group's `ops` changes of the local file (none: nothing to do).
    fn commit(&mut self, batches: &[Batch], ops: usize) -> bool {
        if ops == 0 {
            return true;
        }
        let started = Instant::now();
        let result = self.apply(batches);
        match result {
            Ok(()) => {
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
                tracing::error!(error = %e, file = %self.metrics.path.display(), ops, "store commit failed; its pushes are answered dropped/store_error, and the store is down (pushes that need it get 503 store_unavailable) until the writer has reopened it");
                false
            }
        }
    }

    /// A write transaction with the configured durability.
    fn begin(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let mut tx = self.db()?.begin_write()?;
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
        let op = op.inner();
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
            // The fleet's only (`crate::cluster::session_will`, `sessions`).
            Op::Will { .. } | Op::Adopted { .. } | Op::FleetRecord(_) => {}
            Op::LocalOnly(_) => unreachable!("Op::inner takes it off"),
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
