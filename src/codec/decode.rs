//! Decoding: one whole frame from a client into a [`Connect`] or a [`Packet`].
//!
//! Through mqttbytes, then checked here for what it skips:
//! - PUBLISH (3.1.1 and 5): reserved QoS 3 and DUP on QoS 0 are checked before, topic
//!   names, the MQTT 5 property section and the payload format after.
//! - PUBACK, PUBREC, PUBREL, PUBCOMP (3.1.1 and 5): flags, exact length, packet id 0, and
//!   the property section after.
//! - UNSUBSCRIBE (3.1.1): empty filter list, packet id 0, U+0000.
//!
//! Parsed here by hand, because mqttbytes 0.6 is wrong for them:
//! - CONNECT: mqttbytes refuses "MQIsdp" (MQTT 3.1), reads the password as a `String` (a
//!   binary password fails), turns an empty user name into "no user name", never checks
//!   the reserved flag, and its field readers are private so they cannot be reused.
//! - SUBSCRIBE (both): mqttbytes ignores the reserved bits of the subscription options,
//!   which both versions call malformed ([MQTT-3.8.3-4] in 3.1.1, [MQTT-3.8.3-5] in 5), and
//!   keeps the last of several Subscription Identifiers.
//! - UNSUBSCRIBE (5): mqttbytes' reader has a leftover `dbg!` that writes every packet id
//!   to stderr, a blocking write on the IO thread.
//! - DISCONNECT (5): mqttbytes refuses the valid short form, a reason code with no
//!   property length (Remaining Length 1, spec 3.14.2.2.1).
//! - AUTH (5) is not in mqttbytes 0.6; PINGREQ and DISCONNECT (3.1.1) have no body.
//!
//! MQTT 5 property sections are always walked here ([`properties`]): mqttbytes reads
//! properties until its cursor passes the declared length without checking that they end
//! on it, accepts duplicates, and takes any known property in any packet.
//!
//! The packet decoders are in this file; the body cursor is in `reader`, the property
//! sections in `props`, and the unit tests in `decode/tests.rs`.

use bytes::Bytes;
use mqttbytes::FixedHeader;

use super::{
    fixed_header, Connect, ConnectError, Packet, ProtocolError, Publish, PublishProps,
    SubscribeFilter, Version, Will,
};

mod props;
mod reader;

use props::{prop, properties, Value};
use reader::Reader;

type Result<T> = std::result::Result<T, ProtocolError>;

/// Decodes the first packet of a connection, which must be a CONNECT.
///
/// Accepts "MQTT" level 4 (3.1.1) and 5, and "MQIsdp" level 3 (3.1). See [`ConnectError`]
/// for how a refusal is answered.
pub fn decode_connect(frame: &[u8]) -> std::result::Result<Connect, ConnectError> {
    let unanswerable = |error| ConnectError {
        version: None,
        error,
    };
    let header = whole_frame(frame).map_err(unanswerable)?;
    if header.byte1 >> 4 != 1 {
        return Err(unanswerable(ProtocolError::UnexpectedPacket(packet_name(
            header.byte1 >> 4,
        ))));
    }
    if header.byte1 != 0x10 {
        return Err(unanswerable(ProtocolError::ReservedFlags(header.byte1)));
    }
    let mut r = Reader::new(header.body(frame));
    let name = r.binary().map_err(unanswerable)?;
    let level = r.u8().map_err(unanswerable)?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT" | b"MQIsdp", level) => {
            return Err(ConnectError {
                version: Some(Version::V311),
                error: ProtocolError::UnsupportedProtocolLevel(level),
            })
        }
        _ => return Err(unanswerable(ProtocolError::UnknownProtocolName)),
    };
    connect_body(&mut r, version).map_err(|error| {
        // MQTT 5 answers every refusal with a reason code; 3.1.1 only the ones that have
        // a return code, and closes silently otherwise.
        let answerable = version == Version::V5 || error == ProtocolError::InvalidClientId;
        ConnectError {
            version: answerable.then_some(version),
            error,
        }
    })
}

