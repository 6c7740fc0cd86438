//! The durable store: persistent sessions, their QoS 1/2 messages and retained messages
//! survive a crash or restart.
//!
//! **Why redb.** It is pure Rust, embedded (no server, one file), ACID with copy-on-write
//! B-trees and a checksummed commit, and reuses the pages that deletes free. sled is
//! unmaintained on its stable line and its beta has known space-amplification issues;
//! fjall (an LSM) writes faster but needs compaction threads and a directory of files
//! for a workload whose rows mostly die young (queued, then acknowledged); RocksDB is C++
//! behind FFI and a long build. Our write rate is bounded by fsyncs, not by the tree, and
//! group commit turns many pushes into one fsync, so a B-tree is enough.
//!
//! **Threads.** The [`Database`] is owned by one OS thread, the store writer. Shards never
//! touch it: during a loop turn a shard collects small [`Op`]s in its [`StoreHandle`] and at
//! the end of the turn hands them over as one [`Batch`] with `try_send` on a bounded
//! channel. A full channel does not block the shard: it keeps the batch and offers it
//! again next turn (its outbox grows; the HTTP answers waiting on it wait longer, which is
//! the backpressure a backend sees). The writer drains every waiting batch (up to
//! `[store] max_batch` ops) into ONE write transaction, commits it — one fsync for all of
//! them — and only then sends the push answers that waited for durability.
//!
//! **Layout.** Keys are chosen so an acknowledgement is the delete of one key:
//! - `sessions`: client id → version, session expiry, offline-since (wall clock ms; 0 =
//!   online when last written).
//! - `subs`: (client id, filter) → options byte, subscription identifier.
//! - `messages`: (client id, sequence) → one queued or in-flight QoS 1/2 message with
//!   its absolute expiry. Sequences grow per gateway run and across restarts, so a
//!   session's rows read back in delivery order.
//! - `retained`: topic → message.
//!
//! Sessions with expiry 0 and QoS 0 messages are never written.
//!
//! **What waits for the disk.** A push answered `queued` for a persistent session waits
//! for the commit that holds its message. With `durability = "immediate"` so do the MQTT
//! acknowledgements of changes (PUBACK/PUBREC, SUBACK, UNSUBACK, CONNACK): the writer
//! publishes every finished batch on its shard's [`CommitSignal`] and the shard releases
//! them (`shard/held.rs`). A `sent` answer does not: the message is already
//! on the device's socket; it is stored in the same group commit anyway and kept until the
//! PUBACK deletes it, so a crash before the acknowledgement redelivers it. Messages
//! restored after a restart lose their subscription identifiers and shared-group tag, and
//! the first `max_inflight` of each session go out with DUP set (they may have been sent
//! before the crash). A QoS 2 message is deleted at PUBCOMP; one caught between PUBREC and
//! PUBCOMP by a restart is sent again as a PUBLISH with DUP set. Wills are not stored.
//!
//! **Start.** [`open`] loads everything before any shard accepts a connection, deletes
//! what expired while the gateway was down, compacts the file when free pages dominate,
//! and gives every shard its sessions ([`Loaded`]).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::codec::{PublishProps, Version};
use crate::config::{StoreConfig, StoreDurability};
use crate::lockholder::PidFile;
use crate::mailbox::{home_shard, PushOutcome, PushStatus};
use crate::message::{Message, Origin};

/// The database file inside `[store] path`.
pub const FILE_NAME: &str = "gateway.redb";

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const SUBS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("subs");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// Encoding version of session and message values.
const FORMAT: u8 = 1;
/// A load logs its progress every this many sessions.
const PROGRESS_EVERY: usize = 100_000;
/// The writer looks at free space after being idle this long.
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// Compaction is considered only for files larger than this.
const COMPACT_MIN_BYTES: u64 = 16 << 20;

/// One change a shard asks the store to make.
pub enum Op {
    /// Insert or replace a session's record.
    Session {
        client_id: Arc<str>,
        version: Version,
        expiry_secs: u32,
        /// Wall clock ms at which it went offline; 0 while online.
        offline_since_ms: u64,
    },
    /// Delete a session with its subscriptions and messages.
    DeleteSession(Arc<str>),
    Sub {
        client_id: Arc<str>,
        filter: Arc<str>,
        options: u8,
        sub_id: u32,
    },
    DeleteSub {
        client_id: Arc<str>,
        filter: Arc<str>,
    },
    /// A QoS 1/2 message for a session; encoded on the writer thread, not the shard.
    Message {
        client_id: Arc<str>,
        seq: u64,
        msg: Arc<Message>,
        qos: u8,
        retain: bool,
    },
    DeleteMessage {
        client_id: Arc<str>,
        seq: u64,
    },
    Retained(Arc<Message>),
    DeleteRetained(Arc<str>),
}

