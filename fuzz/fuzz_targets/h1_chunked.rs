//! A chunked response body as the proxy decodes it (`proxy::h1::decode_chunked`).
//!
//! Input: a byte that seeds how the body is cut into reads, then the body and whatever the app
//! sends after it. Invariants:
//! - cut into reads in any way, the body decodes to the same data, trailers, end and the same
//!   bytes left after it (or is refused in every cut);
//! - the decoded data is never longer than the bytes consumed, nor the trailers' either;
//! - the decoder needs nothing past the body's end: the consumed bytes alone decode to the end;
//! - what was decoded, encoded again as the proxy encodes chunked bodies (`chunk_header`,
//!   `chunked_end`), decodes to the same data and trailers.
#![no_main]

use bytes::BytesMut;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{chunk_header, chunked_end, ChunkedDecoder, Decoded};
use sidecar_fuzz::cuts;

/// Small, so that inputs of a few KiB reach it.
const MAX_TRAILERS: usize = 512;

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The body ended: its data, its trailers, and how many bytes it took.
    Ended {
        data: Vec<u8>,
        trailers: Option<HeaderMap>,
        consumed: usize,
    },
    /// The input ended first, after this much data.
    Incomplete(Vec<u8>),
    Refused,
}

fn decode(input: &[u8], reads: &[usize], max_trailers: usize) -> Outcome {
    let mut decoder = ChunkedDecoder::default();
    let (mut buf, mut fed) = (BytesMut::new(), 0);
    let (mut data, mut trailers) = (Vec::new(), None);
    for &len in reads {
        buf.extend_from_slice(&input[fed..fed + len]);
        fed += len;
        loop {
            match decoder.decode(&mut buf, max_trailers) {
                Ok(Decoded::Data(bytes)) => {
                    assert!(!bytes.is_empty(), "an empty data frame");
                    data.extend_from_slice(&bytes);
                }
                Ok(Decoded::Trailers(map)) => trailers = Some(map),
                Ok(Decoded::End) => return Outcome::Ended { data, trailers, consumed: fed - buf.len() },
                Ok(Decoded::More) => break,
                Err(_) => return Outcome::Refused,
            }
            let consumed = fed - buf.len();
            assert!(data.len() <= consumed, "{} bytes decoded from {consumed}", data.len());
        }
    }
    Outcome::Incomplete(data)
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, input)) = input.split_first() else { return };
    let [whole, bytes, pieces] = cuts(input.len(), seed);
    let outcome = decode(input, &whole, MAX_TRAILERS);
    assert_eq!(decode(input, &bytes, MAX_TRAILERS), outcome, "decoded a byte at a time");
    assert_eq!(decode(input, &pieces, MAX_TRAILERS), outcome, "decoded in pieces");

    let Outcome::Ended { data, trailers, consumed } = outcome else { return };
    let trailer_bytes: usize = trailers.iter().flatten().map(|(n, v)| n.as_str().len() + v.len()).sum();
    assert!(data.len() + trailer_bytes <= consumed, "more decoded than consumed");
    assert_eq!(
        decode(&input[..consumed], &[consumed], MAX_TRAILERS),
        Outcome::Ended { data: data.clone(), trailers: trailers.clone(), consumed },
        "the body needs bytes past its end"
    );

    let mut again = Vec::new();
    if !data.is_empty() {
        again.extend_from_slice(&chunk_header(data.len()));
        again.extend_from_slice(&data);
        again.extend_from_slice(b"\r\n");
    }
    // Trailers the proxy writes are the ones it read: an empty set is written as none.
    let trailers = trailers.filter(|map| !map.is_empty());
    again.extend_from_slice(&chunked_end(trailers.as_ref()));
    // `name: value` may be longer than the field as the app wrote it: no limit here.
    match decode(&again, &[again.len()], usize::MAX) {
        Outcome::Ended { data: data2, trailers: trailers2, consumed } => {
            assert_eq!(data2, data, "re-encoded data decodes differently");
            assert_eq!(trailers2.filter(|m| !m.is_empty()), trailers, "re-encoded trailers decode differently");
            assert_eq!(consumed, again.len());
        }
        other => panic!("the re-encoded body does not decode: {other:?} from {again:?}"),
    }
});