/// Decodes one whole frame received after CONNECT.
pub fn decode(frame: &[u8], version: Version) -> Result<Packet> {
    let header = whole_frame(frame)?;
    let v5 = version == Version::V5;
    let kind = header.byte1 >> 4;
    match kind {
        3 => publish(frame, &header, v5),
        4 | 5 | 7 => {
            header.expect_flags(0)?;
            ack(frame, &header, v5)
        }
        6 => {
            header.expect_flags(0b0010)?;
            ack(frame, &header, v5)
        }
        8 => {
            header.expect_flags(0b0010)?;
            subscribe(header.body(frame), v5)
        }
        10 => {
            header.expect_flags(0b0010)?;
            unsubscribe(frame, &header, v5)
        }
        12 => {
            header.expect_flags(0)?;
            if header.remaining != 0 {
                return Err(ProtocolError::Malformed("PINGREQ with a body"));
            }
            Ok(Packet::PingReq)
        }
        14 => {
            header.expect_flags(0)?;
            disconnect(header.body(frame), v5)
        }
        15 if v5 => {
            header.expect_flags(0)?;
            auth(header.body(frame))
        }
        1 | 2 | 9 | 11 | 13 => Err(ProtocolError::UnexpectedPacket(packet_name(kind))),
        _ => Err(ProtocolError::UnknownPacketType(kind)),
    }
}

fn packet_name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "reserved",
    }
}

/// The fixed header of a frame known to be exactly one packet long.
struct Header {
    byte1: u8,
    /// Fixed header bytes: 2 to 5.
    len: usize,
    remaining: usize,
}

impl Header {
    fn body<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        frame.get(self.len..).unwrap_or_default()
    }

    fn expect_flags(&self, flags: u8) -> Result<()> {
        if self.byte1 & 0x0F == flags {
            Ok(())
        } else {
            Err(ProtocolError::ReservedFlags(self.byte1))
        }
    }

    fn mqttbytes(&self) -> FixedHeader {
        FixedHeader::new(self.byte1, self.len - 1, self.remaining)
    }
}

fn whole_frame(frame: &[u8]) -> Result<Header> {
    match fixed_header(frame)? {
        Some((len, remaining)) if len + remaining == frame.len() => Ok(Header {
            byte1: frame[0],
            len,
            remaining,
        }),
        _ => Err(ProtocolError::Malformed(
            "frame length differs from its fixed header",
        )),
    }
}

fn connect_body(r: &mut Reader<'_>, version: Version) -> Result<Connect> {
    let v5 = version == Version::V5;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(ProtocolError::Malformed("reserved connect flag set"));
    }
    let has_will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(ProtocolError::Malformed(
            "will qos or retain without a will",
        ));
    }
    if will_qos == 3 {
        return Err(ProtocolError::InvalidQoS(3));
    }
    if !v5 && has_password && !has_username {
        // [MQTT-3.1.2-22]; MQTT 5 allows a password alone.
        return Err(ProtocolError::Protocol("password without user name"));
    }
    let keep_alive = r.u16()?;
    let mut c = Connect {
        version,
        client_id: String::new(),
        clean_start: flags & 0x02 != 0,
        keep_alive,
        username: None,
        password: None,
        will: None,
        session_expiry: 0,
        receive_maximum: u16::MAX,
        max_packet_size: u32::MAX,
        topic_alias_max: 0,
        request_problem_info: true,
        auth_method: None,
        user_properties: Vec::new(),
    };
    if v5 {
        let mut has_auth_data = false;
        properties(r, prop::IN_CONNECT, |id, value| {
            match (id, value) {
                (prop::SESSION_EXPIRY, Value::Four(v)) => c.session_expiry = v,
                (prop::RECEIVE_MAXIMUM, Value::Two(v)) => c.receive_maximum = v,
                (prop::MAXIMUM_PACKET_SIZE, Value::Four(v)) => c.max_packet_size = v,
                (prop::TOPIC_ALIAS_MAXIMUM, Value::Two(v)) => c.topic_alias_max = v,
                (prop::REQUEST_PROBLEM_INFO, Value::Byte(v)) => c.request_problem_info = v == 1,
                (prop::AUTH_METHOD, Value::Str(m)) => c.auth_method = Some(m.to_owned()),
                (prop::AUTH_DATA, _) => has_auth_data = true,
                (prop::USER_PROPERTY, Value::Pair(k, v)) => {
                    c.user_properties.push((k.to_owned(), v.to_owned()))
                }
                // Request Response Information: this server sends no Response Information.
                _ => {}
            }
            Ok(())
        })?;
        if has_auth_data && c.auth_method.is_none() {
            return Err(ProtocolError::Protocol(
                "authentication data without a method",
            ));
        }
    }
    c.client_id = match r.str() {
        Ok(id) => id.to_owned(),
        Err(ProtocolError::InvalidUtf8) => return Err(ProtocolError::InvalidClientId),
        Err(e) => return Err(e),
    };
    if has_will {
        c.will = Some(Box::new(will(r, v5, will_qos, will_retain)?));
    }
    if has_username {
        c.username = Some(r.str()?.to_owned());
    }
    if has_password {
        c.password = Some(Bytes::copy_from_slice(r.binary()?));
    }
    if !r.is_empty() {
        return Err(ProtocolError::Malformed(
            "bytes after the last CONNECT field",
        ));
    }
    Ok(c)
}

