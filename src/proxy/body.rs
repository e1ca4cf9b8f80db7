//! The response body the proxy hands to hyper.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::upstream::PooledConnection;
use crate::access_log::PendingEntry;

/// Upstream bodies stream through untouched; the proxy's own answers are small and whole; with
/// the access log on, an upstream body is counted and its entry written when it ends.
pub enum ProxyBody {
    Upstream(UpstreamBody),
    /// Boxed: the pending entry is large, and an enum is as big as its largest variant, so
    /// inline it would grow every response body, logged or not.
    Logged(Box<LoggedBody>),
    Local(Full<Bytes>),
}

/// An upstream response body; the connection it came on goes back to the pool once the body
/// has been read to its end.
pub struct UpstreamBody {
    inner: Incoming,
    connection: Option<PooledConnection>,
}

impl UpstreamBody {
    /// `connection` is `None` for a connection that must not be reused (an upgraded one).
    pub fn new(inner: Incoming, connection: Option<PooledConnection>) -> UpstreamBody {
        UpstreamBody { inner, connection }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = poll {
            self.release();
        }
        poll
    }

    fn release(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.release();
        }
    }
}

impl Drop for UpstreamBody {
    // A body hyper never polls (empty, HEAD) ends here; one cut short drops its connection.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// An upstream body whose access-log entry is completed when it ends (or is dropped, when the
/// client goes away mid-body).
pub struct LoggedBody {
    inner: UpstreamBody,
    entry: Option<PendingEntry>,
}

impl LoggedBody {
    pub fn new(inner: UpstreamBody, entry: PendingEntry) -> LoggedBody {
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
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(body) => body.poll_frame(cx),
            ProxyBody::Local(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Logged(logged) => {
                let poll = logged.inner.poll_frame(cx);
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
            ProxyBody::Upstream(body) => body.inner.is_end_stream(),
            ProxyBody::Logged(logged) => logged.inner.inner.is_end_stream(),
            ProxyBody::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.inner.size_hint(),
            ProxyBody::Logged(logged) => logged.inner.inner.size_hint(),
            ProxyBody::Local(body) => body.size_hint(),
        }
    }
}
