//! Header rules for forwarding: hop-by-hop stripping (RFC 9110 §7.6.1) and X-Forwarded-*.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, HOST, UPGRADE};
use http::request::Parts;
use http::Version;

use crate::config::ForwardedPolicy;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Set from a verified client certificate under mutual TLS; never accepted from a client.
pub(crate) const X_CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
const HTTPS: HeaderValue = HeaderValue::from_static("https");
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// Fields that describe one connection, never the message, so a proxy must not pass them on
/// (`Connection` itself is handled apart, as it also names others). Case-insensitive: it also
/// reads field names as they come off the wire (`h1`).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    let is = |field: &str| name.eq_ignore_ascii_case(field);
    let named = match name.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("keep-alive"),
        17 => is("transfer-encoding"),
        _ => false,
    };
    named || name.as_bytes().get(..6).is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"proxy-"))
}

/// Which fields that only the proxy may assert are removed from a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientClaims {
    /// Responses: the upstream's fields are its own business.
    Keep,
    /// Requests under `--forwarded-headers trust`: forwarding claims stay, identity goes.
    StripIdentity,
    /// Requests under `--forwarded-headers overwrite`: both go.
    StripAll,
}

impl ClientClaims {
    fn strips(self, name: &str) -> bool {
        let identity = || name == X_CLIENT_CERT_SUBJECT.as_str();
        // hyper has answered `Expect: 100-continue` by the time the body is read; passed on, the
        // app would be asked again, and its 100 dropped (RFC 9110 §10.1.1).
        if self != ClientClaims::Keep && name == "expect" {
            return true;
        }
        match self {
            ClientClaims::Keep => false,
            ClientClaims::StripIdentity => identity(),
            ClientClaims::StripAll => identity() || name.starts_with("x-forwarded-") || name == "forwarded",
        }
    }
}

/// What a request's `Connection` lines ask for, read once per request (case-insensitive, as
/// hyper reads them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConnectionOptions {
    /// `close`: hyper's HTTP/1 server closes the connection after the response, whatever else
    /// the lines say.
    pub(crate) close: bool,
    /// `upgrade`: with an `Upgrade` field, the request asks to switch protocols.
    upgrade: bool,
}

impl ConnectionOptions {
    pub(crate) fn of(headers: &HeaderMap) -> ConnectionOptions {
        let mut options = ConnectionOptions::default();
        for token in connection_tokens(headers) {
            options.close |= token.eq_ignore_ascii_case("close");
            options.upgrade |= token.eq_ignore_ascii_case("upgrade");
        }
        options
    }

    /// True for an HTTP/1.1 request asking to switch protocols (WebSocket and the like).
    pub(crate) fn wants_upgrade(self, headers: &HeaderMap) -> bool {
        self.upgrade && headers.contains_key(UPGRADE)
    }
}

/// True when every protocol the `Upgrade` field offers is in `allowed` (lowercase names; a
/// version such as `/13` is ignored). After a 101 the proxy controls nothing of what flows, so
/// h2c, say, would hand the app raw frames with whatever fields the client chose.
pub(crate) fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut offered = headers
        .get_all(UPGRADE)
        .into_iter()
        .flat_map(|value| value.to_str().unwrap_or("\0").split(','))
        .map(|protocol| protocol.trim().split('/').next().unwrap_or(""))
        .peekable();
    offered.peek().is_some() && offered.all(|name| allowed.iter().any(|a| a.eq_ignore_ascii_case(name)))
}

/// Why an HTTP/1 request's Host must be refused with 400 (RFC 9112 §3.2): more than one, none
/// on HTTP/1.1, or one that is no `host[:port]`. HTTP/2 has `:authority`, checked by hyper.
pub(crate) fn host_fault(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    if version == Version::HTTP_2 {
        return None;
    }
    let mut hosts = headers.get_all(HOST).into_iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one Host field"),
        (None, _) if version == Version::HTTP_11 => Some("no Host field"),
        (Some(host), None) if !is_host(host.as_bytes()) => Some("invalid Host field"),
        _ => None,
    }
}

/// `uri-host [":" port]` (RFC 3986): reg-name, IPv4 or IP-literal characters only, so no
/// userinfo, path or white space. Empty is valid (a target without authority).
fn is_host(value: &[u8]) -> bool {
    value.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// A gRPC request: `application/grpc`, or `application/grpc+proto` and the like. gRPC-Web
/// (`application/grpc-web*`) is not: it works over HTTP/1.1 and is the app's to answer.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else { return false };
    let value = value.as_bytes();
    value.len() >= 16
        && value[..16].eq_ignore_ascii_case(b"application/grpc")
        && matches!(value.get(16), None | Some(b'+' | b';'))
}

