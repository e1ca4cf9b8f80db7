//! The PROXY protocol header a load balancer puts before the TLS bytes
//! (`proxy_protocol::parse_v1`, `parse_v2`).
//!
//! Input: the first bytes of a connection. v1 is given the line up to its first LF, as the
//! socket reader cuts it; v2 the whole input. Invariants:
//! - a parsed header, written again (v1 text, v2 binary), parses to the same addresses, and a
//!   v1 TCP4 line is written back byte for byte (IPv4 text has one form);
//! - v1: a parsed line fits in 107 bytes and ends in its only CRLF; UNKNOWN says nothing;
//! - v2: the length returned is the header's own (16 + its length field, within the cap), the
//!   bytes after it are not looked at, and one byte fewer is reported as truncated.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{proxy_v1, proxy_v2, ProxyHeader, PROXY_V1_MAX_LEN, PROXY_V2_MAX_LEN, PROXY_V2_SIGNATURE};

fn v1_line(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {protocol} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
        .into_bytes()
}

fn v2_header(header: &ProxyHeader) -> Vec<u8> {
    let mut out = PROXY_V2_SIGNATURE.to_vec();
    let mut block = Vec::new();
    let (command, family) = match header {
        ProxyHeader::Local => (0x20, 0x00),
        ProxyHeader::Unknown => (0x21, 0x00),
        ProxyHeader::Proxied { source, destination } => {
            let family = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    block.extend_from_slice(&s.ip().octets());
                    block.extend_from_slice(&d.ip().octets());
                    0x11
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    block.extend_from_slice(&s.ip().octets());
                    block.extend_from_slice(&d.ip().octets());
                    0x21
                }
                _ => panic!("a header with addresses of two families: {header:?}"),
            };
            block.extend_from_slice(&source.port().to_be_bytes());
            block.extend_from_slice(&destination.port().to_be_bytes());
            (0x21, family)
        }
    };
    out.push(command);
    out.push(family);
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

fuzz_target!(|data: &[u8]| {
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(lf) => &data[..=lf],
        None => data,
    };
    if let Ok(header) = proxy_v1(line) {
        assert!(line.len() <= PROXY_V1_MAX_LEN, "a v1 line of {} bytes", line.len());
        assert!(line.ends_with(b"\r\n"), "a v1 line without CRLF");
        assert!(!line[..line.len() - 2].iter().any(|&b| b == b'\r' || b == b'\n'), "CR or LF inside a v1 line");
        match header {
            ProxyHeader::Local => panic!("v1 has no LOCAL"),
            ProxyHeader::Unknown => assert!(line.starts_with(b"PROXY UNKNOWN")),
            ProxyHeader::Proxied { source, destination } => {
                assert_eq!(source.is_ipv4(), destination.is_ipv4(), "two families in one v1 line");
                assert_eq!(line.starts_with(b"PROXY TCP4 "), source.is_ipv4(), "the protocol is not the family");
                let again = v1_line(source, destination);
                assert_eq!(proxy_v1(&again), Ok(header), "written again, the line parses otherwise");
                if source.is_ipv4() {
                    assert_eq!(again, line, "a TCP4 line is not written back as it came");
                }
            }
        }
        // The same header in v2.
        assert_eq!(proxy_v2(&v2_header(&header)).map(|(h, _)| h), Ok(header), "v1 and v2 disagree");
    }

    if let Ok((header, len)) = proxy_v2(data) {
        assert!((16..=PROXY_V2_MAX_LEN).contains(&len) && len <= data.len(), "length {len} of {}", data.len());
        assert_eq!(len, 16 + usize::from(u16::from_be_bytes([data[14], data[15]])), "not the header's own length");
        assert_eq!(proxy_v2(&data[..len]), Ok((header, len)), "the bytes after the header count");
        let short = proxy_v2(&data[..len - 1]).expect_err("a header one byte short parses");
        assert!(short.truncated, "one byte short is not reported as truncated: {short}");
        let again = v2_header(&header);
        assert_eq!(proxy_v2(&again), Ok((header, again.len())), "written again, the header parses otherwise");
        if let ProxyHeader::Proxied { source, destination } = header {
            assert_eq!(proxy_v1(&v1_line(source, destination)), Ok(header), "v2 and v1 disagree");
        }
    }
});
