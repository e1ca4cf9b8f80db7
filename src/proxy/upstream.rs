//! The keep-alive HTTP/1.1 connections to the upstream: one small pool per worker thread, the
//! exchange of one request and response head on them, and how their failures are described.
//!
//! The upstream is one fixed address, so there is no pool key to hash or URI to rebuild per
//! request. The exchange runs in the task serving the client (see `h1` for why), and the
//! response body reads its connection directly (`body::UpstreamBody`).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{Method, Response};
use hyper::body::{Body, Frame, Incoming};
use slab::Slab;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::body::UpstreamBody;
use super::h1::{self, Framing, ProtocolError, RequestFraming, ResponseHead};
use super::headers::{self, AddedFields};
use super::http2::{Http2Body, Http2Pool};
use super::stream::UpstreamStream;
use crate::config::{ProxyConfig, UpstreamAddress, UpstreamProtocol};
use crate::metrics::metrics;
use crate::sys::lock;

/// The most one upstream read takes in. Large bodies then flow in cache-sized pieces, and a
/// pooled connection holds at most this much: with 1 MiB responses, 64 KiB cut the proxy's CPU
/// per response by about 12% against hyper's default (up to ~400 KiB), the size nginx's tuned
/// `proxy_buffer_size` uses too. It also bounds the upstream's response head, as that setting
/// does in nginx.
pub(super) const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// What a read for a response head makes room for: heads are small.
const HEAD_READ: usize = 8 * 1024;

/// The pool's clock ticks at least this many times per `--upstream-idle-timeout`: an idle
/// connection is closed after between (STEPS-1)/STEPS and all of it, never later.
const IDLE_STEPS: u32 = 4;

/// ...and at least this many times per `--upstream-timeout`: a request that has had no
/// response head for that long fails between 1x and 1.25x of it.
const TIMEOUT_STEPS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("sending the request: {0}")]
    Send(std::io::Error),
    #[error("reading the response: {0}")]
    Receive(std::io::Error),
    #[error("closed the connection without responding")]
    Closed,
    #[error("gave no response within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the client's request body failed: {0}")]
    ClientBody(hyper::Error),
    #[error("HTTP/2: {error}")]
    Http2 {
        #[source]
        error: h2::Error,
        /// Whether the connection it failed on had brought a response before.
        app_answered: bool,
    },
}

impl UpstreamError {
    /// True when no connection could be opened, as opposed to a failure on an open one.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_))
    }

    /// A short, human reason: the I/O cause when there is one ("connection refused"), else
    /// what was wrong.
    pub(crate) fn describe(&self) -> String {
        match self {
            UpstreamError::Connect(io) | UpstreamError::Send(io) | UpstreamError::Receive(io) => describe_io(io),
            UpstreamError::ConnectTimeout(_) => "connect timed out".to_owned(),
            UpstreamError::Http2 { error: e, app_answered } => {
                // An app that answers the connection preface as HTTP/1.1 breaks the framing or
                // closes the connection; one that has answered on it speaks HTTP/2, and a
                // failure there (an app restarting) must not point at the wrong cause.
                let first_failed = !app_answered && !e.is_remote() && e.reason() != Some(h2::Reason::NO_ERROR);
                let hint = if first_failed {
                    " (does the app speak HTTP/2 with prior knowledge? For HTTP/1.1 use http:// or unix://)"
                } else {
                    ""
                };
                format!("HTTP/2: {e}{hint}")
            }
            other => other.to_string(),
        }
    }

    /// True for the failures of a pooled connection the upstream had closed just as the
    /// request went out: the upstream saw nothing, so a request can be sent again.
    fn is_stale_connection(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            UpstreamError::Closed => true,
            UpstreamError::Send(io) | UpstreamError::Receive(io) => {
                matches!(io.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
            }
            _ => false,
        }
    }
}

