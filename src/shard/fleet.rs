//! The fleet's requests on a shard (`crate::cluster`): a client id this shard has online
//! was accepted by another node, so its connection here is closed as taken over, without
//! its will (the device is online elsewhere); or it came here from another node too soon
//! after the last time (`cluster.takeover_min_interval_ms`), so the new connection here
//! is closed and the other node keeps it.
//!
//! With the store on, a persistent session was handed over before this (`adopt.rs`,
//! `hand_over`), and an offline one still here is a stale copy (e.g. one being taken in
//! from a dead node while its device resumed elsewhere, `crate::cluster::take_in`): it
//! ends, without purging the fleet's copy. Otherwise the session stays here (a
//! persistent one goes offline, as after any takeover of its connection).

use crate::codec::reason;
use crate::metrics::DisconnectReason;
use crate::session::ConnKey;

use super::Shard;

impl Shard {
    /// Closes `client_id`'s live connection, if any, with MQTT 5 DISCONNECT 0x8E
    /// (session taken over), counted as `takeover`; its will is not published.
    /// With the fleet keeping sessions, an offline session here is then a stale copy
    /// (the other node read the fleet's, e.g. while this node was taking it in from a
    /// dead node, `cluster::take_in`): it ends here, and the fleet's copy stays (the
    /// registry names the other node).
    pub(super) fn taken_over_elsewhere(&mut self, client_id: &str) {
        if self.end_stale_copy(client_id) {
            return;
        }
        let Some(conn) = self.fleet_conn_without_will(client_id) else {
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

    /// Ends `client_id`'s session here if it is offline, with the fleet keeping
    /// sessions: a stale copy of one another node holds. Its end is written to this
    /// node's file only (`Op::LocalOnly`): the mirror forgets the session without
    /// touching the fleet's copy, whoever the registry names by the time it gets there
    /// (the device may have come back here meanwhile and adopted the other node's).
    /// True if it ended.
    pub(super) fn end_stale_copy(&mut self, client_id: &str) -> bool {
        let offline = (self.sessions.find(client_id))
            .is_some_and(|s| self.sessions[s as usize].conn.is_none());
        if !offline || self.services.sessions.is_none() {
            return false;
        }
        tracing::info!(
            shard = self.id,
            client_id,
            "a stale copy of a session resumed on another node ends here"
        );
        self.ending_stale_copy = true;
        self.hand_over(client_id);
        self.ending_stale_copy = false;
        true
    }

    /// Closes `client_id`'s live connection, if any, with MQTT 5 DISCONNECT 0x9F
    /// (connection rate exceeded), counted as `refused`, without its will: another node
    /// holds the client id and keeps it.
    pub(super) fn fleet_throttled(&mut self, client_id: &str) {
        let Some(conn) = self.fleet_conn_without_will(client_id) else {
            return;
        };
        self.close_conn(
            conn.index(),
            DisconnectReason::Refused,
            Some(reason::CONNECTION_RATE_EXCEEDED),
        );
    }

    /// `client_id`'s live connection here, its will dropped.
    fn fleet_conn_without_will(&mut self, client_id: &str) -> Option<ConnKey> {
        let skey = self.sessions.find(client_id)? as usize;
        let conn = self.sessions[skey].conn?;
        self.sessions[skey].discard_will();
        Some(conn)
    }
}
