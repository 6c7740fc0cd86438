//! The part of the NATS client protocol the routing connection speaks, on one TCP
//! socket, plain or TLS: CONNECT, PING/PONG, SUB, UNSUB and PUB out; INFO, MSG, PING,
//! PONG, +OK and -ERR in.
//!
//! Why not async-nats here: it hands each subscription its own channel, so a node that
//! subscribes to `a.*` and `*.b` cannot tell in which order the server sent the copies of
//! different messages, and the exact duplicate check (`super::Dedup`) and the
//! per-publisher order both rely on that order; the subscription id of each copy also
//! tells a shared group's copy from a subscriber's. One socket read in one place keeps it;
//! it also spares a channel per subscribed filter (a node may hold a million).
//!
//! TLS (`crate::nats_tls`): the server sends its INFO in the clear; when the URL is
//! `tls://` or the INFO says `tls_required`, the socket is upgraded with rustls right
//! after it, and CONNECT goes over TLS.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// A routing connection's socket: plain TCP, or TLS over it.
pub type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// Longest control line accepted from the server.
const MAX_LINE: usize = 64 * 1024;

/// One operation from the server.
#[derive(Debug, PartialEq)]
pub enum ServerOp {
    Info(String),
    Msg {
        subject: String,
        /// The subscription it came through.
        sid: u64,
        payload: Bytes,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// The server sent something this client cannot read.
#[derive(Debug, PartialEq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Takes one whole operation off the front of `buf`, or `None` until more bytes come.
pub fn parse(buf: &mut BytesMut) -> Result<Option<ServerOp>, ProtoError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err(ProtoError("control line too long".into()));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProtoError("control line is not UTF-8".into()))?;
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let op = match verb.to_ascii_uppercase().as_str() {
        "MSG" => return parse_msg(buf, end),
        "INFO" => ServerOp::Info(rest.to_string()),
        "PING" => ServerOp::Ping,
        "PONG" => ServerOp::Pong,
        "+OK" => ServerOp::Ok,
        "-ERR" => ServerOp::Err(rest.trim_matches('\'').to_string()),
        _ => return Err(ProtoError(format!("unexpected {line:?}"))),
    };
    buf.advance(end + 2);
    Ok(Some(op))
}

/// `MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n`
fn parse_msg(buf: &mut BytesMut, end: usize) -> Result<Option<ServerOp>, ProtoError> {
    let line = std::str::from_utf8(&buf[..end]).unwrap_or_default();
    let args: Vec<&str> = line.split_ascii_whitespace().collect();
    let (subject, sid, len) = match args.as_slice() {
        [_, subject, sid, len] | [_, subject, sid, _, len] => (subject.to_string(), sid, len),
        _ => return Err(ProtoError(format!("bad MSG line {line:?}"))),
    };
    let sid: u64 = sid
        .parse()
        .map_err(|_| ProtoError(format!("bad MSG sid in {line:?}")))?;
    let len: usize = len
        .parse()
        .map_err(|_| ProtoError(format!("bad MSG size in {line:?}")))?;
    if buf.len() < end + 2 + len + 2 {
        return Ok(None);
    }
    buf.advance(end + 2);
    let payload = buf.split_to(len).freeze();
    buf.advance(2);
    Ok(Some(ServerOp::Msg {
        subject,
        sid,
        payload,
    }))
}

/// The `host:port` of a `nats://` or `tls://` URL (port 4222 by default); an error for
/// other schemes.
pub fn address(url: &str) -> Result<String, String> {
    let rest = match url.split_once("://") {
        Some(("nats" | "tls", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{url:?}: the fleet speaks nats:// or tls:// only, not {scheme}://"
            ))
        }
        None => url,
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.trim_end_matches('/');
    Ok(
        if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:4222")
        },
    )
}

/// Whether `url` asks for TLS whatever the server says.
fn is_tls(url: &str) -> bool {
    url.starts_with("tls://")
}

/// The host of a `host:port` address, without an IPv6 address' brackets: the name the
/// server's certificate must carry.
fn host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The credentials in a URL's user part: `user:password@` or `token@`.
fn credentials(url: &str) -> Option<(&str, Option<&str>)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (user, _) = rest.rsplit_once('@')?;
    Some(match user.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (user, None),
    })
}

/// A connected, authenticated routing connection, and the server's `max_payload`.
pub struct Connected {
    pub stream: Stream,
    pub max_payload: usize,
    /// Bytes read after the handshake's PONG.
    pub rest: BytesMut,
}

/// How the routing connections reach NATS: the URLs, the token, the TLS settings
/// (`crate::nats_tls`) and the connection's name.
pub struct Dial<'a> {
    pub urls: &'a [String],
    pub token: &'a str,
    pub tls: &'a Arc<rustls::ClientConfig>,
    pub name: &'a str,
}

/// Connects to the first of the URLs that answers, says CONNECT (no echo: a connection
/// never gets its own messages back) and waits for the PONG of a PING, so a refused token
/// or certificate is an error here, naming the URL.
pub async fn connect(dial: &Dial<'_>) -> Result<Connected, String> {
    let mut last = String::from("no NATS URL");
    for url in dial.urls {
        match tokio::time::timeout(Duration::from_secs(2), handshake(url, dial)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("{url}: no answer within 2 s"),
        }
    }
    Err(last)
}