pub(super) fn describe_io(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        // A Unix socket upstream whose file is not there (yet): the app has not started.
        std::io::ErrorKind::NotFound => "no such socket file (has the app started?)".to_owned(),
        std::io::ErrorKind::TimedOut => "connect timed out".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset by the upstream".to_owned(),
        std::io::ErrorKind::UnexpectedEof => "closed the connection in the middle of the response".to_owned(),
        _ => io.to_string(),
    }
}

/// One worker's idle upstream connections. Cheap to clone; it must be used on the runtime it
/// was created on.
#[derive(Clone)]
pub(crate) struct UpstreamPool {
    shared: Arc<Shared>,
    /// An h2c upstream's connections; the HTTP/1.1 ones above then stay empty.
    http2: Option<Arc<Http2Pool>>,
}

pub(super) struct Shared {
    address: UpstreamAddress,
    connect_timeout: Duration,
    /// Most recently used last: reuse takes from the end, so warm connections stay warm and
    /// the ones a burst left over age out at the front.
    idle: Mutex<Vec<IdleConnection>>,
    /// The pool's clock, advanced by its task (`run_clock`) every tick: stamps when a
    /// connection went idle and when a request's wait for its response head started, without
    /// a clock read or a timer per request.
    step: AtomicU64,
    /// Ticks after which an idle connection is closed.
    idle_steps: u64,
    /// `--upstream-timeout`, and the ticks it lasts (rounded up).
    pub(super) timeout: Duration,
    timeout_steps: u64,
    /// Requests waiting for a response head, and response bodies waiting for their next
    /// bytes. A tokio timer registered and dropped for each cost ~0.5k instructions per
    /// keep-alive request more than this table (callgrind).
    waiting: Mutex<Slab<Waiting>>,
    /// `--upstream-keepalive`: off, no connection is reused.
    keepalive: bool,
}

/// A request waiting for its response head, as the pool's clock sees it.
struct Waiting {
    /// The tick at which it has waited for the whole timeout.
    expires_at_step: u64,
    waker: Option<Waker>,
    expired: bool,
}

/// A wait for the upstream bounded by `--upstream-timeout`: for a response head, or for the
/// next bytes of a response body. It takes a place in the pool's `waiting` table only once it
/// has had to wait.
#[derive(Debug)]
pub(super) struct ReadDeadline {
    /// The tick at which it has waited for the whole timeout. The tick under way may be nearly
    /// over when it starts: one more makes the wait at least the timeout.
    expires_at_step: u64,
    key: Option<usize>,
}

impl ReadDeadline {
    pub(super) fn start(shared: &Shared) -> ReadDeadline {
        ReadDeadline { expires_at_step: ReadDeadline::from_now(shared), key: None }
    }

    fn from_now(shared: &Shared) -> u64 {
        shared.step.load(Ordering::Relaxed) + shared.timeout_steps + 1
    }

    /// Bytes arrived: the wait starts again (the table entry follows at the next wait).
    pub(super) fn restart(&mut self, shared: &Shared) {
        self.expires_at_step = ReadDeadline::from_now(shared);
    }

    /// True once the clock has passed the deadline; until then the clock wakes `cx` when it does.
    pub(super) fn poll_expired(&mut self, shared: &Shared, cx: &mut Context<'_>) -> bool {
        let mut waiting = lock(&shared.waiting);
        let Some(entry) = self.key.and_then(|key| waiting.get_mut(key)) else {
            let entry =
                Waiting { expires_at_step: self.expires_at_step, waker: Some(cx.waker().clone()), expired: false };
            self.key = Some(waiting.insert(entry));
            return false;
        };
        if entry.expires_at_step != self.expires_at_step {
            entry.expires_at_step = self.expires_at_step;
            entry.expired = false;
        }
        if entry.expired {
            return true;
        }
        if !entry.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            entry.waker = Some(cx.waker().clone());
        }
        false
    }

    /// Leaves the table: the wait is over.
    pub(super) fn clear(&mut self, shared: &Shared) {
        if let Some(key) = self.key.take() {
            lock(&shared.waiting).try_remove(key);
        }
    }
}

