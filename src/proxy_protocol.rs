//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary): a load balancer that relays raw
//! TCP writes one header in front of the client's bytes, saying whom the connection is from.
//!
//! With `--proxy-protocol` the header is read from the bare socket before the TLS handshake,
//! exactly to its last byte, so that the client's ClientHello is still in the socket for rustls.
//! Nothing is allocated: the header is read into a fixed buffer (v2 TLVs, which can be longer,
//! are read through it and dropped).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest v1 header, CRLF included (the spec's bound: "PROXY TCP6" with two full-length IPv6
/// addresses and two 5-digit ports).
pub(crate) const V1_MAX_LEN: usize = 107;
/// Shortest valid header of either version: `PROXY UNKNOWN\r\n`. Reading this many bytes up
/// front never takes a byte past a valid header.
const MIN_LEN: usize = 15;
/// The 12 bytes that open every v2 header; chosen by the spec never to start valid HTTP or TLS.
pub(crate) const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport and the 16-bit length of what follows.
const V2_FIXED_LEN: usize = 16;
/// Most bytes a v2 header may take, fixed part and TLVs included. The length field allows
/// 64 KiB; balancers send a few hundred bytes at most, and a connection must not be able to make
/// us read (before any TLS) more than this.
pub(crate) const V2_MAX_LEN: usize = 4096;
/// v2 address blocks: two addresses, then two ports.
const V2_INET_LEN: usize = 4 + 4 + 2 + 2;
const V2_INET6_LEN: usize = 16 + 16 + 2 + 2;

/// What a valid header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// The balancer relays a TCP connection from `source` (the client) to `destination`.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// v2 `LOCAL`: the balancer's own connection (a health check); the socket's peer stands.
    Local,
    /// v1 `UNKNOWN` or v2 `PROXY` with `AF_UNSPEC`: relayed, but for no address the balancer
    /// could name; the socket's peer stands.
    Unknown,
}

