//! Watching a client connection: the idle timeout and, on HTTP/1, the header-read timeout,
//! both checked on one coarse per-connection tick rather than a timer per request.
//!
//! hyper's own header-read timer boxes, registers and drops a timer entry for every request
//! head, and wakes the connection once more after each: 1.5k of the 26.5k instructions of a
//! keep-alive request (callgrind), where counting requests here costs three relaxed atomics.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::ClientFault;
use crate::proxy::body::BodyError;
use crate::proxy::faults::client_fault;
use crate::proxy::ProxyBody;
use crate::transport::TlsSocket;

/// Polls a connection to its end. On shutdown, when idle, or when `finish` asks (the request
/// cap) it asks the connection to finish gracefully (in-flight requests complete); an HTTP/1
/// connection that has waited for a request head for the header-read timeout is closed at
/// once, as no request is in flight. So is a connection that stays idle a quarter of the idle
/// timeout more after the graceful finish began while no request waits for the app: no byte
/// moving either way with a response in flight is a client that reads nothing (or a zero
/// HTTP/2 window), which would otherwise pin its app connections for as long as it likes.
///
/// The watch is polled only when its own waker fires, not at every wake-up of the connection:
/// polling it locks the shutdown token's mutex and checks a timer, which under `select!` cost
/// ~800 instructions per keep-alive request (callgrind), about 2 %.
pub(super) async fn drive<C>(
    connection: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    mut watch: ConnectionWatch,
    finish: Arc<WatchWake>,
    awaiting_app: impl Fn() -> bool,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) where
    C: Future<Output = hyper::Result<()>>,
{
    // Set by the watch, read by the poll below: the same task, so relaxed.
    let idle_finish = AtomicBool::new(false);
    let watch = async {
        let first = tokio::select! {
            _ = shutdown.cancelled() => None,
            expiry = watch.expired(Some(watch.idle)) => Some(expiry),
        };
        let stall_limit = match first {
            Some(Expiry::HeadTimeout(timeout)) => return Expiry::HeadTimeout(timeout),
            Some(Expiry::Idle) => {
                client_fault(ClientFault::IdleTimeout, peer, &"closing idle connection");
                Some(watch.idle / 4)
            }
            None => None,
        };
        idle_finish.store(true, Ordering::Relaxed);
        // A client that never completes its head would keep a graceful finish waiting.
        watch.restart_idle();
        loop {
            match watch.expired(stall_limit).await {
                // The app is still thinking (bounded by --upstream-timeout): not the client's doing.
                Expiry::Idle if awaiting_app() => watch.restart_idle(),
                expiry => return expiry,
            }
        }
    };
    tokio::pin!(connection, watch);
    let watch_waker = std::task::Waker::from(finish.clone());
    let mut finishing = false;
    let result = std::future::poll_fn(|cx| {
        finish.task.register(cx.waker());
        if finish.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(expiry) = watch.as_mut().poll(&mut Context::from_waker(&watch_waker)) {
                return Poll::Ready(Err(expiry));
            }
            let asked = idle_finish.load(Ordering::Relaxed) || finish.requested.load(Ordering::Relaxed);
            if !finishing && asked {
                finishing = true;
                graceful_shutdown(connection.as_mut());
            }
        }
        connection.as_mut().poll(cx).map(Ok)
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => connection_error(&e, peer),
        Err(Expiry::HeadTimeout(timeout)) => client_fault(
            ClientFault::HeaderReadTimeout,
            peer,
            &format_args!("closing connection: no complete request head within {timeout:?}"),
        ),
        Err(Expiry::Idle) => client_fault(
            ClientFault::Stalled,
            peer,
            &"closing connection: no byte moved either way for the idle timeout with a response in flight",
        ),
    }
}

/// Counts and logs a connection that hyper ended with an error: the requests it refused itself
/// (400, 431) and HTTP/2 protocol errors are client faults; a connection reset is not.
fn connection_error(error: &hyper::Error, peer: SocketAddr) {
    let h2 = std::error::Error::source(error).and_then(|source| source.downcast_ref::<h2::Error>());
    let fault = if error.is_parse_too_large() {
        Some(ClientFault::HeaderTooLarge)
    } else if error.is_parse() {
        Some(ClientFault::BadRequest)
    } else if let Some(h2) = h2 {
        // Errors the library detected (floods, malformed frames) end in our GOAWAY.
        (h2.is_library() || h2.is_go_away() && h2.reason() != Some(h2::Reason::NO_ERROR))
            .then_some(ClientFault::H2Protocol)
    } else {
        None
    };
    match fault {
        Some(fault) => client_fault(fault, peer, &format_args!("connection ended: {error}")),
        None => tracing::debug!(%peer, "connection ended with an error: {error}"),
    }
}

/// How a connection's watch reaches its task: the watch's wake-ups, and a graceful finish that
/// the connection's service asks for (the request cap).
pub(super) struct WatchWake {
    woken: AtomicBool,
    task: AtomicWaker,
    requested: AtomicBool,
}

impl WatchWake {
    pub(super) fn new() -> Arc<WatchWake> {
        Arc::new(WatchWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
            requested: AtomicBool::new(false),
        })
    }

    /// Asks the connection to finish gracefully (HTTP/2: GOAWAY).
    pub(super) fn request_finish(self: &Arc<Self>) {
        self.requested.store(true, Ordering::Relaxed);
        std::task::Wake::wake_by_ref(self);
    }
}

