//! A real etcd, as a sync source.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, http_exchange, wait_until, IssuedCert, Sidecar, TestPki};

/// A real etcd on loopback ports, with its data in a temp dir; killed on drop.
pub struct Etcd {
    pub proc: Option<Sidecar>,
    pub client_port: u16,
    peer_port: u16,
    pub data: tempfile::TempDir,
    /// More etcd flags (e.g. `--auth-token-ttl`).
    extra: Vec<String>,
    /// Set by `enable_auth`: the harness's own calls authenticate as root with it.
    root_password: Option<String>,
    /// Client URLs over TLS with `--client-cert-auth`: the server's certificate and the
    /// harness's own client certificate, both from `pki`.
    pub tls: Option<EtcdTls>,
}

pub struct EtcdTls {
    pub pki: TestPki,
    pub server: IssuedCert,
    /// The harness's client certificate (curl uses it for puts).
    pub client: IssuedCert,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(&[])
    }

    /// With more etcd flags.
    pub fn start_with(extra: &[&str]) -> Etcd {
        Etcd::build(extra, None)
    }

    /// Serving clients over TLS only, with `--client-cert-auth`: a client needs a certificate
    /// signed by `pki`'s CA.
    pub fn start_tls(pki: TestPki) -> Etcd {
        let server = pki.issue("etcd-server");
        let client = pki.issue("etcd-harness");
        Etcd::build(&[], Some(EtcdTls { pki, server, client }))
    }

    fn build(extra: &[&str], tls: Option<EtcdTls>) -> Etcd {
        let data = tempfile::tempdir().unwrap();
        let mut etcd = Etcd {
            proc: None,
            client_port: free_port(),
            peer_port: free_port(),
            data,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            root_password: None,
            tls,
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
            .args(&self.extra)
            .stdin(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.server.cert).arg("--key-file").arg(&tls.server.key);
            cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(tls.pki.ca_path());
        }
        self.proc = Some(Sidecar::spawn(cmd));
        wait_until(
            "etcd /health",
            Duration::from_secs(30),
            || matches!(self.exchange("GET", "/health", &[], ""), Some((200, body)) if body.contains("true")),
        );
    }

    /// One request to the client port, over TLS with the harness's certificate when etcd
    /// wants one (curl, then).
    fn exchange(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Option<(u16, String)> {
        let Some(tls) = &self.tls else { return http_exchange(self.addr(), method, path, headers, body) };
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(tls.pki.ca_path())
            .arg("--cert")
            .arg(&tls.client.cert)
            .arg("--key")
            .arg(&tls.client.key);
        for (name, value) in headers {
            cmd.args(["-H", &format!("{name}: {value}")]);
        }
        if !body.is_empty() {
            cmd.args(["--data-binary", body]);
        }
        let output = cmd.arg(format!("https://127.0.0.1:{}{path}", self.client_port)).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n')?;
        Some((status.trim().parse().ok()?, body.to_owned()))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn url(&self, key: &str) -> String {
        format!("etcd://127.0.0.1:{}{key}", self.client_port)
    }

    /// A gateway call, as root once auth is enabled (a new token each time: tokens expire).
    pub fn call(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let token = self.root_password.as_ref().map(|password| {
            let answer = self.call_with(
                "/v3/auth/authenticate",
                serde_json::json!({ "name": "root", "password": password }),
                None,
            );
            answer["token"].as_str().expect("a token for root").to_owned()
        });
        self.call_with(path, body, token.as_deref())
    }

    fn call_with(&self, path: &str, body: serde_json::Value, token: Option<&str>) -> serde_json::Value {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(token) = token {
            headers.push(("authorization", token));
        }
        let (status, text) =
            self.exchange("POST", path, &headers, &body.to_string()).unwrap_or_else(|| panic!("etcd {path}"));
        assert_eq!(status, 200, "etcd {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Turns authentication on: a root user (`root_password`), a role `reader` that may read
    /// `key`, and `user` with `password` holding that role.
    pub fn enable_auth(&mut self, root_password: &str, user: &str, password: &str, key: &str) {
        use base64::Engine;
        use serde_json::json;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.call("/v3/auth/user/add", json!({ "name": "root", "password": root_password }));
        self.call("/v3/auth/user/grant", json!({ "user": "root", "role": "root" }));
        self.call("/v3/auth/role/add", json!({ "name": "reader" }));
        self.call(
            "/v3/auth/role/grant",
            json!({ "name": "reader", "perm": { "permType": "READ", "key": b64.encode(key) } }),
        );
        self.call("/v3/auth/user/add", json!({ "name": user, "password": password }));
        self.call("/v3/auth/user/grant", json!({ "user": user, "role": "reader" }));
        self.call("/v3/auth/enable", json!({}));
        self.root_password = Some(root_password.to_owned());
    }

    /// Gives `user` (created with `password` unless it exists) a new role `role` that grants
    /// `perm` (`READ`, `WRITE` or `READWRITE`) on every key under `prefix`. Works before and
    /// after `enable_auth` (as root, then); each change of users or roles makes etcd refuse
    /// the tokens given before it ("auth store is old").
    pub fn grant_prefix(&self, user: &str, password: &str, role: &str, perm: &str, prefix: &str) {
        use base64::Engine;
        use serde_json::json;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        self.call("/v3/auth/role/add", json!({ "name": role }));
        self.call(
            "/v3/auth/role/grant",
            json!({ "name": role, "perm": { "permType": perm, "key": b64.encode(prefix), "range_end": b64.encode(end) } }),
        );
        let users = self.call("/v3/auth/user/list", json!({}));
        if !users["users"].as_array().is_some_and(|u| u.iter().any(|name| name == user)) {
            self.call("/v3/auth/user/add", json!({ "name": user, "password": password }));
        }
        self.call("/v3/auth/user/grant", json!({ "user": user, "role": role }));
    }

    /// Takes role `reader` away from `user`.
    pub fn revoke_reader(&self, user: &str) {
        self.call("/v3/auth/user/revoke", serde_json::json!({ "name": user, "role": "reader" }));
    }

    pub fn change_password(&self, user: &str, password: &str) {
        self.call("/v3/auth/user/changepw", serde_json::json!({ "name": user, "password": password }));
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
