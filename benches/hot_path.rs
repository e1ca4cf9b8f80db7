//! Micro-benchmarks of the work the proxy does for every request, outside of I/O and TLS:
//! rewriting the request head, building the upstream URI, loading the config snapshot, and
//! writing the request head to and parsing the response head from the upstream, and counting
//! the request in the process-wide metrics.
//!
//! Run: `cargo bench --bench hot_path` (quick: `-- --warm-up-time 1 --measurement-time 2`).
//! Each iteration gets a freshly built browser-like request head from `iter_batched`, so only
//! the rewrite itself is timed, not building its input.

use arc_swap::ArcSwap;
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Version};
use sidecar::config::{parse_upstream, ForwardedPolicy};
use sidecar::metrics::metrics;
use sidecar::proxy::h1::{encode_request_head, parse_response, HeadReader, RequestFraming};
use sidecar::proxy::headers::{prepare_request, strip_hop_by_hop, ClientClaims};
use std::hint::black_box;

const PEER: HeaderValue = HeaderValue::from_static("192.0.2.7");
const UPSTREAM_HOST: HeaderValue = HeaderValue::from_static("127.0.0.1:8080");

/// Fields a desktop browser sends on a navigation, in its order, minus :authority/Host.
const BROWSER_FIELDS: &[(&str, &str)] = &[
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("accept-language", "en-US,en;q=0.5"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://app.example.com/orders?page=2"),
    ("cookie", "session=4f9c2a7e1b3d4c5e8f90a1b2c3d4e5f6; theme=dark; _ga=GA1.1.123456789.1700000000"),
    ("upgrade-insecure-requests", "1"),
    ("sec-fetch-dest", "document"),
    ("sec-fetch-mode", "navigate"),
    ("sec-fetch-site", "same-origin"),
    ("sec-fetch-user", "?1"),
    ("priority", "u=0, i"),
];

/// An HTTP/1.1 keep-alive request as hyper hands it over: origin-form target, Host, Connection.
fn http1_head() -> Parts {
    let mut builder = Request::builder()
        .method("GET")
        .uri("/orders/1234?expand=items&currency=EUR")
        .version(Version::HTTP_11)
        .header("host", "app.example.com");
    for (name, value) in BROWSER_FIELDS {
        builder = builder.header(*name, *value);
    }
    builder.header("connection", "keep-alive").body(()).unwrap().into_parts().0
}

/// The same request over HTTP/2: absolute target carrying :authority, no Host, no Connection.
fn http2_head() -> Parts {
    let mut builder = Request::builder()
        .method("GET")
        .uri("https://app.example.com/orders/1234?expand=items&currency=EUR")
        .version(Version::HTTP_2);
    for (name, value) in BROWSER_FIELDS {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

/// The HTTP/1.1 request as it arrives behind a load balancer that already set X-Forwarded-*.
fn forwarded_head() -> Parts {
    let mut parts = http1_head();
    let headers = &mut parts.headers;
    headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
    headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    headers.insert("x-forwarded-host", HeaderValue::from_static("app.example.com"));
    parts
}

/// An upstream's response head (nginx serving a small file), as it comes on the wire.
const RESPONSE_WIRE: &str = "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 06:00:00 GMT\r\n\
    Content-Type: text/html\r\nContent-Length: 13\r\nLast-Modified: Tue, 24 Nov 2026 20:00:00 GMT\r\n\
    Connection: keep-alive\r\nETag: \"6743a000-d\"\r\nAccept-Ranges: bytes\r\n\r\n";

/// Stand-in for the serving snapshot the server loads per connection/request.
struct Snapshot {
    policy: ForwardedPolicy,
}

fn head_rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("prepare_request");
    let mut case = |name: &str, build: fn() -> Parts, policy: ForwardedPolicy| {
        group.bench_function(name, |b| {
            b.iter_batched(
                build,
                |mut parts| {
                    let added = prepare_request(&mut parts, &PEER, &UPSTREAM_HOST, black_box(policy), false);
                    (parts, added)
                },
                BatchSize::SmallInput,
            )
        });
    };
    case("http1_overwrite", http1_head, ForwardedPolicy::Overwrite);
    case("http2_overwrite", http2_head, ForwardedPolicy::Overwrite);
    case("http1_trust_existing_xff", forwarded_head, ForwardedPolicy::Trust);
    group.finish();

    c.bench_function("strip_hop_by_hop/http1", |b| {
        b.iter_batched(
            http1_head,
            |mut parts| {
                strip_hop_by_hop(&mut parts.headers, false, black_box(ClientClaims::StripAll));
                parts
            },
            BatchSize::SmallInput,
        )
    });
}

fn upstream_uri(c: &mut Criterion) {
    c.bench_function("parse_upstream", |b| b.iter(|| parse_upstream(black_box("http://127.0.0.1:8080"))));
}

fn snapshot_load(c: &mut Criterion) {
    let snapshot = ArcSwap::from_pointee(Snapshot { policy: ForwardedPolicy::Overwrite });
    c.bench_function("arc_swap/load", |b| b.iter(|| black_box(snapshot.load().policy)));
    c.bench_function("arc_swap/load_full", |b| b.iter(|| black_box(snapshot.load_full())));

    // The request side in the order the proxy does it for one request, the head written as it
    // goes upstream (the server takes its snapshot once per connection today; a per-request
    // `load` is the upper bound).
    let mut out = Vec::with_capacity(1024);
    c.bench_function("per_request/http1_total", |b| {
        b.iter_batched(
            http1_head,
            |mut parts| {
                let config = snapshot.load();
                let added = prepare_request(&mut parts, &PEER, &UPSTREAM_HOST, config.policy, false);
                encode_request_head(&parts, &added, RequestFraming::AsGiven, &mut out);
                (parts, out.len())
            },
            BatchSize::SmallInput,
        )
    });
}

fn upstream_wire(c: &mut Criterion) {
    // Parsing includes leaving the hop-by-hop fields out (here `Connection: keep-alive`). On a
    // pooled connection the field names were seen on the response before; on a new one not.
    let mut reader = HeadReader::default();
    c.bench_function("h1/parse_response", |b| {
        b.iter_batched(
            || BytesMut::from(RESPONSE_WIRE),
            |mut wire| {
                parse_response(&mut wire, black_box(&Method::GET), 64 * 1024, &mut reader)
                    .map(|head| head.map(|h| h.headers))
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("h1/parse_response/new_connection", |b| {
        b.iter_batched(
            || BytesMut::from(RESPONSE_WIRE),
            |mut wire| {
                let mut reader = HeadReader::default();
                parse_response(&mut wire, black_box(&Method::GET), 64 * 1024, &mut reader)
                    .map(|head| head.map(|h| h.headers))
            },
            BatchSize::SmallInput,
        )
    });
    let mut parts = http1_head();
    let added = prepare_request(&mut parts, &PEER, &UPSTREAM_HOST, ForwardedPolicy::Overwrite, false);
    let mut out = Vec::with_capacity(1024);
    c.bench_function("h1/encode_request_head", |b| {
        b.iter(|| {
            encode_request_head(black_box(&parts), &added, RequestFraming::AsGiven, &mut out);
            out.len()
        })
    });
}

/// What each per-request metric costs, one call at a time: `request` (the status counter and the
/// duration histogram, there before) beside the body byte counters and the upstream histogram.
fn metrics_per_request(c: &mut Criterion) {
    let m = metrics();
    let elapsed = std::time::Duration::from_micros(1800);
    c.bench_function("metrics/request", |b| {
        b.iter(|| m.request(Version::HTTP_11, black_box(http::StatusCode::OK), black_box(elapsed)))
    });
    c.bench_function("metrics/request_body_bytes", |b| b.iter(|| m.request_body_bytes(black_box(512))));
    c.bench_function("metrics/response_body_bytes", |b| b.iter(|| m.response_body_bytes(black_box(16384))));
    c.bench_function("metrics/upstream_response", |b| b.iter(|| m.upstream_response(black_box(elapsed))));
}

criterion_group!(benches, head_rewrite, upstream_uri, snapshot_load, upstream_wire, metrics_per_request);
criterion_main!(benches);
