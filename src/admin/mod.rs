//! The admin listener: probes, status and control, on loopback by default.
//!
//! Read-only routes are open; routes that change state are POST only and, when a token file
//! is given, need `Authorization: Bearer <token>`. A non-loopback bind needs a token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, VARY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioTimer;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::{LiveState, ReloadHandle};
use crate::sync::{RollbackError, SyncManager};
use crate::sys::plain_http;

mod metrics;

#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot read admin token file {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: std::io::Error },
    #[error("admin token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error(
        "the admin API on {addr} would be reachable from other hosts: give --admin-token-file, or bind it to loopback"
    )]
    ExposedWithoutToken { addr: SocketAddr },
}

/// What the admin API reports on and acts upon for the proxy role.
pub(crate) struct ProxyAdmin {
    pub(crate) live: Arc<LiveState>,
    pub(crate) reload: ReloadHandle,
    pub(crate) https_addr: SocketAddr,
    pub(crate) redirect_addr: Option<SocketAddr>,
}

pub(crate) struct AdminState {
    started: Instant,
    token: Option<String>,
    /// Cancelled when shutdown starts: from then on the process reports not ready.
    shutdown: CancellationToken,
    pub(crate) proxy: Option<ProxyAdmin>,
    pub(crate) sync: Option<Arc<SyncManager>>,
    /// Built at the first scrape, once proxy and sync are known.
    metrics: std::sync::OnceLock<prometheus_client::registry::Registry>,
}

pub(crate) struct AdminServer {
    listener: TcpListener,
    state: Arc<AdminState>,
}

/// Reads the bearer token: the file's content with surrounding white space trimmed.
pub(crate) fn read_token(path: &Path) -> Result<String, AdminError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile { path: path.to_owned(), source })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(AdminError::EmptyToken { path: path.to_owned() });
    }
    Ok(token)
}

/// The token (if a file is given), and the rule that a non-loopback admin API needs one.
/// Separate from `bind` so that `sidecar check` applies the same rules without binding.
pub(crate) fn settings(addr: SocketAddr, token_file: Option<&Path>) -> Result<Option<String>, AdminError> {
    let token = token_file.map(read_token).transpose()?;
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(AdminError::ExposedWithoutToken { addr });
    }
    Ok(token)
}

impl AdminServer {
    pub(crate) fn bind(
        addr: SocketAddr,
        token_file: Option<&Path>,
        shutdown: CancellationToken,
    ) -> Result<AdminServer, AdminError> {
        let token = settings(addr, token_file)?;
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(|source| AdminError::Bind { addr, source })?;
        let state = AdminState {
            started: Instant::now(),
            token,
            shutdown,
            proxy: None,
            sync: None,
            metrics: Default::default(),
        };
        Ok(AdminServer { listener, state: Arc::new(state) })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub(crate) fn set_proxy(&mut self, proxy: ProxyAdmin) {
        Arc::get_mut(&mut self.state).expect("set before the server runs").proxy = Some(proxy);
    }

    pub(crate) fn set_sync(&mut self, sync: Arc<SyncManager>) {
        Arc::get_mut(&mut self.state).expect("set before the server runs").sync = Some(sync);
    }

    /// Serves until `stop` is cancelled. This is later than the shutdown token the state
    /// watches, so probes keep answering (not ready) while the proxy drains.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
        let state = self.state;
        let handle = move |request| {
            let state = state.clone();
            async move { route(&state, request).await }
        };
        plain_http::serve(self.listener, http, stop, "admin listener", handle).await;
    }
}

type AdminResponse = Response<Full<Bytes>>;

async fn route(state: &AdminState, request: Request<Incoming>) -> AdminResponse {
    let method = request.method().clone();
    match (request.uri().path(), &method) {
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok\n"),
        ("/readyz", &Method::GET | &Method::HEAD) => readiness(state).await,
        ("/status", &Method::GET | &Method::HEAD) => json_response(StatusCode::OK, status(state)),
        ("/metrics", &Method::GET | &Method::HEAD) => {
            let registry = state
                .metrics
                .get_or_init(|| metrics::registry(state.proxy.as_ref().map(|p| p.live.clone()), state.sync.clone()));
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = metrics::Exposition::negotiate(accept);
            let mut response = Response::new(Full::new(Bytes::from(metrics::encode(registry, format))));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
            response.headers_mut().insert(VARY, HeaderValue::from_static("Accept"));
            response
        }
        ("/reload", &Method::POST) => {
            if let Some(denied) = check_token(state, &request) {
                return denied;
            }
            match &state.proxy {
                Some(proxy) => match proxy.reload.reload().await {
                    Some(outcome) => {
                        let code =
                            if outcome.errors.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
                        json_response(code, json!(outcome))
                    }
                    None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
                },
                None => text(StatusCode::NOT_FOUND, "no proxy runs in this process\n"),
            }
        }
        ("/reload", _) => method_not_allowed("POST"),
        ("/healthz" | "/readyz" | "/status" | "/metrics", _) => method_not_allowed("GET, HEAD"),
        (path, _) if path == "/sync" || path.starts_with("/sync/") => sync_route(state, request).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn readiness(state: &AdminState) -> AdminResponse {
    let mut reasons = Vec::new();
    if state.shutdown.is_cancelled() {
        reasons.push("shutting down".to_owned());
    } else if let Some(proxy) = &state.proxy {
        // Requests to an app that is down would all get 502: the Pod must leave the Service.
        if let Err(reason) = proxy.live.upstream_health.status().await {
            reasons.push(reason);
        }
    }
    if let Some(sync) = &state.sync {
        reasons.extend(sync.not_ready());
    }
    if reasons.is_empty() {
        json_response(StatusCode::OK, json!({ "ready": true }))
    } else {
        json_response(StatusCode::SERVICE_UNAVAILABLE, json!({ "ready": false, "reasons": reasons }))
    }
}

fn status(state: &AdminState) -> Value {
    let mut status = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "shutting_down": state.shutdown.is_cancelled(),
    });
    if let Some(proxy) = &state.proxy {
        let serving = proxy.live.serving.load();
        let tls = proxy.live.tls.current();
        let certificates: Vec<Value> = tls
            .certs()
            .map(|c| {
                json!({
                    "file": c.cert_path,
                    "subject": c.info.subject,
                    "names": c.info.dns_names,
                    "serial": c.info.serial,
                    "not_after": c.info.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    "seconds_to_expiry": (c.info.not_after - time::OffsetDateTime::now_utc()).whole_seconds(),
                })
            })
            .collect();
        status["proxy"] = json!({
            "listen": proxy.https_addr,
            "redirect_http": proxy.redirect_addr,
            "upstream": serving.config.upstream.to_string(),
            "config_hash": serving.config.fingerprint(),
            "config_file": serving.config.config_file,
            "certificates": certificates,
            "client_ca": tls.client_ca,
            "reloads": proxy.live.stats.counts(),
        });
    }
    if let Some(sync) = &state.sync {
        status["sync"] = json!(sync.statuses());
    }
    status
}

