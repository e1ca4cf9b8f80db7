//! The HTTPS listener: accept, handshake, serve HTTP/1.1 or HTTP/2, and drain on shutdown.
//!
//! A connection takes a permit from a semaphore sized `--max-connections` before it is
//! accepted, so the limit holds without a counter, and the drain is "wait until every permit
//! is back".

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::CONNECTION;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, AccessLogError, ConnectionFacts};
use crate::config::{upstream_socket, CertSource, ProxyConfig, SocketState, Upstream, UpstreamAddress};
use crate::devcert::{self, DevCertError};
use crate::metrics::{metrics, ClientFault, HandshakeFailure};
use crate::proxy::faults::client_fault;
use crate::proxy::upstream::UpstreamPool;
use crate::proxy::ConnectionContext;
use crate::proxy_protocol::{self, ProxyHeaderError};
use crate::sys::memory::return_freed_memory;
use crate::sys::shutdown::accept_until;
use crate::tls::{self, TlsContext, TlsError, TlsState};
use crate::transport::TlsSocket;
pub(crate) use live::{LiveState, ServingSnapshot};
use redirect::RedirectServer;
use reload::Reloader;
pub(crate) use reload::{ConfigSource, ReloadHandle};
use watch::{drive, wait_parked, ActivityIo, ConnectionWatch, Driven, Requests, ResponseBody, WatchWake};

mod live;
mod redirect;
mod reload;
mod watch;

/// How long the exit waits for the access log's writer to write what it was handed.
const ACCESS_LOG_FLUSH_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    DevCert(#[from] DevCertError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error("{0}")]
    UpstreamSocket(String),
}

/// Spawns each HTTP/2 stream's future on the current runtime, boxed first. The future holds the
/// whole forwarding state (kilobytes); boxed, it is moved once into the heap instead of being
/// copied through every layer of `tokio::spawn`.
#[derive(Clone, Copy)]
pub(crate) struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}

/// A bound, ready proxy. `start` does everything that can fail; `run` serves until shutdown.
pub(crate) struct ProxyServer {
    /// One listening socket per worker, all in one `SO_REUSEPORT` group.
    listeners: Vec<std::net::TcpListener>,
    local_addr: SocketAddr,
    access_log: Option<Arc<AccessLog>>,
    redirect: Option<RedirectServer>,
    live: Arc<LiveState>,
    reloader: Reloader,
    shutdown: CancellationToken,
}

impl ProxyServer {
    /// `config_source` reads the configuration again when the `--config` file changes; without
    /// it only certificates reload. Cancelling `shutdown` makes `run` stop accepting (after
    /// `--shutdown-delay`) and drain.
    pub(crate) fn start(
        config: ProxyConfig,
        config_source: Option<ConfigSource>,
        shutdown: CancellationToken,
    ) -> Result<ProxyServer, StartError> {
        if let UpstreamAddress::Unix(path) = config.upstream.address() {
            // Not there yet is fine: the app may start after the proxy (502 until then).
            if upstream_socket(path).map_err(StartError::UpstreamSocket)? == SocketState::Missing {
                tracing::warn!(
                    "upstream socket {} does not exist yet: answering 502 (gRPC: UNAVAILABLE) until the app creates it",
                    path.display()
                );
            }
        }
        let tls_context = TlsContext::new()?;
        if let CertSource::DevSelfSigned { state_dir } = &config.cert {
            let dev = devcert::ensure(tls_context.provider(), state_dir)?;
            tracing::warn!(
                "no --cert given: {} a self-signed development certificate for localhost, 127.0.0.1 and ::1 at {} (key {}); \
                 clients must trust it or skip verification (curl -k). For one that browsers and curl trust: \
                 `sidecar cert --install`, then --cert/--key as it prints",
                if dev.created { "created" } else { "reusing" },
                dev.cert_path.display(),
                dev.key_path.display(),
            );
        }
        let tls = tls_context.build(&config.tls_inputs())?;

        let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (listeners, local_addr) = bind_workers(config.listen, config.limits.max_connections, workers)?;
        let redirect = match config.redirect_http {
            Some(addr) => {
                let port = config.public_https_port.unwrap_or(local_addr.port());
                Some(RedirectServer::bind(addr, port, config.timeouts.header_read)?)
            }
            None => None,
        };
        let access_log = AccessLog::open(&config.access_log, config.access_log_format)?.map(Arc::new);
        let live = Arc::new(LiveState {
            serving: ArcSwap::from_pointee(ServingSnapshot::new(config)),
            tls: TlsState::new(tls),
            tls_context,
            stats: Default::default(),
            upstream_health: Default::default(),
        });
        let reloader = Reloader::new(live.clone(), config_source);
        Ok(ProxyServer { listeners, local_addr, access_log, redirect, live, reloader, shutdown })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(RedirectServer::local_addr)
    }

