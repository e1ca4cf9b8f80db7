//! Request and response bodies for the test clients and upstreams: whole, empty, and a long
//! streamed pattern with its checksum.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A body of `len` bytes of a repeating pattern, produced chunk by chunk, never held whole.
pub fn pattern_stream(len: u64) -> TestBody {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= len {
                return None;
            }
            let n = (len - sent).min(CHUNK as u64) as usize;
            Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.slice(..n))), sent + n as u64))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Byte count and a position-sensitive checksum of a body, read as a stream.
pub async fn drain_body<B>(mut body: B) -> (u64, u64)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let (mut count, mut sum) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            for b in data.iter() {
                sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
            }
            count += data.len() as u64;
        }
    }
    (count, sum)
}

pub fn pattern_checksum(len: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..len {
        sum = sum.wrapping_mul(31).wrapping_add((i % (64 * 1024)) % 251);
    }
    sum
}
