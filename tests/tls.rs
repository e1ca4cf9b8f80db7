mod common;

// The TLS face of the proxy, checked from the outside with real clients: protocol versions and
// ALPN (openssl s_client, curl, rustls), the self-signed development certificate, the key
// formats accepted for --cert/--key, clean refusal of bad start-up input, survival of bad
// connections, and session resumption. Every test runs the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const HELLO: &str = "hello from upstream\n";
/// Upper bound for one external tool run (openssl, curl); they normally take milliseconds.
const TOOL_LIMIT: Duration = Duration::from_secs(20);
/// An upstream that is never contacted (start-up must fail before any request).
const NO_UPSTREAM: &str = "http://127.0.0.1:9";

// ---------------------------------------------------------------------------------------------
// Helpers local to these tests.
// ---------------------------------------------------------------------------------------------

/// Runs blocking work (an external tool) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// stdout followed by stderr, as text.
fn text_of(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn assert_no_panic(stderr: &str) {
    let lower = stderr.to_ascii_lowercase();
    assert!(!lower.contains("panicked"), "start-up failure must not be a panic:\n{stderr}");
    assert!(!lower.contains("backtrace"), "start-up failure must not mention backtraces:\n{stderr}");
}

/// Exit code 2, no panic, and exactly one error line that contains every one of `needles`.
fn assert_one_line_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit code 2 expected; stderr:\n{stderr}");
    assert_no_panic(stderr);
    let errors: Vec<&str> =
        stderr.lines().filter(|l| !l.trim().is_empty() && l.to_ascii_lowercase().contains("error")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected; stderr:\n{stderr}");
    for needle in needles {
        assert!(errors[0].contains(needle), "the error line should mention {needle:?}:\n{}", errors[0]);
    }
}

/// Exit code 2 from argument parsing (clap prints a few lines), mentioning every one of `needles`.
fn assert_usage_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit code 2 expected; stderr:\n{stderr}");
    assert_no_panic(stderr);
    assert!(stderr.to_ascii_lowercase().contains("error"), "an error is reported:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr should mention {needle:?}:\n{stderr}");
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// A running proxy with a TestPki leaf for localhost/127.0.0.1 in front of the test upstream.
struct Served {
    upstream: Upstream,
    pki: TestPki,
    sidecar: Sidecar,
}

async fn serve(extra: &[&str]) -> Served {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(extra).await;
    Served { upstream, pki, sidecar }
}

/// `openssl s_client` against the proxy, verifying against `ca` for the name localhost.
/// Returns (exit status success, stdout + stderr).
fn s_client(addr: SocketAddr, ca: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-servername", "localhost", "-CAfile", s(ca)])
        .args(["-verify_hostname", "localhost", "-verify_return_error"])
        .args(extra);
    let output = output_within(cmd, TOOL_LIMIT);
    (output.status.success(), text_of(&output))
}

async fn s_client_async(addr: SocketAddr, ca: PathBuf, extra: &[&str]) -> (bool, String) {
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    blocking(move || s_client(addr, &ca, &extra.iter().map(String::as_str).collect::<Vec<_>>())).await
}

/// curl GET https://localhost:PORT/ (resolved to the proxy), trusting `ca`; returns
/// (success, stdout = body then "HTTP_VERSION STATUS", stderr).
async fn curl(addr: SocketAddr, ca: PathBuf, version_flag: &'static str) -> (bool, String, String) {
    blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", version_flag, "--cacert", s(&ca)])
            .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
            .args(["-w", "%{http_version} %{http_code}", &format!("https://localhost:{}/", addr.port())]);
        let output = output_within(cmd, TOOL_LIMIT);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
}

/// Runs `openssl ARGS` in `dir` and requires success.
fn openssl_in(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    let output = output_within(cmd, TOOL_LIMIT);
    assert!(output.status.success(), "openssl {args:?} failed:\n{}", text_of(&output));
}

/// Options for a self-signed end-entity certificate for localhost made by `openssl req -x509`.
/// basicConstraints CA:FALSE overrides openssl.cnf's default CA:TRUE, which WebPKI clients
/// (rustls) refuse for a server certificate.
const SELF_SIGNED: [&str; 8] = [
    "-subj",
    "/CN=localhost",
    "-addext",
    "subjectAltName=DNS:localhost",
    "-addext",
    "basicConstraints=critical,CA:FALSE",
    "-days",
    "2",
];

fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem).map(|c| c.expect("PEM certificate").as_ref().to_vec()).collect()
}

