//! The client's TCP socket as rustls sees it.
//!
//! rustls hands the socket every sealed record it has queued in one vectored write: 64 KiB and
//! more while a large body streams. This adapter passes on at most [`WRITE_BATCH`] bytes of
//! whole records per system call. Measured on loopback with 1 MiB responses
//! (`benches/compare.sh`; 2, 16 and 64 connections alike), 64 KiB writes cost about 330 µs of
//! kernel time per response and 32 KiB writes about 220 µs: the kernel spent the difference
//! transmitting the oversized segments with interrupts off (perf: `tcp_write_xmit`, softirqs).
//! nginx writes one 16 KiB record per call (`ssl_buffer_size`); two per call measured better
//! still (one: ~245 µs, three: ~275 µs).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes of sealed records written per system call: two full TLS records (16 KiB of plaintext,
/// plus header, content type and tag each). A single larger record still goes out whole.
pub const WRITE_BATCH: usize = 2 * (16 * 1024 + 256);

/// A client connection's TCP stream, under TLS.
#[derive(Debug)]
pub struct TlsSocket(TcpStream);

impl TlsSocket {
    pub fn new(tcp: TcpStream) -> TlsSocket {
        TlsSocket(tcp)
    }
}

/// How many leading slices fit in `limit` bytes; always at least one, so a write progresses.
fn batch_len(bufs: &[IoSlice<'_>], limit: usize) -> usize {
    let mut total = 0;
    for (count, buf) in bufs.iter().enumerate() {
        total += buf.len();
        if total > limit {
            return count.max(1);
        }
    }
    bufs.len()
}

impl AsyncRead for TlsSocket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let batch = batch_len(bufs, WRITE_BATCH);
        Pin::new(&mut self.0).poll_write_vectored(cx, &bufs[..batch])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices(lens: &[usize]) -> Vec<Vec<u8>> {
        lens.iter().map(|&n| vec![0; n]).collect()
    }

    fn batch(lens: &[usize], limit: usize) -> usize {
        let owned = slices(lens);
        let bufs: Vec<IoSlice<'_>> = owned.iter().map(|b| IoSlice::new(b)).collect();
        batch_len(&bufs, limit)
    }

    #[test]
    fn whole_records_up_to_the_limit() {
        let record = 16 * 1024 + 22;
        assert_eq!(batch(&[record; 6], WRITE_BATCH), 2);
        assert_eq!(batch(&[100, 200, 300], WRITE_BATCH), 3);
        assert_eq!(batch(&[record, 1000, record, record], WRITE_BATCH), 2);
    }

    #[test]
    fn one_oversized_slice_still_goes_out() {
        assert_eq!(batch(&[WRITE_BATCH + 1, 10], WRITE_BATCH), 1);
        assert_eq!(batch(&[], WRITE_BATCH), 0);
    }
}