/// `GET /sync`, `GET /sync/{name}`, `GET /sync/{name}/history`, `GET /sync/{name}/fleet`
/// (with --fleet: this instance's part and the fleet as etcd holds it), `POST /sync/{name}/rollback`
/// (the version from `?version=` or a JSON body `{"version": "ID or hash prefix"}`; without
/// one, the previous good version).
async fn sync_route(state: &AdminState, request: Request<Incoming>) -> AdminResponse {
    let Some(sync) = state.sync.clone() else {
        return text(StatusCode::NOT_FOUND, "no sync destination runs in this process\n");
    };
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    match (segments.as_slice(), &method) {
        (["sync"], &Method::GET | &Method::HEAD) => {
            json_response(StatusCode::OK, json!({ "destinations": sync.statuses() }))
        }
        (["sync", name], &Method::GET | &Method::HEAD) => match sync.status(name) {
            Some(status) => json_response(StatusCode::OK, json!(status)),
            None => unknown_destination(name),
        },
        (["sync", name, "history"], &Method::GET | &Method::HEAD) => match sync.history(name) {
            Some(versions) => json_response(StatusCode::OK, json!({ "name": name, "versions": versions })),
            None => unknown_destination(name),
        },
        (["sync", name, "fleet"], &Method::GET | &Method::HEAD) => match sync.fleet_view(name).await {
            Some(Ok(view)) => json_response(StatusCode::OK, view),
            Some(Err(None)) => json_response(
                StatusCode::NOT_FOUND,
                json!({ "error": format!("sync destination `{name}` runs without --fleet") }),
            ),
            Some(Err(Some(error))) => {
                let local = sync.status(name).and_then(|s| s.fleet);
                json_response(StatusCode::BAD_GATEWAY, json!({ "error": error, "local": local }))
            }
            None => unknown_destination(name),
        },
        (["sync", name, "rollback"], &Method::POST) => {
            if let Some(denied) = check_token(state, &request) {
                return denied;
            }
            let name = name.to_string();
            let from_query = request.uri().query().and_then(|q| {
                q.split('&').find_map(|pair| pair.strip_prefix("version=")).filter(|v| !v.is_empty()).map(str::to_owned)
            });
            let body =
                match http_body_util::BodyExt::collect(http_body_util::Limited::new(request.into_body(), 64 * 1024))
                    .await
                {
                    Ok(collected) => collected.to_bytes(),
                    Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
                };
            let from_body = if body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(value) => match value.get("version") {
                        Some(Value::String(v)) => Some(v.clone()),
                        Some(Value::Number(n)) => Some(n.to_string()),
                        None | Some(Value::Null) => None,
                        Some(_) => {
                            return json_response(
                                StatusCode::BAD_REQUEST,
                                json!({ "error": "`version` must be a string or a number" }),
                            )
                        }
                    },
                    Err(e) => {
                        return json_response(
                            StatusCode::BAD_REQUEST,
                            json!({ "error": format!("body is not JSON: {e}") }),
                        )
                    }
                }
            };
            match sync.rollback(&name, from_query.or(from_body)).await {
                Ok(report) => {
                    let code = if report.ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
                    json_response(code, json!(report))
                }
                Err(RollbackError::UnknownName(name)) => unknown_destination(&name),
                Err(RollbackError::Refused(e)) => {
                    json_response(StatusCode::CONFLICT, json!({ "error": e.to_string() }))
                }
                Err(e @ RollbackError::Stopped) => {
                    json_response(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e.to_string() }))
                }
            }
        }
        (["sync", _, "rollback"], _) => method_not_allowed("POST"),
        (["sync"] | ["sync", _] | ["sync", _, "history" | "fleet"], _) => method_not_allowed("GET, HEAD"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn unknown_destination(name: &str) -> AdminResponse {
    json_response(StatusCode::NOT_FOUND, json!({ "error": format!("no sync destination named `{name}`") }))
}

/// `Some(response)` when the request must be refused.
fn check_token(state: &AdminState, request: &Request<Incoming>) -> Option<AdminResponse> {
    let expected = state.token.as_deref()?;
    let presented =
        request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => None,
        _ => {
            let mut response = text(StatusCode::UNAUTHORIZED, "a valid bearer token is required\n");
            response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
            Some(response)
        }
    }
}

/// Compares without an early exit, so response time says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn json_response(status: StatusCode, body: Value) -> AdminResponse {
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn method_not_allowed(allow: &'static str) -> AdminResponse {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}