/// The certificates the server presented on a TLS connection, as DER.
fn peer_chain(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<Vec<u8>> {
    tls.get_ref().1.peer_certificates().expect("server certificates").iter().map(|c| c.as_ref().to_vec()).collect()
}

/// Reads until the peer closes (EOF, a reset or a TLS error) or `done` holds for what arrived;
/// returns it, and whether that happened within `limit`.
async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let ended = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        while !done(&got) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (got, ended.is_ok())
}

/// Reads until the peer closes (EOF or a reset/TLS error), returning what arrived; panics if
/// the connection is still open after `limit`.
async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Vec<u8> {
    let (got, closed) = read_until(stream, limit, |_| false).await;
    assert!(closed, "the proxy did not close the connection within {limit:?} (received {} bytes)", got.len());
    got
}

/// Reads until the bytes received end with `suffix` (a whole response on a kept connection).
async fn read_until_suffix<S: AsyncRead + Unpin>(stream: &mut S, suffix: &str, limit: Duration) -> String {
    let (got, _) = read_until(stream, limit, |got| got.ends_with(suffix.as_bytes())).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.ends_with(suffix), "no whole response within {limit:?}: {text:?}");
    text
}

/// A normal HTTPS GET still works and the process is still running.
async fn assert_still_serving(sidecar: &mut Sidecar, ca_pem: &[u8]) {
    let mut conn = HttpsConnection::open(sidecar.addr, ca_pem, false).await;
    let (status, _, body) = conn.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, HELLO);
    assert!(sidecar.child.try_wait().unwrap().is_none(), "the proxy process exited; log:\n{}", sidecar.logs.text());
}

/// A real ClientHello (one TLS record) as a rustls client would send it for localhost.
fn client_hello(ca_pem: &[u8]) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        client_config(ca_pem, &[b"h2", b"http/1.1"]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

/// One HTTP/1.1 GET over a fresh TLS connection made with `config`; returns how the handshake
/// went and the negotiated version. Reading the response also takes in the session tickets.
async fn handshake_and_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (Option<rustls::HandshakeKind>, Option<rustls::ProtocolVersion>) {
    let mut tls = tls_connect(addr, config, "localhost").await.expect("TLS handshake");
    let kind = tls.get_ref().1.handshake_kind();
    let version = tls.get_ref().1.protocol_version();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let response = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(HELLO), "{response}");
    (kind, version)
}

