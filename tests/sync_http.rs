//! `sidecar sync` with HTTP sources: a real nginx polled with If-None-Match (ETag), errors
//! and garbage from it, nginx gone at start and later; and a Consul-KV-compatible long-poll
//! server written here (blocking queries, X-Consul-Index, index reset, rate limit, a stalled
//! request); and an https source (the sidecar's own proxy, with a test CA).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn nginx_is_polled_with_if_none_match_and_its_errors_leave_the_file() {
    if !require_tool("nginx") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("config.json"), "{\"v\": 1}\n");
    let mut nginx = Nginx::start(root.path());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    let sync = SyncCommand::new(nginx.url("/config.json"), &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .retry_max("300ms")
        .start();
    wait_for_content(&dest, "{\"v\": 1}\n", T);
    let status = sync.wait_state("config.json", "synced", T);
    assert!(status["source_revision"].as_str().unwrap().starts_with("etag \""), "{status:#}");
    wait_until("five conditional polls", T, || nginx.statuses().iter().filter(|s| *s == "304").count() >= 5);
    let statuses = nginx.statuses();
    assert_eq!(statuses.iter().filter(|s| *s == "200").count(), 1, "one full response, then 304s: {statuses:?}");

    // nginx's ETag is mtime (in seconds) and size: a different size makes it change at once.
    replace_file(&root.path().join("config.json"), "{\"v\": 22}\n");
    wait_for_content(&dest, "{\"v\": 22}\n", T);
    assert_eq!(nginx.statuses().iter().filter(|s| *s == "200").count(), 2);

    // Gone later: the file stays, status says not synced, and it comes back by itself.
    nginx.stop();
    let status = sync.wait_state("config.json", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("cannot connect"), "{status:#}");
    assert_eq!(read_text(&dest), "{\"v\": 22}\n");
    replace_file(&root.path().join("config.json"), "{\"v\": 333}\n");
    nginx.launch();
    wait_for_content(&dest, "{\"v\": 333}\n", T);
    sync.wait_state("config.json", "synced", T);

    // An error page and a missing file are not configs.
    write(&dir.path().join("other.json"), "untouched");
    let broken = SyncCommand::new(nginx.url("/broken"), dir.path().join("other.json")).retry_max("300ms").start();
    let status = broken.wait_state("other.json", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("answered 500"), "{status:#}");
    let missing = SyncCommand::new(nginx.url("/nope.json"), dir.path().join("other.json")).retry_max("300ms").start();
    let status = missing.wait_state("other.json", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("does not exist"), "{status:#}");
    assert_eq!(read_text(&dir.path().join("other.json")), "untouched");
}

