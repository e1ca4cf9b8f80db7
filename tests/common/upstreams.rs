//! The upstreams the proxy forwards to: a stand-in for the legacy app (plain HTTP/1.1 on an
//! ephemeral loopback port) and a scripted one that writes exact bytes on the wire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{drain_body, empty, full, pattern_stream, TestBody};

/// What the upstream saw, for assertions.
#[derive(Default)]
pub struct UpstreamLog {
    pub connections: AtomicUsize,
    /// Connections that have ended, from either side.
    pub closed: AtomicUsize,
    pub requests: Mutex<Vec<SeenRequest>>,
    /// Lets `/drip` send its second chunk.
    pub drip: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub log: Arc<UpstreamLog>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn last_request(&self) -> SeenRequest {
        self.log.requests.lock().unwrap().last().cloned().expect("the upstream saw a request")
    }

    /// Routes:
    /// - `/slow/{ms}`: answers after `ms` milliseconds
    /// - `/bytes/{n}`: streams n bytes of the test pattern
    /// - `/count` (any method): reads the body as a stream, answers "count sum"
    /// - `/drip`: streams "first\n", then "second\n" once `log.drip` is notified
    /// - `/close`: answers, then closes its connection (`Connection: close`)
    /// - `/hop`: answers with hop-by-hop headers that a proxy must strip
    /// - `/ws`: WebSocket echo
    /// - anything else: 200 "hello from upstream"
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(UpstreamLog::default());
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(serve_http1(tcp, task_log.clone()));
            }
        });
        Upstream { addr, log, task }
    }

    /// The same app on a Unix socket at `path` (`addr` is then unspecified).
    pub async fn start_unix(path: &std::path::Path) -> Upstream {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let log = Arc::new(UpstreamLog::default());
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                tokio::spawn(serve_http1(stream, task_log.clone()));
            }
        });
        Upstream { addr: SocketAddr::from(([0, 0, 0, 0], 0)), log, task }
    }
}

async fn serve_http1<IO>(io: IO, log: Arc<UpstreamLog>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    log.connections.fetch_add(1, Ordering::SeqCst);
    let service_log = log.clone();
    let service = service_fn(move |req| handle(req, service_log.clone()));
    let _ =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades().await;
    log.closed.fetch_add(1, Ordering::SeqCst);
}

