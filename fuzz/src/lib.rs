//! What the fuzz targets share: ways to cut a byte stream into reads, replies written as raw
//! HTTP, and a scratch directory for the parsers that read files.

use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// How a stream is cut into the reads a parser sees: whole, one byte at a time, and in pieces
/// of sizes drawn from `seed`. A parser that keeps state between reads must give the same
/// result for each.
pub fn cuts(len: usize, seed: u8) -> [Vec<usize>; 3] {
    let whole = vec![len];
    let bytes = vec![1; len];
    let mut pieces = Vec::new();
    let mut state = u32::from(seed) | 0x100;
    let mut left = len;
    while left > 0 {
        // xorshift32: any cheap deterministic spread of sizes will do.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (1 + state as usize % 23).min(left);
        pieces.push(size);
        left -= size;
    }
    [whole, bytes, pieces]
}

/// The replies a source target is fed: raw HTTP responses separated by this line.
pub const REPLY_SEPARATOR: &[u8] = b"\n=====\n";

/// One reply, written as an HTTP/1.1 response, with its first byte as the target's flags.
pub struct RawReply {
    pub flags: u8,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The replies in `data`; a part that is no HTTP response is left out.
pub fn replies(data: &[u8]) -> Vec<RawReply> {
    split(data, REPLY_SEPARATOR).into_iter().filter_map(reply).collect()
}

fn reply(part: &[u8]) -> Option<RawReply> {
    let (&flags, text) = part.split_first()?;
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(len) = response.parse(text).ok()? else { return None };
    let status = StatusCode::from_u16(response.code?).ok()?;
    let mut headers = HeaderMap::new();
    for field in response.headers.iter() {
        // As hyper would: a field it cannot represent does not reach the source.
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(field.name.as_bytes()), HeaderValue::from_bytes(field.value))
        else {
            return None;
        };
        headers.append(name, value);
    }
    Some(RawReply { flags, status, headers, body: Bytes::copy_from_slice(&text[len..]) })
}

/// `data` cut at every `separator`.
pub fn split<'a>(data: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(separator.len()).position(|w| w == separator) {
        parts.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    parts.push(rest);
    parts
}

/// A directory of this process's own for files a parser reads.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecar-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the temporary directory is writable");
    dir
}

/// Every subscriber level on, written nowhere: log statements evaluate their arguments as in a
/// process that logs at trace level, so arithmetic in them is exercised too.
pub fn log_everything() {
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(std::io::sink).try_init();
}
