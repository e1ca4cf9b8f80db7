//! The optional plain-HTTP listener that sends every client to the HTTPS URL with a 308.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::StartError;
use crate::sys::plain_http;

pub(crate) struct RedirectServer {
    listener: TcpListener,
    https_port: u16,
    header_read_timeout: Duration,
}

impl RedirectServer {
    pub(crate) fn bind(
        addr: SocketAddr,
        https_port: u16,
        header_read_timeout: Duration,
    ) -> Result<RedirectServer, StartError> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(RedirectServer { listener, https_port, header_read_timeout })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout).keep_alive(false);
        let port = self.https_port;
        let handle = move |request: Request<Incoming>| std::future::ready(redirect(&request, port));
        plain_http::serve(self.listener, http, shutdown, "redirect listener", handle).await;
    }
}

/// `https://{host without port}[:port]{path?query}`; 400 when the client named no host.
pub(crate) fn redirect(request: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| request.uri().host());
    let Some(host) = host.map(strip_port).filter(|h| !h.is_empty()) else {
        let mut response =
            Response::new(Full::new(Bytes::from_static(b"400 Bad Request: no Host header to redirect to\n")));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location =
        if https_port == 443 { format!("https://{host}{path}") } else { format!("https://{host}:{https_port}{path}") };
    let Ok(location) = HeaderValue::from_str(&location) else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"400 Bad Request: unusable Host header\n")));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(LOCATION, location);
    response
}

/// `example.com:80` → `example.com`, `[::1]:80` → `[::1]`, `::1` stays as it is.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.rfind(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
