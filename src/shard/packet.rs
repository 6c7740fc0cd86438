//! MQTT control packet types by name (the high nibble of a frame's first byte), for the
//! shard's per-type metrics and its read-path checks.

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const UNSUBACK: u8 = 11;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// The packet type of a frame that starts with `first`.
pub fn type_of(first: u8) -> u8 {
    first >> 4
}
