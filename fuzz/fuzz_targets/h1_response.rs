//! The app's HTTP/1.1 responses as the proxy reads them off one upstream connection
//! (`proxy::h1::parse_response`, then the body by the framing it declares, chunked bodies
//! through `decode_chunked`), response after response while the connection is kept alive.
//!
//! Input: a flags byte (bit 0: the request was HEAD; the rest seeds how the stream is cut into
//! reads), then the bytes the app sends. Invariants:
//! - cut into reads in any way, the stream gives the same heads, bodies and errors;
//! - a head declares one framing, the one its fields say (RFC 9112 §6.3): both
//!   Transfer-Encoding and Content-Length, or Content-Length values that disagree, are refused;
//! - a kept-alive connection has a delimited body; HTTP/1.0 needs `keep-alive`, `close` ends it;
//! - the forwarded fields are exactly the head's end-to-end fields, values as sent: the same as
//!   a `HeaderMap` built afresh from the raw head (whatever the reader remembered from earlier
//!   heads), each value a valid `HeaderValue` (the parser builds them unchecked).
#![no_main]

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{ChunkedDecoder, Decoded, Field, Framing, ResponseHead, ResponseReader};
use sidecar_fuzz::cuts;

/// Small limits, so that inputs of a few KiB reach them.
const MAX_HEAD: usize = 1024;
const MAX_TRAILERS: usize = 512;

#[derive(Debug, PartialEq)]
enum Event {
    /// A head, with the stream offsets of the bytes it took (interim heads included).
    Head(ResponseHead, usize, usize),
    Body(Vec<u8>),
    Trailers(Vec<Field>),
    /// Refused: the connection is closed. The message may differ with the cut (a head over the
    /// limit is "too large" when it arrives in pieces, malformed when whole).
    Refused,
    /// The stream ended inside a head or a delimited body.
    Incomplete,
}

enum State {
    Head,
    Length(u64, Vec<u8>),
    Chunked(ChunkedDecoder, Vec<u8>),
    UntilClose(Vec<u8>),
    /// The connection is not read further (closed, switched, or refused).
    Stop,
}

fn read(stream: &[u8], method: &Method, reads: &[usize]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut reader = ResponseReader::default();
    let mut buf = BytesMut::new();
    let mut state = State::Head;
    let (mut fed, mut keep_alive) = (0, true);
    // Where the head being read starts: interim heads before it may be consumed in earlier reads.
    let mut head_start = 0;
    for &len in reads {
        buf.extend_from_slice(&stream[fed..fed + len]);
        fed += len;
        loop {
            match &mut state {
                State::Head => match reader.parse(&mut buf, method, MAX_HEAD) {
                    Ok(None) => break,
                    Err(_) => {
                        events.push(Event::Refused);
                        state = State::Stop;
                    }
                    Ok(Some(head)) => {
                        keep_alive = head.keep_alive && head.status != 101;
                        state = match head.framing {
                            _ if head.status == 101 => State::Stop,
                            Framing::Empty if keep_alive => State::Head,
                            Framing::Empty => State::Stop,
                            Framing::Length(n) => State::Length(n, Vec::new()),
                            Framing::Chunked => State::Chunked(ChunkedDecoder::default(), Vec::new()),
                            Framing::UntilClose => State::UntilClose(Vec::new()),
                        };
                        let end = fed - buf.len();
                        events.push(Event::Head(head, head_start, end));
                        head_start = end;
                    }
                },
                State::Length(left, body) => {
                    let n = (*left).min(buf.len() as u64) as usize;
                    body.extend_from_slice(&buf.split_to(n));
                    *left -= n as u64;
                    if *left > 0 {
                        break;
                    }
                    events.push(Event::Body(std::mem::take(body)));
                    state = if keep_alive { State::Head } else { State::Stop };
                    head_start = fed - buf.len();
                }
                State::Chunked(decoder, body) => match decoder.decode(&mut buf, MAX_TRAILERS) {
                    Ok(Decoded::More) => break,
                    Ok(Decoded::Data(data)) => body.extend_from_slice(&data),
                    Ok(Decoded::Trailers(trailers)) => {
                        events.push(Event::Body(std::mem::take(body)));
                        events.push(Event::Trailers(fields(&trailers)));
                        state = if keep_alive { State::Head } else { State::Stop };
                        head_start = fed - buf.len();
                    }
                    Ok(Decoded::End) => {
                        events.push(Event::Body(std::mem::take(body)));
                        state = if keep_alive { State::Head } else { State::Stop };
                        head_start = fed - buf.len();
                    }
                    Err(_) => {
                        events.push(Event::Refused);
                        state = State::Stop;
                    }
                },
                State::UntilClose(body) => {
                    body.extend_from_slice(&buf.split());
                    break;
                }
                State::Stop => break,
            }
        }
        if matches!(state, State::Stop) {
            break;
        }
    }
    match state {
        State::UntilClose(body) => events.push(Event::Body(body)),
        State::Head if !buf.is_empty() => events.push(Event::Incomplete),
        State::Length(..) | State::Chunked(..) => events.push(Event::Incomplete),
        _ => {}
    }
    events
}

