//! The keep-alive HTTP/1.1 connections to the upstream: one small pool per worker thread, and
//! how their failures are described.
//!
//! Built on hyper's connection API rather than hyper-util's general client: the upstream is one
//! fixed address, so there is no pool key to hash or URI to rebuild per request, and no task is
//! spawned to wait for a connection to become reusable. Measured with callgrind, that general
//! machinery was about a tenth of the proxy's user-space instructions per request.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::ProxyConfig;

/// The most one upstream read takes in (hyper's default grows to about 400 KiB). Large bodies
/// then flow in cache-sized pieces, and a pooled connection holds at most this much: with 1 MiB
/// responses, 64 KiB cut the proxy's CPU per response by about 12% against the default, the size
/// nginx's tuned `proxy_buffer_size` uses too. It also bounds the upstream's response head, as
/// that setting does in nginx.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// The idle timeout is checked in this many steps: an idle connection is closed after between
/// (STEPS-1)/STEPS and all of `--upstream-idle-timeout`, never later.
const IDLE_STEPS: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Request(hyper::Error),
}

impl UpstreamError {
    /// True when no connection could be opened, as opposed to a failure on an open one.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_))
    }

    /// A short, human reason: the innermost I/O cause when there is one ("connection
    /// refused"), else the deepest error message.
    pub fn describe(&self) -> String {
        match self {
            UpstreamError::Connect(io) => describe_io(io),
            UpstreamError::ConnectTimeout(_) => "connect timed out".to_owned(),
            UpstreamError::Request(error) => {
                let mut deepest = error.to_string();
                let mut source = error.source();
                while let Some(cause) = source {
                    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                        return describe_io(io);
                    }
                    deepest = cause.to_string();
                    source = cause.source();
                }
                deepest
            }
        }
    }
}

fn describe_io(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::TimedOut => "connect timed out".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset by the upstream".to_owned(),
        _ => io.to_string(),
    }
}

/// One worker's idle upstream connections. Cheap to clone; connections opened through it are
/// driven by tasks on the runtime it was created on.
#[derive(Clone)]
pub struct UpstreamPool {
    shared: Arc<Shared>,
}

struct Shared {
    host: String,
    port: u16,
    connect_timeout: Duration,
    /// Most recently used last: reuse takes from the end, so warm connections stay warm and
    /// the ones a burst left over age out at the front.
    idle: Mutex<Vec<IdleConnection>>,
    /// Advanced by the reaper every idle-timeout step; stamps when a connection went idle
    /// without a clock read per request.
    step: AtomicU64,
}

struct IdleConnection {
    sender: SendRequest<Incoming>,
    idle_since_step: u64,
}

impl UpstreamPool {
    /// Must be called within a Tokio runtime: it starts the task that closes idle connections.
    pub fn new(config: &ProxyConfig) -> UpstreamPool {
        let authority = config.upstream.authority();
        // `[::1]` in a URL is `::1` to the resolver.
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let shared = Arc::new(Shared {
            host,
            port: authority.port_u16().unwrap_or(80),
            connect_timeout: config.timeouts.upstream_connect,
            idle: Mutex::new(Vec::new()),
            step: AtomicU64::new(0),
        });
        let step = (config.timeouts.upstream_idle / IDLE_STEPS as u32).max(Duration::from_millis(5));
        tokio::spawn(close_idle_connections(Arc::downgrade(&shared), step));
        UpstreamPool { shared }
    }

    /// Sends `request` (origin-form URI, Host set) on an idle connection or a new one. A
    /// request that a reused connection gave back unsent, because the upstream had just closed
    /// it, is sent again on another connection. The returned [`PooledConnection`] goes back to
    /// the pool when the response body has been read to its end.
    pub async fn send(
        &self,
        mut request: Request<Incoming>,
    ) -> Result<(Response<Incoming>, PooledConnection), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take_idle().await {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let connection = PooledConnection { sender: Some(sender), pool: self.shared.clone() };
                    return Ok((response, connection));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(UpstreamError::Request(error.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open, once it is ready for a new
    /// request (it may still be finishing the response it was returned after).
    async fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        loop {
            let mut sender = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?.sender;
            if sender.is_ready() || (!sender.is_closed() && sender.ready().await.is_ok()) {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let shared = &self.shared;
        let tcp = tokio::time::timeout(shared.connect_timeout, TcpStream::connect((shared.host.as_str(), shared.port)))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(shared.connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(UpstreamError::Request)?;
        tokio::spawn(async move {
            // Its errors reach the request that was using it; here they are only noted.
            if let Err(e) = connection.with_upgrades().await {
                tracing::trace!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// Closes connections idle for the whole timeout; ends when the pool is gone.
async fn close_idle_connections(pool: Weak<Shared>, step: Duration) {
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = pool.upgrade() else { return };
        let now = shared.step.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.is_empty() {
            // Dropping the sender ends the connection's task, which closes the socket.
            idle.retain(|c| now - c.idle_since_step < IDLE_STEPS && !c.sender.is_closed());
        }
    }
}

/// The connection a response came on, held by its body.
pub struct PooledConnection {
    sender: Option<SendRequest<Incoming>>,
    pool: Arc<Shared>,
}

impl PooledConnection {
    /// Back to the pool, for a response read to its end. A connection whose response was cut
    /// short (the client went away) or upgraded is dropped instead, which closes it.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take().filter(|s| !s.is_closed()) {
            let idle_since_step = self.pool.step.load(Ordering::Relaxed);
            self.pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(IdleConnection { sender, idle_since_step });
        }
    }
}
