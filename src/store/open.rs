//! Opening the store: the file and its lock, the errors an operator can act on
//! (`OpenError`; a damaged file is one even where redb panics on it, and so is an empty
//! one), `repair`, and the `Store` that owns the writer thread and hands out handles.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::Database;

use crate::codec::Version;
use crate::config::StoreConfig;
use crate::lockholder::PidFile;
use crate::message::Message;

use super::guard::quietly;
use super::handle::{Batch, CommitSignal, Op, StoreHandle};
use super::load::{load, maybe_compact, purge, Purge};
use super::metrics::StoreMetrics;
use super::writer::Writer;
use super::FILE_NAME;

/// A session read back from the store.
pub struct StoredSession {
    pub client_id: Arc<str>,
    pub version: Version,
    pub expiry_secs: u32,
    /// Wall clock ms it went offline (0: it was online when the gateway stopped).
    pub offline_since_ms: u64,
    pub subs: Vec<(Arc<str>, u8, u32)>,
    pub messages: Vec<StoredMessage>,
    /// Packet ids of inbound QoS 2 messages received (PUBREC sent) awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
}

pub struct StoredMessage {
    pub seq: u64,
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    /// A QoS 2 message in flight: its packet id, and whether PUBREL went out.
    pub inflight: Option<(u16, bool)>,
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
    /// `[store] backlog_max_bytes`, for each shard's handle.
    backlog_max: u64,
    /// Where the writer also hands what it commits (the fleet's sessions), once set.
    mirror: super::mirror::MirrorSlot,
    /// A process that held this store ended without letting go of it (a crash), and
    /// what it left has not been handled yet: the crash marker is there.
    pub previous_run_crashed: bool,
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
            metrics: self.metrics.clone(),
            pending_bytes: 0,
            pending_fleet_only: 0,
            backlog_max: self.backlog_max,
            was_over: false,
        })
    }

    /// From now on the writer hands every commit group's changes, and the `queued`
    /// answers that wait for them, to `mirror` (set once; later calls are ignored).
    pub fn set_mirror(&self, mirror: Box<dyn super::mirror::Mirror>) {
        let _ = self.mirror.set(mirror);
    }

    /// Deletes the sessions of `client_ids` from the file and waits (at most 10 s) for the
    /// commit: call before [`Store::set_mirror`], so that only this file forgets them.
    pub fn forget_local(&self, client_ids: Vec<Arc<str>>) {
        let Some(mut h) = self.handle() else {
            return;
        };
        if client_ids.is_empty() {
            return;
        }
        for id in client_ids {
            h.push(Op::DeleteSession(id));
        }
        let seq = h.pending_seq();
        let signal = h.signal().clone();
        h.close();
        let deadline = Instant::now() + Duration::from_secs(10);
        while signal.done.load(Relaxed) < seq && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
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

/// Wall-clock milliseconds since the Unix epoch (0 before it): the clock of what is
/// stored, here and in the fleet (a session's offline time, a message's arrival).
pub fn now_ms() -> u64 {
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

/// An existing store file of 0 bytes. redb would make it a new empty store; but a store
/// that a failed disk, a full file system or a bad copy truncated looks the same, and
/// starting empty over it would lose every session in it silently.
fn refuse_empty(file: &Path) -> Result<(), OpenError> {
    match std::fs::metadata(file) {
        Ok(m) if m.is_file() && m.len() == 0 => Err(OpenError::unusable(
            file,
            "the file is empty (0 bytes): a store truncated or never finished; \
             the gateway does not start a new store over it"
                .into(),
        )),
        _ => Ok(()),
    }
}

pub(super) fn open_db(file: &Path, repair: bool) -> Result<(Database, PidFile), OpenError> {
    let err = |message: String| OpenError::unusable(file, message);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    refuse_empty(file)?;
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
    match quietly(|| builder.create(file)) {
        Ok(Ok(db)) => Ok((db, PidFile::write(file))),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(OpenError {
            kind: OpenErrorKind::InUse {
                pid: crate::lockholder::holder(file),
            },
            ..err("it is in use by another process".into())
        }),
        // An I/O error (a full disk, a file size limit) says what it is; anything else
        // is the file's fault.
        Ok(Err(e @ redb::DatabaseError::Storage(redb::StorageError::Io(_)))) => {
            Err(err(e.to_string()))
        }
        Ok(Err(e)) => Err(err(format!(
            "{e} (the file is damaged or not a gateway store)"
        ))),
        Err(panic) => Err(read_failed(file, &panic)),
    }
}

/// The error of a redb panic on a damaged file; the panic's text is logged, not shown.
fn read_failed(file: &Path, panic: &str) -> OpenError {
    tracing::error!(file = %file.display(), panic, "store: redb failed reading the file");
    OpenError::unusable(
        file,
        "reading it failed (the file is damaged or not a gateway store)".into(),
    )
}

/// Runs `f` on the open database with redb's panics turned into the store error. After a
/// panic the database is leaked, not dropped: its drop would run redb again on the same
/// damaged state, and could panic where nothing catches it (the process exits next).
fn guarded<T>(
    file: &Path,
    db: &mut Option<Database>,
    f: impl FnOnce(&mut Database) -> Result<T, OpenError>,
) -> Result<T, OpenError> {
    let Some(d) = db.as_mut() else {
        return Err(OpenError::unusable(file, "the store is not open".into()));
    };
    match quietly(|| f(d)) {
        Ok(r) => r,
        Err(panic) => {
            std::mem::forget(db.take());
            Err(read_failed(file, &panic))
        }
    }
}

/// Loads the store, deletes what expired or was refused as corrupt (counted in
/// `metrics`), and compacts the file if it is mostly free pages.
fn load_and_tidy(
    db: &mut Database,
    file: &Path,
    shards: usize,
    metrics: &StoreMetrics,
) -> Result<(Loaded, Purge), OpenError> {
    let err = |message: String| OpenError::unusable(file, message);
    let (loaded, purged) = load(db, shards).map_err(|e| err(e.to_string()))?;
    purge(db, &purged).map_err(|e| err(e.to_string()))?;
    metrics.corrupt_records.inc_by(purged.refused);
    maybe_compact(db, metrics);
    Ok((loaded, purged))
}

/// Opens (or creates) the store, loads it, purges what expired, and starts the writer.
pub fn open(config: &StoreConfig, shards: usize) -> Result<(Store, Loaded), OpenError> {
    let file = file_of(config);
    let started = Instant::now();
    let (db, pid_file) = open_db(&file, false)?;
    let previous_run_crashed = crate::lockholder::crash_marker_of(&file).exists();
    let err = |message: String| OpenError::unusable(&file, message);
    let metrics = Arc::new(StoreMetrics::new(file.clone()));
    let mut db = Some(db);
    let (loaded, purged) = guarded(&file, &mut db, |db| {
        load_and_tidy(db, &file, shards, &metrics)
    })?;
    let db = db.expect("not taken: no panic");
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
        corrupt_records = purged.refused,
        bytes = metrics.file_bytes.load(Relaxed),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store loaded"
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_batches.max(1) as usize);
    ignore_file_size_signal();
    let mirror = super::mirror::MirrorSlot::default();
    let writer = Writer {
        db: Some(db),
        rx,
        durability: config.durability,
        max_batch: config.max_batch.max(1) as usize,
        commit_interval: Duration::from_millis(config.commit_interval_ms as u64),
        sync_interval: Duration::from_millis(config.sync_interval_ms.max(1) as u64),
        metrics: metrics.clone(),
        backoff: config.reopen_backoff(),
        unsynced_since: None,
        unsynced: Batch::default(),
        pid_file: Some(pid_file),
        mirror: mirror.clone(),
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
        backlog_max: config.backlog_max_bytes,
        mirror,
        previous_run_crashed,
    };
    store.set_next_seq(loaded.next_seq);
    Ok((store, loaded))
}

/// A file size limit (`ulimit -f`) makes a store write that passes it fail with EFBIG,
/// which the writer recovers from, instead of killing the process with SIGXFSZ.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to race with.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// `gateway store-repair`: opens the file with redb's repair, checks it, reads every row
/// (deleting what expired and the records whose checksum fails), and compacts it.
pub fn repair(config: &StoreConfig) -> Result<String, OpenError> {
    let file = file_of(config);
    if !file.exists() {
        return Err(OpenError::unusable(&file, "no such file".into()));
    }
    let (db, _pid_file) = open_db(&file, true)?;
    let metrics = StoreMetrics::new(file.clone());
    let mut db = Some(db);
    let (loaded, purged) = guarded(&file, &mut db, |db| {
        check(db, &file)?;
        let loaded = load_and_tidy(db, &file, 1, &metrics)?;
        let _ = db.compact();
        Ok(loaded)
    })?;
    Ok(format!(
        "{}: OK ({} sessions, {} retained messages; {} corrupt records deleted)",
        file.display(),
        loaded.sessions[0].len(),
        loaded.retained.len(),
        purged.refused
    ))
}

/// redb's integrity check, after its repair.
fn check(db: &mut Database, file: &Path) -> Result<(), OpenError> {
    let err = |message: String| OpenError::unusable(file, message);
    match db.check_integrity() {
        Ok(true) => Ok(()),
        Ok(false) => Err(err(
            "redb repaired it but the check still fails; move it aside".into(),
        )),
        Err(e) => Err(err(format!("integrity check failed: {e}"))),
    }
}
