//! WebSocket frames (RFC 6455 section 5): the client frames decoded in place into the
//! plaintext MQTT byte stream, and the server frames around outbound bytes.
//!
//! Memory is the point. A connection is a slab entry and an idle one holds no buffer, so
//! the [`Decoder`] keeps its whole state inline in a few bytes: the header of the frame in
//! progress (at most 14 bytes, the mask key last) and how much of its payload is still to
//! come. Data frames are never buffered: [`Decoder::decode`] unmasks each payload byte as
//! it arrives and moves it to the front of the caller's buffer, so the caller hands
//! `buf[..plain]` to the MQTT framer exactly as a plain TCP read. MQTT packets may split
//! across frames and a frame may hold several packets: the frame boundaries vanish here.
//!
//! Control frames (ping, pong, close) are at most 125 bytes and answered whole. One whose
//! payload is not all in `buf` yet is left unconsumed (`used < buf.len()`): the caller
//! keeps those few bytes and passes them again in front of the next ones, the same way it
//! keeps a partial MQTT packet.
//!
//! Refused input ends the connection with the close code RFC 6455 names: unmasked client
//! frames, fragmented or oversized control frames, reserved bits, unknown opcodes and
//! broken fragmentation get 1002; text frames get 1003 (MQTT is binary); a frame longer
//! than the maximum payload gets 1009 as soon as its header is read, before any of it is
//! kept.

use std::fmt;

/// Close status codes (RFC 6455 section 7.4.1).
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASKED: u8 = 0x80;

/// The longest client frame header: 2 bytes, a 64-bit length, a 4-byte mask key.
pub const MAX_CLIENT_HEADER: usize = 14;
/// The longest server frame header: 2 bytes and a 64-bit length (no mask).
pub const MAX_SERVER_HEADER: usize = 10;
/// The largest control frame payload.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A binary message of several frames is in progress (continuations expected).
const FRAGMENTED: u8 = 1;
/// A close frame was received or sent: nothing more is decoded.
const ENDED: u8 = 2;

/// How the WebSocket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent a close frame (with this status code, if any); it was echoed.
    Closed { code: Option<u16> },
    /// The client broke the protocol; a close frame with `code` was written.
    Refused { code: u16, why: &'static str },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed { code: Some(c) } => write!(f, "WebSocket closed by the client ({c})"),
            End::Closed { code: None } => f.write_str("WebSocket closed by the client"),
            End::Refused { code, why } => write!(f, "WebSocket refused ({code}): {why}"),
        }
    }
}

/// What one [`Decoder::decode`] call did to its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// `buf[..plain]` now holds the MQTT bytes of the data frames, unmasked, in order.
    pub plain: usize,
    /// Bytes of input consumed. `buf[used..]` (part of a control frame's payload, at most
    /// 125 bytes) must be passed again in front of the next bytes read.
    pub used: usize,
    /// The WebSocket ended; the replies hold the close frame to write before closing.
    /// The plaintext before it is still valid MQTT input. Input after the end is
    /// consumed and ignored.
    pub end: Option<End>,
}

/// The per-connection decoder state, kept inline in the connection (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decoder {
    /// Payload bytes of the current data frame still to come (once its header is whole).
    left: u32,
    /// The current frame's header bytes so far.
    head: [u8; MAX_CLIENT_HEADER],
    head_len: u8,
    /// [`FRAGMENTED`] and [`ENDED`].
    flags: u8,
}

impl Decoder {
    /// True between frames, outside a fragmented message: nothing of a frame is pending.
    pub fn is_idle(&self) -> bool {
        self.head_len == 0 && self.flags & FRAGMENTED == 0
    }

