//! PROXY protocol v1 and v2 headers (HAProxy's spec), parsed from whatever prefix of the
//! stream has arrived so far.
//!
//! A load balancer that terminates TCP puts one header in front of the client's bytes to
//! say who the client really is. The shard feeds [`parse`] the bytes read so far: it
//! answers "need more", the header and its length (the bytes after it are the client's
//! own, TLS or MQTT), or an error as soon as the prefix cannot become a valid header.
//! Headers are bounded (`max` bytes), so a peer cannot make us buffer without end.
//!
//! Only the proxies the operator runs may speak for a client: [`TrustedProxies`]
//! (`[mqtt] proxy_trusted`, addresses and CIDRs, loopback by default) is checked against
//! the socket's own peer address once a header is parsed, and a header from any other
//! peer closes the connection (counted as `reason="proxy_untrusted"`). Without it any
//! client could claim any address: the anonymous loopback rule, and a fresh address for
//! every connection past `max_connections_per_ip`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxied client's address (v1 TCP4/TCP6, v2 PROXY over TCP/UDP and IPv4/IPv6).
    Proxied(SocketAddr),
    /// Use the socket's own address: v2 LOCAL (the proxy's health checks), v1 UNKNOWN,
    /// or a v2 PROXY with an address family we do not map (AF_UNSPEC, AF_UNIX), which
    /// the spec says the receiver must then ignore.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes are not a PROXY header at all.
    NotProxy,
    /// A header longer than the allowed maximum.
    TooLong(usize),
    /// A header with a malformed field.
    Malformed(&'static str),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => write!(f, "no PROXY protocol header"),
            ProxyError::TooLong(n) => write!(f, "PROXY header of {n} bytes is too long"),
            ProxyError::Malformed(what) => write!(f, "malformed PROXY header: {what}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// An address block: `addr/len`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `1.2.3.0/24`, `fd00::/8`, or a lone address (a /32 or /128).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { net, len })
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as IPv4) is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The peers allowed to send a PROXY header (`[mqtt] proxy_trusted`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Box<[Cidr]>);

impl TrustedProxies {
    /// Parses the configured list; an error names the index of the bad entry.
    pub fn parse(list: &[String]) -> Result<TrustedProxies, (usize, String)> {
        list.iter()
            .enumerate()
            .map(|(i, s)| Cidr::parse(s).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| TrustedProxies(v.into()))
    }

    /// Whether `peer`, the socket's own peer address, may send a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(peer))
    }
}

/// Parses the header at the start of `buf`. `Ok(None)`: a valid prefix, read more.
/// `Ok(Some((header, len)))`: the header takes the first `len` bytes. `max` bounds the
/// whole header (v1 is further bounded by the spec's 107 bytes).
pub fn parse(buf: &[u8], max: usize) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first {
        b'\r' => parse_v2(buf, max),
        b'P' => parse_v1(buf),
        _ => Err(ProxyError::NotProxy),
    }
}

fn parse_v2(buf: &[u8], max: usize) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let sig = buf.len().min(12);
    if buf[..sig] != V2_SIGNATURE[..sig] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("version is not 2"));
    }
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > max {
        return Err(ProxyError::TooLong(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        // LOCAL: the connection was made by the proxy itself; the body is to be ignored.
        0 => ProxyHeader::Local,
        1 => match fam >> 4 {
            1 => {
                if body.len() < 12 {
                    return Err(ProxyError::Malformed("IPv4 addresses truncated"));
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                ProxyHeader::Proxied(SocketAddr::new(IpAddr::V4(ip), port))
            }
            2 => {
                if body.len() < 36 {
                    return Err(ProxyError::Malformed("IPv6 addresses truncated"));
                }
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                ProxyHeader::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            0 | 3 => ProxyHeader::Local,
            _ => return Err(ProxyError::Malformed("unknown address family")),
        },
        _ => return Err(ProxyError::Malformed("unknown command")),
    };
    Ok(Some((header, total)))
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let pre = buf.len().min(V1_PREFIX.len());
    if buf[..pre] != V1_PREFIX[..pre] {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::TooLong(buf.len()));
        }
        return Ok(None);
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::Malformed("v1 line does not end in CRLF"));
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..lf - 1])
        .map_err(|_| ProxyError::Malformed("v1 line is not ASCII"))?;
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or("");
    let header = match proto {
        "UNKNOWN" => ProxyHeader::Local,
        "TCP4" | "TCP6" => {
            let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(ProxyError::Malformed("v1 needs 4 address fields"));
            };
            let ip: IpAddr = if proto == "TCP4" {
                src.parse::<Ipv4Addr>()
                    .map(IpAddr::V4)
                    .map_err(|_| ProxyError::Malformed("bad IPv4 source address"))?
            } else {
                src.parse::<Ipv6Addr>()
                    .map(IpAddr::V6)
                    .map_err(|_| ProxyError::Malformed("bad IPv6 source address"))?
            };
            if sport.len() > 1 && sport.starts_with('0') {
                return Err(ProxyError::Malformed("bad source port"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("bad source port"))?;
            ProxyHeader::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("unknown v1 protocol")),
    };
    Ok(Some((header, lf + 1)))
}

/// Encodes a v2 PROXY header for `src` → `dst` (tests and tools; the gateway only reads).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

/// Encodes a v2 LOCAL header (what a proxy's health check sends).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