    pub(crate) fn live(&self) -> &Arc<LiveState> {
        &self.live
    }

    /// Asks the reloader for a reload and waits for its outcome (the admin API's `/reload`).
    pub(crate) fn reload_handle(&self) -> ReloadHandle {
        self.reloader.handle()
    }

    /// Serves until the shutdown token is cancelled and `--shutdown-delay` has passed, then stops
    /// accepting and drains. `admin_addr`, where the admin API answers, is named in the start-up
    /// line.
    pub(crate) async fn run(mut self, admin_addr: Option<SocketAddr>) {
        let shutdown = self.shutdown.clone();
        let snapshot = self.live.serving.load_full();
        let config = &snapshot.config;
        let tls = self.live.tls.current();
        let redirect_note = self
            .redirect
            .as_ref()
            .map(|r| format!("; redirecting http://{} to https", r.local_addr()))
            .unwrap_or_default();
        let admin_note = admin_addr.map(|addr| format!("; admin API on http://{addr}")).unwrap_or_default();
        let mtls_note = tls
            .client_ca
            .as_ref()
            .map(|ca| format!("; client certificates checked against {} ({:?})", ca.display(), config.client_auth))
            .unwrap_or_default();
        tracing::info!(
            "listening on https://{} (TLS 1.2/1.3, ALPN h2, http/1.1), forwarding to {}; certificate {} ({}){mtls_note}{redirect_note}{admin_note}",
            self.local_addr,
            config.upstream,
            tls.default.cert_path.display(),
            tls.default.info,
        );
        for extra in &tls.sni {
            tracing::info!(
                "SNI certificate {} ({}) for {}",
                extra.cert_path.display(),
                extra.info,
                extra.info.dns_names.join(", ")
            );
        }
        let max_connections = config.limits.max_connections;
        let drain_timeout = config.timeouts.drain;
        // Only readiness reads the app's health: without the admin API nothing is checked.
        if admin_addr.is_some() {
            let live = self.live.clone();
            let current = move || live.serving.load().config.clone();
            tokio::spawn(self.live.upstream_health.clone().run(current, shutdown.clone()));
        }
        drop((snapshot, tls));

        // Listeners and connections stop on this token, `--shutdown-delay` after `shutdown`.
        let stop_accepting = delayed_stop(&shutdown, &self.live);
        if let Some(redirect) = self.redirect.take() {
            tokio::spawn(redirect.run(stop_accepting.clone()));
        }
        tokio::spawn(self.reloader.run(shutdown.clone()));
        tokio::spawn(return_freed_memory(shutdown.clone()));
        let permits = Arc::new(Semaphore::new(max_connections as usize));
        let mut accepting = Vec::with_capacity(self.listeners.len());
        for (index, listener) in std::mem::take(&mut self.listeners).into_iter().enumerate() {
            // Workers stop accepting on `stop_accepting`, `--shutdown-delay` after the signal.
            let worker = Worker {
                access_log: self.access_log.clone(),
                permits: permits.clone(),
                live: self.live.clone(),
                shutdown: stop_accepting.clone(),
            };
            // A worker that cannot start drops its socket, which leaves the group: the kernel
            // then spreads connections over the others.
            match worker.spawn(listener, index) {
                Ok(stopped) => accepting.push(stopped),
                Err(e) => tracing::error!("cannot start worker thread {index}: {e}"),
            }
        }
        // Wait until every worker has stopped accepting; only then is the port closed.
        for stopped in accepting {
            let _ = stopped.await;
        }

        let open = max_connections as usize - permits.available_permits();
        if open > 0 {
            tracing::info!(
                "waiting up to {} for {open} open connection(s) to finish",
                humantime::format_duration(drain_timeout)
            );
        }
        let drained = tokio::time::timeout(drain_timeout, permits.acquire_many(max_connections)).await.is_ok();
        match drained {
            true => tracing::info!("all connections drained; exiting"),
            false => tracing::warn!(
                "drain timeout reached with {} connection(s) still open; exiting anyway",
                max_connections as usize - permits.available_permits()
            ),
        }
        // The writer thread may still hold the last requests' lines: the process must not
        // end before they are written.
        if let Some(log) = self.access_log.clone() {
            let flushed = tokio::task::spawn_blocking(move || log.flush(ACCESS_LOG_FLUSH_LIMIT)).await;
            if !matches!(flushed, Ok(true)) {
                tracing::warn!("the access log did not catch up before exit; its last lines may be lost");
            }
        }
    }
}

