//! Sessions that come from the fleet (`crate::cluster::sessions`): a CONNECT that resumes
//! a session this node does not hold has it read from JetStream off the shard, with its
//! authentication; the shard adopts it here before accepting the CONNECT, as if it had
//! been restored from its own store at start, and stores it locally; the session of a
//! node that died is adopted the same way, offline (`take_in`). When another node
//! resumes a session this shard holds, the shard hands it over (`hand_over`).

use std::sync::Arc;

use crate::cluster::restore::FleetStep;
use crate::cluster::sessions::SessionStore;
use crate::codec::{reason, Connect};
use crate::mailbox::TakenIn;
use crate::metrics::DisconnectReason;
use crate::store::{Op, StoredSession};

use super::Shard;

impl Shard {
    /// What the fleet must do for this CONNECT before it is accepted: read back its
    /// session (or purge it, on a clean start) when the fleet keeps sessions and this
    /// shard holds none for the client id.
    pub(super) fn fleet_step(&self, c: &Connect) -> Option<FleetStep> {
        let store: &Arc<SessionStore> = self.services.sessions.as_ref()?;
        if self.sessions.find(&c.client_id).is_some() {
            return None;
        }
        Some(FleetStep {
            store: store.clone(),
            client_id: c.client_id.clone(),
            clean_start: c.clean_start,
        })
    }

    /// Takes over `stored`, a session the fleet kept for a client connecting here: its
    /// messages get this shard's sequences and, with its subscriptions and QoS 2 state
    /// (packet ids in flight, inbound ones awaiting PUBREL), go to the local store only
    /// (the fleet holds them; its mirror learns which stream message each local
    /// sequence is). A session this shard holds by now (another connection of the
    /// client id got in first) wins.
    pub(super) fn adopt_session(&mut self, mut stored: StoredSession) {
        if self.sessions.find(&stored.client_id).is_some() {
            return;
        }
        if let Some(st) = self.services.store.as_mut() {
            let client_id = &stored.client_id;
            // Read from the fleet under their stream sequences (`cluster::restore`): each
            // gets a local one, and the mirror learns which is which.
            let mut renumbered = Vec::with_capacity(stored.messages.len());
            for m in &mut stored.messages {
                let in_stream = m.seq;
                m.seq = st.next_seq();
                renumbered.push((m.seq, in_stream));
            }
            let qos2_out: Vec<u64> = (stored.messages.iter())
                .filter(|m| m.inflight.is_some())
                .map(|m| m.seq)
                .collect();
            st.push(Op::Adopted {
                client_id: client_id.clone(),
                local_and_stream: renumbered,
                qos2_out,
            });
            let local = |op| Op::LocalOnly(Box::new(op));
            for m in &stored.messages {
                st.push(local(Op::Message {
                    client_id: client_id.clone(),
                    seq: m.seq,
                    msg: m.msg.clone(),
                    qos: m.qos,
                    retain: m.retain,
                }));
            }
            for op in crate::store::mirror::qos2_ops(&stored) {
                st.push(local(op));
            }
            for (filter, options, sub_id) in &stored.subs {
                st.push(local(Op::Sub {
                    client_id: client_id.clone(),
                    filter: filter.clone(),
                    options: *options,
                    sub_id: *sub_id,
                }));
            }
        }
        tracing::info!(shard = self.id, client_id = %stored.client_id, subscriptions = stored.subs.len(), messages = stored.messages.len(), "session restored from the fleet");
        self.restore(vec![stored], &[], false);
    }

    /// Adopts `stored`, the session of a node that died, offline (`cluster::take_in`):
    /// its record, subscriptions and queued messages stored here, as if it had been
    /// restored here at start. A session this shard holds by now (its device connected
    /// here meanwhile) wins; a stopping shard, or one without a store, takes none.
    pub(super) fn take_in(&mut self, mut stored: StoredSession) -> TakenIn {
        if self.sessions.find(&stored.client_id).is_some() {
            return TakenIn::AlreadyHere;
        }
        let Some(st) = self.services.store.as_mut().filter(|_| !self.stopping) else {
            return TakenIn::Refused;
        };
        if stored.offline_since_ms == 0 {
            // Online when its node died: offline from now, here.
            stored.offline_since_ms = crate::store::now_ms();
        }
        // Its record, for the local file only, as the rest (`adopt_session`): the
        // fleet's copy stays as its node left it.
        st.push(Op::LocalOnly(Box::new(Op::Session {
            client_id: stored.client_id.clone(),
            version: stored.version,
            expiry_secs: stored.expiry_secs,
            offline_since_ms: stored.offline_since_ms,
        })));
        self.adopt_session(stored);
        TakenIn::Adopted
    }
}

impl Shard {
    /// Another node resumes `client_id`'s session: its connection here is closed as taken
    /// over (MQTT 5 DISCONNECT 0x8E) without its will (the device lives on, there), and
    /// the session ends here. True if it was stored: its deletion goes to the store, and
    /// the fleet's mirror, told beforehand, keeps the fleet's copy.
    pub(super) fn hand_over(&mut self, client_id: &str) -> bool {
        let Some(skey) = self.sessions.find(client_id).map(|k| k as usize) else {
            return false;
        };
        let st = self.sessions[skey].state();
        st.will = None;
        st.will_due = None;
        if let Some(conn) = self.sessions[skey].conn {
            tracing::info!(
                shard = self.id,
                client_id,
                "session handed over to another node"
            );
            self.close_conn(
                conn.index(),
                DisconnectReason::Takeover,
                Some(reason::SESSION_TAKEN_OVER),
            );
        }
        // Closing may have ended a session with expiry 0.
        let Some(skey) = self.sessions.find(client_id).map(|k| k as usize) else {
            return false;
        };
        let stored = self.persistent(skey);
        // Back elsewhere: the will the last run left is not to be published.
        self.sessions[skey].will_from_last_run = false;
        self.end_session(skey);
        stored
    }
}
