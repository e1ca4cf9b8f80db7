//! `sidecar sync` against sources that want credentials: a real etcd with authentication on
//! (user and password, a token that expires, a password rotated through a mounted Secret, a
//! role revoked) and one with `--client-cert-auth` over TLS; a real HTTP server checking Basic
//! and Bearer auth and extra headers; the Consul-protocol server checking X-Consul-Token. Every
//! refusal is a clear error naming the source, the file is left as it is, and no secret shows
//! in the log, /sync, /status or `sidecar check`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);
const KEY: &str = "/apps/legacy/config.json";
const ROOT_PASSWORD: &str = "root-pw-9f2c1e";
const PASSWORD: &str = "app-pw-first-71ad3b";
const ROTATED_PASSWORD: &str = "app-pw-second-5e8c04";
const WRONG_PASSWORD: &str = "app-pw-wrong-c4d2aa";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_with_auth_a_wrong_password_a_rotation_an_expired_token_and_a_revoked_role() {
    if !require_tool("etcd") {
        return;
    }
    // Tokens live 2s unused, so that one expires while the relay is cut.
    let mut etcd = Etcd::start_with(&["--auth-token-ttl", "2"]);
    etcd.put(KEY, "one");
    etcd.enable_auth(ROOT_PASSWORD, "app", PASSWORD, KEY);
    let relay = Relay::start(etcd.addr()).await;
    let mut secret = MountedSecret::new();
    secret.set("password", &format!("{WRONG_PASSWORD}\n"));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    write(&dest, "as deployed");
    let source = format!("etcd://{}{KEY}", relay.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest)
            .arg("--source-user", "app")
            .arg("--source-password-file", secret.path("password"))
            // The most the log says: the secrets must not be in it either.
            .arg("--log-level", "debug")
            .min_quiet("50ms")
            .retry_max("300ms")
            .source_timeout("2s")
            .start()
    });
    tokio::task::block_in_place(|| {
        // A wrong password: a clear error naming the source and the user; the file stays.
        let status = sync.wait_state("app.conf", "not-synced", T);
        let error = status["last_error"].as_str().unwrap();
        eprintln!("refused as: {error}");
        eprintln!("refused as: {error}");
        assert!(error.contains(&relay.addr.to_string()) && error.contains("authentication as user app"), "{error}");
        assert!(error.contains("invalid user ID or password") && error.contains("--source-password-file"), "{error}");
        assert_eq!(read_text(&dest), "as deployed");

        // The Secret is rotated (a ..data swap): the next authentication reads the new file.
        secret.set("password", PASSWORD);
        wait_for_content(&dest, "one", T);
        etcd.put(KEY, "two");
        wait_for_content(&dest, "two", T);

        // Cut for longer than the token's TTL: etcd forgets it, and the reconnect is refused
        // with "invalid auth token" once, then authenticates again. The wait is etcd's clock,
        // not a condition this test could watch.
        relay.cut();
        sync.wait_state("app.conf", "not-synced", T);
        std::thread::sleep(Duration::from_secs(4));
        etcd.put(KEY, "three");
        relay.resume();
        wait_for_content(&dest, "three", T);
        assert!(sync.proc.logs.text().contains("authenticating again"), "{}", sync.proc.logs.text());

        // The password is changed in etcd and in the Secret: the change of users makes etcd
        // refuse the old token ("auth store is old"); the new password is read and works.
        let logins = || sync.proc.logs.text().matches("authenticated as user app").count();
        let before = logins();
        etcd.change_password("app", ROTATED_PASSWORD);
        secret.set("password", ROTATED_PASSWORD);
        // The watch's silence check meets the refusal and logs in again, with the new password.
        wait_until("a login with the rotated password", T, || logins() > before);
        etcd.put(KEY, "four");
        wait_for_content(&dest, "four", T);

        // The role is revoked: the next check of the silent watch finds the key refused.
        etcd.revoke_reader("app");
        let status = sync.wait_status("app.conf", "permission denied", T, |s| {
            s["last_error"].as_str().is_some_and(|e| e.contains("permission denied"))
        });
        let error = status["last_error"].as_str().unwrap();
        eprintln!("refused as: {error}");
        eprintln!("refused as: {error}");
        assert!(error.contains(&relay.addr.to_string()) && error.contains("user app"), "{error}");
        assert_ne!(status["state"], "synced", "{status:#}");
        etcd.put(KEY, "five");
        assert_eq!(read_text(&dest), "four");
        let (_, all) = http_exchange(sync.admin, "GET", "/status", &[], "").expect("GET /status");
        assert!(all.contains("permission denied"), "/status shows the error: {all}");
        assert!(sync.proc.logs.text().contains("authenticated as user app"), "{}", sync.proc.logs.text());
        assert_no_secret(&sync.visible(), &[PASSWORD, ROTATED_PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD]);
    });
}

