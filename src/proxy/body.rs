//! The response body the proxy hands to hyper.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};

use super::h1::{self, ChunkState, Decoded, Framing, ProtocolError};
use super::http2::Http2Body;
use super::stream::UpstreamStream;
use super::upstream::{self, ReadDeadline, RequestBody, Shared, UpstreamConnection, UPSTREAM_READ_BUFFER};
use crate::access_log::PendingEntry;
use crate::metrics::{metrics, UpstreamFailure};

/// Upstream bodies stream through untouched; the proxy's own answers are small and whole; with
/// the access log on, an upstream body is counted and its entry written when it ends.
pub(crate) enum ProxyBody {
    Upstream(UpstreamBody),
    /// From an h2c app (`http2`).
    Http2(Http2Body),
    /// Boxed: the pending entry is large, and an enum is as big as its largest variant, so
    /// inline it would grow every response body, logged or not.
    Logged(Box<LoggedBody>),
    Local(Full<Bytes>),
}

/// Why an upstream response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("reading the upstream response body: {0}")]
    Io(std::io::Error),
    #[error("upstream closed the connection in the middle of the response body")]
    Closed,
    #[error("upstream response body: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the client's request body failed: {0}")]
    ClientBody(hyper::Error),
    #[error("upstream sent nothing more of the response body for {}", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    /// The source chain keeps h2's reason, which hyper's server passes on to the client in its
    /// RST_STREAM (an app's CANCEL stays a CANCEL).
    #[error("upstream HTTP/2 stream: {0}")]
    Http2(#[source] h2::Error),
}

/// Where reading an upstream body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
    Done,
}

/// An upstream response body, read straight from its connection, which goes back to the pool
/// once the body has been read to its end.
pub(crate) struct UpstreamBody {
    reading: Reading,
    connection: Option<Box<UpstreamConnection>>,
    /// The pool: its clock bounds the waits for more of the body, and the connection goes back
    /// to it afterwards if `reusable`.
    pool: Option<Arc<Shared>>,
    reusable: bool,
    /// The wait for the next bytes, bounded by `--upstream-timeout` as the head's was: an app
    /// that goes silent mid-body would otherwise hold client and connection forever.
    deadline: Option<ReadDeadline>,
    /// The rest of a request body the upstream answered before receiving all of.
    pending_request: Option<Box<RequestBody>>,
    /// A failure to report at the next poll (see `fail`).
    failed: Option<BodyError>,
}

impl UpstreamBody {
    pub(super) fn empty() -> UpstreamBody {
        UpstreamBody {
            reading: Reading::Done,
            connection: None,
            pool: None,
            reusable: false,
            deadline: None,
            pending_request: None,
            failed: None,
        }
    }

    pub(super) fn new(
        connection: Box<UpstreamConnection>,
        framing: Framing,
        pool: Arc<Shared>,
        reusable: bool,
        pending_request: Option<Box<RequestBody>>,
    ) -> UpstreamBody {
        let reading = match framing {
            Framing::Empty => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(ChunkState::Size),
            Framing::UntilClose => Reading::UntilClose,
        };
        UpstreamBody {
            reading,
            connection: Some(connection),
            pool: Some(pool),
            reusable,
            deadline: None,
            pending_request,
            failed: None,
        }
    }

