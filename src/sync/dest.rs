//! What a destination is on disk: one file (written with `atomic_file`), or, for `--dest DIR/`,
//! a directory of one file per key (written with `atomic_dir`, the set swapped in at once). The
//! worker reads, checks and writes a destination through these, so that compare, history and
//! rollback work the same on both: a directory's content is its serialised [`KeySet`].

use std::path::PathBuf;

use bytes::Bytes;

use super::hash::content_hash;
use super::keyset::KeySet;
use super::spec::{Output, SyncSpec};
use super::validate::{self, ValidateError};
use crate::sys::atomic_dir::{self, DirCandidate};
use crate::sys::atomic_file::{self, Candidate, FileMode};

/// A new version written beside the destination, not yet in place.
pub(crate) enum DestCandidate {
    File(Candidate),
    Directory(DirCandidate),
}

impl DestCandidate {
    /// What `--check-cmd` gets as `{}`: the temp file, or the new timestamped directory.
    pub(crate) fn path(&self) -> PathBuf {
        match self {
            DestCandidate::File(c) => c.path().to_owned(),
            DestCandidate::Directory(c) => c.path(),
        }
    }

    pub(crate) fn commit(self) -> Result<(), String> {
        match self {
            DestCandidate::File(c) => c.commit().map_err(|e| e.to_string()),
            DestCandidate::Directory(c) => c.commit().map_err(|e| e.to_string()),
        }
    }
}

fn is_directory(spec: &SyncSpec) -> bool {
    spec.output == Output::Directory
}

/// What the destination holds now, as the worker compares it: the file's bytes, or the
/// directory's set serialised; `None` when there is nothing (yet).
pub(crate) fn read(spec: &SyncSpec) -> Option<Vec<u8>> {
    if !is_directory(spec) {
        return std::fs::read(&spec.dest).ok();
    }
    let files = atomic_dir::read_current(&spec.dest).ok()??;
    let keys = files.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect();
    Some(KeySet { keys }.encode())
}

pub(crate) fn hash(spec: &SyncSpec) -> Option<String> {
    read(spec).map(|content| content_hash(&content))
}

/// The checks before anything is written: `--validate` (each file of a set), an empty value or
/// set, and for a set the key names (none may leave the directory).
pub(crate) fn check(spec: &SyncSpec, content: &[u8]) -> Result<(), String> {
    if !is_directory(spec) {
        return validate::check_content(content, spec.validate).map_err(|e| e.to_string());
    }
    let set = KeySet::decode(content).map_err(|e| e.to_string())?;
    if set.keys.is_empty() {
        return Err(format!("no keys under {}: an empty set would remove every file", spec.source));
    }
    set.paths().map_err(|e| e.to_string())?;
    if spec.validate.is_some() {
        for (key, value) in &set.keys {
            match validate::check_content(value, spec.validate) {
                Ok(()) | Err(ValidateError::Empty) => {}
                Err(e) => return Err(format!("key `{}`: {e}", key.escape_debug())),
            }
        }
    }
    Ok(())
}

/// Writes `content` beside the destination (blocking I/O).
pub(crate) fn prepare(spec: &SyncSpec, content: &[u8]) -> Result<DestCandidate, String> {
    if !is_directory(spec) {
        return atomic_file::prepare(&spec.dest, content, FileMode::LikeExisting)
            .map(DestCandidate::File)
            .map_err(|e| e.to_string());
    }
    let set = KeySet::decode(content).map_err(|e| e.to_string())?;
    let paths = set.paths().map_err(|e| e.to_string())?;
    let files: Vec<(PathBuf, &[u8])> = paths.into_iter().map(|(path, value)| (path, value.as_ref())).collect();
    atomic_dir::prepare(&spec.dest, &files).map(DestCandidate::Directory).map_err(|e| e.to_string())
}

/// Removes what a write that did not finish left beside the destination.
pub(crate) fn remove_stale(spec: &SyncSpec) -> Vec<PathBuf> {
    if is_directory(spec) {
        atomic_dir::remove_stale(&spec.dest)
    } else {
        atomic_file::remove_stale_temps(&spec.dest)
    }
}
