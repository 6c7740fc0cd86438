//! QoS 2 state across a restart: the packet id of an outbound QoS 2 message in flight
//! and whether our PUBREL went out (`qos2_out`), and the packet ids of inbound QoS 2
//! messages whose PUBREC was sent (`qos2_in`). Read at start before the sessions, then
//! handed to the sessions they belong to; rows whose session or message did not load
//! are deleted, rows whose checksum fails are refused like any record.

use std::collections::HashMap;

use redb::{ReadTransaction, ReadableTable, TableDefinition};

use super::load::Purge;
use super::open::StoredSession;
use super::records::{decode_qos2_in, decode_qos2_out, QOS2_IN, QOS2_OUT};

/// The stored QoS 2 state by client id, until each session takes its own.
#[derive(Default)]
pub(super) struct Qos2State {
    /// (sequence, packet id, PUBREL sent) of outbound messages in flight.
    outbound: HashMap<String, Vec<(u64, u16, bool)>>,
    /// Packet ids of inbound messages awaiting PUBREL.
    inbound: HashMap<String, Vec<u16>>,
}

/// Whether a table exists yet (a store written before it has none).
fn exists<K: redb::Key + 'static>(
    tx: &ReadTransaction,
    table: TableDefinition<K, &'static [u8]>,
) -> Result<bool, redb::Error> {
    match tx.open_table(table) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Qos2State {
    /// Reads both tables; refused rows are counted and deleted.
    pub(super) fn read(tx: &ReadTransaction, purge: &mut Purge) -> Result<Self, redb::Error> {
        let mut state = Qos2State::default();
        if exists(tx, QOS2_OUT)? {
            for row in tx.open_table(QOS2_OUT)?.iter()? {
                let (k, v) = row?;
                let (cid, seq) = k.value();
                match decode_qos2_out(v.value(), cid, seq) {
                    Ok((pkid, released)) => {
                        let rows = state.outbound.entry(cid.to_string()).or_default();
                        rows.push((seq, pkid, released));
                    }
                    Err(e) => {
                        purge.refuse("qos2_out", cid, &seq.to_string(), e);
                        purge.qos2_out.push((cid.to_string(), seq));
                    }
                }
            }
        }
        if exists(tx, QOS2_IN)? {
            for row in tx.open_table(QOS2_IN)?.iter()? {
                let (k, v) = row?;
                let (cid, pkid) = k.value();
                match decode_qos2_in(v.value(), cid, pkid) {
                    Ok(()) => state.inbound.entry(cid.to_string()).or_default().push(pkid),
                    Err(e) => {
                        purge.refuse("qos2_in", cid, &pkid.to_string(), e);
                        purge.qos2_in.push((cid.to_string(), pkid));
                    }
                }
            }
        }
        Ok(state)
    }

    /// Gives session `s` (its messages loaded, sorted by sequence) its QoS 2 state; rows
    /// of messages it did not load are deleted.
    pub(super) fn attach(&mut self, s: &mut StoredSession, purge: &mut Purge) {
        let id = &*s.client_id;
        for (seq, pkid, released) in self.outbound.remove(id).unwrap_or_default() {
            match s.messages.binary_search_by_key(&seq, |m| m.seq) {
                Ok(i) if s.messages[i].qos == 2 => s.messages[i].inflight = Some((pkid, released)),
                _ => purge.qos2_out.push((id.to_string(), seq)),
            }
        }
        s.inbound_qos2 = self.inbound.remove(id).unwrap_or_default();
    }

    /// Rows no loaded session took (expired, refused or orphaned): deleted.
    pub(super) fn leftovers(self, purge: &mut Purge) {
        for (cid, rows) in self.outbound {
            purge
                .qos2_out
                .extend(rows.into_iter().map(|(seq, _, _)| (cid.clone(), seq)));
        }
        for (cid, pkids) in self.inbound {
            purge
                .qos2_in
                .extend(pkids.into_iter().map(|p| (cid.clone(), p)));
        }
    }
}
