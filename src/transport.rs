//! The client's TCP socket as rustls sees it: how sealed records become system calls and TCP
//! segments.
//!
//! Batching. rustls hands the socket every sealed record it has queued in one vectored write:
//! 64 KiB and more while a large body streams. This adapter passes on at most [`WRITE_BATCH`]
//! bytes of whole records per system call. Measured on loopback with 1 MiB responses
//! (`benches/compare.sh`; 2, 16 and 64 connections alike), 64 KiB writes cost about 330 µs of
//! kernel time per response and 32 KiB writes about 220 µs: the kernel spent the difference
//! transmitting the oversized segments with interrupts off (perf: `tcp_write_xmit`, softirqs).
//! nginx writes one 16 KiB record per call (`ssl_buffer_size`); two per call measured better
//! still (one: ~245 µs, three: ~275 µs).
//!
//! Holding. Some records are of no use to the client on their own, yet each would cost a system
//! call, a segment and a wake-up of the client:
//! - the TLS 1.3 session ticket, sealed as the handshake ends: it waits for the first response
//!   (or HTTP/2's SETTINGS) and leaves with it;
//! - the last response of a `Connection: close` exchange, once the request handler announces it
//!   through [`LastResponse`]: it waits for close_notify, and all of it leaves in one segment
//!   that also carries the FIN.
//!
//! Held bytes are bounded by [`HOLD_LIMIT`] and wait at most for the proxy's next write, its
//! shutdown, or its next read (a safety net, should a connection announced as closing read on).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustix::net::SendFlags;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Bytes of sealed records written per system call: two full TLS records (16 KiB of plaintext,
/// plus header, content type and tag each). A single larger record still goes out whole.
pub(crate) const WRITE_BATCH: usize = 2 * (16 * 1024 + 256);

/// The most bytes held back at once: a ticket, a small response sealed in up to two records,
/// and close_notify. A larger write goes out at once, after whatever was held.
pub(crate) const HOLD_LIMIT: usize = WRITE_BATCH + 1024;

/// TLS record type of application data (in TLS 1.3, of every encrypted record).
const APPLICATION_DATA: u8 = 0x17;

/// Set by the request handler when the response being written is the connection's last and
/// small, so that the socket sends it together with close_notify and the FIN.
#[derive(Clone, Default, Debug)]
pub(crate) struct LastResponse(Arc<AtomicBool>);

impl LastResponse {
    pub(crate) fn announce(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn announced(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A client connection's TCP stream, under TLS.
#[derive(Debug)]
pub(crate) struct TlsSocket {
    tcp: TcpStream,
    /// Sealed records taken from rustls but not sent yet.
    held: Vec<u8>,
    /// Until the handshake ends, an application-data record written on its own is the TLS 1.3
    /// ticket (or an encrypted alert): every flight of the server's opens with a handshake
    /// record. Cleared by a partial write too, after which a slice may start mid-record.
    handshaking: bool,
    last_response: LastResponse,
}

impl TlsSocket {
    pub(crate) fn new(tcp: TcpStream) -> TlsSocket {
        TlsSocket { tcp, held: Vec::new(), handshaking: true, last_response: LastResponse::default() }
    }

    /// From now on only an announced last response is held.
    pub(crate) fn handshake_finished(&mut self) {
        self.handshaking = false;
    }

    /// The handle through which the request handler announces the connection's last response.
    pub(crate) fn last_response(&self) -> LastResponse {
        self.last_response.clone()
    }

    /// Nothing can be read now: no held bytes wait to be sent by a read, and the socket is not
    /// readable (the task is woken when it is).
    pub(crate) fn poll_nothing_to_read(&self, cx: &mut Context<'_>) -> bool {
        (self.held.is_empty() || !self.last_response.announced()) && self.tcp.poll_read_ready(cx).is_pending()
    }

    fn holds(&self, bufs: &[IoSlice<'_>]) -> bool {
        let ticket = self.handshaking && bufs.first().and_then(|b| b.first()) == Some(&APPLICATION_DATA);
        ticket || self.last_response.announced()
    }

    /// Sends what is held. With `fin_follows`, the kernel keeps the bytes until the shutdown
    /// that comes next, so that the FIN rides in the same segment.
    fn poll_send_held(&mut self, cx: &mut Context<'_>, fin_follows: bool) -> Poll<std::io::Result<()>> {
        let flags = if fin_follows { SendFlags::MORE | SendFlags::NOSIGNAL } else { SendFlags::NOSIGNAL };
        while !self.held.is_empty() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_io(Interest::WRITABLE, || Ok(rustix::net::send(&self.tcp, &self.held, flags)?)) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => drop(self.held.drain(..n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Its capacity goes too: a connection held its ticket once and may stay open for long.
        self.held = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Writes the held bytes and as much of `bufs` as fits one batch, in one system call when
    /// the socket takes it all. Returns how much of `bufs` was written.
    fn poll_write_after_held(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let batch = batch_len(bufs, WRITE_BATCH);
        while !self.held.is_empty() {
            let mut slices = Vec::with_capacity(batch + 1);
            slices.push(IoSlice::new(&self.held));
            slices.extend_from_slice(&bufs[..batch]);
            let written = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let held = self.held.len();
            if written > held {
                self.held = Vec::new();
                return Poll::Ready(Ok(written - held));
            }
            self.held.drain(..written);
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..batch])
    }
}

impl Drop for TlsSocket {
    // A handshake that failed after sealing its alert, or a connection dropped without a
    // shutdown: what is held still goes out if the socket takes it at once.
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let _ = self.tcp.try_write(&self.held);
        }
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
        if !self.held.is_empty() && self.last_response.announced() {
            // Announced as the last, yet the connection reads on: the response must not wait.
            if let Poll::Ready(Err(e)) = self.poll_send_held(cx, false) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.holds(bufs) && this.held.len() + len <= HOLD_LIMIT {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(len));
        }
        let written = if this.held.is_empty() {
            let batch = batch_len(bufs, WRITE_BATCH);
            ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, &bufs[..batch]))?
        } else {
            ready!(this.poll_write_after_held(cx, bufs))?
        };
        if written < len {
            this.handshaking = false;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    // Nothing held is sent here: what holds it is released by the next write or the shutdown.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_held(cx, true))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
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