/// A push answer that waits until its messages are durable.
pub type DeferredReply = (oneshot::Sender<Vec<PushOutcome>>, Vec<PushOutcome>);

/// What one shard hands the writer at the end of a loop turn.
#[derive(Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Sent by the writer after the commit that holds `ops`.
    pub replies: Vec<DeferredReply>,
    /// The shard's number for this batch (1, 2, …), published on `signal` once the
    /// commit that holds it is done.
    pub seq: u64,
    pub signal: Option<Arc<CommitSignal>>,
}

/// How far one shard's batches have been committed, for the MQTT acknowledgements it
/// holds until then (`shard/held.rs`). Written by the store writer after each commit (or
/// by the shard's handle when the writer is gone), read by the shard; `notify` wakes the
/// shard's loop. A permit is stored when the shard is not waiting, so no wake-up is lost.
#[derive(Default)]
pub struct CommitSignal {
    /// The highest batch number whose commit has finished, successfully or not.
    pub done: AtomicU64,
    /// The highest batch number whose commit failed (0: none).
    pub failed: AtomicU64,
    pub notify: tokio::sync::Notify,
}

impl CommitSignal {
    /// Batch `seq` and every earlier one of this shard are finished; `ok` says how.
    fn finish(&self, seq: u64, ok: bool) {
        if !ok {
            self.failed.fetch_max(seq, Relaxed);
        }
        // Release: a shard that sees `done` also sees `failed`.
        self.done
            .fetch_max(seq, std::sync::atomic::Ordering::Release);
        self.notify.notify_one();
    }
}

/// A shard's side of the store: the ops of the current turn and the sequence numbers of
/// the messages it stores.
pub struct StoreHandle {
    tx: SyncSender<Batch>,
    pending: Batch,
    /// Batches the channel did not take yet, oldest first.
    backlog: VecDeque<Batch>,
    next_seq: u64,
    /// Messages put this run (lets a push see whether it stored something).
    pub puts: u64,
    /// The number of the last batch handed over (or queued in `backlog`).
    batch_seq: u64,
    signal: Arc<CommitSignal>,
}

impl StoreHandle {
    pub fn push(&mut self, op: Op) {
        if matches!(op, Op::Message { .. }) {
            self.puts += 1;
        }
        self.pending.ops.push(op);
    }

    /// A fresh message sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Holds `reply` until this turn's ops are committed.
    pub fn defer(&mut self, reply: DeferredReply) {
        self.pending.replies.push(reply);
    }

    /// Ops collected this turn so far (a packet that added some changed durable state).
    pub fn pending_ops(&self) -> usize {
        self.pending.ops.len()
    }

    /// The number the batch of this turn's ops will carry (see [`CommitSignal`]).
    pub fn pending_seq(&self) -> u64 {
        self.batch_seq + 1
    }

    /// Where the writer says how far this shard's batches are committed.
    pub fn signal(&self) -> &Arc<CommitSignal> {
        &self.signal
    }

    /// Offers this turn's batch (and any older ones) to the writer without blocking.
    /// True if some are still waiting (retry next turn).
    pub fn flush(&mut self) -> bool {
        if !self.pending.ops.is_empty() || !self.pending.replies.is_empty() {
            self.batch_seq += 1;
            let mut b = std::mem::take(&mut self.pending);
            b.seq = self.batch_seq;
            b.signal = Some(self.signal.clone());
            self.backlog.push_back(b);
        }
        while let Some(b) = self.backlog.pop_front() {
            match self.tx.try_send(b) {
                Ok(()) => {}
                Err(TrySendError::Full(b)) => {
                    self.backlog.push_front(b);
                    return true;
                }
                Err(TrySendError::Disconnected(b)) => {
                    // The writer is gone (it logged why): nothing more becomes durable.
                    self.signal.finish(b.seq, false);
                    fail_replies(b.replies);
                }
            }
        }
        false
    }

    /// At shard exit: hands everything over, waiting for room if need be.
    pub fn close(mut self) {
        self.flush();
        for b in self.backlog.drain(..) {
            if let Err(e) = self.tx.send(b) {
                self.signal.finish(e.0.seq, false);
                fail_replies(e.0.replies);
            }
        }
    }
}

/// Answers pushes whose messages could not be made durable: `queued` was not earned.
fn fail_replies(replies: Vec<DeferredReply>) {
    for (tx, mut outcomes) in replies {
        for o in &mut outcomes {
            if o.status == PushStatus::Queued {
                o.status = PushStatus::Dropped("store_error");
                o.ack = None;
            }
        }
        let _ = tx.send(outcomes);
    }
}

/// The store's metrics, shared by the writer (only writer) and `/metrics`.
pub struct StoreMetrics {
    path: PathBuf,
    commits: Counter,
    ops: Counter,
    errors: Counter,
    commit_seconds: Histogram,
    batch_ops: Histogram,
    compactions: Counter,
    file_bytes: AtomicU64,
}

