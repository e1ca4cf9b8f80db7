//! The worker's side of the fleet: "may I apply this version now?" before a write, "record
//! that I rejected it" after an unhealthy rollback, "my state changed" for the status key.
//!
//! When a version was first seen: the first instance to see it creates `seen/<hash>` in a
//! transaction, holding its wall-clock time. Clocks differ between machines, so each instance
//! counts its wave's delay on its own monotonic clock from when it first saw the version, and
//! takes credit from the stored time only beyond [`MAX_CLOCK_SKEW`]: a clock that runs ahead
//! by less than that cannot make a later wave apply before the earlier ones had their time,
//! while an instance started long after a version's rollout does not wait for it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::agent::{PendingWrite, StatusPublisher};
use super::gateway::{EtcdGateway, GatewayError};
use super::{FleetSpec, Keys, Rejection};
use crate::sync::history::now_rfc3339;
use crate::sync::spec::{SourceSpec, SyncSpec};
use crate::sync::status::DestStatus;
use crate::sync::status::FleetStatus;
use crate::sys::lock;

/// How far apart the instances' clocks may be, at most, for the stored first-seen time to
/// shorten a wave's wait.
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The answer to "may I apply this version now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gate {
    Apply,
    /// Not before then: this instance's wave has not come yet.
    WaitUntil(Instant, String),
    /// Rejected by enough instances of the fleet: not applied.
    Rejected(String),
}

/// The value of `seen/<hash>`.
#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    at_unix_ms: u64,
    by: String,
}

