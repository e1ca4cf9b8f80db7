//! Fleet-aware sync: the instances that sync one key coordinate through etcd, with no
//! coordinator of their own. Under `PREFIX<name>/`:
//!
//! - `instances/<instance>`: each instance's status (JSON), under a lease of its own, so that
//!   it vanishes when the instance dies; written again on every state change ([`agent`]).
//! - `rejected/<hash>/<instance>`: one key per instance that rolled `<hash>` back as unhealthy,
//!   so that N rejections by N instances count as N.
//! - `seen/<hash>`: when the fleet first saw `<hash>`, created by the first instance in a
//!   transaction; the waves count from it ([`gate`]).
//!
//! Before applying a version the worker asks [`gate::FleetGate`]: apply, wait (a later wave),
//! or not at all (rejected by enough instances). etcd being unreachable never blocks a version
//! that passed the local checks, except one already known to be rejected.

pub(crate) mod agent;
pub(crate) mod gate;
pub(crate) mod gateway;
pub(crate) mod rollback;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};

use super::hash::content_hash;
use super::spec::{parse_source, SourceSpec};
use gateway::{EtcdGateway, GatewayError, GatewayOptions};

/// `--fleet etcd://HOST:PORT/PREFIX/`: where the fleet's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUrl {
    pub(crate) base: Uri,
    /// Ends with `/`.
    pub(crate) prefix: String,
}

impl fmt::Display for FleetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authority = self.base.authority().map(|a| a.as_str()).unwrap_or("");
        write!(f, "etcd {}{}", authority.rsplit('@').next().unwrap_or(authority), self.prefix)
    }
}

/// `etcd://HOST:PORT/PREFIX/` (or `etcd+https://`); a prefix without its closing `/` gets one.
pub(crate) fn parse_fleet_url(s: &str) -> Result<FleetUrl, String> {
    let expected = "expected etcd://HOST:PORT/PREFIX/ (or etcd+https://)";
    if !s.starts_with("etcd://") && !s.starts_with("etcd+http://") && !s.starts_with("etcd+https://") {
        return Err(format!("`{s}`: {expected}"));
    }
    match parse_source(s) {
        Ok(SourceSpec::Etcd { base, key }) => {
            let prefix = if key.ends_with('/') { key } else { format!("{key}/") };
            Ok(FleetUrl { base, prefix })
        }
        Ok(_) => Err(format!("`{s}`: {expected}")),
        Err(e) => Err(format!("{e}; {expected}")),
    }
}

/// An instance id: it is a key segment, so no `/`.
pub(crate) fn parse_instance(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
        && s != "."
        && s != "..";
    valid.then(|| s.to_owned()).ok_or_else(|| {
        format!("`{}`: an instance id holds letters, digits, `.`, `_`, `-` and `:` (a Pod name does)", s.escape_debug())
    })
}

/// This machine's host name (in Kubernetes, the Pod name).
pub(crate) fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// One destination's fleet settings.
#[derive(Debug, Clone)]
pub(crate) struct FleetSpec {
    pub(crate) url: FleetUrl,
    pub(crate) instance: String,
    pub(crate) reject_after: u32,
    pub(crate) waves: u32,
    pub(crate) wave_delay: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) gateway: GatewayOptions,
}

impl FleetSpec {
    pub(crate) fn wave(&self) -> u32 {
        wave_of(&self.instance, self.waves)
    }

    /// Whether `--fleet-password-file`'s password would cross the network in clear text (plain
    /// HTTP to a host that is not loopback): worth a warning, as for a source.
    pub(crate) fn sends_password_in_clear(&self) -> bool {
        let etcd = SourceSpec::Etcd { base: self.url.base.clone(), key: self.url.prefix.clone() };
        self.gateway.auth.sent_in_clear(&etcd)
    }

    /// How long after a version is first seen this instance may apply it.
    pub(crate) fn delay(&self) -> Duration {
        self.wave_delay.saturating_mul(self.wave())
    }
}

/// The wave of `instance` among `waves`: its SHA-256, as a number, modulo `waves`. Stable
/// across restarts, releases and machines.
pub fn wave_of(instance: &str, waves: u32) -> u32 {
    let hash = content_hash(instance.as_bytes());
    let number = u64::from_str_radix(&hash[..16], 16).unwrap_or(0);
    (number % u64::from(waves.max(1))) as u32
}

/// The keys of destination `name` under `prefix`.
pub(crate) struct Keys {
    root: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str) -> Keys {
        Keys { root: format!("{prefix}{name}/") }
    }

    pub(crate) fn instance(&self, instance: &str) -> String {
        format!("{}instances/{instance}", self.root)
    }

    pub(crate) fn rejected(&self, hash: &str) -> String {
        format!("{}rejected/{hash}/", self.root)
    }

    pub(crate) fn seen(&self, hash: &str) -> String {
        format!("{}seen/{hash}", self.root)
    }
}