impl Header {
    /// The address to treat as the client: the relayed source, or the socket's `peer`.
    pub(crate) fn client_addr(&self, peer: SocketAddr) -> SocketAddr {
        match self {
            Header::Proxied { source, .. } => *source,
            Header::Local | Header::Unknown => peer,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyHeaderError {
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed after {received} byte(s), before the PROXY header was complete")]
    Truncated { received: usize },
    #[error("no PROXY protocol header (the connection starts with neither `PROXY ` nor the v2 signature)")]
    BadSignature,
    #[error("v1 header: no CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("v1 header: {0}")]
    V1Malformed(&'static str),
    #[error("v1 header: unknown protocol (TCP4, TCP6 or UNKNOWN expected)")]
    V1UnknownProtocol,
    #[error("v1 header: the {field} address is not an {family} address")]
    V1BadAddress { field: &'static str, family: &'static str },
    #[error("v1 header: the {field} address is of the other family than {protocol}")]
    V1FamilyMismatch { field: &'static str, protocol: &'static str },
    #[error("v1 header: the {0} port is not a decimal number from 0 to 65535")]
    V1BadPort(&'static str),
    #[error("v2 header: version {0} (only 2 exists)")]
    V2BadVersion(u8),
    #[error("v2 header: unknown command {0:#x} (LOCAL or PROXY expected)")]
    V2BadCommand(u8),
    #[error("v2 header: undefined address family/transport byte {0:#04x}")]
    V2BadFamily(u8),
    #[error("v2 header: address family/transport {0:#04x} is not TCP over IPv4 or IPv6")]
    V2UnsupportedFamily(u8),
    #[error("v2 header: a {len}-byte address block is too short for {family}")]
    V2ShortAddresses { family: &'static str, len: usize },
    #[error("v2 header: {0} bytes long, more than the {V2_MAX_LEN} accepted")]
    V2TooLong(usize),
}

/// Reads one PROXY header (v1 or v2) from the start of `tcp` and no byte more.
///
/// Not bounded in time here: the caller puts it under the handshake deadline.
pub(crate) async fn read_header(tcp: &mut TcpStream) -> Result<Header, ProxyHeaderError> {
    // Big enough for a whole v1 line, and for v2's fixed part and addresses (52 bytes).
    let mut buf = [0u8; V1_MAX_LEN];
    fill(tcp, &mut buf[..MIN_LEN], 0).await?;
    if buf.starts_with(&V2_SIGNATURE) {
        fill(tcp, &mut buf[MIN_LEN..V2_FIXED_LEN], MIN_LEN).await?;
        let prelude = V2Prelude::parse(&buf[..V2_FIXED_LEN])?;
        // Only the address block is kept; TLVs after it are read through the rest of `buf`.
        let (keep, rest) = buf[V2_FIXED_LEN..].split_at_mut(prelude.address_len());
        fill(tcp, keep, V2_FIXED_LEN).await?;
        let mut skipped = 0;
        while skipped < prelude.len - keep.len() {
            let chunk = (prelude.len - keep.len() - skipped).min(rest.len());
            fill(tcp, &mut rest[..chunk], V2_FIXED_LEN + keep.len() + skipped).await?;
            skipped += chunk;
        }
        prelude.addresses(keep)
    } else if buf.starts_with(b"PROXY ") {
        let mut filled = MIN_LEN;
        let end = loop {
            if let Some(lf) = buf[..filled].iter().position(|&b| b == b'\n') {
                break lf + 1;
            }
            if filled == V1_MAX_LEN {
                return Err(ProxyHeaderError::V1TooLong);
            }
            // Peek to find where the line ends without taking the bytes after it. What is
            // peeked before the LF is header either way, so it is consumed; the next peek then
            // waits for more data instead of returning the same bytes again.
            let n = tcp.peek(&mut buf[filled..]).await?;
            if n == 0 {
                return Err(ProxyHeaderError::Truncated { received: filled });
            }
            let take = buf[filled..filled + n].iter().position(|&b| b == b'\n').map_or(n, |lf| lf + 1);
            fill(tcp, &mut buf[filled..filled + take], filled).await?;
            filled += take;
        };
        parse_v1(&buf[..end])
    } else {
        Err(ProxyHeaderError::BadSignature)
    }
}

/// `read_exact`, with an early close reported as a truncated header (`before` bytes were read
/// already).
async fn fill(tcp: &mut TcpStream, buf: &mut [u8], before: usize) -> Result<(), ProxyHeaderError> {
    let mut got = 0;
    while got < buf.len() {
        match tcp.read(&mut buf[got..]).await? {
            0 => return Err(ProxyHeaderError::Truncated { received: before + got }),
            n => got += n,
        }
    }
    Ok(())
}

/// Parses a whole v1 line, `PROXY ` to CRLF included.
pub(crate) fn parse_v1(line: &[u8]) -> Result<Header, ProxyHeaderError> {
    use ProxyHeaderError::*;
    if line.len() > V1_MAX_LEN {
        return Err(V1TooLong);
    }
    let rest = line.strip_prefix(b"PROXY ").ok_or(BadSignature)?;
    let rest = rest.strip_suffix(b"\r\n").ok_or(V1Malformed("the line does not end with CRLF"))?;
    if rest.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Err(V1Malformed("a byte that is not printable ASCII"));
    }
    // Printable ASCII is UTF-8; the fallback is never taken.
    let text = std::str::from_utf8(rest).map_err(|_| V1Malformed("a byte that is not printable ASCII"))?;
    let mut fields = text.split(' ');
    let (protocol, v6) = match fields.next() {
        // The spec: with UNKNOWN, whatever follows up to the CRLF is ignored.
        Some("UNKNOWN") => return Ok(Header::Unknown),
        Some("TCP4") => ("TCP4", false),
        Some("TCP6") => ("TCP6", true),
        _ => return Err(V1UnknownProtocol),
    };
    // Exactly one space between fields: a doubled space shows up as an empty field, refused
    // by the address and port parsers.
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(V1Malformed("not exactly: protocol, source, destination, source port, destination port"));
    };
    let source = SocketAddr::new(v1_ip(src, protocol, v6, "source")?, v1_port(sport, "source")?);
    let destination = SocketAddr::new(v1_ip(dst, protocol, v6, "destination")?, v1_port(dport, "destination")?);
    Ok(Header::Proxied { source, destination })
}

fn v1_ip(text: &str, protocol: &'static str, v6: bool, field: &'static str) -> Result<IpAddr, ProxyHeaderError> {
    let (wanted, other) = match v6 {
        false => (text.parse::<Ipv4Addr>().ok().map(IpAddr::V4), text.parse::<Ipv6Addr>().is_ok()),
        true => (text.parse::<Ipv6Addr>().ok().map(IpAddr::V6), text.parse::<Ipv4Addr>().is_ok()),
    };
    match (wanted, other) {
        (Some(ip), _) => Ok(ip),
        (None, true) => Err(ProxyHeaderError::V1FamilyMismatch { field, protocol }),
        (None, false) => Err(ProxyHeaderError::V1BadAddress { field, family: if v6 { "IPv6" } else { "IPv4" } }),
    }
}

/// Decimal digits only (`u16::from_str` would take a `+`), no leading zero, at most 65535.
fn v1_port(text: &str, field: &'static str) -> Result<u16, ProxyHeaderError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    let canonical = text == "0" || !text.starts_with('0');
    match (digits && canonical).then(|| text.parse::<u16>().ok()).flatten() {
        Some(port) => Ok(port),
        None => Err(ProxyHeaderError::V1BadPort(field)),
    }
}

/// The fixed 16 bytes of a v2 header, checked.
#[derive(Debug, Clone, Copy)]
struct V2Prelude {
    proxy: bool,
    family: u8,
    /// Bytes after the fixed part: addresses, then TLVs.
    len: usize,
}

const AF_UNSPEC: u8 = 0x00;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// UDP over IPv4/IPv6, and AF_UNIX stream/datagram: defined, but not what a TLS listener gets.
const OTHER_DEFINED_FAMILIES: [u8; 4] = [0x12, 0x22, 0x31, 0x32];

impl V2Prelude {
    fn parse(fixed: &[u8]) -> Result<V2Prelude, ProxyHeaderError> {
        use ProxyHeaderError::*;
        let (Some(signature), Some(&version_command), Some(&family), Some(len)) =
            (fixed.get(..12), fixed.get(12), fixed.get(13), fixed.get(14..16))
        else {
            return Err(Truncated { received: fixed.len() });
        };
        if signature != V2_SIGNATURE {
            return Err(BadSignature);
        }
        if version_command >> 4 != 2 {
            return Err(V2BadVersion(version_command >> 4));
        }
        let proxy = match version_command & 0x0f {
            0x0 => false,
            0x1 => true,
            other => return Err(V2BadCommand(other)),
        };
        // The spec asks receivers to drop a connection with an undefined family byte, also
        // under LOCAL (where the addresses themselves are ignored).
        if family != AF_UNSPEC && family != TCP4 && family != TCP6 && !OTHER_DEFINED_FAMILIES.contains(&family) {
            return Err(V2BadFamily(family));
        }
        if proxy && OTHER_DEFINED_FAMILIES.contains(&family) {
            return Err(V2UnsupportedFamily(family));
        }
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if V2_FIXED_LEN + len > V2_MAX_LEN {
            return Err(V2TooLong(V2_FIXED_LEN + len));
        }
        let prelude = V2Prelude { proxy, family, len };
        if len < prelude.address_len() {
            let family = if family == TCP4 { "TCP over IPv4" } else { "TCP over IPv6" };
            return Err(V2ShortAddresses { family, len });
        }
        Ok(prelude)
    }

    /// The address block to parse; 0 when the addresses are ignored (LOCAL, AF_UNSPEC).
    fn address_len(&self) -> usize {
        match (self.proxy, self.family) {
            (true, TCP4) => V2_INET_LEN,
            (true, TCP6) => V2_INET6_LEN,
            _ => 0,
        }
    }

    /// `block` is the address block, `address_len()` bytes.
    fn addresses(&self, block: &[u8]) -> Result<Header, ProxyHeaderError> {
        if !self.proxy {
            return Ok(Header::Local);
        }
        let short = |family| ProxyHeaderError::V2ShortAddresses { family, len: block.len() };
        match self.family {
            TCP4 => {
                let b: &[u8; V2_INET_LEN] = block.try_into().map_err(|_| short("TCP over IPv4"))?;
                let source =
                    SocketAddr::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(), u16::from_be_bytes([b[8], b[9]]));
                let destination =
                    SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(), u16::from_be_bytes([b[10], b[11]]));
                Ok(Header::Proxied { source, destination })
            }
            TCP6 => {
                let b: &[u8; V2_INET6_LEN] = block.try_into().map_err(|_| short("TCP over IPv6"))?;
                let ip = |at: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&b[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                let source = SocketAddr::new(ip(0), u16::from_be_bytes([b[32], b[33]]));
                let destination = SocketAddr::new(ip(16), u16::from_be_bytes([b[34], b[35]]));
                Ok(Header::Proxied { source, destination })
            }
            // AF_UNSPEC under PROXY, as v1's UNKNOWN.
            _ => Ok(Header::Unknown),
        }
    }
}

/// Parses a whole v2 header held in memory (fixed part, addresses, TLVs) and returns it with
/// the number of bytes it takes; what follows in `bytes` is not looked at.
pub(crate) fn parse_v2(bytes: &[u8]) -> Result<(Header, usize), ProxyHeaderError> {
    let prelude =
        V2Prelude::parse(bytes.get(..V2_FIXED_LEN).ok_or(ProxyHeaderError::Truncated { received: bytes.len() })?)?;
    let total = V2_FIXED_LEN + prelude.len;
    if bytes.len() < total {
        return Err(ProxyHeaderError::Truncated { received: bytes.len() });
    }
    let block = &bytes[V2_FIXED_LEN..V2_FIXED_LEN + prelude.address_len()];
    Ok((prelude.addresses(block)?, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A v2 header: `command` 0 LOCAL / 1 PROXY, the family byte, the address block, TLVs.
    fn v2(version_command: u8, family: u8, block: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&((block.len() + tlvs.len()) as u16).to_be_bytes());
        out.extend_from_slice(block);
        out.extend_from_slice(tlvs);
        out
    }

    fn inet4_block() -> Vec<u8> {
        let mut b = vec![203, 0, 113, 7, 127, 0, 0, 1];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    fn inet6_block() -> Vec<u8> {
        let mut b = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&8443u16.to_be_bytes());
        b
    }

    /// PP2_TYPE_AUTHORITY ("example.com") and PP2_TYPE_NOOP, as balancers send them.
    const TLVS: &[u8] = b"\x02\x00\x0bexample.com\x04\x00\x03abc";

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n").unwrap(),
            Header::Proxied { source: addr("203.0.113.7:51234"), destination: addr("127.0.0.1:443") }
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n").unwrap(),
            Header::Proxied { source: addr("[2001:db8::1]:0"), destination: addr("[::1]:65535") }
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), Header::Unknown);
        // With UNKNOWN the rest of the line is ignored, as the spec says.
        assert_eq!(parse_v1(b"PROXY UNKNOWN ffff:f...f:ffff 1 2 3\r\n").unwrap(), Header::Unknown);
        let longest_tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert!(matches!(parse_v1(longest_tcp6), Ok(Header::Proxied { .. })));
        // The spec's worst case, 107 bytes, is UNKNOWN followed by that.
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX_LEN);
        assert_eq!(parse_v1(longest).unwrap(), Header::Unknown);
        assert_eq!(Header::Unknown.client_addr(addr("10.0.0.1:5")), addr("10.0.0.1:5"));
    }