/// How long to wait from now for a wave `delay` after a version whose first sighting is `age`
/// old by this machine's clock: the age counts only beyond [`MAX_CLOCK_SKEW`].
fn wave_wait(delay: Duration, age: Duration) -> Duration {
    delay - age.saturating_sub(MAX_CLOCK_SKEW).min(delay)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

pub(crate) struct FleetGate {
    gateway: EtcdGateway,
    spec: Arc<FleetSpec>,
    keys: Keys,
    name: String,
    status: Arc<Mutex<DestStatus>>,
    changed: Arc<Notify>,
    writes: mpsc::UnboundedSender<PendingWrite>,
    /// Versions seen rejected by the fleet: still refused while etcd cannot be asked.
    known_rejected: HashSet<String>,
    /// When each version may be applied here.
    due: HashMap<String, Instant>,
    /// The version `held_back` is about.
    held: Option<String>,
}

/// The gate for the worker and the publisher for its own task, for a destination with
/// `--fleet`.
pub(crate) fn attach(spec: &SyncSpec, status: &Arc<Mutex<DestStatus>>) -> Option<(FleetGate, StatusPublisher)> {
    let fleet = Arc::new(spec.fleet.clone()?);
    let changed = Arc::new(Notify::new());
    let (writes, pending) = mpsc::unbounded_channel();
    lock(status).fleet = Some(FleetStatus {
        fleet: fleet.url.to_string(),
        instance: fleet.instance.clone(),
        wave: fleet.wave(),
        held_back: None,
        published: false,
        etcd_error: None,
    });
    let source = match &spec.source {
        SourceSpec::Etcd { base, key } => {
            let scheme = if base.scheme_str() == Some("https") { "etcd+https" } else { "etcd" };
            let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
            format!("{scheme}://{}{key}", authority.rsplit('@').next().unwrap_or(authority))
        }
        other => other.to_string(),
    };
    let keys = || Keys::new(&fleet.url.prefix, &spec.name);
    let gate = FleetGate {
        gateway: EtcdGateway::new(&fleet.url.base, &fleet.gateway),
        spec: fleet.clone(),
        keys: keys(),
        name: spec.name.clone(),
        status: status.clone(),
        changed: changed.clone(),
        writes,
        known_rejected: HashSet::new(),
        due: HashMap::new(),
        held: None,
    };
    let publisher = StatusPublisher {
        gateway: EtcdGateway::new(&fleet.url.base, &fleet.gateway),
        spec: fleet.clone(),
        keys: keys(),
        name: spec.name.clone(),
        source,
        health_checked: spec.health_url.is_some(),
        status: status.clone(),
        changed,
        writes: pending,
    };
    Some((gate, publisher))
}

impl FleetGate {
    /// The destination's state changed: the status key is written again.
    pub(crate) fn status_changed(&self) {
        self.changed.notify_one();
    }

    fn set(&self, f: impl FnOnce(&mut FleetStatus)) {
        if let Some(fleet) = lock(&self.status).fleet.as_mut() {
            f(fleet);
        }
    }

    fn unreachable(&self, what: &str, error: &GatewayError) {
        let message = format!("fleet {}: {error}", self.spec.url);
        tracing::warn!("sync {}: {message}; {what}", self.name);
        self.set(|f| f.etcd_error = Some(message));
    }

    /// The source offers `hash`: a note about another version held back is out of date.
    pub(crate) fn offered(&self, hash: &str) {
        if self.held.as_deref().is_some_and(|held| held != hash) {
            self.set(|f| f.held_back = None);
        }
    }

    /// Asked right before a version from the source is written (again after each wait).
    pub(crate) async fn may_apply(&mut self, hash: &str) -> Gate {
        let gate = self.decide(hash).await;
        let held = match &gate {
            Gate::Apply => None,
            Gate::WaitUntil(_, why) | Gate::Rejected(why) => Some(why.clone()),
        };
        self.held = held.is_some().then(|| hash.to_owned());
        self.set(|f| f.held_back = held);
        gate
    }

    async fn decide(&mut self, hash: &str) -> Gate {
        let threshold = self.spec.reject_after;
        match self.gateway.count_prefix(&self.keys.rejected(hash)).await {
            Ok(count) if count >= u64::from(threshold) => {
                self.known_rejected.insert(hash.to_owned());
                return Gate::Rejected(format!(
                    "version {} was rejected by {count} instance(s) of the fleet (--fleet-reject-after {threshold}); the last good version stays",
                    short(hash)
                ));
            }
            Ok(_) => {}
            Err(e) if self.known_rejected.contains(hash) => {
                self.unreachable("the version is known to be rejected: not applied", &e);
                return Gate::Rejected(format!(
                    "version {} was rejected by the fleet before (etcd cannot be asked again now); the last good version stays",
                    short(hash)
                ));
            }
            Err(e) => self.unreachable("applying on the local checks alone", &e),
        }
        let delay = self.spec.delay();
        if delay.is_zero() {
            return Gate::Apply;
        }
        let due = match self.due.get(hash) {
            Some(due) => *due,
            None => {
                let due = self.first_due(hash, delay).await;
                if self.due.len() > 64 {
                    self.due.clear();
                }
                self.due.insert(hash.to_owned(), due);
                due
            }
        };
        let now = Instant::now();
        if now >= due {
            return Gate::Apply;
        }
        let wait = humantime::format_duration(Duration::from_secs((due - now).as_secs().max(1)));
        Gate::WaitUntil(
            due,
            format!(
                "version {} waits for wave {} of {} (--fleet-wave-delay {} per wave): applied in about {wait} unless the fleet rejects it meanwhile",
                short(hash),
                self.spec.wave(),
                self.spec.waves,
                humantime::format_duration(self.spec.wave_delay)
            ),
        )
    }

    /// When this instance may apply `hash`, counted from its first sighting in the fleet.
    async fn first_due(&mut self, hash: &str, delay: Duration) -> Instant {
        let now = Instant::now();
        let mine =
            serde_json::to_vec(&Seen { at_unix_ms: unix_ms(), by: self.spec.instance.clone() }).unwrap_or_default();
        let age = match self.gateway.create_or_get(&self.keys.seen(hash), &mine).await {
            Ok(value) => match serde_json::from_slice::<Seen>(&value) {
                Ok(seen) => Duration::from_millis(unix_ms().saturating_sub(seen.at_unix_ms)),
                Err(_) => Duration::ZERO,
            },
            Err(e) => {
                self.unreachable("the wave's delay counts from now", &e);
                Duration::ZERO
            }
        };
        now + wave_wait(delay, age)
    }

    /// After this instance rolled `hash` back as unhealthy: `rejected/<hash>/<instance>`. A
    /// write that fails is retried by the status task until etcd takes it.
    pub(crate) async fn record_rejection(&mut self, hash: &str, reason: &str) {
        self.known_rejected.insert(hash.to_owned());
        let key = format!("{}{}", self.keys.rejected(hash), self.spec.instance);
        let value = serde_json::to_vec(&Rejection {
            instance: self.spec.instance.clone(),
            at: now_rfc3339(),
            reason: reason.to_owned(),
        })
        .unwrap_or_default();
        match self.gateway.put(&key, &value, None).await {
            Ok(_) => tracing::info!("sync {}: fleet: recorded the rejection of {} at {key}", self.name, short(hash)),
            Err(e) => {
                self.unreachable("the rejection is written when etcd answers", &e);
                let _ = self.writes.send((key, value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_ahead_by_less_than_the_skew_allowance_cannot_shorten_a_wave() {
        let delay = Duration::from_secs(120);
        // Just seen, or a clock that runs ahead of the first instance's by up to 30s: full wait.
        assert_eq!(wave_wait(delay, Duration::ZERO), delay);
        assert_eq!(wave_wait(delay, MAX_CLOCK_SKEW), delay);
        // Seen 90s ago by a clock within the allowance: 60s of it count.
        assert_eq!(wave_wait(delay, Duration::from_secs(90)), Duration::from_secs(60));
        // A version rolled out long ago: an instance started now applies it at once.
        assert_eq!(wave_wait(delay, Duration::from_secs(3600)), Duration::ZERO);
    }
}
