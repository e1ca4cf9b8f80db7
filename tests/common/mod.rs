//! Shared test harness: a real upstream app, the real `sidecar` binary, a test PKI made at test
//! time, and real TLS clients. Every process a test starts is killed when its handle drops.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A body of `len` bytes of a repeating pattern, produced chunk by chunk, never held whole.
pub fn pattern_stream(len: u64) -> TestBody {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= len {
                return None;
            }
            let n = (len - sent).min(CHUNK as u64) as usize;
            Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.slice(..n))), sent + n as u64))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Byte count and a position-sensitive checksum of a body, read as a stream.
pub async fn drain_body<B>(mut body: B) -> (u64, u64)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let (mut count, mut sum) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            for b in data.iter() {
                sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
            }
            count += data.len() as u64;
        }
    }
    (count, sum)
}

pub fn pattern_checksum(len: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..len {
        sum = sum.wrapping_mul(31).wrapping_add((i % (64 * 1024)) % 251);
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// The upstream: a stand-in for the legacy app, plain HTTP/1.1 on an ephemeral loopback port.
// ---------------------------------------------------------------------------------------------

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
                task_log.connections.fetch_add(1, Ordering::SeqCst);
                let log = task_log.clone();
                tokio::spawn(async move {
                    let service_log = log.clone();
                    let service = service_fn(move |req| handle(req, service_log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                    log.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, log, task }
    }
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
// Test PKI, made with rcgen at test time.
// ---------------------------------------------------------------------------------------------

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "sidecar test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let ca_pem = ca.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        TestPki { dir, ca_pem, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a leaf for `names`, valid from `not_before_days` to `not_after_days` relative to
    /// now, writes it as `{stem}.crt` / `{stem}.key` (PKCS#8) and returns the paths.
    pub fn issue_with(&self, stem: &str, names: &[&str], not_before_days: i64, not_after_days: i64) -> IssuedCert {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(not_before_days);
        params.not_after = now + time::Duration::days(not_after_days);
        let serial: [u8; 8] = rand_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_path = self.dir.path().join(format!("{stem}.crt"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let serial = serial.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        IssuedCert { cert: cert_path, key: key_path, serial }
    }

    pub fn issue(&self, stem: &str) -> IssuedCert {
        self.issue_with(stem, &["localhost", "127.0.0.1"], -1, 30)
    }
}

fn rand_serial() -> [u8; 8] {
    static COUNTER: AtomicUsize = AtomicUsize::new(1);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mixed = nanos ^ ((COUNTER.fetch_add(1, Ordering::SeqCst) as u64) << 48) ^ (std::process::id() as u64) << 20;
    let mut bytes = mixed.to_be_bytes();
    bytes[0] = (bytes[0] & 0x7f) | 0x10; // positive, and no leading zero byte to trim
    bytes
}

// ---------------------------------------------------------------------------------------------
// The sidecar binary.
// ---------------------------------------------------------------------------------------------

pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<LogLines>,
    /// Keeps the dev-cert state directory alive for the run.
    pub state_dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
pub struct LogLines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    closed: Mutex<bool>,
}

impl LogLines {
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a line containing `needle` appears; panics with the log after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || *self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
                // Release the lock before panicking, so the reader threads are not poisoned.
                let text = lines.join("\n");
                drop(lines);
                panic!("no log line containing {needle:?} within {timeout:?}; log so far:\n{text}");
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The socket address logged right after `marker` ("listening on https://ADDR ...",
    /// "; admin API on http://ADDR"), waiting for the line.
    pub fn address_after(&self, marker: &str, timeout: Duration) -> SocketAddr {
        let line = self.wait_for(marker, timeout);
        let addr = line.split(marker).nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        addr.trim_end_matches(';').parse().unwrap_or_else(|e| panic!("no address after {marker:?} ({e}): {line}"))
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }
}

pub fn sidecar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecar")
}

/// A `sidecar` command with an isolated environment: no SIDECAR_* or RUST_LOG leaks in.
pub fn sidecar_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SIDECAR_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl Sidecar {
    /// Starts `sidecar proxy ARGS --listen 127.0.0.1:0` and waits until it listens.
    pub fn start(args: &[&str]) -> Sidecar {
        Sidecar::start_with(args, |_| {})
    }

    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Sidecar {
        let state_dir = tempfile::tempdir().unwrap();
        let mut full_args = vec!["proxy", "--listen", "127.0.0.1:0"];
        full_args.extend_from_slice(args);
        let mut cmd = sidecar_command(&full_args);
        cmd.env("XDG_STATE_HOME", state_dir.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        configure(&mut cmd);
        let mut sidecar = Sidecar::spawn(cmd);
        sidecar.state_dir = Some(state_dir);
        sidecar.addr = sidecar.logs.address_after("listening on https://", Duration::from_secs(20));
        sidecar
    }

    /// Spawns any sidecar command and collects its stderr and stdout lines.
    pub fn spawn(mut cmd: Command) -> Sidecar {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the sidecar binary");
        let logs = Arc::new(LogLines::default());
        let streams: Vec<Box<dyn std::io::Read + Send>> =
            vec![Box::new(child.stderr.take().unwrap()), Box::new(child.stdout.take().unwrap())];
        let open = Arc::new(AtomicUsize::new(streams.len()));
        for stream in streams {
            let logs = logs.clone();
            let open = open.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    logs.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    logs.changed.notify_all();
                }
                if open.fetch_sub(1, Ordering::SeqCst) == 1 {
                    *logs.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    let _guard = logs.lines.lock().unwrap_or_else(|e| e.into_inner());
                    logs.changed.notify_all();
                }
            });
        }
        Sidecar { child, addr: "0.0.0.0:0".parse().unwrap(), logs, state_dir: None }
    }

    /// The admin API's address, from the start-up line ("; admin API on http://ADDR").
    pub fn admin_addr(&self) -> SocketAddr {
        self.logs.address_after("admin API on http://", Duration::from_secs(5))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sidecar did not exit within {timeout:?}; log:\n{}", self.logs.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a command that should stop by itself (a start-up failure, `check`, a tool) may run.
pub const EXIT_LIMIT: Duration = Duration::from_secs(15);

/// Runs `cmd` to its end and returns its output; a command still running after `limit` (a
/// sidecar that wrongly accepted its input and started serving) is killed and fails the test,
/// instead of hanging the suite.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.expect("collect the command's output"),
        Err(_) => {
            // Only the process started above, by its id.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let partial = rx
                .recv()
                .ok()
                .and_then(Result::ok)
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("{cmd:?} was still running after {limit:?}; its stderr:\n{partial}");
        }
    }
}

/// Runs `sidecar ARGS` to completion (for start-up failures), bounded by `EXIT_LIMIT`, and
/// returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = sidecar_command(args);
    cmd.env("XDG_STATE_HOME", state_dir.path());
    let output = output_within(cmd, EXIT_LIMIT);
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
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

/// A raw HTTP/1.1 upstream: for each request head it reads (bodies are read by Content-Length
/// only), `script` gives the exact response bytes, keyed by the request line.
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
                        while buf.len() < length {
                            if !read_more(&mut tcp, &mut buf).await {
                                return;
                            }
                        }
                        buf.drain(..length);
                        seen.lock().unwrap().push(head.clone());
                        let request_line = head.lines().next().unwrap_or("");
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

/// `sidecar proxy` in front of `upstream` (a URL) with a fresh leaf of `pki`, `extra` flags and
/// the command adjusted by `configure`.
pub fn start_sidecar(upstream: &str, pki: &TestPki, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Sidecar {
    let leaf = pki.issue("leaf");
    let mut args =
        vec!["--upstream", upstream, "--cert", leaf.cert.to_str().unwrap(), "--key", leaf.key.to_str().unwrap()];
    args.extend_from_slice(extra);
    Sidecar::start_with(&args, configure)
}

/// An upstream, a test PKI and a sidecar in front of the upstream with a leaf of that PKI.
pub async fn proxy_in_front_of_upstream(extra: &[&str]) -> (Upstream, TestPki, Sidecar) {
    proxy_in_front_of_upstream_with(extra, |_| {}).await
}

/// The same, with the sidecar's command adjusted first (environment variables, say).
pub async fn proxy_in_front_of_upstream_with(
    extra: &[&str],
    configure: impl FnOnce(&mut Command),
) -> (Upstream, TestPki, Sidecar) {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream.url(), &pki, extra, configure);
    (upstream, pki, sidecar)
}

// ---------------------------------------------------------------------------------------------
// Real TLS clients.
// ---------------------------------------------------------------------------------------------

pub fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// An HTTP/1.1 or HTTP/2 connection to the sidecar, over a verified TLS session.
pub enum HttpsConnection {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl HttpsConnection {
    pub async fn open(addr: SocketAddr, ca_pem: &[u8], http2: bool) -> HttpsConnection {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls =
            tls_connect(addr, client_config(ca_pem, alpn), "localhost").await.expect("TLS handshake with the sidecar");
        HttpsConnection::over(tls, http2).await
    }

    /// Speaks HTTP/2 or HTTP/1.1 over an established TLS session, checking that ALPN agreed.
    pub async fn over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, http2: bool) -> HttpsConnection {
        let negotiated = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let io = TokioIo::new(tls);
        if http2 {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]), "ALPN must select h2");
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            HttpsConnection::H2(send)
        } else {
            assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]), "ALPN must select http/1.1");
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            HttpsConnection::H1(send)
        }
    }

    pub async fn send(&mut self, mut request: Request<TestBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            HttpsConnection::H1(send) => {
                send.ready().await?;
                if !request.headers().contains_key("host") {
                    request.headers_mut().insert("host", "localhost".parse().unwrap());
                }
                send.send_request(request).await
            }
            HttpsConnection::H2(send) => {
                send.ready().await?;
                if request.uri().authority().is_none() {
                    let pq =
                        request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
                    *request.uri_mut() = format!("https://localhost{pq}").parse().unwrap();
                }
                send.send_request(request).await
            }
        }
    }

    /// GET `path`, returning status, headers and the body as text.
    pub async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, String) {
        let response = self.send(Request::get(path).body(empty()).unwrap()).await.expect("response");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The upstream's view of headers as a simple map (last value wins), for readable asserts.
pub fn header_map(headers: &http::HeaderMap) -> HashMap<String, String> {
    headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned())).collect()
}

