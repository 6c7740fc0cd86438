//! What the store writer's ops make of the fleet's copy of the sessions: each op of a
//! commit group becomes a [`Change`] on the writer thread ([`SessionMirror`]), queued
//! for the mirror task (`sessions`), which first drops the messages stored and finished
//! within the same group ([`cancel_acked`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::store::mirror::{self, Mirror};
use crate::store::{fail_replies, DeferredReply, Op};

use super::sessions::{SessionStore, Work};

/// One change to a session's state in JetStream, encoded on the store writer thread.
#[derive(Clone)]
pub(super) enum Change {
    /// The latest value of a key-value subject (a will, the node's will list).
    Put { subject: String, value: Bytes },
    /// The session's record (`<id>.rec`, `Op::FleetRecord`), made at `made_ms` (Unix ms,
    /// this node's clock: the re-sync compares it with the fleet's record).
    Record {
        client_id: Arc<str>,
        value: Bytes,
        made_ms: u64,
    },
    /// The session ended: everything of the client id is purged.
    Gone { client_id: Arc<str> },
    /// A stale copy of the session ended here (`Op::LocalOnly` of its deletion): what
    /// this node knew of its messages in the stream is forgotten, the fleet's copy
    /// (another node's) left alone.
    Forget { client_id: Arc<str> },
    /// At start, before a restored session is written again: everything of the client
    /// id is purged (what JetStream held may lack the last changes before a crash, and
    /// the stream sequences of its messages were in the memory of the last run).
    Reset { client_id: Arc<str>, made_ms: u64 },
    /// A message stored under local sequence `seq`.
    Msg {
        client_id: Arc<str>,
        seq: u64,
        value: Bytes,
    },
    /// Message `seq` is finished (acknowledged, dropped, expired).
    Acked { client_id: Arc<str>, seq: u64 },
    /// A session adopted from the fleet (`Op::Adopted`): which stream message each of its
    /// local sequences is, and which have QoS 2 state in the bucket.
    Adopted {
        client_id: Arc<str>,
        local_and_stream: Vec<(u64, u64)>,
        qos2_out: Vec<u64>,
    },
    /// QoS 2 message `seq` went out under `pkid`; `released`: our PUBREL went out too.
    Qos2Out {
        client_id: Arc<str>,
        seq: u64,
        pkid: u16,
        released: bool,
    },
}

impl Change {
    /// Roughly what the change holds in memory (kept for the re-sync, `session_resync`).
    pub(super) fn cost(&self) -> u64 {
        let held = match self {
            Change::Put { subject, value } => subject.len() + value.len(),
            Change::Record {
                client_id, value, ..
            } => client_id.len() + value.len(),
            Change::Gone { client_id }
            | Change::Reset { client_id, .. }
            | Change::Forget { client_id } => client_id.len(),
            Change::Msg {
                client_id, value, ..
            } => client_id.len() + value.len(),
            Change::Acked { client_id, .. } | Change::Qos2Out { client_id, .. } => client_id.len(),
            Change::Adopted {
                client_id,
                local_and_stream,
                qos2_out,
            } => client_id.len() + local_and_stream.len() * 16 + qos2_out.len() * 8,
        };
        held as u64 + 64
    }
}

/// `changes` without the messages stored and finished within the same group (a message
/// to an online device acknowledged quickly never reaches NATS), unless the stream has
/// the message already (`in_stream`: a group written once and kept for the re-sync,
/// whose acknowledgement came in a later group; its deletion must stay).
pub(super) fn cancel_acked(
    changes: Vec<Change>,
    in_stream: impl Fn(&str, u64) -> bool,
) -> Vec<Change> {
    let acked: std::collections::HashSet<(Arc<str>, u64)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Acked { client_id, seq } => Some((client_id.clone(), *seq)),
            _ => None,
        })
        .collect();
    if acked.is_empty() {
        return changes;
    }
    let stored: std::collections::HashSet<(Arc<str>, u64)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Msg { client_id, seq, .. } => Some((client_id.clone(), *seq)),
            _ => None,
        })
        .filter(|k| acked.contains(k) && !in_stream(&k.0, k.1))
        .collect();
    changes
        .into_iter()
        .filter(|c| match c {
            Change::Msg { client_id, seq, .. }
            | Change::Acked { client_id, seq }
            | Change::Qos2Out { client_id, seq, .. } => {
                !stored.contains(&(client_id.clone(), *seq))
            }
            _ => true,
        })
        .collect()
}

/// The positions in `ops` of session records that a later op of the same group writes
/// again (a SUBSCRIBE and its device's disconnect in one commit group, say): only the
/// last reaches NATS. Whatever lies between them (the session's end) still does.
fn rewritten_records(ops: &[&Op]) -> std::collections::HashSet<usize> {
    let mut last = std::collections::HashSet::new();
    let mut rewritten = std::collections::HashSet::new();
    for (i, op) in ops.iter().enumerate().rev() {
        if let Op::FleetRecord(r) = op {
            if !last.insert(&r.client_id) {
                rewritten.insert(i);
            }
        }
    }
    rewritten
}

/// The store writer's side: turns ops into changes and queues them for the task.
pub(super) struct SessionMirror {
    pub(super) store: Arc<SessionStore>,
    pub(super) tx: tokio::sync::mpsc::Sender<Work>,
}

