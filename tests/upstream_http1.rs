//! The proxy's HTTP/1.1 client against an upstream that answers with exact bytes: every way a
//! response body can be delimited, interim responses, malformed answers, and connections the
//! upstream closes. The upstream is a raw TCP listener, so nothing between the test and the
//! proxy normalizes what is on the wire.

mod common;

use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn script(request_line: &str) -> (Vec<u8>, After) {
    let path = request_line.split(' ').nth(1).unwrap_or("/");
    let keep = |text: &str| (text.as_bytes().to_vec(), After::KeepOpen);
    match path {
        "/chunked" => keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n\
             6\r\nhello \r\n6;ext=1\r\nworld!\r\n0\r\nx-checksum: 42\r\n\r\n",
        ),
        "/until-close" => {
            (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread me to the end".to_vec(), After::Close)
        }
        "/http10" => (b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nold ok".to_vec(), After::Close),
        "/early-hints" => keep(
            "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        ),
        "/head" => keep("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        "/no-content" => keep("HTTP/1.1 204 No Content\r\n\r\n"),
        "/ambiguous" => keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        "/two-lengths" => keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        "/garbage" => (b"this is not HTTP\r\n\r\n".to_vec(), After::Close),
        "/bad-chunk" => keep("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n"),
        "/huge-head" => keep(&format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024))),
        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(), After::Close),
        "/unasked-upgrade" => keep("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"),
        // Answers with keep-alive semantics, then closes anyway: an idle pooled connection dies.
        "/then-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye\n".to_vec(), After::Close),
        // Closes without answering, as an app that crashes on this request would.
        "/drop" => (Vec::new(), After::Close),
        _ => keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"),
    }
}

fn proxy_in_front_of(upstream: &ScriptedUpstream) -> (TestPki, Sidecar) {
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream.url, &pki, &["--workers", "1"], |_| {});
    (pki, sidecar)
}

/// GET `path`: status and body.
async fn get(conn: &mut HttpsConnection, path: &str) -> (StatusCode, String) {
    let (status, _, body) = conn.get(path).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_responses_reach_both_protocols_with_their_trailers() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let request = Request::get("/chunked").header("te", "trailers").body(empty()).unwrap();
        let response = conn.send(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(&collected.to_bytes()[..], b"hello world!", "http2={http2}");
        if http2 {
            assert_eq!(trailers.expect("trailers over HTTP/2")["x-checksum"], "42");
        }
        // The next answer on the same upstream connection is not desynchronized.
        assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()));
    }
    assert_eq!(upstream.connections(), 1, "chunked responses leave the upstream connection reusable");
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_delimited_by_close_arrive_whole_and_the_connection_is_not_reused() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(get(&mut conn, "/until-close").await, (StatusCode::OK, "read me to the end".to_owned()));
    assert_eq!(get(&mut conn, "/http10").await, (StatusCode::OK, "old ok".to_owned()));
    assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()));
    assert_eq!(upstream.connections(), 3, "each close-delimited or HTTP/1.0 answer costs its connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn interim_and_bodiless_responses_keep_the_connection_in_step() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(get(&mut conn, "/early-hints").await, (StatusCode::OK, "final".to_owned()));
    // HEAD: the length describes the body a GET would get, and no body follows.
    let response = conn.send(Request::head("/head").body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], "1234");
    assert_eq!(get(&mut conn, "/no-content").await, (StatusCode::NO_CONTENT, String::new()));
    assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()));
    assert_eq!(upstream.connections(), 1, "none of these ends the upstream connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_responses_give_502_naming_the_fault_and_are_not_reused() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let cases = [
        ("/ambiguous", "both Transfer-Encoding and Content-Length"),
        ("/two-lengths", "invalid Content-Length"),
        ("/garbage", "malformed response head"),
        ("/huge-head", "response head larger than 65536 bytes"),
        ("/unasked-upgrade", "switched protocols without being asked to"),
    ];
    for (round, (path, reason)) in cases.iter().enumerate() {
        let (status, body) = get(&mut conn, path).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}: {body}");
        assert!(body.contains(reason), "{path}: the 502 names the fault: {body}");
        sidecar.logs.wait_for(reason, Duration::from_secs(5));
        // A refused answer's connection is closed: the next request gets a fresh one.
        assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()), "after {path}");
        assert_eq!(upstream.connections(), round + 2, "after {path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_short_fails_the_response_and_the_proxy_keeps_serving() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let cases = [("/short", false), ("/bad-chunk", false), ("/short", true), ("/bad-chunk", true)];
    for (round, (path, http2)) in cases.into_iter().enumerate() {
        let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        let response = conn.send(Request::get(path).body(empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "the head was good");
        assert!(response.into_body().collect().await.is_err(), "{path} (http2={http2}): the client sees the cut");
        // Told to the operator too: the client alone saw it.
        sidecar.logs.wait_for_nth("response cut short", round + 1, Duration::from_secs(5));
        let mut fresh = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), http2).await;
        assert_eq!(get(&mut fresh, "/").await, (StatusCode::OK, "ok\n".to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_the_upstream_closed_is_never_handed_a_request() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    for round in 0..20 {
        // Keep-alive by its headers, closed by the upstream right after.
        assert_eq!(get(&mut conn, "/then-close").await, (StatusCode::OK, "bye\n".to_owned()), "round {round}");
        assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()), "round {round}");
        // A POST is never sent twice, so only the check before reuse keeps it off the closed
        // connection.
        assert_eq!(get(&mut conn, "/then-close").await, (StatusCode::OK, "bye\n".to_owned()), "round {round}");
        let post = conn.send(Request::post("/").body(empty()).unwrap()).await.unwrap();
        assert_eq!(post.status(), StatusCode::OK, "round {round}: a POST after the upstream closed");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_are_framed_for_the_upstream() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    // An empty POST says so with a zero length, as an upstream may insist on a length.
    let response = conn.send(Request::post("/empty-post").body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(head.starts_with("post /empty-post http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 0\r\n"), "{head}");
    // A sized body keeps its length; the scripted upstream reads exactly that many bytes.
    let response = conn.send(Request::post("/sized").body(full("twelve bytes")).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let head = upstream.last_head().to_ascii_lowercase();
    assert!(head.contains("\r\ncontent-length: 12\r\n") && !head.contains("transfer-encoding"), "{head}");
    assert_eq!(get(&mut conn, "/").await, (StatusCode::OK, "ok\n".to_owned()));
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_upstream_drops_is_sent_again_once_not_once_per_pooled_connection() {
    let upstream = ScriptedUpstream::start(script).await;
    let (pki, sidecar) = proxy_in_front_of(&upstream);
    let mut conns = Vec::new();
    for _ in 0..TOGETHER {
        conns.push(HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await);
    }
    // Requests the upstream holds until all have arrived: each needs its own upstream
    // connection, and all of them are idle in the pool afterwards.
    let answers = futures_util::future::join_all(conns.iter_mut().map(|conn| get(conn, "/together"))).await;
    assert!(answers.iter().all(|a| a.0 == StatusCode::OK), "{answers:?}");
    assert_eq!(upstream.connections(), TOGETHER);

    let (status, body) = get(&mut conns[0], "/drop").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("closed the connection without responding"), "{body}");
    let drops = upstream.heads.lock().unwrap().iter().filter(|h| h.starts_with("GET /drop ")).count();
    assert_eq!(drops, 2, "sent on a pooled connection, then once more on a new one");
    assert_eq!(upstream.connections(), TOGETHER + 1);
}
