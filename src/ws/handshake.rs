//! The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section 4), parsed from whatever
//! prefix of the stream has arrived so far.
//!
//! The shard feeds [`parse`] the bytes read so far (like the PROXY header): it answers
//! "need more", an [`Accepted`] upgrade (the 101 response to write and where the frames
//! begin), or a [`Refusal`] whose [`Refusal::response`] is the 4xx to write before
//! closing. The request is bounded by [`Policy::max_bytes`], so a slow or endless request
//! cannot make us buffer without end. Pure: no sockets, no clock.

use std::fmt;

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to `Sec-WebSocket-Key` before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Most header lines read; more is refused like an oversized request.
const MAX_HEADERS: usize = 32;
/// The WebSocket subprotocols that carry MQTT: `mqtt` (3.1.1 and 5.0), `mqttv3.1` (3.1).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// What the listener accepts: its path, its Origins (empty = any) and its size bound.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The request path (`ws_path`); a query string after it is ignored.
    pub path: &'a str,
    /// `ws_allowed_origins`; empty = any. A request without `Origin` (not a browser) is
    /// let through: the check protects against other sites' pages, which always send one.
    pub allowed_origins: &'a [String],
    /// `ws_max_handshake_bytes`: the longest request, headers included.
    pub max_bytes: usize,
}

/// A valid upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Bytes of the request, blank line included: what follows are WebSocket frames.
    pub consumed: usize,
    /// The subprotocol selected from the client's list (one of [`SUBPROTOCOLS`]).
    pub protocol: &'static str,
    /// The `Sec-WebSocket-Accept` value.
    pub accept: String,
}

impl Accepted {
    /// The `101 Switching Protocols` response to write.
    pub fn response(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            self.accept, self.protocol
        )
        .into_bytes()
    }
}

/// Why an upgrade request was refused. Each maps to one status and a short body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not an HTTP request at all, or a malformed one.
    Malformed,
    /// Longer than `ws_max_handshake_bytes`, or too many header lines.
    TooLarge,
    /// A method other than GET.
    Method,
    /// Another path than `ws_path`.
    Path,
    /// No `Upgrade: websocket` or no `upgrade` token in `Connection`.
    NotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13.
    Version,
    /// `Sec-WebSocket-Key` missing or not 16 bytes in base64.
    Key,
    /// An `Origin` not in `ws_allowed_origins`.
    Origin,
    /// No `mqtt` (or `mqttv3.1`) in `Sec-WebSocket-Protocol`.
    Subprotocol,
}

impl Refusal {
    /// The HTTP status and its reason phrase.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::Malformed | Refusal::Key | Refusal::Subprotocol => (400, "Bad Request"),
            Refusal::Origin => (403, "Forbidden"),
            Refusal::Path => (404, "Not Found"),
            Refusal::Method => (405, "Method Not Allowed"),
            Refusal::NotUpgrade | Refusal::Version => (426, "Upgrade Required"),
            Refusal::TooLarge => (431, "Request Header Fields Too Large"),
        }
    }

    /// Extra header lines the status calls for (RFC 9110, RFC 6455 4.4).
    fn extra_headers(self) -> &'static str {
        match self {
            Refusal::Method => "Allow: GET\r\n",
            Refusal::NotUpgrade => "Upgrade: websocket\r\n",
            Refusal::Version => "Sec-WebSocket-Version: 13\r\n",
            _ => "",
        }
    }

    /// The response to write before closing: status, `Connection: close`, and the body.
    pub fn response(self) -> Vec<u8> {
        let (code, phrase) = self.status();
        let body = format!("{self}\n");
        format!(
            "HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n{}\r\n{body}",
            body.len(),
            self.extra_headers()
        )
        .into_bytes()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Malformed => "malformed HTTP request",
            Refusal::TooLarge => "upgrade request too large",
            Refusal::Method => "method must be GET",
            Refusal::Path => "no WebSocket endpoint at this path",
            Refusal::NotUpgrade => {
                "not a WebSocket upgrade (Upgrade: websocket, Connection: upgrade)"
            }
            Refusal::Version => "Sec-WebSocket-Version must be 13",
            Refusal::Key => "Sec-WebSocket-Key missing or invalid",
            Refusal::Origin => "Origin not allowed",
            Refusal::Subprotocol => "Sec-WebSocket-Protocol must offer mqtt",
        })
    }
}

