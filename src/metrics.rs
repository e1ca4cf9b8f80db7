//! Prometheus metrics (prometheus-client). Hot-path metrics are process-wide handles resolved
//! once, so counting a request is an atomic add; values that are cheaper to read than to keep
//! (certificate expiry, reload and sync state) are computed at scrape time by a collector.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{StatusCode, Version};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::reload::LiveState;
use crate::sync::SyncManager;

type Labels2 = [(&'static str, &'static str); 2];
type Labels1 = [(&'static str, &'static str); 1];

const VERSIONS: [&str; 3] = ["1.0", "1.1", "2"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a TLS handshake failed, as a bounded set of label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
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
    pub fn of(error: &std::io::Error) -> HandshakeFailure {
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
pub enum UpstreamFailure {
    Connect,
    Timeout,
    /// The connection broke, the upstream answered with something that is not HTTP, or it cut
    /// a response body short.
    Other,
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
        }
    }

    /// An access-log line lost because the writer could not keep up.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// A listener's accept failed (out of file descriptors or the like).
    pub fn accept_failed(&self) {
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

    pub fn upstream_failure(&self, failure: UpstreamFailure) {
        self.upstream_failures[failure as usize].inc();
    }

    pub fn handshake_ok(&self) {
        self.handshakes.inc();
    }

    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].inc();
    }

    /// Counts a connection as open until the returned guard drops.
    pub fn connection_opened(&'static self) -> OpenConnection {
        self.connections_total.inc();
        self.connections_open.inc();
        OpenConnection(self)
    }
}

pub struct OpenConnection(&'static Metrics);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// A registry with every metric of this process, for the admin API's `/metrics`.
pub fn registry(live: Option<Arc<LiveState>>, sync: Option<Arc<SyncManager>>) -> Registry {
    let m = metrics();
    let mut registry = Registry::with_prefix("sidecar");
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
    registry.register(
        "accept_failures",
        "Failed accepts on the proxy's listeners: out of file descriptors (see max_fds) or the like",
        m.accept_failures.clone(),
    );
    registry.register_collector(Box::new(LiveCollector { live, sync }));
    registry
}

/// Encodes the registry as Prometheus/OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// Values read at scrape time from the live state.
struct LiveCollector {
    live: Option<Arc<LiveState>>,
    sync: Option<Arc<SyncManager>>,
}

impl std::fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCollector").finish_non_exhaustive()
    }
}

fn gauge_family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn plain_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter_family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // As Prometheus clients' process_open_fds and process_max_fds: alert before accepts fail.
        if let Some(open) = crate::open_files::open_count() {
            plain_gauge(&mut encoder, "open_fds", "File descriptors the process holds", open as f64)?;
        }
        if let Some(max) = crate::open_files::soft_limit() {
            plain_gauge(&mut encoder, "max_fds", "The process's open-file limit (soft RLIMIT_NOFILE)", max as f64)?;
        }
        if let Some(live) = &self.live {
            let now = time::OffsetDateTime::now_utc();
            let tls = live.tls.current();
            let expiry: Vec<(Vec<(&str, String)>, f64)> = tls
                .certs()
                .map(|c| {
                    let labels = vec![
                        ("file", c.cert_path.display().to_string()),
                        ("subject", c.info.subject.clone()),
                        ("serial", c.info.serial.clone()),
                    ];
                    (labels, (c.info.not_after - now).as_seconds_f64())
                })
                .collect();
            gauge_family(
                &mut encoder,
                "certificate_expiry",
                "Seconds until each served certificate expires",
                Some(&Unit::Seconds),
                &expiry,
            )?;

            let stats = &live.stats;
            let relaxed = Ordering::Relaxed;
            let reloads = [
                ([("kind", "config"), ("result", "ok")], stats.config_ok.load(relaxed)),
                ([("kind", "config"), ("result", "failed")], stats.config_failed.load(relaxed)),
                ([("kind", "tls"), ("result", "ok")], stats.tls_ok.load(relaxed)),
                ([("kind", "tls"), ("result", "failed")], stats.tls_failed.load(relaxed)),
            ];
            counter_family(
                &mut encoder,
                "reloads",
                "Reloads of certificates (tls) and of the config file, by result",
                &reloads,
            )?;
        }
        if let Some(sync) = &self.sync {
            let statuses = sync.statuses();
            let name = |s: &crate::sync::status::DestStatus| vec![("destination", s.name.clone())];
            let synced: Vec<_> = statuses
                .iter()
                .map(|s| (name(s), f64::from(u8::from(s.state == crate::sync::status::SyncState::Synced))))
                .collect();
            gauge_family(
                &mut encoder,
                "sync_synced",
                "1 when the destination holds what the source holds",
                None,
                &synced,
            )?;
            let last: Vec<_> = statuses
                .iter()
                .filter_map(|s| {
                    let at = s.last_sync.as_deref()?;
                    let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
                    Some((name(s), at.unix_timestamp() as f64))
                })
                .collect();
            gauge_family(
                &mut encoder,
                "sync_last_success_timestamp",
                "When the destination was last in sync",
                Some(&Unit::Seconds),
                &last,
            )?;
            let failures: Vec<_> =
                statuses.iter().map(|s| (name(s), s.counters.source_errors + s.counters.refused)).collect();
            counter_family(&mut encoder, "sync_failures", "Source errors and refused values", &failures)?;
            let rollbacks: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.rollbacks)).collect();
            counter_family(
                &mut encoder,
                "sync_rollbacks",
                "Versions rolled back because the app became unhealthy",
                &rollbacks,
            )?;
            let kills: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.kills)).collect();
            counter_family(
                &mut encoder,
                "sync_kills",
                "Times the app was terminated because even the last good version left it unhealthy",
                &kills,
            )?;
            let writes: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.writes)).collect();
            counter_family(&mut encoder, "sync_writes", "New versions written to the destination", &writes)?;
        }
        Ok(())
    }
}