fn fields(map: &HeaderMap) -> Vec<Field> {
    map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect()
}

/// The items of a comma-separated list field, trimmed.
fn items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// A Content-Length value: digits only.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn is_hop_by_hop(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(lower.as_str(), "connection" | "te" | "trailer" | "upgrade" | "keep-alive" | "transfer-encoding")
        || lower.starts_with("proxy-")
}

/// Checks a parsed head against the raw bytes it was read from (interim heads first).
fn check_head(head: &ResponseHead, raw: &[u8], method: &Method) {
    let mut raw = raw;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 100];
        let mut response = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(len)) = response.parse(raw) else {
            panic!("the bytes of a parsed head do not parse: {raw:?}");
        };
        let code = response.code.expect("a complete head has a status");
        if (100..200).contains(&code) && code != 101 {
            raw = &raw[len..];
            continue;
        }
        assert_eq!(len, raw.len(), "a head took bytes past its end");
        assert_eq!(head.status, code);

        let headers: &[httparse::Header<'_>] = response.headers;
        let named = |name: &'static str| headers.iter().filter(move |f| f.name.eq_ignore_ascii_case(name));
        let lengths: Vec<&[u8]> = named("content-length").flat_map(|f| items(f.value)).collect();
        let codings: Vec<&[u8]> = named("transfer-encoding").flat_map(|f| items(f.value)).collect();
        let tokens: Vec<&[u8]> = named("connection").flat_map(|f| items(f.value)).collect();
        let token = |t: &[u8]| tokens.iter().any(|have| have.eq_ignore_ascii_case(t));
        let no_body = *method == Method::HEAD || (100..200).contains(&code) || code == 204 || code == 304;
        let has_te = named("transfer-encoding").next().is_some();
        match head.framing {
            Framing::Empty => assert!(
                no_body || (!has_te && !lengths.is_empty() && lengths.iter().all(|l| l.iter().all(|&d| d == b'0'))),
                "an empty body that the head does not declare"
            ),
            Framing::Length(n) => {
                assert!(!no_body && !has_te, "a length where the head declares no body or is chunked");
                assert!(lengths.iter().all(|l| decimal(l) == Some(n)), "Length({n}) but the head says {lengths:?}");
            }
            Framing::Chunked => {
                assert!(!no_body && lengths.is_empty(), "chunked with a Content-Length");
                // Empty list elements do not count (RFC 9110 §5.6.1): `chunked,` ends in chunked.
                let last = codings.iter().rev().find(|c| !c.is_empty());
                assert!(
                    last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
                    "chunked, but chunked is not the last coding: {codings:?}"
                );
            }
            Framing::UntilClose => {
                assert!(!no_body && lengths.is_empty(), "read until close with a Content-Length");
                assert!(!head.keep_alive, "a body read until close on a kept-alive connection");
                // Empty list elements do not count (RFC 9110 §5.6.1): `chunked,` ends in chunked.
                let last = codings.iter().rev().find(|c| !c.is_empty());
                assert!(
                    !last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
                    "a chunked body read until close: {codings:?}"
                );
            }
        }
        let http10 = response.version == Some(0);
        if token(b"close") || (http10 && !token(b"keep-alive")) {
            assert!(!head.keep_alive, "keep-alive against the Connection field or the version");
        }

        // The forwarded fields, built afresh from the raw head.
        let switching = code == 101;
        let mut expected = HeaderMap::new();
        for field in headers {
            let by_connection = tokens.iter().any(|t| {
                !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                    && t.eq_ignore_ascii_case(field.name.as_bytes())
            });
            if !switching && (is_hop_by_hop(field.name) || by_connection) {
                continue;
            }
            let name = HeaderName::from_bytes(field.name.as_bytes()).expect("a forwarded name is valid");
            let value = HeaderValue::from_bytes(field.value).expect("httparse admits only HeaderValue bytes");
            expected.append(name, value);
        }
        assert_eq!(head.fields, fields(&expected), "the forwarded fields are not the head's own");
        return;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else { return };
    let method = if flags & 1 == 1 { Method::HEAD } else { Method::GET };
    let [whole, bytes, pieces] = cuts(stream.len(), flags >> 1);
    let events = read(stream, &method, &whole);
    for event in &events {
        if let Event::Head(head, from, to) = event {
            check_head(head, &stream[*from..*to], &method);
        }
    }
    assert_eq!(read(stream, &method, &bytes), events, "read a byte at a time");
    assert_eq!(read(stream, &method, &pieces), events, "read in pieces");
});
