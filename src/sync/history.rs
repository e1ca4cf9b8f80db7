//! Per destination, in its history directory: copies of the last N versions written (with
//! time, source revision and hash, in `versions.json`), and `state.json`, the last applied
//! hash and revision. The state is what lets a restarted sidecar tell "nothing changed" (no
//! signal) from "changed while I was down" (applied once).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::atomic_file::{write_atomic, FileMode, WriteError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum HistoryError {
    #[error("cannot create history directory {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("history {}: {source}", path.display())]
    Write { path: PathBuf, source: WriteError },
    #[error("cannot read history copy {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
}

/// What happened to a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum VersionStatus {
    /// Written, and the app took it (healthy, or no health check).
    Applied,
    /// Written, the app was unhealthy with it, and it was rolled back.
    Rejected,
    /// The file found on disk when this destination was first synced.
    Initial,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Version {
    pub(crate) id: u64,
    pub(crate) time: String,
    pub(crate) revision: String,
    pub(crate) hash: String,
    pub(crate) size: u64,
    pub(crate) status: VersionStatus,
    /// The copy's file name in the history directory.
    pub(crate) file: String,
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AppliedState {
    /// Hash of the content the app was last told about and accepted.
    pub(crate) applied_hash: Option<String>,
    pub(crate) applied_revision: Option<String>,
    /// Hashes refused after a failed health check, or set aside by a manual rollback: not
    /// applied again until the source offers something else.
    #[serde(default)]
    pub(crate) rejected: Vec<String>,
}

pub(crate) struct History {
    dir: PathBuf,
    keep: usize,
    pub(crate) versions: Vec<Version>,
    pub(crate) state: AppliedState,
}

const VERSIONS: &str = "versions.json";
const STATE: &str = "state.json";

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl History {
    /// Opens (creating the directory); unreadable or corrupt files are logged and start empty
    /// rather than stopping the sync.
    pub(crate) fn open(dir: &Path, keep: usize) -> Result<History, HistoryError> {
        std::fs::create_dir_all(dir).map_err(|source| HistoryError::CreateDir { dir: dir.to_owned(), source })?;
        let versions = load_json(&dir.join(VERSIONS)).unwrap_or_default();
        let state = load_json(&dir.join(STATE)).unwrap_or_default();
        Ok(History { dir: dir.to_owned(), keep, versions, state })
    }

    /// Keeps a copy of `content` and records it; the oldest beyond `keep` are removed. Content
    /// the history holds already becomes its newest entry again, under its id: rolling back and
    /// forth between two versions keeps two entries, not one per rollback.
    pub(crate) fn record(
        &mut self,
        content: &[u8],
        revision: &str,
        hash: &str,
        status: VersionStatus,
    ) -> Result<Version, HistoryError> {
        if let Some(at) = self.versions.iter().position(|v| v.hash == hash && self.dir.join(&v.file).is_file()) {
            let mut version = self.versions.remove(at);
            version.time = now_rfc3339();
            version.revision = revision.to_owned();
            version.status = status;
            self.versions.push(version.clone());
            self.save_versions()?;
            return Ok(version);
        }
        let id = self.versions.iter().map(|v| v.id).max().unwrap_or(0) + 1;
        let stamp = time::OffsetDateTime::now_utc();
        let compact = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            stamp.year(),
            u8::from(stamp.month()),
            stamp.day(),
            stamp.hour(),
            stamp.minute(),
            stamp.second()
        );
        let file = format!("{id:06}-{compact}-{}", &hash[..hash.len().min(12)]);
        self.ensure_dir()?;
        let path = self.dir.join(&file);
        write_atomic(&path, content, FileMode::LikeExisting)
            .map_err(|source| HistoryError::Write { path: path.clone(), source })?;
        let version = Version {
            id,
            time: now_rfc3339(),
            revision: revision.to_owned(),
            hash: hash.to_owned(),
            size: content.len() as u64,
            status,
            file,
        };
        self.versions.push(version.clone());
        while self.versions.len() > self.keep {
            let old = self.versions.remove(0);
            let _ = std::fs::remove_file(self.dir.join(&old.file));
        }
        self.save_versions()?;
        Ok(version)
    }

    pub(crate) fn set_status(&mut self, id: u64, status: VersionStatus) -> Result<(), HistoryError> {
        if let Some(v) = self.versions.iter_mut().find(|v| v.id == id) {
            v.status = status;
        }
        self.save_versions()
    }

    pub(crate) fn content(&self, version: &Version) -> Result<Vec<u8>, HistoryError> {
        let path = self.dir.join(&version.file);
        std::fs::read(&path).map_err(|source| HistoryError::Read { path, source })
    }

    /// The newest good version whose hash is not `current` (the one before the current one).
    pub(crate) fn previous_good(&self, current: Option<&str>) -> Option<&Version> {
        self.versions.iter().rev().find(|v| v.status != VersionStatus::Rejected && Some(v.hash.as_str()) != current)
    }

    /// The newest good version with this hash.
    pub(crate) fn good_with_hash(&self, hash: &str) -> Option<&Version> {
        self.versions.iter().rev().find(|v| v.status != VersionStatus::Rejected && v.hash == hash)
    }

    /// A version by id (`7`) or hash prefix (at least 6 hex digits).
    pub(crate) fn find(&self, selector: &str) -> Option<&Version> {
        if let Ok(id) = selector.parse::<u64>() {
            if let Some(v) = self.versions.iter().find(|v| v.id == id) {
                return Some(v);
            }
        }
        if selector.len() >= 6 {
            return self.versions.iter().rev().find(|v| v.hash.starts_with(&selector.to_ascii_lowercase()));
        }
        None
    }

    /// The directory again, if it was removed with the destination's directory (then the
    /// state and the version list are written anew from memory; the lost copies are gone).
    fn ensure_dir(&self) -> Result<(), HistoryError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| HistoryError::CreateDir { dir: self.dir.clone(), source })
    }

    pub(crate) fn save_state(&self) -> Result<(), HistoryError> {
        self.ensure_dir()?;
        let path = self.dir.join(STATE);
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        write_atomic(&path, &bytes, FileMode::LikeExisting).map_err(|source| HistoryError::Write { path, source })
    }

    fn save_versions(&self) -> Result<(), HistoryError> {
        self.ensure_dir()?;
        let path = self.dir.join(VERSIONS);
        let bytes = serde_json::to_vec_pretty(&self.versions).unwrap_or_default();
        write_atomic(&path, &bytes, FileMode::LikeExisting).map_err(|source| HistoryError::Write { path, source })
    }
}

fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("cannot read {} ({e}); starting without it", path.display());
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!("{} is not valid ({e}); starting without it", path.display());
            None
        }
    }
}
