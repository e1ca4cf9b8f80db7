//! A small plain-HTTP/1.1 listener, shared by the admin API and the redirect listener.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::shutdown::accept_until;

/// Accepts connections until `stop` is cancelled and answers each request with `handle`.
/// `what` names the listener in logs.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    http: http1::Builder,
    stop: CancellationToken,
    what: &'static str,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Some((tcp, _)) = accept_until(&listener, &stop, what).await else { return };
        let handle = handle.clone();
        let connection = http.serve_connection(
            TokioIo::new(tcp),
            service_fn(move |request| {
                let response = handle(request);
                async move { Ok::<_, Infallible>(response.await) }
            }),
        );
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}