/// A token cancelled `--shutdown-delay` after `shutdown`. Until then new connections are still
/// accepted and served as usual, while readiness already fails: Kubernetes removes a terminating
/// Pod from its Service's endpoints (and load balancers stop sending) only some time later.
/// The delay is read from the live config when shutdown starts, so a reloaded value applies.
fn delayed_stop(shutdown: &CancellationToken, live: &Arc<LiveState>) -> CancellationToken {
    let stop = CancellationToken::new();
    let (shutdown, live, trigger) = (shutdown.clone(), live.clone(), stop.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        let delay = live.serving.load().config.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(
                "shutdown delay {}: still accepting and serving new connections while traffic is moved away (readiness fails already); signal again to exit at once",
                humantime::format_duration(delay)
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("no longer accepting connections, draining in-flight requests");
        trigger.cancel();
    });
    stop
}

/// Binds one listening socket per worker in a `SO_REUSEPORT` group, so that the kernel spreads
/// new connections over the workers by address hash. With one shared socket every worker woke
/// for every connection and the first awake took the whole queue: h2load's 64 connections,
/// opened at once, landed on one worker in about one run of three (65k instead of 100k
/// requests/s, 20% more CPU per request).
fn bind_workers(
    addr: SocketAddr,
    backlog: u32,
    workers: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    if addr.port() != 0 {
        // Another process's SO_REUSEPORT group (a second sidecar, say) would otherwise be joined
        // silently and share our traffic: a socket without the option must be able to bind.
        bound_socket(addr, false).map_err(err)?;
    }
    let first = bound_socket(addr, true).map_err(err)?;
    let local_addr = first.local_addr().map_err(err)?;
    let mut sockets = vec![first];
    for _ in 1..workers.max(1) {
        // Same port as the first, also when `addr` asked for an ephemeral one.
        sockets.push(bound_socket(local_addr, true).map_err(err)?);
    }
    let backlog = backlog.clamp(128, 4096);
    let listeners = sockets
        .into_iter()
        .map(|socket| socket.listen(backlog)?.into_std())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(err)?;
    Ok((listeners, local_addr))
}

fn bound_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    // Accepted connections inherit it (Linux): no setsockopt per connection.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// One thread with its own single-threaded runtime and its own upstream pool: a request, its
/// upstream connection and their wake-ups stay on one core, as in nginx's worker model. Each
/// worker accepts from its own socket of the listening group (see `bind_workers`).
struct Worker {
    access_log: Option<Arc<AccessLog>>,
    permits: Arc<Semaphore>,
    live: Arc<LiveState>,
    shutdown: CancellationToken,
}

impl Worker {
    /// Starts the thread; the receiver resolves when the worker has stopped accepting. The
    /// thread then keeps serving its open connections until the process exits.
    fn spawn(
        self,
        listener: std::net::TcpListener,
        index: usize,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (stopped, on_stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("sidecar-worker-{index}")).spawn(move || {
            runtime.block_on(async move {
                // Each thread's allocator heap is its own: this worker hands back what it freed.
                tokio::spawn(return_freed_memory(self.shutdown.clone()));
                match TcpListener::from_std(listener) {
                    Ok(listener) => self.accept_loop(&listener).await,
                    Err(e) => tracing::error!("worker {index} cannot use the listening socket: {e}"),
                }
                let _ = stopped.send(());
                std::future::pending::<()>().await;
            });
        })?;
        Ok(on_stopped)
    }

