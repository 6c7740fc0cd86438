//! Loading at start: read every session, subscription, message and retained message back,
//! delete what expired or was orphaned while the gateway was down, refuse (count, log and
//! delete) rows whose checksum fails, and compact the file when free pages dominate.

use std::iter::Peekable;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};

use crate::mailbox::home_shard;
use crate::message::Message;

use super::metrics::StoreMetrics;
use super::open::{now_ms, Loaded, StoredMessage, StoredSession};
use super::qos2::Qos2State;
use super::records::{
    decode_message, decode_session, decode_sub, RecordError, SessionRecord, MESSAGES, QOS2_IN,
    QOS2_OUT, RETAINED, SESSIONS, SUBS,
};

/// A load logs its progress every this many sessions.
pub(super) const PROGRESS_EVERY: usize = 100_000;
/// Compaction is considered only for files larger than this.
pub(super) const COMPACT_MIN_BYTES: u64 = 16 << 20;

/// Keys to delete at start: expired or orphaned rows, and rows refused as corrupt.
#[derive(Default)]
pub(super) struct Purge {
    pub(super) sessions: Vec<String>,
    subs: Vec<(String, String)>,
    pub(super) messages: Vec<(String, u64)>,
    pub(super) retained: Vec<String>,
    pub(super) qos2_out: Vec<(String, u64)>,
    pub(super) qos2_in: Vec<(String, u16)>,
    /// Rows refused because their checksum failed or they did not decode.
    pub(super) refused: u64,
}

/// Refused rows logged one by one at a start; past this, one summary line.
pub(super) const LOG_REFUSED: u64 = 100;

impl Purge {
    /// Counts and logs a row refused as corrupt (it is deleted with the purge). `item`
    /// names the row within the client: the filter, the sequence, or a retained topic.
    pub(super) fn refuse(
        &mut self,
        table: &'static str,
        client_id: &str,
        item: &str,
        e: RecordError,
    ) {
        self.refused += 1;
        if self.refused <= LOG_REFUSED {
            tracing::warn!(
                table,
                client_id,
                item,
                reason = %e,
                "store: a corrupt record is refused and deleted"
            );
        }
    }
}

