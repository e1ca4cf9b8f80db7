//! The process-wide counters (prometheus-client), resolved once, so counting a request is an
//! atomic add. Values that are cheaper to read than to keep (certificate expiry, reload and sync
//! state, open files) are computed at scrape time by a collector that the admin API registers
//! beside these: this module imports nothing from the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use http::{StatusCode, Version};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

type Labels2 = [(&'static str, &'static str); 2];
type Labels1 = [(&'static str, &'static str); 1];

const VERSIONS: [&str; 3] = ["1.0", "1.1", "2"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a TLS handshake failed, as a bounded set of label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    Timeout,
    /// The client went away mid-handshake.
    Eof,
    /// No common protocol version, cipher suite, ALPN protocol, or similar.
    Incompatible,
    /// A client certificate was missing or did not verify (mutual TLS).
    ClientCertificate,
    /// The client sent an alert (typically: it does not trust our certificate).
    AlertReceived,
    /// Not TLS, or TLS broken in transit.
    Protocol,
    Io,
    /// With --proxy-protocol: no valid PROXY header came before the handshake.
    ProxyHeader,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Eof,
        HandshakeFailure::Incompatible,
        HandshakeFailure::ClientCertificate,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
        HandshakeFailure::ProxyHeader,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Eof => "eof",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
            HandshakeFailure::ProxyHeader => "proxy_protocol",
        }
    }

    /// Classifies the error tokio-rustls returns from `accept`.
    pub(crate) fn of(error: &std::io::Error) -> HandshakeFailure {
        use rustls::Error as E;
        match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(E::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
            Some(E::NoCertificatesPresented | E::InvalidCertificate(_)) => HandshakeFailure::ClientCertificate,
            Some(E::AlertReceived(_)) => HandshakeFailure::AlertReceived,
            Some(_) => HandshakeFailure::Protocol,
            None if error.kind() == std::io::ErrorKind::UnexpectedEof => HandshakeFailure::Eof,
            None if error.kind() == std::io::ErrorKind::InvalidData => HandshakeFailure::Protocol,
            None => HandshakeFailure::Io,
        }
    }
}

/// Upstream failures, as a bounded set of label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamFailure {
    Connect,
    Timeout,
    /// The connection broke, the upstream answered with something that is not HTTP, or it cut
    /// a response body short.
    Other,
}

/// Faults of clients, by what the proxy saw: answered or cut off by hyper, timed out, cancelled
/// or capped. Never counted as upstream failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// A request head hyper could not parse (it answered 400).
    BadRequest,
    /// A request head over `--max-header-size` (hyper answered 431).
    HeaderTooLarge,
    /// An HTTP/2 protocol error or flood, ended with GOAWAY.
    H2Protocol,
    /// A request the client cancelled (HTTP/2 reset, or closed the connection) before its
    /// response head.
    StreamCancelled,
    HeaderReadTimeout,
    IdleTimeout,
    /// No byte moved for the idle timeout with a response in flight: closed at once.
    Stalled,
    /// The connection reached `--max-requests-per-connection`.
    RequestCap,
    /// The client's request body failed: aborted, or malformed chunked framing.
    RequestBody,
}

impl ClientFault {
    pub(crate) const ALL: [ClientFault; 9] = [
        ClientFault::BadRequest,
        ClientFault::HeaderTooLarge,
        ClientFault::H2Protocol,
        ClientFault::StreamCancelled,
        ClientFault::HeaderReadTimeout,
        ClientFault::IdleTimeout,
        ClientFault::Stalled,
        ClientFault::RequestCap,
        ClientFault::RequestBody,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            ClientFault::BadRequest => "bad_request",
            ClientFault::HeaderTooLarge => "header_too_large",
            ClientFault::H2Protocol => "h2_protocol",
            ClientFault::StreamCancelled => "stream_cancelled",
            ClientFault::HeaderReadTimeout => "header_read_timeout",
            ClientFault::IdleTimeout => "idle_timeout",
            ClientFault::Stalled => "stalled",
            ClientFault::RequestCap => "request_cap",
            ClientFault::RequestBody => "request_body",
        }
    }
}

/// The client-fault counters, apart so that they merge as one block.
struct ClientFaults {
    counters: [Counter; 9],
    family: Family<Labels1, Counter>,
}

