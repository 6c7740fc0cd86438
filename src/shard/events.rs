//! The shard's side of the events to the backend (`src/events/`): what each event says,
//! gathered from the shard's parts, so that each place in the MQTT handling where
//! something happens makes one call.
//!
//! Every event of a client is produced here, on its home shard, with a sequence number
//! from the shard's one `SeqGen` (`Shard::seq`): so a takeover's `disconnected` (produced
//! while the new CONNECT is accepted, before its CONNACK) is ordered before the new
//! `connected`. Nothing here blocks: `EventSender` only pushes into lock-free rings, and
//! builds nothing for an event no sink wants.

use std::sync::Arc;

use crate::codec::Connect;
use crate::events::Connected;
use crate::message::Message;
use crate::metrics::DisconnectReason;

use super::negotiate::Terms;
use super::Shard;

impl Shard {
    /// Connection `key` was accepted with CONNECT `c` under `terms` into session `skey`.
    pub(super) fn emit_connected(
        &mut self,
        key: usize,
        skey: usize,
        c: &Connect,
        terms: &Terms,
        present: bool,
    ) {
        let client_id = &self.sessions[skey].client_id;
        let peer = &self.wire.conns[key].peer;
        self.services
            .events
            .connected(&mut self.seq, client_id, || Connected {
                username: c.username.clone(),
                peer: peer.addr(),
                version: terms.version,
                keep_alive: terms.keep_alive,
                clean_start: c.clean_start,
                session_present: present,
            });
    }

    /// An accepted connection of `client_id` ended for `reason`.
    pub(super) fn emit_disconnected(&mut self, client_id: &Arc<str>, reason: DisconnectReason) {
        self.services
            .events
            .disconnected(&mut self.seq, client_id, reason);
    }

    /// Offline session `skey` reached its expiry (called before it is removed).
    pub(super) fn emit_session_expired(&mut self, skey: usize) {
        let client_id = &self.sessions[skey].client_id;
        self.services
            .events
            .session_expired(&mut self.seq, client_id);
    }

    /// Notes a granted filter of a SUBSCRIBE for the `subscribed` event (only when
    /// subscriptions are reported, so `granted` stays unallocated otherwise).
    pub(super) fn note_granted(&self, granted: &mut Vec<(Arc<str>, u8)>, filter: &str, qos: u8) {
        if self.services.events.wants_subscriptions() {
            granted.push((Arc::from(filter), qos));
        }
    }

    /// Session `skey` was granted `granted` by a SUBACK (nothing when none was).
    pub(super) fn emit_subscribed(&mut self, skey: usize, granted: Vec<(Arc<str>, u8)>) {
        if granted.is_empty() {
            return;
        }
        let client_id = &self.sessions[skey].client_id;
        self.services
            .events
            .subscribed(&mut self.seq, client_id, || granted);
    }

    /// Session `skey`'s UNSUBACK answered `codes` for `filters`: the removed ones (code 0).
    pub(super) fn emit_unsubscribed(&mut self, skey: usize, filters: &[String], codes: &[u8]) {
        if !codes.contains(&0) {
            return;
        }
        let removed = || {
            let pairs = filters.iter().zip(codes);
            let removed = pairs.filter(|(_, &code)| code == 0);
            removed.map(|(f, _)| Arc::from(f.as_str())).collect()
        };
        let client_id = &self.sessions[skey].client_id;
        self.services
            .events
            .unsubscribed(&mut self.seq, client_id, removed);
    }

    /// Session `skey` published `msg` (accepted: ACL passed, alias resolved), before it is
    /// routed; forwarded when its topic matches `uplink_filters`.
    pub(super) fn emit_uplink(&mut self, skey: usize, msg: &Arc<Message>) {
        let client_id = &self.sessions[skey].client_id;
        self.services.events.uplink(&mut self.seq, client_id, msg);
    }
}