/// The client's `TE` lists `trailers`.
pub(crate) fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .any(|coding| coding.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("trailers"))
}

/// A gRPC call's `grpc-timeout` (up to 8 digits and a unit: H, M, S, m, u, n).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let value = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let nanos_per = match unit {
        b"H" => 3_600_000_000_000,
        b"M" => 60_000_000_000,
        b"S" => 1_000_000_000,
        b"m" => 1_000_000,
        b"u" => 1_000,
        b"n" => 1,
        _ => return None,
    };
    Some(std::time::Duration::from_nanos(amount.saturating_mul(nanos_per)))
}

/// `text` percent-encoded as `grpc-message` wants it (gRPC over HTTP/2: bytes outside
/// printable ASCII, and `%`, are encoded).
pub(crate) fn grpc_message(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Removes the trailer fields that must not follow a body (RFC 9110 §6.5.1): framing, routing,
/// hop-by-hop, request modifiers and authentication, and the fields only the proxy asserts. An
/// app that merges trailers into the head would otherwise take them as the client's claims.
pub(crate) fn strip_trailer_fields(trailers: &mut HeaderMap) {
    const FORBIDDEN: [&str; 18] = [
        "content-length",
        "content-encoding",
        "content-type",
        "content-range",
        "host",
        "connection",
        "expect",
        "max-forwards",
        "range",
        "cache-control",
        "authorization",
        "cookie",
        "set-cookie",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "forwarded",
    ];
    let doomed: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            is_hop_by_hop(name)
                || FORBIDDEN.contains(&name)
                || name.starts_with("x-forwarded-")
                || name == X_CLIENT_CERT_SUBJECT.as_str()
        })
        .cloned()
        .collect();
    for name in doomed {
        trailers.remove(name);
    }
}

/// The tokens of every `Connection` line, trimmed (lines that are not text are skipped).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(',').map(str::trim))
}

/// Removes hop-by-hop fields, the fields `Connection` names, and the client claims that
/// `claims` names. With `keep_upgrade` the `Upgrade` field survives and `Connection: upgrade` is
/// set again, so that a protocol switch reaches the other side.
///
/// Runs twice per request, so it allocates only when it finds something to remove besides
/// `Connection` itself: the usual `Connection: keep-alive` costs one pass over the names and one
/// removal.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, claims: ClientClaims) {
    let mut connection = false;
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let s = name.as_str();
        if *name == CONNECTION {
            connection = true;
        } else if is_hop_by_hop(s) || claims.strips(s) {
            doomed.push(name.clone());
        }
    }
    if connection {
        for token in connection_tokens(headers) {
            // The usual tokens name hop-by-hop fields, already found by name above.
            let known = token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("upgrade");
            if known || token.is_empty() || !headers.contains_key(token) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                doomed.push(name);
            }
        }
        headers.remove(CONNECTION);
    }
    for name in &doomed {
        if !(keep_upgrade && name == UPGRADE) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(CONNECTION, UPGRADE_TOKEN);
    }
}

/// The fields the proxy adds to a request. They are written after the client's own rather
/// than inserted into its map: the map hyper builds is sized for the client's fields, and
/// inserting three or four more grew and rehashed it (callgrind: ~1.1k of a keep-alive
/// request's 26.5k instructions).
#[derive(Debug, Default, Clone)]
pub struct AddedFields {
    pub(crate) host: Option<HeaderValue>,
    pub(crate) forwarded_for: Option<HeaderValue>,
    pub(crate) forwarded_proto: Option<HeaderValue>,
    pub(crate) forwarded_host: Option<HeaderValue>,
    pub(crate) client_subject: Option<HeaderValue>,
}

impl AddedFields {
    /// The fields to write, as `(name, value)`.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        [
            ("host", &self.host),
            ("x-forwarded-for", &self.forwarded_for),
            ("x-forwarded-proto", &self.forwarded_proto),
            ("x-forwarded-host", &self.forwarded_host),
            ("x-client-cert-subject", &self.client_subject),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|value| (name, value)))
    }
}

