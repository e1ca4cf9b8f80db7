//! Process logs as text or JSON, and the access log: its fields, its formats, and that a
//! stalled access-log writer never slows requests down.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};

fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "{} access-log lines after 5 s, wanted {n}", lines.len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn combined_access_log_has_every_field_with_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--access-log", log.to_str().unwrap()]).await;
    let mut h1 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    let request = Request::get("/bytes/100000?x=%22y%22")
        .header("host", "app.example.test")
        .header("user-agent", "test \"agent\"")
        .header("referer", "https://r.example/")
        .header("x-request-id", "req-1")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .body(empty())
        .unwrap();
    let response = h1.send(request).await.unwrap();
    assert_eq!(drain_body(response.into_body()).await.0, 100_000);
    let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let traced = Request::get("/")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(empty())
        .unwrap();
    assert_eq!(h2.send(traced).await.unwrap().status(), StatusCode::OK);
    assert_eq!(h2.get("/").await.0, StatusCode::OK);

    let lines = wait_for_lines(&log, 3);
    let first = &lines[0];
    assert!(first.starts_with("127.0.0.1 - - ["), "{first}");
    assert!(
        first.contains(r#""GET /bytes/100000?x=%22y%22 HTTP/1.1" 200 100000 "https://r.example/" "test \"agent\"""#),
        "{first}"
    );
    // X-Request-ID first; a new upstream connection has a connect time; `uht`, as nginx's
    // $upstream_header_time, is the time until the upstream's response head.
    let field = |line: &str, key: &str| -> String {
        let at = line.find(&format!(" {key}=")).unwrap_or_else(|| panic!("no {key}= in {line}"));
        line[at + key.len() + 2..].split(' ').next().unwrap().to_owned()
    };
    assert!(field(first, "rt").parse::<f64>().is_ok() && field(first, "uht").parse::<f64>().is_ok(), "{first}");
    assert!(field(first, "uct").parse::<f64>().is_ok(), "a new upstream connection: {first}");
    assert!(first.ends_with(r#"tls=TLSv1.3 alpn=http/1.1 host="app.example.test" rid="req-1""#), "{first}");
    // Else traceparent's trace id; else none. The third request reused the pooled connection.
    assert!(lines[1].contains(r#""GET / HTTP/2.0" 200 20 "-" "-""#), "{}", lines[1]);
    assert!(lines[1].ends_with(r#"alpn=h2 host="localhost" rid="4bf92f3577b34da6a3ce929d0e0e4736""#), "{}", lines[1]);
    assert!(lines[2].ends_with(r#"alpn=h2 host="localhost" rid="-""#), "{}", lines[2]);
    assert_eq!(field(&lines[2], "uct"), "0.000", "{}", lines[2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_access_log_lines_are_json_objects() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.json");
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&[
        "--access-log",
        log.to_str().unwrap(),
        "--access-log-format",
        "json",
        "--upstream-timeout",
        "200ms",
    ])
    .await;
    let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    let request = Request::get("/a").header("x-request-id", "json-1").body(empty()).unwrap();
    assert_eq!(h2.send(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(h2.get("/slow/2000").await.0, StatusCode::GATEWAY_TIMEOUT);
    let lines = wait_for_lines(&log, 2);
    let ok: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (ok["method"].as_str(), ok["path"].as_str(), ok["status"].as_u64()),
        (Some("GET"), Some("/a"), Some(200))
    );
    assert_eq!(
        (ok["tls_version"].as_str(), ok["alpn"].as_str(), ok["client"].as_str()),
        (Some("TLSv1.3"), Some("h2"), Some("127.0.0.1"))
    );
    assert_eq!(ok["bytes"].as_u64(), Some(20));
    assert!(ok["upstream_ms"].as_f64().is_some() && ok["duration_ms"].as_f64().is_some());
    assert!(ok["upstream_connect_ms"].as_f64().is_some(), "{ok}");
    assert_eq!((ok["host"].as_str(), ok["request_id"].as_str()), (Some("localhost"), Some("json-1")), "{ok}");
    let timeout: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(timeout["status"].as_u64(), Some(504));
    assert!(timeout["upstream_ms"].is_null(), "the proxy answered itself");
    assert!(timeout["request_id"].is_null(), "{timeout}");
    assert!(timeout["duration_ms"].as_f64().unwrap() >= 200.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_process_logs_are_one_object_per_line() {
    let (_upstream, pki, sidecar) =
        proxy_in_front_of_upstream(&["--log-format", "json", "--upstream-timeout", "100ms"]).await;
    let mut h1 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(h1.get("/slow/1000").await.0, StatusCode::GATEWAY_TIMEOUT);
    sidecar.logs.wait_for("gave no response", Duration::from_secs(5));
    let text = sidecar.logs.text();
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string() && value["message"].is_string() && value["timestamp"].is_string(), "{line}");
    }
    let warning = text.lines().find(|l| l.contains("gave no response")).unwrap();
    let warning: serde_json::Value = serde_json::from_str(warning).unwrap();
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["path"], "/slow/1000", "structured fields are kept as fields");
}

/// `--log-level debug` raises the proxy's own lines, not its libraries': h2 alone would log
/// every frame of every stream.
#[tokio::test(flavor = "multi_thread")]
async fn debug_level_shows_the_proxys_own_debug_lines_and_no_library_chatter() {
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--log-level", "debug"]).await;
    let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    assert_eq!(h2.get("/").await.0, StatusCode::OK);
    // Not TLS: the proxy says why at debug level, after the HTTP/2 exchange above.
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    sidecar.logs.wait_for("TLS handshake failed", Duration::from_secs(5));
    let text = sidecar.logs.text();
    assert!(!text.contains("frame="), "h2's per-frame debug lines are not shown:\n{text}");
}

/// The access log goes to a pipe nobody reads: once the pipe and the queue are full, lines
/// are dropped and counted, and requests go on being served at full speed.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_access_log_never_blocks_requests() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A reader that never reads: opening it non-blocking lets the sidecar open the write end.
    const O_NONBLOCK: i32 = 0o4000;
    let _reader = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(&fifo).unwrap();
    // One connection per client makes all its requests: no cap on requests per connection.
    let flags =
        ["--access-log", fifo.to_str().unwrap(), "--admin", "127.0.0.1:0", "--max-requests-per-connection", "0"];
    let (_upstream, pki, sidecar) = proxy_in_front_of_upstream(&flags).await;

    // More requests than the pipe (64 KiB) and the queue (16384 lines) together can hold.
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 2_600;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (addr, ca) = (sidecar.addr, pki.ca_pem.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpsConnection::open(addr, ca.as_bytes(), true).await;
            let mut slowest = Duration::ZERO;
            for _ in 0..PER_CLIENT {
                let t = Instant::now();
                assert_eq!(conn.get("/").await.0, StatusCode::OK);
                slowest = slowest.max(t.elapsed());
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for task in tasks {
        slowest = slowest.max(task.await.unwrap());
    }
    eprintln!("{} requests in {:?}, slowest {slowest:?}", CLIENTS * PER_CLIENT, started.elapsed());
    assert!(slowest < Duration::from_secs(2), "a request waited {slowest:?}: the access log blocked it");

    let admin = sidecar.admin_addr();
    let metrics = std::process::Command::new("curl").args(["-s", &format!("http://{admin}/metrics")]).output().unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("sidecar_access_log_dropped_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dropped counter in:\n{metrics}"));
    assert!(dropped > 0.0, "with nobody reading, lines beyond the queue are dropped and counted");
}