pub fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A tool the tests need; in CI its absence is a failure (the CI script installs it).
pub fn require_tool(tool: &str) -> bool {
    if which(tool) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{tool} is required in CI (scripts/install-test-deps.sh installs it)");
    eprintln!("skipping: {tool} is not installed (run scripts/install-test-deps.sh)");
    false
}

pub fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Added for tests/sni_mtls.rs: a client that accepts any server certificate, and counted log waits.
// ---------------------------------------------------------------------------------------------

/// Accepts any server certificate, but still checks the handshake signatures (so the server
/// must hold the key of the certificate it presents).
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that skips server certificate verification (for names no certificate covers).
pub fn insecure_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

impl LogLines {
    /// Waits until at least `n` (1-based) lines contain `needle` and returns the `n`-th such
    /// line; panics with the log after `timeout`. For waiting on the next reload: take
    /// `count(needle)` before the change and wait for `count + 1`.
    pub fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> String {
        assert!(n >= 1, "wait_for_nth counts from 1");
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || *self.closed.lock().unwrap() {
                panic!(
                    "fewer than {n} log lines containing {needle:?} within {timeout:?}; log so far:\n{}",
                    lines.join("\n")
                );
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Added for tests/sync_*.rs: the stand-in legacy app, real etcd and nginx, a Consul-like
// long-poll server, a cuttable TCP relay, `sidecar sync` with its admin API, and small helpers.
// ---------------------------------------------------------------------------------------------

/// Starts the sidecar with these RLIMIT_NOFILE limits, as a shell's `ulimit -n` would.
pub fn with_open_file_limit(soft: u64, hard: u64) -> impl FnOnce(&mut std::process::Command) {
    move |cmd| {
        use std::os::unix::process::CommandExt;
        let limit = rustix::process::Rlimit { current: Some(soft), maximum: Some(hard) };
        // SAFETY: the closure runs in the forked child before exec; it makes one system call
        // and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).map_err(Into::into)
            })
        };
    }
}

