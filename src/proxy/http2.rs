//! HTTP/2 with prior knowledge (h2c) to the app, for gRPC: the h2 crate's client, a few
//! connections per worker, each carrying many concurrent streams.
//!
//! Each connection's frames are owned by one task (its `h2::client::Connection`); a request
//! opens its stream from its own task, and a request body that is already whole when the
//! headers go out (a unary call's) is sent from there too. Only a body still streaming
//! (client-streaming or bidirectional calls) gets a task of its own, which moves it as the
//! app's flow-control window allows. The response body is the app's stream itself, its window
//! released as each frame is handed on to the client.
//!
//! A request the app did not process is sent again, once, on another connection: one refused
//! with REFUSED_STREAM (RFC 9113 §8.7), one above a GOAWAY's last stream id, or one the
//! connection never took. What was taken of its body is kept, up to `REPLAY_LIMIT`, so that
//! it can be sent again; a larger body that has already gone out in part is not retried.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{Builder, ResponseFuture, SendRequest};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, HOST, TE, USER_AGENT};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, Version};
use http_body_util::Empty;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::Builder as ProbeBuilder;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::body::BodyError;
use super::headers::AddedFields;
use super::stream::UpstreamStream;
use super::upstream::UpstreamError;
use crate::config::{ProxyConfig, UpstreamAddress};
use crate::metrics::{metrics, UpstreamFailure};
use crate::sys::lock;

/// Streams one connection carries before the worker opens another (the app's own
/// SETTINGS_MAX_CONCURRENT_STREAMS still bounds each; requests beyond it wait in h2).
const STREAMS_PER_CONNECTION: usize = 100;

/// Connections one worker keeps to the app at most.
const MAX_CONNECTIONS: usize = 4;

/// The most of a request body kept to send it again after the app refused its stream: gRPC
/// unary calls are small; a large stream that was refused midway fails instead. Also the most
/// the request's own task takes of a body before the headers go out.
const REPLAY_LIMIT: usize = 64 * 1024;

/// A connection with streams open is pinged this often, so that an app gone silent is found
/// out; an idle one is not (gRPC servers count pings without data as abuse).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow-control windows towards the proxy: a stream may have 256 KiB in flight, so that large
/// gRPC messages are not held to HTTP/2's 64 KiB, while a client that does not read makes the
/// proxy keep no more than that for its stream (a hostile client opening many streams would
/// otherwise pin a window each). Fixed rather than adaptive: the adaptive window pings the app
/// to measure the bandwidth-delay product, which costs every stream a little on loopback,
/// where the product is small anyway.
const STREAM_WINDOW: u32 = 256 << 10;
/// Room for every stream's window at once: a client that does not read holds its stream's
/// window (what the proxy keeps for it is bounded by that), and with a smaller connection
/// window a few such clients would stop every other call on the connection.
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * STREAMS_PER_CONNECTION as u32;

/// The largest response header block taken from the app, and what h2 may hold of a request
/// body beyond the app's window (one client frame at a time is handed to it).
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 1 << 20;

/// One worker's HTTP/2 connections to the app.
pub(crate) struct Http2Pool {
    address: UpstreamAddress,
    /// `:authority` for a request without any (an HTTP/1.0 client's).
    default_authority: HeaderValue,
    connect_timeout: Duration,
    connections: Mutex<Vec<Http2Connection>>,
    /// One connection opened at a time: a burst of requests at start must not open one each.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Http2Connection {
    sender: SendRequest<Bytes>,
    state: Arc<ConnectionState>,
}

#[derive(Default)]
struct ConnectionState {
    /// Streams open on it, request sent to response body ended.
    in_flight: AtomicUsize,
    /// Its task has ended: the connection is gone.
    closed: AtomicBool,
    /// A response head came on it: the app speaks HTTP/2.
    answered: AtomicBool,
}