    /// Decodes the client bytes `buf` in place (see [`Decoded`]). Control replies (pong,
    /// close) are appended whole to `replies`. `max_payload` bounds a frame's payload
    /// (the connection's `max_packet_size`).
    pub fn decode(&mut self, buf: &mut [u8], max_payload: u32, replies: &mut Vec<u8>) -> Decoded {
        let (mut r, mut w) = (0, 0);
        if self.flags & ENDED != 0 {
            r = buf.len();
        }
        let mut end = None;
        while self.flags & ENDED == 0 && end.is_none() {
            if !self.header_whole() {
                if r == buf.len() {
                    break;
                }
                r += self.take_header(&buf[r..]);
                if self.header_whole() {
                    end = self.check_header(max_payload).err();
                } else if self.head_len == 2 {
                    end = self.check_start().err();
                }
            } else if self.is_control() {
                let n = self.payload_len() as usize;
                if buf.len() - r < n {
                    break;
                }
                end = self.control(&mut buf[r..r + n], replies);
                r += n;
                self.head_len = 0;
            } else if self.left == 0 {
                self.head_len = 0;
            } else if r == buf.len() {
                break;
            } else {
                let n = (self.left as usize).min(buf.len() - r);
                self.unmask_data(buf, r, w, n);
                r += n;
                w += n;
                self.left -= n as u32;
            }
        }
        if let Some(e) = end {
            self.flags |= ENDED;
            if let End::Refused { code, .. } = e {
                write_close(replies, Some(code));
            }
            r = buf.len();
        }
        Decoded {
            plain: w,
            used: r,
            end,
        }
    }

    /// Header bytes this frame needs in all: known once its first two are in.
    fn header_need(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + 4
    }

    fn header_whole(&self) -> bool {
        self.head_len >= 2 && self.head_len as usize == self.header_need()
    }

    /// Copies header bytes from `data` (non-empty), up to what the header needs so far
    /// (2, then the rest once the length byte is known). Returns how many were taken.
    fn take_header(&mut self, data: &[u8]) -> usize {
        let have = self.head_len as usize;
        let n = (self.header_need() - have).min(data.len());
        self.head[have..have + n].copy_from_slice(&data[..n]);
        self.head_len += n as u8;
        n
    }

    fn opcode(&self) -> u8 {
        self.head[0] & 0x0F
    }

    fn fin(&self) -> bool {
        self.head[0] & FIN != 0
    }

    fn is_control(&self) -> bool {
        self.opcode() & 0x8 != 0
    }

    /// The payload length of a whole header.
    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7F {
            126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
            127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        }
    }

    fn mask(&self) -> [u8; 4] {
        let at = self.head_len as usize - 4;
        self.head[at..at + 4].try_into().expect("4 bytes")
    }

    /// The rules the first two header bytes settle.
    fn check_start(&self) -> Result<(), End> {
        let refuse = |why| End::Refused {
            code: code::PROTOCOL_ERROR,
            why,
        };
        if self.head[0] & RSV != 0 {
            return Err(refuse("reserved bits set"));
        }
        if self.head[1] & MASKED == 0 {
            return Err(refuse("unmasked client frame"));
        }
        let fragmented = self.flags & FRAGMENTED != 0;
        match self.opcode() {
            OP_TEXT => Err(End::Refused {
                code: code::UNSUPPORTED_DATA,
                why: "text frame (MQTT needs binary frames)",
            }),
            OP_CONTINUATION if !fragmented => Err(refuse("continuation outside a message")),
            OP_BINARY if fragmented => Err(refuse("new message inside a fragmented one")),
            OP_CONTINUATION | OP_BINARY => Ok(()),
            OP_CLOSE | OP_PING | OP_PONG if !self.fin() => Err(refuse("fragmented control frame")),
            OP_CLOSE | OP_PING | OP_PONG if self.head[1] & 0x7F > MAX_CONTROL_PAYLOAD as u8 => {
                Err(refuse("control frame over 125 bytes"))
            }
            OP_CLOSE | OP_PING | OP_PONG => Ok(()),
            _ => Err(refuse("unknown opcode")),
        }
    }

    /// The rules of a whole header (the length); starts the frame's payload.
    fn check_header(&mut self, max_payload: u32) -> Result<(), End> {
        let len = self.payload_len();
        if len >> 63 != 0 {
            return Err(End::Refused {
                code: code::PROTOCOL_ERROR,
                why: "64-bit length with the high bit set",
            });
        }
        if len > max_payload as u64 {
            return Err(End::Refused {
                code: code::TOO_BIG,
                why: "frame larger than max_packet_size",
            });
        }
        if !self.is_control() {
            self.left = len as u32;
            match (self.opcode(), self.fin()) {
                (OP_BINARY, false) => self.flags |= FRAGMENTED,
                (OP_CONTINUATION, true) => self.flags &= !FRAGMENTED,
                _ => {}
            }
        }
        Ok(())
    }

    /// Unmasks `n` payload bytes from `buf[r..]` into `buf[w..]` (`w <= r`), eight at a
    /// time: each word is read before anything at or after it is written.
    fn unmask_data(&self, buf: &mut [u8], r: usize, w: usize, n: usize) {
        let mask = self.mask();
        let offset = (self.payload_len() - self.left as u64) as usize;
        let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) & 3]);
        let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
        let mut i = 0;
        while i + 8 <= n {
            let v = u64::from_ne_bytes(buf[r + i..r + i + 8].try_into().expect("8 bytes"));
            buf[w + i..w + i + 8].copy_from_slice(&(v ^ word).to_ne_bytes());
            i += 8;
        }
        for j in i..n {
            buf[w + j] = buf[r + j] ^ m[j & 3];
        }
    }

    /// Answers a whole control frame whose masked payload is `payload`.
    fn control(&self, payload: &mut [u8], replies: &mut Vec<u8>) -> Option<End> {
        let mask = self.mask();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        match self.opcode() {
            OP_PING => {
                write_frame(replies, FIN | OP_PONG, payload);
                None
            }
            OP_PONG => None,
            _ => Some(close_received(payload, replies)),
        }
    }
}

