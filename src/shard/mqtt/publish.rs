//! Inbound PUBLISH: topic aliases, the ACL, QoS 1/2 acknowledgements and routing.

use std::sync::Arc;

use crate::codec::{self, reason, Publish, Version};
use crate::message::{Message, Origin};

use crate::shard::{packet, Shard};

impl Shard {
    pub(in crate::shard) fn on_publish(&mut self, key: usize, skey: usize, p: Publish) -> bool {
        let v = self.wire.conns[key].version;
        if p.topic.len() > self.settings.max_topic_len {
            return self.close_protocol(
                key,
                reason::TOPIC_NAME_INVALID,
                "topic name longer than max_topic_len",
            );
        }
        let topic: Arc<str> = match p.topic_alias {
            None => Arc::from(p.topic),
            Some(a) if a == 0 || a > self.settings.topic_alias_maximum => {
                return self.close_protocol(
                    key,
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias 0 or above our Topic Alias Maximum",
                );
            }
            Some(a) => {
                let aliases = self.sessions[skey]
                    .state()
                    .aliases
                    .get_or_insert_with(Default::default);
                if p.topic.is_empty() {
                    match aliases.inbound(a) {
                        Some(t) => t,
                        None => {
                            return self.close_protocol(
                                key,
                                reason::PROTOCOL_ERROR,
                                "topic alias used before it was set",
                            )
                        }
                    }
                } else {
                    aliases.set_inbound(a, &p.topic);
                    Arc::from(p.topic)
                }
            }
        };
        if p.retain && !self.settings.retain_available {
            return self.close_protocol(
                key,
                reason::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            );
        }
        if !self.publish_allowed(skey, &topic) {
            // 3.1.1 has no way to refuse: acknowledge and drop. MQTT 5: reason 0x87.
            let code = if v == Version::V5 {
                reason::NOT_AUTHORIZED
            } else {
                0
            };
            match p.qos {
                1 => {
                    self.wire.output(&self.clock, key, 16, |out| {
                        codec::encode_puback(out, v, p.pkid, code)
                    });
                    self.services.metrics.packet_out(packet::PUBACK);
                }
                2 => {
                    if v != Version::V5 {
                        // The client will PUBREL it; answer that as for any message.
                        let max = usize::from(self.settings.receive_maximum);
                        let st = self.sessions[skey].state();
                        if !st.inbound_qos2.contains(&p.pkid) && st.inbound_qos2.len() < max {
                            st.inbound_qos2.push(p.pkid);
                        }
                    }
                    self.wire.output(&self.clock, key, 16, |out| {
                        codec::encode_pubrec(out, v, p.pkid, code)
                    });
                    self.services.metrics.packet_out(packet::PUBREC);
                }
                _ => {}
            }
            return true;
        }
        if p.qos == 2 {
            let max = usize::from(self.settings.receive_maximum);
            let st = self.sessions[skey].state();
            if st.inbound_qos2.contains(&p.pkid) {
                // A resend of a message we already have: acknowledge, do not route again.
                self.wire.output(&self.clock, key, 16, |out| {
                    codec::encode_pubrec(out, v, p.pkid, 0)
                });
                self.services.metrics.packet_out(packet::PUBREC);
                return true;
            }
            if st.inbound_qos2.len() >= max {
                return self.close_protocol(
                    key,
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 messages in flight than Receive Maximum",
                );
            }
            st.inbound_qos2.push(p.pkid);
        }
        let expiry = p.props.as_ref().and_then(|pr| pr.message_expiry);
        let mut msg = Message::new(
            topic,
            p.payload,
            p.qos,
            p.retain,
            Origin::Device {
                shard: self.id as u16,
                session: skey as u32,
            },
        )
        .with_expiry_secs(expiry);
        msg.props = p.props;
        self.publish(Arc::new(msg));
        match p.qos {
            1 => {
                self.wire.output(&self.clock, key, 16, |out| {
                    codec::encode_puback(out, v, p.pkid, 0)
                });
                self.services.metrics.packet_out(packet::PUBACK);
            }
            2 => {
                self.wire.output(&self.clock, key, 16, |out| {
                    codec::encode_pubrec(out, v, p.pkid, 0)
                });
                self.services.metrics.packet_out(packet::PUBREC);
            }
            _ => {}
        }
        true
    }

    /// The ACL's word on a PUBLISH to `topic` from session `skey`; a refusal is counted.
    pub(in crate::shard) fn publish_allowed(&mut self, skey: usize, topic: &str) -> bool {
        self.acl_allows(skey, false, topic)
    }
}
