//! `/metrics`: the process-wide counters of `metrics`, and what is read at scrape time from the
//! roles' live state (certificate expiry, reloads, sync destinations, open files).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics;
use crate::server::LiveState;
use crate::sync::status::{DestStatus, SyncState};
use crate::sync::SyncManager;
use crate::sys::{open_files, process_stats};

/// A registry with every metric of this process: the standard `process_*` ones, and the
/// sidecar's own under `sidecar_`.
pub(crate) fn registry(live: Option<Arc<LiveState>>, sync: Option<Arc<SyncManager>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    let sidecar = registry.sub_registry_with_prefix("sidecar");
    metrics::register(sidecar);
    sidecar.register_collector(Box::new(LiveCollector { live, sync }));
    registry
}

/// The metrics every Prometheus client library exports under these names (dashboards and
/// alerts expect them), and the build's version.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        gauge_family(
            &mut encoder,
            "sidecar_build_info",
            "1, labelled with the build's version",
            None,
            &[(version, 1.0)],
        )?;
        if let Some(stats) = process_stats::read() {
            let cpu = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(stats.cpu_seconds).encode(cpu)?;
            let rss = stats.resident_bytes as f64;
            unit_gauge(&mut encoder, "process_resident_memory", "Resident memory size", Unit::Bytes, rss)?;
            let start = stats.start_time_seconds;
            let help = "Start time of the process since the Unix epoch";
            unit_gauge(&mut encoder, "process_start_time", help, Unit::Seconds, start)?;
        }
        // Alert before accepts fail: open_fds nearing max_fds.
        if let Some(open) = open_files::open_count() {
            plain_gauge(&mut encoder, "process_open_fds", "Number of open file descriptors", open as f64)?;
        }
        if let Some(max) = open_files::soft_limit() {
            plain_gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors (soft RLIMIT_NOFILE)",
                max as f64,
            )?;
        }
        Ok(())
    }
}

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exposition {
    /// Prometheus text format 0.0.4: what `text/plain`, `*/*` or no Accept header gets, and
    /// what `promtool check metrics` and most non-Prometheus scrapers read.
    Text,
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics only when the Accept header prefers it (by q-value) to `text/plain`.
    pub(crate) fn negotiate(accept: Option<&str>) -> Exposition {
        let (mut open_metrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("").to_ascii_lowercase();
            let q = params.filter_map(|p| p.strip_prefix("q=")).find_map(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= text {
            Exposition::OpenMetrics
        } else {
            Exposition::Text
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Exposition::Text => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes the registry in `format`.
pub(crate) fn encode(registry: &Registry, format: Exposition) -> String {
    let mut text = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    match format {
        Exposition::OpenMetrics => text,
        Exposition::Text => open_metrics_to_text(&text),
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4: a counter family
/// is named after its `_total` sample there (else promtool and the 0.0.4 parsers see an
/// untyped metric without help), and there are no UNIT lines, `unknown` type or `# EOF`.
fn open_metrics_to_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open_metrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut text = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        let rewritten = if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // 0.0.4 escapes only backslash and newline in help text.
            let help = help.replace("\\\"", "\"");
            let suffix = if counters.contains(name) { "_total" } else { "" };
            format!("# HELP {name}{suffix} {help}")
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match kind {
                "counter" => format!("# TYPE {name}_total counter"),
                "unknown" => format!("# TYPE {name} untyped"),
                _ => line.to_owned(),
            }
        } else {
            line.to_owned()
        };
        text.push_str(&rewritten);
        text.push('\n');
    }
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

/// A gauge without labels, in `unit`.
fn unit_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Unit,
    value: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, Some(&unit), MetricType::Gauge)?)
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

            let counts = live.stats.counts();
            let reloads = [
                ([("kind", "config"), ("result", "ok")], counts.config_ok),
                ([("kind", "config"), ("result", "failed")], counts.config_failed),
                ([("kind", "tls"), ("result", "ok")], counts.tls_ok),
                ([("kind", "tls"), ("result", "failed")], counts.tls_failed),
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
            let name = |s: &DestStatus| vec![("destination", s.name.clone())];
            let synced: Vec<_> =
                statuses.iter().map(|s| (name(s), f64::from(u8::from(s.state == SyncState::Synced)))).collect();
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
            let refused: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.refused_signals)).collect();
            counter_family(
                &mut encoder,
                "sync_refused_signals",
                "Signals not sent because the pid file named a process that is not the app",
                &refused,
            )?;
            let writes: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.writes)).collect();
            counter_family(&mut encoder, "sync_writes", "New versions written to the destination", &writes)?;
            let coalesced: Vec<_> = statuses.iter().map(|s| (name(s), s.counters.coalesced)).collect();
            counter_family(
                &mut encoder,
                "sync_coalesced",
                "Changes replaced by a newer one while waiting for their paced apply (--max-apply-rate, --apply-jitter)",
                &coalesced,
            )?;
        }
        Ok(())
    }
}