async fn handle(mut req: Request<Incoming>, log: Arc<UpstreamLog>) -> Result<Response<TestBody>, Infallible> {
    log.requests.lock().unwrap().push(SeenRequest {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let response = match segments.as_slice() {
        ["slow", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Response::new(full("slow response\n"))
        }
        ["bytes", n] => Response::new(pattern_stream(n.parse().unwrap_or(0))),
        ["drip"] => {
            let chunks = futures_util::stream::unfold(0, move |sent| {
                let log = log.clone();
                async move {
                    let chunk = match sent {
                        0 => "first\n",
                        1 => {
                            log.drip.notified().await;
                            "second\n"
                        }
                        _ => return None,
                    };
                    Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(chunk))), sent + 1))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        ["count"] => {
            let (count, sum) = drain_body(req.into_body()).await;
            Response::new(full(format!("{count} {sum}")))
        }
        ["close"] => Response::builder().header("connection", "close").body(full("closing\n")).unwrap(),
        ["hop"] => Response::builder()
            .header("connection", "keep-alive, x-upstream-private")
            .header("keep-alive", "timeout=5")
            .header("x-upstream-private", "secret")
            .header("proxy-authenticate", "Basic")
            .header("x-upstream-public", "visible")
            .body(full("hop\n"))
            .unwrap(),
        ["ws"] => websocket_echo(&mut req),
        _ => Response::new(full("hello from upstream\n")),
    };
    Ok(response)
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<TestBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Response::builder().status(StatusCode::BAD_REQUEST).body(full("not a websocket request")).unwrap();
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if ws.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
        .body(empty())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// A scripted upstream: exact bytes on the wire, for what a well-behaved app never sends.
// ---------------------------------------------------------------------------------------------

/// What the scripted upstream does after one response.
#[derive(Clone, Copy, PartialEq)]
pub enum After {
    KeepOpen,
    Close,
}

/// How many `GET /together` requests the scripted upstream holds until all have arrived.
pub const TOGETHER: usize = 5;

/// A raw HTTP/1.1 upstream: for each request head it reads, `script` gives the exact response
/// bytes, keyed by the request line. Bodies are read by Content-Length, or to the end of a
/// chunked body, whose text (trailers too) is kept after its head in `heads`; a request to a
/// path starting `/ignore-body` is answered without reading its body, as some apps do.
pub struct ScriptedUpstream {
    pub url: String,
    connections: Arc<AtomicUsize>,
    /// The request heads it received, in order.
    pub heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedUpstream {
    pub async fn start(script: fn(&str) -> (Vec<u8>, After)) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), heads.clone());
        let together = Arc::new(tokio::sync::Barrier::new(TOGETHER));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let (seen, together) = (seen.clone(), together.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = read_head(&mut tcp, &mut buf).await else { return };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        let request_line = head.lines().next().unwrap_or("").to_owned();
                        let mut record = head.clone();
                        if request_line.split(' ').nth(1).is_some_and(|p| p.starts_with("/ignore-body")) {
                            // The body stays in the buffer, to be read as the next request.
                        } else if head.to_ascii_lowercase().contains("\r\ntransfer-encoding: chunked\r\n") {
                            let Some(end) = read_chunked(&mut tcp, &mut buf).await else { return };
                            record.push_str(&String::from_utf8_lossy(&buf[..end]));
                            buf.drain(..end);
                        } else {
                            while buf.len() < length {
                                if !read_more(&mut tcp, &mut buf).await {
                                    return;
                                }
                            }
                            buf.drain(..length);
                        }
                        seen.lock().unwrap().push(record);
                        let request_line = request_line.as_str();
                        if request_line.starts_with("GET /together ") {
                            together.wait().await;
                        }
                        let (response, after) = script(request_line);
                        if tcp.write_all(&response).await.is_err() || after == After::Close {
                            return;
                        }
                    }
                });
            }
        });
        ScriptedUpstream { url, connections, heads, task }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn last_head(&self) -> String {
        self.heads.lock().unwrap().last().cloned().expect("the upstream saw a request")
    }
}

/// Reads until a complete request head is in `buf`; returns its length. `None`: closed.
async fn read_head(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        if !read_more(tcp, buf).await {
            return None;
        }
    }
}

/// Reads until a complete chunked body, trailers included, is in `buf`; returns its length.
/// `None`: closed, or not chunked framing.
async fn read_chunked(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut at = 0;
    loop {
        let Some(line) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            if !read_more(tcp, buf).await {
                return None;
            }
            continue;
        };
        let size_text = String::from_utf8_lossy(&buf[at..at + line]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let rest = &buf[at + line..];
                if let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Some(at + line + end + 4);
                }
                if !read_more(tcp, buf).await {
                    return None;
                }
            }
        }
        let next = at + line + 2 + size + 2;
        while buf.len() < next {
            if !read_more(tcp, buf).await {
                return None;
            }
        }
        at = next;
    }
}

/// Reads what has come into `buf`; false once the connection is closed (or failed).
async fn read_more(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// A WebSocket client of the echo route `/ws`, over a TLS stream already connected to the proxy
/// listening on `port`.
pub type EchoSocket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Upgrades `tls` to a WebSocket on `/ws` (101 required) and checks that `messages` text
/// messages come back as sent, one at a time; the socket is returned open.
pub async fn websocket_echoes(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    port: u16,
    messages: usize,
) -> EchoSocket {
    let url = format!("wss://localhost:{port}/ws");
    let (mut ws, response) = tokio_tungstenite::client_async(url, tls).await.expect("WebSocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..messages {
        let text = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), text);
    }
    ws
}