/// Encodes a v1 header for `src` → `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_match_addresses_and_blocks() {
        let list = |l: &[&str]| {
            TrustedProxies::parse(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let t = list(&["127.0.0.1/32", "::1/128", "10.1.0.0/16"]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for yes in ["127.0.0.1", "::1", "10.1.200.3", "::ffff:127.0.0.1"] {
            assert!(t.trusts(ip(yes)), "{yes}");
        }
        for no in ["127.0.0.2", "10.2.0.1", "::2", "192.0.2.1"] {
            assert!(!t.trusts(ip(no)), "{no}");
        }
        let any = list(&["0.0.0.0/0", "10.0.0.7"]).unwrap();
        assert!(any.trusts(ip("203.0.113.9")));
        assert!(!any.trusts(ip("2001:db8::1")));
        assert_eq!(list(&["1.2.3.4", "x"]).unwrap_err().0, 1);
        assert!(list(&["1.2.3.4/33"]).is_err());
        assert!(list(&["::/129"]).is_err());
        assert!(list(&["fd00::/8"]).unwrap().trusts(ip("fd12::1")));
    }
    use proptest::prelude::*;

    const MAX: usize = 4096;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 1883\r\nMQTT";
        assert_eq!(
            parse(h, MAX),
            Ok(Some((
                ProxyHeader::Proxied(addr("192.0.2.7:51000")),
                h.len() - 4
            )))
        );
        let h = b"PROXY TCP6 2001:db8::7 ::1 4242 8883\r\n";
        assert_eq!(
            parse(h, MAX),
            Ok(Some((
                ProxyHeader::Proxied(addr("[2001:db8::7]:4242")),
                h.len()
            )))
        );
        let h = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse(h, MAX), Ok(Some((ProxyHeader::Local, h.len()))));
    }

    #[test]
    fn v1_errors() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad, MAX), Err(ProxyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
        assert_eq!(parse(&long, MAX), Err(ProxyError::TooLong(long.len())));
        assert_eq!(
            parse(b"\x10\x0c\x00\x04MQTT", MAX),
            Err(ProxyError::NotProxy)
        );
        assert_eq!(parse(b"PROXZ", MAX), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", MAX), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_tcp4_tcp6_and_local() {
        let h = encode_v2(addr("198.51.100.3:40000"), addr("10.0.0.1:1883"));
        assert_eq!(h.len(), 28);
        assert_eq!(
            parse(&h, MAX),
            Ok(Some((ProxyHeader::Proxied(addr("198.51.100.3:40000")), 28)))
        );
        let h = encode_v2(addr("[2001:db8::9]:7"), addr("[::1]:8883"));
        assert_eq!(
            parse(&h, MAX),
            Ok(Some((ProxyHeader::Proxied(addr("[2001:db8::9]:7")), 52)))
        );
        let h = encode_v2_local();
        assert_eq!(parse(&h, MAX), Ok(Some((ProxyHeader::Local, 16))));
    }

    #[test]
    fn v2_with_tlvs_and_bounds() {
        let mut h = encode_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        // A TLV (PP2_TYPE_AUTHORITY) after the addresses is skipped.
        let tlv = [0x02, 0x00, 0x03, b'a', b'b', b'c'];
        let len = 12 + tlv.len() as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&tlv);
        assert_eq!(
            parse(&h, MAX),
            Ok(Some((ProxyHeader::Proxied(addr("1.2.3.4:5")), h.len())))
        );
        assert_eq!(parse(&h, 30), Err(ProxyError::TooLong(h.len())));
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(matches!(parse(&bad, MAX), Err(ProxyError::Malformed(_))));
        let mut bad = h.clone();
        bad[12] = 0x22;
        assert!(matches!(parse(&bad, MAX), Err(ProxyError::Malformed(_))));
        let mut short = encode_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        short[15] = 4;
        short.truncate(20);
        assert!(matches!(parse(&short, MAX), Err(ProxyError::Malformed(_))));
    }

    fn headers() -> impl Strategy<Value = (Vec<u8>, ProxyHeader)> {
        let v4 = (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p));
        let v6 = (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p));
        let a = prop_oneof![v4, v6];
        (a.clone(), a, 0..3u8).prop_map(|(s, d, kind)| match kind {
            0 => (
                encode_v1(s, if s.is_ipv4() == d.is_ipv4() { d } else { s }),
                ProxyHeader::Proxied(s),
            ),
            1 => {
                let d = if s.is_ipv4() == d.is_ipv4() { d } else { s };
                (encode_v2(s, d), ProxyHeader::Proxied(s))
            }
            _ => (encode_v2_local(), ProxyHeader::Local),
        })
    }

    proptest! {
        /// Any split of a valid header into a prefix says "need more" for every proper
        /// prefix and parses the whole, whatever follows it.
        #[test]
        fn every_prefix_needs_more((h, want) in headers(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            for cut in 0..h.len() {
                prop_assert_eq!(parse(&h[..cut], MAX), Ok(None));
            }
            let mut stream = h.clone();
            stream.extend_from_slice(&tail);
            prop_assert_eq!(parse(&stream, MAX), Ok(Some((want, h.len()))));
        }

        /// Arbitrary bytes never panic, and a header is never longer than its input or max.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), max in 16usize..400) {
            if let Ok(Some((_, len))) = parse(&bytes, max) {
                prop_assert!(len <= bytes.len());
                prop_assert!(len <= max.max(V1_MAX));
            }
        }
    }
}