    #[test]
    fn v1_malformed_lines_are_refused() {
        use ProxyHeaderError::*;
        type Expect = fn(&ProxyHeaderError) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"PROXI TCP4 1.2.3.4 5.6.7.8 1 2\r\n", |e| matches!(e, BadSignature)),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", |e| matches!(e, V1Malformed(_) | V1BadAddress { .. })),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", |e| matches!(e, V1Malformed(_))),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", |e| matches!(e, V1UnknownProtocol)),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", |e| matches!(e, V1UnknownProtocol)),
            (b"PROXY \r\n", |e| matches!(e, V1UnknownProtocol)),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", |e| matches!(e, V1BadAddress { field: "source", .. })),
            (b"PROXY TCP4 1.2.3.4 01.6.7.8 1 2\r\n", |e| matches!(e, V1BadAddress { field: "destination", .. })),
            (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", |e| matches!(e, V1BadAddress { .. })),
            (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", |e| matches!(e, V1FamilyMismatch { field: "source", .. })),
            (b"PROXY TCP6 2001:db8::1 5.6.7.8 1 2\r\n", |e| matches!(e, V1FamilyMismatch { field: "destination", .. })),
            (b"PROXY TCP6 [2001:db8::1] ::1 1 2\r\n", |e| matches!(e, V1BadAddress { .. })),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", |e| matches!(e, V1BadPort("source"))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", |e| matches!(e, V1BadPort("destination"))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", |e| matches!(e, V1BadPort("source"))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", |e| matches!(e, V1BadPort("source"))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", |e| matches!(e, V1BadPort("destination"))),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", |e| matches!(e, V1Malformed(_))),
        ];
        for (line, expected) in cases {
            let err = parse_v1(line).expect_err(&String::from_utf8_lossy(line));
            assert!(expected(&err), "{:?}: unexpected {err:?}", String::from_utf8_lossy(line));
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert!(matches!(parse_v1(&long), Err(V1TooLong)));
    }

    #[test]
    fn v2_proxy_v4_and_v6_with_tlvs_and_local() {
        let header = v2(0x21, TCP4, &inet4_block(), &[]);
        assert_eq!(
            parse_v2(&header).unwrap(),
            (Header::Proxied { source: addr("203.0.113.7:51234"), destination: addr("127.0.0.1:443") }, 28)
        );
        let mut header = v2(0x21, TCP6, &inet6_block(), TLVS);
        let total = header.len();
        header.extend_from_slice(b"\x16\x03\x01 the ClientHello");
        assert_eq!(
            parse_v2(&header).unwrap(),
            (Header::Proxied { source: addr("[2001:db8::1]:40000"), destination: addr("[::1]:8443") }, total)
        );
        // LOCAL: any defined family, addresses ignored, even when absent.
        assert_eq!(parse_v2(&v2(0x20, AF_UNSPEC, &[], &[])).unwrap(), (Header::Local, 16));
        assert_eq!(parse_v2(&v2(0x20, TCP4, &inet4_block(), TLVS)).unwrap().0, Header::Local);
        assert_eq!(parse_v2(&v2(0x20, 0x31, &[0; 216], &[])).unwrap().0, Header::Local);
        // PROXY over AF_UNSPEC: as v1's UNKNOWN.
        assert_eq!(parse_v2(&v2(0x21, AF_UNSPEC, &[], TLVS)).unwrap().0, Header::Unknown);
    }

    #[test]
    fn v2_malformed_headers_are_refused() {
        use ProxyHeaderError::*;
        let mut bad_signature = v2(0x21, TCP4, &inet4_block(), &[]);
        bad_signature[11] = b'X';
        assert!(matches!(parse_v2(&bad_signature), Err(BadSignature)));
        assert!(matches!(parse_v2(&v2(0x11, TCP4, &inet4_block(), &[])), Err(V2BadVersion(1))));
        assert!(matches!(parse_v2(&v2(0x31, TCP4, &inet4_block(), &[])), Err(V2BadVersion(3))));
        assert!(matches!(parse_v2(&v2(0x22, TCP4, &inet4_block(), &[])), Err(V2BadCommand(2))));
        assert!(matches!(parse_v2(&v2(0x21, 0x13, &inet4_block(), &[])), Err(V2BadFamily(0x13))));
        assert!(matches!(parse_v2(&v2(0x20, 0x41, &[], &[])), Err(V2BadFamily(0x41))));
        for other in OTHER_DEFINED_FAMILIES {
            assert!(matches!(parse_v2(&v2(0x21, other, &[0; 216], &[])), Err(V2UnsupportedFamily(f)) if f == other));
        }
        // An address block shorter than the family needs (a TCP6 header with IPv4 addresses).
        assert!(matches!(parse_v2(&v2(0x21, TCP6, &inet4_block(), &[])), Err(V2ShortAddresses { len: 12, .. })));
        assert!(matches!(parse_v2(&v2(0x21, TCP4, &[1, 2, 3], &[])), Err(V2ShortAddresses { len: 3, .. })));
        // Truncated anywhere: in the fixed part, in the addresses, in the TLVs.
        let whole = v2(0x21, TCP6, &inet6_block(), TLVS);
        for cut in [0, 5, 15, 16, 30, whole.len() - 1] {
            assert!(matches!(parse_v2(&whole[..cut]), Err(Truncated { .. })), "cut at {cut}");
        }
        // Longer than the cap, whatever its TLVs.
        let mut huge = v2(0x21, TCP4, &inet4_block(), &[]);
        huge[14..16].copy_from_slice(&(V2_MAX_LEN as u16 - 15).to_be_bytes());
        assert!(matches!(parse_v2(&huge), Err(V2TooLong(n)) if n == V2_MAX_LEN + 1));
    }

    /// A loopback pair: what the test writes on `client` is read by `read_header` on `server`.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Writes `pieces` (with pauses, so they arrive apart), then "NEXT", and reads the header;
    /// returns it with what is left in the socket, which must be exactly "NEXT".
    async fn read_written(pieces: &[&[u8]]) -> (Result<Header, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                client.write_all(&piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            client.write_all(b"NEXT").await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let header = read_header(&mut server).await;
        let mut rest = Vec::new();
        if header.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        drop(writer.await.unwrap());
        (header, rest)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_leaves_what_follows() {
        let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n";
        let v2_tlvs = v2(0x21, TCP6, &inet6_block(), &[TLVS; 40].concat());
        let v2_local = v2(0x20, AF_UNSPEC, &[], &[]);
        let cases: Vec<(Vec<&[u8]>, Header)> = vec![
            (vec![v1], Header::Proxied { source: addr("203.0.113.7:51234"), destination: addr("127.0.0.1:443") }),
            // Arriving in pieces, split inside the first 15 bytes, between CR and LF.
            (vec![&v1[..3], &v1[3..20], &v1[20..v1.len() - 1], &v1[v1.len() - 1..]], parse_v1(v1).unwrap()),
            (vec![b"PROXY UNKNOWN\r\n"], Header::Unknown),
            (vec![&v2_tlvs], parse_v2(&v2_tlvs).unwrap().0),
            (vec![&v2_tlvs[..14], &v2_tlvs[14..40], &v2_tlvs[40..]], parse_v2(&v2_tlvs).unwrap().0),
            (vec![&v2_local], Header::Local),
        ];
        for (pieces, expected) in cases {
            let (header, rest) = read_written(&pieces).await;
            assert_eq!(header.unwrap(), expected);
            assert_eq!(rest, b"NEXT", "the bytes after the header stay in the socket");
        }
    }

    #[tokio::test]
    async fn reading_refuses_garbage_and_reports_a_close_mid_header() {
        use ProxyHeaderError::*;
        let (header, _) = read_written(&[b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 a ClientHello"]).await;
        assert!(matches!(header, Err(BadSignature)), "{header:?}");
        let (header, _) = read_written(&[&[b'A'; 200]]).await;
        assert!(matches!(header, Err(BadSignature)), "{header:?}");
        let (header, _) = read_written(&[b"PROXY TCP4 ", &[b'1'; 150]]).await;
        assert!(matches!(header, Err(V1TooLong)), "{header:?}");
        let (header, _) = read_written(&[b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"]).await;
        assert!(matches!(header, Err(V1Malformed(_))), "{header:?}");

        // The peer closes part-way: v1 before the CRLF, v2 in the fixed part and in the TLVs.
        let whole = v2(0x21, TCP4, &inet4_block(), TLVS);
        for partial in [&b"PROXY TCP4 1.2.3.4"[..], &whole[..10], &whole[..whole.len() - 2]] {
            let (mut client, mut server) = pair().await;
            client.write_all(partial).await.unwrap();
            client.shutdown().await.unwrap();
            let header = read_header(&mut server).await;
            assert!(matches!(header, Err(Truncated { received }) if received == partial.len()), "{header:?}");
        }
    }
}