// ---------------------------------------------------------------------------------------------
// 1. Protocol versions (openssl s_client).
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn openssl_negotiates_tls12_and_tls13_and_verifies_the_certificate() {
    if !require_tool("openssl") {
        return;
    }
    let served = serve(&[]).await;
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out) = s_client_async(served.sidecar.addr, served.pki.ca_path(), &[flag]).await;
        assert!(ok, "s_client {flag} failed:\n{out}");
        assert!(out.contains(&format!("New, {version}, Cipher is ")), "{flag} should negotiate {version}:\n{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "the chain verifies against the test CA:\n{out}");
        assert!(out.contains("Verified peername: localhost"), "the name verifies:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_prefers_aes_128_gcm_over_the_clients_aes_256_and_still_serves_chacha_only_clients() {
    if !require_tool("openssl") {
        return;
    }
    let served = serve(&[]).await;
    // OpenSSL lists AES-256-GCM first; the server's order picks AES-128-GCM.
    for (flag, suite) in [("-tls1_3", "TLS_AES_128_GCM_SHA256"), ("-tls1_2", "ECDHE-ECDSA-AES128-GCM-SHA256")] {
        let (ok, out) = s_client_async(served.sidecar.addr, served.pki.ca_path(), &[flag]).await;
        assert!(ok, "s_client {flag} failed:\n{out}");
        assert!(out.contains(&format!("Cipher is {suite}")), "{flag} should negotiate {suite}:\n{out}");
    }
    let (ok, out) = s_client_async(
        served.sidecar.addr,
        served.pki.ca_path(),
        &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
    )
    .await;
    assert!(ok, "a ChaCha20-only client is served:\n{out}");
    assert!(out.contains("Cipher is TLS_CHACHA20_POLY1305_SHA256"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_tls11_and_tls10_are_refused() {
    if !require_tool("openssl") {
        return;
    }
    let served = serve(&[]).await;
    for (flag, version) in [("-tls1_1", "TLSv1.1"), ("-tls1", "TLSv1")] {
        // SECLEVEL=0 lets this openssl actually offer the old version, so the refusal below is
        // the server's, not the client's own policy.
        let (ok, out) =
            s_client_async(served.sidecar.addr, served.pki.ca_path(), &[flag, "-cipher", "DEFAULT:@SECLEVEL=0"]).await;
        assert!(!ok, "s_client {flag} must fail:\n{out}");
        assert!(out.contains("alert"), "the server answers the {version} ClientHello with an alert:\n{out}");
        assert!(out.contains("Cipher is (NONE)"), "no session is established:\n{out}");
        assert!(!out.contains(&format!("New, {version}, ")), "{version} must not be negotiated:\n{out}");
    }
    // The refusals did not hurt the listener.
    let mut sidecar = served.sidecar;
    assert_still_serving(&mut sidecar, served.pki.ca_pem.as_bytes()).await;
}

// ---------------------------------------------------------------------------------------------
// 2. ALPN.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn openssl_alpn_negotiates_h2_and_http11_with_server_preference_for_h2() {
    if !require_tool("openssl") {
        return;
    }
    let served = serve(&[]).await;
    for (offer, expected) in [("h2", "h2"), ("http/1.1", "http/1.1"), ("http/1.1,h2", "h2")] {
        let (ok, out) = s_client_async(served.sidecar.addr, served.pki.ca_path(), &["-alpn", offer]).await;
        assert!(ok, "s_client -alpn {offer} failed:\n{out}");
        assert!(
            out.contains(&format!("ALPN protocol: {expected}\n")),
            "offering {offer} should select {expected}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rustls_client_gets_200_over_h2_http11_and_without_alpn() {
    let served = serve(&[]).await;
    let ca = served.pki.ca_pem.as_bytes();
    for http2 in [true, false] {
        // `open` asserts that ALPN selected exactly the protocol offered.
        let mut conn = HttpsConnection::open(served.sidecar.addr, ca, http2).await;
        let (status, _, body) = conn.get("/alpn").await;
        assert_eq!(status, StatusCode::OK, "http2={http2}");
        assert_eq!(body, HELLO);
        let seen = served.upstream.last_request();
        assert_eq!(seen.uri, "/alpn");
    }

    // A client offering no ALPN at all is served HTTP/1.1.
    let mut tls = tls_connect(served.sidecar.addr, client_config(ca, &[]), "localhost").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"GET /no-alpn HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let response = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(HELLO), "{response}");
}

// ---------------------------------------------------------------------------------------------
// 3. curl.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn curl_gets_200_over_http2_and_http11() {
    if !require_tool("curl") {
        return;
    }
    let served = serve(&[]).await;
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, stdout, stderr) = curl(served.sidecar.addr, served.pki.ca_path(), flag).await;
        assert!(ok, "curl {flag} failed: {stderr}");
        assert_eq!(stdout, format!("{HELLO}{version} 200"), "curl {flag}: body then \"version status\"");
        assert_eq!(served.upstream.last_request().uri, "/");
    }
}

/// Legacy apps often answer in HTTP/1.0. A proxy must send its own HTTP version (RFC 9110
/// §6.2), so an HTTP/1.1 client still gets an HTTP/1.1 response and keeps its connection.
#[tokio::test(flavor = "multi_thread")]
async fn http10_upstream_is_answered_to_http11_clients_as_http11_on_a_kept_connection() {
    let legacy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let legacy_addr = legacy.local_addr().unwrap();
    let legacy_task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = legacy.accept().await else { continue };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n\r\nlegacy\n")
                    .await;
                // HTTP/1.0 without keep-alive: the app closes after each response.
            });
        }
    });
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let url = format!("http://{legacy_addr}");
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", s(&leaf.cert), "--key", s(&leaf.key)]);

    let mut tls =
        tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..2 {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"legacy\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap_or(0);
            assert!(
                n > 0,
                "request {i}: the proxy closed the client connection after {:?}",
                String::from_utf8_lossy(&response)
            );
            response.extend_from_slice(&buf[..n]);
        }
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "request {i}: the status line must carry the proxy's HTTP/1.1:\n{response}"
        );
    }
    legacy_task.abort();
}

