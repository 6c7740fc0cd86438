//! Inbound PUBLISH: topic aliases, the ACL, QoS 1/2 acknowledgements and routing.

use std::sync::Arc;

use crate::codec::{self, reason, Publish, Version};
use crate::message::{Message, Origin};

use crate::shard::{packet, Shard};

impl Shard {
    /// An inbound PUBLISH: checked (topic length, alias, retain, ACL), then routed and
    /// acknowledged. False when the connection was closed for it.
    pub(in crate::shard) fn on_publish(&mut self, key: usize, skey: usize, p: Publish) -> bool {
        if p.topic.len() > self.settings.max_topic_len {
            return self.close_protocol(
                key,
                reason::TOPIC_NAME_INVALID,
                "topic name longer than max_topic_len",
            );
        }
        let (qos, pkid) = (p.qos, p.pkid);
        let topic = match self.inbound_topic(key, skey, p.topic, p.topic_alias) {
            Ok(t) => t,
            Err(alive) => return alive,
        };
        if p.retain && !self.settings.retain_available {
            return self.close_protocol(
                key,
                reason::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            );
        }
        let refusal = if !self.publish_allowed(skey, &topic) {
            Some(reason::NOT_AUTHORIZED)
        } else if p.retain && !self.retained_admitted(skey, &topic, &p.payload) {
            Some(reason::QUOTA_EXCEEDED)
        } else {
            None
        };
        if let Some(v5_code) = refusal {
            self.deny_publish(key, skey, qos, pkid, v5_code);
            return true;
        }
        if qos == 2 {
            match self.note_inbound_qos2(skey, pkid) {
                Qos2::New => {}
                Qos2::Resent => {
                    // A resend of a message we already have: acknowledge, do not route again.
                    self.ack_publish(key, qos, pkid, 0);
                    return true;
                }
                Qos2::TooMany => {
                    return self.close_protocol(
                        key,
                        reason::RECEIVE_MAXIMUM_EXCEEDED,
                        "more QoS 2 messages in flight than Receive Maximum",
                    )
                }
            }
        }
        let expiry = p.props.as_ref().and_then(|pr| pr.message_expiry);
        let origin = Origin::Device {
            shard: self.id as u16,
            session: skey as u32,
        };
        let mut msg = Message::new(topic, p.payload, qos, p.retain, origin);
        // Its expiry counts from the shard's clock, as every deadline the shard keeps.
        msg.created = self.clock.now_instant;
        let mut msg = msg.with_expiry_secs(expiry);
        msg.props = p.props;
        let msg = Arc::new(msg);
        self.emit_uplink(skey, &msg);
        self.publish(msg);
        self.ack_publish(key, qos, pkid, 0);
        true
    }

    /// The topic of an inbound PUBLISH: its name, or the one its MQTT 5 topic alias
    /// stands for (an alias with a name sets it). `Err(alive)` when the alias is invalid.
    fn inbound_topic(
        &mut self,
        key: usize,
        skey: usize,
        name: String,
        alias: Option<u16>,
    ) -> Result<Arc<str>, bool> {
        let Some(a) = alias else {
            return Ok(Arc::from(name));
        };
        if a == 0 || a > self.settings.topic_alias_maximum {
            return Err(self.close_protocol(
                key,
                reason::TOPIC_ALIAS_INVALID,
                "topic alias 0 or above our Topic Alias Maximum",
            ));
        }
        let aliases = self.sessions[skey]
            .state()
            .aliases
            .get_or_insert_with(Default::default);
        if !name.is_empty() {
            aliases.set_inbound(a, &name);
            return Ok(Arc::from(name));
        }
        match aliases.inbound(a) {
            Some(t) => Ok(t),
            None => Err(self.close_protocol(
                key,
                reason::PROTOCOL_ERROR,
                "topic alias used before it was set",
            )),
        }
    }

    /// A PUBLISH refused (by the ACL, or the retained byte bounds). MQTT 3.1.1 has no
    /// way to refuse: acknowledge and drop. MQTT 5: acknowledge with `v5_code`.
    fn deny_publish(&mut self, key: usize, skey: usize, qos: u8, pkid: u16, v5_code: u8) {
        let v = self.wire.conns[key].version;
        let code = if v == Version::V5 { v5_code } else { 0 };
        if qos == 2 && v != Version::V5 {
            // The client will PUBREL it; answer that as for any message.
            let max = usize::from(self.settings.receive_maximum);
            let st = self.sessions[skey].state();
            if !st.inbound_qos2.contains(&pkid) && st.inbound_qos2.len() < max {
                st.inbound_qos2.push(pkid);
                self.store_qos2_in(skey, pkid, true);
            }
        }
        self.ack_publish(key, qos, pkid, code);
    }

    /// Records an inbound QoS 2 packet id until its PUBREL, within Receive Maximum.
    fn note_inbound_qos2(&mut self, skey: usize, pkid: u16) -> Qos2 {
        let max = usize::from(self.settings.receive_maximum);
        let st = self.sessions[skey].state();
        if st.inbound_qos2.contains(&pkid) {
            return Qos2::Resent;
        }
        if st.inbound_qos2.len() >= max {
            return Qos2::TooMany;
        }
        st.inbound_qos2.push(pkid);
        self.store_qos2_in(skey, pkid, true);
        Qos2::New
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) with reason `code`; nothing for QoS 0.
    fn ack_publish(&mut self, key: usize, qos: u8, pkid: u16, code: u8) {
        let v = self.wire.conns[key].version;
        let kind = match qos {
            1 => packet::PUBACK,
            2 => packet::PUBREC,
            _ => return,
        };
        self.wire.output(&self.clock, key, 16, |out| match qos {
            1 => codec::encode_puback(out, v, pkid, code),
            _ => codec::encode_pubrec(out, v, pkid, code),
        });
        self.services.metrics.packet_out(kind);
    }
}

/// What an inbound QoS 2 packet id is to the session.
enum Qos2 {
    New,
    /// Already received, PUBREL not yet: the client resent it.
    Resent,
    /// More unreleased than Receive Maximum.
    TooMany,
}
