//! The proxy's life: timeouts that cut off slow or idle clients, limits, graceful drain on
//! signals, the plain-HTTP redirect listener, configuration layering, the CLI surface, and
//! surviving a misbehaving upstream. Every test runs the real binary over real loopback sockets.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Helpers local to these tests.
// ---------------------------------------------------------------------------------------------

struct Setup {
    upstream: Upstream,
    pki: TestPki,
    sidecar: Sidecar,
}

/// A real upstream, a test PKI, and the sidecar in front of it with `extra` flags.
async fn setup(extra: &[&str]) -> Setup {
    setup_with(extra, |_| {}).await
}

async fn setup_with(extra: &[&str], configure: impl FnOnce(&mut std::process::Command)) -> Setup {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream.url(), &pki, extra, configure);
    Setup { upstream, pki, sidecar }
}

fn cert_args(pki: &TestPki) -> (String, String) {
    let leaf = pki.issue("leaf");
    (leaf.cert.to_str().unwrap().to_owned(), leaf.key.to_str().unwrap().to_owned())
}

/// Like `HttpsConnection::open`, but also hands back the client connection task, which ends
/// when the server closes the connection: that is how a test observes a server-side close.
async fn open_watched(
    addr: SocketAddr,
    ca_pem: &[u8],
    http2: bool,
) -> (HttpsConnection, JoinHandle<hyper::Result<()>>) {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls =
        tls_connect(addr, client_config(ca_pem, alpn), "localhost").await.expect("TLS handshake with the sidecar");
    let io = TokioIo::new(tls);
    if http2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        (HttpsConnection::H2(send), tokio::spawn(conn))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        (HttpsConnection::H1(send), tokio::spawn(conn))
    }
}

/// Reads and discards until the peer closes (a read of 0 bytes or an error); returns when
/// that happened. Panics if the connection is still open after `bound`.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, bound: Duration, what: &str) -> Instant {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => continue,
            }
        }
    })
    .await;
    result.unwrap_or_else(|_| {
        panic!("{what}: the server did not close the connection within {bound:?} (waited {:?})", start.elapsed())
    })
}

