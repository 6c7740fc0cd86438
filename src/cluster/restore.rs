//! Reading a session back from the fleet (`sessions`): for a CONNECT that resumes a
//! session this node does not hold, after its authentication (`FleetStep`), the node
//! that holds it lets it go first (`handover`), then its record (with its subscriptions)
//! and queued messages are read with direct gets (no consumer); a clean start purges the
//! fleet's copy instead.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{message::StreamMessage, stream};

use crate::store::mirror::{self, FleetRecord};
use crate::store::{StoredMessage, StoredSession};

use crate::store::now_ms;

use super::sessions::{key, SessionStore};

impl SessionStore {
    /// The session the fleet keeps for `client_id`, if any (one that expired while
    /// nobody held it is purged, not returned). Its messages carry their stream
    /// sequences as `seq`; the shard that adopts them gives them its own and tells the
    /// mirror which is which (`Op::Adopted`, `shard/adopt.rs`).
    pub async fn load(&self, client_id: &str) -> Result<Option<StoredSession>, String> {
        let Some(record) = self.load_record(client_id).await? else {
            self.drop_orphans(client_id).await;
            return Ok(None);
        };
        if expired(record.expiry_secs, record.offline_since_ms) {
            self.purge(client_id).await?;
            return Ok(None);
        }
        let mut messages = self.load_messages(client_id).await?;
        self.load_qos2_out(client_id, &mut messages).await?;
        Ok(Some(StoredSession {
            client_id: record.client_id,
            version: record.version,
            expiry_secs: record.expiry_secs,
            offline_since_ms: record.offline_since_ms,
            subs: record.subs,
            messages,
            inbound_qos2: record.inbound_qos2,
        }))
    }

    /// Deletes messages of `client_id` that have no record beside them: those of a
    /// session whose record NATS refused as too large (`put_record`), which the session
    /// starting now must not get. Not if a record appeared meanwhile (a session of the
    /// client id written elsewhere at this moment: its messages may land before its
    /// record). Best effort: what stays is deleted at the next such read.
    async fn drop_orphans(&self, client_id: &str) {
        let orphans = match self.stream_messages(client_id).await {
            Ok(found) if !found.is_empty() => found,
            _ => return,
        };
        if !matches!(self.kept(client_id).await, Ok(Kept::Nothing)) {
            return;
        }
        let deleted = self.delete_messages(orphans.iter().map(|(js_seq, _)| *js_seq));
        if let Err(e) = deleted.await {
            tracing::debug!(client_id, error = %e, "cluster: messages without a session record stay for now");
        }
    }

    /// The session's record with its subscriptions and inbound QoS 2 ids: one direct get
    /// (`<id>.rec`), or, for a session written before the one-key record, the old
    /// record (`<id>.meta`, asked at the same time) and listings of its other keys.
    async fn load_record(&self, client_id: &str) -> Result<Option<FleetRecord>, String> {
        let old = match self.kept(client_id).await? {
            Kept::Nothing => return Ok(None),
            Kept::Record(value) => {
                return mirror::parse_fleet_record(&value, client_id)
                    .map(Some)
                    .ok_or_else(|| "the session record does not decode".into());
            }
            Kept::Old(old) => old,
        };
        let Some((version, expiry_secs, offline_since_ms)) = mirror::parse_session(&old, client_id)
        else {
            return Err("the session record does not decode".into());
        };
        let prefix = format!("{}.{}", self.kv_prefix, key(client_id));
        let subs = self.last_values(format!("{prefix}.sub.>")).await;
        let subs = subs.map_err(|e| format!("subscriptions: {e}"))?;
        Ok(Some(FleetRecord {
            client_id: Arc::from(client_id),
            version,
            expiry_secs,
            offline_since_ms,
            subs: (subs.iter())
                .filter_map(|(_, v)| mirror::parse_sub(v, client_id))
                .collect(),
            inbound_qos2: self.load_old_qos2_in(client_id).await?,
        }))
    }

