//! The id each accepted push answers with (`{"id": "65f1c2a0-1f"}`): the API's start time
//! in seconds and a counter, both in lower-case hex. It is kept as the two numbers and
//! written out only when the answer is serialized (or logged), onto the stack: a push
//! used to allocate (and grow) a `String` for it.

use std::fmt;

/// `{prefix:x}-{n:x}`, at most 33 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MessageId {
    prefix: u64,
    n: u64,
}

/// Room for two 64-bit numbers in hex and the dash.
const MAX_LEN: usize = 33;

impl MessageId {
    pub(super) fn new(prefix: u64, n: u64) -> Self {
        MessageId { prefix, n }
    }

    /// The id's text, written into `buf`.
    fn text<'a>(&self, buf: &'a mut [u8; MAX_LEN]) -> &'a str {
        let mut len = put_hex(buf, 0, self.prefix);
        buf[len] = b'-';
        len = put_hex(buf, len + 1, self.n);
        // Only ASCII hex digits and a dash were written.
        std::str::from_utf8(&buf[..len]).unwrap_or_default()
    }
}

/// Writes `v` in lower-case hex (no leading zeros; `0` for zero) at `at`; returns the
/// end.
fn put_hex(buf: &mut [u8], at: usize, v: u64) -> usize {
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let d = (v >> (4 * (digits - 1 - i))) & 0xf;
        buf[at + i] = b"0123456789abcdef"[d as usize];
    }
    at + digits
}

impl MessageId {
    /// Appends the id's text to `out`.
    pub(super) fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.text(&mut [0; MAX_LEN]).as_bytes());
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text(&mut [0; MAX_LEN]))
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text(&mut [0; MAX_LEN]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_the_formatted_numbers() {
        for (p, n) in [
            (0, 0),
            (1, 15),
            (16, 255),
            (0x65f1_c2a0, 0x1f),
            (u64::MAX, u64::MAX),
            (1_733_370_000, 1 << 40),
        ] {
            let id = MessageId::new(p, n);
            assert_eq!(id.to_string(), format!("{p:x}-{n:x}"));
            let mut out = b"x".to_vec();
            id.write_to(&mut out);
            assert_eq!(out, format!("x{p:x}-{n:x}").into_bytes());
            assert_eq!(
                serde_json::to_string(&id).unwrap(),
                format!("\"{p:x}-{n:x}\"")
            );
        }
    }
}