/// Reads into `buf` until it holds `needle` `times` times; panics after `bound` or on close.
async fn read_until_count<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    needle: &str,
    times: usize,
    bound: Duration,
) {
    let found = |buf: &[u8]| String::from_utf8_lossy(buf).matches(needle).count() >= times;
    tokio::time::timeout(bound, async {
        let mut chunk = [0u8; 4096];
        while !found(buf) {
            let n = stream.read(&mut chunk).await.expect("read a response");
            assert!(
                n > 0,
                "connection closed before {needle:?} x{times} arrived; got:\n{}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} x{times} within {bound:?}; got:\n{}", String::from_utf8_lossy(buf)));
}

/// Polls until the upstream has seen `n` requests (a request reaching the app is not
/// observable any other way from outside).
async fn upstream_saw(upstream: &Upstream, n: usize, bound: Duration) {
    let deadline = Instant::now() + bound;
    while upstream.log.requests.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the upstream did not see {n} request(s) within {bound:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `connect` until the kernel refuses it (nobody listening); panics after `bound`.
async fn refused_within(addr: SocketAddr, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // Queued in the backlog of a listener that was then closed: not refused yet.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error to {addr}: {e}"),
            Ok(stream) => drop(stream),
        }
        assert!(Instant::now() < deadline, "{addr} still accepted TCP connections {bound:?} after shutdown began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `wait_exit` blocks its thread; let the runtime move other tasks off it meanwhile.
fn wait_exit(sidecar: &mut Sidecar, bound: Duration) -> std::process::ExitStatus {
    tokio::task::block_in_place(|| sidecar.wait_exit(bound))
}

fn wait_log(sidecar: &Sidecar, needle: &str, bound: Duration) -> String {
    tokio::task::block_in_place(|| sidecar.logs.wait_for(needle, bound))
}

/// Runs `sidecar ARGS` with `envs`, like `run_to_exit` but killed (and failing the test) if it
/// does not exit within `bound`, so a configuration error that goes unnoticed cannot hang the
/// suite by starting a server. Returns (exit code, stdout, stderr).
fn run_bounded(args: &[&str], envs: &[(&str, &str)], bound: Duration) -> (i32, String, String) {
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = sidecar_command(args);
    cmd.env("XDG_STATE_HOME", state_dir.path());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let output = output_within(cmd, bound);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// 1. Slowloris and the header-read timeout.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_trickling_a_request_head_is_cut_off_by_the_header_read_timeout() {
    // The idle timeout stays at its 60 s default: only the header-read timeout can cut this off,
    // since the client sends a byte every 100 ms and so is never idle.
    let mut s = setup(&["--header-read-timeout", "500ms"]).await;
    let tls =
        tls_connect(s.sidecar.addr, client_config(s.pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let start = Instant::now();
    writer.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    writer.flush().await.unwrap();
    let trickle = tokio::spawn(async move {
        let mut sent = 0usize;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b"a").await.is_err() || writer.flush().await.is_err() {
                return sent;
            }
            sent += 1;
        }
    });
    let closed = closed_within(&mut reader, Duration::from_secs(3), "slowloris").await;
    let took = closed - start;
    trickle.abort();
    assert!(took >= Duration::from_millis(450), "closed after {took:?}, before the 500ms header-read timeout");
    assert!(
        s.upstream.log.requests.lock().unwrap().is_empty(),
        "an unfinished request head must never reach the upstream"
    );
    assert_eq!(s.sidecar.child.try_wait().unwrap(), None, "the proxy keeps running");

    // The same proxy serves a client that sends its head promptly.
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_connection_that_goes_silent_is_closed_after_the_header_read_timeout() {
    let s = setup(&["--header-read-timeout", "500ms"]).await;
    let mut tls =
        tls_connect(s.sidecar.addr, client_config(s.pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut buf = Vec::new();
    tls.write_all(request).await.unwrap();
    read_until_count(&mut tls, &mut buf, "hello from upstream\n", 1, Duration::from_secs(3)).await;
    // A second request well within the timeout is served on the same connection...
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(request).await.unwrap();
    read_until_count(&mut tls, &mut buf, "hello from upstream\n", 2, Duration::from_secs(3)).await;
    let served = Instant::now();
    // ...and then silence is cut off by the header-read timeout (idle timeout is 60 s).
    let closed = closed_within(&mut tls, Duration::from_secs(3), "silent keep-alive connection").await;
    let took = closed - served;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}, before the 500ms header-read timeout");
    assert_eq!(s.upstream.log.requests.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_that_sends_nothing_after_the_tls_handshake_is_cut_off_by_the_header_read_timeout() {
    // Slowloris in its simplest form: finish TLS, then never send a byte. Only the
    // header-read timeout (500ms) may apply; the idle timeout is left at 60 s.
    let s = setup(&["--header-read-timeout", "500ms"]).await;
    let mut tls =
        tls_connect(s.sidecar.addr, client_config(s.pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let start = Instant::now();
    let closed = closed_within(&mut tls, Duration::from_secs(3), "silent client after the TLS handshake").await;
    let took = closed - start;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}, before the 500ms header-read timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_outlasting_the_header_read_timeout_complete_and_keep_their_connection() {
    // The timeout covers the wait for a request head only: neither an app that is slow to
    // answer nor a response body that pauses counts against it.
    let s = setup(&["--header-read-timeout", "300ms"]).await;
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    let (status, _, body) = conn.get("/slow/1000").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow response\n"), "a response head slower than the timeout");

    let response = conn.send(Request::get("/drip").body(empty()).unwrap()).await.expect("the /drip response head");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first chunk").expect("the first chunk").into_data().unwrap();
    assert_eq!(&first[..], b"first\n");
    // Three times the timeout with the body paused: there is nothing to wait for but time.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.upstream.log.drip.notify_one();
    let rest = body.collect().await.expect("the rest of a body that paused longer than the timeout").to_bytes();
    assert_eq!(&rest[..], b"second\n");

    // Both were served on one connection, which is still open for the next request.
    let (status, _, _) = conn.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.upstream.log.requests.lock().unwrap().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// 2. Idle timeout.
// ---------------------------------------------------------------------------------------------

async fn idle_connection_is_closed(http2: bool) {
    // The header-read timeout is long so that only the idle timeout can close the connection.
    let s = setup(&["--idle-timeout", "500ms", "--header-read-timeout", "10s"]).await;
    let (mut conn, task) = open_watched(s.sidecar.addr, s.pki.ca_pem.as_bytes(), http2).await;
    let (status, _, body) = conn.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from upstream\n"));
    let served = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), task).await;
    let took = served.elapsed();
    assert!(ended.is_ok(), "http2={http2}: the idle connection was still open 2s after its last request");
    assert!(took >= Duration::from_millis(400), "http2={http2}: closed after {took:?}, before the 500ms idle timeout");
    let again = conn.send(Request::get("/").body(empty()).unwrap()).await;
    assert!(again.is_err(), "http2={http2}: a request on the closed connection must fail, got {again:?}");
    assert_eq!(s.upstream.log.requests.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_http2_connection_is_closed_after_the_idle_timeout() {
    idle_connection_is_closed(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_http1_connection_is_closed_after_the_idle_timeout() {
    idle_connection_is_closed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_connections_are_not_closed_by_the_idle_timeout() {
    let s = setup(&["--idle-timeout", "500ms", "--header-read-timeout", "10s"]).await;
    let mut conns = Vec::new();
    for http2 in [false, true] {
        conns.push(open_watched(s.sidecar.addr, s.pki.ca_pem.as_bytes(), http2).await);
    }
    // 2 s of a request every 200 ms: four times the idle timeout, never idle for that long.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(2) {
        tick.tick().await;
        for (conn, task) in conns.iter_mut() {
            assert!(!task.is_finished(), "a connection in use was closed after {:?} (round {rounds})", start.elapsed());
            let (status, _, _) = conn.get("/").await;
            assert_eq!(status, StatusCode::OK);
        }
        rounds += 1;
    }
    assert!(rounds >= 9, "only {rounds} rounds of requests");
    // Once they stop, both are closed as idle.
    for (_, task) in conns {
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("closed once idle").unwrap().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_outlasting_the_idle_timeout_still_completes() {
    // While the upstream thinks for 1.5 s the client connection carries no bytes; that is a
    // request in flight, not an idle connection, and its response must arrive.
    let s = setup(&["--idle-timeout", "500ms", "--header-read-timeout", "10s"]).await;
    let h1 = in_flight(&s, "/slow/1500", false).await;
    let h2 = in_flight(&s, "/slow/1500", true).await;
    for (name, request) in [("http/1.1", h1), ("h2", h2)] {
        let result =
            tokio::time::timeout(Duration::from_secs(4), request).await.expect("the slow request ends").unwrap();
        assert_eq!(result, Ok((StatusCode::OK, "slow response\n".to_owned())), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. TLS handshake timeout.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_handshake_timeout_closes_silent_and_stalled_handshakes() {
    let s = setup(&["--tls-handshake-timeout", "300ms"]).await;

    // A TCP connection that never starts TLS.
    let mut silent = TcpStream::connect(s.sidecar.addr).await.unwrap();
    let start = Instant::now();
    // A ClientHello record header announcing 512 bytes, followed by only a few of them.
    let mut partial = TcpStream::connect(s.sidecar.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x00, 0x01]).await.unwrap();
    let partial_start = Instant::now();

    let silent_closed = closed_within(&mut silent, Duration::from_secs(2), "TCP connection sending nothing").await;
    let partial_closed = closed_within(&mut partial, Duration::from_secs(2), "partial ClientHello").await;
    let (a, b) = (silent_closed - start, partial_closed - partial_start);
    assert!(
        a >= Duration::from_millis(250),
        "silent connection closed after {a:?}, before the 300ms handshake timeout"
    );
    assert!(
        b >= Duration::from_millis(250),
        "stalled handshake closed after {b:?}, before the 300ms handshake timeout"
    );

    // A real client completes its handshake within the limit and is served.
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), true).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// 4 & 5. Signals and graceful drain.
// ---------------------------------------------------------------------------------------------

/// Starts GET `path` on a fresh connection in the background.
async fn in_flight(s: &Setup, path: &str, http2: bool) -> JoinHandle<Result<(StatusCode, String), String>> {
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), http2).await;
    let path = path.to_owned();
    tokio::spawn(async move {
        let response =
            conn.send(Request::get(path).body(empty()).unwrap()).await.map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

async fn drains_in_flight_request_on(signal: &str, http2: bool) {
    // No --shutdown-delay: the listener closes at once (tests/shutdown.rs covers the delay).
    let mut s = setup(&["--shutdown-delay", "0s"]).await;
    let request = in_flight(&s, "/slow/1500", http2).await;
    upstream_saw(&s.upstream, 1, Duration::from_secs(3)).await;

    let signalled = Instant::now();
    s.sidecar.signal(signal);
    wait_log(&s.sidecar, &format!("received SIG{signal}"), Duration::from_secs(3));
    wait_log(&s.sidecar, "waiting up to 30s for 1 open connection(s)", Duration::from_secs(1));
    // The listener is closed while the process is still alive and draining.
    refused_within(s.sidecar.addr, Duration::from_secs(2)).await;
    assert_eq!(s.sidecar.child.try_wait().unwrap(), None, "exited before the in-flight request finished");

    let result =
        tokio::time::timeout(Duration::from_secs(4), request).await.expect("in-flight request finishes").unwrap();
    assert_eq!(
        result,
        Ok((StatusCode::OK, "slow response\n".to_owned())),
        "the in-flight request completes during the drain"
    );
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", s.sidecar.logs.text());
    assert!(signalled.elapsed() < Duration::from_secs(4), "exit took {:?}", signalled.elapsed());
    let log = s.sidecar.logs.text();
    assert!(log.contains("draining in-flight requests"), "{log}");
    assert!(log.contains("all connections drained; exiting"), "{log}");
    assert_eq!(s.upstream.log.requests.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_an_in_flight_http1_request_then_exits_0() {
    drains_in_flight_request_on("TERM", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_an_in_flight_http2_request_then_exits_0() {
    drains_in_flight_request_on("TERM", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigint_drains_like_sigterm_and_exits_0() {
    drains_in_flight_request_on("INT", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_timeout_bounds_shutdown_when_a_request_does_not_finish() {
    let mut s = setup(&["--drain-timeout", "300ms", "--shutdown-delay", "0s"]).await;
    let request = in_flight(&s, "/slow/5000", false).await;
    upstream_saw(&s.upstream, 1, Duration::from_secs(3)).await;
    let signalled = Instant::now();
    s.sidecar.signal("TERM");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(2));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", s.sidecar.logs.text());
    assert!(took >= Duration::from_millis(250), "exited after {took:?}, without waiting for the 300ms drain timeout");
    wait_log(
        &s.sidecar,
        "drain timeout reached with 1 connection(s) still open; exiting anyway",
        Duration::from_secs(1),
    );
    let result =
        tokio::time::timeout(Duration::from_secs(2), request).await.expect("the client notices the exit").unwrap();
    assert!(result.is_err(), "the 5 s request cannot have completed in a 300ms drain: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let mut s = setup(&["--drain-timeout", "10s", "--shutdown-delay", "0s"]).await;
    let (mut h1, h1_task) = open_watched(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    let (mut h2, h2_task) = open_watched(s.sidecar.addr, s.pki.ca_pem.as_bytes(), true).await;
    assert_eq!(h1.get("/").await.0, StatusCode::OK);
    assert_eq!(h2.get("/").await.0, StatusCode::OK);
    assert!(!h1_task.is_finished() && !h2_task.is_finished(), "both connections are open when the signal comes");
    let signalled = Instant::now();
    s.sidecar.signal("TERM");
    // Being idle, both are closed by the server at once (HTTP/2 with GOAWAY) instead of using up
    // the 10 s drain timeout.
    for (name, task) in [("http/1.1", h1_task), ("h2", h2_task)] {
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| panic!("the idle {name} connection was not closed on SIGTERM"))
            .unwrap()
            .ok();
    }
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(2), "exit took {:?}", signalled.elapsed());
    assert!(s.sidecar.logs.text().contains("all connections drained"), "{}", s.sidecar.logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfinished_tls_handshake_does_not_hold_up_shutdown() {
    // A client that opened TCP but never sent a ClientHello has no request in flight; it must
    // not keep the process alive for the handshake timeout (or the drain timeout).
    let mut s = setup(&["--drain-timeout", "10s", "--tls-handshake-timeout", "8s", "--shutdown-delay", "0s"]).await;
    let _stalled = TcpStream::connect(s.sidecar.addr).await.unwrap();
    // Accepts happen in order, so once a later connection is served the stalled one is accepted.
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    let signalled = Instant::now();
    s.sidecar.signal("TERM");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(2), "exit took {:?}", signalled.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_signal_exits_at_once_with_code_1() {
    let mut s = setup(&["--drain-timeout", "30s", "--shutdown-delay", "0s"]).await;
    let request = in_flight(&s, "/slow/5000", false).await;
    upstream_saw(&s.upstream, 1, Duration::from_secs(3)).await;
    s.sidecar.signal("TERM");
    wait_log(&s.sidecar, "waiting up to 30s for 1 open connection(s)", Duration::from_secs(2));
    assert_eq!(s.sidecar.child.try_wait().unwrap(), None, "still draining after the first signal");
    let second = Instant::now();
    s.sidecar.signal("INT");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(2));
    assert_eq!(status.code(), Some(1), "log:\n{}", s.sidecar.logs.text());
    assert!(second.elapsed() < Duration::from_secs(2));
    assert!(s.sidecar.logs.text().contains("second signal received"), "{}", s.sidecar.logs.text());
    request.abort();
}

// ---------------------------------------------------------------------------------------------
// 6. --max-connections.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_holds_further_clients_in_the_backlog_until_one_closes() {
    let s = setup(&["--max-connections", "2"]).await;
    let ca = s.pki.ca_pem.as_bytes();
    let (mut first, first_task) = open_watched(s.sidecar.addr, ca, false).await;
    let (mut second, _second_task) = open_watched(s.sidecar.addr, ca, true).await;
    assert_eq!(first.get("/").await.0, StatusCode::OK);
    assert_eq!(second.get("/").await.0, StatusCode::OK);

    // The kernel completes the TCP handshake (listen backlog), but the proxy does not accept.
    let tcp = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(s.sidecar.addr))
        .await
        .expect("TCP connect completes in the backlog")
        .expect("TCP connect succeeds");
    let config = client_config(ca, &[b"http/1.1"]);
    let mut third = tokio::spawn(async move {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third).await.is_err(),
        "the third TLS handshake completed while two connections were open"
    );
    wait_log(&s.sidecar, "--max-connections (2) reached", Duration::from_secs(1));

    // Closing one of the first two lets the third in.
    drop(first);
    first_task.abort();
    let tls = tokio::time::timeout(Duration::from_secs(3), third)
        .await
        .expect("the third handshake completes once a slot is free")
        .unwrap()
        .expect("TLS handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut third = HttpsConnection::H1(send);
    let (status, _, body) = third.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from upstream\n"));
    // The surviving connection still works too.
    assert_eq!(second.get("/").await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// 6b. The open-file limit.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    let hard = hard_open_file_limit_for_a_child();
    let s = setup_with(&[], with_open_file_limit(256, hard)).await;
    assert_eq!(open_file_limits(s.sidecar.pid()), (hard.to_string(), hard.to_string()));
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_file_descriptors_new_clients_wait_open_ones_are_served_and_all_are_once_some_close() {
    let s = setup_with(&["--admin", "127.0.0.1:0"], with_open_file_limit(64, 64)).await;
    let (addr, ca) = (s.sidecar.addr, s.pki.ca_pem.as_bytes());
    let admin = s.sidecar.admin_addr();
    let (mut early, _early_task) = open_watched(addr, ca, false).await;
    assert_eq!(early.get("/").await.0, StatusCode::OK);

    // TCP connections that never start TLS, more than the proxy has descriptors for.
    let mut flood = Vec::new();
    for _ in 0..80 {
        flood.push(TcpStream::connect(addr).await.expect("TCP connect completes, in the listen queue if need be"));
    }
    let line = wait_log(&s.sidecar, "accept failed: Too many open files", Duration::from_secs(5));
    assert!(line.contains(&format!("HTTPS listener on {addr}: ")), "the warning names the listener: {line}");
    assert!(line.contains("its limit of 64 open files"), "the warning names the limit: {line}");

    // The client that was in before keeps its connection and its pooled upstream connection.
    assert_eq!(early.get("/").await.0, StatusCode::OK);

    drop(flood);
    let late = async {
        let mut late = HttpsConnection::open(addr, ca, true).await;
        late.get("/").await.0
    };
    let status = tokio::time::timeout(Duration::from_secs(5), late)
        .await
        .expect("a new client is served once descriptors are free");
    assert_eq!(status, StatusCode::OK);

    // The admin API, out of descriptors too until now, shows what happened.
    let sample = |metrics: &str, name: &str| -> Option<f64> {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let mut metrics = String::new();
    wait_until("the last of the flood to be closed", Duration::from_secs(5), || {
        metrics = http_exchange(admin, "GET", "/metrics", &[], "").map(|(_, body)| body).unwrap_or_default();
        sample(&metrics, "process_open_fds").is_some_and(|open| open < 64.0)
    });
    assert!(sample(&metrics, "sidecar_accept_failures_total").is_some_and(|n| n >= 1.0), "{metrics}");
    assert_eq!(sample(&metrics, "process_max_fds"), Some(64.0), "{metrics}");
}

// ---------------------------------------------------------------------------------------------
// 7. --max-header-size.
// ---------------------------------------------------------------------------------------------

fn with_header(path: &str, len: usize) -> Request<TestBody> {
    Request::get(path).header("x-big", "a".repeat(len)).body(empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_request_head_gets_431_over_http1() {
    let s = setup(&["--max-header-size", "8192"]).await;
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    let response = conn.send(with_header("/big", 20 * 1024)).await.expect("a response to the oversized head");
    assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(s.upstream.log.requests.lock().unwrap().is_empty(), "an oversized head must not reach the upstream");

    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    let response = conn.send(with_header("/small", 2 * 1024)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(s.upstream.last_request().uri, "/small");
    assert_eq!(s.upstream.last_request().headers["x-big"].len(), 2 * 1024);

    // The limit is the flag's: with the default (64 KiB) the same 20 KB header passes.
    let s = setup(&[]).await;
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.send(with_header("/big", 20 * 1024)).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_request_headers_get_431_over_http2() {
    let s = setup(&["--max-header-size", "8192"]).await;
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), true).await;
    // The h2 client sends the block despite the advertised SETTINGS_MAX_HEADER_LIST_SIZE; the
    // server answers that stream with 431 (and resets it) instead of failing the connection.
    let response = conn.send(with_header("/big", 20 * 1024)).await.expect("a response to the oversized headers");
    assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(s.upstream.log.requests.lock().unwrap().is_empty(), "oversized headers must not reach the upstream");
    // The stream was refused, not the connection: the same connection serves a normal request.
    let response = conn.send(with_header("/small", 2 * 1024)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(s.upstream.last_request().uri, "/small");
}

// ---------------------------------------------------------------------------------------------
// 8. The plain-HTTP redirect listener.
// ---------------------------------------------------------------------------------------------

fn redirect_addr(sidecar: &Sidecar) -> SocketAddr {
    let line = sidecar.logs.wait_for("listening on https://", Duration::from_secs(1));
    let rest = line.split("; redirecting http://").nth(1).unwrap_or_else(|| panic!("no redirect address in {line:?}"));
    let addr = rest.split_whitespace().next().unwrap();
    assert!(rest.trim_end().ends_with("to https"), "{line}");
    addr.parse().unwrap_or_else(|e| panic!("redirect address {addr:?}: {e}"))
}

/// Sends `raw` over plain TCP and returns (status, Location header or "").
async fn raw_http(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // The redirect listener does not keep connections alive, so it closes after answering.
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut response))
        .await
        .expect("the redirect listener answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status =
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let location = text
        .lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirect_listener_sends_308_to_the_https_port() {
    let s = setup(&["--redirect-http", "127.0.0.1:0"]).await;
    let http = redirect_addr(&s.sidecar);
    assert_ne!(http, s.sidecar.addr);
    let port = s.sidecar.addr.port();

    let (status, location) = raw_http(http, "GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (308, format!("https://example.com:{port}/a/b?c=d").as_str()));

    let (status, location) = raw_http(http, "GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\n\r\n").await;
    assert_eq!(
        (status, location.as_str()),
        (308, format!("https://example.com:{port}/a/b?c=d").as_str()),
        "the client's port is replaced"
    );

    let (status, location) = raw_http(http, "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (308, format!("https://[::1]:{port}/x").as_str()));

    let (status, location) = raw_http(http, "GET /a/b?c=d HTTP/1.0\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (400, ""), "no Host to redirect to");

    let (status, _) = raw_http(http, "HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!(status, 308, "every method is redirected");

    // Nothing reaches the app through the plain-HTTP listener.
    assert!(s.upstream.log.requests.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirect_uses_the_public_https_port_and_omits_443() {
    let s = setup(&["--redirect-http", "127.0.0.1:0", "--public-https-port", "443"]).await;
    let http = redirect_addr(&s.sidecar);
    let (status, location) = raw_http(http, "GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (308, "https://example.com/a/b?c=d"));
    let (status, location) = raw_http(http, "GET / HTTP/1.1\r\nHost: example.com:80\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (308, "https://example.com/"));

    let s = setup(&["--redirect-http", "127.0.0.1:0", "--public-https-port", "9443"]).await;
    let http = redirect_addr(&s.sidecar);
    let (status, location) = raw_http(http, "GET /p HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!((status, location.as_str()), (308, "https://example.com:9443/p"));
}

// ---------------------------------------------------------------------------------------------
// 9. Configuration layering: flag > environment > --config file > default.
// ---------------------------------------------------------------------------------------------

fn write_config(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    write(&path, contents);
    path.to_str().unwrap().to_owned()
}

async fn status_of(sidecar: &Sidecar, pki: &TestPki, path: &str) -> StatusCode {
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    conn.get(path).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_file_is_overridden_by_env_which_is_overridden_by_flags() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = upstream.url();
    let file = write_config(
        dir.path(),
        "sidecar.toml",
        &format!("[proxy]\nupstream = \"{url}\"\nupstream-timeout = \"300ms\"\n"),
    );
    let (cert, key) = cert_args(&pki);
    let base = ["--upstream", url.as_str(), "--cert", cert.as_str(), "--key", key.as_str(), "--config", file.as_str()];

    // The file's 300ms applies.
    let sidecar = Sidecar::start(&base);
    assert_eq!(status_of(&sidecar, &pki, "/slow/3000").await, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(status_of(&sidecar, &pki, "/slow/10").await, StatusCode::OK);
    drop(sidecar);

    // The environment wins over the file.
    let sidecar = Sidecar::start_with(&base, |cmd| {
        cmd.env("SIDECAR_UPSTREAM_TIMEOUT", "5s");
    });
    assert_eq!(status_of(&sidecar, &pki, "/slow/1000").await, StatusCode::OK);
    drop(sidecar);

    // A flag wins over the environment.
    let mut args = base.to_vec();
    args.extend(["--upstream-timeout", "300ms"]);
    let sidecar = Sidecar::start_with(&args, |cmd| {
        cmd.env("SIDECAR_UPSTREAM_TIMEOUT", "5s");
    });
    assert_eq!(status_of(&sidecar, &pki, "/slow/1000").await, StatusCode::GATEWAY_TIMEOUT);
    drop(sidecar);

    // The file can also be named by SIDECAR_CONFIG.
    let sidecar = Sidecar::start_with(&base[..6], |cmd| {
        cmd.env("SIDECAR_CONFIG", &file);
    });
    assert_eq!(status_of(&sidecar, &pki, "/slow/3000").await, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_file_accepts_snake_case_keys() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = upstream.url();
    let file =
        write_config(dir.path(), "snake.toml", "[proxy]\nupstream_timeout = \"300ms\"\nmax_header_size = 8192\n");
    let (cert, key) = cert_args(&pki);
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", &cert, "--key", &key, "--config", &file]);
    assert_eq!(status_of(&sidecar, &pki, "/slow/3000").await, StatusCode::GATEWAY_TIMEOUT);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let response = conn.send(with_header("/", 20 * 1024)).await.unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "max_header_size from the file applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_file_alone_can_supply_the_upstream() {
    // `sidecar proxy --help` shows `upstream = "..."` in the [proxy] table as the first example.
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "sidecar.toml", &format!("[proxy]\nupstream = \"{}\"\n", upstream.url()));
    let (cert, key) = cert_args(&pki);
    // No --upstream and no SIDECAR_UPSTREAM. A refusal exits at once, and `start` then fails
    // with the process's output.
    let sidecar = Sidecar::start(&["--cert", &cert, "--key", &key, "--config", &file]);
    let addr = sidecar.addr;
    let mut conn = HttpsConnection::open(addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_from_the_environment_alone_is_enough_to_start() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let (cert, key) = cert_args(&pki);
    let url = upstream.url();
    let sidecar = Sidecar::start_with(&["--cert", &cert, "--key", &key], |cmd| {
        cmd.env("SIDECAR_UPSTREAM", &url);
    });
    assert_eq!(status_of(&sidecar, &pki, "/").await, StatusCode::OK);
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 1);
}

#[test]
fn bad_config_files_exit_2_naming_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key.toml",
            "[proxy]\nupstream-timeout = \"1s\"\nbogus-option = 1\n".into(),
            vec!["[proxy] has no option `bogus-option`"],
        ),
        (
            "unknown-table.toml",
            "[proxy]\nupstream-timeout = \"1s\"\n[server]\nlisten = \"x\"\n".into(),
            vec!["unknown table [server]"],
        ),
        ("invalid.toml", "[proxy\nupstream-timeout = \"1s\"\n".into(), vec!["is not valid TOML", "line 1"]),
        (
            "bad-value.toml",
            "[proxy]\nupstream-timeout = \"soon\"\n".into(),
            vec!["invalid value 'soon'", "--upstream-timeout"],
        ),
        (
            "bad-type.toml",
            "[proxy]\nupstream-timeout = { seconds = 1 }\n".into(),
            vec!["`upstream-timeout` must be a string, number or boolean"],
        ),
        ("out-of-range.toml", "[proxy]\nmax-connections = 0\n".into(), vec!["invalid value '0'", "--max-connections"]),
    ];
    for (name, contents, needles) in cases {
        let path = write_config(dir.path(), name, &contents);
        let (code, _, stderr) = run_bounded(
            &["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--config", &path],
            &[],
            Duration::from_secs(10),
        );
        assert_eq!(code, 2, "{name}: exit code; stderr:\n{stderr}");
        assert!(stderr.contains(&path), "{name}: stderr names the file {path}:\n{stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{name}: stderr says {needle:?}:\n{stderr}");
        }
    }

    let missing = dir.path().join("does-not-exist.toml");
    let missing = missing.to_str().unwrap();
    let (code, _, stderr) = run_bounded(
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--config", missing],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(code, 2, "missing file: stderr:\n{stderr}");
    assert!(stderr.contains(&format!("cannot read config file {missing}")), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");

    // Also when the file comes from SIDECAR_CONFIG, and the value would be overridden: the
    // problem is still reported rather than silently ignored.
    let bad = write_config(dir.path(), "env-named.toml", "[proxy]\nbogus = true\n");
    let (code, _, stderr) = run_bounded(
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9"],
        &[("SIDECAR_CONFIG", &bad)],
        Duration::from_secs(10),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&bad) && stderr.contains("`bogus`"), "{stderr}");
}

#[test]
fn config_file_accepts_every_option_listed_by_proxy_help() {
    // The help says "Every option can also come from ... the [proxy] table ... whose keys are
    // the long option names", and `sidecar proxy --help` lists --log-level among the options.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "log.toml", "[proxy]\nlog-level = \"debug\"\nupstream-timeout = \"soon\"\n");
    let (code, _, stderr) = run_bounded(
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--config", &path],
        &[],
        Duration::from_secs(10),
    );
    // The deliberately bad upstream-timeout makes the run end either way; the question is
    // which complaint it ends with.
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains("no option `log-level`"), "log-level is refused in the [proxy] table:\n{stderr}");
    assert!(stderr.contains("invalid value 'soon'"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 10. The command line surface.
// ---------------------------------------------------------------------------------------------

/// `sidecar proxy --help` split into one whitespace-collapsed text per option.
fn help_sections(help: &str) -> Vec<String> {
    let mut sections: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('-') && (1..=6).contains(&indent) {
            sections.push(String::new());
        }
        if let Some(current) = sections.last_mut() {
            current.push(' ');
            current.push_str(line);
        }
    }
    sections.into_iter().map(|s| collapse_whitespace(&s)).collect()
}

#[test]
fn proxy_help_lists_every_option_with_its_default_and_environment_variable() {
    let (code, stdout, stderr) = run_bounded(&["proxy", "--help"], &[], Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    let sections = help_sections(&stdout);
    let expected: &[(&str, &str, Option<&str>)] = &[
        ("--config <FILE>", "SIDECAR_CONFIG", None),
        ("--upstream <URL>", "SIDECAR_UPSTREAM", None),
        ("--listen <ADDR>", "SIDECAR_LISTEN", Some("127.0.0.1:8443")),
        ("--cert <FILE>", "SIDECAR_CERT", None),
        ("--key <FILE>", "SIDECAR_KEY", None),
        ("--state-dir <DIR>", "SIDECAR_STATE_DIR", None),
        ("--forwarded-headers <POLICY>", "SIDECAR_FORWARDED_HEADERS", Some("overwrite")),
        ("--upstream-timeout <DURATION>", "SIDECAR_UPSTREAM_TIMEOUT", Some("60s")),
        ("--upstream-connect-timeout <DURATION>", "SIDECAR_UPSTREAM_CONNECT_TIMEOUT", Some("5s")),
        ("--upstream-idle-timeout <DURATION>", "SIDECAR_UPSTREAM_IDLE_TIMEOUT", Some("4s")),
        ("--tls-handshake-timeout <DURATION>", "SIDECAR_TLS_HANDSHAKE_TIMEOUT", Some("10s")),
        ("--header-read-timeout <DURATION>", "SIDECAR_HEADER_READ_TIMEOUT", Some("20s")),
        ("--idle-timeout <DURATION>", "SIDECAR_IDLE_TIMEOUT", Some("60s")),
        ("--drain-timeout <DURATION>", "SIDECAR_DRAIN_TIMEOUT", Some("30s")),
        ("--shutdown-delay <DURATION>", "SIDECAR_SHUTDOWN_DELAY", Some("5s")),
        ("--max-header-size <BYTES>", "SIDECAR_MAX_HEADER_SIZE", Some("65536")),
        ("--max-connections <N>", "SIDECAR_MAX_CONNECTIONS", Some("10000")),
        ("--redirect-http <ADDR>", "SIDECAR_REDIRECT_HTTP", None),
        ("--public-https-port <PORT>", "SIDECAR_PUBLIC_HTTPS_PORT", None),
        ("--log-level <FILTER>", "SIDECAR_LOG_LEVEL", Some("info")),
    ];
    for (flag, env, default) in expected {
        let section = sections
            .iter()
            .find(|s| s.starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} is not listed in `sidecar proxy --help`:\n{stdout}"));
        assert!(section.contains(&format!("[env: {env}=]")), "{flag} shows its variable {env}: {section}");
        if let Some(default) = default {
            assert!(
                section.contains(&format!("[default: {default}]")),
                "{flag} shows its default {default}: {section}"
            );
        }
    }
    // Any other option (added later) has its environment variable too.
    for section in sections.iter().filter(|s| s.starts_with("--") && !s.starts_with("--help")) {
        assert!(section.contains("[env: SIDECAR_"), "option without an environment variable: {section}");
    }
    assert!(stdout.contains("Usage: sidecar proxy [OPTIONS]"), "{stdout}");
    assert!(stdout.contains("[proxy]"), "the help shows the config file format:\n{stdout}");
}

#[test]
fn version_prints_the_crate_version() {
    let (code, stdout, stderr) = run_bounded(&["--version"], &[], Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), format!("sidecar {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn no_subcommand_is_a_usage_error() {
    let (code, stdout, stderr) = run_bounded(&[], &[], Duration::from_secs(10));
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("Usage: sidecar [OPTIONS] <COMMAND>"), "{stderr}");
    assert!(stderr.contains("proxy"), "the usage names the proxy subcommand: {stderr}");

    let (code, _, stderr) = run_bounded(&["proxy", "--listen", "127.0.0.1:0"], &[], Duration::from_secs(10));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--upstream <URL>"), "a missing upstream is named: {stderr}");

    let (code, _, stderr) =
        run_bounded(&["proxy", "--upstream", "http://127.0.0.1:9", "--bogus"], &[], Duration::from_secs(10));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 11. Resilience to a misbehaving upstream.
// ---------------------------------------------------------------------------------------------

/// Requests under `/broken` get a head promising 100 bytes, 5 bytes, and a closed connection;
/// anything else gets a complete keep-alive response.
fn flaky_script(request_line: &str) -> (Vec<u8>, After) {
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    if path.starts_with("/broken") {
        return (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(), After::Close);
    }
    (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhealthy\n".to_vec(), After::KeepOpen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_dying_mid_response_breaks_only_that_response() {
    let upstream = ScriptedUpstream::start(flaky_script).await;
    let pki = TestPki::new();
    let mut sidecar = start_sidecar(&upstream.url, &pki, &[], |_| {});

    for http2 in [false, true] {
        let (mut conn, _task) = open_watched(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        // The head was already forwarded (200, Content-Length: 100), so the failure can only
        // show in the body: it must end in an error, never look like a complete 5-byte body.
        let response =
            conn.send(Request::get("/broken").body(empty()).unwrap()).await.expect("the upstream's head is forwarded");
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::time::timeout(Duration::from_secs(3), response.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("http2={http2}: the truncated body neither ended nor failed within 3s"));
        assert!(
            body.is_err(),
            "http2={http2}: a truncated upstream body reached the client as complete: {:?}",
            body.map(|b| b.to_bytes())
        );

        assert_eq!(sidecar.child.try_wait().unwrap(), None, "the proxy must survive a broken upstream response");
        // HTTP/2 isolates the failure to its stream; over HTTP/1.1 the client needs a new connection.
        if !http2 {
            conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
        }
        let (status, _, body) = conn.get("/fine").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "healthy\n"), "http2={http2}: the next request is served");
    }
    assert!(upstream.connections() >= 2, "each broken response costs an upstream connection");
}

/// clap's `requires` sees only the command line: a certificate from the config file without
/// its key must stop the start, not fall back silently to the development certificate.
#[test]
fn cert_without_key_in_the_config_file_is_refused() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let config = pki.dir.path().join("half.toml");
    std::fs::write(
        &config,
        format!("[proxy]\nupstream = \"http://127.0.0.1:1\"\ncert = \"{}\"\n", leaf.cert.display()),
    )
    .unwrap();
    let (code, stderr) = run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cert is given") && stderr.contains("--key is not"), "{stderr}");
    assert!(!stderr.contains("development certificate"), "{stderr}");
}
