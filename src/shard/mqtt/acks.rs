//! Acknowledgements: of outbound QoS 1/2 messages (PUBACK, PUBREC, PUBCOMP: the
//! session ends the exchange, the window refills), and PUBREL of inbound QoS 2 ones.

use crate::codec::{self, reason};
use crate::session::Ack;

use crate::shard::{packet, Shard};

impl Shard {
    /// A PUBACK or PUBCOMP: the exchange ends (a waiting push request is told, the
    /// stored copy forgotten) and the window has room for the next queued message.
    pub(in crate::shard) fn on_ack(&mut self, skey: usize, pkid: u16, ack: Ack) {
        if let Some(mut f) = self.sessions[skey].complete(pkid, ack) {
            if let Some(w) = f.item.waiter.take() {
                let _ = w.send(());
            }
            self.store_forget(skey, &f.item);
        }
        self.refill(skey);
    }

    pub(in crate::shard) fn on_pubrec(&mut self, key: usize, skey: usize, pkid: u16, code: u8) {
        let v = self.wire.conns[key].version;
        let found = if code >= 0x80 {
            // The receiver refused it; the exchange ends here (MQTT 5 4.3.3).
            if let Some(f) = self.sessions[skey].complete(pkid, Ack::PubRec) {
                self.store_forget(skey, &f.item);
            }
            false
        } else {
            let released = self.sessions[skey].release(pkid);
            if released {
                self.store_qos2_released(skey, pkid);
            }
            released
        };
        if code < 0x80 {
            let rc = if found {
                0
            } else {
                reason::PACKET_ID_NOT_FOUND
            };
            self.wire.output(&self.clock, key, 16, |out| {
                codec::encode_pubrel(out, v, pkid, rc)
            });
            self.services.metrics.packet_out(packet::PUBREL);
        } else {
            self.refill(skey);
        }
    }

    /// PUBREL of an inbound QoS 2 message: the packet id is released; PUBCOMP.
    pub(in crate::shard) fn on_pubrel(&mut self, key: usize, skey: usize, pkid: u16) {
        let v = self.wire.conns[key].version;
        let code = if self.sessions[skey].release_inbound(pkid) {
            self.store_qos2_in(skey, pkid, false);
            0
        } else {
            reason::PACKET_ID_NOT_FOUND
        };
        self.wire.output(&self.clock, key, 16, |out| {
            codec::encode_pubcomp(out, v, pkid, code)
        });
        self.services.metrics.packet_out(packet::PUBCOMP);
    }
}
