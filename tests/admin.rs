//! The admin listener: probes, status, POST /reload and its token, readiness during a drain.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

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
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
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
    let sidecar = Sidecar::start(&[
        "--upstream",
        &url,
        "--cert",
        leaf.cert.to_str().unwrap(),
        "--key",
        leaf.key.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = sidecar.admin_addr();

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
    let hash = status["proxy"]["config_hash"].as_str().unwrap().to_owned();
    assert!(hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "{hash}");
    let again = json(&admin(addr, "GET", "/status", None).await.2);
    assert_eq!(again["proxy"]["config_hash"], hash, "the same config hashes the same");
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
        "--upstream",
        &url,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
        "--reload-debounce",
        "1h",
    ]);
    let addr = sidecar.admin_addr();

    let second = pki.issue("second");
    install(&second);
    let (status, _, body) = admin(addr, "POST", "/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["tls_changed"], true);
    let tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let expected =
        tokio_rustls::rustls::pki_types::pem::PemObject::pem_file_iter(&second.cert).unwrap().next().unwrap();
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
        "--upstream",
        &url,
        "--cert",
        leaf.cert.to_str().unwrap(),
        "--key",
        leaf.key.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ]);
    let addr = sidecar.admin_addr();
    assert_eq!(admin(addr, "POST", "/reload", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin(addr, "POST", "/reload", Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin(addr, "POST", "/reload", Some("s3cret-token")).await.0, StatusCode::OK);
    // Probes stay open: kubelet sends no token.
    assert_eq!(admin(addr, "GET", "/readyz", None).await.0, StatusCode::OK);
}

#[test]
fn non_loopback_admin_without_token_is_refused_at_start() {
    let (code, stderr) =
        run_to_exit(&["proxy", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("0.0.0.0:0") && stderr.contains("--admin-token-file"), "{stderr}");
    let (code, stderr) = run_to_exit(&[
        "proxy",
        "--upstream",
        "http://127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        "/nonexistent/token",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/token"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_at_once_on_sigterm_while_requests_drain() {
    let (upstream, pki, mut sidecar) =
        proxy_in_front_of_upstream(&["--admin", "127.0.0.1:0", "--shutdown-delay", "0s"]).await;
    let addr = sidecar.admin_addr();
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

/// `name{labels} value` for every sample; panics on a line that is not Prometheus text.
fn parse_exposition(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["counter", "gauge", "histogram", "unknown", "info"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "bad labels: {line}");
        }
        let family_known = typed.iter().any(|t| name.starts_with(t.as_str()));
        assert!(family_known, "sample without a # TYPE line before it: {line}");
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// What Prometheus 2.x sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// GET /metrics with `accept`: (content-type, body).
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder().uri("/metrics").header("host", "admin");
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = send.send_request(request.body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

/// A proxy (upstream timeout 300 ms, admin API on) running one sync destination.
async fn proxy_with_sync() -> (Upstream, TestPki, common::IssuedCert, tempfile::TempDir, Sidecar) {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.json"), dir.path().join("app.json"));
    std::fs::write(&source, "{\"v\": 1}\n").unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nupstream = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nupstream-timeout = \"300ms\"\nadmin = \"127.0.0.1:0\"\n\n\
             [[sync]]\nname = \"app\"\nsource = \"{}\"\ndest = \"{}\"\nmin-quiet = \"20ms\"\n",
            upstream.url(),
            leaf.cert.display(),
            leaf.key.display(),
            source.display(),
            dest.display()
        ),
    )
    .unwrap();
    let sidecar = Sidecar::start(&["--config", config.to_str().unwrap()]);
    (upstream, pki, leaf, dir, sidecar)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_as_prometheus_text_and_as_openmetrics() {
    if !require_tool("promtool") {
        return;
    }
    let (_upstream, pki, _leaf, _dir, sidecar) = proxy_with_sync().await;
    let mut h1 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(h1.get("/").await.0, StatusCode::OK);
    let addr = sidecar.admin_addr();

    for accept in [None, Some("text/plain"), Some("*/*"), Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")] {
        let (content_type, body) = scrape(addr, accept).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "Accept: {accept:?}");
        assert!(body.contains("# TYPE sidecar_http_requests_total counter"), "{body}");
        assert_eq!(promtool_check_metrics(&body), "", "Accept: {accept:?}:\n{body}");
    }
    for accept in ["application/openmetrics-text", PROMETHEUS_ACCEPT] {
        let (content_type, body) = scrape(addr, Some(accept)).await;
        assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8", "{accept}");
        promtool_parse_open_metrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        // promtool's linter reads only 0.0.4, where an OpenMetrics counter family `x` (sample
        // `x_total`) looks like an untyped `x_total` without help: its only finding may be that.
        for finding in promtool_check_metrics(&body).lines() {
            let family = finding.strip_suffix("_total no help text").unwrap_or_else(|| panic!("{finding}"));
            assert!(body.contains(&format!("# TYPE {family} counter\n")), "{finding}");
            assert!(body.contains(&format!("# HELP {family} ")), "{finding}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_move_with_real_traffic() {
    let (_upstream, pki, leaf, _dir, sidecar) = proxy_with_sync().await;
    let addr = sidecar.admin_addr();

    let before = parse_exposition(&scrape(addr, Some(PROMETHEUS_ACCEPT)).await.1);
    let at = |m: &std::collections::HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    let mut h1 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    for _ in 0..3 {
        assert_eq!(h1.get("/").await.0, StatusCode::OK);
        assert_eq!(h2.get("/").await.0, StatusCode::OK);
    }
    let posted = http::Request::post("/count").body(full(vec![7u8; 1000])).unwrap();
    let counted = h2.send(posted).await.unwrap();
    let counted = counted.into_body().collect().await.unwrap().to_bytes();
    assert!(counted.starts_with(b"1000 "), "{counted:?}");
    assert_eq!(h1.get("/slow/3000").await.0, StatusCode::GATEWAY_TIMEOUT);
    // A client that does not trust the certificate, and one that does not speak TLS.
    assert!(tls_connect(sidecar.addr, client_config(TestPki::new().ca_pem.as_bytes(), &[b"http/1.1"]), "localhost")
        .await
        .is_err());
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink).await;
    }

    // The handshake failures are counted when the server side gives up on them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after = parse_exposition(&scrape(addr, Some(PROMETHEUS_ACCEPT)).await.1);
        let failures: f64 =
            after.iter().filter(|(k, _)| k.starts_with("sidecar_tls_handshake_failures_total")).map(|(_, v)| v).sum();
        if failures >= 2.0 || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let moved = |k: &str| at(&after, k) - at(&before, k);
    assert_eq!(moved("sidecar_http_requests_total{version=\"1.1\",code=\"2xx\"}"), 3.0);
    assert_eq!(moved("sidecar_http_requests_total{version=\"2\",code=\"2xx\"}"), 4.0);
    assert_eq!(moved("sidecar_http_requests_total{version=\"1.1\",code=\"5xx\"}"), 1.0);
    assert_eq!(moved("sidecar_upstream_failures_total{kind=\"timeout\"}"), 1.0);
    assert_eq!(moved("sidecar_http_request_duration_seconds_count"), 8.0);
    // Bodies each way, as they passed through; "hello from upstream\n" is 20 bytes.
    assert_eq!(moved("sidecar_http_request_body_bytes_total"), 1000.0);
    assert_eq!(moved("sidecar_http_response_body_bytes_total"), (6 * 20 + counted.len()) as f64);
    // The upstream answered 7 of the 8 (the 504 is the proxy's own).
    assert_eq!(moved("sidecar_upstream_response_duration_seconds_count"), 7.0);
    assert_eq!(moved("sidecar_upstream_response_duration_seconds_bucket{le=\"+Inf\"}"), 7.0);
    assert!(moved("sidecar_upstream_response_duration_seconds_sum") > 0.0);
    assert_eq!(at(&after, &format!("sidecar_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), 1.0);
    assert!(at(&after, "process_resident_memory_bytes") > 1e6);
    assert!(at(&after, "process_cpu_seconds_total") > 0.0);
    assert!(at(&after, "process_start_time_seconds") > 1.7e9);
    assert!(at(&after, "process_open_fds") > 5.0 && at(&after, "process_max_fds") >= at(&after, "process_open_fds"));
    assert!(moved("sidecar_http_request_duration_seconds_sum") >= 0.3, "the 504 alone waited 300 ms");
    assert_eq!(moved("sidecar_tls_handshakes_total"), 2.0);
    assert_eq!(moved("sidecar_tls_handshake_failures_total{reason=\"alert_received\"}"), 1.0);
    assert_eq!(moved("sidecar_tls_handshake_failures_total{reason=\"protocol\"}"), 1.0);
    assert_eq!(moved("sidecar_connections_total"), 4.0);
    assert_eq!(at(&after, "sidecar_connections_open"), 2.0, "the two kept connections");
    let expiry = after
        .iter()
        .find(|(k, _)| k.starts_with("sidecar_certificate_expiry_seconds{") && k.contains(&leaf.serial))
        .map(|(_, v)| *v);
    let expiry = expiry.expect("an expiry gauge for the served certificate");
    assert!((29.0 * 86400.0..=30.0 * 86400.0).contains(&expiry), "{expiry}");
    assert_eq!(at(&after, "sidecar_reloads_total{kind=\"tls\",result=\"failed\"}"), 0.0);
    assert!(after.contains_key("sidecar_reloads_total{kind=\"tls\",result=\"ok\"}"));
    assert_eq!(at(&after, "sidecar_sync_synced{destination=\"app\"}"), 1.0);
    assert_eq!(at(&after, "sidecar_sync_writes_total{destination=\"app\"}"), 1.0);
    assert!(at(&after, "sidecar_sync_last_success_timestamp_seconds{destination=\"app\"}") > 1.7e9);
    assert_eq!(at(&after, "sidecar_sync_rollbacks_total{destination=\"app\"}"), 0.0);
}