impl StoreMetrics {
    fn new(path: PathBuf) -> Self {
        StoreMetrics {
            path,
            commits: Counter::default(),
            ops: Counter::default(),
            errors: Counter::default(),
            commit_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            batch_ops: Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0]),
            compactions: Counter::default(),
            file_bytes: AtomicU64::new(0),
        }
    }

    fn refresh_size(&self) {
        if let Ok(m) = std::fs::metadata(&self.path) {
            self.file_bytes.store(m.len(), Relaxed);
        }
    }

    /// Appends the store families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        self.refresh_size();
        let mut r = Registry::default();
        let bytes: Gauge = Gauge::default();
        bytes.set(self.file_bytes.load(Relaxed) as i64);
        r.register("gateway_store_bytes", "Size of the store file", bytes);
        r.register(
            crate::metrics::counter_family("gateway_store_commits_total"),
            "Store write transactions committed",
            self.commits.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_ops_total"),
            "Store changes (session, subscription, message, retained) committed",
            self.ops.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_errors_total"),
            "Store commits that failed",
            self.errors.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_compactions_total"),
            "Store file compactions",
            self.compactions.clone(),
        );
        r.register(
            "gateway_store_commit_seconds",
            "Time of one store commit including its fsync",
            self.commit_seconds.clone(),
        );
        r.register(
            "gateway_store_batch_ops",
            "Changes per store commit (group commit size)",
            self.batch_ops.clone(),
        );
        crate::metrics::encode_into(&r, out);
    }
}

/// A session read back from the store.
pub struct StoredSession {
    pub client_id: Arc<str>,
    pub version: Version,
    pub expiry_secs: u32,
    /// Wall clock ms it went offline (0: it was online when the gateway stopped).
    pub offline_since_ms: u64,
    pub subs: Vec<(Arc<str>, u8, u32)>,
    pub messages: Vec<StoredMessage>,
}

pub struct StoredMessage {
    pub seq: u64,
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
}

/// Everything loaded at start.
pub struct Loaded {
    /// Sessions by home shard.
    pub sessions: Vec<Vec<StoredSession>>,
    pub retained: Vec<Arc<Message>>,
    /// The first message sequence number this run may use.
    pub next_seq: u64,
}

/// The running writer: its channel, thread and metrics.
pub struct Store {
    tx: Option<SyncSender<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub metrics: Arc<StoreMetrics>,
    next_seq: u64,
}

impl Store {
    /// A handle for one shard.
    pub fn handle(&self) -> Option<StoreHandle> {
        Some(StoreHandle {
            tx: self.tx.clone()?,
            pending: Batch::default(),
            backlog: VecDeque::new(),
            next_seq: self.next_seq,
            puts: 0,
            batch_seq: 0,
            signal: Arc::new(CommitSignal::default()),
        })
    }

    /// Sets the sequence every later handle starts from. Shards own disjoint sessions,
    /// so they may share the starting point: order matters only within a session.
    fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// Stops taking work and waits (at most `timeout`) for the writer to commit what it
    /// has. Call after every shard has exited (their handles are the other senders).
    pub fn close(mut self, timeout: Duration) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("the store writer did not finish in time");
            }
        }
    }
}

/// A store that cannot be opened: the file, what went wrong, and what the operator can do.
#[derive(Debug)]
pub struct OpenError {
    pub file: PathBuf,
    pub message: String,
    pub kind: OpenErrorKind,
}

/// Why a store could not be opened: the two call for opposite advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrorKind {
    /// Missing, damaged or not a gateway store.
    Unusable,
    /// Another process (a running gateway, a store-repair) holds its lock; `pid` when known.
    InUse { pid: Option<u32> },
}

impl OpenError {
    fn unusable(file: &Path, message: String) -> OpenError {
        OpenError {
            file: file.to_path_buf(),
            message,
            kind: OpenErrorKind::Unusable,
        }
    }

    /// True when another process holds the store (not a damaged file).
    pub fn in_use(&self) -> bool {
        matches!(self.kind, OpenErrorKind::InUse { .. })
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match self.kind {
            OpenErrorKind::InUse { pid } => {
                let who = pid.map_or("its PID could not be found".to_string(), |p| {
                    format!("PID {p}")
                });
                write!(
                    f,
                    "store error: {file} is in use by another process ({who}): a gateway \
                     or a store-repair runs on this store. One process at a time uses a \
                     store: stop that process first, or give this gateway its own [store] \
                     path. Do not move or delete the file: it is a live store."
                )
            }
            OpenErrorKind::Unusable => write!(
                f,
                "store error: cannot open {file}: {}\n\
                 The gateway keeps persistent sessions and queued messages there. Choices:\n  \
                 1. try to repair it: gateway store-repair [--config FILE]\n  \
                 2. move it aside and start with an empty store (persistent sessions, queued \
                 and retained messages in it are then not restored): mv {file} {file}.broken\n  \
                 3. or start without a store: [store] enabled = false",
                self.message
            ),
        }
    }
}

