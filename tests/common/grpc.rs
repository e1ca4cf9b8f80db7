//! A real gRPC server and client (Python grpcio, tests/apps/grpc_app.py and grpc_client.py)
//! for the h2c upstream tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{output_within, read_text, wait_until, Sidecar, TestPki};

fn app_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps").join(name)
}

/// Whether Python's grpcio is there; in CI its absence fails the test (the test script
/// installs it).
pub fn require_grpcio() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "python3 grpcio is required in CI (scripts/install-test-deps.sh)");
    eprintln!("skipping: python3 grpcio is not installed (run scripts/install-test-deps.sh)");
    false
}

/// The gRPC test app, killed on drop. `events` is what it reports (see grpc_app.py).
pub struct GrpcApp {
    pub proc: Sidecar,
    /// The TCP port, or 0 on a Unix socket.
    pub port: u16,
    pub events: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl GrpcApp {
    /// On `address`: `127.0.0.1:0`, `127.0.0.1:PORT` or `unix:/PATH`.
    pub fn start(address: &str) -> GrpcApp {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events");
        let mut app = GrpcApp::start_with_events(address, &events);
        app._dir = Some(dir);
        app
    }

    /// Reporting into `events`, which another app may share (a restarted app).
    pub fn start_with_events(address: &str, events: &Path) -> GrpcApp {
        std::fs::write(events, "").unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg("-u").arg(app_script("grpc_app.py")).arg(address).arg(events).stdin(Stdio::null());
        let proc = Sidecar::spawn(cmd);
        let line = proc.logs.wait_for("listening on ", Duration::from_secs(30));
        let port = line.trim().rsplit(' ').next().and_then(|p| p.parse().ok()).expect("the app's port");
        GrpcApp { proc, port, events: events.to_owned(), _dir: None }
    }

    pub fn events(&self) -> Vec<String> {
        read_text(&self.events).lines().map(str::to_owned).collect()
    }

    /// Waits until a line of `events` equals `line`.
    pub fn wait_for_event(&self, line: &str, timeout: Duration) {
        wait_until(&format!("the app to report {line:?}"), timeout, || self.events().iter().any(|l| l == line));
    }

    /// The distinct connections the app's calls came on.
    pub fn peers(&self) -> std::collections::BTreeSet<String> {
        self.events().iter().filter_map(|l| l.strip_prefix("peer ")).map(str::to_owned).collect()
    }
}

/// Runs grpc_client.py `scenario` against the proxy on `port`, trusting `pki`'s CA, and returns
/// the JSON line it prints.
pub fn grpc_client(pki: &TestPki, port: u16, scenario: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.arg("-u").arg(app_script("grpc_client.py")).arg(pki.ca_path()).arg(format!("localhost:{port}")).args(scenario);
    let output = output_within(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpc_client.py {scenario:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("grpc_client.py printed {stdout:?} ({e}): {stderr}"))
}

/// A gRPC call's request head, for a raw HTTP/2 client (`h2_client`).
pub fn grpc_post(path: &str) -> http::Request<()> {
    http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// `payload` framed as one gRPC message (uncompressed).
pub fn grpc_message(payload: &[u8]) -> bytes::Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    framed.into()
}