impl ClientFaults {
    fn new() -> ClientFaults {
        let family = Family::<Labels1, Counter>::default();
        let counters = ClientFault::ALL.map(|fault| family.get_or_create(&[("reason", fault.label())]).clone());
        ClientFaults { counters, family }
    }
}

pub struct Metrics {
    requests: [[Counter; 5]; 3],
    requests_family: Family<Labels2, Counter>,
    request_duration: Histogram,
    upstream_failures: [Counter; 3],
    upstream_failures_family: Family<Labels1, Counter>,
    connections_open: Gauge,
    connections_total: Counter,
    handshakes: Counter,
    handshake_failures: [Counter; 8],
    handshake_failures_family: Family<Labels1, Counter>,
    access_log_dropped: Counter,
    accept_failures: Counter,
    traffic: Traffic,
    client_faults: ClientFaults,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let requests_family = Family::<Labels2, Counter>::default();
        let requests = VERSIONS.map(|version| {
            CLASSES.map(|class| requests_family.get_or_create(&[("version", version), ("code", class)]).clone())
        });
        let upstream_failures_family = Family::<Labels1, Counter>::default();
        let upstream_failures = ["connect", "timeout", "other"]
            .map(|kind| upstream_failures_family.get_or_create(&[("kind", kind)]).clone());
        let handshake_failures_family = Family::<Labels1, Counter>::default();
        let handshake_failures = HandshakeFailure::ALL
            .map(|reason| handshake_failures_family.get_or_create(&[("reason", reason.label())]).clone());
        Metrics {
            requests,
            requests_family,
            // 0.5 ms to ~33 s.
            request_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
            upstream_failures,
            upstream_failures_family,
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            handshakes: Counter::default(),
            handshake_failures,
            handshake_failures_family,
            access_log_dropped: Counter::default(),
            accept_failures: Counter::default(),
            traffic: Traffic::default(),
            client_faults: ClientFaults::new(),
        }
    }

    /// An access-log line lost because the writer could not keep up.
    pub(crate) fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// A listener's accept failed (out of file descriptors or the like).
    pub(crate) fn accept_failed(&self) {
        self.accept_failures.inc();
    }

    /// One request answered (by the upstream or by the proxy itself), with the time until its
    /// response head was ready.
    pub fn request(&self, version: Version, status: StatusCode, elapsed: Duration) {
        let version = match version {
            Version::HTTP_2 => 2,
            Version::HTTP_10 | Version::HTTP_09 => 0,
            _ => 1,
        };
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[version][class].inc();
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn upstream_failure(&self, failure: UpstreamFailure) {
        self.upstream_failures[failure as usize].inc();
    }

    pub(crate) fn handshake_ok(&self) {
        self.handshakes.inc();
    }

    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].inc();
    }

    pub(crate) fn client_fault(&self, fault: ClientFault) {
        self.client_faults.counters[fault as usize].inc();
    }

    /// Counts a connection as open until the returned guard drops.
    pub(crate) fn connection_opened(&'static self) -> OpenConnection {
        self.connections_total.inc();
        self.connections_open.inc();
        OpenConnection(self)
    }
}

