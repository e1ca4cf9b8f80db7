//! The admin listener: probes, status, POST /reload and its token, readiness during a drain.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// The admin address, read from the start-up line ("; admin API on http://ADDR").
fn admin_addr(sidecar: &Sidecar) -> SocketAddr {
    let line = sidecar.logs.wait_for("admin API on http://", Duration::from_secs(5));
    line.split("admin API on http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().trim_end_matches(';').parse().unwrap()
}

/// A plain HTTP/1.1 request to the admin API: (status, content-type, body).
async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (StatusCode, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder().method(method).uri(path).header("host", "admin");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = send.send_request(request.body(empty()).unwrap()).await.unwrap();
    let status = response.status();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8_lossy(&body).into_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_status_describe_the_running_proxy() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let url = upstream.url();
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", leaf.cert.to_str().unwrap(), "--key", leaf.key.to_str().unwrap(), "--admin", "127.0.0.1:0"]);
    let addr = admin_addr(&sidecar);

    assert_eq!(admin(addr, "GET", "/healthz", None).await.0, StatusCode::OK);
    let (status, content_type, body) = admin(addr, "GET", "/readyz", None).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, "application/json"));
    assert_eq!(json(&body)["ready"], true);

    let (status, _, body) = admin(addr, "GET", "/status", None).await;
    assert_eq!(status, StatusCode::OK);
    let status = json(&body);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["proxy"]["upstream"], url);
    assert_eq!(status["proxy"]["listen"], sidecar.addr.to_string());
    let cert = &status["proxy"]["certificates"][0];
    assert_eq!(cert["serial"], leaf.serial);
    assert_eq!(cert["names"], serde_json::json!(["localhost", "127.0.0.1"]));
    let to_expiry = cert["seconds_to_expiry"].as_i64().unwrap();
    assert!((29 * 86400..=30 * 86400).contains(&to_expiry), "{to_expiry}");

    assert_eq!(admin(addr, "GET", "/reload", None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(admin(addr, "POST", "/healthz", None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(admin(addr, "GET", "/nope", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_reload_applies_a_new_certificate_and_reports_refusals() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let install = |pair: &IssuedCert| {
        std::fs::copy(&pair.key, dir.path().join("tls.key")).unwrap();
        std::fs::copy(&pair.cert, dir.path().join("tls.crt")).unwrap();
    };
    install(&pki.issue("first"));
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let url = upstream.url();
    // An hour of debounce: only the admin request can make a change visible during the test.
    let sidecar = Sidecar::start(&[
        "--upstream", &url, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap(),
        "--admin", "127.0.0.1:0", "--reload-debounce", "1h",
    ]);
    let addr = admin_addr(&sidecar);

    let second = pki.issue("second");
    install(&second);
    let (status, _, body) = admin(addr, "POST", "/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["tls_changed"], true);
    let tls = tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let expected = tokio_rustls::rustls::pki_types::pem::PemObject::pem_file_iter(&second.cert).unwrap().next().unwrap();
    let expected: tokio_rustls::rustls::pki_types::CertificateDer = expected.unwrap();
    assert_eq!(served, expected.to_vec(), "the new certificate is served right after POST /reload");

    std::fs::write(&cert, "garbage").unwrap();
    let (status, _, body) = admin(addr, "POST", "/reload", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let outcome = json(&body);
    assert_eq!(outcome["tls_changed"], false);
    assert!(outcome["errors"][0].as_str().unwrap().contains("tls.crt"), "{body}");
    let (_, _, body) = admin(addr, "GET", "/status", None).await;
    assert_eq!(json(&body)["proxy"]["reloads"]["tls_failed"], 1);
    assert_eq!(json(&body)["proxy"]["certificates"][0]["serial"], second.serial);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_changing_routes_need_the_token_when_one_is_set() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let token_file = pki.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let url = upstream.url();
    let sidecar = Sidecar::start(&[
        "--upstream", &url, "--cert", leaf.cert.to_str().unwrap(), "--key", leaf.key.to_str().unwrap(),
        "--admin", "127.0.0.1:0", "--admin-token-file", token_file.to_str().unwrap(),
    ]);
    let addr = admin_addr(&sidecar);
    assert_eq!(admin(addr, "POST", "/reload", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin(addr, "POST", "/reload", Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin(addr, "POST", "/reload", Some("s3cret-token")).await.0, StatusCode::OK);
    // Probes stay open: kubelet sends no token.
    assert_eq!(admin(addr, "GET", "/readyz", None).await.0, StatusCode::OK);
}

#[test]
fn non_loopback_admin_without_token_is_refused_at_start() {
    let (code, stderr) = run_to_exit(&["proxy", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("0.0.0.0:0") && stderr.contains("--admin-token-file"), "{stderr}");
    let (code, stderr) = run_to_exit(&["proxy", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--admin-token-file", "/nonexistent/token"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/token"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_at_once_on_sigterm_while_requests_drain() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let url = upstream.url();
    let mut sidecar = Sidecar::start(&[
        "--upstream", &url, "--cert", leaf.cert.to_str().unwrap(), "--key", leaf.key.to_str().unwrap(), "--admin", "127.0.0.1:0",
        "--shutdown-delay", "0s",
    ]);
    let addr = admin_addr(&sidecar);
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let in_flight = tokio::spawn(async move { conn.get("/slow/1500").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.log.requests.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sidecar.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, _, body) = admin(addr, "GET", "/readyz", None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(json(&body)["reasons"][0], "shutting down");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status} after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow response\n"));
    assert!(sidecar.wait_exit(Duration::from_secs(5)).success());
}
