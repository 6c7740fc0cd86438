//! MQTT control packet types by name (the high nibble of a frame's first byte), for the
//! shard's per-type metrics and its read-path checks.

pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const PUBREC: u8 = 5;
pub(super) const PUBREL: u8 = 6;
pub(super) const PUBCOMP: u8 = 7;
pub(super) const SUBACK: u8 = 9;
pub(super) const PINGREQ: u8 = 12;
pub(super) const UNSUBACK: u8 = 11;
pub(super) const PINGRESP: u8 = 13;
pub(super) const DISCONNECT: u8 = 14;

/// The packet type of a frame that starts with `first`.
pub(super) fn type_of(first: u8) -> u8 {
    first >> 4
}