/// The value of `instances/<instance>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InstanceStatus {
    pub(crate) instance: String,
    pub(crate) wave: u32,
    /// SHA-256 of the file the app runs.
    pub(crate) applied_hash: Option<String>,
    pub(crate) source_revision: Option<String>,
    pub(crate) state: String,
    /// When this state (and version) began.
    pub(crate) since: String,
    pub(crate) last_error: Option<String>,
    /// Whether the app was healthy at the last check; `None` without `--health-url`.
    pub(crate) app_healthy: Option<bool>,
    /// A newer version not applied (yet): waiting for this instance's wave, or rejected.
    #[serde(default)]
    pub(crate) held_back: Option<String>,
    /// The source, as `etcd://HOST:PORT/KEY` when it is etcd: where `sidecar fleet rollback`
    /// writes.
    #[serde(default)]
    pub(crate) source: String,
}

/// The value of `rejected/<hash>/<instance>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Rejection {
    pub(crate) instance: String,
    pub(crate) at: String,
    pub(crate) reason: String,
}

/// A version and the instances that rejected it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RejectedVersion {
    pub(crate) hash: String,
    pub(crate) by: Vec<Rejection>,
}

/// One destination's fleet, as etcd holds it now.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetView {
    pub(crate) name: String,
    pub(crate) instances: Vec<InstanceStatus>,
    pub(crate) rejected: Vec<RejectedVersion>,
}

/// Reads the fleet of `name` (or of every destination under the prefix), sorted by name and
/// instance. Keys whose value does not parse are skipped: another program's keys under the
/// prefix must not stop the view.
pub(crate) async fn read_view(
    url: &FleetUrl,
    options: &GatewayOptions,
    name: Option<&str>,
) -> Result<Vec<FleetView>, GatewayError> {
    let mut gateway = EtcdGateway::new(&url.base, options);
    let prefix = match name {
        Some(name) => format!("{}{name}/", url.prefix),
        None => url.prefix.clone(),
    };
    let mut views: BTreeMap<String, FleetView> = BTreeMap::new();
    let mut rejected: BTreeMap<(String, String), Vec<Rejection>> = BTreeMap::new();
    for kv in gateway.get_prefix(&prefix).await? {
        let Some(rest) = kv.key.strip_prefix(&url.prefix) else { continue };
        let parts: Vec<&str> = rest.split('/').collect();
        let view = |views: &mut BTreeMap<String, FleetView>, name: &str| {
            views.entry(name.to_owned()).or_insert_with(|| FleetView {
                name: name.to_owned(),
                instances: Vec::new(),
                rejected: Vec::new(),
            });
        };
        match parts.as_slice() {
            [name, "instances", _] => {
                if let Ok(status) = serde_json::from_slice::<InstanceStatus>(&kv.value) {
                    view(&mut views, name);
                    if let Some(view) = views.get_mut(*name) {
                        view.instances.push(status);
                    }
                }
            }
            [name, "rejected", hash, _] => {
                if let Ok(rejection) = serde_json::from_slice::<Rejection>(&kv.value) {
                    view(&mut views, name);
                    rejected.entry((name.to_string(), hash.to_string())).or_default().push(rejection);
                }
            }
            _ => {}
        }
    }
    for ((name, hash), by) in rejected {
        if let Some(view) = views.get_mut(&name) {
            view.rejected.push(RejectedVersion { hash, by });
        }
    }
    Ok(views.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_urls_parse() {
        let url = parse_fleet_url("etcd://127.0.0.1:2379/fleet").unwrap();
        assert_eq!(url.prefix, "/fleet/");
        assert_eq!(url.base, "http://127.0.0.1:2379/".parse::<Uri>().unwrap());
        assert_eq!(url.to_string(), "etcd 127.0.0.1:2379/fleet/");
        let tls = parse_fleet_url("etcd+https://etcd.example:2379/a/b/").unwrap();
        assert_eq!(tls.base.scheme_str(), Some("https"));
        assert_eq!(tls.prefix, "/a/b/");
        for bad in ["http://h:1/x/", "etcd://h:1", "consul://h:1/x/", "/fleet/"] {
            assert!(parse_fleet_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn waves_are_stable_and_spread() {
        assert_eq!(wave_of("pod-a", 1), 0);
        let waves: Vec<u32> = (0..300).map(|i| wave_of(&format!("app-{i}"), 3)).collect();
        for wave in 0..3 {
            let n = waves.iter().filter(|w| **w == wave).count();
            assert!((70..130).contains(&n), "wave {wave}: {n} of 300");
        }
        assert_eq!(wave_of("app-7", 3), waves[7]);
    }

    #[test]
    fn instance_ids_are_key_segments() {
        assert!(parse_instance("web-7d9f8-abcde").is_ok());
        for bad in ["", "a/b", "..", "a b"] {
            assert!(parse_instance(bad).is_err(), "{bad}");
        }
    }
}
