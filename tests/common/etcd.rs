//! A real etcd, as a sync source.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, http_exchange, wait_until, Sidecar};

/// A real etcd on loopback ports, with its data in a temp dir; killed on drop.
pub struct Etcd {
    pub proc: Option<Sidecar>,
    pub client_port: u16,
    peer_port: u16,
    pub data: tempfile::TempDir,
    /// With TLS on the client port (certificate, key): plain HTTP `/health` then answers on
    /// `metrics_port`, and the key helpers below (plain HTTP) do not apply.
    tls: Option<(PathBuf, PathBuf)>,
    metrics_port: u16,
}

impl Etcd {
    pub fn start() -> Etcd {
        let data = tempfile::tempdir().unwrap();
        let mut etcd =
            Etcd { proc: None, client_port: free_port(), peer_port: free_port(), data, tls: None, metrics_port: 0 };
        etcd.launch();
        etcd
    }

    /// Serving its clients over TLS with `cert` and `key`.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Etcd {
        let data = tempfile::tempdir().unwrap();
        let mut etcd = Etcd {
            proc: None,
            client_port: free_port(),
            peer_port: free_port(),
            data,
            tls: Some((cert.to_owned(), key.to_owned())),
            metrics_port: free_port(),
        };
        etcd.launch();
        etcd
    }

    /// Starts (again) on the same ports and data.
    pub fn launch(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(self.data.path().join("etcd"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null());
        let mut health = self.addr();
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            cmd.args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", self.metrics_port)]);
            health = SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        }
        self.proc = Some(Sidecar::spawn(cmd));
        let addr = health;
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

    /// The value of `key` now, `None` when it does not exist.
    pub fn get(&self, key: &str) -> Option<String> {
        self.get_prefix_range(key, None).into_iter().next().map(|(_, value)| value)
    }

    /// Every key starting with `prefix`, with its value, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        self.get_prefix_range(prefix, Some(&end))
    }

    fn get_prefix_range(&self, key: &str, end: Option<&[u8]>) -> Vec<(String, String)> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body = serde_json::json!({ "key": b64.encode(key) });
        if let Some(end) = end {
            body["range_end"] = serde_json::json!(b64.encode(end));
        }
        let answer = self.call("/v3/kv/range", body);
        let decode = |v: &serde_json::Value| String::from_utf8(b64.decode(v.as_str().unwrap_or("")).unwrap()).unwrap();
        answer["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
            .collect()
    }

    /// Drops the history before `revision` (etcd keeps `revision` itself).
    pub fn compact(&self, revision: i64) {
        self.call("/v3/kv/compaction", serde_json::json!({ "revision": revision.to_string(), "physical": true }));
    }

    pub fn delete(&self, key: &str) {
        use base64::Engine;
        self.call(
            "/v3/kv/deleterange",
            serde_json::json!({ "key": base64::engine::general_purpose::STANDARD.encode(key) }),
        );
    }

    /// Stops it and starts a new one on the same ports with an empty data dir: another
    /// cluster, whose revisions start again at 1 (as after a restore from an old snapshot).
    pub fn restart_empty(&mut self) {
        self.proc = None;
        self.data = tempfile::tempdir().unwrap();
        self.launch();
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
