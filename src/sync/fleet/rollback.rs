//! `sidecar fleet rollback`: an earlier value of the source key, read at its revision from
//! etcd's history, written back to the key, so that every instance applies it through its
//! normal path (checks, waves, health verification).

use serde::Serialize;

use super::gateway::{EtcdGateway, GatewayError, GatewayOptions, Kv};
use super::{read_view, FleetUrl, Keys};
use crate::sync::hash::content_hash;
use crate::sync::spec::{parse_source, SourceSpec};

/// How many earlier revisions of the key are looked through for a hash.
const MAX_WALK: usize = 1000;

/// What `--to` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackTarget {
    /// An etcd revision: the key's value as it was then.
    Revision(i64),
    /// A SHA-256 (or its first hex digits, at least 6; all digits: at least 12) of a value
    /// the key held.
    Hash(String),
}

pub(crate) fn parse_rollback_target(s: &str) -> Result<RollbackTarget, String> {
    let s = s.trim();
    // Revisions are numbers; the hashes `sidecar fleet status` shows have 12 hex digits.
    if !s.is_empty() && s.len() < 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(RollbackTarget::Revision).map_err(|e| format!("`{s}`: {e}"));
    }
    if s.len() >= 6 && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(RollbackTarget::Hash(s.to_ascii_lowercase()));
    }
    if let Some(number) = s.strip_prefix('r').filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
        return number.parse().map(RollbackTarget::Revision).map_err(|e| format!("`{s}`: {e}"));
    }
    Err(format!(
        "`{s}`: expected an etcd revision (a number, or r123456) or a version hash (6 to 64 hex digits, as `sidecar fleet status` shows)"
    ))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetRollbackError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("revision {revision} of {key} is no longer kept by etcd {peer} (compacted): the oldest revision available is {oldest}")]
    Compacted { peer: String, key: String, revision: i64, oldest: String },
    #[error("{key} did not exist at revision {revision}")]
    Missing { key: String, revision: i64 },
    #[error("{key} does not exist at etcd {peer} now")]
    NoKey { key: String, peer: String },
    #[error("none of the last {walked} values of {key} has a hash starting with {prefix}{note}")]
    NoSuchHash { key: String, prefix: String, walked: usize, note: String },
    #[error("no instance of `{name}` under {fleet} names its source; give --source etcd://HOST:PORT/KEY")]
    NoSource { name: String, fleet: String },
    #[error("the source of `{name}` is {given}, not an etcd key: fleet rollback rewrites an etcd key")]
    NotEtcd { name: String, given: String },
    #[error("version {hash} is rejected by {count} instance(s) of `{name}`: written back it would not be applied; delete {key}* first if it is good after all")]
    Rejected { name: String, hash: String, count: u64, key: String },
}

/// What was written back.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RollbackDone {
    pub(crate) key: String,
    pub(crate) from_revision: i64,
    pub(crate) hash: String,
    pub(crate) size: usize,
    /// The key's revision after the write; `None` when it held that value already.
    pub(crate) new_revision: Option<i64>,
}

/// Writes the value `target` names back to the source key of `name`.
pub(crate) async fn rollback(
    fleet: &FleetUrl,
    options: &GatewayOptions,
    name: &str,
    source: Option<SourceSpec>,
    target: &RollbackTarget,
) -> Result<RollbackDone, FleetRollbackError> {
    let source = match source {
        Some(source) => source,
        None => {
            let views = read_view(fleet, options, Some(name)).await?;
            let named = views.iter().flat_map(|v| v.instances.iter()).map(|i| i.source.clone()).find(|s| !s.is_empty());
            let named = named
                .ok_or_else(|| FleetRollbackError::NoSource { name: name.to_owned(), fleet: fleet.to_string() })?;
            parse_source(&named).map_err(|_| FleetRollbackError::NotEtcd { name: name.to_owned(), given: named })?
        }
    };
    let SourceSpec::Etcd { base, key } = &source else {
        return Err(FleetRollbackError::NotEtcd { name: name.to_owned(), given: source.to_string() });
    };
    let mut etcd = EtcdGateway::new(base, options);
    let found = match target {
        RollbackTarget::Revision(revision) => at_revision(&mut etcd, key, *revision).await?,
        RollbackTarget::Hash(prefix) => by_hash(&mut etcd, key, prefix).await?,
    };
    let hash = content_hash(&found.value);
    let mut fleet_etcd = EtcdGateway::new(&fleet.base, options);
    let rejected = Keys::new(&fleet.prefix, name).rejected(&hash);
    let count = fleet_etcd.count_prefix(&rejected).await?;
    if count > 0 {
        return Err(FleetRollbackError::Rejected { name: name.to_owned(), hash, count, key: rejected });
    }
    let (now, _) = etcd.get(key, None).await?;
    let new_revision = match now {
        Some(kv) if kv.value == found.value => None,
        _ => Some(etcd.put(key, &found.value, None).await?),
    };
    Ok(RollbackDone {
        key: key.clone(),
        from_revision: found.mod_revision,
        hash,
        size: found.value.len(),
        new_revision,
    })
}