/// A hard open-file limit above a soft one of 256 for a child: the test's own, at most 4096
/// (lowering it needs no privilege; 4096 is what a shell with a soft 1024 often has).
pub fn hard_open_file_limit_for_a_child() -> u64 {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(4096).min(4096);
    assert!(hard > 256, "these tests need a hard open-file limit above 256, not {hard}");
    hard
}

/// The soft and hard "Max open files" of a process, from /proc.
pub fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("/proc/PID/limits lists open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sockets in LISTEN state on `port` (IPv4 and IPv6), from /proc/net.
pub fn listeners_on(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else { continue };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                count += 1;
            }
        }
    }
    count
}

/// A port that was free a moment ago (for servers that cannot report the port they picked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One plain HTTP/1.1 exchange with `Connection: close`; returns (status, body). Blocking, so
/// it can be used from any test. `None` when the connection fails.
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tcp.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn http_get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_exchange(addr, "GET", path, &[], "").unwrap_or_else(|| panic!("GET {path} on {addr}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {status} {e}: {body}"))
}

/// The path of the stand-in legacy app, under tests/apps.
pub fn legacy_app_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/legacy_app.py")
}

/// The stand-in legacy app (tests/apps/legacy_app.py), killed (with its process group, when
/// it has one) on drop.
pub struct LegacyApp {
    pub proc: Sidecar,
    pub addr: SocketAddr,
    pub pid: u32,
    own_group: bool,
}