#[test]
fn a_source_down_at_start_keeps_the_file_until_it_answers_unless_required() {
    if !require_tool("nginx") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("app.conf"), "from nginx\n");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/app.conf");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    write(&dest, "on disk\n");

    let (code, stderr) = run_to_exit(&["sync", "--source", &url, "--dest", s(&dest), "--require-source"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to 127.0.0.1:{port}")), "{stderr}");
    assert_eq!(read_text(&dest), "on disk\n");

    let sync = SyncCommand::new(&url, &dest).poll_interval("100ms").retry_max("300ms").start();
    sync.wait_state("app.conf", "not-synced", T);
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 503);
    let log = sync.proc.logs.wait_for("keeping", T);
    assert!(log.contains(s(&dest)), "{log}");
    let _nginx = Nginx::start_on(root.path(), port);
    wait_for_content(&dest, "from nginx\n", T);
    sync.wait_state("app.conf", "synced", T);
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consul_blocking_queries_follow_the_index_reset_it_when_it_goes_back_and_are_rate_limited() {
    let server = LongPollServer::start().await;
    server.set(Some("c1"), 5);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let source = format!("consul://{}/apps/legacy/config?wait=2s", server.addr);
    tokio::task::block_in_place(|| {
        let sync = SyncCommand::new(&source, &dest)
            .poll_interval("200ms")
            .min_quiet("50ms")
            .source_timeout("1s")
            .retry_max("300ms")
            .start();
        wait_for_content(&dest, "c1", T);
        wait_until("a blocking query at index 5", T, || server.requests().contains(&Some(5)));
        assert_eq!(server.requests()[0], None, "the first query does not block");

        let started = Instant::now();
        server.set(Some("c2"), 9);
        wait_for_content(&dest, "c2", T);
        assert!(started.elapsed() < Duration::from_secs(5), "the blocked query answered at the change");
        sync.wait_revision("app.conf", "index 9", T);

        // The index goes backwards (a restored snapshot): start over from 0.
        let seen = server.requests().len();
        server.set(Some("c3"), 3);
        wait_for_content(&dest, "c3", T);
        wait_until("a query at index 3", T, || server.requests()[seen..].contains(&Some(3)));
        let after: Vec<_> = server.requests()[seen..].to_vec();
        let reset = after.iter().position(|i| i.is_none()).expect("a query without index after the reset");
        assert!(after[..reset].iter().all(|i| *i == Some(9)), "{after:?}");

        // A server that answers at once with the same index: the loop is rate-limited (one
        // query per 200 ms here), not spinning.
        server.shared.no_block.store(true, Ordering::SeqCst);
        let before = server.requests().len();
        std::thread::sleep(Duration::from_secs(1));
        let made = server.requests().len() - before;
        server.shared.no_block.store(false, Ordering::SeqCst);
        assert!(made <= 7, "{made} queries in one second");
        assert_eq!(read_text(&dest), "c3");

        // A query that never answers: detected by the request timeout (wait + wait/16 +
        // --source-timeout), reported as stalled, retried.
        server.shared.stall.store(true, Ordering::SeqCst);
        let status = sync.wait_state("app.conf", "stalled", T);
        assert!(status["last_error"].as_str().unwrap().contains("did not answer"), "{status:#}");
        server.shared.stall.store(false, Ordering::SeqCst);
        server.set(Some("c4"), 12);
        wait_for_content(&dest, "c4", T);
        sync.wait_state("app.conf", "synced", T);

        // A missing key is reported; the file stays.
        server.set(None, 13);
        let status = sync.wait_state("app.conf", "not-synced", T);
        assert!(status["last_error"].as_str().unwrap().contains("key apps/legacy/config does not exist"), "{status:#}");
        assert_eq!(read_text(&dest), "c4");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_source_is_verified_against_source_ca() {
    // The sidecar's own proxy serves HTTPS with a test CA in front of a plain upstream.
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let cert = pki.issue("server");
    let url = upstream.url();
    let proxy = Sidecar::start(&["--upstream", &url, "--cert", s(&cert.cert), "--key", s(&cert.key)]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let source = format!("https://localhost:{}/anything", proxy.addr.port());
    tokio::task::block_in_place(|| {
        let sync = SyncCommand::new(&source, &dest).arg("--source-ca", pki.ca_path()).poll_interval("200ms").start();
        wait_for_content(&dest, "hello from upstream\n", T);
        sync.wait_state("app.conf", "synced", T);

        // Without the CA the server is not trusted: nothing is written.
        let other = dir.path().join("other.conf");
        let untrusted = SyncCommand::new(&source, &other).retry_max("300ms").start();
        let status = untrusted.wait_state("other.conf", "not-synced", T);
        assert!(status["last_error"].as_str().unwrap().contains("TLS handshake"), "{status:#}");
        assert!(!other.exists());
    });
}

/// A server that answers every request with `head` and `body`, then closes the connection.
fn raw_http_server(head: &'static str, body: &'static str) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(format!("{head}\r\n\r\n{body}").as_bytes());
        }
    });
    addr
}

#[test]
fn a_body_ended_only_by_the_connection_closing_is_refused() {
    // The connection closes mid-value and nothing in the response says how long it was.
    let addr =
        raw_http_server("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close", "{\"v\": 2, \"cut");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    write(&dest, "{\"v\": 1}");
    let sync = SyncCommand::new(format!("http://{addr}/config.json"), &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .retry_max("300ms")
        .start();
    let status = sync.wait_state("config.json", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("neither Content-Length nor chunked"), "{status:#}");
    assert_eq!(status["counters"]["writes"], 0, "{status:#}");
    assert_eq!(read_text(&dest), "{\"v\": 1}");
}