    async fn accept_loop(&self, listener: &TcpListener) {
        let mut pools = WorkerPool::default();
        let mut last_full_warning: Option<tokio::time::Instant> = None;
        loop {
            let Some((tcp, peer)) = accept_until(listener, &self.shutdown, "HTTPS listener").await else {
                return;
            };
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    if last_full_warning.is_none_or(|at| now.duration_since(at) > Duration::from_secs(10)) {
                        last_full_warning = Some(now);
                        let max = self.live.serving.load().config.limits.max_connections;
                        tracing::warn!("--max-connections ({max}) reached: new clients wait until a connection closes");
                    }
                    tokio::select! {
                        permit = self.permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            };
            // Both snapshots are read once here: this connection keeps them for its whole life.
            let snapshot = self.live.serving.load_full();
            let upstream = pools.pool_for(&snapshot.config);
            let acceptor = TlsAcceptor::from(self.live.tls.server_config());
            let access_log = self.access_log.clone();
            let serving = Serving { acceptor, snapshot, upstream, access_log };
            // Boxed: the connection future is kilobytes, and tokio moves a spawned future by value
            // through several calls (callgrind: 78k fewer instructions per connection boxed,
            // nearly all memcpy).
            tokio::spawn(Box::pin(serve_connection(tcp, peer, serving, self.shutdown.clone(), permit)));
        }
    }
}

/// The worker's upstream pool, kept across config reloads while the upstream and the pool's
/// settings stay the same, so that a reload does not throw away warm keep-alive connections.
#[derive(Default)]
struct WorkerPool {
    current: Option<(PoolSettings, UpstreamPool)>,
}

/// What an upstream pool is built with: a config that changes any of it needs a new pool.
#[derive(PartialEq, Eq)]
struct PoolSettings {
    upstream: Upstream,
    connect_timeout: Duration,
    idle_timeout: Duration,
    response_timeout: Duration,
    keepalive: bool,
}

impl PoolSettings {
    fn of(config: &ProxyConfig) -> PoolSettings {
        let timeouts = &config.timeouts;
        PoolSettings {
            upstream: config.upstream.clone(),
            connect_timeout: timeouts.upstream_connect,
            idle_timeout: timeouts.upstream_idle,
            response_timeout: timeouts.upstream,
            keepalive: config.upstream_policy.keepalive,
        }
    }
}

impl WorkerPool {
    fn pool_for(&mut self, config: &ProxyConfig) -> UpstreamPool {
        let settings = PoolSettings::of(config);
        match &self.current {
            Some((current, pool)) if *current == settings => pool.clone(),
            _ => {
                let pool = UpstreamPool::new(config);
                self.current = Some((settings, pool.clone()));
                pool
            }
        }
    }
}

/// What a connection is served with, fixed when it is accepted.
struct Serving {
    acceptor: TlsAcceptor,
    snapshot: Arc<ServingSnapshot>,
    upstream: UpstreamPool,
    access_log: Option<Arc<AccessLog>>,
}

/// Reads the PROXY protocol header (when configured) and completes the TLS handshake: the
/// stream and the client's address, or `None` when the connection is refused or abandoned.
async fn accept(
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    config: &ProxyConfig,
    shutdown: &CancellationToken,
) -> Option<(tokio_rustls::server::TlsStream<TlsSocket>, SocketAddr)> {
    let timeouts = &config.timeouts;
    // The PROXY header and the TLS handshake share one deadline: a balancer writes its header
    // at once, so it needs no allowance of its own, and a silent client is cut off on time.
    let deadline = tokio::time::Instant::now() + timeouts.tls_handshake;
    let peer = match config.proxy_protocol {
        false => peer,
        true => {
            // Like a handshake, a header being read holds no request: shutdown abandons it.
            let header = tokio::select! {
                header = tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut tcp)) => header,
                _ = shutdown.cancelled() => return None,
            };
            match header {
                Ok(Ok(header)) => {
                    let client = header.client_addr(peer);
                    tracing::trace!(%peer, %client, "PROXY protocol header: {header:?}");
                    client
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "connection refused: {e}");
                    metrics().handshake_failed(match e {
                        ProxyHeaderError::Truncated { .. } => HandshakeFailure::Eof,
                        ProxyHeaderError::Io(_) => HandshakeFailure::Io,
                        _ => HandshakeFailure::ProxyHeader,
                    });
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "connection refused: no complete PROXY protocol header within {:?}", timeouts.tls_handshake);
                    metrics().handshake_failed(HandshakeFailure::Timeout);
                    return None;
                }
            }
        }
    };
    // A handshake in progress holds no request: shutdown abandons it rather than waiting.
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(deadline, acceptor.accept(TlsSocket::new(tcp))) => handshake,
        _ = shutdown.cancelled() => return None,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            metrics().handshake_failed(HandshakeFailure::of(&e));
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not completed within {:?}", timeouts.tls_handshake);
            metrics().handshake_failed(HandshakeFailure::Timeout);
            return None;
        }
    };
    Some((stream, peer))
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    serving: Serving,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let Serving { acceptor, snapshot, upstream, access_log } = serving;
    let _open = metrics().connection_opened();
    // A task is sized for its largest state, and every local still in scope at an `.await`
    // has its place in it, moved out or not: so the handshake is boxed and gone once done,
    // and the stream and everything set up around it are out of scope before the connection
    // is served. An idle connection then keeps only what it waits with.
    let served = {
        let accepted = Box::pin(accept(tcp, peer, acceptor, &snapshot.config, &shutdown)).await;
        let Some((stream, peer)) = accepted else { return };
        metrics().handshake_ok();
        serve_tls(stream, peer, snapshot, upstream, access_log, shutdown)
    };
    served.await;
}