impl SessionStore {
    /// The change a store op makes to the fleet's copy, if any.
    pub(super) fn change(&self, op: &Op) -> Option<Change> {
        let s = self;
        Some(match op {
            // The fleet keeps these in the session's one record (`Op::FleetRecord`).
            Op::Session { .. }
            | Op::Sub { .. }
            | Op::DeleteSub { .. }
            | Op::Qos2In { .. }
            | Op::DeleteQos2In { .. } => return None,
            Op::FleetRecord(r) => Change::Record {
                client_id: r.client_id.clone(),
                value: mirror::fleet_record_bytes(r).into(),
                made_ms: crate::store::now_ms(),
            },
            Op::DeleteSession(client_id) => Change::Gone {
                client_id: client_id.clone(),
            },
            Op::Message {
                client_id,
                seq,
                msg,
                qos,
                retain,
            } => Change::Msg {
                client_id: client_id.clone(),
                seq: *seq,
                value: mirror::message_bytes(client_id, msg, *qos, *retain).into(),
            },
            Op::DeleteMessage { client_id, seq } => Change::Acked {
                client_id: client_id.clone(),
                seq: *seq,
            },
            Op::Qos2Out {
                client_id,
                seq,
                pkid,
                released,
            } => Change::Qos2Out {
                client_id: client_id.clone(),
                seq: *seq,
                pkid: *pkid,
                released: *released,
            },
            Op::Will { client_id, will } => s.will_change(client_id, will.as_deref()),
            // A stale copy's end: the fleet's copy is another node's.
            Op::LocalOnly(op) => match &**op {
                Op::DeleteSession(client_id) => Change::Forget {
                    client_id: client_id.clone(),
                },
                // Adopted from the fleet's copy, which holds it already.
                _ => return None,
            },
            Op::Adopted {
                client_id,
                local_and_stream,
                qos2_out,
            } => Change::Adopted {
                client_id: client_id.clone(),
                local_and_stream: local_and_stream.clone(),
                qos2_out: qos2_out.clone(),
            },
            // Retained messages stay local (the fleet keeps them in their own bucket).
            Op::Retained(_) | Op::DeleteRetained(_) => return None,
        })
    }
}

impl Mirror for SessionMirror {
    fn changes(&self, ops: &[&Op]) {
        let rewritten = rewritten_records(ops);
        let changes = (ops.iter().enumerate())
            .filter(|(i, _)| !rewritten.contains(i))
            .filter_map(|(_, op)| self.store.change(op))
            .collect();
        let handed = &self.store.groups_handed;
        handed.fetch_add(1, Ordering::AcqRel);
        // The task is gone only once the gateway stops: nothing more reaches NATS then.
        if self.tx.blocking_send(Work::Changes(changes)).is_err() {
            handed.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn answers(&self, replies: Vec<DeferredReply>) {
        if replies.is_empty() {
            return;
        }
        if let Err(e) = self.tx.blocking_send(Work::Answers(replies)) {
            if let Work::Answers(replies) = e.0 {
                fail_replies(replies);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{cancel_acked, Change};

    fn msg(id: &str, seq: u64) -> Change {
        Change::Msg {
            client_id: Arc::from(id),
            seq,
            value: bytes::Bytes::new(),
        }
    }

    fn acked(id: &str, seq: u64) -> Change {
        Change::Acked {
            client_id: Arc::from(id),
            seq,
        }
    }

    fn names(changes: Vec<Change>) -> Vec<String> {
        (changes.iter())
            .map(|c| match c {
                Change::Msg { client_id, seq, .. } => format!("msg {client_id} {seq}"),
                Change::Acked { client_id, seq } => format!("acked {client_id} {seq}"),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn a_message_the_stream_has_keeps_its_deletion_when_replayed_with_it() {
        // A group written once (a 1 is in the stream), kept for the re-sync, replayed in
        // one batch with the later group that acknowledged it: the deletion stays (the
        // message itself is skipped, being in the stream already).
        let batch = vec![msg("a", 1), msg("a", 2), acked("a", 1), acked("a", 2)];
        let left = names(cancel_acked(batch, |id, seq| (id, seq) == ("a", 1)));
        assert_eq!(left, ["msg a 1", "acked a 1"]);
    }

    #[test]
    fn a_message_stored_and_finished_in_one_group_never_reaches_nats() {
        let group = vec![
            msg("a", 1),
            msg("a", 2),
            acked("a", 1),
            acked("b", 1),
            msg("b", 2),
        ];
        let left = names(cancel_acked(group, |_, _| false));
        // b 1 was stored in an earlier group: its deletion stays.
        assert_eq!(left, ["msg a 2", "acked b 1", "msg b 2"]);
    }

    #[test]
    fn only_the_last_record_of_a_session_in_a_group_is_written() {
        use crate::codec::Version;
        use crate::store::mirror::FleetRecord;
        use crate::store::Op;
        let record = |id: &str, expiry_secs| {
            Op::FleetRecord(Box::new(FleetRecord {
                client_id: Arc::from(id),
                version: Version::V311,
                expiry_secs,
                offline_since_ms: 0,
                subs: Vec::new(),
                inbound_qos2: Vec::new(),
            }))
        };
        let ops = [
            record("a", 1),
            record("b", 1),
            Op::DeleteSession(Arc::from("a")),
            record("a", 2),
            record("a", 3),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let rewritten = super::rewritten_records(&refs);
        // a's first two records are rewritten by its third; b's one and the end of a's
        // first session stay.
        let mut positions: Vec<usize> = rewritten.into_iter().collect();
        positions.sort_unstable();
        assert_eq!(positions, [0, 3]);
    }
}