/// Rewrites a client request's head for the upstream: keeps Host (from :authority for HTTP/2,
/// else `upstream_host`, as an HTTP/1.0 client may send none), strips hop-by-hop fields, and
/// returns the X-Forwarded-For/-Proto/-Host fields that `policy` calls for, with Host when the
/// head has none.
pub fn prepare_request(
    parts: &mut Parts,
    peer_ip: &HeaderValue,
    upstream_host: &HeaderValue,
    policy: ForwardedPolicy,
    upgrade: bool,
) -> AddedFields {
    let headers = &mut parts.headers;
    let claims = match policy {
        ForwardedPolicy::Overwrite => ClientClaims::StripAll,
        ForwardedPolicy::Trust => ClientClaims::StripIdentity,
    };
    strip_hop_by_hop(headers, upgrade, claims);

    let mut added = AddedFields::default();
    // HTTP/2's :authority and an HTTP/1.1 absolute-form target win over Host (RFC 9113 §8.3.1,
    // RFC 9112 §3.2.2); userinfo is never forwarded. Without either, Host is kept, or (HTTP/1.0)
    // the upstream's authority stands in.
    let host = match parts.uri.authority() {
        Some(authority) => {
            let host_port = authority.as_str().rsplit_once('@').map_or(authority.as_str(), |(_, host)| host);
            let host = HeaderValue::from_str(host_port).ok();
            if headers.contains_key(HOST) {
                headers.remove(HOST);
            }
            added.host = Some(host.clone().unwrap_or_else(|| upstream_host.clone()));
            host
        }
        None => match headers.get(HOST) {
            Some(host) => Some(host.clone()),
            None => {
                added.host = Some(upstream_host.clone());
                None
            }
        },
    };
    // HTTP/2 clients split cookies into one field each; an HTTP/1.1 app expects one line
    // (RFC 9113 §8.2.3).
    if parts.version == Version::HTTP_2 {
        join_cookies(headers);
    }

    match policy {
        ForwardedPolicy::Overwrite => {
            added.forwarded_for = Some(peer_ip.clone());
            added.forwarded_proto = Some(HTTPS);
            added.forwarded_host = host;
        }
        ForwardedPolicy::Trust => {
            if headers.contains_key(X_FORWARDED_FOR) {
                added.forwarded_for = Some(append_forwarded_for(headers, peer_ip));
                headers.remove(X_FORWARDED_FOR);
            } else {
                added.forwarded_for = Some(peer_ip.clone());
            }
            if !headers.contains_key(X_FORWARDED_PROTO) {
                added.forwarded_proto = Some(HTTPS);
            }
            if !headers.contains_key(X_FORWARDED_HOST) {
                added.forwarded_host = host;
            }
        }
    }
    added
}

