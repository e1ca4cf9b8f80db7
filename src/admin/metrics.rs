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
use crate::sys::open_files;

/// A registry with every metric of this process.
pub(crate) fn registry(live: Option<Arc<LiveState>>, sync: Option<Arc<SyncManager>>) -> Registry {
    let mut registry = Registry::with_prefix("sidecar");
    metrics::register(&mut registry);
    registry.register_collector(Box::new(LiveCollector { live, sync }));
    registry
}

/// Encodes the registry as Prometheus/OpenMetrics text.
pub(crate) fn encode(registry: &Registry) -> String {
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
        if let Some(open) = open_files::open_count() {
            plain_gauge(&mut encoder, "open_fds", "File descriptors the process holds", open as f64)?;
        }
        if let Some(max) = open_files::soft_limit() {
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
        }
        Ok(())
    }
}