async fn compacted(etcd: &mut EtcdGateway, key: &str, revision: i64) -> FleetRollbackError {
    let oldest = match etcd.oldest_revision(key).await {
        Ok(Some(oldest)) => oldest.to_string(),
        Ok(None) => "unknown".into(),
        Err(e) => format!("unknown ({e})"),
    };
    FleetRollbackError::Compacted { peer: etcd.peer(), key: key.to_owned(), revision, oldest }
}

async fn at_revision(etcd: &mut EtcdGateway, key: &str, revision: i64) -> Result<Kv, FleetRollbackError> {
    match etcd.get(key, Some(revision)).await {
        Ok((Some(kv), _)) => Ok(kv),
        Ok((None, _)) => Err(FleetRollbackError::Missing { key: key.to_owned(), revision }),
        Err(GatewayError::Compacted { .. }) => Err(compacted(etcd, key, revision).await),
        Err(e) => Err(e.into()),
    }
}

/// Walks the key's values back from now, newest first, for one whose hash starts with `prefix`.
async fn by_hash(etcd: &mut EtcdGateway, key: &str, prefix: &str) -> Result<Kv, FleetRollbackError> {
    let (mut kv, _) = etcd.get(key, None).await?;
    if kv.is_none() {
        return Err(FleetRollbackError::NoKey { key: key.to_owned(), peer: etcd.peer() });
    }
    let mut walked = 0;
    while let Some(current) = kv {
        if content_hash(&current.value).starts_with(prefix) {
            return Ok(current);
        }
        walked += 1;
        if walked >= MAX_WALK || current.mod_revision <= 1 {
            break;
        }
        kv = match etcd.get(key, Some(current.mod_revision - 1)).await {
            Ok((kv, _)) => kv,
            Err(GatewayError::Compacted { .. }) => {
                let note = match compacted(etcd, key, current.mod_revision - 1).await {
                    FleetRollbackError::Compacted { oldest, .. } => {
                        format!(" (older revisions were compacted; the oldest available is {oldest})")
                    }
                    _ => String::new(),
                };
                return Err(FleetRollbackError::NoSuchHash {
                    key: key.to_owned(),
                    prefix: prefix.to_owned(),
                    walked,
                    note,
                });
            }
            Err(e) => return Err(e.into()),
        };
    }
    Err(FleetRollbackError::NoSuchHash { key: key.to_owned(), prefix: prefix.to_owned(), walked, note: String::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_rollback_target("42").unwrap(), RollbackTarget::Revision(42));
        assert_eq!(parse_rollback_target("r1234567").unwrap(), RollbackTarget::Revision(1_234_567));
        assert_eq!(parse_rollback_target("ABCDEF12").unwrap(), RollbackTarget::Hash("abcdef12".into()));
        assert_eq!(parse_rollback_target("123456").unwrap(), RollbackTarget::Revision(123_456));
        assert_eq!(parse_rollback_target("123456789012").unwrap(), RollbackTarget::Hash("123456789012".into()));
        for bad in ["", "xyz", "abc", "r"] {
            assert!(parse_rollback_target(bad).is_err(), "{bad}");
        }
    }
}