/// The future that serves an accepted TLS stream, boxed: HTTP/2 or HTTP/1.1 by ALPN.
fn serve_tls(
    mut stream: tokio_rustls::server::TlsStream<TlsSocket>,
    peer: SocketAddr,
    snapshot: Arc<ServingSnapshot>,
    upstream: UpstreamPool,
    access_log: Option<Arc<AccessLog>>,
    shutdown: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let timeouts = &snapshot.config.timeouts;
    stream.get_mut().0.handshake_finished();
    let (socket, session) = stream.get_ref();
    let client_subject = tls::client_subject(session.peer_certificates());
    let http2 = session.alpn_protocol() == Some(b"h2");
    let last_response = (!http2).then(|| socket.last_response());
    let access_log = access_log.map(|log| {
        let tls_version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "-",
        };
        let alpn = match session.alpn_protocol() {
            Some(b"h2") => "h2",
            Some(b"http/1.1") => "http/1.1",
            _ => "-",
        };
        (log, ConnectionFacts { client: peer.ip(), tls_version, alpn })
    });
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(ActivityIo::new(stream, activity.clone()));
    let context = Arc::new(ConnectionContext::new(
        snapshot.config.clone(),
        upstream,
        peer,
        client_subject,
        access_log,
        last_response,
    ));
    // ALPN decides the protocol (RFC 9113 §3.2: HTTP/2 over TLS is negotiated, never sniffed),
    // so the header-read timeout runs from the first byte; without ALPN it is HTTP/1.1.
    let requests = (!http2).then(|| Arc::new(Requests::default()));
    let watch = ConnectionWatch::new(
        timeouts.idle,
        activity,
        requests.clone().map(|requests| (timeouts.header_read, requests)),
    );
    let finish = WatchWake::new();
    let awaiting_app = {
        let context = context.clone();
        move || context.is_awaiting_app()
    };
    let cap = RequestCap::new(snapshot.config.upstream_policy.max_requests_per_connection, finish.clone(), http2);
    let service = service_fn(move |request| {
        let context = context.clone();
        let open = requests.as_ref().map(Requests::open);
        let last = cap.count(peer);
        async move {
            let mut cancelled = CancelledRequest(Some(peer));
            let mut response = context.forward(request).await;
            cancelled.0 = None;
            if last {
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response.map(|body| ResponseBody { body, _open: open }))
        }
    });
    if http2 {
        let connection = Box::pin(snapshot.http2.serve_connection(io, service));
        Box::pin(async move {
            let (mut connection, mut watch) = (connection, watch);
            let graceful = |c: Pin<&mut _>| hyper::server::conn::http2::Connection::graceful_shutdown(c);
            drive(connection.as_mut(), graceful, &mut watch, &finish, awaiting_app, None, &shutdown, peer).await;
        })
    } else {
        let served = ServedHttp1 { snapshot, watch, finish, shutdown, peer };
        Box::pin(served.serve(io, service, awaiting_app))
    }
}

/// What an HTTP/1 connection is served with across its parks.
struct ServedHttp1 {
    snapshot: Arc<ServingSnapshot>,
    watch: ConnectionWatch,
    finish: Arc<WatchWake>,
    shutdown: CancellationToken,
    peer: SocketAddr,
}