impl std::error::Error for OpenError {}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The store file of `config`, absolute (a relative `[store] path` is relative to the
/// working directory; errors and logs name the file it resolved to).
pub fn file_of(config: &StoreConfig) -> PathBuf {
    let file = config.path.join(FILE_NAME);
    std::path::absolute(&file).unwrap_or(file)
}

fn open_db(file: &Path, repair: bool) -> Result<(Database, PidFile), OpenError> {
    let err = |message: String| OpenError::unusable(file, message);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut builder = Database::builder();
    builder.set_repair_callback(move |s| {
        if repair {
            eprintln!("repairing: {:.0}%", s.progress() * 100.0);
        } else {
            tracing::info!(
                progress = format!("{:.0}%", s.progress() * 100.0),
                "store was not closed cleanly; repairing"
            );
        }
    });
    // An open must not go on forever on a file that is not ours: the catch turns a redb
    // panic on garbage into the same clear error.
    let file_owned = file.to_path_buf();
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        builder.create(&file_owned)
    }));
    match opened {
        Ok(Ok(db)) => Ok((db, PidFile::write(file))),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(OpenError {
            kind: OpenErrorKind::InUse {
                pid: crate::lockholder::holder(file),
            },
            ..err("it is in use by another process".into())
        }),
        Ok(Err(e)) => Err(err(format!(
            "{e} (the file is damaged or not a gateway store)"
        ))),
        Err(_) => Err(err(
            "reading it failed (the file is damaged or not a gateway store)".into(),
        )),
    }
}

/// Opens (or creates) the store, loads it, purges what expired, and starts the writer.
pub fn open(config: &StoreConfig, shards: usize) -> Result<(Store, Loaded), OpenError> {
    let file = file_of(config);
    let started = Instant::now();
    let (mut db, pid_file) = open_db(&file, false)?;
    let err = |message: String| OpenError::unusable(&file, message);
    let (loaded, purged) = load(&db, shards).map_err(|e| err(e.to_string()))?;
    purge(&db, &purged).map_err(|e| err(e.to_string()))?;
    let metrics = Arc::new(StoreMetrics::new(file.clone()));
    maybe_compact(&mut db, &metrics);
    metrics.refresh_size();
    let sessions: usize = loaded.sessions.iter().map(Vec::len).sum();
    let messages: usize = loaded
        .sessions
        .iter()
        .flatten()
        .map(|s| s.messages.len())
        .sum();
    tracing::info!(
        file = %file.display(),
        sessions,
        messages,
        retained = loaded.retained.len(),
        purged_sessions = purged.sessions.len(),
        purged_messages = purged.messages.len() + purged.retained.len(),
        bytes = metrics.file_bytes.load(Relaxed),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store loaded"
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_batches.max(1) as usize);
    let writer = Writer {
        db,
        rx,
        durability: config.durability,
        max_batch: config.max_batch.max(1) as usize,
        commit_interval: Duration::from_millis(config.commit_interval_ms as u64),
        sync_interval: Duration::from_millis(config.sync_interval_ms.max(1) as u64),
        metrics: metrics.clone(),
        failing: false,
        _pid_file: pid_file,
    };
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || writer.run())
        .map_err(|e| err(format!("cannot start the store thread: {e}")))?;
    let mut store = Store {
        tx: Some(tx),
        thread: Some(thread),
        metrics,
        next_seq: 0,
    };
    store.set_next_seq(loaded.next_seq);
    Ok((store, loaded))
}

/// `gateway store-repair`: opens the file with redb's repair, checks it, and compacts it.
pub fn repair(config: &StoreConfig) -> Result<String, OpenError> {
    let file = file_of(config);
    if !file.exists() {
        return Err(OpenError::unusable(&file, "no such file".into()));
    }
    let (mut db, _pid_file) = open_db(&file, true)?;
    let err = |message: String| OpenError::unusable(&file, message);
    match db.check_integrity() {
        Ok(true) => {}
        Ok(false) => {
            return Err(err(
                "redb repaired it but the check still fails; move it aside".into(),
            ))
        }
        Err(e) => return Err(err(format!("integrity check failed: {e}"))),
    }
    // A full read proves every row decodes.
    let (loaded, _) = load(&db, 1).map_err(|e| err(e.to_string()))?;
    let _ = db.compact();
    Ok(format!(
        "{}: OK ({} sessions, {} retained messages)",
        file.display(),
        loaded.sessions[0].len(),
        loaded.retained.len()
    ))
}

