//! The bounds-checked cursor every decoder reads a packet body with: the MQTT field
//! types (integers, Variable Byte Integer, Binary Data, UTF-8 strings) and nothing past
//! the end of the body.

use super::{ProtocolError, Result};

/// A cursor over a packet body that never reads past its end.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(ProtocolError::Malformed(
                "a field runs past the end of the packet",
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self) -> Result<u8> {
        let b = self.take(1)?;
        Ok(b[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A Variable Byte Integer: at most 4 bytes, so at most 268,435,455.
    pub(super) fn varint(&mut self) -> Result<u32> {
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
    pub(super) fn binary(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 Encoded String: well-formed and without U+0000.
    pub(super) fn str(&mut self) -> Result<&'a str> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| ProtocolError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(s)
    }
}
