//! A Consul-KV-like long-poll server, as a sync source.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{empty, full, TestBody};

/// A Consul-KV-like long-poll server written for the tests: `GET /v1/kv/KEY?raw&index=N&wait=W`
/// blocks while N equals the current index (up to W), answers with `X-Consul-Index`.
/// `GET /v1/kv/PREFIX?recurse` answers Consul's JSON list of the keys set with `set_keys`
/// under PREFIX (values base64, a "folder" entry with a null value), 404 when there are none.
pub struct LongPollServer {
    pub addr: SocketAddr,
    pub shared: Arc<LongPollShared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct LongPollShared {
    pub value: Mutex<(Option<String>, u64)>,
    /// The whole KV store for `?recurse` queries: full key to value.
    pub keys: Mutex<std::collections::BTreeMap<String, String>>,
    pub changed: tokio::sync::Notify,
    /// Every request's `index` parameter (None when absent), in order.
    pub requested: Mutex<Vec<Option<u64>>>,
    /// Hold every request forever (a silently stalled server).
    pub stall: std::sync::atomic::AtomicBool,
    /// Answer at once even when the index did not move (a misbehaving server).
    pub no_block: std::sync::atomic::AtomicBool,
    /// The ACL token every request must carry in X-Consul-Token, as Consul with ACLs on: 403
    /// `ACL not found` otherwise.
    pub token: Mutex<Option<String>>,
}

impl LongPollServer {
    pub async fn start() -> LongPollServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(LongPollShared::default());
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let shared = task_shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| long_poll(req, shared.clone()));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        LongPollServer { addr, shared, task }
    }

    /// Sets the value (None: the key is absent) and the index.
    pub fn set(&self, value: Option<&str>, index: u64) {
        *self.shared.value.lock().unwrap() = (value.map(str::to_owned), index);
        self.shared.changed.notify_waiters();
    }

    /// Replaces every key (for `?recurse`) and sets the index, in one step.
    pub fn set_keys(&self, keys: &[(&str, &str)], index: u64) {
        *self.shared.keys.lock().unwrap() = keys.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.shared.value.lock().unwrap().1 = index;
        self.shared.changed.notify_waiters();
    }

    pub fn requests(&self) -> Vec<Option<u64>> {
        self.shared.requested.lock().unwrap().clone()
    }
}

impl Drop for LongPollServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn long_poll(req: Request<Incoming>, shared: Arc<LongPollShared>) -> Result<Response<TestBody>, Infallible> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let param = |name: &str| query.split('&').find_map(|p| p.strip_prefix(&format!("{name}="))).map(str::to_owned);
    let index: Option<u64> = param("index").and_then(|i| i.parse().ok());
    let wait = param("wait").and_then(|w| humantime_like(&w)).unwrap_or(Duration::from_secs(300));
    shared.requested.lock().unwrap().push(index);
    let wanted = shared.token.lock().unwrap().clone();
    if let Some(wanted) = wanted {
        if req.headers().get("x-consul-token").and_then(|v| v.to_str().ok()) != Some(wanted.as_str()) {
            return Ok(Response::builder().status(StatusCode::FORBIDDEN).body(full("ACL not found")).unwrap());
        }
    }
    if shared.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = shared.changed.notified();
        let (value, current) = shared.value.lock().unwrap().clone();
        let blocking = index.is_some_and(|i| i == current) && !shared.no_block.load(Ordering::SeqCst);
        if !blocking || tokio::time::Instant::now() >= deadline {
            if query.split('&').any(|p| p == "recurse") {
                let prefix = req.uri().path().strip_prefix("/v1/kv/").unwrap_or("").to_owned();
                return Ok(recurse(&shared.keys.lock().unwrap(), &prefix, current));
            }
            let response = match value {
                Some(v) => Response::builder().header("x-consul-index", current.to_string()).body(full(v)).unwrap(),
                None => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("x-consul-index", current.to_string())
                    .body(empty())
                    .unwrap(),
            };
            return Ok(response);
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// Consul's answer to `?recurse`: every key under `prefix`, the prefix itself as a folder.
fn recurse(keys: &std::collections::BTreeMap<String, String>, prefix: &str, index: u64) -> Response<TestBody> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut entries: Vec<serde_json::Value> = keys
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| serde_json::json!({ "Key": k, "Value": b64.encode(v), "ModifyIndex": index, "Flags": 0 }))
        .collect();
    if entries.is_empty() {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header("x-consul-index", index.to_string())
            .body(empty())
            .unwrap();
    }
    entries.insert(0, serde_json::json!({ "Key": prefix, "Value": null, "ModifyIndex": 1, "Flags": 0 }));
    Response::builder()
        .header("x-consul-index", index.to_string())
        .header("content-type", "application/json")
        .body(full(serde_json::Value::from(entries).to_string()))
        .unwrap()
}

fn humantime_like(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(secs) = s.strip_suffix('s') {
        return secs.parse().ok().map(Duration::from_secs);
    }
    if let Some(mins) = s.strip_suffix('m') {
        return mins.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    None
}