/// The will fields of a CONNECT. Payload and correlation data are copied out on their
/// own, so a stored will does not keep the whole CONNECT (and its password) alive.
fn will(r: &mut Reader<'_>, v5: bool, qos: u8, retain: bool) -> Result<Will> {
    let mut delay_secs = 0;
    let mut props = PublishProps::default();
    if v5 {
        properties(r, prop::IN_WILL, |id, value| {
            match (id, value) {
                (prop::WILL_DELAY, Value::Four(v)) => delay_secs = v,
                (prop::PAYLOAD_FORMAT, Value::Byte(v)) => props.payload_format_indicator = Some(v),
                (prop::MESSAGE_EXPIRY, Value::Four(v)) => props.message_expiry = Some(v),
                (prop::CONTENT_TYPE, Value::Str(s)) => props.content_type = Some(s.to_owned()),
                (prop::RESPONSE_TOPIC, Value::Str(s)) => props.response_topic = Some(s.to_owned()),
                (prop::CORRELATION_DATA, Value::Bin(b)) => {
                    props.correlation_data = Some(Bytes::copy_from_slice(b))
                }
                (prop::USER_PROPERTY, Value::Pair(k, v)) => {
                    props.user_properties.push((k.to_owned(), v.to_owned()))
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    let topic = r.str()?;
    check_topic_name(topic)?;
    if topic.is_empty() {
        return Err(ProtocolError::EmptyTopic);
    }
    let payload = r.binary()?;
    if props.payload_format_indicator == Some(1) && std::str::from_utf8(payload).is_err() {
        return Err(ProtocolError::PayloadFormatInvalid);
    }
    Ok(Will {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        delay_secs,
        props: boxed(props),
    })
}

fn boxed(props: PublishProps) -> Option<Box<PublishProps>> {
    (props != PublishProps::default()).then(|| Box::new(props))
}

/// A topic name as PUBLISH and wills carry it: no wildcards, no U+0000.
fn check_topic_name(topic: &str) -> Result<()> {
    if topic.contains('\0') {
        return Err(ProtocolError::InvalidUtf8);
    }
    if topic.contains(['+', '#']) {
        return Err(ProtocolError::WildcardInTopic);
    }
    Ok(())
}

fn publish(frame: &[u8], header: &Header, v5: bool) -> Result<Packet> {
    let qos = (header.byte1 >> 1) & 0b11;
    if qos == 3 {
        return Err(ProtocolError::InvalidQoS(3));
    }
    if qos == 0 && header.byte1 & 0x08 != 0 {
        return Err(ProtocolError::DupAtQoS0);
    }
    let bytes = Bytes::copy_from_slice(frame);
    let p = if v5 {
        let p = mqttbytes::v5::Publish::read(header.mqttbytes(), bytes).map_err(from_mqttbytes)?;
        let mut topic_alias = None;
        let props = p.properties.and_then(|pp| {
            topic_alias = pp.topic_alias;
            boxed(PublishProps {
                payload_format_indicator: pp.payload_format_indicator,
                message_expiry: pp.message_expiry_interval,
                content_type: pp.content_type,
                response_topic: pp.response_topic,
                correlation_data: pp.correlation_data,
                user_properties: pp.user_properties,
            })
        });
        Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
            topic_alias,
            props,
        }
    } else {
        let p = mqttbytes::v4::Publish::read(header.mqttbytes(), bytes).map_err(from_mqttbytes)?;
        Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
            topic_alias: None,
            props: None,
        }
    };
    check_topic_name(&p.topic)?;
    if v5 {
        // Walk the property section mqttbytes just read: it must end exactly where the
        // payload mqttbytes returned begins, and hold only PUBLISH properties, once each.
        let start = header.len + 2 + p.topic.len() + if qos > 0 { 2 } else { 0 };
        let mut r = Reader::new(frame.get(start..).unwrap_or_default());
        properties(&mut r, prop::IN_PUBLISH, |_, _| Ok(()))?;
        if r.len() != p.payload.len() {
            return Err(ProtocolError::Malformed(
                "property length differs from the properties",
            ));
        }
    }
    if p.topic.is_empty() && p.topic_alias.is_none() {
        return Err(ProtocolError::EmptyTopic);
    }
    let utf8_payload = p.props.as_ref().and_then(|pp| pp.payload_format_indicator) == Some(1);
    if utf8_payload && std::str::from_utf8(&p.payload).is_err() {
        return Err(ProtocolError::PayloadFormatInvalid);
    }
    Ok(Packet::Publish(p))
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP, whose flags the caller has checked.
fn ack(frame: &[u8], header: &Header, v5: bool) -> Result<Packet> {
    let kind = header.byte1 >> 4;
    if !v5 {
        // MQTT 3.1.1: the packet id is all there is, read in place (mqttbytes wants the
        // frame copied into a `Bytes`: an allocation per acknowledgement).
        return match header.body(frame).get(..2) {
            Some(&[hi, lo]) if header.remaining == 2 => {
                ack_packet(kind, u16::from_be_bytes([hi, lo]), 0)
            }
            _ => Err(ProtocolError::Malformed("acknowledgement length is not 2")),
        };
    }
    let fixed = header.mqttbytes();
    let bytes = Bytes::copy_from_slice(frame);
    use mqttbytes::v5 as m5;
    let (pkid, reason) = match kind {
        4 => {
            let a = m5::PubAck::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        5 => {
            let a = m5::PubRec::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        6 => {
            let a = m5::PubRel::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        _ => {
            let a = m5::PubComp::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
    };
    if header.remaining >= 4 {
        // Packet id (2) and reason code (1), then properties to the end.
        let mut r = Reader::new(header.body(frame).get(3..).unwrap_or_default());
        properties(&mut r, prop::IN_ACK, |_, _| Ok(()))?;
        if !r.is_empty() {
            return Err(ProtocolError::Malformed("bytes after the properties"));
        }
    }
    ack_packet(kind, pkid, reason)
}

/// The acknowledgement of `kind` (4 to 7); packet id 0 is refused.
fn ack_packet(kind: u8, pkid: u16, reason: u8) -> Result<Packet> {
    if pkid == 0 {
        return Err(ProtocolError::ZeroPacketId);
    }
    Ok(match kind {
        4 => Packet::PubAck { pkid, reason },
        5 => Packet::PubRec { pkid, reason },
        6 => Packet::PubRel { pkid, reason },
        _ => Packet::PubComp { pkid, reason },
    })
}

fn subscribe(body: &[u8], v5: bool) -> Result<Packet> {
    let mut r = Reader::new(body);
    let pkid = r.u16()?;
    if pkid == 0 {
        return Err(ProtocolError::ZeroPacketId);
    }
    let mut subscription_id = None;
    if v5 {
        properties(&mut r, prop::IN_SUBSCRIBE, |id, value| {
            if let (prop::SUBSCRIPTION_ID, Value::VarInt(n)) = (id, value) {
                subscription_id = Some(n);
            }
            Ok(())
        })?;
    }
    // 3.1.1 has only the QoS bits; MQTT 5 adds No Local, Retain As Published and Retain
    // Handling and keeps the top two bits reserved.
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.str()?.to_owned();
        let options = r.u8()?;
        if options & reserved != 0 {
            return Err(ProtocolError::Malformed(
                "reserved subscription option bits set",
            ));
        }
        let qos = options & 0b11;
        if qos == 3 {
            return Err(ProtocolError::InvalidQoS(3));
        }
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(ProtocolError::Protocol("retain handling 3"));
        }
        filters.push(SubscribeFilter {
            filter,
            qos,
            no_local: options & 0b0100 != 0,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(ProtocolError::NoFilters);
    }
    Ok(Packet::Subscribe {
        pkid,
        filters,
        subscription_id,
    })
}

fn unsubscribe(frame: &[u8], header: &Header, v5: bool) -> Result<Packet> {
    let (pkid, filters) = if v5 {
        let mut r = Reader::new(header.body(frame));
        let pkid = r.u16()?;
        properties(&mut r, prop::IN_UNSUBSCRIBE, |_, _| Ok(()))?;
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.str()?.to_owned());
        }
        (pkid, filters)
    } else {
        let u = mqttbytes::v4::Unsubscribe::read(header.mqttbytes(), Bytes::copy_from_slice(frame))
            .map_err(from_mqttbytes)?;
        if u.topics.iter().any(|t| t.contains('\0')) {
            return Err(ProtocolError::InvalidUtf8);
        }
        (u.pkid, u.topics)
    };
    if pkid == 0 {
        return Err(ProtocolError::ZeroPacketId);
    }
    if filters.is_empty() {
        return Err(ProtocolError::NoFilters);
    }
    Ok(Packet::Unsubscribe { pkid, filters })
}

/// DISCONNECT reason codes a client may send (MQTT 5 table 3-10, sender "Client").
const CLIENT_DISCONNECT_REASONS: [u8; 14] = [
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
];

fn disconnect(body: &[u8], v5: bool) -> Result<Packet> {
    if !v5 {
        if !body.is_empty() {
            return Err(ProtocolError::Malformed("DISCONNECT with a body"));
        }
        return Ok(Packet::Disconnect {
            reason: 0,
            session_expiry: None,
        });
    }
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok(Packet::Disconnect {
            reason: 0,
            session_expiry: None,
        });
    }
    let reason = r.u8()?;
    if !CLIENT_DISCONNECT_REASONS.contains(&reason) {
        return Err(ProtocolError::InvalidReasonCode(reason));
    }
    let mut session_expiry = None;
    if !r.is_empty() {
        properties(&mut r, prop::IN_DISCONNECT, |id, value| {
            if let (prop::SESSION_EXPIRY, Value::Four(v)) = (id, value) {
                session_expiry = Some(v);
            }
            Ok(())
        })?;
    }
    if !r.is_empty() {
        return Err(ProtocolError::Malformed("bytes after the properties"));
    }
    Ok(Packet::Disconnect {
        reason,
        session_expiry,
    })
}

fn auth(body: &[u8]) -> Result<Packet> {
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok(Packet::Auth);
    }
    let reason = r.u8()?;
    if ![0x00, 0x18, 0x19].contains(&reason) {
        return Err(ProtocolError::InvalidReasonCode(reason));
    }
    if !r.is_empty() {
        properties(&mut r, prop::IN_AUTH, |_, _| Ok(()))?;
    }
    if !r.is_empty() {
        return Err(ProtocolError::Malformed("bytes after the properties"));
    }
    Ok(Packet::Auth)
}

fn from_mqttbytes(e: mqttbytes::Error) -> ProtocolError {
    use mqttbytes::Error as E;
    match e {
        E::TopicNotUtf8 => ProtocolError::InvalidUtf8,
        E::PacketIdZero => ProtocolError::ZeroPacketId,
        E::SubscriptionIdZero => ProtocolError::SubscriptionIdZero,
        E::InvalidQoS(q) => ProtocolError::InvalidQoS(q),
        E::InvalidPropertyType(id) => ProtocolError::InvalidProperty(id),
        E::InvalidConnectReturnCode(code)
        | E::InvalidReason(code)
        | E::InvalidSubscribeReasonCode(code) => ProtocolError::InvalidReasonCode(code),
        E::InvalidPacketType(t) => ProtocolError::UnknownPacketType(t),
        E::MalformedRemainingLength => {
            ProtocolError::Malformed("variable byte integer longer than 4 bytes")
        }
        _ => ProtocolError::Malformed("a field runs past the end of the packet"),
    }
}

#[cfg(test)]
mod tests;
