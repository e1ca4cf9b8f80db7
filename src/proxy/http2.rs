//! HTTP/2 with prior knowledge (h2c) to the app, for gRPC: hyper's HTTP/2 client connection,
//! a few per worker, each carrying many concurrent streams.
//!
//! Unlike the HTTP/1.1 path (`upstream`), a request here crosses into hyper's connection task:
//! HTTP/2 multiplexes one connection for many clients, so it needs one owner of its frames.
//!
//! A request the app did not process is sent again, once, on another connection: one refused
//! with REFUSED_STREAM (RFC 9113 §8.7), one above a GOAWAY's last stream id, or one the
//! connection never took. Its body is kept as it is sent, up to `REPLAY_LIMIT`, so that it can
//! be sent again; a larger body that has already gone out in part is not retried.

use std::error::Error as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, TE, USER_AGENT};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, Version};
use http_body_util::Empty;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::BodyError;
use super::headers::AddedFields;
use super::stream::UpstreamStream;
use super::upstream::UpstreamError;
use crate::config::{ProxyConfig, UpstreamAddress};
use crate::metrics::{metrics, UpstreamFailure};
use crate::sys::lock;

/// Streams one connection carries before the worker opens another (the app's own
/// SETTINGS_MAX_CONCURRENT_STREAMS still bounds each; requests beyond it wait in hyper).
const STREAMS_PER_CONNECTION: usize = 100;

/// Connections one worker keeps to the app at most.
const MAX_CONNECTIONS: usize = 4;

/// The most of a request body kept to send it again after the app refused its stream: gRPC
/// unary calls are small; a large stream that was refused midway fails instead.
const REPLAY_LIMIT: usize = 64 * 1024;

/// An idle connection is pinged this often, so that an app gone silent is found out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Flow-control windows towards the proxy: a stream may have 1 MiB in flight, a connection
/// 4 MiB, so that large gRPC messages are not held to HTTP/2's 64 KiB. Fixed rather than
/// adaptive: the adaptive window pings the app to measure the bandwidth-delay product, which
/// costs every stream a little on loopback, where the product is small anyway.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

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
    sender: SendRequest<ReplayBody>,
    /// Streams open on it, request sent to response body ended.
    in_flight: Arc<AtomicUsize>,
}

/// Counts one stream on its connection while it lives.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
        let (uri, mut headers) = self.request_head(parts, added, te_trailers);
        let replay = ReplayBody::new(body);
        {
            let mut connect_time = Duration::ZERO;
            let mut retried = false;
            loop {
                let (mut connection, took) = self.connection().await?;
                connect_time += took;
                let mut request = Request::new(replay.clone());
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = uri.clone();
                *request.version_mut() = Version::HTTP_2;
                // A retry builds its head again: no copy of it is kept for the usual single try.
                *request.headers_mut() = match retried {
                    false => std::mem::take(&mut headers),
                    true => self.request_head(parts, added, te_trailers).1,
                };
                let in_flight = InFlight::new(&connection.in_flight);
                match connection.sender.send_request(request).await {
                    Ok(response) => {
                        let response = response.map(|body| Http2Body { body, _in_flight: in_flight });
                        return Ok((response, connect_time));
                    }
                    Err(e) if !retried && not_processed(&e) && replay.can_replay() => {
                        tracing::debug!(
                            "the app did not process a request ({e}): sending it again on another connection"
                        );
                        self.forget(&connection);
                        retried = true;
                    }
                    Err(e) => {
                        if connection.sender.is_closed() {
                            self.forget(&connection);
                        }
                        // The stream to the app was reset because the client's body failed.
                        if let Some(client) = replay.client_error() {
                            return Err(UpstreamError::ClientBody(client));
                        }
                        return Err(UpstreamError::Http2(e));
                    }
                }
            }
        }
    }

    /// The request head as HTTP/2 carries it: the authority (from `:authority` or Host) in
    /// the URI rather than a Host field, the proxy's fields added, and `TE: trailers` (the one
    /// TE HTTP/2 allows, which gRPC servers require) when the client sent it.
    fn request_head(&self, parts: &Parts, added: &AddedFields, te_trailers: bool) -> (Uri, HeaderMap) {
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
        (uri, headers)
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
        connections.retain(|c| c.sender.is_ready());
        let least = connections.iter().min_by_key(|c| c.in_flight.load(Ordering::Relaxed))?;
        let room = least.in_flight.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION;
        (room || connections.len() >= MAX_CONNECTIONS).then(|| least.clone())
    }

    /// Takes a connection out of use (it goes away once its streams end).
    fn forget(&self, connection: &Http2Connection) {
        lock(&self.connections).retain(|c| !Arc::ptr_eq(&c.in_flight, &connection.in_flight));
    }

    async fn connect(&self) -> Result<Http2Connection, UpstreamError> {
        let stream = UpstreamStream::connect(&self.address, self.connect_timeout).await?;
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(Duration::from_secs(10));
        let handshake = builder.handshake::<_, ReplayBody>(TokioIo::new(stream));
        let (sender, connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
            .map_err(UpstreamError::Http2)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream HTTP/2 connection ended: {e}");
            }
        });
        Ok(Http2Connection { sender, in_flight: Arc::new(AtomicUsize::new(0)) })
    }
}

