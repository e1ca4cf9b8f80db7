//! What the upstream sees and what the client gets back: headers, pooling, errors, bodies,
//! WebSocket. Every test runs the real binary between a real client and a real upstream.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_overwrite_client_claims_over_http1() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let request = Request::get("/path?q=1")
        .header("host", "app.example:8443")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-app-header", "kept")
        .body(empty())
        .unwrap();
    let response = conn.send(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = upstream.last_request();
    let h = header_map(&seen.headers);
    assert_eq!(seen.uri, "/path?q=1", "origin-form target with the query");
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(h["host"], "app.example:8443", "Host is kept");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "the client's XFF is replaced by the peer address");
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "app.example:8443");
    assert_eq!(h["x-app-header"], "kept");
    for gone in ["forwarded", "x-drop-me", "keep-alive", "te", "proxy-authorization"] {
        assert!(!h.contains_key(gone), "{gone} must not reach the upstream: {h:?}");
    }
    // hyper's client adds its own `connection` only when closing; it must not carry ours.
    assert!(h.get("connection").is_none_or(|v| !v.contains("x-drop-me")));
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_mode_appends_to_client_forwarded_for() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--forwarded-headers", "trust"]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let request = Request::get("/")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "http")
        .body(empty())
        .unwrap();
    conn.send(request).await.unwrap();
    let h = header_map(&upstream.last_request().headers);
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread")]
async fn http10_request_without_host_reaches_the_upstream_with_the_upstreams_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let mut tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    tls.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    // HTTP/1.0 without keep-alive: the proxy closes once it has answered.
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await.unwrap().ok();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 200") && response.ends_with("hello from upstream\n"), "{response}");

    let seen = upstream.last_request();
    let h = header_map(&seen.headers);
    assert_eq!((seen.version, seen.uri.as_str()), (http::Version::HTTP_11, "/old"));
    assert_eq!(h["host"], upstream.addr.to_string(), "HTTP/1.1 needs a Host: the upstream's own");
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(!h.contains_key("x-forwarded-host"), "the client named no host: {h:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_mid_request_closes_the_apps_connection() {
    // The app is still working on the request when its client gives up: the proxy must tell
    // the app (its connection closes) rather than keep it busy until the upstream timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_url = format!("http://{}", app.local_addr().unwrap());
    let pki = TestPki::new();
    let sidecar = start_sidecar(&app_url, &pki, &[], |_| {});
    let mut tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    tls.write_all(b"GET /report HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (mut upstream, _) = tokio::time::timeout(Duration::from_secs(5), app.accept()).await.unwrap().unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(upstream.read(&mut byte).await.unwrap(), 1, "the request head reaches the app");
        head.push(byte[0]);
    }
    drop(tls);
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), upstream.read(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the app's connection must close once the client is gone (the upstream timeout is 60 s): {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_in_two_tls_records_of_one_write_are_both_answered() {
    // Both records arrive in one read, so the second request waits decrypted inside the TLS
    // session while the socket has nothing more: it must be served without more bytes coming.
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let mut tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let session = &mut tls.get_mut().1;
    session.writer().write_all(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    session.writer().write_all(b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    tls.flush().await.unwrap();
    let mut received = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        while received.windows(20).filter(|w| *w == b"hello from upstream\n").count() < 2 {
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed the connection: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(answered.is_ok(), "only this came back: {}", String::from_utf8_lossy(&received));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_requests_reach_the_upstream_as_http1_with_host() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let (status, _, body) = conn.get("/h2?x=y").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from upstream\n");
    let seen = upstream.last_request();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.uri, "/h2?x=y");
    let h = header_map(&seen.headers);
    assert_eq!(h["host"], "localhost", "the :authority becomes Host");
    assert_eq!(h["x-forwarded-host"], "localhost");
    assert_eq!(h["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread")]
async fn response_hop_by_hop_headers_are_stripped() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let (status, headers, _) = conn.get("/hop").await;
        assert_eq!(status, StatusCode::OK);
        let h = header_map(&headers);
        assert_eq!(h["x-upstream-public"], "visible");
        for gone in ["keep-alive", "x-upstream-private", "proxy-authenticate"] {
            assert!(!h.contains_key(gone), "{gone} must not reach the client (http2={http2}): {h:?}");
        }
        assert!(h.get("connection").is_none_or(|v| !v.contains("x-upstream-private")));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_pooled_and_kept_alive() {
    // Each worker thread keeps its own pool; one worker makes the count exact.
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--workers", "1"]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    for _ in 0..50 {
        let (status, _, _) = conn.get("/").await;
        assert_eq!(status, StatusCode::OK);
    }
    // A second client connection reuses the same idle upstream connection.
    let mut other = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    for _ in 0..50 {
        assert_eq!(other.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(
        upstream.log.connections.load(Ordering::SeqCst),
        1,
        "100 sequential requests should share one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_worker_listens_on_the_port_and_a_second_proxy_is_refused_it() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--workers", "3"]).await;
    let port = sidecar.addr.port();
    assert_eq!(listeners_on(port), 3, "one listening socket per worker");
    // The workers' SO_REUSEPORT group must not take in another process that asks for the port.
    let leaf = pki.issue("second");
    let (listen, url) = (sidecar.addr.to_string(), upstream.url());
    let (cert, key) = (leaf.cert.to_str().unwrap(), leaf.key.to_str().unwrap());
    let args: Vec<String> =
        ["proxy", "--listen", &listen, "--upstream", &url, "--cert", cert, "--key", key].map(String::from).into();
    let (code, output) =
        tokio::task::spawn_blocking(move || run_to_exit(&args.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .unwrap();
    assert_eq!(code, 2, "{output}");
    assert!(output.contains(&format!("cannot listen on {listen}: Address already in use")), "{output}");
    assert_eq!(listeners_on(port), 3, "the refused proxy left nothing listening");
    // New connections are spread over the three sockets; every one is served.
    for round in 0..24 {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), round % 2 == 0).await;
        assert_eq!(conn.get("/").await.0, StatusCode::OK, "connection {round}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_closing_its_connections_fails_no_request() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--workers", "1"]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    for round in 0..20 {
        let (status, _, body) = conn.get("/close").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "closing\n"), "round {round}");
        // The pooled connection the app just closed is not handed to this request.
        assert_eq!(conn.get("/").await.0, StatusCode::OK, "round {round}");
    }
    let log = upstream.log.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the app to see its 20 closes", Duration::from_secs(10), || log.closed.load(Ordering::SeqCst) >= 20)
    })
    .await
    .unwrap();
    assert!(upstream.log.connections.load(Ordering::SeqCst) >= 21, "each close costs a new connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_upstream_connections_are_closed_after_the_upstream_idle_timeout() {
    let (upstream, pki, sidecar) =
        proxy_in_front_of_upstream(&["--workers", "1", "--upstream-idle-timeout", "300ms"]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    let log = upstream.log.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the idle upstream connection to be closed", Duration::from_secs(10), || {
            log.closed.load(Ordering::SeqCst) == 1
        })
    })
    .await
    .unwrap();
    // The client's own connection stays open; its next request gets a new upstream connection.
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    assert_eq!(upstream.log.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_upstream_gives_502_naming_the_cause_and_the_proxy_keeps_serving() {
    // A port that was just free: bind, note, release.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let url = format!("http://{dead}");
    let sidecar = Sidecar::start(&[
        "--upstream",
        &url,
        "--cert",
        leaf.cert.to_str().unwrap(),
        "--key",
        leaf.key.to_str().unwrap(),
    ]);
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        for _ in 0..3 {
            let (status, headers, body) = conn.get("/").await;
            assert_eq!(status, StatusCode::BAD_GATEWAY);
            assert!(body.contains("connection refused"), "body names the cause: {body}");
            assert!(body.contains(&dead.to_string()), "body names the upstream: {body}");
            assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
        }
    }
    sidecar.logs.wait_for("connection refused", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_gives_504_after_the_upstream_timeout() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--upstream-timeout", "300ms"]).await;
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let asked = std::time::Instant::now();
        let (status, _, body) = conn.get("/slow/3000").await;
        let took = asked.elapsed();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "http2={http2}");
        assert!(body.contains("300ms"), "{body}");
        // Never early; the pool's clock may add up to a quarter.
        assert!(took >= Duration::from_millis(300), "http2={http2}: 504 after {took:?}, before the 300ms timeout");
        assert!(took < Duration::from_millis(1500), "http2={http2}: 504 only after {took:?}");
        // Within the timeout the same route answers.
        let (status, _, _) = conn.get("/slow/10").await;
        assert_eq!(status, StatusCode::OK, "http2={http2}");
    }
    assert_eq!(upstream.log.requests.lock().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_response_streams_through_intact() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    const LEN: u64 = 64 * 1024 * 1024;
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let response = conn.send(Request::get(format!("/bytes/{LEN}")).body(empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (count, sum) = drain_body(response.into_body()).await;
        assert_eq!(count, LEN);
        assert_eq!(sum, pattern_checksum(LEN), "body bytes arrive unchanged (http2={http2})");
    }
}

/// A connection's last response may be held for close_notify (src/transport.rs), but a streamed
/// one to a request that asks to close flows as it comes: its first chunk arrives while the
/// upstream still holds the second.
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_response_to_a_closing_request_is_not_held_back() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let request = Request::get("/drip").header("connection", "close").body(empty()).unwrap();
    let response = conn.send(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first chunk arrives while the upstream still holds the second")
        .expect("a frame")
        .expect("a good frame");
    assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"first\n"[..]));
    upstream.log.drip.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect()).await.expect("the rest arrives").unwrap();
    assert_eq!(&rest.to_bytes()[..], b"second\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_upload_streams_without_growing_memory() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    const LEN: u64 = 1024 * 1024 * 1024;
    let before = sidecar.rss_kib();
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let response = conn
        .send(Request::post("/count").header("content-length", LEN.to_string()).body(pattern_stream(LEN)).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{LEN} {}", pattern_checksum(LEN)));
    let peak = sidecar.peak_rss_kib();
    // Buffering the body would need a GiB; streaming needs a few buffers per connection.
    assert!(peak < before + 48 * 1024, "peak RSS {peak} KiB after a 1 GiB upload (started at {before} KiB)");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_upload_without_content_length_is_streamed() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    const LEN: u64 = 32 * 1024 * 1024 + 17;
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let response = conn.send(Request::post("/count").body(pattern_stream(LEN)).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{LEN} {}", pattern_checksum(LEN)));
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_is_passed_through_both_ways() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let mut ws = websocket_echoes(tls, sidecar.addr.port(), 20).await;
    let big = vec![7u8; 1 << 20];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
    let h = header_map(&upstream.last_request().headers);
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["x-forwarded-proto"], "https");
}
