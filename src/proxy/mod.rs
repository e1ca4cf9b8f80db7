//! Forwarding one request: rewrite its head, send it over the pool, map failures to 502/504,
//! and splice upgraded (WebSocket) connections.

pub(crate) mod body;
pub(crate) mod faults;
pub mod h1;
pub mod headers;
pub(crate) mod health;
pub(crate) mod http2;
pub(crate) mod stream;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::access_log::{AccessLog, ConnectionFacts, PendingEntry};
use crate::config::ProxyConfig;
use crate::metrics::{metrics, ClientFault, UpstreamFailure};
use crate::transport::LastResponse;
use faults::client_fault;
use stream::UpstreamStream;
use upstream::{UpstreamError, UpstreamPool};

/// The largest body of a connection's last response that the client socket holds until
/// close_notify, to send both, and the FIN, in one segment (see `transport`). A body that has
/// not arrived yet is waited for, as nginx's response buffering does; a larger or unsized one
/// streams as it comes.
const HELD_LAST_RESPONSE: u64 = 16 * 1024;

pub(crate) use body::{ProxyBody, UpstreamBody};

/// Everything one client connection needs to forward its requests, fixed when it was accepted.
pub(crate) struct ConnectionContext {
    pub(crate) config: Arc<ProxyConfig>,
    pub(crate) pool: UpstreamPool,
    pub(crate) peer: SocketAddr,
    /// The peer's IP, formatted once per connection rather than once per request.
    peer_ip: HeaderValue,
    /// The verified client certificate's subject, under mutual TLS.
    client_subject: Option<HeaderValue>,
    access_log: Option<(Arc<AccessLog>, ConnectionFacts)>,
    /// HTTP/1 connections: where a response that ends the connection is announced.
    last_response: Option<LastResponse>,
    /// Requests waiting for the app's response head: a connection that carries no bytes
    /// meanwhile is waiting for the app, not stalled by its client.
    awaiting_app: AtomicU32,
}

/// Counts a request as waiting for the app while it lives.
struct AwaitingApp<'a>(&'a AtomicU32);

impl<'a> AwaitingApp<'a> {
    fn new(count: &'a AtomicU32) -> AwaitingApp<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        AwaitingApp(count)
    }
}

impl Drop for AwaitingApp<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionContext {
    pub(crate) fn new(
        config: Arc<ProxyConfig>,
        pool: UpstreamPool,
        peer: SocketAddr,
        client_subject: Option<String>,
        access_log: Option<(Arc<AccessLog>, ConnectionFacts)>,
        last_response: Option<LastResponse>,
    ) -> ConnectionContext {
        let peer_ip =
            HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let client_subject = client_subject.and_then(|s| HeaderValue::from_str(&s).ok());
        ConnectionContext {
            config,
            pool,
            peer,
            peer_ip,
            client_subject,
            access_log,
            last_response,
            awaiting_app: AtomicU32::new(0),
        }
    }

    /// True while a request of this connection waits for the app's response head.
    pub(crate) fn is_awaiting_app(&self) -> bool {
        self.awaiting_app.load(Ordering::Relaxed) > 0
    }

