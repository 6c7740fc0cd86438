//! Sessions that come from the fleet (`crate::cluster::sessions`): a CONNECT that resumes
//! a session this node does not hold has it read from JetStream off the shard, with its
//! authentication; the shard adopts it here before accepting the CONNECT, as if it had
//! been restored from its own store at start, and stores it locally. When another node
//! resumes a session this shard holds, the shard hands it over (`hand_over`).

use std::sync::Arc;

use crate::cluster::restore::FleetStep;
use crate::cluster::sessions::SessionStore;
use crate::codec::{reason, Connect};
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
    /// (packet ids in flight, inbound ones awaiting PUBREL), go to the local store (the
    /// fleet's mirror knows them for the messages it already has). A session this shard
    /// holds by now (another connection of the client id got in first) wins.
    pub(super) fn adopt_session(&mut self, mut stored: StoredSession) {
        if self.sessions.find(&stored.client_id).is_some() {
            return;
        }
        if let Some(st) = self.services.store.as_mut() {
            let client_id = &stored.client_id;
            for m in &mut stored.messages {
                m.seq = st.next_seq();
                st.push(Op::Message {
                    client_id: client_id.clone(),
                    seq: m.seq,
                    msg: m.msg.clone(),
                    qos: m.qos,
                    retain: m.retain,
                });
            }
            for op in crate::store::mirror::qos2_ops(&stored) {
                st.push(op);
            }
            for (filter, options, sub_id) in &stored.subs {
                st.push(Op::Sub {
                    client_id: client_id.clone(),
                    filter: filter.clone(),
                    options: *options,
                    sub_id: *sub_id,
                });
            }
        }
        tracing::info!(shard = self.id, client_id = %stored.client_id, subscriptions = stored.subs.len(), messages = stored.messages.len(), "session restored from the fleet");
        self.restore(vec![stored], &[], false);
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
