//! The fleet's requests on a shard (`crate::cluster`): a client id this shard has online
//! was accepted by another node, so its connection here is closed as taken over.
//!
//! With the store on, a persistent session was handed over before this (`adopt.rs`,
//! `hand_over`); otherwise the session stays here (a persistent one goes offline, as
//! after any takeover of its connection).

use crate::codec::reason;
use crate::metrics::DisconnectReason;

use super::Shard;

impl Shard {
    /// Closes `client_id`'s live connection, if any, with MQTT 5 DISCONNECT 0x8E
    /// (session taken over), counted as `takeover`.
    pub(super) fn taken_over_elsewhere(&mut self, client_id: &str) {
        let Some(skey) = self.sessions.find(client_id) else {
            return;
        };
        let Some(conn) = self.sessions[skey as usize].conn else {
            return;
        };
        tracing::info!(
            shard = self.id,
            client_id,
            "session taken over by a connection to another node"
        );
        self.close_conn(
            conn.index(),
            DisconnectReason::Takeover,
            Some(reason::SESSION_TAKEN_OVER),
        );
    }
}