/// Counts one stream on its connection while it lives.
pub(crate) struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn new(state: &Arc<ConnectionState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one attempt failed.
enum AttemptError {
    /// The connection took no stream for it: nothing reached the app.
    NotSent(h2::Error),
    /// The stream was opened, and then failed before the response head.
    Stream(h2::Error),
}

impl Http2Pool {
    pub(crate) fn new(config: &ProxyConfig) -> Http2Pool {
        Http2Pool {
            address: config.upstream.address().clone(),
            default_authority: config.upstream.host_header().clone(),
            connect_timeout: config.timeouts.upstream_connect,
            connections: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends the request (`parts` already rewritten for the app, `added` the proxy's fields)
    /// and returns the response once its head has arrived (`UpstreamPool::send_http2` bounds
    /// the wait). With the response: how long connecting took (zero on an open connection).
    pub(crate) async fn send(
        &self,
        parts: &Parts,
        body: Incoming,
        added: &AddedFields,
        te_trailers: bool,
    ) -> Result<(Response<Http2Body>, Duration), UpstreamError> {
        let mut body = RequestBody::new(body);
        // What the client has sent by now; the rest, if any, follows the headers.
        body.take_ready().await;
        if let Some(e) = body.client_error.take() {
            return Err(UpstreamError::ClientBody(e));
        }
        let mut connect_time = Duration::ZERO;
        let mut retried = false;
        loop {
            let (connection, took) = self.connection().await?;
            connect_time += took;
            // A retry builds its head again: no copy of it is kept for the usual single try.
            let request = self.request(parts, added, te_trailers);
            let error = match exchange(&connection, request, &mut body).await {
                Ok(response) => return Ok((response, connect_time)),
                Err(error) => error,
            };
            // The stream to the app was reset because the client's body failed.
            if let Some(client) = body.client_error.take() {
                return Err(UpstreamError::ClientBody(client));
            }
            let (not_processed, error) = match error {
                AttemptError::NotSent(e) => (true, e),
                AttemptError::Stream(e) => (not_processed(&e), e),
            };
            if not_processed || error.is_go_away() || error.is_io() {
                self.forget(&connection);
            }
            if retried || !not_processed || !body.can_replay() {
                return Err(UpstreamError::Http2 {
                    error,
                    app_answered: connection.state.answered.load(Ordering::Relaxed),
                });
            }
            tracing::debug!("the app did not process a request ({error}): sending it again on another connection");
            retried = true;
        }
    }

    /// The request head as HTTP/2 carries it: the authority (from `:authority` or Host) in
    /// the URI rather than a Host field, the proxy's fields added, and `TE: trailers` (the one
    /// TE HTTP/2 allows, which gRPC servers require) when the client sent it.
    fn request(&self, parts: &Parts, added: &AddedFields, te_trailers: bool) -> Request<()> {
        let mut headers = parts.headers.clone();
        let host = headers.remove(HOST);
        let authority = added.host.clone().or(host).unwrap_or_else(|| self.default_authority.clone());
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_bytes())
            .path_and_query(path.clone())
            .build()
            .or_else(|_| {
                Uri::builder().scheme("http").authority(self.default_authority.as_bytes()).path_and_query(path).build()
            })
            .unwrap_or_default();
        for (name, value) in added.iter().filter(|(name, _)| *name != "host") {
            headers.append(HeaderName::from_static(name), value.clone());
        }
        if te_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        let mut request = Request::new(());
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        request
    }

    /// The least busy open connection, or a new one when all are busy and there is room.
    async fn connection(&self) -> Result<(Http2Connection, Duration), UpstreamError> {
        if let Some(connection) = self.pick() {
            return Ok((connection, Duration::ZERO));
        }
        let _only_one = self.connecting.lock().await;
        // Another request may have opened one meanwhile.
        if let Some(connection) = self.pick() {
            return Ok((connection, Duration::ZERO));
        }
        let started = Instant::now();
        let connection = self.connect().await?;
        lock(&self.connections).push(connection.clone());
        Ok((connection, started.elapsed()))
    }

    fn pick(&self) -> Option<Http2Connection> {
        let mut connections = lock(&self.connections);
        connections.retain(|c| !c.state.closed.load(Ordering::Relaxed));
        let least = connections.iter().min_by_key(|c| c.state.in_flight.load(Ordering::Relaxed))?;
        let room = least.state.in_flight.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION;
        (room || connections.len() >= MAX_CONNECTIONS).then(|| least.clone())
    }

    /// Takes a connection out of use (it goes away once its streams end).
    fn forget(&self, connection: &Http2Connection) {
        lock(&self.connections).retain(|c| !Arc::ptr_eq(&c.state, &connection.state));
    }

    async fn connect(&self) -> Result<Http2Connection, UpstreamError> {
        let stream = UpstreamStream::connect(&self.address, self.connect_timeout).await?;
        let handshake = Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_max_send_streams(STREAMS_PER_CONNECTION)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(stream);
        let (sender, mut connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
            .map_err(|error| UpstreamError::Http2 { error, app_answered: false })?;
        let state = Arc::new(ConnectionState::default());
        let pings = connection.ping_pong();
        let watched = state.clone();
        tokio::spawn(async move {
            let ended = match pings {
                Some(pings) => tokio::select! {
                    ended = &mut connection => ended.err().map(|e| e.to_string()),
                    // Dropping the connection closes it, failing its streams.
                    silent = keepalive(pings, &watched) => Some(silent),
                },
                None => connection.await.err().map(|e| e.to_string()),
            };
            watched.closed.store(true, Ordering::Relaxed);
            if let Some(e) = ended {
                tracing::debug!("upstream HTTP/2 connection ended: {e}");
            }
        });
        Ok(Http2Connection { sender, state })
    }
}

/// Pings the app every `KEEPALIVE_INTERVAL` while streams are open; returns why the connection
/// must be given up (no answer within `KEEPALIVE_TIMEOUT`, or the ping could not go out).
async fn keepalive(mut pings: PingPong, state: &ConnectionState) -> String {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        if state.in_flight.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping: {e}"),
            Err(_) => return format!("no answer to a keep-alive ping within {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// One attempt on `connection`: opens the stream, sends what has been taken of `body` (and
/// hands the rest to a pump task), and waits for the response head. On failure, `body` holds
/// again all that a retry needs.
async fn exchange(
    connection: &Http2Connection,
    request: Request<()>,
    body: &mut RequestBody,
) -> Result<Response<Http2Body>, AttemptError> {
    let in_flight = InFlight::new(&connection.state);
    let mut sender = connection.sender.clone().ready().await.map_err(AttemptError::NotSent)?;
    let (response, mut stream) =
        sender.send_request(request, body.is_empty_and_ended()).map_err(AttemptError::NotSent)?;
    // Sending fails only on a stream already reset: the response future says why.
    let _ = body.send_taken(&mut stream);
    if body.rest.is_none() {
        return receive(response, in_flight, None).await.map_err(AttemptError::Stream);
    }
    let client_failed = Arc::new(AtomicBool::new(false));
    let (cancel, cancelled) = oneshot::channel();
    let cancel = CancelPump(Some(cancel));
    let pumped = tokio::spawn(pump(stream, std::mem::take(body), cancelled, client_failed.clone()));
    let response = match response.await {
        Ok(response) => response,
        Err(e) => {
            // The pump stops and gives back the body, for a retry or the client's error.
            drop(cancel);
            if let Ok(back) = pumped.await {
                *body = back;
            }
            return Err(AttemptError::Stream(e));
        }
    };
    // A response that ends before the request body (the app answered early) leaves the pump
    // sending; one the client gives up on cancels it.
    Ok(http2_response(response, in_flight, Some(cancel), Some(client_failed)))
}

async fn receive(
    response: ResponseFuture,
    in_flight: InFlight,
    cancel: Option<CancelPump>,
) -> Result<Response<Http2Body>, h2::Error> {
    let response = response.await?;
    let mut response = http2_response(response, in_flight, cancel, None);
    response.body_mut().take_early_data().await;
    Ok(response)
}

fn http2_response(
    response: Response<RecvStream>,
    in_flight: InFlight,
    cancel: Option<CancelPump>,
    client_failed: Option<Arc<AtomicBool>>,
) -> Response<Http2Body> {
    in_flight.0.answered.store(true, Ordering::Relaxed);
    let remaining =
        response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    response.map(|recv| Http2Body {
        recv,
        early: None,
        data_done: false,
        ended: false,
        remaining,
        _in_flight: in_flight,
        cancel,
        client_failed,
    })
}

/// True when the app certainly did not process the request: its stream was refused, or it was
/// above the last stream id of the app's GOAWAY (h2 reports those as a remote GOAWAY).
fn not_processed(error: &h2::Error) -> bool {
    (error.is_go_away() && error.is_remote()) || error.reason() == Some(Reason::REFUSED_STREAM)
}

/// Tells the pump task of a streaming request body that the client has gone: dropped with the
/// response (or the request, before any response), it resets the app's stream (CANCEL).
struct CancelPump(Option<oneshot::Sender<()>>);

impl CancelPump {
    /// The response ended whole: the pump may finish what the client still sends.
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for CancelPump {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            let _ = cancel.send(());
        }
    }
}

/// What a request body's attempts share: what was taken of the client's body, and the rest.
#[derive(Default)]
struct RequestBody {
    /// The client's body while more may come; `None` once it ended.
    rest: Option<Incoming>,
    /// Every data frame taken so far, while they total at most `REPLAY_LIMIT`.
    taken: Vec<Bytes>,
    taken_len: usize,
    /// More than `REPLAY_LIMIT` was taken: `taken` is given up.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    /// The client's body failed (a reset, a connection gone): the failure is the client's,
    /// whatever the app's stream then reports.
    client_error: Option<hyper::Error>,
}

impl RequestBody {
    fn new(body: Incoming) -> RequestBody {
        let rest = (!body.is_end_stream()).then_some(body);
        RequestBody { rest, ..RequestBody::default() }
    }

    /// Takes the frames the client has already sent, without waiting for more (a bidirectional
    /// call may wait for the app to speak first), and at most `REPLAY_LIMIT` of them.
    async fn take_ready(&mut self) {
        poll_fn(|cx| {
            while self.rest.is_some() && self.taken_len < REPLAY_LIMIT {
                if self.poll_take(cx, false).is_pending() {
                    break;
                }
            }
            Poll::Ready(())
        })
        .await
    }

    /// Takes the next frame of the client's body: a data frame is kept in `taken` and given
    /// back, trailers go to `trailers`. Ready when a frame was taken or the body ended or
    /// failed (`rest` is then `None`). With `sent`, the frames taken so far have all gone
    /// out, and are given up past `REPLAY_LIMIT`; without, nothing is dropped (they are yet
    /// to be sent).
    fn poll_take(&mut self, cx: &mut Context<'_>, sent: bool) -> Poll<Option<Bytes>> {
        let Some(rest) = self.rest.as_mut() else { return Poll::Ready(None) };
        let mut taken = None;
        match ready!(Pin::new(&mut *rest).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if rest.is_end_stream() {
                        self.rest = None;
                    }
                    self.keep(&data, sent);
                    taken = Some(data);
                }
                Err(frame) => {
                    self.trailers = frame.into_trailers().ok();
                    self.rest = None;
                }
            },
            None => self.rest = None,
            Some(Err(e)) => {
                self.client_error = Some(e);
                self.rest = None;
            }
        }
        Poll::Ready(taken)
    }

    fn keep(&mut self, data: &Bytes, sent: bool) {
        metrics().request_body_bytes(data.len());
        self.taken_len += data.len();
        if self.overflowed {
            return;
        }
        if sent && self.taken_len > REPLAY_LIMIT {
            self.overflowed = true;
            self.taken = Vec::new();
        } else {
            self.taken.push(data.clone());
        }
    }

    fn is_empty_and_ended(&self) -> bool {
        self.rest.is_none() && self.taken.is_empty() && self.trailers.is_none()
    }

    /// A new attempt could send the whole body again.
    fn can_replay(&self) -> bool {
        !self.overflowed && self.client_error.is_none()
    }

    /// Sends what has been taken on a new stream, ending it when the body has ended. The
    /// headers went out with END_STREAM when there is nothing at all.
    fn send_taken(&self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        if self.is_empty_and_ended() {
            return Ok(());
        }
        let last = self.taken.len();
        let ends_with_data = self.rest.is_none() && self.trailers.is_none();
        for (n, data) in self.taken.iter().enumerate() {
            stream.send_data(data.clone(), ends_with_data && n + 1 == last)?;
        }
        match (&self.trailers, self.rest.is_none()) {
            (Some(trailers), _) => stream.send_trailers(trailers.clone()),
            // Ended with no data (`taken` overflowed, or the end came alone).
            (None, true) if last == 0 => stream.send_data(Bytes::new(), true),
            _ => Ok(()),
        }
    }
}

/// Moves the rest of a streaming request body to the app as its window allows: one client frame
/// at a time is handed to h2, and the next is taken only once the app's window has room, so a
/// slow app slows the client instead of filling memory. Resets the app's stream when the
/// client's body fails or the client goes away (`cancelled`). Gives back the body's state.
async fn pump(
    mut stream: SendStream<Bytes>,
    mut body: RequestBody,
    mut cancelled: oneshot::Receiver<()>,
    client_failed: Arc<AtomicBool>,
) -> RequestBody {
    let mut watching = true;
    poll_fn(|cx| {
        loop {
            if watching {
                match Pin::new(&mut cancelled).poll(cx) {
                    Poll::Ready(Ok(())) => {
                        stream.send_reset(Reason::CANCEL);
                        return Poll::Ready(());
                    }
                    // The response ended whole: nothing more to watch.
                    Poll::Ready(Err(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
            // Room for at least a byte first (h2 takes the whole frame then, and holds what
            // exceeds the window; one frame is bounded by the client's own window).
            stream.reserve_capacity(1);
            if stream.capacity() == 0 {
                loop {
                    match ready!(stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        // The stream was reset or the connection went: the response says why.
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            let taken = ready!(body.poll_take(cx, true));
            if let Some(e) = &body.client_error {
                tracing::debug!("the client's request body failed ({e}): resetting the app's stream");
                client_failed.store(true, Ordering::Relaxed);
                stream.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
            let ended = body.rest.is_none();
            let sent = if let Some(data) = taken {
                stream.send_data(data, ended && body.trailers.is_none())
            } else if let Some(trailers) = &body.trailers {
                stream.send_trailers(trailers.clone())
            } else if ended {
                stream.send_data(Bytes::new(), true)
            } else {
                Ok(())
            };
            if sent.is_err() || ended {
                stream.reserve_capacity(0);
                return Poll::Ready(());
            }
        }
    })
    .await;
    body
}

/// A response body from the app, streamed to the client frame by frame, trailers included.
pub(crate) struct Http2Body {
    recv: RecvStream,
    /// What the first poll for data found while the head waited (`take_early_data`).
    early: Option<Option<Result<Bytes, h2::Error>>>,
    /// The data frames have all been taken: trailers (if any) are next.
    data_done: bool,
    ended: bool,
    /// What is left of the app's Content-Length, if it sent one.
    remaining: Option<u64>,
    _in_flight: InFlight,
    /// The request body's pump, when the request was still streaming.
    cancel: Option<CancelPump>,
    /// Set when the client's request body failed: the stream's end is then no upstream failure.
    client_failed: Option<Arc<AtomicBool>>,
}

impl Http2Body {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.data_done {
            let polled = match self.early.take() {
                Some(early) => early,
                None => ready!(self.recv.poll_data(cx)),
            };
            match polled {
                Some(Ok(data)) => {
                    // Handed on: the app may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    metrics().response_body_bytes(data.len());
                    if let Some(remaining) = self.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(self.failed(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(trailers) => {
                self.ended = true;
                if let Some(cancel) = self.cancel.as_mut() {
                    cancel.release();
                }
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Err(e) => Poll::Ready(Some(Err(self.failed(e)))),
        }
    }

    /// Apps often write a response's head and its first data frame apart (nginx does), and
    /// they then reach the proxy in separate reads. The head waits for that first frame
    /// for one turn of the event loop at most, so that the client gets both in one write,
    /// rather than a write each.
    async fn take_early_data(&mut self) {
        if self.recv.is_end_stream() {
            return;
        }
        let mut waited = false;
        poll_fn(|cx| match self.recv.poll_data(cx) {
            Poll::Ready(polled) => {
                self.early = Some(polled);
                Poll::Ready(())
            }
            Poll::Pending if !waited => {
                waited = true;
                // Woken again once every task now ready has run and the I/O driver has
                // been polled (or sooner, by the data).
                let turn = std::pin::pin!(tokio::task::yield_now());
                let _ = turn.poll(cx);
                Poll::Pending
            }
            Poll::Pending => Poll::Ready(()),
        })
        .await
    }

    fn failed(&mut self, e: h2::Error) -> BodyError {
        self.ended = true;
        // The app cancelling a stream is its answer (the client sees the same reset); a client
        // whose body failed cut it short itself; anything else cut the response short.
        let cancelled = e.reason() == Some(Reason::CANCEL);
        let client_failed = self.client_failed.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
        if !cancelled && !client_failed {
            tracing::warn!("response cut short: upstream HTTP/2 stream: {e}");
            metrics().upstream_failure(UpstreamFailure::Other);
        }
        BodyError::Http2(e)
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.ended || (self.early.is_none() && self.recv.is_end_stream())
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self.remaining {
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// Readiness with `--upstream-health-path` on an h2c upstream: `GET path` over HTTP/2 on
/// `stream`, answered 2xx.
pub(super) async fn probe(stream: UpstreamStream, path: &str, authority: &HeaderValue) -> Result<(), String> {
    let handshake = ProbeBuilder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await;
    let (mut sender, connection) = handshake.map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    // Ends once `sender` is dropped.
    tokio::spawn(connection);
    let uri = format!("http://{}{path}", authority.to_str().unwrap_or("localhost"));
    let request = Request::get(uri)
        .version(Version::HTTP_2)
        .header(USER_AGENT, "sidecar-readiness")
        .body(Empty::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("GET {path}: {e}"))?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("GET {path} answered {}", status.as_u16())),
    }
}