/// A close frame's (unmasked) payload: echo its code, or refuse a malformed one.
fn close_received(payload: &[u8], replies: &mut Vec<u8>) -> End {
    let refuse = |code, why| End::Refused { code, why };
    let status = match payload {
        [] => None,
        [_] => return refuse(code::PROTOCOL_ERROR, "close payload of one byte"),
        [a, b, reason @ ..] => {
            let c = u16::from_be_bytes([*a, *b]);
            if !close_code_valid(c) {
                return refuse(code::PROTOCOL_ERROR, "invalid close code");
            }
            if std::str::from_utf8(reason).is_err() {
                return refuse(code::INVALID_PAYLOAD, "close reason not UTF-8");
            }
            Some(c)
        }
    };
    write_close(replies, status);
    End::Closed { code: status }
}

/// Codes a peer may send (RFC 6455 7.4.1-7.4.2; 1004-1006 and 1015 are never sent).
fn close_code_valid(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A server frame header (unmasked), built for a payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_SERVER_HEADER],
    len: u8,
}

impl Header {
    /// The header of a final frame with `first` (FIN and opcode) and `len` payload bytes.
    fn new(first: u8, len: usize) -> Self {
        let mut bytes = [0u8; MAX_SERVER_HEADER];
        bytes[0] = first;
        let n = if len <= MAX_CONTROL_PAYLOAD {
            bytes[1] = len as u8;
            2
        } else if len <= u16::MAX as usize {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Header { bytes, len: n }
    }

    /// The header of one final binary frame of `len` payload bytes.
    pub fn binary(len: usize) -> Self {
        Header::new(FIN | OP_BINARY, len)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

fn write_frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    out.extend_from_slice(Header::new(first, payload.len()).as_bytes());
    out.extend_from_slice(payload);
}

/// Appends one binary frame holding `payload` (outbound MQTT bytes).
pub fn write_binary(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, FIN | OP_BINARY, payload);
}

/// Turns `out[start..]` (outbound MQTT bytes just appended) into one binary frame by
/// inserting its header at `start`. Nothing to frame leaves `out` as it is.
pub fn frame_in_place(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len > 0 {
        let header = Header::binary(len);
        out.splice(start..start, header.as_bytes().iter().copied());
    }
}

/// Appends a close frame with status `code` (none: an empty close frame).
pub fn write_close(out: &mut Vec<u8>, code: Option<u16>) {
    let payload = code.map(u16::to_be_bytes);
    write_frame(
        out,
        FIN | OP_CLOSE,
        payload.as_ref().map_or(&[], |p| &p[..]),
    );
}

#[cfg(test)]
mod tests;