impl ServedHttp1 {
    /// Serves an HTTP/1.1 connection, parking it whenever it is found idle: hyper's connection
    /// (its 8 KiB read and write buffers, its dispatcher) is dropped, the task waits for the
    /// client's next bytes with only the TLS session held, and a new hyper connection then
    /// serves them, starting with whatever hyper had read and not used. nginx and HAProxy
    /// free an idle connection's buffers the same way. Parking happens at a tick of the
    /// connection's watch that finds it quiet since the tick before, so a busy connection never
    /// parks and costs nothing more per request.
    async fn serve<S>(mut self, mut io: Http1Io, mut service: S, awaiting_app: impl Fn() -> bool)
    where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = ResponseBody> + Unpin,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        loop {
            // Boxed, and no part of it in scope at the wait below: a parked connection keeps
            // only the stream, the service and what it waits with.
            let served = Box::pin(self.until_parked(io, service, &awaiting_app));
            match served.await {
                Some((parked_io, parked_service)) => (io, service) = (parked_io, parked_service),
                None => return,
            }
            if !wait_parked(io.inner_mut(), &mut self.watch, &self.shutdown, self.peer).await {
                return;
            }
        }
    }

    /// Serves with a new hyper connection until it ends (`None`) or is parked: then the stream,
    /// holding whatever hyper had read and not used, and the service.
    async fn until_parked<S>(
        &mut self,
        io: Http1Io,
        service: S,
        awaiting_app: &impl Fn() -> bool,
    ) -> Option<(Http1Io, S)>
    where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = ResponseBody> + Unpin,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let parking = io.inner().parking.clone();
        parking.store(false, Ordering::Relaxed);
        self.watch.connection_started();
        let mut connection = Box::new(self.snapshot.http1.serve_connection(io, service).with_upgrades());
        let graceful = |c: Pin<&mut _>| hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(c);
        let (watch, finish, shutdown, peer) = (&mut self.watch, &self.finish, &self.shutdown, self.peer);
        let driven =
            drive(Pin::new(&mut *connection), graceful, watch, finish, awaiting_app, Some(&parking), shutdown, peer)
                .await;
        // `None`: the connection was upgraded (a WebSocket), which has taken the stream.
        let parts = match (driven, connection.into_parts()) {
            (Driven::Parked, Some(parts)) => parts,
            _ => return None,
        };
        tracing::debug!(%peer, "idle connection parked: its HTTP/1 buffers are freed until the client sends again");
        let mut io = parts.io;
        // Copied, never kept as handed back: even empty, hyper's `read_buf` holds on to its
        // whole 8 KiB read buffer. What hyper read comes before what it had not read yet.
        if !parts.read_buf.is_empty() {
            let unread = &mut io.inner_mut().unread;
            *unread = [&parts.read_buf[..], &unread[..]].concat().into();
        }
        Some((io, parts.service))
    }
}

/// A client's stream as hyper's HTTP/1 server reads and writes it.
type Http1Io = TokioIo<ActivityIo<tokio_rustls::server::TlsStream<TlsSocket>>>;

/// Counts a request whose handling was dropped before its response head, as when an HTTP/2
/// client resets its stream (or any client goes away): invisible otherwise.
struct CancelledRequest(Option<SocketAddr>);

impl Drop for CancelledRequest {
    fn drop(&mut self) {
        if let Some(peer) = self.0 {
            client_fault(ClientFault::StreamCancelled, peer, &"request cancelled before its response");
        }
    }
}

/// `--max-requests-per-connection`: the requests one connection has started, and what ends it
/// at the cap (HTTP/1.1: `Connection: close` on the last response; HTTP/2: GOAWAY, as nginx does
/// after 1000). Without it one connection could start app requests and reset them forever.
struct RequestCap {
    limit: u32,
    started: AtomicU32,
    finish: Arc<WatchWake>,
    http2: bool,
}

impl RequestCap {
    fn new(limit: u32, finish: Arc<WatchWake>, http2: bool) -> RequestCap {
        RequestCap { limit, started: Default::default(), finish, http2 }
    }

    /// Counts one request; `true` when it is an HTTP/1.1 connection's last.
    fn count(&self, peer: SocketAddr) -> bool {
        // One connection's requests arrive on its task: no other writer.
        let started = self.started.load(Ordering::Relaxed).saturating_add(1);
        self.started.store(started, Ordering::Relaxed);
        if self.limit == 0 || started != self.limit {
            return false;
        }
        client_fault(ClientFault::RequestCap, peer, &format_args!("{started} requests on one connection: ending it"));
        if self.http2 {
            self.finish.request_finish();
        }
        !self.http2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listening_socket() {
        let (listeners, addr) = bind_workers("127.0.0.1:0".parse().unwrap(), 128, 1).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listeners[0].set_nonblocking(false).unwrap();
        let (accepted, _) = listeners[0].accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "small responses must not wait for Nagle's algorithm");
    }
}
