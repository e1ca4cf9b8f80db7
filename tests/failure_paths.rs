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

/// Writes `request` on a new HTTP/1.1 connection and reads until the proxy closes it (or 20 s
/// pass); returns what came back.
async fn raw_exchange(sidecar: &Sidecar, pki: &TestPki, request: &str) -> String {
    let mut tls = raw_tls(sidecar, pki, b"http/1.1").await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of the first response in `text`.
fn status_of(text: &str) -> u16 {
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no response: {text:?}"))
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

// ---------------------------------------------------------------------------------------------
// HTTP/2 and Upgrade abuse.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn only_listed_protocols_are_tunnelled_and_h2c_is_refused() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    let response = raw_exchange(
        &sidecar,
        &pki,
        "GET /h2c HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n\
         http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_ne!(status_of(&response), 101, "{response}");
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(!head.contains("upgrade"), "the app is not asked to switch: {head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_http2_connection_gets_goaway_after_1000_requests_and_resets_are_counted() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--workers", "1", "--admin", "127.0.0.1:0"]).await;
    let admin = sidecar.admin_addr();
    let (mut h2, connection) = h2_client(&sidecar, &pki, &h2::client::Builder::new()).await;
    let mut refused = None;
    for n in 1..=1100 {
        h2 = match h2.ready().await {
            Ok(h2) => h2,
            Err(e) => {
                refused = Some((n, e.to_string()));
                break;
            }
        };
        let Ok((response, _)) = h2.send_request(h2_get("/"), true) else {
            refused = Some((n, "send".into()));
            break;
        };
        match response.await {
            Ok(response) => {
                let mut body = response.into_body();
                while body.data().await.is_some() {}
            }
            Err(e) => {
                refused = Some((n, e.to_string()));
                break;
            }
        }
    }
    let (n, error) = refused.expect("the connection refuses more than 1000 requests");
    // A request sent before the final GOAWAY arrived may still be served.
    assert!((1001..=1003).contains(&n), "refused at request {n}: {error}");
    let _ = tokio::time::timeout(Duration::from_secs(10), connection).await.expect("the connection ends");
    assert!(metric(admin, "sidecar_client_faults_total{reason=\"request_cap\"}").await >= 1.0);

    // Streams the client resets after they reached the app.
    let before = metric(admin, "sidecar_client_faults_total{reason=\"stream_cancelled\"}").await;
    let (mut h2, _connection) = h2_client(&sidecar, &pki, &h2::client::Builder::new()).await;
    for _ in 0..3 {
        h2 = h2.ready().await.unwrap();
        let (_response, mut stream) = h2.send_request(h2_get("/slow/2000"), true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.send_reset(h2::Reason::CANCEL);
    }
    eventually("the resets to be counted", Duration::from_secs(10), || async {
        metric(admin, "sidecar_client_faults_total{reason=\"stream_cancelled\"}").await >= before + 3.0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP semantics.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn http2_cookie_fields_reach_the_app_joined() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let request = Request::get("/").header("cookie", "a=1").header("cookie", "b=2").body(empty()).unwrap();
    assert_eq!(conn.send(request).await.unwrap().status(), StatusCode::OK);
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "{head}");
    assert_eq!(head.matches("cookie:").count(), 1, "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_rules_of_rfc_9112_and_9113() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    for (what, request) in [
        ("two Host lines", "GET / HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\nconnection: close\r\n\r\n"),
        ("an invalid Host", "GET / HTTP/1.1\r\nhost: a/b@c\r\nconnection: close\r\n\r\n"),
        ("no Host on HTTP/1.1", "GET / HTTP/1.1\r\nconnection: close\r\n\r\n"),
    ] {
        let response = raw_exchange(&sidecar, &pki, request).await;
        assert_eq!(status_of(&response), 400, "{what}: {response}");
    }
    let seen = upstream.heads.lock().unwrap().len();
    assert_eq!(seen, 0, "none of them reached the app");

    // HTTP/1.0 may leave it out: the app gets the upstream's authority.
    let response = raw_exchange(&sidecar, &pki, "GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&response), 200, "{response}");

    // The absolute form wins over Host, and userinfo is never forwarded.
    let request = "GET http://user:secret@good.example/abs HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n";
    let response = raw_exchange(&sidecar, &pki, request).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(head.starts_with("get /abs http/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nhost: good.example\r\n") && !head.contains("evil") && !head.contains("secret"),
        "{head}"
    );

    // HTTP/2: :authority wins over a host field.
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let request = Request::get("https://good.example/h2").header("host", "evil.example").body(empty()).unwrap();
    assert_eq!(conn.send(request).await.unwrap().status(), StatusCode::OK);
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(head.contains("\r\nhost: good.example\r\n") && !head.contains("evil"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_never_carry_framing_or_routing_fields() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    let request = "POST /t HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
                   5\r\nhello\r\n0\r\ncontent-length: 5\r\nhost: evil.example\r\ntransfer-encoding: chunked\r\n\
                   x-checksum: 42\r\n\r\n";
    let response = raw_exchange(&sidecar, &pki, request).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = upstream.last_head().to_ascii_lowercase();
    let (_, body) = seen.split_once("\r\n\r\n").unwrap();
    assert!(body.contains("x-checksum: 42"), "{seen}");
    assert!(
        !body.contains("evil") && !body.contains("content-length") && !body.contains("transfer-encoding"),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http10_response_with_transfer_encoding_ends_its_app_connection() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let (status, _, body) = conn.get("/http10-chunked").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    assert_eq!(upstream.connections(), 2, "faulty framing: that connection is not reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_once_by_the_proxy_and_not_forwarded() {
    let (upstream, pki, sidecar) = scripted(&[]).await;
    let mut tls = raw_tls(&sidecar, &pki, b"http/1.1").await;
    let head =
        "POST /e HTTP/1.1\r\nhost: localhost\r\nexpect: 100-continue\r\ncontent-length: 5\r\nconnection: close\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tls.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    tls.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n") && !rest.contains("100 Continue"), "{rest}");
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(!head.contains("expect"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_upstream_keepalive_a_body_the_app_ignores_cannot_reach_the_next_client() {
    // The body is the start of a request, which the next client's request would complete.
    let smuggling = "GET /smuggled HTTP/1.1\r\nx-ignore: ";
    let post = format!(
        "POST /ignore-body HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{smuggling}",
        smuggling.len()
    );
    // Pooled (the default), the hole is there; without keep-alive it is closed.
    let cases: [(&[&str], &str); 2] = [(&[], "smuggled\n"), (&["--upstream-keepalive", "false"], "ok\n")];
    for (flags, victim_gets) in cases {
        let (_upstream, pki, sidecar) = scripted(flags).await;
        let response = raw_exchange(&sidecar, &pki, &post).await;
        assert!(response.ends_with("ignored\n"), "{response}");
        let mut victim = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
        let (status, _, body) = victim.get("/victim").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, victim_gets), "{flags:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Faults are attributed and visible.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn client_faults_are_client_errors_never_upstream_failures() {
    let (upstream, pki, sidecar) = scripted(&["--admin", "127.0.0.1:0"]).await;
    let admin = sidecar.admin_addr();

    let malformed =
        "POST /m HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n\r\n";
    let response = raw_exchange(&sidecar, &pki, malformed).await;
    assert_eq!(status_of(&response), 400, "{response}");

    // An upload the client abandons halfway.
    let mut tls = raw_tls(&sidecar, &pki, b"http/1.1").await;
    tls.write_all(b"POST /a HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\nonly ten..").await.unwrap();
    tls.flush().await.unwrap();
    eventually("the upload to reach the app", Duration::from_secs(10), || async { upstream.connections() >= 2 }).await;
    drop(tls);

    eventually("both faults to be counted", Duration::from_secs(10), || async {
        metric(admin, "sidecar_client_faults_total{reason=\"request_body\"}").await >= 2.0
    })
    .await;
    assert_eq!(metric(admin, "sidecar_upstream_failures_total").await, 0.0);
    sidecar.logs.wait_for("client request body", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_errors_and_timeouts_are_counted_by_reason_and_logged_with_the_peer() {
    let (_upstream, pki, sidecar) = scripted(&[
        "--admin",
        "127.0.0.1:0",
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "2s",
        "--max-header-size",
        "8192",
    ])
    .await;
    let admin = sidecar.admin_addr();

    // hyper's own 400 and 431.
    let response = raw_exchange(&sidecar, &pki, "NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status_of(&response), 400, "{response}");
    let big = format!("GET / HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\n\r\n", "a".repeat(10_000));
    let response = raw_exchange(&sidecar, &pki, &big).await;
    assert_eq!(status_of(&response), 431, "{response}");
    // An HTTP/2 protocol error: DATA on stream 0.
    let mut tls = raw_tls(&sidecar, &pki, b"h2").await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0\0\0\0\x01\0\0\0\0\0").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut Vec::new())).await;
    // Slowloris: half a head, then nothing.
    let mut tls = raw_tls(&sidecar, &pki, b"http/1.1").await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: loc").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut Vec::new())).await;
    // An HTTP/2 connection left idle.
    let (_h2, connection) = h2_client(&sidecar, &pki, &h2::client::Builder::new()).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;

    for reason in ["bad_request", "header_too_large", "h2_protocol", "header_read_timeout", "idle_timeout"] {
        let label = format!("sidecar_client_faults_total{{reason=\"{reason}\"}}");
        eventually(&label, Duration::from_secs(10), || async { metric(admin, &label).await >= 1.0 }).await;
    }
    sidecar.logs.wait_for("peer=127.0.0.1", Duration::from_secs(5));
}

/// `h2c://` in front of an app that speaks HTTP/1.1: its answer to the connection preface
/// breaks HTTP/2's framing. The client gets a 502 and the log says what is likely wrong.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_upstream_that_speaks_http1_is_a_502_with_a_hint() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let h2c = format!("h2c://{}", upstream.addr);
    let sidecar = start_sidecar(&h2c, &pki, &[], |_| {});
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let (status, _, _) = conn.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    sidecar.logs.wait_for("does the app speak HTTP/2 with prior knowledge?", Duration::from_secs(10));
}