// ---------------------------------------------------------------------------------------------
// 4. The development certificate.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn dev_certificate_is_created_for_localhost_and_loopback_ips_then_reused() {
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let first = Sidecar::start(&["--upstream", &url]);
    let state_home = first.state_dir.as_ref().unwrap().path().to_owned();
    let cert_path = state_home.join("sidecar").join("dev-cert.pem");
    let key_path = state_home.join("sidecar").join("dev-key.pem");

    let log = first.logs.wait_for("self-signed", Duration::from_secs(5));
    assert!(log.contains("created"), "the first start creates the certificate: {log}");
    assert!(!log.contains("reusing"), "{log}");
    assert!(log.contains(s(&cert_path)), "the log names the certificate path {}: {log}", cert_path.display());
    // And, in the first lines, how to get a certificate that clients trust instead.
    assert!(log.contains("`sidecar cert --install`"), "{log}");
    let text = first.logs.text();
    assert!(text.lines().position(|l| l.contains("self-signed")).is_some_and(|at| at < 3), "{text}");

    let cert_pem = std::fs::read(&cert_path).expect("dev-cert.pem written under $XDG_STATE_HOME/sidecar");
    let file_der = pem_ders(&cert_pem);
    assert_eq!(file_der.len(), 1);
    let key_pem = std::fs::read_to_string(&key_path).expect("dev-key.pem written");
    assert!(key_pem.contains("PRIVATE KEY"), "a PEM private key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is readable by its owner only (mode {mode:o})");

    // A client trusting exactly dev-cert.pem verifies the server by DNS name and by IP.
    let config = client_config(&cert_pem, &[b"http/1.1"]);
    let mut served = Vec::new();
    for name in ["localhost", "127.0.0.1", "::1"] {
        let tls = tls_connect(first.addr, config.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("the dev certificate must verify for {name}: {e}"));
        served = peer_chain(&tls);
        assert_eq!(served, file_der, "the served certificate is the one in dev-cert.pem");
    }
    // Verification is real: a name outside the certificate fails.
    let err = tls_connect(first.addr, config.clone(), "example.com")
        .await
        .expect_err("example.com is not in the dev certificate");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    // And a GET works through it.
    let mut conn = HttpsConnection::open(first.addr, &cert_pem, true).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);

    // A second start with the same state directory reuses the same certificate.
    let second = Sidecar::start_with(&["--upstream", &url], |cmd| {
        cmd.env("XDG_STATE_HOME", &state_home);
    });
    let log = second.logs.wait_for("self-signed", Duration::from_secs(5));
    assert!(log.contains("reusing"), "the second start reuses the certificate: {log}");
    assert!(!log.contains("created"), "{log}");
    assert!(log.contains(s(&cert_path)), "{log}");
    let tls = tls_connect(second.addr, config, "localhost").await.expect("the reused certificate still verifies");
    assert_eq!(peer_chain(&tls), served, "the same certificate (same serial) is served after a restart");
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert_pem, "dev-cert.pem is left unchanged");
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_certificate_near_expiry_or_corrupt_is_replaced() {
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let pki = TestPki::new();
    // Valid for 10 more days: inside the 30-day renewal window. Then: a corrupt file.
    let soon = pki.issue_with("soon", &["localhost", "127.0.0.1"], -1, 10);
    let planted_soon = (std::fs::read(&soon.cert).unwrap(), std::fs::read(&soon.key).unwrap());
    let planted_corrupt =
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(), planted_soon.1.clone());
    for (what, (cert, key)) in [("expiring", planted_soon), ("corrupt", planted_corrupt)] {
        let state_home = tempfile::tempdir().unwrap();
        let dir = state_home.path().join("sidecar");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dev-cert.pem"), &cert).unwrap();
        std::fs::write(dir.join("dev-key.pem"), &key).unwrap();
        let sidecar = Sidecar::start_with(&["--upstream", &url], |cmd| {
            cmd.env("XDG_STATE_HOME", state_home.path());
        });
        let log = sidecar.logs.wait_for("self-signed", Duration::from_secs(5));
        assert!(log.contains("created"), "an {what} dev certificate is replaced: {log}");
        let new_pem = std::fs::read(dir.join("dev-cert.pem")).unwrap();
        assert_ne!(new_pem, cert, "dev-cert.pem was rewritten ({what})");
        let tls = tls_connect(sidecar.addr, client_config(&new_pem, &[b"http/1.1"]), "localhost")
            .await
            .unwrap_or_else(|e| panic!("the new dev certificate verifies ({what}): {e}"));
        assert_eq!(peer_chain(&tls), pem_ders(&new_pem), "the new certificate is served ({what})");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. --cert/--key formats.
// ---------------------------------------------------------------------------------------------

/// Starts the proxy with `cert`/`key`, trusts `cert` itself (self-signed) or `trust_pem`, and
/// checks the served leaf is the file's and that a GET works.
async fn assert_serves(cert: &Path, key: &Path, trust_pem: &[u8]) {
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", s(cert), "--key", s(key)]);
    let tls =
        tls_connect(sidecar.addr, client_config(trust_pem, &[b"http/1.1"]), "localhost").await.expect("TLS handshake");
    let file_leaf = pem_ders(&std::fs::read(cert).unwrap()).remove(0);
    assert_eq!(peer_chain(&tls)[0], file_leaf, "the leaf from {} is served", cert.display());
    for http2 in [false, true] {
        let mut conn = HttpsConnection::open(sidecar.addr, trust_pem, http2).await;
        let (status, _, body) = conn.get("/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, HELLO);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs8_key_is_accepted() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let key = std::fs::read_to_string(&leaf.key).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "TestPki writes PKCS#8: {key}");
    assert_serves(&leaf.cert, &leaf.key, pki.ca_pem.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs1_rsa_key_is_accepted() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    blocking(move || {
        let mut args = vec!["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem"];
        args.extend_from_slice(&SELF_SIGNED);
        openssl_in(&d, &args);
        openssl_in(&d, &["rsa", "-in", "k.pem", "-traditional", "-out", "k1.pem"]);
    })
    .await;
    let key = std::fs::read_to_string(dir.path().join("k1.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "a PKCS#1 key: {key}");
    let cert = dir.path().join("c.pem");
    assert_serves(&cert, &dir.path().join("k1.pem"), &std::fs::read(&cert).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sec1_ec_key_is_accepted() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    blocking(move || {
        openssl_in(&d, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.pem"]);
        let mut args = vec!["req", "-x509", "-key", "ec.pem", "-out", "c.pem"];
        args.extend_from_slice(&SELF_SIGNED);
        openssl_in(&d, &args);
    })
    .await;
    let key = std::fs::read_to_string(dir.path().join("ec.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN EC PRIVATE KEY-----"), "a SEC1 key: {key}");
    let cert = dir.path().join("c.pem");
    assert_serves(&cert, &dir.path().join("ec.pem"), &std::fs::read(&cert).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_file_is_served_whole() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let chain = pki.dir.path().join("chain.pem");
    let mut pem = std::fs::read_to_string(&leaf.cert).unwrap();
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem.push_str(&pki.ca_pem);
    write(&chain, &pem);
    let expected = pem_ders(pem.as_bytes());
    assert_eq!(expected.len(), 2);

    let upstream = Upstream::start().await;
    let url = upstream.url();
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", s(&chain), "--key", s(&leaf.key)]);
    let tls = tls_connect(sidecar.addr, client_config(pki.ca_pem.as_bytes(), &[b"h2"]), "localhost").await.unwrap();
    assert_eq!(peer_chain(&tls), expected, "the client receives the leaf and then the CA, in file order");
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// 6. Bad start-up input: exit code 2 and one clear line.
// ---------------------------------------------------------------------------------------------

fn proxy_with(cert: &Path, key: &Path) -> (i32, String) {
    run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", NO_UPSTREAM, "--cert", s(cert), "--key", s(key)])
}

#[test]
fn missing_cert_file_is_named() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let missing = pki.dir.path().join("missing.crt");
    let (code, stderr) = proxy_with(&missing, &leaf.key);
    assert_one_line_error(code, &stderr, &[s(&missing)]);
}

#[test]
fn missing_key_file_is_named() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let missing = pki.dir.path().join("missing.key");
    let (code, stderr) = proxy_with(&leaf.cert, &missing);
    assert_one_line_error(code, &stderr, &[s(&missing)]);
}

#[test]
fn key_of_another_certificate_is_refused() {
    let pki = TestPki::new();
    let one = pki.issue("one");
    let other = pki.issue("other");
    let (code, stderr) = proxy_with(&one.cert, &other.key);
    assert_one_line_error(code, &stderr, &["does not match", s(&one.cert), s(&other.key)]);
}

#[test]
fn expired_certificate_is_refused() {
    let pki = TestPki::new();
    let old = pki.issue_with("old", &["localhost"], -10, -1);
    let (code, stderr) = proxy_with(&old.cert, &old.key);
    assert_one_line_error(code, &stderr, &["expired", s(&old.cert)]);
}

#[test]
fn not_yet_valid_certificate_is_refused() {
    let pki = TestPki::new();
    let early = pki.issue_with("early", &["localhost"], 1, 10);
    let (code, stderr) = proxy_with(&early.cert, &early.key);
    assert_one_line_error(code, &stderr, &["not valid before", s(&early.cert)]);
}

#[test]
fn garbage_certificate_file_is_named() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let bad = pki.dir.path().join("bad.crt");
    for contents in [
        "hello\n",
        "-----BEGIN CERTIFICATE-----\nthis is not base64 !!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    ] {
        write(&bad, contents);
        let (code, stderr) = proxy_with(&bad, &leaf.key);
        assert_one_line_error(code, &stderr, &[s(&bad)]);
    }
}

#[test]
fn certificate_given_as_key_names_the_key_file() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let (code, stderr) = proxy_with(&leaf.cert, &leaf.cert);
    assert_one_line_error(code, &stderr, &[&format!("key file {}", leaf.cert.display())]);
}

#[test]
fn empty_certificate_and_key_files_are_named() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let empty = pki.dir.path().join("empty.pem");
    write(&empty, "");
    let (code, stderr) = proxy_with(&empty, &leaf.key);
    assert_one_line_error(code, &stderr, &[&format!("certificate file {}", empty.display())]);
    let (code, stderr) = proxy_with(&leaf.cert, &empty);
    assert_one_line_error(code, &stderr, &[&format!("key file {}", empty.display())]);
}

#[test]
fn port_in_use_names_the_address() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(&[
        "proxy",
        "--listen",
        &addr,
        "--upstream",
        NO_UPSTREAM,
        "--cert",
        s(&leaf.cert),
        "--key",
        s(&leaf.key),
    ]);
    assert_one_line_error(code, &stderr, &[&addr, "in use"]);
    drop(taken);
}

#[test]
fn unusable_dev_cert_state_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    write(&file, "not a directory");
    let state_dir = file.join("state");
    let (code, stderr) =
        run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", NO_UPSTREAM, "--state-dir", s(&state_dir)]);
    assert_one_line_error(code, &stderr, &[s(&state_dir)]);
}

#[test]
fn bad_upstream_urls_are_usage_errors() {
    for bad in ["https://x:1", "http://x:1/path", "not a url ::"] {
        let (code, stderr) = run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", bad]);
        assert_usage_error(code, &stderr, &["--upstream", bad]);
    }
}

#[test]
fn cert_without_key_and_key_without_cert_are_usage_errors() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let (code, stderr) =
        run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", NO_UPSTREAM, "--cert", s(&leaf.cert)]);
    assert_usage_error(code, &stderr, &["--key"]);
    let (code, stderr) =
        run_to_exit(&["proxy", "--listen", "127.0.0.1:0", "--upstream", NO_UPSTREAM, "--key", s(&leaf.key)]);
    assert_usage_error(code, &stderr, &["--cert"]);
}

// ---------------------------------------------------------------------------------------------
// 7. One bad connection never takes the proxy down.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn non_tls_bytes_are_dropped_and_the_proxy_keeps_serving() {
    let served = serve(&[]).await;
    let mut sidecar = served.sidecar;
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let payloads: [&[u8]; 3] = [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", &junk, &[0u8; 64]];
    for payload in payloads {
        let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        // The proxy may close as soon as it has seen enough; a failed write is fine.
        let _ = tcp.write_all(payload).await;
        let reply = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(
            reply.is_empty() || reply[0] == 0x15,
            "only a TLS alert may come back, got {:?}",
            &reply[..reply.len().min(32)]
        );
    }
    assert_still_serving(&mut sidecar, served.pki.ca_pem.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_client_hello_is_closed_and_the_proxy_keeps_serving() {
    let served = serve(&["--tls-handshake-timeout", "1s"]).await;
    let mut sidecar = served.sidecar;
    let ca = served.pki.ca_pem.as_bytes();
    let hello = client_hello(ca);

    // Control: the whole hello gets a ServerHello back, so the bytes are a real ClientHello.
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut first))
        .await
        .expect("ServerHello in time")
        .unwrap();
    assert_eq!(first[0], 0x16, "a handshake record answers the full ClientHello");
    drop(tcp);

    // Half a hello, then end of input: closed at once.
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
    tcp.shutdown().await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5)).await;

    // Half a hello, then silence: closed by --tls-handshake-timeout (1s), well before the
    // 10s default.
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );

    // Only a record header promising more than ever comes.
    let mut tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5)).await;

    assert_still_serving(&mut sidecar, ca).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_http_bytes_after_the_handshake_are_dropped_and_the_proxy_keeps_serving() {
    let served = serve(&[]).await;
    let mut sidecar = served.sidecar;
    let ca = served.pki.ca_pem.as_bytes();
    let alpns: [&[&[u8]]; 3] = [&[b"http/1.1"], &[b"h2"], &[]];
    for alpn in alpns {
        let mut tls = tls_connect(sidecar.addr, client_config(ca, alpn), "localhost").await.expect("TLS handshake");
        let _ = tls.write_all(b"\x00\x01\x02\x03 this is not HTTP at all \xff\xfe\xfd\r\n\r\n").await;
        let _ = tls.flush().await;
        read_until_closed(&mut tls, Duration::from_secs(5)).await;
    }
    assert_eq!(served.upstream.log.requests.lock().unwrap().len(), 0, "nothing reached the upstream");
    assert_still_serving(&mut sidecar, ca).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Session resumption.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tls13_session_is_resumed() {
    let served = serve(&[]).await;
    let config = client_config(served.pki.ca_pem.as_bytes(), &[b"http/1.1"]);
    let (kind, version) = handshake_and_get(served.sidecar.addr, config.clone()).await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
    let (kind, version) = handshake_and_get(served.sidecar.addr, config).await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "the second connection resumes the first session");
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test(flavor = "multi_thread")]
async fn tls12_session_is_resumed() {
    let served = serve(&[]).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(served.pki.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let (kind, version) = handshake_and_get(served.sidecar.addr, config.clone()).await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_2));
    let (kind, version) = handshake_and_get(served.sidecar.addr, config).await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "the second connection resumes the first session");
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_2));
}

/// The proxy holds the TLS 1.3 ticket back until the first response, and a small last response
/// until close_notify (src/transport.rs). Both still arrive: the ticket with the first response
/// of a kept connection, the last response whole and followed by a clean close_notify (a close
/// without one is an error to a rustls client), and the ticket resumes the next connection.
#[tokio::test(flavor = "multi_thread")]
async fn held_ticket_and_last_response_arrive_and_the_close_is_clean() {
    let served = serve(&[]).await;
    let config = client_config(served.pki.ca_pem.as_bytes(), &[b"http/1.1"]);
    let mut tls = tls_connect(served.sidecar.addr, config.clone(), "localhost").await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));

    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let first = read_until_suffix(&mut tls, HELLO, Duration::from_secs(5)).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(tls.get_ref().1.tls13_tickets_received(), 1, "the ticket came with the first response");

    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut last = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut last)).await.expect("closed in time");
    read.expect("the connection ends with close_notify");
    let last = String::from_utf8_lossy(&last);
    assert!(last.starts_with("HTTP/1.1 200") && last.ends_with(HELLO), "{last}");

    let again = tls_connect(served.sidecar.addr, config, "localhost").await.expect("TLS handshake");
    assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
}