#[test]
fn etcd_without_credentials_says_auth_is_on() {
    if !require_tool("etcd") {
        return;
    }
    let mut etcd = Etcd::start();
    etcd.put(KEY, "one");
    etcd.enable_auth(ROOT_PASSWORD, "app", PASSWORD, KEY);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let sync = SyncCommand::new(etcd.url(KEY), &dest).retry_max("300ms").start();
    let status = sync.wait_status("app.conf", "refused", T, |s| s["last_error"].is_string());
    let error = status["last_error"].as_str().unwrap();
    eprintln!("refused as: {error}");
    assert!(error.contains("user name is empty") && error.contains("--source-user"), "{error}");
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_with_client_certificate_auth_over_tls() {
    if !require_tool("etcd") || !require_tool("curl") {
        return;
    }
    let etcd = Etcd::start_tls(TestPki::new());
    etcd.put(KEY, "tls one");
    let tls = etcd.tls.as_ref().unwrap();
    let client = tls.pki.issue("sidecar-client");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let source = format!("etcd+https://localhost:{}{KEY}", etcd.client_port);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest)
            .arg("--source-ca", tls.pki.ca_path())
            .arg("--source-cert", &client.cert)
            .arg("--source-key", &client.key)
            .min_quiet("50ms")
            .start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest, "tls one", T);
        etcd.put(KEY, "tls two");
        wait_for_content(&dest, "tls two", T);
        assert!(sync.proc.logs.text().contains("client certificate"), "{}", sync.proc.logs.text());
    });

    // A certificate from another CA, and none at all: refused at the TLS layer, said so.
    let stranger_ca = TestPki::new();
    let stranger = stranger_ca.issue("stranger");
    for (name, cert) in [("stranger.conf", Some(&stranger)), ("none.conf", None)] {
        let dest = dir.path().join(name);
        write(&dest, "as deployed");
        let mut command = SyncCommand::new(&source, &dest).arg("--source-ca", tls.pki.ca_path()).retry_max("300ms");
        if let Some(cert) = cert {
            command = command.arg("--source-cert", &cert.cert).arg("--source-key", &cert.key);
        }
        let sync = tokio::task::block_in_place(|| command.start());
        let status = tokio::task::block_in_place(|| sync.wait_state(name, "not-synced", T));
        let error = status["last_error"].as_str().unwrap();
        eprintln!("refused as: {error}");
        eprintln!("refused as: {error}");
        assert!(error.contains(&format!("localhost:{}", etcd.client_port)), "{error}");
        let hint = if cert.is_some() {
            "is the client certificate (--source-cert, --fleet-cert) signed by a CA it trusts"
        } else {
            "give --source-cert"
        };
        assert!(error.contains(hint), "{error}");
        assert_eq!(read_text(&dest), "as deployed");
        if let Some(cert) = cert {
            // Renewed in place by a certificate the server trusts: the next connection uses it.
            replace_file(&cert.key, &read_text(&client.key));
            replace_file(&cert.cert, &read_text(&client.cert));
            tokio::task::block_in_place(|| wait_for_content(&dest, "tls two", T));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consul_acl_token_is_sent_and_a_wrong_one_is_a_clear_error() {
    let server = LongPollServer::start().await;
    server.set(Some("consul one"), 5);
    *server.shared.token.lock().unwrap() = Some("consul-token-1f9e".into());
    let mut secret = MountedSecret::new();
    secret.set("token", "consul-token-wrong-77aa");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    write(&dest, "as deployed");
    let source = format!("consul://{}/apps/x?wait=2s", server.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest)
            .arg("--source-token-file", secret.path("token"))
            .retry_max("300ms")
            .min_quiet("50ms")
            .start()
    });
    tokio::task::block_in_place(|| {
        let status = sync.wait_state("app.conf", "not-synced", T);
        let error = status["last_error"].as_str().unwrap();
        eprintln!("refused as: {error}");
        eprintln!("refused as: {error}");
        assert!(error.contains(&server.addr.to_string()) && error.contains("403"), "{error}");
        assert!(error.contains("ACL not found") && error.contains("--source-token-file"), "{error}");
        assert_eq!(read_text(&dest), "as deployed");
        // Rotated: the next query reads the new token.
        secret.set("token", "consul-token-1f9e\n");
        wait_for_content(&dest, "consul one", T);
        server.set(Some("consul two"), 6);
        wait_for_content(&dest, "consul two", T);
        assert_no_secret(&sync.visible(), &["consul-token-1f9e", "consul-token-wrong-77aa"]);
    });
}

/// A real HTTP server (Python's http.server) that answers 401 unless the request carries
/// `Authorization: EXPECTED` (the file `expected`, read for each request) and `X-Tenant: blue`.
fn python_auth_server(dir: &Path, body: &str) -> (Sidecar, std::net::SocketAddr) {
    let script = r#"
import http.server, sys, os
root = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        expected = open(os.path.join(root, "expected")).read()
        if self.headers.get("Authorization") != expected or self.headers.get("X-Tenant") != "blue":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="config"')
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b"unauthorized")
            return
        data = open(os.path.join(root, "body"), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), H)
