//! Shutdown as Kubernetes needs it (`--shutdown-delay`): on SIGTERM readiness fails at once, but
//! new connections are still accepted and served for the delay (endpoints and load balancers
//! catch up only later), then the listener closes, in-flight requests drain, and the process
//! exits 0. A second signal still exits at once. Every test runs the real binary.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::net::TcpStream;

/// GET /readyz on the admin API: (status, body).
async fn readyz(admin: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_exchange(admin, "GET", "/readyz", &[], "").expect("the admin API answers"))
        .await
        .unwrap()
}

fn wait_log(sidecar: &Sidecar, needle: &str, bound: Duration) -> String {
    tokio::task::block_in_place(|| sidecar.logs.wait_for(needle, bound))
}

fn wait_exit(sidecar: &mut Sidecar, bound: Duration) -> std::process::ExitStatus {
    tokio::task::block_in_place(|| sidecar.wait_exit(bound))
}

/// Polls `connect` until the kernel refuses it (nobody listens); returns when that was first
/// seen. Panics after `bound`.
async fn first_refusal(addr: SocketAddr, bound: Duration) -> Instant {
    let deadline = Instant::now() + bound;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Instant::now(),
            // Queued in the backlog of a listener that was then closed: not refused yet.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error to {addr}: {e}"),
            Ok(stream) => drop(stream),
        }
        assert!(Instant::now() < deadline, "{addr} still accepted TCP connections {bound:?} after shutdown began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A real upstream, a test PKI, and the sidecar with an admin API and `extra` flags.
struct Setup {
    upstream: Upstream,
    pki: TestPki,
    sidecar: Sidecar,
}

async fn setup(extra: &[&str], configure: impl FnOnce(&mut std::process::Command)) -> Setup {
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream_with(&args, configure).await;
    Setup { upstream, pki, sidecar }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn during_the_shutdown_delay_readiness_fails_but_new_connections_are_served_then_the_listener_closes_and_drains()
{
    const DELAY: Duration = Duration::from_secs(1);
    let mut s = setup(&["--shutdown-delay", "1s", "--drain-timeout", "10s"], |_| {}).await;
    let admin = s.sidecar.admin_addr();
    let ca = s.pki.ca_pem.as_bytes().to_vec();
    assert_eq!(readyz(admin).await.0, 200);

    // A request that is still in flight when the delay ends, and an idle keep-alive connection.
    let mut slow = HttpsConnection::open(s.sidecar.addr, &ca, false).await;
    let in_flight = tokio::spawn(async move { slow.get("/slow/2500").await });
    let mut idle = HttpsConnection::open(s.sidecar.addr, &ca, true).await;
    assert_eq!(idle.get("/").await.0, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upstream.log.requests.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the upstream did not see the slow request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    s.sidecar.signal("TERM");

    // 1. Readiness fails at once: while the delay still runs (the listener has not closed), not
    // at its end. Told by the order of events, not by a time bound that a busy machine breaks.
    loop {
        let (status, body) = readyz(admin).await;
        if status == 503 {
            assert!(body.contains("shutting down"), "{body}");
            break;
        }
        assert!(signalled.elapsed() < DELAY, "/readyz still {status} {:?} after SIGTERM", signalled.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        s.sidecar.logs.count("no longer accepting connections"),
        0,
        "/readyz turned 503 only when the delay ended:\n{}",
        s.sidecar.logs.text()
    );

    // 2. For the delay, new TLS connections are accepted and served, and open ones still work.
    let line = wait_log(&s.sidecar, "shutdown delay 1s: still accepting", Duration::from_secs(1));
    assert!(line.contains("new connections"), "{line}");
    let mut served_during_delay = 0;
    while signalled.elapsed() < DELAY * 7 / 10 {
        let mut fresh = HttpsConnection::open(s.sidecar.addr, &ca, served_during_delay % 2 == 1).await;
        let (status, _, body) = fresh.get("/").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "hello from upstream\n"),
            "a new connection during the delay is served"
        );
        served_during_delay += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served_during_delay >= 3, "only {served_during_delay} new connection(s) tried during the delay");
    assert_eq!(idle.get("/").await.0, StatusCode::OK, "an open keep-alive connection is still served during the delay");
    assert_eq!(
        s.sidecar.logs.count("no longer accepting connections"),
        0,
        "the delay ended early:\n{}",
        s.sidecar.logs.text()
    );
    assert_eq!(readyz(admin).await.0, 503, "still not ready during the delay");

    // 3. After the delay the listener closes (not before).
    let refused = first_refusal(s.sidecar.addr, Duration::from_secs(3)).await;
    let closed_after = refused.duration_since(signalled);
    assert!(closed_after >= DELAY, "the listener closed {closed_after:?} after SIGTERM, before the 1s delay");
    assert!(closed_after < DELAY + Duration::from_secs(2), "the listener closed only {closed_after:?} after SIGTERM");
    wait_log(&s.sidecar, "no longer accepting connections, draining in-flight requests", Duration::from_secs(1));
    assert_eq!(s.sidecar.child.try_wait().unwrap(), None, "exited before the in-flight request finished");

    // 4. The in-flight request completes during the drain; the process exits 0.
    let result =
        tokio::time::timeout(Duration::from_secs(4), in_flight).await.expect("in-flight request finishes").unwrap();
    assert_eq!((result.0, result.2.as_str()), (StatusCode::OK, "slow response\n"), "the in-flight request completes");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", s.sidecar.logs.text());
    let log = s.sidecar.logs.text();
    assert!(log.contains("received SIGTERM"), "{log}");
    // The slow request's connection, and the idle one until its GOAWAY is answered.
    assert!(log.contains("waiting up to 10s for"), "{log}");
    assert!(log.contains("all connections drained; exiting"), "{log}");
    // Every request reached the app exactly once.
    assert_eq!(s.upstream.log.requests.lock().unwrap().len(), 2 + served_during_delay + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_delay_is_5s_and_a_second_signal_during_it_exits_at_once() {
    let mut s = setup(&[], |_| {}).await;
    let admin = s.sidecar.admin_addr();
    s.sidecar.signal("TERM");
    wait_log(&s.sidecar, "shutdown delay 5s: still accepting", Duration::from_secs(2));
    let mut conn = HttpsConnection::open(s.sidecar.addr, s.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    assert_eq!(readyz(admin).await.0, 503);
    let second = Instant::now();
    s.sidecar.signal("INT");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(2));
    assert_eq!(status.code(), Some(1), "log:\n{}", s.sidecar.logs.text());
    assert!(second.elapsed() < Duration::from_secs(2));
    assert!(s.sidecar.logs.text().contains("second signal received"), "{}", s.sidecar.logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delay_comes_from_the_environment() {
    let mut s = setup(&[], |cmd| {
        cmd.env("SIDECAR_SHUTDOWN_DELAY", "300ms");
    })
    .await;
    let signalled = Instant::now();
    s.sidecar.signal("TERM");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", s.sidecar.logs.text());
    assert!(signalled.elapsed() >= Duration::from_millis(300), "exited {:?} after SIGTERM", signalled.elapsed());
    assert!(s.sidecar.logs.text().contains("shutdown delay 300ms: still accepting"), "{}", s.sidecar.logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delay_is_read_when_shutdown_starts_so_a_reloaded_config_file_applies() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(&config, "[proxy]\nshutdown-delay = \"30s\"\n").unwrap();
    let mut s = setup(&["--config", config.to_str().unwrap(), "--reload-debounce", "20ms"], |_| {}).await;
    replace_file(&config, "[proxy]\nshutdown-delay = \"0s\"\n");
    wait_log(&s.sidecar, "config reloaded from", Duration::from_secs(5));
    let signalled = Instant::now();
    s.sidecar.signal("TERM");
    let status = wait_exit(&mut s.sidecar, Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", s.sidecar.logs.text());
    assert!(signalled.elapsed() < Duration::from_secs(2), "exit took {:?}", signalled.elapsed());
    let log = s.sidecar.logs.text();
    assert!(!log.contains("shutdown delay"), "the reloaded 0s applies, not the 30s of the start:\n{log}");
}