/// A request's deadline for its response head.
struct HeadDeadline<'a> {
    shared: &'a Shared,
    deadline: ReadDeadline,
}

/// `exchange`, failing with `UpstreamError::Timeout` when it has not ended within
/// `--upstream-timeout`: bounded by the pool's clock, with no timer per request.
///
/// `exchange` comes pinned where the caller made it: taken by value, the future would be
/// kept twice in this one's state (the argument and its pinned copy), and each request
/// would allocate and copy the second one for nothing.
async fn within_head_deadline<T>(
    shared: &Shared,
    mut exchange: Pin<&mut impl Future<Output = Result<T, UpstreamError>>>,
) -> Result<T, UpstreamError> {
    let mut head = HeadDeadline { shared, deadline: ReadDeadline::start(shared) };
    poll_fn(|cx| match exchange.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending if head.deadline.poll_expired(shared, cx) => {
            Poll::Ready(Err(UpstreamError::Timeout(shared.timeout)))
        }
        Poll::Pending => Poll::Pending,
    })
    .await
}

impl Drop for HeadDeadline<'_> {
    fn drop(&mut self) {
        self.deadline.clear(self.shared);
    }
}

struct IdleConnection {
    connection: Box<UpstreamConnection>,
    idle_since_step: u64,
}

/// An open connection to the upstream and what has been read from it but not yet used.
///
/// Kept boxed (`Box<UpstreamConnection>`): it moves out of the pool, into the response body and
/// back for every request, and by value those moves were `memcpy` calls (callgrind: ~120
/// instructions per keep-alive request at 80 bytes, ~300 at 104).
pub(crate) struct UpstreamConnection {
    pub(super) stream: UpstreamStream,
    pub(super) read_buf: BytesMut,
    /// The request head being sent, reused from one request to the next.
    request_head: Vec<u8>,
    /// What the last response head left to read the next one faster.
    head_reader: h1::HeadReader,
}

impl UpstreamConnection {
    /// Reads what the upstream sent into `read_buf`, making room for `want` bytes if little is
    /// left. `Ok(0)`: the upstream closed the connection.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < want.min(1024) {
            self.read_buf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf)
    }

    /// An idle connection can take a request if nothing arrived on it while it was idle: the
    /// usual arrival is the upstream closing it. Costs no system call unless something did.
    fn is_quiet(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            Poll::Ready(Err(_)) => false,
        }
    }

    /// Writes the request head `parts` and `added` make, then sends the body (if any) while
    /// waiting for the response head, which it returns. A body still being sent then is left
    /// in `body`.
    async fn exchange(
        &mut self,
        (parts, added, framing): (&Parts, &AddedFields, RequestFraming),
        body: &mut Option<Box<RequestBody>>,
    ) -> Result<ResponseHead, UpstreamError> {
        h1::encode_request_head(parts, added, framing, &mut self.request_head);
        self.stream.write_all(&self.request_head).await.map_err(UpstreamError::Send)?;
        let method = &parts.method;
        let mut send_failed = None;
        poll_fn(|cx| loop {
            match RequestBody::poll_pending(body, cx, &mut self.stream) {
                Ok(None) => {}
                // The upstream may have answered and stopped reading (413): that answer is
                // read below, and the connection goes once it is forwarded.
                Ok(Some(e)) => send_failed = Some(e),
                Err(e) => return Poll::Ready(Err(UpstreamError::ClientBody(e))),
            }
            if let Some(head) =
                h1::parse_response(&mut self.read_buf, method, UPSTREAM_READ_BUFFER, &mut self.head_reader)?
            {
                return Poll::Ready(Ok(ResponseHead { keep_alive: head.keep_alive && send_failed.is_none(), ..head }));
            }
            match ready!(self.poll_fill(cx, HEAD_READ)) {
                Ok(0) if self.read_buf.is_empty() => {
                    return Poll::Ready(Err(send_failed.take().map_or(UpstreamError::Closed, UpstreamError::Send)))
                }
                Ok(0) => return Poll::Ready(Err(UpstreamError::Receive(std::io::ErrorKind::UnexpectedEof.into()))),
                Ok(_) => {}
                Err(e) => {
                    return Poll::Ready(Err(send_failed.take().map_or(UpstreamError::Receive(e), UpstreamError::Send)))
                }
            }
        })
        .await
    }
}