async fn handshake(url: &str, dial: &Dial<'_>) -> Result<Connected, String> {
    let addr = address(url)?;
    let mut tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let info = match next_op(&mut tcp, &mut buf, url).await? {
        ServerOp::Info(json) => {
            serde_json::from_str::<serde_json::Value>(&json).unwrap_or_default()
        }
        op => return Err(format!("{url}: expected INFO first, got {op:?}")),
    };
    let max_payload = info["max_payload"]
        .as_u64()
        .map_or(1024 * 1024, |m| m as usize);
    let secure = is_tls(url) || info["tls_required"].as_bool() == Some(true);
    let mut stream = if secure {
        Either::Right(upgrade(tcp, &addr, dial.tls, url).await?)
    } else {
        Either::Left(tcp)
    };
    let hello = format!("CONNECT {}\r\nPING\r\n", hello(url, dial, secure));
    stream
        .write_all(hello.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    loop {
        match next_op(&mut stream, &mut buf, url).await? {
            ServerOp::Pong => {
                return Ok(Connected {
                    stream,
                    max_payload,
                    rest: buf,
                })
            }
            ServerOp::Err(e) => return Err(format!("{url}: the server refused: {e}")),
            _ => {}
        }
    }
}

/// The TLS handshake on `tcp`, the server's certificate checked for `addr`'s host.
async fn upgrade(
    tcp: TcpStream,
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host(addr).to_string())
        .map_err(|e| format!("{url}: {:?} is not a TLS server name: {e}", host(addr)))?;
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS handshake with NATS failed: {e}"))
}

/// The CONNECT operation's JSON: no echo, the token or the URL's credentials.
fn hello(url: &str, dial: &Dial<'_>, secure: bool) -> serde_json::Value {
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "lang": "rust", "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1, "echo": false, "headers": false, "name": dial.name,
        "tls_required": secure,
    });
    if !dial.token.is_empty() {
        connect["auth_token"] = dial.token.into();
    }
    match credentials(url) {
        Some((user, Some(pass))) => {
            connect["user"] = user.into();
            connect["pass"] = pass.into();
        }
        Some((token, None)) => connect["auth_token"] = token.into(),
        None => {}
    }
    connect
}

/// The next whole operation from the server during the handshake.
async fn next_op<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    url: &str,
) -> Result<ServerOp, String> {
    loop {
        if let Some(op) = parse(buf).map_err(|e| format!("{url}: {e}"))? {
            return Ok(op);
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if n == 0 {
            return Err(format!("{url}: closed during the handshake"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_operation_and_waits_for_whole_ones() {
        let mut buf = BytesMut::from(
            &b"INFO {\"max_payload\":5}\r\nPING\r\nMSG a.b 7 5\r\nhello\r\nMSG c 1 r 0\r\n\r\n-ERR 'x y'\r\nMSG a 1 3\r\nab"[..],
        );
        assert_eq!(
            parse(&mut buf),
            Ok(Some(ServerOp::Info("{\"max_payload\":5}".into())))
        );
        assert_eq!(parse(&mut buf), Ok(Some(ServerOp::Ping)));
        assert_eq!(
            parse(&mut buf),
            Ok(Some(ServerOp::Msg {
                subject: "a.b".into(),
                sid: 7,
                payload: Bytes::from_static(b"hello")
            }))
        );
        assert_eq!(
            parse(&mut buf),
            Ok(Some(ServerOp::Msg {
                subject: "c".into(),
                sid: 1,
                payload: Bytes::new()
            }))
        );
        assert_eq!(parse(&mut buf), Ok(Some(ServerOp::Err("x y".into()))));
        assert_eq!(parse(&mut buf), Ok(None), "a MSG missing its last byte");
        buf.extend_from_slice(b"c\r\n");
        assert!(matches!(parse(&mut buf), Ok(Some(ServerOp::Msg { .. }))));
        assert!(buf.is_empty());
        let mut bad = BytesMut::from(&b"HELLO\r\n"[..]);
        assert!(parse(&mut bad).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(address("nats://127.0.0.1:4333").unwrap(), "127.0.0.1:4333");
        assert_eq!(address("nats://host").unwrap(), "host:4222");
        assert_eq!(address("nats://tok@host:1/").unwrap(), "host:1");
        assert_eq!(address("tls://host:1").unwrap(), "host:1");
        assert!(address("ws://host:1").is_err());
        assert_eq!(host("127.0.0.1:4222"), "127.0.0.1");
        assert_eq!(host("[::1]:4222"), "::1");
        assert!(is_tls("tls://h:1") && !is_tls("nats://h:1"));
        assert_eq!(credentials("nats://u:p@h:1"), Some(("u", Some("p"))));
        assert_eq!(credentials("nats://t@h"), Some(("t", None)));
        assert_eq!(credentials("nats://h:1"), None);
    }
}
