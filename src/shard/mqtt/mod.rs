//! The MQTT conversation on a shard, by packet family: [`connect`] (CONNECT, its
//! authentication and acceptance), [`publish`], [`subscribe`], [`authorize`] (the ACL and
//! the retained byte bounds), [`acks`] (the QoS 1/2
//! exchanges of outbound messages) and [`offline`] (the session's life when its
//! connection ends: will, expiry). This file dispatches a frame to its family.
//!
//! Shared subscriptions are kept in the session like any other (under their full
//! `$share/...` filter) but not in the shard's index: the group's owner shard routes them
//! (see `shared.rs`).

mod acks;
mod authorize;
mod connect;
mod offline;
mod publish;
mod subscribe;

pub(super) use connect::PendingAuth;

use crate::codec::{self, reason, Packet};
use crate::metrics::{DisconnectReason, RefuseReason};
use crate::session::{Ack, SessionKey};

use crate::shard::{packet, ConnState, Shard};

impl Shard {
    /// One whole frame from a connection. `rest` are the bytes after it in this read (a
    /// CONNECT handed to another shard takes them along). False when the connection is gone.
    ///
    /// Only a whole packet counts as a sign of life: the keep-alive (and, before CONNECT,
    /// the connect timeout) is measured from the last complete frame, not the last byte,
    /// as MQTT words it ("does not receive a Control Packet"). A peer trickling one byte
    /// at a time cannot hold a connection open past either timer (slowloris).
    pub(in crate::shard) fn handle_frame(&mut self, key: usize, frame: &[u8], rest: &[u8]) -> bool {
        self.services.metrics.packet_in(packet::type_of(frame[0]));
        if self.wire.conns[key].state == ConnState::Active {
            self.wire.conns[key].last_seen = self.clock.now32();
        }
        if self.wire.conns[key].state == ConnState::Handshake {
            return match codec::decode_connect(frame) {
                Ok(connect) => self.route_connect(key, connect, rest),
                Err(e) => {
                    let peer = self.wire.conns[key].peer.addr();
                    tracing::info!(shard = self.id, %peer, error = %e.error, "bad CONNECT, closing");
                    match e.version {
                        Some(v) => {
                            self.wire.conns[key].version = v;
                            let code = e.connack_code();
                            self.refuse(key, code, code, RefuseReason::Protocol)
                        }
                        None => {
                            self.services.metrics.refuse(RefuseReason::Protocol);
                            self.close_conn(key, DisconnectReason::ProtocolError, None);
                            false
                        }
                    }
                }
            };
        }
        if self.wire.conns[key].state != ConnState::Active {
            // Bytes of a connection still waiting for its authentication verdict (or its
            // PROXY header) are never decoded as packets: there is no session yet.
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        }
        let version = self.wire.conns[key].version;
        match codec::decode(frame, version) {
            Ok(packet) => self.handle_packet(key, packet),
            Err(e) => self.protocol_error(key, &e),
        }
    }

    /// One packet of an active connection. The answer to a PUBLISH, SUBSCRIBE or
    /// UNSUBSCRIBE that changed durable state waits for the store commit (`held.rs`).
    /// False when the connection is gone.
    pub(in crate::shard) fn handle_packet(&mut self, key: usize, packet: Packet) -> bool {
        let mark = match packet {
            Packet::Publish(_) | Packet::Subscribe { .. } | Packet::Unsubscribe { .. } => {
                self.durable_mark(key)
            }
            _ => None,
        };
        let subscribe_at = (matches!(packet, Packet::Subscribe { .. })
            && self.services.fleet_route.is_some())
        .then(|| self.output_len(key));
        let alive = self.dispatch_packet(key, packet);
        if alive {
            self.hold_if_durable(key, mark);
            if let Some(out_len) = subscribe_at {
                self.fleet_barrier(key, out_len);
            }
        }
        alive
    }

    /// One packet of an active connection, to its family's handler. False when the
    /// connection is gone.
    fn dispatch_packet(&mut self, key: usize, packet: Packet) -> bool {
        let Some(skey) = self.wire.conns[key].session.map(SessionKey::index) else {
            // Only an active connection's packets get here, and it has its session.
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        };
        match packet {
            Packet::Publish(p) => return self.on_publish(key, skey, p),
            Packet::PubAck { pkid, .. } => self.on_ack(skey, pkid, Ack::PubAck),
            Packet::PubRec { pkid, reason: code } => self.on_pubrec(key, skey, pkid, code),
            Packet::PubComp { pkid, .. } => self.on_ack(skey, pkid, Ack::PubComp),
            Packet::PubRel { pkid, .. } => self.on_pubrel(key, skey, pkid),
            Packet::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => return self.on_subscribe(key, skey, pkid, filters, subscription_id),
            Packet::Unsubscribe { pkid, filters } => self.on_unsubscribe(key, skey, pkid, &filters),
            Packet::PingReq => {
                self.wire
                    .output(&self.clock, key, 2, codec::encode_pingresp);
                self.services.metrics.packet_out(packet::PINGRESP);
            }
            Packet::Disconnect {
                reason: code,
                session_expiry,
            } => return self.on_disconnect(key, skey, code, session_expiry),
            Packet::Auth => {
                return self.close_protocol(
                    key,
                    reason::PROTOCOL_ERROR,
                    "AUTH without enhanced authentication",
                );
            }
        }
        true
    }

    /// Closes for a protocol breach found above the codec, with an MQTT 5 reason code.
    pub(in crate::shard) fn close_protocol(&mut self, key: usize, code: u8, why: &str) -> bool {
        let client = self.client_id_of(key);
        tracing::info!(shard = self.id, client_id = %client, error = why, "protocol error, closing");
        self.close_conn(key, DisconnectReason::ProtocolError, Some(code));
        false
    }
}
