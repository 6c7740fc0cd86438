//! The MQTT wire format, and the only module that knows it.
//!
//! A shard reads socket bytes into one scratch buffer and asks [`frame_len`] how long the
//! next frame is. Whole frames go to [`decode_connect`] (the first packet of a connection)
//! or [`decode()`] (every later one); both return owned values, because the scratch buffer
//! is overwritten by the next read while a message may sit in a queue for hours.
//!
//! Outgoing packets are encoded by hand straight into a `Vec<u8>` (see `encode.rs`): a
//! fanned-out PUBLISH is encoded once and its bytes copied to every subscriber, with the
//! packet id patched in place at the offset [`encode_publish`] returns.
//!
//! Decoding goes through `mqttbytes` (a maintained MQTT codec) wherever it is right,
//! and this module adds what it skips: reserved flags, packet id 0, wildcards and empty
//! topic names, DUP on QoS 0, MQTT 5 property sections (their length, duplicates, which
//! packet may carry which property) and the payload format check. The few packets
//! mqttbytes 0.6 gets wrong are parsed here by hand; `decode.rs` lists them and why.
//!
//! Every refusal is a [`ProtocolError`] that knows the MQTT 5 reason code to close with.
//! Nothing a peer can send makes this module panic; a test feeds it mangled frames.

mod decode;
mod encode;

use std::fmt;

use bytes::Bytes;

pub use decode::{decode, decode_connect};
pub use encode::{
    encode_connack, encode_disconnect, encode_pingresp, encode_puback, encode_pubcomp,
    encode_publish, encode_pubrec, encode_pubrel, encode_suback, encode_unsuback, publish_len,
    ConnAckProps, OutPublish,
};

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1: protocol name "MQIsdp", level 3. Behaves as 3.1.1 after CONNECT.
    V31,
    /// MQTT 3.1.1: "MQTT", level 4.
    V311,
    /// MQTT 5: "MQTT", level 5.
    V5,
}

/// The largest Remaining Length a fixed header can carry (four 7-bit groups), 256 MiB.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// MQTT 5 reason codes the server sends or checks, and the MQTT 3.1.1 CONNACK return codes.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NORMAL_DISCONNECTION: u8 = 0x00;
    pub const GRANTED_QOS_0: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    /// DISCONNECT from a client that wants its will published anyway.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUB_IDS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBS_NOT_SUPPORTED: u8 = 0xA2;

    /// MQTT 3.1/3.1.1 CONNACK return codes.
    pub const V3_ACCEPTED: u8 = 0x00;
    pub const V3_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const V3_IDENTIFIER_REJECTED: u8 = 0x02;
    pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
    pub const V3_BAD_USERNAME_OR_PASSWORD: u8 = 0x04;
    pub const V3_NOT_AUTHORIZED: u8 = 0x05;
    /// The only failure code a 3.1.1 SUBACK has.
    pub const V3_SUBACK_FAILURE: u8 = 0x80;
}

