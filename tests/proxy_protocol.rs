//! `--proxy-protocol`: a load balancer's PROXY header (v1 text, v2 binary), written by hand on a
//! raw TCP connection before the TLS handshake over the same connection, names the client that
//! the app sees in X-Forwarded-For; a connection without a valid header is refused. Every test
//! runs the real binary between a real client and a real upstream.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

const V1_TCP4: &[u8] = b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: version/command byte (0x21 PROXY, 0x20 LOCAL), family/transport byte (0x11
/// TCP over IPv4, 0x21 TCP over IPv6), then the address block and TLVs, counted in the length.
fn v2(version_command: u8, family: u8, block: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[version_command, family]);
    out.extend_from_slice(&u16::try_from(block.len() + tlvs.len()).unwrap().to_be_bytes());
    out.extend_from_slice(block);
    out.extend_from_slice(tlvs);
    out
}

fn v2_tcp4(tlvs: &[u8]) -> Vec<u8> {
    let mut block = vec![203, 0, 113, 7, 127, 0, 0, 1];
    block.extend_from_slice(&51234u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    v2(0x21, 0x11, &block, tlvs)
}

fn v2_tcp6(tlvs: &[u8]) -> Vec<u8> {
    let mut block = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    block.extend_from_slice(&"::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    block.extend_from_slice(&51234u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    v2(0x21, 0x21, &block, tlvs)
}

/// PP2_TYPE_AUTHORITY ("localhost") and a PP2_TYPE_NOOP, as AWS and HAProxy send them.
const TLVS: &[u8] = b"\x02\x00\x09localhost\x04\x00\x04pad!";

/// Connects, writes `prefix` on the bare TCP connection, then does the TLS handshake over it.
async fn tls_after(
    addr: SocketAddr,
    prefix: &[u8],
    ca_pem: &[u8],
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(prefix).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn)).connect(name, tcp);
    tokio::time::timeout(Duration::from_secs(10), handshake).await.expect("the handshake ends one way or the other")
}

/// `HttpsConnection::open`, with `prefix` written before the ClientHello.
async fn open_after(addr: SocketAddr, prefix: &[u8], ca_pem: &[u8], http2: bool) -> HttpsConnection {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_after(addr, prefix, ca_pem, alpn).await.expect("TLS handshake after the PROXY header");
    HttpsConnection::over(tls, http2).await
}

/// Opens a connection after `prefix`, GETs `/` and returns the X-Forwarded-For the app saw.
async fn forwarded_for(upstream: &Upstream, addr: SocketAddr, prefix: &[u8], ca_pem: &[u8], http2: bool) -> String {
    let mut conn = open_after(addr, prefix, ca_pem, http2).await;
    let (status, _, _) = conn.get("/").await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.last_request();
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    header_map(&seen.headers)["x-forwarded-for"].clone()
}

/// Proves the proxy still serves: a connection with a valid header gets a 200.
async fn still_serves(upstream: &Upstream, addr: SocketAddr, ca_pem: &[u8], after: &str) {
    let xff = forwarded_for(upstream, addr, V1_TCP4, ca_pem, false).await;
    assert_eq!(xff, "203.0.113.7", "a valid client after {after}");
}