    /// When and by whom the fleet's record of `client_id`'s session was last written
    /// (`None`: never, or only in the older layout).
    pub(super) async fn record_written(&self, client_id: &str) -> Result<Option<Written>, String> {
        let record = self.last_message(self.record_subject(client_id)).await?;
        Ok(record.map(|m| {
            let writer = m.headers.get(super::sessions::WRITER);
            Written {
                at_ms: u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                elsewhere: writer.is_none_or(|w| w.as_str() != &*self.link.node),
            }
        }))
    }

    /// Which record the fleet keeps for `client_id`: both forms asked at once.
    async fn kept(&self, client_id: &str) -> Result<Kept, String> {
        let (record, old) = futures_util::join!(
            self.last_message(self.record_subject(client_id)),
            self.last_message(self.old_meta_subject(client_id)),
        );
        let payload = |m: Result<Option<StreamMessage>, String>| {
            m.map(|m| m.map(|m| m.payload))
                .map_err(|e| format!("session record: {e}"))
        };
        Ok(match (payload(record)?, payload(old)?) {
            (Some(record), _) if record.is_empty() => Kept::Nothing,
            (Some(record), _) => Kept::Record(record),
            (None, Some(old)) => Kept::Old(old),
            (None, None) => Kept::Nothing,
        })
    }

    /// The queued messages of `client_id` in order, under their stream sequences.
    async fn load_messages(&self, client_id: &str) -> Result<Vec<StoredMessage>, String> {
        let mut messages = Vec::new();
        for (sequence, payload) in self.stream_messages(client_id).await? {
            let Some((msg, qos)) = mirror::parse_message(&payload, client_id) else {
                tracing::warn!(
                    client_id,
                    sequence,
                    "cluster: a queued message in JetStream does not decode; skipped"
                );
                continue;
            };
            messages.push(StoredMessage {
                // The stream sequence, until the shard that adopts it gives it its own.
                seq: sequence,
                msg: Arc::new(msg),
                qos,
                retain: false,
                inflight: None,
            });
        }
        Ok(messages)
    }

    /// The messages of `client_id`'s subject in the stream, in order, with their stream
    /// sequences: one direct get each (and one that finds none).
    pub(super) async fn stream_messages(
        &self,
        client_id: &str,
    ) -> Result<Vec<(u64, bytes::Bytes)>, String> {
        let subject = self.msg_subject(client_id);
        let (mut found, mut next) = (Vec::new(), 1);
        loop {
            let got = (self.msgs)
                .direct_get_next_for_subject(subject.clone(), Some(next))
                .await;
            match got {
                Ok(m) => {
                    next = m.sequence + 1;
                    found.push((m.sequence, m.payload));
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(found),
                Err(e) => return Err(format!("queued message: {e}")),
            }
        }
    }

    /// Whether the fleet keeps a session record for `client_id` (either form).
    pub(super) async fn kept_in_fleet(&self, client_id: &str) -> Result<bool, String> {
        Ok(!matches!(self.kept(client_id).await?, Kept::Nothing))
    }

    /// Purges `client_id`'s session in the fleet if there is one (a clean start here).
    pub async fn forget(&self, client_id: &str) -> Result<(), String> {
        match self.kept_in_fleet(client_id).await? {
            true => self.purge(client_id).await,
            false => Ok(()),
        }
    }

    /// Reads (or forgets, on a clean start) `client_id`'s session within `timeout`, or
    /// until NATS counts as away (a hung server is noticed by the client's pings: the
    /// connections waiting on it then go on at once, not each at its own timeout).
    pub async fn on_connect(
        &self,
        client_id: &str,
        clean_start: bool,
        timeout: Duration,
    ) -> Result<Option<StoredSession>, String> {
        if !self.link.connected() {
            return Err("NATS is unreachable".into());
        }
        let work = async {
            self.take_from_holder(client_id).await?;
            if clean_start {
                self.forget(client_id).await.map(|()| None)
            } else {
                let loaded = self.load(client_id).await;
                if matches!(loaded, Ok(Some(_))) {
                    self.metrics.restored.inc();
                }
                loaded
            }
        };
        let away = async {
            while self.link.connected() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            biased;
            done = tokio::time::timeout(timeout, work) => {
                done.unwrap_or_else(|_| Err("no answer from JetStream in time".into()))
            }
            () = away => Err("NATS is unreachable".into()),
        }
    }
}

/// When the fleet's record of a session was last written (Unix ms, by the NATS server's
/// clock), and whether by another node than this one (a record without the writer
/// header, from a gateway before it, counts as another's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Written {
    pub at_ms: u64,
    pub elsewhere: bool,
}

