//! MQTT 5 property sections of the packets a client sends: the property identifiers,
//! which packet may carry which, the walk over a section ([`properties`]) and the range
//! rules the spec puts on single values. Kept apart from the packet decoders because
//! mqttbytes' own property reading is too lax to rely on (see the parent module).

use super::reader::Reader;
use super::{ProtocolError, Result};

/// MQTT 5 property identifiers, and which ones each client packet may carry.
pub(super) mod prop {
    pub(crate) const PAYLOAD_FORMAT: u8 = 0x01;
    pub(crate) const MESSAGE_EXPIRY: u8 = 0x02;
    pub(crate) const CONTENT_TYPE: u8 = 0x03;
    pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
    pub(crate) const CORRELATION_DATA: u8 = 0x09;
    pub(crate) const SUBSCRIPTION_ID: u8 = 0x0B;
    pub(crate) const SESSION_EXPIRY: u8 = 0x11;
    pub(crate) const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub(crate) const AUTH_METHOD: u8 = 0x15;
    pub(crate) const AUTH_DATA: u8 = 0x16;
    pub(crate) const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub(crate) const WILL_DELAY: u8 = 0x18;
    pub(crate) const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub(crate) const RESPONSE_INFO: u8 = 0x1A;
    pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
    pub(crate) const REASON_STRING: u8 = 0x1F;
    pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const MAXIMUM_QOS: u8 = 0x24;
    pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
    pub(crate) const USER_PROPERTY: u8 = 0x26;
    pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub(crate) const WILDCARD_AVAILABLE: u8 = 0x28;
    pub(crate) const SUB_IDS_AVAILABLE: u8 = 0x29;
    pub(crate) const SHARED_AVAILABLE: u8 = 0x2A;

    /// A set of identifiers as a bitmask: every identifier is below 64.
    const fn set(ids: &[u8]) -> u64 {
        let mut mask = 0;
        let mut i = 0;
        while i < ids.len() {
            mask |= 1 << ids[i];
            i += 1;
        }
        mask
    }

    pub(crate) const IN_CONNECT: u64 = set(&[
        SESSION_EXPIRY,
        RECEIVE_MAXIMUM,
        MAXIMUM_PACKET_SIZE,
        TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFO,
        REQUEST_PROBLEM_INFO,
        USER_PROPERTY,
        AUTH_METHOD,
        AUTH_DATA,
    ]);
    pub(crate) const IN_WILL: u64 = set(&[
        WILL_DELAY,
        PAYLOAD_FORMAT,
        MESSAGE_EXPIRY,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ]);
    /// No Subscription Identifier: a client must not send one ([MQTT-3.3.4-6]).
    pub(crate) const IN_PUBLISH: u64 = set(&[
        PAYLOAD_FORMAT,
        MESSAGE_EXPIRY,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ]);
    pub(crate) const IN_ACK: u64 = set(&[REASON_STRING, USER_PROPERTY]);
    pub(crate) const IN_SUBSCRIBE: u64 = set(&[SUBSCRIPTION_ID, USER_PROPERTY]);
    pub(crate) const IN_UNSUBSCRIBE: u64 = set(&[USER_PROPERTY]);
    pub(crate) const IN_DISCONNECT: u64 = set(&[
        SESSION_EXPIRY,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ]);
    pub(crate) const IN_AUTH: u64 = set(&[AUTH_METHOD, AUTH_DATA, REASON_STRING, USER_PROPERTY]);
}

/// One property value, borrowed from the frame.
#[derive(Clone, Copy)]
pub(super) enum Value<'a> {
    Byte(u8),
    Two(u16),
    Four(u32),
    VarInt(u32),
    Str(&'a str),
    Bin(&'a [u8]),
    Pair(&'a str, &'a str),
}

/// Walks an MQTT 5 property section: its Variable Byte Integer length, then properties
/// that must fill exactly that many bytes. Refuses identifiers not in `allowed`, repeats
/// of anything but User Property, and out-of-range values; hands each property to `each`.
pub(super) fn properties<'a>(
    r: &mut Reader<'a>,
    allowed: u64,
    mut each: impl FnMut(u8, Value<'a>) -> Result<()>,
) -> Result<()> {
    let len = r.varint()?;
    let section = r
        .take(len as usize)
        .map_err(|_| ProtocolError::Malformed("property length runs past the end of the packet"))?;
    let mut p = Reader::new(section);
    let mut seen = 0u64;
    while !p.is_empty() {
        let id = p.u8()?;
        if id >= 64 || allowed & (1 << id) == 0 {
            return Err(ProtocolError::InvalidProperty(id));
        }
        if id != prop::USER_PROPERTY {
            if seen & (1 << id) != 0 {
                return Err(ProtocolError::DuplicateProperty(id));
            }
            seen |= 1 << id;
        }
        let value = match id {
            prop::PAYLOAD_FORMAT
            | prop::REQUEST_PROBLEM_INFO
            | prop::REQUEST_RESPONSE_INFO
            | prop::MAXIMUM_QOS
            | prop::RETAIN_AVAILABLE
            | prop::WILDCARD_AVAILABLE
            | prop::SUB_IDS_AVAILABLE
            | prop::SHARED_AVAILABLE => Value::Byte(p.u8()?),
            prop::SERVER_KEEP_ALIVE
            | prop::RECEIVE_MAXIMUM
            | prop::TOPIC_ALIAS_MAXIMUM
            | prop::TOPIC_ALIAS => Value::Two(p.u16()?),
            prop::MESSAGE_EXPIRY
            | prop::SESSION_EXPIRY
            | prop::WILL_DELAY
            | prop::MAXIMUM_PACKET_SIZE => Value::Four(p.u32()?),
            prop::SUBSCRIPTION_ID => Value::VarInt(p.varint()?),
            prop::CONTENT_TYPE
            | prop::RESPONSE_TOPIC
            | prop::ASSIGNED_CLIENT_ID
            | prop::AUTH_METHOD
            | prop::RESPONSE_INFO
            | prop::SERVER_REFERENCE
            | prop::REASON_STRING => Value::Str(p.str()?),
            prop::CORRELATION_DATA | prop::AUTH_DATA => Value::Bin(p.binary()?),
            prop::USER_PROPERTY => Value::Pair(p.str()?, p.str()?),
            _ => return Err(ProtocolError::InvalidProperty(id)),
        };
        check_value(id, value)?;
        each(id, value)?;
    }
    Ok(())
}

/// Range rules the spec puts on single property values.
fn check_value(id: u8, value: Value<'_>) -> Result<()> {
    match (id, value) {
        (
            prop::PAYLOAD_FORMAT | prop::REQUEST_PROBLEM_INFO | prop::REQUEST_RESPONSE_INFO,
            Value::Byte(v),
        ) if v > 1 => Err(ProtocolError::InvalidPropertyValue(id)),
        (prop::RECEIVE_MAXIMUM, Value::Two(0)) | (prop::MAXIMUM_PACKET_SIZE, Value::Four(0)) => {
            Err(ProtocolError::InvalidPropertyValue(id))
        }
        (prop::TOPIC_ALIAS, Value::Two(0)) => Err(ProtocolError::TopicAliasInvalid),
        (prop::SUBSCRIPTION_ID, Value::VarInt(0)) => Err(ProtocolError::SubscriptionIdZero),
        // A Response Topic is a topic name ([MQTT-3.3.2-14]).
        (prop::RESPONSE_TOPIC, Value::Str(t)) if t.is_empty() || t.contains(['+', '#']) => {
            Err(ProtocolError::InvalidPropertyValue(id))
        }
        _ => Ok(()),
    }
}