/// Keys to delete at start: expired or orphaned rows.
#[derive(Default)]
struct Purge {
    sessions: Vec<String>,
    subs: Vec<(String, String)>,
    messages: Vec<(String, u64)>,
    retained: Vec<String>,
}

fn load(db: &Database, shards: usize) -> Result<(Loaded, Purge), redb::Error> {
    let started = Instant::now();
    let now_wall = now_ms();
    let now = Instant::now();
    let mut purge = Purge::default();
    let mut by_shard: Vec<Vec<StoredSession>> = (0..shards).map(|_| Vec::new()).collect();
    let mut retained = Vec::new();
    let mut max_seq = 0u64;
    let tx = db.begin_read()?;
    let sessions = match tx.open_table(SESSIONS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let Some(sessions) = sessions else {
        return Ok((
            Loaded {
                sessions: by_shard,
                retained,
                next_seq: 1,
            },
            purge,
        ));
    };
    let subs = tx.open_table(SUBS)?;
    let messages = tx.open_table(MESSAGES)?;
    // All three tables are sorted by client id: walk them side by side.
    let mut sub_iter = subs.iter()?.peekable();
    let mut msg_iter = messages.iter()?.peekable();
    let mut count = 0usize;
    for row in sessions.iter()? {
        let (k, v) = row?;
        let id = k.value();
        // Rows of client ids before this one have no session: orphans.
        while let Some(Ok((sk, _))) = sub_iter.peek() {
            let (cid, filter) = sk.value();
            if cid >= id {
                break;
            }
            purge.subs.push((cid.to_string(), filter.to_string()));
            sub_iter.next();
        }
        while let Some(Ok((mk, _))) = msg_iter.peek() {
            let (cid, seq) = mk.value();
            if cid >= id {
                break;
            }
            purge.messages.push((cid.to_string(), seq));
            msg_iter.next();
        }
        let rec = decode_session(v.value()).ok_or_else(|| corrupt("session", id))?;
        let expired = rec.expiry_secs != crate::session::NEVER_EXPIRES
            && rec.offline_since_ms != 0
            && rec.offline_since_ms + u64::from(rec.expiry_secs) * 1000 <= now_wall;
        let client_id: Arc<str> = Arc::from(id);
        let mut s = StoredSession {
            client_id: client_id.clone(),
            version: rec.version,
            expiry_secs: rec.expiry_secs,
            offline_since_ms: rec.offline_since_ms,
            subs: Vec::new(),
            messages: Vec::new(),
        };
        while let Some(Ok((sk, sv))) = sub_iter.peek() {
            let (cid, filter) = sk.value();
            if cid != id {
                break;
            }
            if expired {
                purge.subs.push((cid.to_string(), filter.to_string()));
            } else {
                let b = sv.value();
                let (options, sub_id) = decode_sub(b).ok_or_else(|| corrupt("subscription", id))?;
                s.subs.push((Arc::from(filter), options, sub_id));
            }
            sub_iter.next();
        }
        while let Some(Ok((mk, mv))) = msg_iter.peek() {
            let (cid, seq) = mk.value();
            if cid != id {
                break;
            }
            max_seq = max_seq.max(seq);
            let m =
                decode_message(mv.value(), now, now_wall).ok_or_else(|| corrupt("message", id))?;
            if expired || m.0.is_expired(now) {
                purge.messages.push((cid.to_string(), seq));
            } else {
                s.messages.push(StoredMessage {
                    seq,
                    qos: m.1,
                    retain: m.0.retain,
                    msg: Arc::new(m.0),
                });
            }
            msg_iter.next();
        }
        if expired {
            purge.sessions.push(id.to_string());
        } else {
            by_shard[home_shard(id, shards)].push(s);
            count += 1;
            if count.is_multiple_of(PROGRESS_EVERY) {
                tracing::info!(
                    sessions = count,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "loading the store"
                );
            }
        }
    }
    // Whatever is left has no session.
    for row in sub_iter {
        let (k, _) = row?;
        let (cid, filter) = k.value();
        purge.subs.push((cid.to_string(), filter.to_string()));
    }
    for row in msg_iter {
        let (k, _) = row?;
        let (cid, seq) = k.value();
        max_seq = max_seq.max(seq);
        purge.messages.push((cid.to_string(), seq));
    }
    for row in tx.open_table(RETAINED)?.iter()? {
        let (k, v) = row?;
        let (m, _) = decode_message(v.value(), now, now_wall)
            .ok_or_else(|| corrupt("retained message", k.value()))?;
        if m.is_expired(now) {
            purge.retained.push(k.value().to_string());
        } else {
            retained.push(Arc::new(m));
        }
    }
    Ok((
        Loaded {
            sessions: by_shard,
            retained,
            next_seq: max_seq + 1,
        },
        purge,
    ))
}

fn corrupt(what: &str, key: &str) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable {what} row for {key:?}"))
}