/// Why sending a request body stopped.
enum SendError {
    Client(hyper::Error),
    Io(std::io::Error),
}

/// A request body on its way to the upstream, framed as the request head announced.
pub(super) struct RequestBody {
    body: Incoming,
    chunked: bool,
    /// Framed pieces not yet written.
    queue: VecDeque<Bytes>,
    /// The body has ended and its last piece is queued.
    ended: bool,
}

impl RequestBody {
    /// Sends more of `pending`, if there is any, and drops it once it is done. `Ok(Some(_))`:
    /// the upstream stopped taking it (dropped too; the connection must not be reused).
    /// `Err`: the client's body failed.
    pub(super) fn poll_pending(
        pending: &mut Option<Box<RequestBody>>,
        cx: &mut Context<'_>,
        stream: &mut UpstreamStream,
    ) -> Result<Option<std::io::Error>, hyper::Error> {
        let Some(body) = pending.as_mut() else { return Ok(None) };
        let stopped = match body.poll_send(cx, stream) {
            Poll::Pending => return Ok(None),
            Poll::Ready(Ok(())) => None,
            Poll::Ready(Err(SendError::Io(e))) => Some(e),
            Poll::Ready(Err(SendError::Client(e))) => return Err(e),
        };
        *pending = None;
        Ok(stopped)
    }

    /// Ready once the whole body is written.
    fn poll_send(&mut self, cx: &mut Context<'_>, stream: &mut UpstreamStream) -> Poll<Result<(), SendError>> {
        loop {
            while !self.queue.is_empty() {
                let mut slices = [IoSlice::new(&[]); 8];
                let count = slices.len().min(self.queue.len());
                for (slice, piece) in slices.iter_mut().zip(&self.queue) {
                    *slice = IoSlice::new(piece);
                }
                let mut written =
                    ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count])).map_err(SendError::Io)?;
                if written == 0 {
                    return Poll::Ready(Err(SendError::Io(std::io::ErrorKind::WriteZero.into())));
                }
                while written > 0 {
                    let Some(front) = self.queue.front_mut() else { break };
                    let n = written.min(front.len());
                    front.advance(n);
                    written -= n;
                    if front.is_empty() {
                        self.queue.pop_front();
                    }
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
            if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()).and_then(Frame::data_ref) {
                metrics().request_body_bytes(data.len());
            }
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        self.queue.push_back(h1::chunk_header(data.len()));
                        self.queue.push_back(data);
                        self.queue.push_back(Bytes::from_static(b"\r\n"));
                    }
                    Ok(data) => self.queue.push_back(data),
                    Err(frame) => {
                        // Trailers end the body; only chunked framing can carry them.
                        if let (true, Ok(mut trailers)) = (self.chunked, frame.into_trailers()) {
                            headers::strip_trailer_fields(&mut trailers);
                            self.queue.push_back(h1::chunked_end(Some(&trailers)));
                            self.ended = true;
                        }
                    }
                },
                None => {
                    if self.chunked {
                        self.queue.push_back(h1::chunked_end(None));
                    }
                    self.ended = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(SendError::Client(e))),
            }
        }
    }
}