print("listening on", server.server_address[1], flush=True)
server.serve_forever()
"#;
    std::fs::write(dir.join("body"), body).unwrap();
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c").arg(script).arg(dir);
    let proc = Sidecar::spawn(cmd);
    let line = proc.logs.wait_for("listening on", T);
    let port: u16 = line.split_whitespace().last().unwrap().parse().unwrap();
    (proc, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

#[test]
fn http_source_with_basic_auth_bearer_token_rotation_and_headers() {
    if !require_tool("python3") {
        return;
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let server_dir = tempfile::tempdir().unwrap();
    let expected = server_dir.path().join("expected");
    write(&expected, &format!("Basic {}", b64.encode(format!("app:{PASSWORD}"))));
    let (_server, addr) = python_auth_server(server_dir.path(), "basic body");
    let url = format!("http://{addr}/config");
    let dir = tempfile::tempdir().unwrap();

    // Basic, and the extra header; a wrong password first.
    let mut secret = MountedSecret::new();
    secret.set("password", WRONG_PASSWORD);
    let dest = dir.path().join("basic.conf");
    write(&dest, "as deployed");
    let sync = SyncCommand::new(&url, &dest)
        .arg("--source-user", "app")
        .arg("--source-password-file", secret.path("password"))
        .arg("--source-header", "X-Tenant: blue")
        .poll_interval("200ms")
        .retry_max("300ms")
        .start();
    let status = sync.wait_state("basic.conf", "not-synced", T);
    let error = status["last_error"].as_str().unwrap();
    eprintln!("refused as: {error}");
    assert!(error.contains(&addr.to_string()) && error.contains("401"), "{error}");
    assert!(error.contains("user app") && error.contains("--source-password-file"), "{error}");
    assert_eq!(read_text(&dest), "as deployed");
    secret.set("password", &format!("{PASSWORD}\n"));
    wait_for_content(&dest, "basic body", T);
    assert_no_secret(&sync.visible(), &[PASSWORD, WRONG_PASSWORD, &b64.encode(format!("app:{PASSWORD}"))]);
    drop(sync);

    // Bearer, rotated while it runs: the server takes only the new token from then on.
    write(&expected, "Bearer token-one-3b7f");
    write(&server_dir.path().join("body"), "bearer body");
    let mut token = MountedSecret::new();
    token.set("token", "token-one-3b7f");
    let dest = dir.path().join("bearer.conf");
    let sync = SyncCommand::new(&url, &dest)
        .arg("--source-token-file", token.path("token"))
        .arg("--source-header", "X-Tenant: blue")
        .poll_interval("200ms")
        .retry_max("300ms")
        .start();
    wait_for_content(&dest, "bearer body", T);
    write(&expected, "Bearer token-two-8c1d");
    sync.wait_state("bearer.conf", "not-synced", T);
    token.set("token", "token-two-8c1d");
    write(&server_dir.path().join("body"), "bearer body 2");
    wait_for_content(&dest, "bearer body 2", T);
    assert_no_secret(&sync.visible(), &["token-one-3b7f", "token-two-8c1d"]);

    // Without the extra header the server refuses: the header was what let it in.
    let dest = dir.path().join("noheader.conf");
    let sync = SyncCommand::new(&url, &dest).arg("--source-token-file", token.path("token")).retry_max("300ms").start();
    let status = sync.wait_state("noheader.conf", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("401"), "{status:#}");
}

#[test]
fn credentials_in_sync_tables_are_checked_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    write(&password, PASSWORD);
    let pki = TestPki::new();
    let client = pki.issue("client");
    let config = dir.path().join("sidecar.toml");
    write(
        &config,
        &format!(
            "[[sync]]\nsource = \"etcd://127.0.0.1:1/k\"\ndest = \"{}\"\nsource-user = \"app\"\nsource-password-file = \"{}\"\n\
             [[sync]]\nsource = \"https://127.0.0.1:1/c\"\ndest = \"{}\"\nsource-token-file = \"{}\"\nsource-ca = \"{}\"\n\
             source-cert = \"{}\"\nsource-key = \"{}\"\nsource-header = [\"X-Api-Key: hdr-secret-55\", \"X-Tenant: blue\"]\n",
            s(&dir.path().join("a.conf")),
            s(&password),
            s(&dir.path().join("b.conf")),
            s(&dir.path().join("missing-token")),
            s(&pki.ca_path()),
            s(&client.cert),
            s(&pki.issue("other").key),
        ),
    );
    let output =
        sidecar_command(&["check", "--upstream", "http://127.0.0.1:1", "--config", s(&config)]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("sync b.conf: --source-token-file") && text.contains("missing-token"), "{text}");
    assert!(text.contains("sync b.conf: cannot use client certificate"), "{text}");
    assert_no_secret(&text, &[PASSWORD, "hdr-secret-55"]);

    // A password in the URL is refused, without quoting it back.
    let output = sidecar_command(&["sync", "--source", "http://app:url-secret-99@127.0.0.1:1/c", "--dest", "/tmp/x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("--source-password-file"), "{text}");
    assert_no_secret(&text, &["url-secret-99"]);

    // --help teaches the options.
    let output = sidecar_command(&["sync", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for option in ["--source-user", "--source-password-file", "--source-token-file", "--source-cert", "--source-header"]
    {
        assert!(help.contains(option), "{option} missing from --help");
    }
}