/// True when the app certainly did not process the request: its stream was refused, it was
/// above the last stream id of the app's GOAWAY (h2 reports those as a remote GOAWAY), or the
/// connection never took it.
fn not_processed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote()) || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    false
}

/// A response body from the app, streamed to the client frame by frame, trailers included.
pub(crate) struct Http2Body {
    body: Incoming,
    _in_flight: InFlight,
}

impl Http2Body {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    metrics().response_body_bytes(data.len());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The app cancelling a stream is its answer (the client sees the same reset);
                // anything else cut the response short.
                let cancelled = e
                    .source()
                    .and_then(|s| s.downcast_ref::<h2::Error>())
                    .is_some_and(|h2| h2.reason() == Some(h2::Reason::CANCEL));
                if !cancelled {
                    tracing::warn!("response cut short: upstream HTTP/2 stream: {e}");
                    metrics().upstream_failure(UpstreamFailure::Other);
                }
                Poll::Ready(Some(Err(BodyError::Http2(e))))
            }
            None => Poll::Ready(None),
        }
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What one request body's attempts share: the client's body, and what of it has been sent.
struct Replay {
    body: Incoming,
    /// Every data frame taken from `body` so far, while they total at most `REPLAY_LIMIT`.
    sent: Vec<Bytes>,
    sent_len: usize,
    /// Frames taken from `body`, kept or not.
    frames: usize,
    /// More than `REPLAY_LIMIT` went out: `sent` is given up.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The client's body failed (a reset, a connection gone): the failure is the client's,
    /// whatever the app's stream then reports.
    client_error: Option<hyper::Error>,
}

/// A request body that can be sent again from its start, by a clone made for another attempt.
#[derive(Clone)]
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Replay>>,
    /// Frames this attempt has sent.
    position: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    fn new(body: Incoming) -> ReplayBody {
        let replay = Replay {
            body,
            sent: Vec::new(),
            sent_len: 0,
            frames: 0,
            overflowed: false,
            trailers: None,
            ended: false,
            client_error: None,
        };
        ReplayBody { shared: Arc::new(Mutex::new(replay)), position: 0, trailers_sent: false }
    }

    /// A new attempt could send the whole body again.
    fn can_replay(&self) -> bool {
        let replay = lock(&self.shared);
        !replay.overflowed && replay.client_error.is_none()
    }

    /// How the client's body failed, if it did.
    fn client_error(&self) -> Option<hyper::Error> {
        lock(&self.shared).client_error.take()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut replay = lock(&this.shared);
        if this.position < replay.frames {
            if replay.overflowed {
                return Poll::Ready(Some(Err("the request body was too large to send again".into())));
            }
            let data = replay.sent[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if replay.ended {
            if let (false, Some(trailers)) = (this.trailers_sent, &replay.trailers) {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut replay.body).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    metrics().request_body_bytes(data.len());
                    replay.frames += 1;
                    this.position = replay.frames;
                    if !replay.overflowed {
                        replay.sent_len += data.len();
                        if replay.sent_len > REPLAY_LIMIT {
                            replay.overflowed = true;
                            replay.sent = Vec::new();
                        } else {
                            replay.sent.push(data.clone());
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    replay.ended = true;
                    this.trailers_sent = true;
                    replay.trailers = frame.trailers_ref().cloned();
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            None => {
                replay.ended = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                let shown = format!("the client's request body failed: {e}");
                replay.client_error = Some(e);
                Poll::Ready(Some(Err(shown.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let replay = lock(&self.shared);
        let all_sent = self.position == replay.frames && (self.trailers_sent || replay.trailers.is_none());
        all_sent && (replay.ended || replay.frames == 0 && replay.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let replay = lock(&self.shared);
        match (self.position, replay.frames) {
            (0, 0) => replay.body.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// Readiness with `--upstream-health-path` on an h2c upstream: `GET path` over HTTP/2 on
/// `stream`, answered 2xx.
pub(super) async fn probe(stream: UpstreamStream, path: &str, authority: &HeaderValue) -> Result<(), String> {
    let handshake = Builder::new(TokioExecutor::new())
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
