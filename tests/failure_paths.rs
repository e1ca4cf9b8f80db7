//! The proxy on its failure paths: readiness that includes the app, peers that are slow on
//! either side, protocol switches and request floods, the HTTP rules that keep client and app
//! in step, and faults told apart (client or app) and counted. Real clients (raw TLS sockets,
//! the h2 crate for frames hyper's client will not send) against real upstreams, most of them
//! writing exact bytes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// The sum of a metric's samples whose line starts with `prefix` (a name and, optionally, the
/// start of its labels), from the admin API's `/metrics`.
async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let (_, text) = admin_get(admin, "/metrics").await;
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn raw_tls(sidecar: &Sidecar, pki: &TestPki, alpn: &[u8]) -> Tls {
    tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[alpn]), "localhost").await.unwrap()
}

/// An HTTP/2 client from the h2 crate over a TLS session with the sidecar.
async fn h2_client(
    sidecar: &Sidecar,
    pki: &TestPki,
    builder: &h2::client::Builder,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tls = raw_tls(sidecar, pki, b"h2").await;
    let (send, connection) = builder.handshake(tls).await.unwrap();
    (send, tokio::spawn(connection))
}

fn h2_get(path: &str) -> Request<()> {
    Request::get(format!("https://localhost{path}")).body(()).unwrap()
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

// ---------------------------------------------------------------------------------------------
// Slow peers hold nothing forever.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_nothing_is_closed_and_its_app_connections_released() {
    let (upstream, pki, sidecar) =
        proxy_in_front_of_upstream(&["--idle-timeout", "3s", "--workers", "1", "--admin", "127.0.0.1:0"]).await;
    let admin = sidecar.admin_addr();

    // HTTP/1.1: a large response the client never reads.
    let mut tls = raw_tls(&sidecar, &pki, b"http/1.1").await;
    tls.write_all(b"GET /bytes/200000000 HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    // HTTP/2: a zero window, and several streams that can never send a byte of body.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let (mut h2, _connection) = h2_client(&sidecar, &pki, &builder).await;
    let mut pending = Vec::new();
    for _ in 0..5 {
        h2 = h2.ready().await.unwrap();
        let (response, _) = h2.send_request(h2_get("/bytes/1000000"), true).unwrap();
        pending.push(response);
    }
    // Readiness checks open (and at once close) app connections too: count the open ones.
    let open = || upstream.log.connections.load(Ordering::SeqCst) - upstream.log.closed.load(Ordering::SeqCst);
    eventually("six app connections", Duration::from_secs(10), || async { open() >= 6 }).await;

    let started = Instant::now();
    eventually("the app connections to be released", Duration::from_secs(20), || async { open() == 0 }).await;
    assert!(started.elapsed() < Duration::from_secs(15), "released after {:?}", started.elapsed());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the HTTP/1.1 connection is closed");
    let (_, metrics) = admin_get(admin, "/metrics").await;
    let faults: Vec<&str> = metrics.lines().filter(|l| l.starts_with("sidecar_client_faults_total")).collect();
    assert!(metric(admin, "sidecar_client_faults_total{reason=\"stalled\"}").await >= 2.0, "{faults:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_that_goes_silent_mid_body_is_cut_off_by_the_upstream_timeout() {
    let (_upstream, pki, sidecar) = scripted(&["--upstream-timeout", "2s"]).await;
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let response = conn.send(Request::get("/stall").body(empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::time::timeout(Duration::from_secs(15), response.into_body().collect()).await;
        let body = body.unwrap_or_else(|_| panic!("http2={http2}: the body still hangs after 15 s"));
        assert!(body.is_err(), "http2={http2}: the client sees the cut, never a shorter complete body");
    }
    sidecar.logs.wait_for("response cut short", Duration::from_secs(5));
}