/// Joins several `cookie` fields into one, with "; ".
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).into_iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// `existing, ..., peer` with every X-Forwarded-For line the client sent folded into one.
fn append_forwarded_for(headers: &HeaderMap, peer_ip: &HeaderValue) -> HeaderValue {
    let mut chain: Vec<u8> = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let trimmed = value.as_bytes().trim_ascii();
        if !trimmed.is_empty() {
            chain.extend_from_slice(trimmed);
            chain.extend_from_slice(b", ");
        }
    }
    if chain.is_empty() {
        return peer_ip.clone();
    }
    chain.extend_from_slice(peer_ip.as_bytes());
    HeaderValue::from_bytes(&chain).unwrap_or_else(|_| peer_ip.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_are_told_by_content_type_and_grpc_web_is_not_one() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_grpc(&headers)
        };
        assert!(with("application/grpc") && with("application/grpc+proto") && with("Application/GRPC;x=1"));
        assert!(!with("application/grpc-web") && !with("application/grpc-web+proto") && !with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeouts_read_every_unit_and_refuse_the_rest() {
        let timeout = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(value).unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("1H"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(timeout("2M"), Some(std::time::Duration::from_secs(120)));
        assert_eq!(timeout("3S"), Some(std::time::Duration::from_secs(3)));
        assert_eq!(timeout("250m"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(timeout("7u"), Some(std::time::Duration::from_micros(7)));
        assert_eq!(timeout("99999999n"), Some(std::time::Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn te_trailers_is_found_among_codings_and_grpc_messages_are_percent_encoded() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::TE, HeaderValue::from_static("gzip, Trailers;q=1"));
        assert!(te_trailers(&headers));
        headers.insert(http::header::TE, HeaderValue::from_static("gzip"));
        assert!(!te_trailers(&headers));
        assert_eq!(grpc_message("100% d\u{e9}j\u{e0}\n".as_bytes()), "100%25 d%C3%A9j%C3%A0%0A");
    }
    use http::Request;

    fn parts(build: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        build(Request::builder()).body(()).unwrap().into_parts().0
    }

    const PEER: HeaderValue = HeaderValue::from_static("192.0.2.7");
    const UPSTREAM_HOST: HeaderValue = HeaderValue::from_static("127.0.0.1:8080");

    /// `prepare_request`, with the added fields appended to the head's, as the upstream sees them.
    fn prepare(p: &mut Parts, policy: ForwardedPolicy, upgrade: bool) {
        let added = prepare_request(p, &PEER, &UPSTREAM_HOST, policy, upgrade);
        for (name, value) in added.iter() {
            p.headers.append(name, value.clone());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed_fields() {
        let mut p = parts(|b| {
            b.header("connection", "keep-alive, x-secret")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("trailer", "x")
                .header("transfer-encoding", "chunked")
                .header("upgrade", "h2c")
                .header("proxy-authorization", "Basic x")
                .header("proxy-connection", "keep-alive")
                .header("x-secret", "1")
                .header("x-kept", "1")
                .header("host", "example.com")
        });
        prepare(&mut p, ForwardedPolicy::Overwrite, false);
        for gone in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "x-secret",
        ] {
            assert!(!p.headers.contains_key(gone), "{gone} should be stripped");
        }
        assert_eq!(p.headers["x-kept"], "1");
        assert_eq!(p.headers["host"], "example.com");
    }

    #[test]
    fn every_connection_line_is_honoured() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("close, X-One"));
        headers.append(CONNECTION, HeaderValue::from_static(" ,x-two"));
        for name in ["x-one", "x-two", "x-kept"] {
            headers.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut headers, false, ClientClaims::Keep);
        assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn overwrite_replaces_spoofed_forwarding_headers() {
        let mut p = parts(|b| {
            b.header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-proto", "http")
                .header("x-forwarded-host", "evil")
                .header("x-forwarded-port", "1")
                .header("forwarded", "for=6.6.6.6")
                .header("host", "app.local:8443")
        });
        prepare(&mut p, ForwardedPolicy::Overwrite, false);
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(p.headers["x-forwarded-proto"], "https");
        assert_eq!(p.headers["x-forwarded-host"], "app.local:8443");
        assert!(!p.headers.contains_key("x-forwarded-port"));
        assert!(!p.headers.contains_key("forwarded"));
        assert_eq!(p.headers.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn client_identity_claims_are_stripped_under_every_policy() {
        for policy in [ForwardedPolicy::Overwrite, ForwardedPolicy::Trust] {
            let mut p = parts(|b| b.header("x-client-cert-subject", "CN=admin"));
            prepare(&mut p, policy, false);
            assert!(!p.headers.contains_key("x-client-cert-subject"), "{policy:?}");
        }
        let mut response = HeaderMap::new();
        response.insert(X_CLIENT_CERT_SUBJECT, HeaderValue::from_static("CN=app"));
        strip_hop_by_hop(&mut response, false, ClientClaims::Keep);
        assert!(response.contains_key(X_CLIENT_CERT_SUBJECT));
    }

    #[test]
    fn trust_appends_peer_and_keeps_claims() {
        let mut p = parts(|b| {
            b.header("x-forwarded-for", "203.0.113.1")
                .header("x-forwarded-for", "198.51.100.2")
                .header("x-forwarded-proto", "http")
                .header("host", "h")
        });
        prepare(&mut p, ForwardedPolicy::Trust, false);
        assert_eq!(p.headers["x-forwarded-for"], "203.0.113.1, 198.51.100.2, 192.0.2.7");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "h");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut p = parts(|b| b.uri("https://example.com:8443/x").version(http::Version::HTTP_2));
        prepare(&mut p, ForwardedPolicy::Overwrite, false);
        assert_eq!(p.headers["host"], "example.com:8443");
        assert_eq!(p.headers["x-forwarded-host"], "example.com:8443");
    }

    #[test]
    fn upgrade_survives_when_switching_protocols() {
        let mut p = parts(|b| b.header("connection", "Upgrade").header("upgrade", "websocket").header("host", "h"));
        assert!(ConnectionOptions::of(&p.headers).wants_upgrade(&p.headers));
        prepare(&mut p, ForwardedPolicy::Overwrite, true);
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["connection"], "upgrade");
    }

    #[test]
    fn a_close_token_on_any_connection_line_asks_to_close() {
        let asks_to_close = |p: Parts| ConnectionOptions::of(&p.headers).close;
        assert!(asks_to_close(parts(|b| b.header("connection", "Close"))));
        assert!(asks_to_close(parts(|b| b.header("connection", "keep-alive").header("connection", "te, close"))));
        assert!(!asks_to_close(parts(|b| b.header("connection", "keep-alive, closed"))));
        assert!(!asks_to_close(parts(|b| b.header("x-connection", "close"))));
    }

    #[test]
    fn upgrade_needs_both_fields() {
        let wants_upgrade = |p: Parts| ConnectionOptions::of(&p.headers).wants_upgrade(&p.headers);
        assert!(!wants_upgrade(parts(|b| b.header("upgrade", "websocket"))));
        assert!(!wants_upgrade(parts(|b| b.header("connection", "keep-alive"))));
        assert!(wants_upgrade(parts(|b| b.header("connection", "keep-alive, Upgrade").header("upgrade", "h2c"))));
    }
}