type SubRows<'a> = Peekable<redb::Range<'a, (&'static str, &'static str), &'static [u8]>>;
type MessageRows<'a> = Peekable<redb::Range<'a, (&'static str, u64), &'static [u8]>>;

/// The clock of one load: message expiry is kept in wall-clock ms in the store.
#[derive(Clone, Copy)]
struct Clock {
    now: Instant,
    wall: u64,
}

pub(super) fn load(db: &Database, shards: usize) -> Result<(Loaded, Purge), redb::Error> {
    let started = Instant::now();
    let clock = Clock {
        now: Instant::now(),
        wall: now_ms(),
    };
    let mut purge = Purge::default();
    let mut by_shard: Vec<Vec<StoredSession>> = (0..shards).map(|_| Vec::new()).collect();
    let mut max_seq = 0u64;
    let tx = db.begin_read()?;
    let sessions = match tx.open_table(SESSIONS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            let loaded = Loaded {
                sessions: by_shard,
                retained: Vec::new(),
                next_seq: 1,
            };
            return Ok((loaded, purge));
        }
        Err(e) => return Err(e.into()),
    };
    let subs = tx.open_table(SUBS)?;
    let messages = tx.open_table(MESSAGES)?;
    let mut qos2 = Qos2State::read(&tx, &mut purge)?;
    // All three tables are sorted by client id: walk them side by side.
    let mut sub_iter = subs.iter()?.peekable();
    let mut msg_iter = messages.iter()?.peekable();
    let mut count = 0usize;
    for row in sessions.iter()? {
        let (k, v) = row?;
        let id = k.value();
        // Rows of client ids before this one have no session: orphans.
        skip_orphans(&mut sub_iter, &mut msg_iter, id, &mut purge, &mut max_seq);
        let rec = decode_session(v.value(), id)
            .map_err(|e| purge.refuse("sessions", id, "", e))
            .ok();
        let mut s = rec
            .filter(|r| !expired(r, clock.wall))
            .map(|r| StoredSession {
                client_id: Arc::from(id),
                version: r.version,
                expiry_secs: r.expiry_secs,
                offline_since_ms: r.offline_since_ms,
                subs: Vec::new(),
                messages: Vec::new(),
                inbound_qos2: Vec::new(),
            });
        take_subs(&mut sub_iter, id, s.as_mut(), &mut purge);
        take_messages(
            &mut msg_iter,
            id,
            s.as_mut(),
            &mut purge,
            clock,
            &mut max_seq,
        );
        let Some(mut s) = s else {
            purge.sessions.push(id.to_string());
            continue;
        };
        qos2.attach(&mut s, &mut purge);
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
    qos2.leftovers(&mut purge);
    let retained = load_retained(&tx, &mut purge, clock)?;
    if purge.refused > LOG_REFUSED {
        tracing::warn!(
            refused = purge.refused,
            logged = LOG_REFUSED,
            "store: more corrupt records were refused and deleted than logged"
        );
    }
    let loaded = Loaded {
        sessions: by_shard,
        retained,
        next_seq: max_seq + 1,
    };
    Ok((loaded, purge))
}

/// A session that was offline longer than its expiry when the gateway was down.
fn expired(rec: &SessionRecord, now_wall: u64) -> bool {
    rec.expiry_secs != crate::session::NEVER_EXPIRES
        && rec.offline_since_ms != 0
        && rec.offline_since_ms + u64::from(rec.expiry_secs) * 1000 <= now_wall
}

/// Moves the subscription and message rows of client ids before `id` to the purge.
fn skip_orphans(
    subs: &mut SubRows<'_>,
    messages: &mut MessageRows<'_>,
    id: &str,
    purge: &mut Purge,
    max_seq: &mut u64,
) {
    while let Some(Ok((sk, _))) = subs.peek() {
        let (cid, filter) = sk.value();
        if cid >= id {
            break;
        }
        purge.subs.push((cid.to_string(), filter.to_string()));
        subs.next();
    }
    while let Some(Ok((mk, _))) = messages.peek() {
        let (cid, seq) = mk.value();
        if cid >= id {
            break;
        }
        *max_seq = (*max_seq).max(seq);
        purge.messages.push((cid.to_string(), seq));
        messages.next();
    }
}

/// Takes the subscription rows of `id` into its session, or into the purge when the
/// session is gone (expired or refused) or a row is refused.
fn take_subs(
    rows: &mut SubRows<'_>,
    id: &str,
    mut session: Option<&mut StoredSession>,
    purge: &mut Purge,
) {
    while let Some(Ok((sk, sv))) = rows.peek() {
        let (cid, filter) = sk.value();
        if cid != id {
            break;
        }
        let decoded = match session {
            Some(_) => decode_sub(sv.value(), cid, filter)
                .map_err(|e| purge.refuse("subs", id, filter, e))
                .ok(),
            None => None,
        };
        match (decoded, session.as_deref_mut()) {
            (Some((options, sub_id)), Some(s)) => s.subs.push((Arc::from(filter), options, sub_id)),
            _ => purge.subs.push((cid.to_string(), filter.to_string())),
        }
        rows.next();
    }
}

/// Takes the message rows of `id` into its session, or into the purge when the session
/// is gone, a message expired, or a row is refused.
fn take_messages(
    rows: &mut MessageRows<'_>,
    id: &str,
    mut session: Option<&mut StoredSession>,
    purge: &mut Purge,
    clock: Clock,
    max_seq: &mut u64,
) {
    while let Some(Ok((mk, mv))) = rows.peek() {
        let (cid, seq) = mk.value();
        if cid != id {
            break;
        }
        *max_seq = (*max_seq).max(seq);
        let key: [&[u8]; 2] = [cid.as_bytes(), &seq.to_le_bytes()];
        let decoded = match session {
            Some(_) => decode_message(mv.value(), &key, clock.now, clock.wall)
                .map_err(|e| purge.refuse("messages", id, &seq.to_string(), e))
                .ok(),
            None => None,
        };
        match (decoded, session.as_deref_mut()) {
            (Some((m, qos)), Some(s)) if !m.is_expired(clock.now) => {
                s.messages.push(StoredMessage {
                    seq,
                    qos,
                    retain: m.retain,
                    msg: Arc::new(m),
                    inflight: None,
                })
            }
            _ => purge.messages.push((cid.to_string(), seq)),
        }
        rows.next();
    }
}

/// The retained messages that are neither expired nor refused.
fn load_retained(
    tx: &ReadTransaction,
    purge: &mut Purge,
    clock: Clock,
) -> Result<Vec<Arc<Message>>, redb::Error> {
    let mut retained = Vec::new();
    for row in tx.open_table(RETAINED)?.iter()? {
        let (k, v) = row?;
        let topic = k.value();
        let key: [&[u8]; 1] = [topic.as_bytes()];
        match decode_message(v.value(), &key, clock.now, clock.wall) {
            Ok((m, _)) if !m.is_expired(clock.now) => retained.push(Arc::new(m)),
            Ok(_) => purge.retained.push(topic.to_string()),
            Err(e) => {
                purge.refuse("retained", "", topic, e);
                purge.retained.push(topic.to_string());
            }
        }
    }
    Ok(retained)
}

pub(super) fn purge(db: &Database, p: &Purge) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        let mut sessions = tx.open_table(SESSIONS)?;
        let mut subs = tx.open_table(SUBS)?;
        let mut messages = tx.open_table(MESSAGES)?;
        let mut retained = tx.open_table(RETAINED)?;
        let mut qos2_out = tx.open_table(QOS2_OUT)?;
        let mut qos2_in = tx.open_table(QOS2_IN)?;
        for (id, seq) in &p.qos2_out {
            qos2_out.remove((id.as_str(), *seq))?;
        }
        for (id, pkid) in &p.qos2_in {
            qos2_in.remove((id.as_str(), *pkid))?;
        }
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
pub(super) fn maybe_compact(db: &mut Database, metrics: &StoreMetrics) {
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