fn purge(db: &Database, p: &Purge) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        let mut sessions = tx.open_table(SESSIONS)?;
        let mut subs = tx.open_table(SUBS)?;
        let mut messages = tx.open_table(MESSAGES)?;
        let mut retained = tx.open_table(RETAINED)?;
        for id in &p.sessions {
            sessions.remove(id.as_str())?;
        }
        for (id, f) in &p.subs {
            subs.remove((id.as_str(), f.as_str()))?;
        }
        for (id, seq) in &p.messages {
            messages.remove((id.as_str(), *seq))?;
        }
        for t in &p.retained {
            retained.remove(t.as_str())?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Compacts when free pages take more than the live data and the file is big enough for
/// it to matter. redb reuses freed pages by itself; compaction gives the space back to
/// the file system after a large backlog was delivered.
fn maybe_compact(db: &mut Database, metrics: &StoreMetrics) {
    let size = std::fs::metadata(&metrics.path).map_or(0, |m| m.len());
    if size < COMPACT_MIN_BYTES {
        return;
    }
    let live = match db.begin_write().and_then(|tx| {
        let s = tx.stats().map(|s| s.stored_bytes() + s.metadata_bytes());
        tx.abort().map_err(redb::TransactionError::from)?;
        s.map_err(redb::TransactionError::from)
    }) {
        Ok(live) => live,
        Err(_) => return,
    };
    if live * 2 > size {
        return;
    }
    let started = Instant::now();
    match db.compact() {
        Ok(_) => {
            metrics.compactions.inc();
            metrics.refresh_size();
            tracing::info!(
                before = size,
                after = metrics.file_bytes.load(Relaxed),
                live,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "store compacted"
            );
        }
        Err(e) => tracing::warn!(error = %e, "store compaction failed"),
    }
}

/// The writer thread: owns the database, commits batches in groups.
struct Writer {
    db: Database,
    rx: Receiver<Batch>,
    durability: StoreDurability,
    max_batch: usize,
    commit_interval: Duration,
    sync_interval: Duration,
    metrics: Arc<StoreMetrics>,
    /// A commit failed and nothing has succeeded since (logged once per episode).
    failing: bool,
    /// Names this process as the store's holder; after `db` so it goes once the lock has.
    _pid_file: PidFile,
}

impl Writer {
    fn run(mut self) {
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

    fn apply(&mut self, batches: &[Batch]) -> Result<(), redb::Error> {
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
        let now = Instant::now();
        let now_wall = now_ms();
        let mut buf = Vec::with_capacity(256);
        {
            let mut sessions = tx.open_table(SESSIONS)?;
            let mut subs = tx.open_table(SUBS)?;
            let mut messages = tx.open_table(MESSAGES)?;
            let mut retained = tx.open_table(RETAINED)?;
            for op in batches.iter().flat_map(|b| &b.ops) {
                match op {
                    Op::Session {
                        client_id,
                        version,
                        expiry_secs,
                        offline_since_ms,
                    } => {
                        buf.clear();
                        encode_session(&mut buf, *version, *expiry_secs, *offline_since_ms);
                        sessions.insert(&**client_id, buf.as_slice())?;
                    }
                    Op::DeleteSession(id) => {
                        sessions.remove(&**id)?;
                        let filters: Vec<String> = subs
                            .range((&**id, "")..)?
                            .map_while(|r| {
                                let (k, _) = r.ok()?;
                                let (cid, f) = k.value();
                                (cid == &**id).then(|| f.to_string())
                            })
                            .collect();
                        for f in filters {
                            subs.remove((&**id, f.as_str()))?;
                        }
                        let seqs: Vec<u64> = messages
                            .range((&**id, 0u64)..=(&**id, u64::MAX))?
                            .filter_map(|r| r.ok().map(|(k, _)| k.value().1))
                            .collect();
                        for seq in seqs {
                            messages.remove((&**id, seq))?;
                        }
                    }
                    Op::Sub {
                        client_id,
                        filter,
                        options,
                        sub_id,
                    } => {
                        let mut v = [0u8; 5];
                        v[0] = *options;
                        v[1..].copy_from_slice(&sub_id.to_le_bytes());
                        subs.insert((&**client_id, &**filter), v.as_slice())?;
                    }
                    Op::DeleteSub { client_id, filter } => {
                        subs.remove((&**client_id, &**filter))?;
                    }
                    Op::Message {
                        client_id,
                        seq,
                        msg,
                        qos,
                        retain,
                    } => {
                        buf.clear();
                        encode_message(&mut buf, msg, *qos, *retain, now, now_wall);
                        messages.insert((&**client_id, *seq), buf.as_slice())?;
                    }
                    Op::DeleteMessage { client_id, seq } => {
                        messages.remove((&**client_id, *seq))?;
                    }
                    Op::Retained(msg) => {
                        buf.clear();
                        encode_message(&mut buf, msg, msg.qos, true, now, now_wall);
                        retained.insert(&*msg.topic, buf.as_slice())?;
                    }
                    Op::DeleteRetained(topic) => {
                        retained.remove(&**topic)?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Value encodings: little-endian, length-prefixed, a format byte first.

struct SessionRecord {
    version: Version,
    expiry_secs: u32,
    offline_since_ms: u64,
}

fn version_byte(v: Version) -> u8 {
    match v {
        Version::V31 => 3,
        Version::V311 => 4,
        Version::V5 => 5,
    }
}

fn encode_session(out: &mut Vec<u8>, v: Version, expiry_secs: u32, offline_since_ms: u64) {
    out.push(FORMAT);
    out.push(version_byte(v));
    out.extend_from_slice(&expiry_secs.to_le_bytes());
    out.extend_from_slice(&offline_since_ms.to_le_bytes());
}

fn decode_session(b: &[u8]) -> Option<SessionRecord> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return None;
    }
    let version = match r.u8()? {
        3 => Version::V31,
        4 => Version::V311,
        5 => Version::V5,
        _ => return None,
    };
    Some(SessionRecord {
        version,
        expiry_secs: r.u32()?,
        offline_since_ms: r.u64()?,
    })
}

fn decode_sub(b: &[u8]) -> Option<(u8, u32)> {
    let mut r = Reader(b);
    Some((r.u8()?, r.u32()?))
}

/// A message: qos, retain, absolute expiry (wall ms, 0 = none), topic, payload and the
/// MQTT 5 properties that travel with it.
fn encode_message(
    out: &mut Vec<u8>,
    m: &Message,
    qos: u8,
    retain: bool,
    now: Instant,
    now_wall: u64,
) {
    out.push(FORMAT);
    out.push(qos);
    out.push(u8::from(retain));
    let expires = m.expires.map_or(0, |e| {
        let left = e.saturating_duration_since(now).as_millis() as u64;
        (now_wall + left).max(1)
    });
    out.extend_from_slice(&expires.to_le_bytes());
    put_bytes(out, m.topic.as_bytes());
    put_bytes(out, &m.payload);
    match m.props.as_deref() {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            out.push(
                p.payload_format_indicator
                    .map_or(0, |v| v.saturating_add(1)),
            );
            put_opt(out, p.content_type.as_deref().map(str::as_bytes));
            put_opt(out, p.response_topic.as_deref().map(str::as_bytes));
            put_opt(out, p.correlation_data.as_deref());
            out.extend_from_slice(&(p.user_properties.len() as u32).to_le_bytes());
            for (k, v) in &p.user_properties {
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
        }
    }
}

/// The message and the QoS it is delivered at.
fn decode_message(b: &[u8], now: Instant, now_wall: u64) -> Option<(Message, u8)> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return None;
    }
    let qos = r.u8()?;
    let retain = r.u8()? != 0;
    let expires_wall = r.u64()?;
    let topic: Arc<str> = Arc::from(std::str::from_utf8(r.bytes()?).ok()?);
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let props = match r.u8()? {
        0 => None,
        _ => {
            let pfi = r.u8()?;
            let string = |b: Option<&[u8]>| -> Option<Option<String>> {
                match b {
                    None => Some(None),
                    Some(b) => Some(Some(std::str::from_utf8(b).ok()?.to_string())),
                }
            };
            let content_type = string(r.opt()?)?;
            let response_topic = string(r.opt()?)?;
            let correlation_data = r.opt()?.map(Bytes::copy_from_slice);
            let n = r.u32()? as usize;
            let mut user_properties = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let k = std::str::from_utf8(r.bytes()?).ok()?.to_string();
                let v = std::str::from_utf8(r.bytes()?).ok()?.to_string();
                user_properties.push((k, v));
            }
            Some(Box::new(PublishProps {
                payload_format_indicator: pfi.checked_sub(1),
                message_expiry: None,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            }))
        }
    };
    let mut m = Message::new(topic, payload, qos, retain, Origin::Gateway);
    m.props = props;
    if expires_wall != 0 {
        let left = Duration::from_millis(expires_wall.saturating_sub(now_wall));
        m.expires = Some(now + left);
    }
    Some((m, qos))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(self.bytes()?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_with_props_and_expiry() {
        let now = Instant::now();
        let wall = now_ms();
        let mut m = Message::new(
            "a/b".into(),
            Bytes::from_static(b"hi"),
            1,
            false,
            Origin::Gateway,
        )
        .with_expiry_secs(Some(60));
        m.props = Some(Box::new(PublishProps {
            payload_format_indicator: Some(1),
            message_expiry: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![("k".into(), "v".into())],
        }));
        let mut buf = Vec::new();
        encode_message(&mut buf, &m, 1, true, now, wall);
        let (back, qos) = decode_message(&buf, now, wall).expect("decodes");
        assert_eq!(qos, 1);
        assert!(back.retain);
        assert_eq!(&*back.topic, "a/b");
        assert_eq!(&back.payload[..], b"hi");
        assert_eq!(back.props, m.props);
        let left = back.remaining_expiry_secs(now).expect("has expiry");
        assert!((59..=60).contains(&left), "{left}");
        // A truncated value is refused, not misread.
        assert!(decode_message(&buf[..buf.len() - 1], now, wall).is_none());
    }

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            enabled: true,
            path: dir.to_path_buf(),
            durability: StoreDurability::Immediate,
            max_batch: 10_000,
            commit_interval_ms: 0,
            sync_interval_ms: 1000,
            queue_batches: 16,
        }
    }

    fn msg(topic: &str, ttl: Option<u32>) -> Arc<Message> {
        Arc::new(
            Message::new(
                topic.into(),
                Bytes::from_static(b"p"),
                1,
                false,
                Origin::Gateway,
            )
            .with_expiry_secs(ttl),
        )
    }

    #[test]
    fn ops_survive_reopen_and_start_purges_what_expired() {
        let dir = std::env::temp_dir().join(format!("gateway-store-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = config(&dir);
        let (store, loaded) = open(&cfg, 2).expect("opens");
        assert!(loaded.sessions.iter().all(Vec::is_empty));
        let mut h = store.handle().expect("handle");
        let id = |s: &str| -> Arc<str> { Arc::from(s) };
        let session = |c: &str, expiry: u32, since: u64| Op::Session {
            client_id: id(c),
            version: Version::V5,
            expiry_secs: expiry,
            offline_since_ms: since,
        };
        // "a" keeps a subscription and two of its three messages (one acknowledged).
        h.push(session("a", 3600, now_ms()));
        h.push(Op::Sub {
            client_id: id("a"),
            filter: id("a/#"),
            options: 1,
            sub_id: 7,
        });
        for (seq, t) in [(1, "a/1"), (2, "a/2"), (3, "a/3")] {
            h.push(Op::Message {
                client_id: id("a"),
                seq,
                msg: msg(t, None),
                qos: 1,
                retain: false,
            });
        }
        h.push(Op::DeleteMessage {
            client_id: id("a"),
            seq: 2,
        });
        // "b" ended: its rows go with it. "c" expired while offline. "d"'s message expired.
        h.push(session("b", 3600, 0));
        h.push(Op::Sub {
            client_id: id("b"),
            filter: id("b/x"),
            options: 1,
            sub_id: 0,
        });
        h.push(Op::DeleteSession(id("b")));
        h.push(session("c", 1, 1));
        h.push(session("d", crate::session::NEVER_EXPIRES, 1));
        h.push(Op::Message {
            client_id: id("d"),
            seq: 9,
            msg: msg("d/1", Some(0)),
            qos: 1,
            retain: false,
        });
        h.push(Op::Retained(msg("r/1", None)));
        h.push(Op::Retained(msg("r/2", None)));
        h.push(Op::DeleteRetained(id("r/2")));
        h.close();
        store.close(Duration::from_secs(10));

        let (store, loaded) = open(&cfg, 1).expect("reopens");
        let sessions = &loaded.sessions[0];
        let names: Vec<&str> = sessions.iter().map(|s| &*s.client_id).collect();
        assert_eq!(names, ["a", "d"]);
        let a = &sessions[0];
        assert_eq!(a.expiry_secs, 3600);
        assert_eq!(a.subs.len(), 1);
        assert_eq!((&*a.subs[0].0, a.subs[0].1, a.subs[0].2), ("a/#", 1, 7));
        let seqs: Vec<u64> = a.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(&*a.messages[1].msg.topic, "a/3");
        assert!(sessions[1].messages.is_empty(), "expired message purged");
        assert_eq!(loaded.retained.len(), 1);
        assert_eq!(&*loaded.retained[0].topic, "r/1");
        assert_eq!(
            loaded.next_seq, 10,
            "sequences continue after the highest seen"
        );
        store.close(Duration::from_secs(10));
        // The purge was committed: a third open finds the same, and no "c" or "d/1".
        let (store, again) = open(&cfg, 1).expect("opens again");
        assert_eq!(again.sessions[0].len(), 2);
        store.close(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn session_round_trips() {
        let mut buf = Vec::new();
        encode_session(&mut buf, Version::V5, 3600, 12345);
        let r = decode_session(&buf).expect("decodes");
        assert_eq!(r.version, Version::V5);
        assert_eq!(r.expiry_secs, 3600);
        assert_eq!(r.offline_since_ms, 12345);
        assert!(decode_session(&[9, 5]).is_none());
    }
}