    /// Forwards `request` to the upstream and returns its response, or the proxy's own error
    /// response. Never fails: every failure becomes a status code the client can act on.
    pub(crate) async fn forward(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let started = std::time::Instant::now();
        let version = request.version();
        let entry = self.access_log.as_ref().map(|(log, facts)| PendingEntry::begin(log, started, *facts, &request));
        let options = headers::ConnectionOptions::of(request.headers());
        // Every gRPC call is a POST: other requests skip the field lookup.
        let grpc = request.method() == Method::POST && headers::is_grpc(request.headers());
        // hyper closes the connection after answering a request that asks to close.
        let last = self.last_response.as_ref().filter(|_| options.close);
        let mut upstream_connect = None;
        // One future for the whole exchange, rather than a helper's: the request and the response
        // (~250 bytes each) were moved into and out of it by value, as `memcpy` calls.
        let response = 'response: {
            if request.method() == Method::CONNECT {
                break 'response plain_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "405 Method Not Allowed: CONNECT is not proxied\n".to_owned(),
                );
            }
            if let Some(reason) = headers::host_fault(version, request.headers()) {
                client_fault(ClientFault::BadRequest, self.peer, &reason);
                break 'response plain_response(StatusCode::BAD_REQUEST, format!("400 Bad Request: {reason}\n"));
            }
            if grpc && version != Version::HTTP_2 {
                client_fault(ClientFault::BadRequest, self.peer, &"gRPC request over HTTP/1");
                break 'response plain_response(
                    StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    "505 HTTP Version Not Supported: gRPC needs HTTP/2; this request came over HTTP/1 \
                     (the client must offer h2 in TLS ALPN)\n"
                        .to_owned(),
                );
            }
            let client_version = request.version();
            let http2 = self.pool.http2();
            // The one TE value that crosses a proxy (RFC 9113 §8.2.2): gRPC servers require it.
            let te_trailers = http2.is_some() && headers::te_trailers(request.headers());
            let wants_upgrade = http2.is_none()
                && request.version() == Version::HTTP_11
                && options.wants_upgrade(request.headers())
                && headers::upgrade_allowed(request.headers(), &self.config.upstream_policy.upgrade_protocols);
            let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));

            let (mut parts, body) = request.into_parts();
            let mut added = headers::prepare_request(
                &mut parts,
                &self.peer_ip,
                self.config.upstream.host_header(),
                self.config.forwarded,
                client_upgrade.is_some(),
            );
            added.client_subject.clone_from(&self.client_subject);
            let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);

            let awaiting = AwaitingApp::new(&self.awaiting_app);
            let sent = match http2 {
                None => self.pool.send(&parts, body, &added).await.map(|(r, t)| (r.map(ProxyBody::Upstream), t)),
                Some(http2) => {
                    // A gRPC deadline shorter than --upstream-timeout bounds the wait too.
                    let deadline = headers::grpc_timeout(&parts.headers);
                    // Boxed: inline, its state would grow the future of every HTTP/1.1 request.
                    let sent = Box::pin(self.pool.send_http2(http2, &parts, body, &added, te_trailers, deadline)).await;
                    sent.map(|(r, t)| (r.map(ProxyBody::Http2), t))
                }
            };
            drop(awaiting);
            let mut response = match sent {
                Ok((response, connect_time)) => {
                    upstream_connect = Some(connect_time);
                    response
                }
                Err(error @ UpstreamError::Timeout(timeout)) => {
                    let upstream = &self.config.upstream;
                    let method = &parts.method;
                    tracing::warn!(peer = %self.peer, %upstream, %method, path, "upstream gave no response within {timeout:?}");
                    metrics().upstream_failure(UpstreamFailure::Timeout);
                    break 'response plain_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("504 Gateway Timeout: upstream {upstream} {error}\n"),
                    );
                }
                // The client's fault, not the app's: no upstream failure to alert on.
                Err(UpstreamError::ClientBody(e)) => {
                    client_fault(ClientFault::RequestBody, self.peer, &format_args!("client request body failed: {e}"));
                    break 'response plain_response(
                        StatusCode::BAD_REQUEST,
                        "400 Bad Request: the request body could not be read\n".to_owned(),
                    );
                }
                Err(error) => {
                    break 'response self.bad_gateway(&parts.method, path, &error.describe(), error.is_connect())
                }
            };

            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            if switching {
                let upstream_side =
                    match std::mem::replace(response.body_mut(), ProxyBody::Upstream(UpstreamBody::empty())) {
                        ProxyBody::Upstream(body) => body.into_upgraded(),
                        _ => None,
                    };
                let (Some(client_side), Some(upstream_side)) = (client_upgrade, upstream_side) else {
                    let reason = h1::ProtocolError::UnexpectedUpgrade.to_string();
                    break 'response self.bad_gateway(&parts.method, path, &reason, false);
                };
                tokio::spawn(splice(client_side, upstream_side, self.peer));
                // The parser left every field of a 101 in place: `Upgrade` must reach the client.
                headers::strip_hop_by_hop(response.headers_mut(), true, headers::ClientClaims::Keep);
            }
            // An intermediary speaks its own HTTP version (RFC 9110 §6.2): an HTTP/1.0 app must
            // not downgrade, and so close, the client's keep-alive connection.
            *response.version_mut() = client_version;
            response
        };
        if let Some(last) = last {
            let small = hyper::body::Body::size_hint(response.body()).exact().is_some_and(|n| n <= HELD_LAST_RESPONSE);
            if small && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                last.announce();
            }
        }
        let elapsed = started.elapsed();
        metrics().request(version, response.status(), elapsed);
        if upstream_connect.is_some() {
            // The same clock reading: the proxy's own part of it is microseconds.
            metrics().upstream_response(elapsed);
        }
        // Metrics and the log keep the proxy's status (a 502 is a failure to alert on); a gRPC
        // client gets it as a grpc-status it understands.
        let grpc_error = (grpc && version == Version::HTTP_2)
            .then(|| response.extensions().get::<LocalError>().map(|e| (response.status(), e.0.clone())))
            .flatten();
        let response = match entry {
            None => response,
            Some(mut entry) => {
                entry.status = response.status();
                response.map(|body| match body {
                    local @ ProxyBody::Local(_) => {
                        entry.bytes = hyper::body::Body::size_hint(&local).exact().unwrap_or(0);
                        entry.finish();
                        local
                    }
                    upstream => {
                        entry.upstream_time = Some(elapsed);
                        entry.upstream_connect = upstream_connect;
                        ProxyBody::Logged(Box::new(body::LoggedBody::new(upstream, entry)))
                    }
                })
            }
        };
        match grpc_error {
            Some((status, message)) => grpc_response(status, &message),
            None => response,
        }
    }

    /// The 502 for a request the upstream did not answer properly, logged and counted.
    fn bad_gateway(&self, method: &Method, path: &str, reason: &str, connect: bool) -> Response<ProxyBody> {
        let upstream = &self.config.upstream;
        tracing::warn!(peer = %self.peer, %upstream, %method, path, "upstream request failed: {reason}");
        metrics().upstream_failure(if connect { UpstreamFailure::Connect } else { UpstreamFailure::Other });
        plain_response(StatusCode::BAD_GATEWAY, format!("502 Bad Gateway: upstream {upstream}: {reason}\n"))
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream's, after
/// what the upstream sent along with its 101.
async fn splice(client: OnUpgrade, (mut upstream, early): (UpstreamStream, Bytes), peer: SocketAddr) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(%peer, "protocol upgrade did not complete: {e}");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let copied = async {
        client.write_all(&early).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    if let Err(e) = copied.await {
        tracing::debug!(%peer, "upgraded connection ended: {e}");
    }
}

/// The text of a response the proxy made itself, kept for a gRPC client's `grpc-message`.
#[derive(Clone)]
struct LocalError(Bytes);

pub(crate) fn plain_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let body = Bytes::from(body);
    let mut response = Response::new(ProxyBody::Local(Full::new(body.clone())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.extensions_mut().insert(LocalError(body));
    response
}

/// The proxy's own answer `status` with `text` as gRPC says it (HTTP 200, a Trailers-Only
/// response: `grpc-status` and `grpc-message` in the head), as Envoy answers: a gRPC client
/// reads no HTTP status, so a 502 would reach it as a vague "UNAVAILABLE: 502".
fn grpc_response(status: StatusCode, text: &[u8]) -> Response<ProxyBody> {
    let code = match status {
        StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "14", // UNAVAILABLE
        StatusCode::METHOD_NOT_ALLOWED => "12", // UNIMPLEMENTED
        StatusCode::BAD_REQUEST => "13",    // INTERNAL
        _ => "2",                           // UNKNOWN
    };
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static(code));
    let message = headers::grpc_message(text.trim_ascii());
    headers.insert("grpc-message", HeaderValue::from_str(&message).unwrap_or(HeaderValue::from_static("proxy error")));
    response
}
