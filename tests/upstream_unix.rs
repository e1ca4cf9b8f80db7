//! HTTP/1.1 to an app on a Unix socket (`--upstream unix:///PATH`): a real nginx with
//! `listen unix:`, and the test app on a Unix socket for what nginx cannot show (WebSocket,
//! streamed bodies). Everything the TCP upstream has must hold: forwarding headers, the pool,
//! timeouts, readiness, and an app that starts after the proxy.

mod common;

use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn upstream_url(socket: &std::path::Path) -> String {
    format!("unix://{}", socket.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_on_a_unix_socket_is_served_with_forwarding_headers_over_pooled_connections() {
    if !require_tool("nginx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("index.html"), "hello over a unix socket\n").unwrap();
    let socket = dir.path().join("nginx.sock");
    let nginx = Nginx::start_unix(&root, &socket);
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream_url(&socket), &pki, &["--workers", "1"], |_| {});
    assert!(sidecar.logs.text().contains(&format!("forwarding to unix://{}", socket.display())));

    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        for _ in 0..5 {
            let (status, _, body) = conn.get("/index.html").await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "hello over a unix socket\n"));
        }
        // Host is the client's; X-Forwarded-For the client's address; the scheme https.
        let (status, _, body) = conn.get("/echo").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "localhost|127.0.0.1|https", "http2: {http2}");
    }
    let (status, _, _) = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await.get("/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(nginx.statuses().iter().filter(|s| *s == "200").count(), 12, "{:?}", nginx.statuses());
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_bodies_and_keepalive_work_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let upstream = Upstream::start_unix(&socket).await;
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream_url(&socket), &pki, &["--workers", "1"], |_| {});

    let tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let mut ws = websocket_echoes(tls, sidecar.addr.port(), 10).await;
    ws.close(None).await.unwrap();

    // A streamed request body of unknown length (HTTP/2 in, chunked out), counted by the app.
    const LEN: u64 = 3 << 20;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let response = conn.send(Request::post("/count").body(pattern_stream(LEN)).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{LEN} {}", pattern_checksum(LEN)));

    // Sequential requests reuse one pooled connection to the app.
    let before = upstream.log.connections.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(conn.get("/").await.0, StatusCode::OK);
    }
    let after = upstream.log.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after - before <= 1, "keep-alive over the socket: {} new connections for 10 requests", after - before);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_that_creates_its_socket_after_the_proxy_starts_is_served_then() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("late.sock");
    let pki = TestPki::new();
    let sidecar = start_sidecar(
        &upstream_url(&socket),
        &pki,
        &["--workers", "1", "--admin", "127.0.0.1:0", "--upstream-timeout", "500ms"],
        |_| {},
    );
    sidecar.logs.wait_for("does not exist yet", Duration::from_secs(5));
    let admin = sidecar.admin_addr();
    let ready = || http_exchange(admin, "GET", "/readyz", &[], "").map_or(0, |(status, _)| status);
    assert_eq!(ready(), 503, "not ready while the app's socket is missing");
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let (status, _, body) = conn.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("no such socket file"), "{body}");

    let _upstream = Upstream::start_unix(&socket).await;
    let (status, _, body) = conn.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from upstream\n"));
    wait_until("readiness once the socket exists", Duration::from_secs(10), || ready() == 200);
    // --upstream-timeout holds on the socket as on TCP.
    let (status, _, _) = conn.get("/slow/3000").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[test]
fn check_validates_the_socket_path_and_the_proxy_refuses_what_is_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("later.sock");
    let run = |path: &std::path::Path| {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = sidecar_command(&["check", "--upstream", &upstream_url(path)]);
        cmd.env("XDG_STATE_HOME", state.path());
        output_within(cmd, EXIT_LIMIT)
    };
    let output = run(&missing);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "a socket that appears later is fine: {stderr}");
    assert!(stderr.contains("does not exist yet"), "{stderr}");

    let file = dir.path().join("plain-file");
    std::fs::write(&file, "").unwrap();
    let output = run(&file);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    let (code, stderr) = run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", &upstream_url(&file)]);
    assert_ne!(code, 0);
    assert!(stderr.contains("is not a socket"), "{stderr}");

    let socket = dir.path().join("real.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let output = run(&socket);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("upstream    unix://{}", socket.display())), "{stdout}");

    let output = run(std::path::Path::new("relative.sock"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absolute path"));
}

#[test]
fn a_socket_not_writable_by_the_proxy_user_is_refused_by_check() {
    // Root may write anything: the check is only meaningful for another user.
    if is_root() && !which("setpriv") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("private.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o500)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let upstream = upstream_url(&socket);
    let mut cmd = if is_root() {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", sidecar_bin(), "check", "--upstream", &upstream]);
        cmd
    } else {
        sidecar_command(&["check", "--upstream", &upstream])
    };
    cmd.env("XDG_STATE_HOME", state.path()).env("HOME", state.path());
    let output = output_within(cmd, EXIT_LIMIT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not writable by this user"), "{stderr}");
}