impl LegacyApp {
    /// `script` lets a test run a renamed copy (for --process-name); `own_group` puts it in a
    /// new process group.
    pub fn start_with(
        script: &Path,
        config: &Path,
        pid_file: Option<&Path>,
        child: bool,
        own_group: bool,
    ) -> LegacyApp {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("python3");
        cmd.arg("-u").arg(script).arg("--config").arg(config).stdin(Stdio::null());
        if let Some(pid_file) = pid_file {
            cmd.arg("--pid-file").arg(pid_file);
        }
        if child {
            cmd.arg("--child");
        }
        if own_group {
            cmd.process_group(0);
        }
        let proc = Sidecar::spawn(cmd);
        let line = proc.logs.wait_for("listening on ", Duration::from_secs(20));
        let mut words = line.split_whitespace().skip(2);
        let addr = words.next().and_then(|a| a.parse().ok()).expect("address in the app's first line");
        let pid = proc.pid();
        LegacyApp { proc, addr, pid, own_group }
    }

    pub fn start(config: &Path, pid_file: Option<&Path>) -> LegacyApp {
        LegacyApp::start_with(&legacy_app_script(), config, pid_file, false, false)
    }

    pub fn state(&self) -> serde_json::Value {
        http_get_json(self.addr, "/state")
    }

    pub fn hups(&self) -> u64 {
        self.state()["hups"].as_u64().unwrap_or(0)
    }

