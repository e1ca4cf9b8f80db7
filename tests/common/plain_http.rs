//! Plain HTTP/1.1 without TLS, blocking: one exchange per connection, for admin APIs and
//! sync sources, and headers as a map for readable asserts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// One plain HTTP/1.1 exchange with `Connection: close`; returns (status, body). Blocking, so
/// it can be used from any test. `None` when the connection fails.
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tcp.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn http_get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_exchange(addr, "GET", path, &[], "").unwrap_or_else(|| panic!("GET {path} on {addr}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {status} {e}: {body}"))
}

/// The upstream's view of headers as a simple map (last value wins), for readable asserts.
pub fn header_map(headers: &http::HeaderMap) -> HashMap<String, String> {
    headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned())).collect()
}
