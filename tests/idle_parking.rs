//! Parked HTTP/1.1 connections: an idle keep-alive connection gives up hyper's buffers and is
//! served again by a fresh hyper connection when its client sends. Every test waits for the
//! proxy's debug line that says a connection was parked, then checks that what follows
//! behaves as on a connection that was never parked: the next request (split around the park,
//! pipelined, with a body, a WebSocket upgrade), the idle timeout, shutdown, a client closing.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The proxy's debug line for a parked connection.
const PARKED: &str = "idle connection parked";

const GET: &str = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
const HELLO: &str = "hello from upstream\n";

/// A sidecar that logs parks, with an admin API, parking after 0.5-1 s of silence (the watch
/// ticks at a quarter of the header-read timeout), plus `extra` flags.
async fn setup(extra: &[&str]) -> (Upstream, TestPki, Sidecar) {
    let mut args = vec!["--log-level", "debug", "--admin", "127.0.0.1:0", "--workers", "1"];
    if !extra.contains(&"--header-read-timeout") {
        args.extend(["--header-read-timeout", "2s"]);
    }
    args.extend_from_slice(extra);
    proxy_in_front_of_upstream(&args).await
}

async fn connect(sidecar: &Sidecar, pki: &TestPki) -> Tls {
    tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap()
}

/// Waits until the proxy has logged `n` parks in all.
fn parked(sidecar: &Sidecar, n: usize) {
    tokio::task::block_in_place(|| sidecar.logs.wait_for_nth(PARKED, n, Duration::from_secs(10)));
}

/// Reads into `buf` until it holds `needle` `times` times; panics after 5 s or on close.
async fn read_until_count(stream: &mut Tls, buf: &mut Vec<u8>, needle: &str, times: usize) {
    let found = |buf: &[u8]| String::from_utf8_lossy(buf).matches(needle).count() >= times;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        while !found(buf) {
            let n = stream.read(&mut chunk).await.expect("read a response");
            assert!(n > 0, "closed before {needle:?} x{times} arrived; got:\n{}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} x{times} within 5s; got:\n{}", String::from_utf8_lossy(buf)));
}

/// How the server ended a connection: `Ok(())` for close_notify (a graceful TLS close), the
/// read error otherwise. Panics if it is still open after `bound`.
async fn server_close<S: AsyncRead + Unpin>(stream: &mut S, bound: Duration, what: &str) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the server did not close the connection within {bound:?}"))
}