/// Reads and discards until the server closes; returns how long after `since` that was.
async fn closed_within(stream: &mut TcpStream, since: Instant, bound: Duration, what: &str) -> Duration {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {bound:?}");
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_header_sets_x_forwarded_for() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--proxy-protocol"]).await;
    let ca = pki.ca_pem.as_bytes();
    assert_eq!(forwarded_for(&upstream, sidecar.addr, V1_TCP4, ca, false).await, "203.0.113.7");
    let v1_tcp6 = b"PROXY TCP6 2001:db8::1 ::1 51234 443\r\n";
    assert_eq!(forwarded_for(&upstream, sidecar.addr, v1_tcp6, ca, false).await, "2001:db8::1");
    // UNKNOWN: relayed for no address the balancer could name; the socket's peer stands.
    assert_eq!(forwarded_for(&upstream, sidecar.addr, b"PROXY UNKNOWN\r\n", ca, false).await, "127.0.0.1");
    // The client's own claim is still overwritten: the header, not the request, names it.
    let mut conn = open_after(sidecar.addr, V1_TCP4, ca, false).await;
    let request = http::Request::get("/").header("x-forwarded-for", "6.6.6.6").body(empty()).unwrap();
    assert_eq!(conn.send(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(header_map(&upstream.last_request().headers)["x-forwarded-for"], "203.0.113.7");
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_headers_for_ipv4_and_ipv6_with_tlvs_and_local() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--proxy-protocol"]).await;
    let ca = pki.ca_pem.as_bytes();
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2_tcp4(&[]), ca, false).await, "203.0.113.7");
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2_tcp4(TLVS), ca, false).await, "203.0.113.7");
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2_tcp6(TLVS), ca, false).await, "2001:db8::1");
    // Many TLVs (within the 4096-byte cap) are read through and dropped.
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2_tcp4(&TLVS.repeat(100)), ca, false).await, "203.0.113.7");
    // LOCAL: the balancer's own connection (a health check); the socket's peer stands.
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2(0x20, 0x00, &[], &[]), ca, false).await, "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_over_a_v2_prefixed_connection() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--proxy-protocol", "--access-log", "stderr"]).await;
    let ca = pki.ca_pem.as_bytes();
    let mut conn = open_after(sidecar.addr, &v2_tcp6(TLVS), ca, true).await;
    for _ in 0..3 {
        let (status, _, body) = conn.get("/h2").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from upstream\n"));
        assert_eq!(header_map(&upstream.last_request().headers)["x-forwarded-for"], "2001:db8::1");
    }
    // The access log names the client too, not the balancer.
    let line = sidecar.logs.wait_for("GET /h2", Duration::from_secs(5));
    assert!(line.starts_with("2001:db8::1 "), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_valid_header_are_refused_and_the_proxy_keeps_serving() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--proxy-protocol", "--log-level", "debug"]).await;
    let ca = pki.ca_pem.as_bytes();

    // A plain TLS client: its ClientHello is not a PROXY header.
    let plain = tls_connect(sidecar.addr, client_config(ca, &[b"http/1.1"]), "localhost").await;
    assert!(plain.is_err(), "a TLS client without a PROXY header must not get a session");
    sidecar.logs.wait_for("connection refused: no PROXY protocol header", Duration::from_secs(5));
    still_serves(&upstream, sidecar.addr, ca, "a plain TLS client").await;

    let mut too_long_v2 = v2_tcp4(&[]);
    too_long_v2[14..16].copy_from_slice(&5000u16.to_be_bytes());
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("plain HTTP", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()),
        ("v1 without its last port", b"PROXY TCP4 203.0.113.7 127.0.0.1 51234\r\n".to_vec()),
        ("v1 with IPv4 addresses under TCP6", b"PROXY TCP6 203.0.113.7 127.0.0.1 51234 443\r\n".to_vec()),
        ("v1 with a bad address", b"PROXY TCP4 203.0.113.300 127.0.0.1 51234 443\r\n".to_vec()),
        ("v1 with a bad port", b"PROXY TCP4 203.0.113.7 127.0.0.1 70000 443\r\n".to_vec()),
        ("v1 ending in LF only", b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\n".to_vec()),
        ("v1 longer than 107 bytes", [&b"PROXY UNKNOWN "[..], &[b'x'; 120], b"\r\n"].concat()),
        ("v2 with version 1", v2(0x11, 0x11, &[0; 12], &[])),
        ("v2 over AF_UNIX", v2(0x21, 0x31, &[0; 216], &[])),
        ("v2 over UDP", v2(0x21, 0x12, &[0; 12], &[])),
        ("v2 longer than 4096 bytes", too_long_v2),
    ];
    for (what, prefix) in &garbage {
        let result = tls_after(sidecar.addr, prefix, ca, &[b"http/1.1"]).await;
        assert!(result.is_err(), "{what}: the TLS handshake must fail");
        still_serves(&upstream, sidecar.addr, ca, what).await;
    }
    // Each refusal is logged at debug level, naming the socket's peer and the reason.
    let line = sidecar.logs.wait_for("v1 header: the source port is not a decimal number", Duration::from_secs(5));
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    sidecar.logs.wait_for("v2 header: version 1", Duration::from_secs(5));
    sidecar.logs.wait_for("is not TCP over IPv4 or IPv6", Duration::from_secs(5));
    sidecar.logs.wait_for("more than the 4096 accepted", Duration::from_secs(5));
    assert_eq!(sidecar.logs.count("panicked"), 0, "{}", sidecar.logs.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_or_truncated_header_is_closed_at_the_handshake_timeout() {
    let (upstream, pki, sidecar) =
        proxy_in_front_of_upstream(&["--proxy-protocol", "--tls-handshake-timeout", "300ms", "--log-level", "debug"])
            .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(sidecar.addr).await.unwrap();
    let mut partial_v1 = TcpStream::connect(sidecar.addr).await.unwrap();
    partial_v1.write_all(&V1_TCP4[..20]).await.unwrap();
    let mut partial_v2 = TcpStream::connect(sidecar.addr).await.unwrap();
    partial_v2.write_all(&v2_tcp4(TLVS)[..30]).await.unwrap();
    for (stream, what) in
        [(&mut silent, "no header"), (&mut partial_v1, "part of a v1 header"), (&mut partial_v2, "part of a v2 header")]
    {
        let after = closed_within(stream, started, Duration::from_secs(3), what).await;
        assert!(after >= Duration::from_millis(250), "{what}: closed after {after:?}, before the 300ms timeout");
    }
    sidecar.logs.wait_for("no complete PROXY protocol header within 300ms", Duration::from_secs(5));
    still_serves(&upstream, sidecar.addr, pki.ca_pem.as_bytes(), "truncated headers").await;

    // The header and the handshake share the deadline: a header sent at once, then a
    // ClientHello that never comes, is cut off at the same timeout.
    let mut stalled = TcpStream::connect(sidecar.addr).await.unwrap();
    let started = Instant::now();
    stalled.write_all(V1_TCP4).await.unwrap();
    let after = closed_within(&mut stalled, started, Duration::from_secs(3), "header, then nothing").await;
    assert!(after >= Duration::from_millis(250), "closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_abandons_a_connection_waiting_for_its_header() {
    let (upstream, pki, mut sidecar) = proxy_in_front_of_upstream(&[
        "--proxy-protocol",
        "--tls-handshake-timeout",
        "8s",
        "--drain-timeout",
        "10s",
        "--shutdown-delay",
        "0s",
    ])
    .await;
    let mut stalled = TcpStream::connect(sidecar.addr).await.unwrap();
    stalled.write_all(b"PROXY TCP4 ").await.unwrap();
    // Accepts happen in order, so once a later connection is served the stalled one is accepted.
    still_serves(&upstream, sidecar.addr, pki.ca_pem.as_bytes(), "a stalled header").await;
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let status = tokio::task::block_in_place(|| sidecar.wait_exit(Duration::from_secs(3)));
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(3), "exit took {:?}", signalled.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_flag_a_header_is_not_accepted_and_plain_clients_work() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&[]).await;
    let ca = pki.ca_pem.as_bytes();
    for prefix in [V1_TCP4.to_vec(), v2_tcp4(TLVS)] {
        let result = tls_after(sidecar.addr, &prefix, ca, &[b"http/1.1"]).await;
        assert!(result.is_err(), "without --proxy-protocol a PROXY header must break the handshake, not be skipped");
    }
    let mut conn = HttpsConnection::open(sidecar.addr, ca, false).await;
    assert_eq!(conn.get("/").await.0, StatusCode::OK);
    assert_eq!(header_map(&upstream.last_request().headers)["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_environment_variable_turns_it_on() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream_with(&[], |cmd| {
        cmd.env("SIDECAR_PROXY_PROTOCOL", "true");
    })
    .await;
    let ca = pki.ca_pem.as_bytes();
    assert!(tls_connect(sidecar.addr, client_config(ca, &[b"http/1.1"]), "localhost").await.is_err());
    assert_eq!(forwarded_for(&upstream, sidecar.addr, &v2_tcp4(&[]), ca, true).await, "203.0.113.7");
}

/// One sample of the admin API's /metrics text, 0 when absent.
async fn metric(admin: SocketAddr, key: &str) -> f64 {
    use http_body_util::BodyExt;
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/metrics").header("host", "admin").body(empty()).unwrap();
    let body = send.send_request(request).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' '))).map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_headers_are_counted_as_failed_handshakes() {
    let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--proxy-protocol", "--admin", "127.0.0.1:0"]).await;
    let admin = sidecar.admin_addr();
    let ca = pki.ca_pem.as_bytes();
    assert!(tls_after(sidecar.addr, b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n", ca, &[b"http/1.1"]).await.is_err());
    {
        // Part of a header, then the client goes away.
        let mut partial = TcpStream::connect(sidecar.addr).await.unwrap();
        partial.write_all(&V1_TCP4[..20]).await.unwrap();
    }
    still_serves(&upstream, sidecar.addr, ca, "refused headers").await;

    let failures = "sidecar_tls_handshake_failures_total";
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(admin, &format!("{failures}{{reason=\"eof\"}}")).await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(admin, &format!("{failures}{{reason=\"proxy_protocol\"}}")).await, 1.0);
    assert_eq!(metric(admin, &format!("{failures}{{reason=\"eof\"}}")).await, 1.0);
    assert_eq!(metric(admin, "sidecar_tls_handshakes_total").await, 1.0);
    assert_eq!(metric(admin, "sidecar_connections_total").await, 3.0);
}

#[test]
fn check_reports_the_setting_and_refuses_a_bad_value() {
    let output = |args: &[&str], env: &[(&str, &str)]| {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = sidecar_command(args);
        cmd.env("XDG_STATE_HOME", state.path()).envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let note = "every connection must start with a PROXY protocol header";
    let (code, text) = output(&["check", "--upstream", "http://127.0.0.1:8080", "--proxy-protocol"], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(note), "{text}");
    let (code, text) = output(&["check", "--upstream", "http://127.0.0.1:8080"], &[("SIDECAR_PROXY_PROTOCOL", "true")]);
    assert!(code == Some(0) && text.contains(note), "{text}");
    let (code, text) = output(
        &["check", "--upstream", "http://127.0.0.1:8080", "--proxy-protocol=false"],
        &[("SIDECAR_PROXY_PROTOCOL", "true")],
    );
    assert!(code == Some(0) && !text.contains(note), "the flag wins over the environment: {text}");
    let (code, text) = output(&["check", "--upstream", "http://127.0.0.1:8080", "--proxy-protocol=maybe"], &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("maybe"), "{text}");
}
