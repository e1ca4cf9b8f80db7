//! The patched h2 (vendor/h2/PATCHES.md) on its own, between a real h2 client and server over
//! loopback TCP: what the patch changes that no test through the proxy can see.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A socket that counts the reads that brought bytes.
struct CountedReads {
    inner: TcpStream,
    reads: Arc<AtomicUsize>,
}

impl AsyncRead for CountedReads {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for CountedReads {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A body of many small frames (each still above h2's small-frame flood guard).
const FRAME: usize = 200;
const FRAMES: usize = 200;

/// A connection that freed its read buffer while idle takes it back at full size. Taken back
/// too small (once the frames read into it are still held, a `BytesMut` grows only to the
/// capacity it was made with), every read afterwards brought a few bytes: this 40 KB body
/// took over 300 reads instead of under ten.
#[tokio::test]
async fn a_connection_that_freed_its_read_buffer_reads_in_full_buffers_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            let mut body = respond.send_response(http::Response::new(()), false).unwrap();
            for n in 0..FRAMES {
                body.send_data(Bytes::from(vec![n as u8; FRAME]), n + 1 == FRAMES).unwrap();
            }
        }
    });

    let reads = Arc::new(AtomicUsize::new(0));
    let io = CountedReads { inner: TcpStream::connect(addr).await.unwrap(), reads: reads.clone() };
    let (mut client, mut connection) = h2::client::handshake(io).await.unwrap();
    let mut pings = connection.ping_pong().unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // On this one-thread runtime the pong comes back only once the connection's task has
    // waited again with no stream open: the point where the patch frees its buffers.
    pings.ping(h2::Ping::opaque()).await.unwrap();
    let before = reads.load(Ordering::Relaxed);

    let request = http::Request::get("http://localhost/").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    // The frames wait in the stream's queue until this task takes them, so the read buffer
    // runs out of room while they still hold parts of it.
    while !body.is_end_stream() {
        let chunk = body.data().await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let reads = reads.load(Ordering::Relaxed) - before;
    assert!(reads < 100, "{reads} reads for {} bytes", FRAME * FRAMES);
}
