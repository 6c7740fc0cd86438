//! Loading at start: read every session, subscription, message and retained message back,
//! delete what expired or was orphaned while the gateway was down, and compact the file
//! when free pages dominate.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::mailbox::home_shard;

use super::metrics::StoreMetrics;
use super::open::{now_ms, Loaded, StoredMessage, StoredSession};
use super::records::{
    decode_message, decode_session, decode_sub, MESSAGES, RETAINED, SESSIONS, SUBS,
};

/// A load logs its progress every this many sessions.
pub(super) const PROGRESS_EVERY: usize = 100_000;
/// Compaction is considered only for files larger than this.
pub(super) const COMPACT_MIN_BYTES: u64 = 16 << 20;

/// Keys to delete at start: expired or orphaned rows.
#[derive(Default)]
pub(super) struct Purge {
    pub(super) sessions: Vec<String>,
    subs: Vec<(String, String)>,
    pub(super) messages: Vec<(String, u64)>,
    pub(super) retained: Vec<String>,
}

pub(super) fn load(db: &Database, shards: usize) -> Result<(Loaded, Purge), redb::Error> {
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

pub(super) fn corrupt(what: &str, key: &str) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable {what} row for {key:?}"))
}

pub(super) fn purge(db: &Database, p: &Purge) -> Result<(), redb::Error> {
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