impl UpstreamPool {
    /// Must be called within a Tokio runtime: it starts the pool's clock, the task that
    /// closes idle connections and times out requests.
    pub(crate) fn new(config: &ProxyConfig) -> UpstreamPool {
        let timeouts = &config.timeouts;
        let tick =
            (timeouts.upstream_idle / IDLE_STEPS).min(timeouts.upstream / TIMEOUT_STEPS).max(Duration::from_millis(5));
        let shared = Arc::new(Shared {
            address: config.upstream.address().clone(),
            connect_timeout: timeouts.upstream_connect,
            idle: Mutex::new(Vec::new()),
            step: AtomicU64::new(0),
            idle_steps: (timeouts.upstream_idle.as_nanos() / tick.as_nanos()).max(1) as u64,
            timeout: timeouts.upstream,
            // Rounded up, so that a request never fails early.
            timeout_steps: timeouts.upstream.as_nanos().div_ceil(tick.as_nanos()) as u64,
            waiting: Mutex::new(Slab::new()),
            keepalive: config.upstream_policy.keepalive,
        });
        tokio::spawn(run_clock(Arc::downgrade(&shared), tick));
        let http2 = (config.upstream.protocol() == UpstreamProtocol::H2c).then(|| Arc::new(Http2Pool::new(config)));
        UpstreamPool { shared, http2 }
    }

    /// The HTTP/2 connections, when the upstream is h2c.
    pub(crate) fn http2(&self) -> Option<&Http2Pool> {
        self.http2.as_deref()
    }

    /// `send_now`, failing with `UpstreamError::Timeout` when no response head has come
    /// within `--upstream-timeout`. With the response: how long connecting took (zero on a
    /// pooled connection).
    pub(crate) async fn send(
        &self,
        parts: &Parts,
        body: Incoming,
        added: &AddedFields,
    ) -> Result<(Response<UpstreamBody>, Duration), UpstreamError> {
        let shared = &*self.shared;
        let exchange = std::pin::pin!(self.send_now(parts, body, added));
        within_head_deadline(shared, exchange).await
    }

    /// The h2c upstream's exchange (`Http2Pool::send`), failing with `UpstreamError::Timeout`
    /// when no response head has come within `--upstream-timeout`, or within `deadline` (a
    /// gRPC call's own) if that is shorter. The usual wait is bounded by the pool's clock, as
    /// HTTP/1.1's is: no timer per request.
    pub(crate) async fn send_http2(
        &self,
        http2: &Http2Pool,
        parts: &Parts,
        body: Incoming,
        added: &AddedFields,
        te_trailers: bool,
        deadline: Option<Duration>,
    ) -> Result<(Response<Http2Body>, Duration), UpstreamError> {
        let shared = &*self.shared;
        // One exchange, pinned here, for either wait.
        let exchange = std::pin::pin!(http2.send(parts, body, added, te_trailers));
        if let Some(deadline) = deadline.filter(|d| *d < shared.timeout) {
            return tokio::time::timeout(deadline, exchange).await.map_err(|_| UpstreamError::Timeout(deadline))?;
        }
        within_head_deadline(shared, exchange).await
    }

    /// Sends the request head `parts` (hop-by-hop fields gone; its target goes in origin
    /// form) with the proxy's `added` fields (Host among them, if `parts` has none), and
    /// `body`, on an idle connection or a new one, and returns the response once its head
    /// has arrived. An idempotent request without a body that a pooled connection failed
    /// before any answer, because the upstream had just closed it, is sent once more, on a new
    /// connection. The connection goes back to the pool when the response body has been read
    /// to its end.
    async fn send_now(
        &self,
        parts: &Parts,
        body: Incoming,
        added: &AddedFields,
    ) -> Result<(Response<UpstreamBody>, Duration), UpstreamError> {
        let has_body = !body.is_end_stream();
        let framing = if has_body {
            if parts.headers.contains_key(CONTENT_LENGTH) {
                RequestFraming::AsGiven
            } else {
                RequestFraming::Chunked
            }
        } else if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
            && !parts.headers.contains_key(CONTENT_LENGTH)
        {
            RequestFraming::ZeroLength
        } else {
            RequestFraming::AsGiven
        };
        let mut body = has_body.then(|| {
            Box::new(RequestBody {
                body,
                chunked: framing == RequestFraming::Chunked,
                queue: VecDeque::new(),
                ended: false,
            })
        });
        let replayable = body.is_none() && parts.method.is_idempotent();
        let (mut connection, reused, mut connect_time) = match self.take_idle() {
            Some(connection) => (connection, true, Duration::ZERO),
            None => {
                let (connection, took) = self.connect_timed().await?;
                (connection, false, took)
            }
        };
        let head = (parts, added, framing);
        let result = match connection.exchange(head, &mut body).await {
            // Once, and on a new connection: an upstream that drops this request for its own
            // reasons must not see it again from every pooled connection.
            Err(e) if reused && replayable && e.is_stale_connection() => {
                (connection, connect_time) = self.connect_timed().await?;
                connection.exchange(head, &mut body).await
            }
            other => other,
        };
        Ok((self.response(result?, connection, body), connect_time))
    }