pub(crate) struct OpenConnection(&'static Metrics);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// Body bytes each way and the upstream's response time: atomic adds, no lock, since they are
/// counted for every request (benches/hot_path.rs times each beside `request`).
#[derive(Default)]
struct Traffic {
    request_bytes: Counter,
    response_bytes: Counter,
    upstream_response: AtomicHistogram,
}

impl Metrics {
    /// Request body bytes read from a client and passed on to the upstream.
    pub fn request_body_bytes(&self, n: usize) {
        self.traffic.request_bytes.inc_by(n as u64);
    }

    /// Response body bytes read from the upstream and passed on to a client.
    pub fn response_body_bytes(&self, n: usize) {
        self.traffic.response_bytes.inc_by(n as u64);
    }

    /// A response head from the upstream, `elapsed` after the request arrived.
    pub fn upstream_response(&self, elapsed: Duration) {
        self.traffic.upstream_response.observe(elapsed);
    }
}

/// A histogram of durations with the buckets of `http_request_duration` (0.5 ms to ~33 s,
/// doubling), kept in atomics: prometheus-client's `Histogram` takes a lock per observation.
#[derive(Default)]
struct AtomicHistogram {
    /// Per bucket, not cumulative; the last is +Inf.
    buckets: [AtomicU64; HISTOGRAM_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

const HISTOGRAM_BUCKETS: usize = 17;
const HISTOGRAM_FIRST_NANOS: u64 = 500_000;

impl AtomicHistogram {
    fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Bucket i holds values up to 0.5 ms × 2^i.
        let halves = nanos.div_ceil(HISTOGRAM_FIRST_NANOS);
        let index = if halves <= 1 { 0 } else { (64 - (halves - 1).leading_zeros()) as usize };
        self.buckets[index.min(HISTOGRAM_BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, count)| {
                let bound =
                    if i == HISTOGRAM_BUCKETS { f64::INFINITY } else { (HISTOGRAM_FIRST_NANOS << i) as f64 / 1e9 };
                (bound, count.load(Ordering::Relaxed))
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicHistogram").finish_non_exhaustive()
    }
}

/// A registered metric must be cloneable; the histogram lives in the process-wide `Metrics`.
#[derive(Debug, Clone, Copy)]
struct UpstreamResponseTime;

impl EncodeMetric for UpstreamResponseTime {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        metrics().traffic.upstream_response.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn register_traffic(registry: &mut Registry) {
    let traffic = &metrics().traffic;
    registry.register_with_unit(
        "http_request_body",
        "Request body bytes read from clients and sent to the upstream",
        Unit::Bytes,
        traffic.request_bytes.clone(),
    );
    registry.register_with_unit(
        "http_response_body",
        "Response body bytes read from the upstream and sent to clients",
        Unit::Bytes,
        traffic.response_bytes.clone(),
    );
    registry.register_with_unit(
        "upstream_response_duration",
        "Time from a request's arrival until the upstream's response head (requests the upstream answered)",
        Unit::Seconds,
        UpstreamResponseTime,
    );
}

/// Registers the process-wide counters in `registry`; values read at scrape time come from
/// collectors registered by whoever owns them.
pub(crate) fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "http_requests",
        "Requests answered, by HTTP version and status class",
        m.requests_family.clone(),
    );
    registry.register_with_unit(
        "http_request_duration",
        "Time from a request's arrival until its response head is ready",
        Unit::Seconds,
        m.request_duration.clone(),
    );
    registry.register(
        "upstream_failures",
        "Upstream requests that failed: connect error, timeout (504) or other",
        m.upstream_failures_family.clone(),
    );
    registry.register("connections_open", "Client connections open now", m.connections_open.clone());
    registry.register("connections", "Client connections accepted", m.connections_total.clone());
    registry.register("tls_handshakes", "TLS handshakes completed", m.handshakes.clone());
    registry.register(
        "tls_handshake_failures",
        "TLS handshakes that failed, by reason",
        m.handshake_failures_family.clone(),
    );
    registry.register(
        "access_log_dropped",
        "Access-log lines dropped because the writer could not keep up",
        m.access_log_dropped.clone(),
    );
    register_traffic(registry);
    registry.register(
        "accept_failures",
        "Failed accepts on the proxy's listeners: out of file descriptors (see process_max_fds) or the like",
        m.accept_failures.clone(),
    );
    registry.register(
        "client_faults",
        "Client faults by reason: requests hyper refused (400, 431), HTTP/2 protocol errors, cancelled \
         requests, timeouts, stalled connections closed, request caps reached, failed request bodies",
        m.client_faults.family.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_histogram_buckets_are_upper_bounds() {
        let h = AtomicHistogram::default();
        for micros in [0, 500, 600, 1000, 1500, 2000, 2100, 40_000_000] {
            h.observe(Duration::from_micros(micros));
        }
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        // <=0.5 ms: 0 and 0.5; <=1 ms: 0.6 and 1.0; <=2 ms: 1.5 and 2.0; <=4 ms: 2.1; +Inf: 40 s.
        assert_eq!(&counts[..4], &[2, 2, 2, 1]);
        assert_eq!(counts[HISTOGRAM_BUCKETS], 1);
        assert_eq!(counts.iter().sum::<u64>(), 8);
    }
}
