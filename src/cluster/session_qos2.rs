//! QoS 2 exchanges that move with a persistent session between nodes (issue 20): the
//! fleet's copy of a session (`sessions`) holds its QoS 2 packet-id state as the local
//! store does (`shard/durable.rs`), so that the node that resumes it — after a live
//! takeover or a `kill -9` — completes each exchange exactly once.
//!
//! - The inbound packet ids whose PUBREC went out are in the session's record
//!   (`<id>.rec`, `Op::FleetRecord`): a resend of such a message on the new node is
//!   acknowledged, not routed again. (Sessions written before that record kept them as
//!   `<id>.q2in.<pkid>` keys, still read: [`SessionStore::load_old_qos2_in`].)
//! - `<id>.q2out.<stream sequence>`, a key-value subject in the session bucket: an outbound QoS 2 message of the session stream that
//!   went out under a packet id, and whether our PUBREL went out. The new node sends it
//!   again under that packet id (PUBLISH with DUP, or the PUBREL). Read by that key with
//!   the session; deleted by its sequence once the message is finished.
//!
//! The values are the local store's checksummed records (`store::mirror`), sealed with
//! the client id and the packet id or stream sequence.

use std::sync::Arc;

use async_nats::jetstream::{message::StreamMessage, stream};
use bytes::Bytes;
use futures_util::TryStreamExt;

use crate::store::{mirror, StoredMessage};

use super::acker::Ack;
use super::sessions::{key, Failed, Pending, SessionStore};

impl SessionStore {
    pub(super) fn qos2_out_subject(&self, client_id: &str, js_seq: u64) -> String {
        format!("{}.{}.q2out.{js_seq}", self.kv_prefix, key(client_id))
    }

    /// The stream sequence of `client_id`'s stored message `seq`, once JetStream acked it.
    fn js_seq(&self, client_id: &str, seq: u64) -> Option<u64> {
        self.seqs().stored.get(client_id)?.get(&seq).copied()
    }

    /// The key-value put that records the QoS 2 state of `client_id`'s message `seq`
    /// (keyed by its stream sequence, so the publishes before it are acked first when
    /// that is not known yet); `None` if the message is not in the stream.
    pub(super) async fn qos2_out_put(
        &self,
        client_id: &Arc<str>,
        (seq, pkid, released): (u64, u16, bool),
        acks: &tokio::sync::mpsc::Sender<Ack>,
        pending: &mut Pending,
    ) -> Result<Option<(String, Bytes)>, Failed> {
        let mut js_seq = self.js_seq(client_id, seq);
        if js_seq.is_none() {
            self.barrier(acks, pending).await?;
            js_seq = self.js_seq(client_id, seq);
        }
        let Some(js_seq) = js_seq else {
            return Ok(None);
        };
        let mut seqs = self.seqs();
        seqs.qos2_out
            .entry(client_id.clone())
            .or_default()
            .insert(seq);
        let value = mirror::qos2_out_bytes(client_id, js_seq, pkid, released);
        Ok(Some((
            self.qos2_out_subject(client_id, js_seq),
            value.into(),
        )))
    }

    /// `client_id`'s message `seq` (stream sequence `js_seq`) is finished: the subject
    /// of its QoS 2 state, if it had one, to empty (a put, not a purge by subject, which
    /// nats-server 2.9 answers by scanning the bucket).
    pub(super) fn qos2_out_done(
        &self,
        client_id: &Arc<str>,
        seq: u64,
        js_seq: u64,
    ) -> Option<String> {
        let had = {
            let mut seqs = self.seqs();
            let of = seqs.qos2_out.get_mut(client_id);
            let had = of.is_some_and(|of| of.remove(&seq));
            if seqs.qos2_out.get(client_id).is_some_and(|of| of.is_empty()) {
                seqs.qos2_out.remove(client_id);
            }
            had
        };
        had.then(|| self.qos2_out_subject(client_id, js_seq))
    }

    /// The last value of every key-value subject matching `filter`.
    pub(super) async fn last_values(&self, filter: String) -> Result<Vec<(String, Bytes)>, String> {
        let mut info = self
            .kv
            .info_with_subjects(&filter)
            .await
            .map_err(|e| e.to_string())?;
        let mut subjects = Vec::new();
        while let Some((subject, _)) = info.try_next().await.map_err(|e| e.to_string())? {
            subjects.push(subject);
        }
        let mut values = Vec::with_capacity(subjects.len());
        for subject in subjects {
            if let Some(m) = self.last_message(subject.clone()).await? {
                values.push((subject, m.payload));
            }
        }
        Ok(values)
    }

    /// The last message of key-value subject `subject` (its value and its sequence in
    /// the bucket's stream), if it has one.
    pub(super) async fn last_message(
        &self,
        subject: String,
    ) -> Result<Option<StreamMessage>, String> {
        match self.kv.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Gives `messages` (read from the stream, `seq` still their stream sequence) the
    /// packet ids they went out under: the key of each QoS 2 one read directly, all at
    /// once (no listing of the bucket's subjects, which nats-server 2.9 answers by a
    /// scan).
    pub(super) async fn load_qos2_out(
        &self,
        client_id: &str,
        messages: &mut [StoredMessage],
    ) -> Result<(), String> {
        let qos2 = messages.iter_mut().filter(|m| m.qos == 2);
        let reads = qos2.map(|m| async {
            let subject = self.qos2_out_subject(client_id, m.seq);
            let found = self.last_message(subject).await;
            if let Some(v) = found.map_err(|e| format!("QoS 2 state: {e}"))? {
                m.inflight = mirror::parse_qos2_out(&v.payload, client_id, m.seq);
            }
            Ok(())
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .collect()
    }

    /// Removes key-value subject `subject` from the bucket: its message deleted by
    /// sequence. Not a purge by subject, which nats-server 2.9 answers by scanning the
    /// bucket, nor an emptied value, which would stay one of the bucket's subjects.
    pub(super) async fn remove_key(&self, subject: String) -> Result<(), String> {
        let Some(sequence) = self.last_message(subject).await?.map(|m| m.sequence) else {
            return Ok(());
        };
        match self.kv.delete_message(sequence).await {
            Ok(_) => Ok(()),
            // Replaced or removed meanwhile.
            Err(e) if e.to_string().contains("no message found") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The inbound packet ids taken, of a session written before the one-key record
    /// (`<id>.q2in.<pkid>`; now in the record).
    pub(super) async fn load_old_qos2_in(&self, client_id: &str) -> Result<Vec<u16>, String> {
        let prefix = format!("{}.{}", self.kv_prefix, key(client_id));
        let taken = self.last_values(format!("{prefix}.q2in.>")).await;
        let taken = taken.map_err(|e| format!("QoS 2 state: {e}"))?;
        let mut inbound: Vec<u16> = taken
            .into_iter()
            .filter_map(|(subject, value)| {
                let pkid = last_number::<u16>(&subject)?;
                mirror::parse_qos2_in(&value, client_id, pkid).then_some(pkid)
            })
            .collect();
        inbound.sort_unstable();
        Ok(inbound)
    }
}

/// The number a subject ends with (`….q2in.7` → 7).
fn last_number<T: std::str::FromStr>(subject: &str) -> Option<T> {
    subject.rsplit('.').next()?.parse().ok()
}