    /// The connection of a 101 response, with what the upstream already sent past its head.
    pub(crate) fn into_upgraded(mut self) -> Option<(UpstreamStream, Bytes)> {
        let connection = *self.connection.take()?;
        Some((connection.stream, connection.read_buf.freeze()))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(error) = self.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(connection) = self.connection.as_mut() else { return Poll::Ready(None) };
        match RequestBody::poll_pending(&mut self.pending_request, cx, &mut connection.stream) {
            Ok(None) => {}
            Ok(Some(_)) => self.reusable = false,
            Err(e) => return self.fail(cx, BodyError::ClientBody(e)),
        }
        loop {
            let buf = &mut connection.read_buf;
            let step = match &mut self.reading {
                Reading::Done => Decoded::End,
                Reading::Length(0) => Decoded::End,
                Reading::Length(left) if !buf.is_empty() => {
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    Decoded::Data(buf.split_to(n as usize).freeze())
                }
                Reading::UntilClose if !buf.is_empty() => Decoded::Data(buf.split().freeze()),
                Reading::Length(_) | Reading::UntilClose => Decoded::More,
                Reading::Chunked(state) => match h1::decode_chunked(state, buf, UPSTREAM_READ_BUFFER) {
                    Ok(step) => step,
                    Err(e) => return self.fail(cx, e.into()),
                },
            };
            match step {
                Decoded::Data(data) => {
                    metrics().response_body_bytes(data.len());
                    // The last bytes of a sized body: the connection is free before hyper,
                    // which stops polling a body that reports its end, writes them.
                    if self.reading == Reading::Length(0) {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoded::Trailers(trailers) => {
                    // Trailers are a body's last frame: hyper polls no further.
                    self.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Decoded::End => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decoded::More => {}
            }
            let want = match self.reading {
                Reading::Length(left) => (left as usize).clamp(1024, UPSTREAM_READ_BUFFER),
                _ => UPSTREAM_READ_BUFFER,
            };
            let filled = match connection.poll_fill(cx, want) {
                Poll::Ready(filled) => filled,
                Poll::Pending => {
                    let Some(pool) = &self.pool else { return Poll::Pending };
                    // Made at the first wait: a body that came with its head never needs one.
                    let deadline = self.deadline.get_or_insert_with(|| ReadDeadline::start(pool));
                    if deadline.poll_expired(pool, cx) {
                        let timeout = pool.timeout;
                        return self.fail(cx, BodyError::Timeout(timeout));
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) if self.reading == Reading::UntilClose => {
                    self.reusable = false;
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(cx, BodyError::Closed),
                Ok(_) => {
                    if let (Some(pool), Some(deadline)) = (&self.pool, self.deadline.as_mut()) {
                        deadline.restart(pool);
                    }
                }
                Err(e) => return self.fail(cx, BodyError::Io(e)),
            }
        }
    }

    /// Ends the body with `error`, reported at the next poll rather than this one: hyper's
    /// HTTP/1 server drops what it has not flushed yet when a body fails, so a failure found in
    /// the same read as the head would otherwise lose the head too, and the client would see a
    /// closed connection instead of a response cut short.
    fn fail(&mut self, cx: &mut Context<'_>, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // The head is already on its way to the client, so only the log and the metrics can
        // tell an operator that the app cut a response short.
        match &error {
            BodyError::ClientBody(_) => {}
            BodyError::Timeout(_) => {
                tracing::warn!("response cut short: {error}");
                metrics().upstream_failure(UpstreamFailure::Timeout);
            }
            _ => {
                tracing::warn!("response cut short: {error}");
                metrics().upstream_failure(UpstreamFailure::Other);
            }
        }
        self.reading = Reading::Done;
        self.connection = None;
        self.clear_deadline();
        self.failed = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The body is complete: its connection goes back to the pool if it can be reused.
    fn finish(&mut self) {
        self.reading = Reading::Done;
        self.clear_deadline();
        let connection = self.connection.take();
        if let (Some(connection), Some(pool), None, true) =
            (connection, self.pool.take(), &self.pending_request, self.reusable)
        {
            upstream::release(&pool, connection);
        }
    }

    fn clear_deadline(&mut self) {
        if let (Some(pool), Some(deadline)) = (&self.pool, self.deadline.as_mut()) {
            deadline.clear(pool);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading == Reading::Done && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done if self.failed.is_none() => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A client gone mid-body: the wait leaves the pool's table.
        self.clear_deadline();
    }
}

/// An upstream body whose access-log entry is completed when it ends (or is dropped, when the
/// client goes away mid-body).
pub(crate) struct LoggedBody {
    inner: ProxyBody,
    entry: Option<PendingEntry>,
}

impl LoggedBody {
    pub(crate) fn new(inner: ProxyBody, entry: PendingEntry) -> LoggedBody {
        LoggedBody { inner, entry: Some(entry) }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            entry.finish();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(body) => body.poll_frame(cx),
            ProxyBody::Http2(body) => body.poll_frame(cx),
            ProxyBody::Local(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Logged(logged) => {
                let poll = Pin::new(&mut logged.inner).poll_frame(cx);
                match &poll {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(entry), Some(data)) = (logged.entry.as_mut(), frame.data_ref()) {
                            entry.bytes += data.len() as u64;
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        if let Some(entry) = logged.entry.take() {
                            entry.finish();
                        }
                    }
                    Poll::Pending => {}
                }
                poll
            }
        }
    }

    // Forwarded so that hyper frames the response as the upstream did (Content-Length).
    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::Http2(body) => body.is_end_stream(),
            ProxyBody::Logged(logged) => logged.inner.is_end_stream(),
            ProxyBody::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::Http2(body) => body.size_hint(),
            ProxyBody::Logged(logged) => logged.inner.size_hint(),
            ProxyBody::Local(body) => body.size_hint(),
        }
    }
}