async fn open_connections(admin: SocketAddr) -> f64 {
    let (_, text) =
        tokio::task::spawn_blocking(move || http_exchange(admin, "GET", "/metrics", &[], "").unwrap()).await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("sidecar_connections_open "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sidecar_connections_open in:\n{text}"))
}

async fn eventually_open(admin: SocketAddr, wanted: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = open_connections(admin).await;
        if open == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "sidecar_connections_open stayed {open}, not {wanted}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_connection_serves_the_next_requests_and_stays_counted_open() {
    let (upstream, pki, sidecar) = setup(&[]).await;
    let admin = sidecar.admin_addr();
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    for round in 1..=3 {
        tls.write_all(GET.as_bytes()).await.unwrap();
        read_until_count(&mut tls, &mut buf, HELLO, round).await;
        parked(&sidecar, round);
        assert_eq!(open_connections(admin).await, 1.0, "a parked connection is still an open connection");
    }
    // Pipelined into a parked connection, in one write: both are answered, in order.
    tls.write_all(format!("{GET}GET /hop HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, "hop\n", 1).await;
    assert_eq!(String::from_utf8_lossy(&buf).matches(HELLO).count(), 4);
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 5);
    drop(tls);
    eventually_open(admin, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_split_around_the_park_is_served() {
    let (upstream, pki, sidecar) = setup(&[]).await;
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    tls.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, HELLO, 1).await;
    // Half a head, then silence: the connection parks with the half read by hyper, which it
    // hands back, and the rest completes the head afterwards.
    let before = sidecar.logs.count(PARKED);
    tls.write_all(b"GET /hop HTTP/1.1\r\nHo").await.unwrap();
    parked(&sidecar, before + 1);
    tls.write_all(b"st: localhost\r\n\r\n").await.unwrap();
    read_until_count(&mut tls, &mut buf, "hop\n", 1).await;
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 2);
    assert_eq!(upstream.last_request().uri, "/hop");
    // A new connection whose first head comes in two parts, more than a tick apart: hyper has
    // read half a head and answered nothing, so it is not parked (a graceful finish then would
    // answer that request with `Connection: close`).
    let mut fresh = connect(&sidecar, &pki).await;
    let mut fresh_buf = Vec::new();
    fresh.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    fresh.write_all(b"st: localhost\r\n\r\n").await.unwrap();
    read_until_count(&mut fresh, &mut fresh_buf, HELLO, 1).await;
    fresh.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut fresh, &mut fresh_buf, HELLO, 2).await;
    buf.extend_from_slice(&fresh_buf);
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(!text.contains("connection: close"), "a response announced a close:\n{text}");
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_body_after_the_park_reaches_the_app_whole() {
    let (_upstream, pki, sidecar) = setup(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    parked(&sidecar, 1);
    const LEN: u64 = 300_000;
    let response = conn.send(Request::post("/count").body(pattern_stream(LEN)).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{LEN} {}", pattern_checksum(LEN)));
    parked(&sidecar, 2);
    assert_eq!(conn.get("/").await.0, StatusCode::OK, "parked again after the body, served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_upgrade_on_a_parked_connection_is_passed_through() {
    let (_upstream, pki, sidecar) = setup(&[]).await;
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    tls.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, HELLO, 1).await;
    parked(&sidecar, 1);
    let mut ws = websocket_echoes(tls, sidecar.addr.port(), 5).await;
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_idle_timeout_closes_a_parked_connection_gracefully() {
    // The header-read timeout is long, so only the idle timeout can close it.
    let (_upstream, pki, sidecar) = setup(&["--idle-timeout", "1s", "--header-read-timeout", "30s"]).await;
    let admin = sidecar.admin_addr();
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    tls.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, HELLO, 1).await;
    let served = Instant::now();
    parked(&sidecar, 1);
    let closed = server_close(&mut tls, Duration::from_secs(3), "parked idle connection").await;
    let took = served.elapsed();
    assert!(closed.is_ok(), "closed without close_notify: {closed:?}");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the 1s idle timeout");
    tokio::task::block_in_place(|| sidecar.logs.wait_for("closing idle connection", Duration::from_secs(2)));
    eventually_open(admin, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_header_read_timeout_still_closes_a_parked_connection() {
    let (_upstream, pki, sidecar) = setup(&["--idle-timeout", "30s", "--header-read-timeout", "1s"]).await;
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    tls.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, HELLO, 1).await;
    let served = Instant::now();
    parked(&sidecar, 1);
    let _ = server_close(&mut tls, Duration::from_secs(3), "parked connection without a next head").await;
    let took = served.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the 1s header-read timeout");
    tokio::task::block_in_place(|| sidecar.logs.wait_for("no complete request head within", Duration::from_secs(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_closes_parked_connections_at_once() {
    let (_upstream, pki, mut sidecar) = setup(&["--drain-timeout", "10s", "--shutdown-delay", "0s"]).await;
    let mut tls = connect(&sidecar, &pki).await;
    let mut buf = Vec::new();
    tls.write_all(GET.as_bytes()).await.unwrap();
    read_until_count(&mut tls, &mut buf, HELLO, 1).await;
    parked(&sidecar, 1);
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let closed = server_close(&mut tls, Duration::from_secs(1), "parked connection on SIGTERM").await;
    assert!(closed.is_ok(), "closed without close_notify: {closed:?}");
    let status = tokio::task::block_in_place(|| sidecar.wait_exit(Duration::from_secs(2)));
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(2), "exit took {:?}", signalled.elapsed());
    assert!(sidecar.logs.text().contains("all connections drained"), "{}", sidecar.logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_closing_a_parked_connection_closes_it_on_the_proxy() {
    let (_upstream, pki, sidecar) = setup(&[]).await;
    let admin = sidecar.admin_addr();
    // One client sends close_notify and its FIN, the other only the FIN (a half-close).
    for close_notify in [true, false] {
        let mut tls = connect(&sidecar, &pki).await;
        let mut buf = Vec::new();
        tls.write_all(GET.as_bytes()).await.unwrap();
        read_until_count(&mut tls, &mut buf, HELLO, 1).await;
        let before = sidecar.logs.count(PARKED);
        parked(&sidecar, before + 1);
        assert_eq!(open_connections(admin).await, 1.0);
        match close_notify {
            true => tls.shutdown().await.unwrap(),
            false => tls.get_mut().0.shutdown().await.unwrap(),
        }
        let _ = server_close(&mut tls, Duration::from_secs(3), "parked connection after the client's close").await;
        eventually_open(admin, 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_behind_a_proxy_header_is_the_same_after_a_park_in_forwarding_and_the_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (upstream, pki, sidecar) = setup(&["--proxy-protocol", "--access-log", log.to_str().unwrap()]).await;
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n").await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]));
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let mut buf = Vec::new();
    for round in 1..=2 {
        tls.write_all(GET.as_bytes()).await.unwrap();
        read_until_count(&mut tls, &mut buf, HELLO, round).await;
        parked(&sidecar, round);
    }
    for request in upstream.log.requests.lock().unwrap().iter() {
        assert_eq!(request.headers["x-forwarded-for"], "203.0.113.7", "the app sees the client, parked or not");
    }
    let lines = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= 2 || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(lines.len(), 2, "one access-log line per request: {lines:?}");
    for line in &lines {
        assert!(line.starts_with("203.0.113.7 "), "the access log names the client after a park too: {line}");
    }
}

/// HTTP/2: a connection gives back its buffers and stream tables whenever it has no stream
/// left (vendor/h2/PATCHES.md), that is between every two requests here. Each request then
/// takes them again: a head larger than a frame (CONTINUATION), a body larger than the
/// buffers, and headers the client indexed in HPACK's dynamic table on the first request and
/// refers to by index afterwards must all come through intact, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_connection_that_freed_its_buffers_serves_large_heads_bodies_and_indexed_headers() {
    let (upstream, pki, sidecar) = setup(&[]).await;
    let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let large = "v".repeat(40 * 1024);
    for round in 0..20u64 {
        let len = 100_000 + round * 7919;
        let request = Request::get(format!("/bytes/{len}"))
            .header("x-indexed", "the same value every time")
            .header("x-large", format!("{round}{large}"))
            .body(empty())
            .unwrap();
        let response = h2.send(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let (received, checksum) = drain_body(response.into_body()).await;
        assert_eq!((received, checksum), (len, pattern_checksum(len)), "round {round}");
        let seen = upstream.last_request();
        assert_eq!(seen.headers["x-indexed"], "the same value every time", "round {round}");
        assert_eq!(seen.headers["x-large"].as_bytes(), format!("{round}{large}").as_bytes(), "round {round}");
    }
}