impl std::task::Wake for WatchWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Counts I/O operations so an idle connection can be noticed without a clock read per byte.
pub(super) struct ActivityIo<T> {
    pub(super) inner: T,
    pub(super) activity: Arc<AtomicU64>,
}

impl<T> ActivityIo<T> {
    fn touch(&self) {
        // Single writer: a relaxed load and store, not a locked read-modify-write.
        self.activity.store(self.activity.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

/// A stream that can tell, cheaply, that a read would find nothing.
pub(super) trait NothingToRead {
    /// `true`: nothing is buffered and the socket is not readable; the task is woken when it is.
    fn poll_nothing_to_read(&self, cx: &mut Context<'_>) -> bool;
}

impl NothingToRead for tokio_rustls::server::TlsStream<TlsSocket> {
    fn poll_nothing_to_read(&self, cx: &mut Context<'_>) -> bool {
        let (socket, session) = self.get_ref();
        // No decrypted bytes wait, and no close_notify has come (its EOF is for the read to say).
        session.wants_read() && socket.poll_nothing_to_read(cx)
    }
}

/// Reads what the TLS session has decrypted, one buffered chunk per call. tokio-rustls'
/// `poll_read` goes on filling the caller's buffer after the first chunk, and between a client's
/// requests that second attempt always finds the socket empty: a trip through rustls and tokio's
/// readiness check for nothing, once per request (callgrind: ~2 % of the proxy's instructions
/// per keep-alive request). The caller asks again when it wants more.
///
/// A read that would find nothing ends at the socket's readiness, before tokio-rustls and
/// rustls are entered: hyper makes one such read per request, watching for the client going
/// away while the app answers (callgrind: keep-alive 23.3k → 23.0k instructions per request,
/// HTTP/2 32.8k → 32.7k).
impl<T: AsyncBufRead + NothingToRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.inner.poll_nothing_to_read(cx) {
            return Poll::Pending;
        }
        let inner = Pin::new(&mut self.inner);
        let read = match inner.poll_fill_buf(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(data)) => {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                Pin::new(&mut self.inner).consume(n);
                Ok(())
            }
        };
        self.touch();
        Poll::Ready(read)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if poll.is_ready() {
            self.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if poll.is_ready() {
            self.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What an HTTP/1 connection's service tells its watch: how many request heads have arrived,
/// and how many responses are not yet sent.
#[derive(Default)]
pub(super) struct Requests {
    received: AtomicU64,
    open: AtomicU64,
}

impl Requests {
    /// Notes a request head that has arrived; the request stays open while the guard lives.
    pub(super) fn open(self: &Arc<Self>) -> OpenRequest {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenRequest(self.clone())
    }

    /// No request is being served: the connection waits for (or is reading) the next head.
    fn waiting(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
    }
}

pub(super) struct OpenRequest(Arc<Requests>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request open until hyper drops it, which hyper does once
/// the body is sent, before it reads the next request head (or when the connection ends).
pub(super) struct ResponseBody {
    pub(super) body: ProxyBody,
    pub(super) _open: Option<OpenRequest>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    Idle,
    HeadTimeout(Duration),
}

/// The idle timeout (no I/O for that long), and for HTTP/1 the header-read timeout (no request
/// served and no head completed for that long: the wait for a head counts, as in hyper, from
/// the end of the previous response). Checked at quarter steps of the shorter of the two, so
/// each fires between 1x and 1.25x its timeout.
pub(super) struct ConnectionWatch {
    idle: Duration,
    activity: Arc<AtomicU64>,
    head: Option<(Duration, Arc<Requests>)>,
    tick: tokio::time::Interval,
    /// The activity count last seen, and since when it has not moved.
    seen_activity: (u64, Instant),
    /// The request count last seen, and since when no request has been open or arrived.
    seen_requests: (u64, Instant),
}

impl ConnectionWatch {
    pub(super) fn new(
        idle: Duration,
        activity: Arc<AtomicU64>,
        head: Option<(Duration, Arc<Requests>)>,
    ) -> ConnectionWatch {
        let shortest = head.as_ref().map_or(idle, |(timeout, _)| idle.min(*timeout));
        let step = (shortest / 4).max(Duration::from_millis(10));
        let now = Instant::now();
        let mut tick = tokio::time::interval_at(now + step, step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let seen_activity = (activity.load(Ordering::Relaxed), now);
        ConnectionWatch { idle, activity, head, tick, seen_activity, seen_requests: (0, now) }
    }

    /// From now on, idle time counts from now.
    fn restart_idle(&mut self) {
        self.seen_activity.1 = Instant::now();
    }

    /// Resolves when a timeout has run out: the header-read timeout, or no I/O for `idle`
    /// (`None`: only the header-read timeout, never for HTTP/2).
    async fn expired(&mut self, idle: Option<Duration>) -> Expiry {
        if idle.is_none() && self.head.is_none() {
            return std::future::pending().await;
        }
        loop {
            let now = self.tick.tick().await;
            let activity = self.activity.load(Ordering::Relaxed);
            if activity != self.seen_activity.0 {
                self.seen_activity = (activity, now);
            } else if idle.is_some_and(|idle| now.duration_since(self.seen_activity.1) >= idle) {
                return Expiry::Idle;
            }
            if let Some((timeout, requests)) = &self.head {
                let received = requests.received.load(Ordering::Relaxed);
                if received != self.seen_requests.0 || !requests.waiting() {
                    self.seen_requests = (received, now);
                } else if now.duration_since(self.seen_requests.1) >= *timeout {
                    return Expiry::HeadTimeout(*timeout);
                }
            }
        }
    }
}