impl Written {
    /// Whether another node changed the session more than `skew_ms` after `t_ms` (Unix
    /// ms, this node's clock): a copy of it here from `t_ms` or before is stale. Within
    /// the skew nothing is decided (the clocks could put either first).
    pub(super) fn elsewhere_after(&self, t_ms: u64, skew_ms: u64) -> bool {
        self.elsewhere && self.at_ms > t_ms.saturating_add(skew_ms)
    }
}

/// Which record the fleet keeps for a session.
enum Kept {
    /// None, or an emptied one: the session ended (a record of the older form beside
    /// it is stale; `SessionStore::purge` leaves those).
    Nothing,
    /// `<id>.rec`.
    Record(bytes::Bytes),
    /// Only a record of the older form, `<id>.meta`.
    Old(bytes::Bytes),
}

/// Whether a session offline since `offline_since_ms` (0: it was online) has expired.
fn expired(expiry_secs: u32, offline_since_ms: u64) -> bool {
    expiry_secs != crate::session::NEVER_EXPIRES
        && offline_since_ms != 0
        && now_ms().saturating_sub(offline_since_ms) >= u64::from(expiry_secs) * 1000
}

/// How long before its connect timeout a clean start stops waiting for the purge of
/// the fleet's copy of its session and goes ahead without it.
const CLEAN_START_MARGIN: Duration = Duration::from_millis(500);

/// What a CONNECT for which this node has no session asks of the fleet, after its
/// authentication: its session read back, or purged on a clean start.
pub struct FleetStep {
    pub store: Arc<SessionStore>,
    pub client_id: String,
    pub clean_start: bool,
}

impl FleetStep {
    /// The verdict and the session to adopt; an allowed client whose session cannot be
    /// read by `deadline` is refused as unavailable (rather than given an empty one). A
    /// clean start goes ahead when the fleet's copy cannot be purged (NATS away: the
    /// node keeps serving devices on its own).
    pub async fn after(
        self,
        verdict: crate::auth::Verdict,
        deadline: std::time::Instant,
    ) -> (crate::auth::Verdict, Option<Box<StoredSession>>) {
        if !matches!(verdict, crate::auth::Verdict::Allow(_)) {
            return (verdict, None);
        }
        let mut left = deadline.saturating_duration_since(std::time::Instant::now());
        if self.clean_start {
            // It goes ahead without the purge once out of time: early enough for its
            // CONNACK to make the connect timeout.
            left = left.saturating_sub(CLEAN_START_MARGIN);
        }
        match self
            .store
            .on_connect(&self.client_id, self.clean_start, left)
            .await
        {
            Ok(session) => (verdict, session.map(Box::new)),
            Err(e) if self.clean_start => {
                tracing::debug!(client_id = %self.client_id, error = %e, "cluster: clean start without purging the fleet's copy of the session");
                (verdict, None)
            }
            Err(e) => {
                let why = format!("the fleet's copy of the session cannot be read: {e}");
                (crate::auth::Verdict::Unavailable(why), None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Written;

    #[test]
    fn only_another_nodes_later_write_makes_a_copy_here_stale() {
        let other = |at_ms| Written {
            at_ms,
            elsewhere: true,
        };
        let own = |at_ms| Written {
            at_ms,
            elsewhere: false,
        };
        // Another node wrote the record after the change here: stale here.
        assert!(other(1_001).elsewhere_after(1_000, 0));
        // Before it, or at the same millisecond: the change here is the newer.
        assert!(!other(999).elsewhere_after(1_000, 0));
        assert!(!other(1_000).elsewhere_after(1_000, 0));
        // Within the clock skew allowed, nothing is decided; beyond it, it is.
        assert!(!other(1_900).elsewhere_after(1_000, 1_000));
        assert!(!other(2_000).elsewhere_after(1_000, 1_000));
        assert!(other(2_001).elsewhere_after(1_000, 1_000));
        // This node's own later write (its record at a connect) never counts.
        assert!(!own(5_000).elsewhere_after(1_000, 0));
    }
}