impl std::error::Error for Refusal {}

/// What the bytes so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// The request is not complete yet (and within the size bound): read more.
    Partial,
    Accepted(Accepted),
    Refused(Refusal),
}

/// Parses the upgrade request at the front of `buf` (all bytes read so far).
pub fn parse(buf: &[u8], policy: &Policy<'_>) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= policy.max_bytes => {
            Upgrade::Refused(Refusal::TooLarge)
        }
        Ok(httparse::Status::Partial) => Upgrade::Partial,
        Ok(httparse::Status::Complete(n)) if n > policy.max_bytes => {
            Upgrade::Refused(Refusal::TooLarge)
        }
        Ok(httparse::Status::Complete(n)) => match check(&req, policy) {
            Ok((protocol, accept)) => Upgrade::Accepted(Accepted {
                consumed: n,
                protocol,
                accept,
            }),
            Err(r) => Upgrade::Refused(r),
        },
        Err(httparse::Error::TooManyHeaders) => Upgrade::Refused(Refusal::TooLarge),
        Err(_) => Upgrade::Refused(Refusal::Malformed),
    }
}

/// Checks a complete request in the order a client can act on: method, path, upgrade,
/// version, key, origin, subprotocol. Returns the subprotocol and the accept value.
fn check(
    req: &httparse::Request<'_, '_>,
    policy: &Policy<'_>,
) -> Result<(&'static str, String), Refusal> {
    if req.method != Some("GET") {
        return Err(Refusal::Method);
    }
    let path = req.path.unwrap_or("");
    if path.split('?').next() != Some(policy.path) {
        return Err(Refusal::Path);
    }
    let upgrade = values(req, "upgrade").any(|v| has_token(v, "websocket"));
    let connection = values(req, "connection").any(|v| has_token(v, "upgrade"));
    if !upgrade || !connection {
        return Err(Refusal::NotUpgrade);
    }
    if one(req, "sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal::Version);
    }
    let key = one(req, "sec-websocket-key")
        .map(str::trim)
        .filter(|k| key_is_valid(k))
        .ok_or(Refusal::Key)?;
    if let Some(origin) = one(req, "origin") {
        let allowed = &policy.allowed_origins;
        if !allowed.is_empty()
            && !allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(origin.trim()))
        {
            return Err(Refusal::Origin);
        }
    }
    let protocol =
        select_protocol(values(req, "sec-websocket-protocol")).ok_or(Refusal::Subprotocol)?;
    Ok((protocol, accept_key(key)))
}

/// The values of every header called `name` (case-insensitive); non-UTF-8 values skipped.
fn values<'r>(
    req: &'r httparse::Request<'_, '_>,
    name: &'r str,
) -> impl Iterator<Item = &'r str> + 'r {
    req.headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

/// The value of the header `name`, if it appears exactly once.
fn one<'r>(req: &'r httparse::Request<'_, '_>, name: &'r str) -> Option<&'r str> {
    let mut it = values(req, name);
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

/// Whether the comma-separated token list `list` holds `token` (case-insensitive).
fn has_token(list: &str, token: &str) -> bool {
    list.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The first of the client's offered subprotocols that carries MQTT.
fn select_protocol<'a>(lists: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    lists
        .flat_map(|l| l.split(','))
        .find_map(|t| SUBPROTOCOLS.into_iter().find(|p| *p == t.trim()))
}

/// A key is 16 random bytes in base64 (24 characters).
fn key_is_valid(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests;