/// Why a peer's bytes were refused. [`ProtocolError::reason_code`] is the MQTT 5 reason
/// code for the DISCONNECT (or the CONNACK, for a CONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The whole frame, fixed header included, is longer than the limit.
    PacketTooLarge { size: usize, max: usize },
    /// The bytes do not parse: a field runs past the end, a length is wrong, ...
    Malformed(&'static str),
    /// A string is not well-formed UTF-8, or contains U+0000 ([MQTT-1.5.4-1], [MQTT-1.5.4-2]).
    InvalidUtf8,
    /// Reserved fixed-header flags are wrong; holds the packet's first byte.
    ReservedFlags(u8),
    /// Packet type 0, or 15 (AUTH) before MQTT 5.
    UnknownPacketType(u8),
    /// A packet a client must not send here: a second CONNECT, or a server-only packet.
    UnexpectedPacket(&'static str),
    /// "MQTT" or "MQIsdp" with a protocol level this server does not speak.
    UnsupportedProtocolLevel(u8),
    /// A CONNECT whose protocol name is neither "MQTT" nor "MQIsdp".
    UnknownProtocolName,
    /// QoS 3 in a PUBLISH, a will or a subscription.
    InvalidQoS(u8),
    /// The client identifier is not a valid UTF-8 string.
    InvalidClientId,
    /// A topic name (PUBLISH or will) containing '+' or '#'.
    WildcardInTopic,
    /// A zero-length topic name without a topic alias.
    EmptyTopic,
    /// Packet identifier 0 where one is required.
    ZeroPacketId,
    /// DUP set on a QoS 0 PUBLISH ([MQTT-3.3.1-2]).
    DupAtQoS0,
    /// A SUBSCRIBE or UNSUBSCRIBE with no topic filter.
    NoFilters,
    /// Topic Alias 0.
    TopicAliasInvalid,
    /// Payload Format Indicator 1 on a payload that is not UTF-8.
    PayloadFormatInvalid,
    /// Subscription Identifier 0.
    SubscriptionIdZero,
    /// An MQTT 5 property this packet may not carry (or an unknown one).
    InvalidProperty(u8),
    /// An MQTT 5 property that may appear once, twice.
    DuplicateProperty(u8),
    /// An MQTT 5 property with a value outside its range (e.g. Receive Maximum 0).
    InvalidPropertyValue(u8),
    /// A reason code this packet may not carry from a client.
    InvalidReasonCode(u8),
    /// Any other breach of the protocol's rules.
    Protocol(&'static str),
}

impl ProtocolError {
    /// The MQTT 5 reason code to put in a DISCONNECT (or CONNACK for a CONNECT error).
    pub fn reason_code(&self) -> u8 {
        use ProtocolError::*;
        match self {
            PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            Malformed(_) | InvalidUtf8 | ReservedFlags(_) | UnknownPacketType(_)
            | InvalidQoS(_) | InvalidProperty(_) => reason::MALFORMED,
            UnexpectedPacket(_)
            | EmptyTopic
            | ZeroPacketId
            | DupAtQoS0
            | NoFilters
            | SubscriptionIdZero
            | DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | InvalidReasonCode(_)
            | Protocol(_) => reason::PROTOCOL_ERROR,
            UnsupportedProtocolLevel(_) | UnknownProtocolName => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
            InvalidClientId => reason::CLIENT_ID_NOT_VALID,
            WildcardInTopic => reason::TOPIC_NAME_INVALID,
            TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
            PayloadFormatInvalid => reason::PAYLOAD_FORMAT_INVALID,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProtocolError::*;
        match self {
            PacketTooLarge { size, max } => write!(f, "packet too large ({size} > {max} bytes)"),
            Malformed(what) => write!(f, "malformed packet: {what}"),
            InvalidUtf8 => f.write_str("invalid utf-8 string"),
            ReservedFlags(byte) => write!(f, "reserved fixed-header flags in {byte:#04x}"),
            UnknownPacketType(t) => write!(f, "reserved packet type {t}"),
            UnexpectedPacket(name) => write!(f, "unexpected {name} packet from a client"),
            UnsupportedProtocolLevel(l) => write!(f, "unsupported protocol level {l}"),
            UnknownProtocolName => f.write_str("unknown protocol name"),
            InvalidQoS(q) => write!(f, "invalid qos {q}"),
            InvalidClientId => f.write_str("client identifier is not valid utf-8"),
            WildcardInTopic => f.write_str("wildcard in a topic name"),
            EmptyTopic => f.write_str("empty topic name"),
            ZeroPacketId => f.write_str("packet identifier 0"),
            DupAtQoS0 => f.write_str("dup flag on a qos 0 publish"),
            NoFilters => f.write_str("no topic filters"),
            TopicAliasInvalid => f.write_str("topic alias 0"),
            PayloadFormatInvalid => f.write_str("payload is not utf-8 but says it is"),
            SubscriptionIdZero => f.write_str("subscription identifier 0"),
            InvalidProperty(id) => write!(f, "property {id:#04x} not allowed here"),
            DuplicateProperty(id) => write!(f, "property {id:#04x} more than once"),
            InvalidPropertyValue(id) => write!(f, "invalid value of property {id:#04x}"),
            InvalidReasonCode(code) => write!(f, "invalid reason code {code:#04x}"),
            Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A refused CONNECT.
///
/// `version` is the version to encode the refusing CONNACK with, or `None` when no
/// CONNACK may be sent: the packet was not a readable CONNECT, or it was a 3.1/3.1.1
/// CONNECT with a fault that has no return code, which 3.1.1 answers by closing
/// ([MQTT-3.1.4-1]). An unknown level of "MQTT"/"MQIsdp" gets `Some(V311)`: return code
/// 0x01 in a 3.1.1 CONNACK is the answer 3.1.1 prescribes (3.1.2.2), whatever the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub version: Option<Version>,
    pub error: ProtocolError,
}

impl ConnectError {
    /// The code for the refusing CONNACK: the MQTT 5 reason code when `version` is V5;
    /// otherwise 0x01 (unacceptable protocol version) for an unknown level or name, 0x02
    /// (identifier rejected) for a bad client id. Any other 3.1.1 fault comes with
    /// `version: None` (no CONNACK), and this then returns the MQTT 5 reason code.
    pub fn connack_code(&self) -> u8 {
        match (self.version, &self.error) {
            (Some(Version::V5), e) => e.reason_code(),
            (
                _,
                ProtocolError::UnsupportedProtocolLevel(_) | ProtocolError::UnknownProtocolName,
            ) => reason::V3_UNACCEPTABLE_PROTOCOL_VERSION,
            (_, ProtocolError::InvalidClientId) => reason::V3_IDENTIFIER_REJECTED,
            (_, e) => e.reason_code(),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad CONNECT: {}", self.error)
    }
}

impl std::error::Error for ConnectError {}

/// A decoded CONNECT. MQTT 5 properties have their spec defaults when absent (and always
/// for 3.1/3.1.1).
#[derive(Clone, PartialEq)]
pub struct Connect {
    pub version: Version,
    /// May be empty; what that means (assign one, or refuse) is the shard's policy.
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    /// Binary-safe: any bytes.
    pub password: Option<Bytes>,
    pub will: Option<Box<Will>>,
    /// Session Expiry Interval; 0 when absent.
    pub session_expiry: u32,
    /// 65535 when absent; never 0 (that is refused).
    pub receive_maximum: u16,
    /// `u32::MAX` (no limit) when absent; never 0 (that is refused).
    pub max_packet_size: u32,
    pub topic_alias_max: u16,
    pub request_problem_info: bool,
    /// Enhanced authentication was asked for; the shard declines it (CONNACK 0x8C).
    pub auth_method: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// Hand-written so a logged CONNECT never shows the password.
impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will", &self.will)
            .field("session_expiry", &self.session_expiry)
            .field("receive_maximum", &self.receive_maximum)
            .field("max_packet_size", &self.max_packet_size)
            .field("topic_alias_max", &self.topic_alias_max)
            .field("request_problem_info", &self.request_problem_info)
            .field("auth_method", &self.auth_method)
            .field("user_properties", &self.user_properties)
            .finish()
    }
}

/// The message a CONNECT asks the server to publish if the connection ends badly.
#[derive(Clone, Debug, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval; 0 when absent.
    pub delay_secs: u32,
    /// MQTT 5 publication properties of the will; `None` when it has none.
    pub props: Option<Box<PublishProps>>,
}

/// MQTT 5 PUBLISH properties that are forwarded to subscribers unchanged (passthrough).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishProps {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// A PUBLISH from a client.
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty only in MQTT 5 with a `topic_alias` (the alias names the topic).
    pub topic: String,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    /// `None` when the PUBLISH carries none of the forwarded properties.
    pub props: Option<Box<PublishProps>>,
}

/// One topic filter of a SUBSCRIBE with its options (the MQTT 5 ones are false/0 in 3.1.1).
/// The filter's syntax ('#' last, '+' alone in a level, ...) is not checked here: a bad
/// filter is refused in the SUBACK, not by closing the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// Every packet a client may send after CONNECT.
#[derive(Clone, Debug, PartialEq)]
pub enum Packet {
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
        reason: u8,
    },
    PubComp {
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        subscription_id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// MQTT 5 AUTH (well-formed, contents dropped: the server offers no enhanced auth).
    Auth,
}

/// Length of the whole frame starting at `buf[0]` once its fixed header is complete.
///
/// `Ok(Some(len))`: the frame is `len` bytes, header included (it may not all be in `buf`
/// yet). `Ok(None)`: the fixed header itself is incomplete. `Err`: a Remaining Length of
/// more than 4 bytes, or a frame longer than `max_packet_size` (the limit covers the whole
/// frame, as MQTT 5's Maximum Packet Size does), known before the frame has arrived.
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, ProtocolError> {
    let Some((header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(ProtocolError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some(size))
}

/// Parses a fixed header: `(header length, remaining length)`, or `None` if incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(ProtocolError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_len_needs_the_whole_fixed_header() {
        assert_eq!(frame_len(&[], 100), Ok(None));
        assert_eq!(frame_len(&[0x30], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80], 1000), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80, 0x80, 0x80], 1 << 30), Ok(None));
    }

    #[test]
    fn frame_len_counts_header_and_body() {
        assert_eq!(frame_len(&[0xC0, 0x00], 100), Ok(Some(2)));
        // The frame need not be complete: 2 + 5 bytes even though 3 are here.
        assert_eq!(frame_len(&[0x30, 0x05, 0x00], 100), Ok(Some(7)));
        // 200 = 0xC8 0x01: a 3-byte header.
        assert_eq!(frame_len(&[0x30, 0xC8, 0x01], 1000), Ok(Some(203)));
        // The largest remaining length: 4 header bytes.
        assert_eq!(
            frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], usize::MAX),
            Ok(Some(5 + MAX_REMAINING_LENGTH))
        );
    }

    #[test]
    fn frame_len_refuses_a_fifth_length_byte() {
        assert!(matches!(
            frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], usize::MAX),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn frame_len_limit_covers_the_fixed_header() {
        // 2 header bytes + 100 = 102.
        assert_eq!(frame_len(&[0x30, 100], 102), Ok(Some(102)));
        assert_eq!(
            frame_len(&[0x30, 100], 101),
            Err(ProtocolError::PacketTooLarge {
                size: 102,
                max: 101
            })
        );
        let e = frame_len(&[0x30, 0xCF, 0x0F], 1024).unwrap_err();
        assert_eq!(e.reason_code(), reason::PACKET_TOO_LARGE);
        assert_eq!(e.to_string(), "packet too large (2002 > 1024 bytes)");
    }

    #[test]
    fn reason_codes_follow_the_mqtt5_tables() {
        use ProtocolError::*;
        assert_eq!(Malformed("x").reason_code(), 0x81);
        assert_eq!(InvalidUtf8.reason_code(), 0x81);
        assert_eq!(ReservedFlags(0x63).reason_code(), 0x81);
        assert_eq!(UnexpectedPacket("CONNECT").reason_code(), 0x82);
        assert_eq!(DupAtQoS0.reason_code(), 0x82);
        assert_eq!(UnsupportedProtocolLevel(6).reason_code(), 0x84);
        assert_eq!(InvalidClientId.reason_code(), 0x85);
        assert_eq!(WildcardInTopic.reason_code(), 0x90);
        assert_eq!(TopicAliasInvalid.reason_code(), 0x94);
        assert_eq!(PayloadFormatInvalid.reason_code(), 0x99);
        assert_eq!(SubscriptionIdZero.reason_code(), 0x82);
    }

    #[test]
    fn connack_codes_depend_on_the_version() {
        let v3 = |error| ConnectError {
            version: Some(Version::V311),
            error,
        };
        assert_eq!(
            v3(ProtocolError::UnsupportedProtocolLevel(6)).connack_code(),
            0x01
        );
        assert_eq!(v3(ProtocolError::InvalidClientId).connack_code(), 0x02);
        let v5 = |error| ConnectError {
            version: Some(Version::V5),
            error,
        };
        assert_eq!(v5(ProtocolError::InvalidClientId).connack_code(), 0x85);
        assert_eq!(v5(ProtocolError::Malformed("x")).connack_code(), 0x81);
        assert_eq!(
            v5(ProtocolError::InvalidPropertyValue(0x21)).connack_code(),
            0x82
        );
        let none = ConnectError {
            version: None,
            error: ProtocolError::UnknownProtocolName,
        };
        assert_eq!(none.connack_code(), 0x01);
    }

    #[test]
    fn errors_display_short_lowercase_lines() {
        assert_eq!(
            ProtocolError::ReservedFlags(0x63).to_string(),
            "reserved fixed-header flags in 0x63"
        );
        assert_eq!(
            ProtocolError::InvalidProperty(0x0B).to_string(),
            "property 0x0b not allowed here"
        );
        let e = ConnectError {
            version: None,
            error: ProtocolError::UnknownProtocolName,
        };
        assert_eq!(e.to_string(), "bad CONNECT: unknown protocol name");
    }

    #[test]
    fn connect_debug_hides_the_password() {
        let c = Connect {
            version: Version::V311,
            client_id: "c".into(),
            clean_start: true,
            keep_alive: 60,
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"hunter2")),
            will: None,
            session_expiry: 0,
            receive_maximum: 65535,
            max_packet_size: u32::MAX,
            topic_alias_max: 0,
            request_problem_info: true,
            auth_method: None,
            user_properties: Vec::new(),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("hunter2"));
    }
}
