//! Watching a client connection: the idle timeout and, on HTTP/1, the header-read timeout,
//! both checked on one coarse per-connection tick rather than a timer per request, and the
//! moment an idle HTTP/1 connection is parked (its hyper connection dropped until the client
//! sends again).
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

/// How [`drive`] left a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Driven {
    /// The connection ended (or was cut off); nothing more is served on it.
    Ended,
    /// An idle HTTP/1 connection was parked: hyper finished without closing the stream, which
    /// [`ActivityIo::parking`] kept open, and its buffers can be dropped.
    Parked,
}

/// Polls a connection to its end. On shutdown, when idle, or when `finish` asks (the request
/// cap) it asks the connection to finish gracefully (in-flight requests complete); an HTTP/1
/// connection that has waited for a request head for the header-read timeout is closed at
/// once, as no request is in flight. So is a connection that stays idle a quarter of the idle
/// timeout more after the graceful finish began while no request waits for the app: no byte
/// moving either way with a response in flight is a client that reads nothing (or a zero
/// HTTP/2 window), which would otherwise pin its app connections for as long as it likes.
///
/// With `parking` (HTTP/1), a connection found quiet at a tick of the watch, with no request
/// open, is finished gracefully with `parking` set: hyper, idle, then finishes at once, and the
/// stream's shutdown is skipped, so the caller can take the stream back and wait for the
/// client's next bytes without hyper's buffers (see `ServedHttp1` in `super`).
///
/// The watch is polled only when its own waker fires, not at every wake-up of the connection:
/// polling it locks the shutdown token's mutex and checks a timer, which under `select!` cost
/// ~800 instructions per keep-alive request (callgrind), about 2 %.
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive<C>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    watch: &mut ConnectionWatch,
    finish: &Arc<WatchWake>,
    awaiting_app: impl Fn() -> bool,
    parking: Option<&AtomicBool>,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> Driven
where
    C: Future<Output = hyper::Result<()>>,
{
    // Set by the watch, read by the poll below: the same task, so relaxed.
    let idle_finish = AtomicBool::new(false);
    let park_now = AtomicBool::new(false);
    let watch = async {
        let mut may_park = parking.is_some();
        let first = loop {
            let expiry = tokio::select! {
                _ = shutdown.cancelled() => break None,
                expiry = watch.expired(Some(watch.idle), may_park) => expiry,
            };
            match expiry {
                // Watched on: a park that waits for a flush to a client that reads nothing
                // still meets the idle timeout.
                Expiry::Park => {
                    may_park = false;
                    park_now.store(true, Ordering::Relaxed);
                }
                expiry => break Some(expiry),
            }
        };
        let stall_limit = match first {
            Some(Expiry::HeadTimeout(timeout)) => return Expiry::HeadTimeout(timeout),
            Some(Expiry::Idle) => {
                client_fault(ClientFault::IdleTimeout, peer, &"closing idle connection");
                Some(watch.idle / 4)
            }
            _ => None,
        };
        idle_finish.store(true, Ordering::Relaxed);
        // A client that never completes its head would keep a graceful finish waiting.
        watch.restart_idle();
        loop {
            match watch.expired(stall_limit, false).await {
                // The app is still thinking (bounded by --upstream-timeout): not the client's doing.
                Expiry::Idle if awaiting_app() => watch.restart_idle(),
                expiry => return expiry,
            }
        }
    };
    tokio::pin!(watch);
    let watch_waker = std::task::Waker::from(finish.clone());
    // The watch is polled once first, to start its tick.
    finish.woken.store(true, Ordering::Relaxed);
    let mut finishing = false;
    let result = std::future::poll_fn(|cx| {
        finish.task.register(cx.waker());
        if finish.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(expiry) = watch.as_mut().poll(&mut Context::from_waker(&watch_waker)) {
                return Poll::Ready(Err(expiry));
            }
            if !finishing && park_now.load(Ordering::Relaxed) {
                if let Some(parking) = parking {
                    finishing = true;
                    parking.store(true, Ordering::Relaxed);
                    graceful_shutdown(connection.as_mut());
                }
            }
            let asked = idle_finish.load(Ordering::Relaxed) || finish.requested.load(Ordering::Relaxed);
            if asked {
                // A park under way becomes a close: the stream is shut down after all.
                if let Some(parking) = parking {
                    parking.store(false, Ordering::Relaxed);
                }
                if !finishing {
                    finishing = true;
                    graceful_shutdown(connection.as_mut());
                }
            }
        }
        connection.as_mut().poll(cx).map(Ok)
    })
    .await;
    match result {
        Ok(Ok(())) if parking.is_some_and(|parking| parking.load(Ordering::Relaxed)) => return Driven::Parked,
        Ok(Ok(())) => {}
        Ok(Err(e)) => connection_error(&e, peer),
        Err(Expiry::HeadTimeout(timeout)) => head_timeout(timeout, peer),
        Err(Expiry::Idle) => client_fault(
            ClientFault::Stalled,
            peer,
            &"closing connection: no byte moved either way for the idle timeout with a response in flight",
        ),
        Err(Expiry::Park) => unreachable!("the watch handles its park expiry itself"),
    }
    Driven::Ended
}

