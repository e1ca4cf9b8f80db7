//! The proxy on its failure paths: readiness that includes the app, peers that are slow on
//! either side, protocol switches and request floods, the HTTP rules that keep client and app
//! in step, and faults told apart (client or app) and counted. Real clients (raw TLS sockets,
//! the h2 crate for frames hyper's client will not send) against real upstreams, most of them
//! writing exact bytes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn script(request_line: &str) -> (Vec<u8>, After) {
    let path = request_line.split(' ').nth(1).unwrap_or("/");
    let keep = |text: &str| (text.as_bytes().to_vec(), After::KeepOpen);
    match path {
        "/healthz" if HEALTHY.load(Ordering::SeqCst) => keep("HTTP/1.1 204 No Content\r\n\r\n"),
        "/healthz" => keep("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
        // A head and part of the body, then silence with the connection open.
        "/stall" => keep("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"),
        "/h2c" => keep("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
        "/http10-chunked" => {
            keep("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        }
        "/ignore-body" => keep("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nignored\n"),
        "/smuggled" => keep("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled\n"),
        _ => keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"),
    }
}

/// What the scripted upstream's `/healthz` answers: 204 or 500.
static HEALTHY: AtomicBool = AtomicBool::new(true);

fn start(upstream: &str, pki: &TestPki, extra: &[&str]) -> Sidecar {
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(extra);
    start_sidecar(upstream, pki, &args, |_| {})
}

/// The scripted upstream, a test PKI and a sidecar with `extra` flags in front of it.
async fn scripted(extra: &[&str]) -> (ScriptedUpstream, TestPki, Sidecar) {
    let upstream = ScriptedUpstream::start(script).await;
    let pki = TestPki::new();
    let sidecar = start(&upstream.url, &pki, extra);
    (upstream, pki, sidecar)
}

/// GET `path` on the admin API: (status, body).
async fn admin_get(admin: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_exchange(admin, "GET", path, &[], "").expect("the admin API answers"))
        .await
        .unwrap()
}

/// Waits (async) until `condition` holds, panicking with `what` after `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness that tells the truth.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_app_refuses_connections_and_returns_with_it() {
    // A listening socket accepts TCP connections (the kernel completes them) without an accept.
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = app.local_addr().unwrap();
    let pki = TestPki::new();
    let sidecar = start(&format!("http://{app_addr}"), &pki, &["--admin", "127.0.0.1:0"]);
    let admin = sidecar.admin_addr();
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    drop(app);
    eventually("/readyz to fail with the app down", Duration::from_secs(10), || async {
        admin_get(admin, "/readyz").await.0 == 503
    })
    .await;
    let (_, body) = admin_get(admin, "/readyz").await;
    assert!(body.contains("upstream") && body.contains("connection refused"), "the reason names the app: {body}");

    let _app = std::net::TcpListener::bind(app_addr).unwrap();
    eventually("/readyz to pass with the app back", Duration::from_secs(10), || async {
        admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_with_a_health_path_needs_a_2xx_from_the_app() {
    HEALTHY.store(true, Ordering::SeqCst);
    let (upstream, _pki, sidecar) = scripted(&["--admin", "127.0.0.1:0", "--upstream-health-path", "/healthz"]).await;
    let admin = sidecar.admin_addr();
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    assert!(upstream.heads.lock().unwrap().iter().any(|h| h.starts_with("GET /healthz HTTP/1.1\r\n")));

    HEALTHY.store(false, Ordering::SeqCst);
    eventually("/readyz to fail on the app's 500", Duration::from_secs(10), || async {
        admin_get(admin, "/readyz").await.0 == 503
    })
    .await;
    assert!(admin_get(admin, "/readyz").await.1.contains("500"));
    HEALTHY.store(true, Ordering::SeqCst);
    eventually("/readyz to pass again", Duration::from_secs(10), || async {
        admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
}