    pub fn health_url(&self) -> String {
        format!("http://{}/healthz", self.addr)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for LegacyApp {
    fn drop(&mut self) {
        if self.own_group {
            let _ =
                Command::new("kill").args(["-KILL", "--", &format!("-{}", self.pid)]).stderr(Stdio::null()).status();
        }
    }
}

/// `sidecar sync ARGS --admin 127.0.0.1:0`, started and waited for.
pub struct SyncProcess {
    pub proc: Sidecar,
    pub admin: SocketAddr,
}

impl SyncProcess {
    pub fn start(args: &[&str]) -> SyncProcess {
        let mut full = vec!["sync", "--admin", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let mut cmd = sidecar_command(&full);
        cmd.stdin(Stdio::null());
        let proc = Sidecar::spawn(cmd);
        let line = proc.logs.wait_for("admin API on http://", Duration::from_secs(20));
        let admin = line
            .split("admin API on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("admin address");
        SyncProcess { proc, admin }
    }

    /// The status of destination `name` from GET /sync/{name}.
    pub fn status(&self, name: &str) -> serde_json::Value {
        http_get_json(self.admin, &format!("/sync/{name}"))
    }

    pub fn state(&self, name: &str) -> String {
        self.status(name)["state"].as_str().unwrap_or("").to_owned()
    }

    /// Waits for `name` to be synced at the source's `revision`. A file already synced shows
    /// its new contents a moment before the status names their revision (the rename comes
    /// first), so a new version is waited for by its revision, not by the first synced status.
    pub fn wait_revision(&self, name: &str, revision: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(name, &format!("synced at {revision}"), timeout, |s| {
            s["state"] == "synced" && s["source_revision"] == revision
        })
    }

    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(name, state, timeout, |s| s["state"] == state)
    }

    /// Polls `name`'s status until `done` holds; on timeout the panic shows the last status
    /// and the log.
    fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.status(name);
            if done(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "sync {name} not {what} within {timeout:?}: {last:#}\nlog:\n{}",
                self.proc.logs.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads a file as text, "" when it does not exist.
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Writes by rename, as config writers do (so readers never see half a file).
pub fn replace_file(path: &Path, contents: &str) {
    let temp = path.with_extension("writing");
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Waits until `path` holds exactly `contents`.
pub fn wait_for_content(path: &Path, contents: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = read_text(path);
        if now == contents {
            return;
        }
        assert!(Instant::now() < deadline, "{} holds {now:?}, not {contents:?}, after {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real etcd on loopback ports, with its data in a temp dir; killed on drop.
pub struct Etcd {
    pub proc: Option<Sidecar>,
    pub client_port: u16,
    peer_port: u16,
    pub data: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let data = tempfile::tempdir().unwrap();
        let mut etcd = Etcd { proc: None, client_port: free_port(), peer_port: free_port(), data };
        etcd.launch();
        etcd
    }

    /// Starts (again) on the same ports and data.
    pub fn launch(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(self.data.path().join("etcd"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null());
        self.proc = Some(Sidecar::spawn(cmd));
        let addr = self.addr();
        wait_until(
            "etcd /health",
            Duration::from_secs(30),
            || matches!(http_exchange(addr, "GET", "/health", &[], ""), Some((200, body)) if body.contains("true")),
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn url(&self, key: &str) -> String {
        format!("etcd://127.0.0.1:{}{key}", self.client_port)
    }

    fn call(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, text) =
            http_exchange(self.addr(), "POST", path, &[("content-type", "application/json")], &body.to_string())
                .unwrap_or_else(|| panic!("etcd {path}"));
        assert_eq!(status, 200, "etcd {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn put(&self, key: &str, value: &str) -> i64 {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let answer = self.call("/v3/kv/put", serde_json::json!({ "key": b64.encode(key), "value": b64.encode(value) }));
        answer["header"]["revision"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0)
    }

    pub fn delete(&self, key: &str) {
        use base64::Engine;
        self.call(
            "/v3/kv/deleterange",
            serde_json::json!({ "key": base64::engine::general_purpose::STANDARD.encode(key) }),
        );
    }

    pub fn kill(&mut self) {
        self.proc = None;
    }

    pub fn signal(&self, name: &str) {
        if let Some(proc) = &self.proc {
            proc.signal(name);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A stopped etcd must be continued to die cleanly; SIGKILL works either way.
        self.proc = None;
    }
}

/// nginx serving `root` on a loopback port, not daemonized, everything in a temp dir. Its
/// access log (just the status codes) is at `access_log`.
pub struct Nginx {
    pub proc: Option<Sidecar>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_on(root, free_port())
    }

    pub fn start_on(root: &Path, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let mut nginx = Nginx { proc: None, port, dir, root: root.to_owned() };
        nginx.launch();
        nginx
    }

    pub fn launch(&mut self) {
        let d = self.dir.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n  log_format status '$status';\n  access_log {d}/access.log status;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:{};\n    root {};\n    location = /broken {{ return 500 \"<html>oops</html>\"; }}\n  }}\n}}\n",
            self.port,
            self.root.display()
        );
        let conf = self.dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(self.dir.path()).stdin(Stdio::null());
        self.proc = Some(Sidecar::spawn(cmd));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let error_log = self.dir.path().join("error.log");
        wait_until("nginx to listen", Duration::from_secs(20), || {
            assert!(!read_text(&error_log).contains("[emerg]"), "nginx failed: {}", read_text(&error_log));
            std::net::TcpStream::connect(addr).is_ok()
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Status codes of the requests served so far.
    pub fn statuses(&self) -> Vec<String> {
        read_text(&self.dir.path().join("access.log")).lines().map(str::to_owned).collect()
    }
}

/// A Consul-KV-like long-poll server written for the tests: `GET /v1/kv/KEY?raw&index=N&wait=W`
/// blocks while N equals the current index (up to W), answers with `X-Consul-Index`.
pub struct LongPollServer {
    pub addr: SocketAddr,
    pub shared: Arc<LongPollShared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct LongPollShared {
    pub value: Mutex<(Option<String>, u64)>,
    pub changed: tokio::sync::Notify,
    /// Every request's `index` parameter (None when absent), in order.
    pub requested: Mutex<Vec<Option<u64>>>,
    /// Hold every request forever (a silently stalled server).
    pub stall: std::sync::atomic::AtomicBool,
    /// Answer at once even when the index did not move (a misbehaving server).
    pub no_block: std::sync::atomic::AtomicBool,
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
    if shared.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = shared.changed.notified();
        let (value, current) = shared.value.lock().unwrap().clone();
        let blocking = index.is_some_and(|i| i == current) && !shared.no_block.load(Ordering::SeqCst);
        if !blocking || tokio::time::Instant::now() >= deadline {
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

/// A TCP relay to `target` that can cut every connection and refuse new ones, then resume.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (task_open, task_generation) = (open.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !task_open.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let mut cut = task_generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { addr, open, generation, task }
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether this test runs as root (mounts and chown need it).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}