/// Counts and logs a connection closed for not completing a request head in time.
pub(super) fn head_timeout(timeout: Duration, peer: SocketAddr) {
    client_fault(
        ClientFault::HeaderReadTimeout,
        peer,
        &format_args!("closing connection: no complete request head within {timeout:?}"),
    );
}

/// Waits, with no buffers held, until a parked connection has bytes to read (or `unread` holds
/// some already): `true`, serve it again. On shutdown or the idle timeout it is closed
/// gracefully (close_notify), as hyper closes an idle connection, and on the header-read
/// timeout at once, as before parking: `false`.
pub(super) async fn wait_parked<T>(
    io: &mut ActivityIo<T>,
    watch: &mut ConnectionWatch,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> bool
where
    T: NothingToRead + AsyncWrite + Unpin,
{
    if !io.unread.is_empty() {
        return true;
    }
    let readable = std::future::poll_fn(|cx| match io.inner.poll_nothing_to_read(cx) {
        true => Poll::Pending,
        false => Poll::Ready(()),
    });
    watch.skip_to_expiry();
    let graceful = tokio::select! {
        biased;
        _ = shutdown.cancelled() => true,
        () = readable => {
            // Back to a tick per step, the next one a step from now.
            watch.tick.reset();
            return true;
        }
        expiry = watch.expired(Some(watch.idle), false) => match expiry {
            Expiry::HeadTimeout(timeout) => {
                head_timeout(timeout, peer);
                false
            }
            _ => {
                client_fault(ClientFault::IdleTimeout, peer, &"closing idle connection");
                true
            }
        },
    };
    if graceful {
        io.parking.store(false, Ordering::Relaxed);
        // Bounded as a graceful finish is in `drive`: a client that reads nothing cannot hold
        // it. Boxed: the timer would otherwise be part of every parked connection's state.
        let close = tokio::io::AsyncWriteExt::shutdown(io);
        let _ = Box::pin(tokio::time::timeout(watch.idle / 4, close)).await;
    }
    false
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
/// Also what lets an HTTP/1 connection be parked: bytes read before a park are read again
/// first, and a shutdown asked for while parking is only a flush.
pub(super) struct ActivityIo<T> {
    pub(super) inner: T,
    pub(super) activity: Arc<AtomicU64>,
    /// Set while an idle connection is being parked: hyper's shutdown of the stream then only
    /// flushes, and the stream stays open.
    pub(super) parking: Arc<AtomicBool>,
    /// Bytes hyper had read but not used when it was parked (a partial request head).
    pub(super) unread: Bytes,
}

impl<T> ActivityIo<T> {
    pub(super) fn new(inner: T, activity: Arc<AtomicU64>) -> ActivityIo<T> {
        ActivityIo { inner, activity, parking: Default::default(), unread: Bytes::new() }
    }

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
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            self.touch();
            return Poll::Ready(Ok(()));
        }
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
        if self.parking.load(Ordering::Relaxed) {
            // hyper has flushed its own buffer; what rustls has sealed goes out too.
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
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

/// The longest an HTTP/1 connection's watch waits between two checks, so that an idle
/// connection is parked one to two seconds after its last byte, whatever the timeouts. A
/// parked connection's watch does not tick at all (see `ConnectionWatch::skip_to_expiry`).
const PARK_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    Idle,
    HeadTimeout(Duration),
    /// An HTTP/1 connection with no request open has been quiet for a whole tick.
    Park,
}

/// The idle timeout (no I/O for that long), and for HTTP/1 the header-read timeout (no request
/// served and no head completed for that long: the wait for a head counts, as in hyper, from
/// the end of the previous response). Checked at quarter steps of the shorter of the two (on
/// HTTP/1 at least every [`PARK_CHECK`]), so each fires between 1x and 1.25x its timeout; on
/// a parked connection at 1x.
pub(super) struct ConnectionWatch {
    idle: Duration,
    activity: Arc<AtomicU64>,
    head: Option<(Duration, Arc<Requests>)>,
    tick: tokio::time::Interval,
    /// The activity count last seen, and since when it has not moved.
    seen_activity: (u64, Instant),
    /// The request count last seen, and since when no request has been open or arrived.
    seen_requests: (u64, Instant),
    /// The activity and request counts when the current hyper connection started (HTTP/1).
    connection_start: (u64, u64),
}

impl ConnectionWatch {
    pub(super) fn new(
        idle: Duration,
        activity: Arc<AtomicU64>,
        head: Option<(Duration, Arc<Requests>)>,
    ) -> ConnectionWatch {
        let shortest = head.as_ref().map_or(idle, |(timeout, _)| idle.min(*timeout));
        let mut step = (shortest / 4).max(Duration::from_millis(10));
        if head.is_some() {
            // HTTP/1 parks at the first tick that finds it quiet since the one before.
            step = step.min(PARK_CHECK);
        }
        let now = Instant::now();
        let mut tick = tokio::time::interval_at(now + step, step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let seen_activity = (activity.load(Ordering::Relaxed), now);
        let connection_start = (seen_activity.0, 0);
        ConnectionWatch { idle, activity, head, tick, seen_activity, seen_requests: (0, now), connection_start }
    }

    /// A new hyper connection serves from now on (after a park).
    pub(super) fn connection_started(&mut self) {
        let received = self.head.as_ref().map_or(0, |(_, requests)| requests.received.load(Ordering::Relaxed));
        self.connection_start = (self.activity.load(Ordering::Relaxed), received);
    }

    /// While a connection is parked nothing moves, so the first tick that can find a timeout
    /// run out is known: the watch sleeps until then instead of waking at every step.
    fn skip_to_expiry(&mut self) {
        let mut deadline = self.seen_activity.1 + self.idle;
        if let Some((timeout, _)) = &self.head {
            deadline = deadline.min(self.seen_requests.1 + *timeout);
        }
        self.tick.reset_at(deadline);
    }

    /// From now on, idle time counts from now.
    fn restart_idle(&mut self) {
        self.seen_activity.1 = Instant::now();
    }

    /// Resolves when a timeout has run out: the header-read timeout, or no I/O for `idle`
    /// (`None`: only the header-read timeout, never for HTTP/2). With `park`, also when an
    /// HTTP/1 connection with no request open has seen no I/O since the tick before, and hyper
    /// is idle: it has answered a request, or read nothing yet.
    async fn expired(&mut self, idle: Option<Duration>, park: bool) -> Expiry {
        if idle.is_none() && self.head.is_none() {
            return std::future::pending().await;
        }
        loop {
            let now = self.tick.tick().await;
            let activity = self.activity.load(Ordering::Relaxed);
            let quiet = activity == self.seen_activity.0;
            if !quiet {
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
                } else if park && quiet && (activity == self.connection_start.0 || received > self.connection_start.1) {
                    // Only while hyper is idle: a new hyper connection that has read bytes
                    // (half a head) but answered nothing would take the graceful finish as a
                    // reason to answer that request with `Connection: close`.
                    return Expiry::Park;
                }
            }
        }
    }
}