    fn response(
        &self,
        head: ResponseHead,
        connection: Box<UpstreamConnection>,
        pending_body: Option<Box<RequestBody>>,
    ) -> Response<UpstreamBody> {
        let switching = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
        let reusable = head.keep_alive && !switching;
        let body = if head.framing == Framing::Empty && pending_body.is_none() && !switching {
            if reusable {
                release(&self.shared, connection);
            }
            UpstreamBody::empty()
        } else {
            UpstreamBody::new(connection, head.framing, self.shared.clone(), reusable, pending_body)
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        response
    }

    /// The most recently used idle connection that is still open and quiet.
    fn take_idle(&self) -> Option<Box<UpstreamConnection>> {
        let mut idle = lock(&self.shared.idle);
        while let Some(IdleConnection { mut connection, .. }) = idle.pop() {
            if connection.is_quiet() {
                return Some(connection);
            }
        }
        None
    }

    /// A new connection, and how long it took (the access log's upstream connect time).
    async fn connect_timed(&self) -> Result<(Box<UpstreamConnection>, Duration), UpstreamError> {
        let started = Instant::now();
        let connection = self.connect().await?;
        Ok((connection, started.elapsed()))
    }

    async fn connect(&self) -> Result<Box<UpstreamConnection>, UpstreamError> {
        let shared = &self.shared;
        let stream = UpstreamStream::connect(&shared.address, shared.connect_timeout).await?;
        Ok(Box::new(UpstreamConnection {
            stream,
            read_buf: BytesMut::new(),
            request_head: Vec::with_capacity(512),
            head_reader: h1::HeadReader::default(),
        }))
    }
}

/// Back to the pool, for a connection whose response was read to its end and left nothing
/// unread behind it.
pub(super) fn release(pool: &Shared, mut connection: Box<UpstreamConnection>) {
    if !connection.read_buf.is_empty() || !pool.keepalive {
        return;
    }
    // After a large response (or request head) the buffer may be big; an idle connection
    // need not hold it.
    if connection.read_buf.capacity() > HEAD_READ {
        connection.read_buf = BytesMut::new();
    }
    if connection.request_head.capacity() > HEAD_READ {
        connection.request_head = Vec::new();
    }
    let idle_since_step = pool.step.load(Ordering::Relaxed);
    lock(&pool.idle).push(IdleConnection { connection, idle_since_step });
}

/// The pool's clock: every tick closes the connections idle for the whole idle timeout and
/// fails the requests that have waited for a response head for the whole timeout. Ends when
/// the pool is gone.
async fn run_clock(pool: Weak<Shared>, tick: Duration) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = pool.upgrade() else { return };
        let now = shared.step.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = lock(&shared.idle);
        if !idle.is_empty() {
            // Dropping a connection closes its socket.
            idle.retain(|c| now - c.idle_since_step < shared.idle_steps);
        }
        drop(idle);
        for (_, waiting) in lock(&shared.waiting).iter_mut() {
            if !waiting.expired && now >= waiting.expires_at_step {
                waiting.expired = true;
                if let Some(waker) = waiting.waker.take() {
                    waker.wake();
                }
            }
        }
    }
}
