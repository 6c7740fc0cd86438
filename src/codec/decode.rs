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

use bytes::Bytes;
use mqttbytes::FixedHeader;

use super::{
    fixed_header, Connect, ConnectError, Packet, ProtocolError, Publish, PublishProps,
    SubscribeFilter, Version, Will,
};

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
    if !v5 && header.remaining != 2 {
        return Err(ProtocolError::Malformed("acknowledgement length is not 2"));
    }
    let fixed = header.mqttbytes();
    let bytes = Bytes::copy_from_slice(frame);
    use mqttbytes::{v4, v5 as m5};
    let kind = header.byte1 >> 4;
    let (pkid, reason) = match (kind, v5) {
        (4, false) => (
            v4::PubAck::read(fixed, bytes).map_err(from_mqttbytes)?.pkid,
            0,
        ),
        (5, false) => (
            v4::PubRec::read(fixed, bytes).map_err(from_mqttbytes)?.pkid,
            0,
        ),
        (6, false) => (
            v4::PubRel::read(fixed, bytes).map_err(from_mqttbytes)?.pkid,
            0,
        ),
        (7, false) => (
            v4::PubComp::read(fixed, bytes)
                .map_err(from_mqttbytes)?
                .pkid,
            0,
        ),
        (4, true) => {
            let a = m5::PubAck::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        (5, true) => {
            let a = m5::PubRec::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        (6, true) => {
            let a = m5::PubRel::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
        _ => {
            let a = m5::PubComp::read(fixed, bytes).map_err(from_mqttbytes)?;
            (a.pkid, a.reason as u8)
        }
    };
    if v5 && header.remaining >= 4 {
        // Packet id (2) and reason code (1), then properties to the end.
        let mut r = Reader::new(header.body(frame).get(3..).unwrap_or_default());
        properties(&mut r, prop::IN_ACK, |_, _| Ok(()))?;
        if !r.is_empty() {
            return Err(ProtocolError::Malformed("bytes after the properties"));
        }
    }
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

/// A cursor over a packet body that never reads past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(ProtocolError::Malformed(
                "a field runs past the end of the packet",
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        let b = self.take(1)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A Variable Byte Integer: at most 4 bytes, so at most 268,435,455.
    fn varint(&mut self) -> Result<u32> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ProtocolError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    /// Binary Data: a 2-byte length, then that many bytes.
    fn binary(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 Encoded String: well-formed and without U+0000.
    fn str(&mut self) -> Result<&'a str> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| ProtocolError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(s)
    }
}

/// MQTT 5 property identifiers, and which ones each client packet may carry.
mod prop {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTH_METHOD: u8 = 0x15;
    pub const AUTH_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const RESPONSE_INFO: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_AVAILABLE: u8 = 0x28;
    pub const SUB_IDS_AVAILABLE: u8 = 0x29;
    pub const SHARED_AVAILABLE: u8 = 0x2A;

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

    pub const IN_CONNECT: u64 = set(&[
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
    pub const IN_WILL: u64 = set(&[
        WILL_DELAY,
        PAYLOAD_FORMAT,
        MESSAGE_EXPIRY,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ]);
    /// No Subscription Identifier: a client must not send one ([MQTT-3.3.4-6]).
    pub const IN_PUBLISH: u64 = set(&[
        PAYLOAD_FORMAT,
        MESSAGE_EXPIRY,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ]);
    pub const IN_ACK: u64 = set(&[REASON_STRING, USER_PROPERTY]);
    pub const IN_SUBSCRIBE: u64 = set(&[SUBSCRIPTION_ID, USER_PROPERTY]);
    pub const IN_UNSUBSCRIBE: u64 = set(&[USER_PROPERTY]);
    pub const IN_DISCONNECT: u64 = set(&[
        SESSION_EXPIRY,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ]);
    pub const IN_AUTH: u64 = set(&[AUTH_METHOD, AUTH_DATA, REASON_STRING, USER_PROPERTY]);
}

/// One property value, borrowed from the frame.
#[derive(Clone, Copy)]
enum Value<'a> {
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
fn properties<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame_len;

    /// A frame from a first byte and a hand-written body: adds the Remaining Length.
    fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![byte1];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            f.push(b);
            if n == 0 {
                break;
            }
        }
        f.extend_from_slice(body);
        f
    }

    /// A length-prefixed string or binary field.
    fn s(v: &[u8]) -> Vec<u8> {
        let mut out = (v.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(v);
        out
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// A CONNECT frame: protocol name, level, flags, keep alive 60, then `rest`.
    fn connect(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        frame(0x10, &cat(&[&s(name), &[level, flags, 0, 60], rest]))
    }

    fn err(frame: &[u8], v: Version) -> ProtocolError {
        decode(frame, v).unwrap_err()
    }

    // ---- CONNECT ----

    #[test]
    fn connect_v311_with_will_and_login() {
        // user name, password, will retain, will QoS 1, will, clean session.
        let rest = cat(&[
            &s(b"dev-1"),
            &s(b"alarm"),
            &s(b"gone"),
            &s(b"user"),
            &s(b"pw"),
        ]);
        let c = decode_connect(&connect(b"MQTT", 4, 0b1110_1110, &rest)).unwrap();
        assert_eq!(c.version, Version::V311);
        assert_eq!(c.client_id, "dev-1");
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        let w = c.will.unwrap();
        assert_eq!(
            (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
            ("alarm", &b"gone"[..], 1, true)
        );
        assert_eq!(w.props, None);
        assert_eq!(c.receive_maximum, 65535);
        assert_eq!(c.max_packet_size, u32::MAX);
        assert!(c.request_problem_info);
    }

    #[test]
    fn connect_mqtt31_mqisdp() {
        let c = decode_connect(&connect(b"MQIsdp", 3, 0b0000_0010, &s(b"old-client"))).unwrap();
        assert_eq!(c.version, Version::V31);
        assert_eq!(c.client_id, "old-client");
        assert!(c.clean_start);
    }

    #[test]
    fn connect_binary_password() {
        let pw = [0xFF, 0x00, 0xC3, 0x28, 0x80];
        let rest = cat(&[&s(b"id"), &s(b"u"), &s(&pw)]);
        let c = decode_connect(&connect(b"MQTT", 4, 0b1100_0000, &rest)).unwrap();
        assert_eq!(c.password.as_deref(), Some(&pw[..]));
    }

    #[test]
    fn connect_empty_username_is_kept() {
        let rest = cat(&[&s(b"id"), &s(b"")]);
        let c = decode_connect(&connect(b"MQTT", 4, 0b1000_0000, &rest)).unwrap();
        assert_eq!(c.username.as_deref(), Some(""));
        assert_eq!(c.password, None);
    }

    #[test]
    fn connect_password_without_username() {
        let rest = cat(&[&s(b"id"), &s(b"pw")]);
        let e = decode_connect(&connect(b"MQTT", 4, 0b0100_0000, &rest)).unwrap_err();
        assert_eq!(
            e.error,
            ProtocolError::Protocol("password without user name")
        );
        // 3.1.1 has no return code for it: close without CONNACK.
        assert_eq!(e.version, None);
        // MQTT 5 allows it.
        let rest5 = cat(&[&[0], &s(b"id"), &s(b"pw")]);
        let c = decode_connect(&connect(b"MQTT", 5, 0b0100_0000, &rest5)).unwrap();
        assert_eq!(c.username, None);
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    }

    #[test]
    fn connect_v5_properties() {
        let props = cat(&[
            &[0x11, 0, 0, 0x0E, 0x10], // session expiry 3600
            &[0x21, 0, 10],            // receive maximum 10
            &[0x27, 0, 0, 0x10, 0],    // maximum packet size 4096
            &[0x22, 0, 5],             // topic alias maximum 5
            &[0x17, 0],                // request problem information 0
            // Two user properties with one key: allowed.
            &[0x26],
            &s(b"k"),
            &s(b"v"),
            &[0x26],
            &s(b"k"),
            &s(b"w"),
            // Authentication method.
            &[0x15],
            &s(b"SCRAM"),
        ]);
        let rest = cat(&[&[props.len() as u8], &props, &s(b"c5")]);
        let c = decode_connect(&connect(b"MQTT", 5, 0b0000_0000, &rest)).unwrap();
        assert_eq!(c.version, Version::V5);
        assert!(!c.clean_start);
        assert_eq!(c.session_expiry, 3600);
        assert_eq!(c.receive_maximum, 10);
        assert_eq!(c.max_packet_size, 4096);
        assert_eq!(c.topic_alias_max, 5);
        assert!(!c.request_problem_info);
        assert_eq!(c.auth_method.as_deref(), Some("SCRAM"));
        assert_eq!(
            c.user_properties,
            vec![("k".into(), "v".into()), ("k".into(), "w".into())]
        );
    }

    #[test]
    fn connect_v5_will_properties() {
        let will_props = cat(&[
            &[0x18, 0, 0, 0, 30], // will delay 30
            &[0x01, 1],           // payload is UTF-8
            &[0x02, 0, 0, 0, 60], // message expiry 60
            &[0x03],
            &s(b"text/plain"),
            &[0x08],
            &s(b"reply/here"),
            &[0x09],
            &s(&[1, 2, 3]),
        ]);
        let rest = cat(&[
            &[0],
            &s(b"c"),
            &[will_props.len() as u8],
            &will_props,
            &s(b"t/w"),
            &s(b"bye"),
        ]);
        let c = decode_connect(&connect(b"MQTT", 5, 0b0001_0100, &rest)).unwrap();
        let w = c.will.unwrap();
        assert_eq!(w.qos, 2);
        assert_eq!(w.delay_secs, 30);
        let p = w.props.unwrap();
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.message_expiry, Some(60));
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(p.correlation_data.as_deref(), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn connect_refuses_unknown_protocols() {
        let e = decode_connect(&connect(b"MQTT", 6, 2, &s(b"c"))).unwrap_err();
        assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(6));
        assert_eq!((e.version, e.connack_code()), (Some(Version::V311), 0x01));
        let e = decode_connect(&connect(b"MQTT", 3, 2, &s(b"c"))).unwrap_err();
        assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(3));
        let e = decode_connect(&connect(b"MQIsdp", 4, 2, &s(b"c"))).unwrap_err();
        assert_eq!(e.error, ProtocolError::UnsupportedProtocolLevel(4));
        let e = decode_connect(&connect(b"HTTP", 4, 2, &s(b"c"))).unwrap_err();
        assert_eq!(
            (e.version, e.error),
            (None, ProtocolError::UnknownProtocolName)
        );
    }

    #[test]
    fn connect_must_come_first() {
        let e = decode_connect(&frame(0x30, &cat(&[&s(b"t"), b"x"]))).unwrap_err();
        assert_eq!(
            (e.version, e.error),
            (None, ProtocolError::UnexpectedPacket("PUBLISH"))
        );
        let e = decode_connect(&[0xC0, 0]).unwrap_err();
        assert_eq!(e.error, ProtocolError::UnexpectedPacket("PINGREQ"));
    }

    #[test]
    fn connect_flag_rules() {
        let mut bad_header = connect(b"MQTT", 4, 2, &s(b"c"));
        bad_header[0] = 0x11;
        assert_eq!(
            decode_connect(&bad_header).unwrap_err().error,
            ProtocolError::ReservedFlags(0x11)
        );
        let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0011, &s(b"c"))).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        // Will QoS 1 without the will flag; will retain without it.
        let e = decode_connect(&connect(b"MQTT", 4, 0b0000_1010, &s(b"c"))).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        let e = decode_connect(&connect(b"MQTT", 4, 0b0010_0010, &s(b"c"))).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        // Will QoS 3.
        let rest = cat(&[&s(b"c"), &s(b"t"), &s(b"p")]);
        let e = decode_connect(&connect(b"MQTT", 4, 0b0001_1110, &rest)).unwrap_err();
        assert_eq!(e.error, ProtocolError::InvalidQoS(3));
        // In MQTT 5 the same refusal is answered with a CONNACK.
        let rest5 = cat(&[&[0], &s(b"c"), &[0], &s(b"t"), &s(b"p")]);
        let e = decode_connect(&connect(b"MQTT", 5, 0b0001_1110, &rest5)).unwrap_err();
        assert_eq!((e.version, e.connack_code()), (Some(Version::V5), 0x81));
    }

    #[test]
    fn connect_utf8_rules() {
        let e = decode_connect(&connect(b"MQTT", 4, 2, &s(&[0xC3, 0x28]))).unwrap_err();
        assert_eq!(e.error, ProtocolError::InvalidClientId);
        assert_eq!((e.version, e.connack_code()), (Some(Version::V311), 0x02));
        let e = decode_connect(&connect(b"MQTT", 4, 2, &s(b"a\0b"))).unwrap_err();
        assert_eq!(e.error, ProtocolError::InvalidClientId);
        let e = decode_connect(&connect(b"MQTT", 5, 2, &cat(&[&[0], &s(&[0xFF])]))).unwrap_err();
        assert_eq!((e.version, e.connack_code()), (Some(Version::V5), 0x85));
        let rest = cat(&[&s(b"c"), &s(&[0xED, 0xA0, 0x80])]); // an encoded surrogate
        let e = decode_connect(&connect(b"MQTT", 4, 0b1000_0010, &rest)).unwrap_err();
        assert_eq!(e.error, ProtocolError::InvalidUtf8);
        let rest = cat(&[&s(b"c"), &s(&[0xFF]), &s(b"p")]);
        let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0110, &rest)).unwrap_err();
        assert_eq!(e.error, ProtocolError::InvalidUtf8);
    }

    #[test]
    fn connect_will_topic_rules() {
        for (topic, want) in [
            (&b"a/+"[..], ProtocolError::WildcardInTopic),
            (b"a/#", ProtocolError::WildcardInTopic),
            (b"", ProtocolError::EmptyTopic),
        ] {
            let rest = cat(&[&s(b"c"), &s(topic), &s(b"p")]);
            let e = decode_connect(&connect(b"MQTT", 4, 0b0000_0110, &rest)).unwrap_err();
            assert_eq!(e.error, want);
        }
        // A UTF-8 will payload that is not UTF-8.
        let rest = cat(&[&[0], &s(b"c"), &[2, 0x01, 1], &s(b"t"), &s(&[0xFF])]);
        let e = decode_connect(&connect(b"MQTT", 5, 0b0000_0110, &rest)).unwrap_err();
        assert_eq!(
            (e.connack_code(), e.error),
            (0x99, ProtocolError::PayloadFormatInvalid)
        );
    }

    #[test]
    fn connect_v5_property_rules() {
        let with = |props: &[u8]| {
            let rest = cat(&[&[props.len() as u8], props, &s(b"c")]);
            decode_connect(&connect(b"MQTT", 5, 2, &rest)).unwrap_err()
        };
        assert_eq!(
            with(&[0x21, 0, 0]).error,
            ProtocolError::InvalidPropertyValue(0x21)
        );
        assert_eq!(with(&[0x21, 0, 0]).connack_code(), 0x82);
        assert_eq!(
            with(&[0x27, 0, 0, 0, 0]).error,
            ProtocolError::InvalidPropertyValue(0x27)
        );
        assert_eq!(
            with(&[0x17, 2]).error,
            ProtocolError::InvalidPropertyValue(0x17)
        );
        assert_eq!(
            with(&[0x21, 0, 1, 0x21, 0, 2]).error,
            ProtocolError::DuplicateProperty(0x21)
        );
        // Topic Alias belongs to PUBLISH, not CONNECT.
        assert_eq!(
            with(&[0x23, 0, 1]).error,
            ProtocolError::InvalidProperty(0x23)
        );
        assert_eq!(
            with(&[0x16, 0, 1, 9]).error,
            ProtocolError::Protocol("authentication data without a method")
        );
        // A property running past the declared section.
        let rest = cat(&[&[2, 0x11, 0, 0, 0], &s(b"c")]);
        let e = decode_connect(&connect(b"MQTT", 5, 2, &rest)).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
    }

    #[test]
    fn connect_trailing_or_missing_bytes() {
        let e = decode_connect(&connect(b"MQTT", 4, 2, &cat(&[&s(b"c"), b"x"]))).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        // User name flag without a user name.
        let e = decode_connect(&connect(b"MQTT", 4, 0b1000_0010, &s(b"c"))).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        // A frame shorter than its header says.
        let mut f = connect(b"MQTT", 4, 2, &s(b"c"));
        f.pop();
        assert!(matches!(
            decode_connect(&f).unwrap_err().error,
            ProtocolError::Malformed(_)
        ));
    }

    // ---- PUBLISH ----

    #[test]
    fn publish_v311_qos0_and_qos1() {
        let p = decode(&frame(0x31, &cat(&[&s(b"a/b"), b"hello"])), Version::V311).unwrap();
        let Packet::Publish(p) = p else {
            panic!("not a publish")
        };
        assert_eq!((p.qos, p.retain, p.dup, p.pkid), (0, true, false, 0));
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("a/b", &b"hello"[..]));
        let p = decode(&frame(0x3A, &cat(&[&s(b"a"), &[0, 7], b"x"])), Version::V31).unwrap();
        let Packet::Publish(p) = p else {
            panic!("not a publish")
        };
        assert_eq!(
            (p.qos, p.dup, p.pkid, &p.payload[..]),
            (1, true, 7, &b"x"[..])
        );
        // An empty payload is fine.
        assert!(decode(&frame(0x30, &s(b"a")), Version::V311).is_ok());
    }

    #[test]
    fn publish_v5_properties() {
        let props = cat(&[
            &[0x01, 1],
            &[0x02, 0, 0, 1, 0],
            &[0x23, 0, 4],
            &[0x03],
            &s(b"json"),
            &[0x08],
            &s(b"r/t"),
            &[0x09],
            &s(b"cd"),
            &[0x26],
            &s(b"a"),
            &s(b"b"),
        ]);
        let f = frame(
            0x34,
            &cat(&[&s(b"t"), &[0, 9], &[props.len() as u8], &props, b"{}"]),
        );
        let Packet::Publish(p) = decode(&f, Version::V5).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!((p.qos, p.pkid, p.topic_alias), (2, 9, Some(4)));
        assert_eq!(&p.payload[..], b"{}");
        let pp = p.props.unwrap();
        assert_eq!(pp.payload_format_indicator, Some(1));
        assert_eq!(pp.message_expiry, Some(256));
        assert_eq!(pp.content_type.as_deref(), Some("json"));
        assert_eq!(pp.response_topic.as_deref(), Some("r/t"));
        assert_eq!(pp.correlation_data.as_deref(), Some(&b"cd"[..]));
        assert_eq!(pp.user_properties, vec![("a".into(), "b".into())]);
    }

    #[test]
    fn publish_v5_alias_only_has_no_props() {
        let f = frame(0x30, &cat(&[&s(b""), &[3, 0x23, 0, 1], b"x"]));
        let Packet::Publish(p) = decode(&f, Version::V5).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(
            (p.topic.as_str(), p.topic_alias, p.props),
            ("", Some(1), None)
        );
    }

    #[test]
    fn publish_errors() {
        let v4 = Version::V311;
        assert_eq!(
            err(&frame(0x36, &cat(&[&s(b"a"), &[0, 1]])), v4),
            ProtocolError::InvalidQoS(3)
        );
        assert_eq!(err(&frame(0x38, &s(b"a")), v4), ProtocolError::DupAtQoS0);
        assert_eq!(
            err(&frame(0x38, &s(b"a")), Version::V5),
            ProtocolError::DupAtQoS0
        );
        assert_eq!(
            err(&frame(0x32, &cat(&[&s(b"a"), &[0, 0]])), v4),
            ProtocolError::ZeroPacketId
        );
        assert_eq!(
            err(&frame(0x30, &s(b"a/+")), v4),
            ProtocolError::WildcardInTopic
        );
        assert_eq!(
            err(&frame(0x30, &s(b"#")), v4),
            ProtocolError::WildcardInTopic
        );
        assert_eq!(err(&frame(0x30, &s(b"")), v4), ProtocolError::EmptyTopic);
        assert_eq!(
            err(&frame(0x30, &cat(&[&s(b""), &[0]])), Version::V5),
            ProtocolError::EmptyTopic
        );
        assert_eq!(
            err(&frame(0x30, &s(&[0xC0, 0x80])), v4),
            ProtocolError::InvalidUtf8
        );
        assert_eq!(
            err(&frame(0x30, &s(b"a\0")), v4),
            ProtocolError::InvalidUtf8
        );
        // Topic length past the end.
        assert!(matches!(
            err(&frame(0x30, &[0, 9, b'a']), v4),
            ProtocolError::Malformed(_)
        ));
    }

    #[test]
    fn publish_v5_property_errors() {
        let with = |props: &[u8], payload: &[u8]| {
            err(
                &frame(
                    0x30,
                    &cat(&[&s(b"t"), &[props.len() as u8], props, payload]),
                ),
                Version::V5,
            )
        };
        assert_eq!(with(&[0x23, 0, 0], b""), ProtocolError::TopicAliasInvalid);
        assert_eq!(with(&[0x23, 0, 0], b"").reason_code(), 0x94);
        assert_eq!(
            with(&[0x01, 1], &[0xFF, 0xFE]),
            ProtocolError::PayloadFormatInvalid
        );
        assert_eq!(
            with(&[0x01, 2], b""),
            ProtocolError::InvalidPropertyValue(0x01)
        );
        assert_eq!(with(&[0x0B, 1], b""), ProtocolError::InvalidProperty(0x0B));
        assert_eq!(
            with(&[0x11, 0, 0, 0, 1], b""),
            ProtocolError::InvalidProperty(0x11)
        );
        assert_eq!(
            with(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2], b""),
            ProtocolError::DuplicateProperty(0x02)
        );
        assert_eq!(
            with(&cat(&[&[0x08], &s(b"r/#")]), b""),
            ProtocolError::InvalidPropertyValue(0x08)
        );
        assert_eq!(
            with(&cat(&[&[0x03], &s(b"a\0")]), b""),
            ProtocolError::InvalidUtf8
        );
        // Property length 1 but a 5-byte property: mqttbytes would eat the payload.
        let f = frame(0x30, &cat(&[&s(b"t"), &[1, 0x02, 0, 0, 0, 9], b"payload"]));
        assert!(matches!(err(&f, Version::V5), ProtocolError::Malformed(_)));
        // A missing property length.
        assert!(matches!(
            err(&frame(0x30, &s(b"t")), Version::V5),
            ProtocolError::Malformed(_)
        ));
    }

    // ---- acknowledgements ----

    #[test]
    fn acks_v311() {
        let v = Version::V311;
        assert_eq!(
            decode(&[0x40, 2, 0, 5], v),
            Ok(Packet::PubAck { pkid: 5, reason: 0 })
        );
        assert_eq!(
            decode(&[0x50, 2, 1, 0], v),
            Ok(Packet::PubRec {
                pkid: 256,
                reason: 0
            })
        );
        assert_eq!(
            decode(&[0x62, 2, 0, 5], v),
            Ok(Packet::PubRel { pkid: 5, reason: 0 })
        );
        assert_eq!(
            decode(&[0x70, 2, 0, 5], v),
            Ok(Packet::PubComp { pkid: 5, reason: 0 })
        );
        assert_eq!(err(&[0x40, 2, 0, 0], v), ProtocolError::ZeroPacketId);
        assert_eq!(err(&[0x60, 2, 0, 5], v), ProtocolError::ReservedFlags(0x60));
        assert_eq!(err(&[0x42, 2, 0, 5], v), ProtocolError::ReservedFlags(0x42));
        assert!(matches!(
            err(&[0x40, 3, 0, 5, 0], v),
            ProtocolError::Malformed(_)
        ));
        assert!(matches!(err(&[0x40, 1, 0], v), ProtocolError::Malformed(_)));
    }

    #[test]
    fn acks_v5() {
        let v = Version::V5;
        assert_eq!(
            decode(&[0x40, 2, 0, 5], v),
            Ok(Packet::PubAck { pkid: 5, reason: 0 })
        );
        assert_eq!(
            decode(&[0x40, 3, 0, 5, 0x10], v),
            Ok(Packet::PubAck {
                pkid: 5,
                reason: 0x10
            })
        );
        assert_eq!(
            decode(&[0x50, 4, 0, 5, 0x80, 0], v),
            Ok(Packet::PubRec {
                pkid: 5,
                reason: 0x80
            })
        );
        let with_reason_string = frame(0x70, &cat(&[&[0, 5, 0x92, 4, 0x1F], &s(b"x")]));
        assert_eq!(
            decode(&with_reason_string, v),
            Ok(Packet::PubComp {
                pkid: 5,
                reason: 0x92
            })
        );
        assert_eq!(
            decode(&[0x62, 3, 0, 5, 0x92], v),
            Ok(Packet::PubRel {
                pkid: 5,
                reason: 0x92
            })
        );
        // PUBREL cannot carry a PUBACK code.
        assert_eq!(
            err(&[0x62, 3, 0, 5, 0x10], v),
            ProtocolError::InvalidReasonCode(0x10)
        );
        assert_eq!(
            err(&[0x40, 3, 0, 5, 0x05], v),
            ProtocolError::InvalidReasonCode(0x05)
        );
        assert_eq!(err(&[0x40, 3, 0, 0, 0], v), ProtocolError::ZeroPacketId);
        // Trailing bytes after the properties; a property an ack cannot carry.
        assert!(matches!(
            err(&[0x40, 5, 0, 5, 0, 0, 9], v),
            ProtocolError::Malformed(_)
        ));
        assert_eq!(
            err(&[0x40, 7, 0, 5, 0, 3, 0x23, 0, 1], v),
            ProtocolError::InvalidProperty(0x23)
        );
    }

    // ---- SUBSCRIBE / UNSUBSCRIBE ----

    #[test]
    fn subscribe_v311() {
        let f = frame(0x82, &cat(&[&[0, 10], &s(b"a/+"), &[1], &s(b"b/#"), &[2]]));
        let Packet::Subscribe {
            pkid,
            filters,
            subscription_id,
        } = decode(&f, Version::V311).unwrap()
        else {
            panic!("not a subscribe")
        };
        assert_eq!((pkid, subscription_id), (10, None));
        assert_eq!(filters.len(), 2);
        assert_eq!((filters[0].filter.as_str(), filters[0].qos), ("a/+", 1));
        assert_eq!((filters[1].filter.as_str(), filters[1].qos), ("b/#", 2));
        assert!(!filters[1].no_local && !filters[1].retain_as_published);
        // Bit 2 is No Local in MQTT 5 but reserved in 3.1.1.
        let f = frame(0x82, &cat(&[&[0, 10], &s(b"a"), &[0b0000_0101]]));
        assert!(matches!(
            err(&f, Version::V311),
            ProtocolError::Malformed(_)
        ));
    }

    #[test]
    fn subscribe_v5_options_and_id() {
        let f = frame(
            0x82,
            &cat(&[&[0, 1], &[2, 0x0B, 42], &s(b"x"), &[0b0010_1101]]),
        );
        let Packet::Subscribe {
            filters,
            subscription_id,
            ..
        } = decode(&f, Version::V5).unwrap()
        else {
            panic!("not a subscribe")
        };
        assert_eq!(subscription_id, Some(42));
        assert_eq!(
            filters[0],
            SubscribeFilter {
                filter: "x".into(),
                qos: 1,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2
            }
        );
    }

    #[test]
    fn subscribe_errors() {
        let v5 = Version::V5;
        let sub = |body: &[u8], v| err(&frame(0x82, body), v);
        assert_eq!(sub(&[0, 1, 0], v5), ProtocolError::NoFilters);
        assert_eq!(sub(&[0, 1], Version::V311), ProtocolError::NoFilters);
        assert_eq!(
            sub(&cat(&[&[0, 0, 0], &s(b"a"), &[0]]), v5),
            ProtocolError::ZeroPacketId
        );
        assert_eq!(
            sub(&cat(&[&[0, 1, 0], &s(b"a"), &[3]]), v5),
            ProtocolError::InvalidQoS(3)
        );
        assert_eq!(
            sub(&cat(&[&[0, 1], &s(b"a"), &[3]]), Version::V311),
            ProtocolError::InvalidQoS(3)
        );
        assert!(matches!(
            sub(&cat(&[&[0, 1, 0], &s(b"a"), &[0x40]]), v5),
            ProtocolError::Malformed(_)
        ));
        assert_eq!(
            sub(&cat(&[&[0, 1, 0], &s(b"a"), &[0x30]]), v5),
            ProtocolError::Protocol("retain handling 3")
        );
        assert_eq!(
            sub(&cat(&[&[0, 1, 2, 0x0B, 0], &s(b"a"), &[0]]), v5),
            ProtocolError::SubscriptionIdZero
        );
        assert_eq!(
            sub(&cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s(b"a"), &[0]]), v5),
            ProtocolError::DuplicateProperty(0x0B)
        );
        assert_eq!(
            sub(&cat(&[&[0, 1, 0], &s(&[0xFF]), &[0]]), v5),
            ProtocolError::InvalidUtf8
        );
        // A filter without its options byte.
        assert!(matches!(
            sub(&cat(&[&[0, 1, 0], &s(b"a")]), v5),
            ProtocolError::Malformed(_)
        ));
        // Wrong fixed-header flags.
        assert_eq!(
            err(
                &frame(0x80, &cat(&[&[0, 1], &s(b"a"), &[0]])),
                Version::V311
            ),
            ProtocolError::ReservedFlags(0x80)
        );
    }

    #[test]
    fn unsubscribe_both_versions() {
        let f = frame(0xA2, &cat(&[&[0, 3], &s(b"a/b"), &s(b"c/#")]));
        assert_eq!(
            decode(&f, Version::V311),
            Ok(Packet::Unsubscribe {
                pkid: 3,
                filters: vec!["a/b".into(), "c/#".into()]
            })
        );
        let f = frame(0xA2, &cat(&[&[0, 3, 0], &s(b"a/b")]));
        assert_eq!(
            decode(&f, Version::V5),
            Ok(Packet::Unsubscribe {
                pkid: 3,
                filters: vec!["a/b".into()]
            })
        );
    }

    #[test]
    fn unsubscribe_errors() {
        assert_eq!(
            err(&frame(0xA2, &[0, 3]), Version::V311),
            ProtocolError::NoFilters
        );
        assert_eq!(
            err(&frame(0xA2, &[0, 3, 0]), Version::V5),
            ProtocolError::NoFilters
        );
        assert_eq!(
            err(&frame(0xA2, &cat(&[&[0, 0], &s(b"a")])), Version::V311),
            ProtocolError::ZeroPacketId
        );
        assert_eq!(
            err(&frame(0xA2, &cat(&[&[0, 0, 0], &s(b"a")])), Version::V5),
            ProtocolError::ZeroPacketId
        );
        assert_eq!(
            err(&frame(0xA0, &cat(&[&[0, 1], &s(b"a")])), Version::V311),
            ProtocolError::ReservedFlags(0xA0)
        );
        assert_eq!(
            err(&frame(0xA2, &cat(&[&[0, 1], &s(b"a\0")])), Version::V311),
            ProtocolError::InvalidUtf8
        );
        assert_eq!(
            err(&frame(0xA2, &cat(&[&[0, 1, 0], &s(&[0xFF])])), Version::V5),
            ProtocolError::InvalidUtf8
        );
        assert_eq!(
            err(
                &frame(0xA2, &cat(&[&[0, 1, 2, 0x0B, 1], &s(b"a")])),
                Version::V5
            ),
            ProtocolError::InvalidProperty(0x0B)
        );
    }

    // ---- PINGREQ, DISCONNECT, AUTH, packet types ----

    #[test]
    fn pingreq_and_disconnect() {
        assert_eq!(decode(&[0xC0, 0], Version::V311), Ok(Packet::PingReq));
        assert_eq!(
            err(&[0xC1, 0], Version::V311),
            ProtocolError::ReservedFlags(0xC1)
        );
        assert!(matches!(
            err(&[0xC0, 1, 0], Version::V311),
            ProtocolError::Malformed(_)
        ));
        let normal = Packet::Disconnect {
            reason: 0,
            session_expiry: None,
        };
        assert_eq!(decode(&[0xE0, 0], Version::V311), Ok(normal.clone()));
        assert_eq!(decode(&[0xE0, 0], Version::V5), Ok(normal));
        assert!(matches!(
            err(&[0xE0, 1, 0], Version::V311),
            ProtocolError::Malformed(_)
        ));
        assert_eq!(
            err(&[0xE2, 0], Version::V5),
            ProtocolError::ReservedFlags(0xE2)
        );
    }

    #[test]
    fn disconnect_v5_forms() {
        let v = Version::V5;
        // The short form mqttbytes refuses: a reason code and nothing else.
        assert_eq!(
            decode(&[0xE0, 1, 0x04], v),
            Ok(Packet::Disconnect {
                reason: 4,
                session_expiry: None
            })
        );
        assert_eq!(
            decode(&[0xE0, 2, 0x00, 0], v),
            Ok(Packet::Disconnect {
                reason: 0,
                session_expiry: None
            })
        );
        let f = [0xE0, 7, 0x00, 5, 0x11, 0, 0, 0, 30];
        assert_eq!(
            decode(&f, v),
            Ok(Packet::Disconnect {
                reason: 0,
                session_expiry: Some(30)
            })
        );
        // 0x8E (session taken over) is the server's to send.
        assert_eq!(
            err(&[0xE0, 1, 0x8E], v),
            ProtocolError::InvalidReasonCode(0x8E)
        );
        assert!(matches!(
            err(&[0xE0, 3, 0, 0, 1], v),
            ProtocolError::Malformed(_)
        ));
        assert_eq!(err(&[0xE0, 4, 0, 2, 0x23, 0], v).reason_code(), 0x81);
    }

    #[test]
    fn auth_only_in_v5() {
        assert_eq!(decode(&[0xF0, 0], Version::V5), Ok(Packet::Auth));
        let f = frame(0xF0, &cat(&[&[0x18, 8, 0x15], &s(b"SCRAM")]));
        assert_eq!(decode(&f, Version::V5), Ok(Packet::Auth));
        assert_eq!(
            err(&[0xF0, 1, 0x05], Version::V5),
            ProtocolError::InvalidReasonCode(0x05)
        );
        assert_eq!(
            err(&[0xF0, 0], Version::V311),
            ProtocolError::UnknownPacketType(15)
        );
    }

    #[test]
    fn packet_types_a_client_must_not_send() {
        for v in [Version::V31, Version::V311, Version::V5] {
            assert_eq!(err(&[0x00, 0], v), ProtocolError::UnknownPacketType(0));
            assert_eq!(
                err(&[0x20, 2, 0, 0], v),
                ProtocolError::UnexpectedPacket("CONNACK")
            );
            assert_eq!(
                err(&[0x90, 3, 0, 1, 0], v),
                ProtocolError::UnexpectedPacket("SUBACK")
            );
            assert_eq!(
                err(&[0xB0, 2, 0, 1], v),
                ProtocolError::UnexpectedPacket("UNSUBACK")
            );
            assert_eq!(
                err(&[0xD0, 0], v),
                ProtocolError::UnexpectedPacket("PINGRESP")
            );
            let second = connect(b"MQTT", 4, 2, &s(b"c"));
            assert_eq!(err(&second, v), ProtocolError::UnexpectedPacket("CONNECT"));
            assert_eq!(err(&second, v).reason_code(), 0x82);
        }
    }

    #[test]
    fn frame_must_be_exactly_one_packet() {
        assert!(matches!(
            err(&[0xC0, 0, 0xC0], Version::V311),
            ProtocolError::Malformed(_)
        ));
        assert!(matches!(
            err(&[0x40, 2, 0], Version::V311),
            ProtocolError::Malformed(_)
        ));
        assert!(matches!(
            err(&[], Version::V311),
            ProtocolError::Malformed(_)
        ));
    }

    // ---- never panic ----

    /// Deterministic xorshift64: the same "random" frames on every run.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Valid frames of every kind, the seeds for mutation.
    fn seeds() -> Vec<(Vec<u8>, Version)> {
        let will_props = cat(&[&[0x18, 0, 0, 0, 30, 0x01, 1, 0x09], &s(b"cd")]);
        let props5 = cat(&[
            &[0x11, 0, 0, 0, 9, 0x21, 0, 10],
            &[0x26],
            &s(b"k"),
            &s(b"v"),
        ]);
        let pub_props = cat(&[&[0x01, 1, 0x02, 0, 0, 0, 5, 0x23, 0, 2, 0x08], &s(b"r")]);
        vec![
            (
                connect(
                    b"MQTT",
                    4,
                    0b1110_1110,
                    &cat(&[&s(b"id"), &s(b"w"), &s(b"p"), &s(b"u"), &s(b"pw")]),
                ),
                Version::V311,
            ),
            (connect(b"MQIsdp", 3, 2, &s(b"id")), Version::V31),
            (
                connect(
                    b"MQTT",
                    5,
                    0b1100_1110,
                    &cat(&[
                        &[props5.len() as u8],
                        &props5,
                        &s(b"id"),
                        &[will_props.len() as u8],
                        &will_props,
                        &s(b"w"),
                        &s(b"p"),
                        &s(b"u"),
                        &s(&[0, 0xFF]),
                    ]),
                ),
                Version::V5,
            ),
            (
                frame(0x33, &cat(&[&s(b"a/b"), &[0, 1], b"payload"])),
                Version::V311,
            ),
            (
                frame(
                    0x3D,
                    &cat(&[
                        &s(b"a/b"),
                        &[1, 2],
                        &[pub_props.len() as u8],
                        &pub_props,
                        b"payload",
                    ]),
                ),
                Version::V5,
            ),
            (vec![0x40, 2, 0, 1], Version::V311),
            (
                frame(0x50, &cat(&[&[0, 1, 0x10, 4, 0x1F], &s(b"x")])),
                Version::V5,
            ),
            (vec![0x62, 3, 0, 1, 0x92], Version::V5),
            (
                frame(0x82, &cat(&[&[0, 1], &s(b"a/+"), &[1], &s(b"#"), &[2]])),
                Version::V311,
            ),
            (
                frame(0x82, &cat(&[&[0, 1, 2, 0x0B, 7], &s(b"a/+"), &[0x2D]])),
                Version::V5,
            ),
            (
                frame(0xA2, &cat(&[&[0, 1], &s(b"a"), &s(b"b")])),
                Version::V311,
            ),
            (frame(0xA2, &cat(&[&[0, 1, 0], &s(b"a")])), Version::V5),
            (vec![0xC0, 0], Version::V311),
            (vec![0xE0, 7, 0x04, 5, 0x11, 0, 0, 0, 1], Version::V5),
            (
                frame(0xF0, &cat(&[&[0x18, 8, 0x15], &s(b"SCRAM")])),
                Version::V5,
            ),
        ]
    }

    /// Re-frames a body mutated in place so its fixed header matches again, so the
    /// mutation reaches the packet parsers instead of stopping at the frame check.
    fn reframe(f: &[u8]) -> Vec<u8> {
        match fixed_header(f) {
            Ok(Some((len, _))) if len <= f.len() => frame(f[0], &f[len..]),
            _ => f.to_vec(),
        }
    }

    fn check_outcome(f: &[u8], v: Version) {
        let _ = frame_len(f, 1 << 20);
        match decode(f, v) {
            Ok(Packet::Publish(p)) => {
                assert!(!p.topic.contains(['+', '#', '\0']));
                assert!(p.qos <= 2 && (p.qos == 0) == (p.pkid == 0));
                assert!(!p.topic.is_empty() || p.topic_alias.is_some());
            }
            Ok(Packet::Subscribe { pkid, filters, .. }) => {
                assert!(pkid != 0 && !filters.is_empty());
                assert!(filters.iter().all(|f| f.qos <= 2 && f.retain_handling <= 2));
            }
            Ok(Packet::Unsubscribe { pkid, filters }) => assert!(pkid != 0 && !filters.is_empty()),
            Ok(_) => {}
            Err(e) => {
                assert!(e.reason_code() >= 0x80);
                assert!(!e.to_string().is_empty());
            }
        }
        match decode_connect(f) {
            Ok(c) => {
                assert!(c.receive_maximum != 0 && c.max_packet_size != 0);
                if let Some(w) = c.will {
                    assert!(w.qos <= 2 && !w.topic.is_empty() && !w.topic.contains(['+', '#']));
                }
            }
            Err(e) => assert!(e.error.reason_code() >= 0x80),
        }
    }

    #[test]
    fn seeds_are_valid() {
        for (f, v) in seeds() {
            if f[0] >> 4 == 1 {
                decode_connect(&f).unwrap();
            } else {
                decode(&f, v).unwrap();
            }
        }
    }

    #[test]
    fn mangled_frames_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let seeds = seeds();
        let mut decoded = 0;
        for round in 0..60_000 {
            let (seed, v) = &seeds[round % seeds.len()];
            let mut f = seed.clone();
            match rng.below(4) {
                // Flip a few bytes anywhere, header included.
                0 => {
                    for _ in 0..=rng.below(3) {
                        let i = rng.below(f.len());
                        f[i] ^= 1 << rng.below(8);
                    }
                }
                // Overwrite body bytes with anything, then make the header agree.
                1 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(f.len());
                        f[i] = rng.next() as u8;
                    }
                    f = reframe(&f);
                }
                // Truncate, with and without a header that agrees.
                2 => {
                    f.truncate(rng.below(f.len() + 1));
                    if rng.below(2) == 0 {
                        f = reframe(&f);
                    }
                }
                // Insert a random byte somewhere in the body and re-frame.
                _ => {
                    let i = 2 + rng.below(f.len() - 1);
                    f.insert(i.min(f.len()), rng.next() as u8);
                    f = reframe(&f);
                }
            }
            // Every version reads every frame; a 3.1.1 parser must survive v5 bytes too.
            for v in [*v, Version::V311, Version::V5] {
                check_outcome(&f, v);
            }
            decoded += usize::from(decode(&f, *v).is_ok());
        }
        // The mutations must not all be rejected at the door, or they test nothing deep.
        assert!(decoded > 1_000, "only {decoded} mangled frames decoded");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(42);
        for _ in 0..20_000 {
            let len = rng.below(40);
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 {
                f = reframe(&f);
            }
            for v in [Version::V311, Version::V5] {
                check_outcome(&f, v);
            }
        }
    }
}
