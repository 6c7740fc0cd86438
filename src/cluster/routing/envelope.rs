//! What travels with a message between nodes: the body of the NATS message.
//!
//! The topic is the subject ([`super::subject`]); the body is a small binary header then
//! the payload unchanged:
//!
//! ```text
//! version 1 | origin len u8 | origin | seq u64 | qos u8 | retain u8 |
//! expiry ms u64 (u64::MAX: none) | props len u32 | props | payload
//! ```
//!
//! `origin` is the publishing node's id and its start time (a restarted node is a new
//! origin), `seq` counts that origin's messages from 1: a receiver drops a copy it has
//! seen (see `super::Dedup`). The expiry is what is left of the message's life when it
//! leaves. The MQTT 5 properties that travel are those a subscriber receives unchanged
//! (`PublishProps`), each tagged. A body in its own format rather than NATS headers keeps
//! one parser and the payload's bytes untouched.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::PublishProps;

const VERSION: u8 = 1;
const NO_EXPIRY: u64 = u64::MAX;

/// One message as a node sends it to the others.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub origin: String,
    pub seq: u64,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds of life left.
    pub expiry_ms: Option<u64>,
    pub props: Option<Box<PublishProps>>,
    pub payload: Bytes,
}

/// Why a body could not be read (the message is dropped and counted).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_bytes(b: &mut Bytes) -> Result<Bytes, Malformed> {
    if b.remaining() < 4 {
        return Err(Malformed);
    }
    let n = b.get_u32() as usize;
    if b.remaining() < n {
        return Err(Malformed);
    }
    Ok(b.split_to(n))
}

fn get_str(b: &mut Bytes) -> Result<String, Malformed> {
    String::from_utf8(get_bytes(b)?.to_vec()).map_err(|_| Malformed)
}

/// The properties as tagged fields: 1 format, 2 content type, 3 response topic,
/// 4 correlation data, 5 one user property. (The expiry travels in the header.)
fn encode_props(p: &PublishProps, out: &mut BytesMut) {
    if let Some(f) = p.payload_format_indicator {
        out.put_u8(1);
        out.put_u8(f);
    }
    if let Some(c) = &p.content_type {
        out.put_u8(2);
        put_str(out, c);
    }
    if let Some(r) = &p.response_topic {
        out.put_u8(3);
        put_str(out, r);
    }
    if let Some(c) = &p.correlation_data {
        out.put_u8(4);
        out.put_u32(c.len() as u32);
        out.put_slice(c);
    }
    for (k, v) in &p.user_properties {
        out.put_u8(5);
        put_str(out, k);
        put_str(out, v);
    }
}

fn decode_props(mut b: Bytes, expiry: Option<u32>) -> Result<PublishProps, Malformed> {
    let mut p = PublishProps {
        message_expiry: expiry,
        ..Default::default()
    };
    while b.has_remaining() {
        match b.get_u8() {
            1 if b.has_remaining() => p.payload_format_indicator = Some(b.get_u8()),
            2 => p.content_type = Some(get_str(&mut b)?),
            3 => p.response_topic = Some(get_str(&mut b)?),
            4 => p.correlation_data = Some(get_bytes(&mut b)?),
            5 => p.user_properties.push((get_str(&mut b)?, get_str(&mut b)?)),
            _ => return Err(Malformed),
        }
    }
    Ok(p)
}

impl Envelope {
    /// The NATS message body.
    pub fn encode(&self) -> Bytes {
        let mut props = BytesMut::new();
        if let Some(p) = &self.props {
            encode_props(p, &mut props);
        }
        let origin = &self.origin.as_bytes()[..self.origin.len().min(255)];
        let mut out = BytesMut::with_capacity(32 + origin.len() + props.len() + self.payload.len());
        out.put_u8(VERSION);
        out.put_u8(origin.len() as u8);
        out.put_slice(origin);
        out.put_u64(self.seq);
        out.put_u8(self.qos);
        out.put_u8(u8::from(self.retain));
        out.put_u64(self.expiry_ms.unwrap_or(NO_EXPIRY));
        out.put_u32(props.len() as u32);
        out.put_slice(&props);
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Reads a body made by [`Envelope::encode`].
    pub fn decode(mut b: Bytes) -> Result<Envelope, Malformed> {
        if b.remaining() < 2 || b.get_u8() != VERSION {
            return Err(Malformed);
        }
        let n = usize::from(b.get_u8());
        if b.remaining() < n + 8 + 2 + 8 {
            return Err(Malformed);
        }
        let origin = String::from_utf8(b.split_to(n).to_vec()).map_err(|_| Malformed)?;
        let seq = b.get_u64();
        let qos = b.get_u8();
        let retain = b.get_u8() != 0;
        let expiry_ms = Some(b.get_u64()).filter(|&e| e != NO_EXPIRY);
        if qos > 2 {
            return Err(Malformed);
        }
        let props = get_bytes(&mut b)?;
        let had_expiry = expiry_ms.map(|ms| ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32);
        let props = if props.is_empty() {
            None
        } else {
            Some(Box::new(decode_props(props, had_expiry)?))
        };
        Ok(Envelope {
            origin,
            seq,
            qos,
            retain,
            expiry_ms,
            props,
            payload: b,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(props: Option<Box<PublishProps>>) -> Envelope {
        Envelope {
            origin: "node-a/17".into(),
            seq: 42,
            qos: 1,
            retain: true,
            expiry_ms: Some(1500),
            props,
            payload: Bytes::from_static(b"\x00hello\xff"),
        }
    }

    #[test]
    fn round_trips_with_and_without_properties() {
        let plain = sample(None);
        assert_eq!(Envelope::decode(plain.encode()), Ok(plain));
        let props = PublishProps {
            payload_format_indicator: Some(1),
            message_expiry: Some(2),
            content_type: Some("text/plain".into()),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        };
        let full = sample(Some(Box::new(props)));
        assert_eq!(Envelope::decode(full.encode()), Ok(full));
    }

    #[test]
    fn truncated_or_foreign_bodies_are_malformed() {
        let body = sample(None).encode();
        for n in 0..30 {
            assert_eq!(Envelope::decode(body.slice(..n)), Err(Malformed), "{n}");
        }
        assert_eq!(
            Envelope::decode(Bytes::from_static(b"hello")),
            Err(Malformed)
        );
    }
}
