//! Atomic replacement of a file, the one writer of the crate (synced config files, their
//! history, the development certificates and CA): a temp file in the same directory is written,
//! fsynced and given its mode (the old file's mode and owner, or a fixed mode such as 0600 for a
//! key), then renamed over the destination, and the directory is fsynced. A crash at any point leaves either the old or the new file whole (rename is atomic
//! within one file system; the directory fsync makes the rename itself durable).
//!
//! The temp file exists as a [`Candidate`] before it is committed, so that `--check-cmd` can
//! be run against exactly the bytes that will be renamed into place.
//!
//! A destination that is a symlink is written through: the new file goes into the directory
//! of the file the link leads to, and the link stays a link.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::parent_dir;

#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("cannot create a temp file beside {}: {source}", dest.display())]
    Create { dest: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot rename {} over {}: {source}", temp.display(), dest.display())]
    Rename { temp: PathBuf, dest: PathBuf, source: std::io::Error },
    #[error("cannot fsync directory {}: {source}", dir.display())]
    SyncDir { dir: PathBuf, source: std::io::Error },
}

/// A fully written, fsynced temp file waiting to be renamed over `dest`. Removed on drop
/// unless committed.
#[derive(Debug)]
pub(crate) struct Candidate {
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Candidate {
    /// The temp file: same directory and extension as the destination.
    pub(crate) fn path(&self) -> &Path {
        &self.temp
    }

    /// Renames the temp file over the destination and makes the rename durable.
    pub(crate) fn commit(mut self) -> Result<(), WriteError> {
        std::fs::rename(&self.temp, &self.dest).map_err(|source| WriteError::Rename {
            temp: self.temp.clone(),
            dest: self.dest.clone(),
            source,
        })?;
        self.committed = true;
        let dir = parent_dir(&self.dest);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|source| WriteError::SyncDir { dir, source })
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The mode and owner the new file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileMode {
    /// The replaced file's mode and owner (0644 and the writer's own for a new file): an app's
    /// config stays readable by whoever could read it.
    LikeExisting,
    /// This mode from the first byte, whatever the umask: a key is never readable by others,
    /// not even briefly.
    Exactly(u32),
}

/// Temp files are named `.sidecar-tmp-PID-N-NAME`.
const TEMP_PREFIX: &str = ".sidecar-tmp-";

/// The file a write to `dest` replaces: `dest`, or the file its symlinks lead to (renaming
/// over the link itself would turn it into a regular file and leave its target as it was).
pub(crate) fn write_target(dest: &Path) -> PathBuf {
    let mut path = dest.to_owned();
    // As many links as the kernel follows before ELOOP.
    for _ in 0..40 {
        match std::fs::read_link(&path) {
            Ok(target) if target.is_absolute() => path = target,
            Ok(target) => path = parent_dir(&path).join(target),
            Err(_) => break,
        }
    }
    path
}

/// The file a write to `dest` changes, named so that two paths to one file (through a
/// symlinked directory or a symlink) are equal: the canonical directory and the file name.
pub(crate) fn file_identity(dest: &Path) -> PathBuf {
    let target = write_target(dest);
    let canonical_dir = std::fs::canonicalize(parent_dir(&target));
    match (canonical_dir, target.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => target,
    }
}

/// Removes the temp files a crashed writer of `dest` left (by another process: this one's are
/// its own); returns the ones removed.
pub(crate) fn remove_stale_temps(dest: &Path) -> Vec<PathBuf> {
    let target = write_target(dest);
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(parent_dir(&target)) else { return Vec::new() };
    let mine = format!("{TEMP_PREFIX}{}-", std::process::id());
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(TEMP_PREFIX) else { continue };
        // PID-N-NAME: the name after two numbers, so that `a.conf` does not claim `b-a.conf`'s.
        let mut parts = rest.splitn(3, '-');
        let numbered = parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
            && parts.next().is_some_and(|n| n.parse::<u64>().is_ok());
        if numbered
            && parts.next() == Some(name.as_str())
            && !file.starts_with(&mine)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

/// Writes `content` to a new temp file beside `dest` (beside its target, for a symlink), with
/// the mode `mode` says, and fsyncs it.
pub(crate) fn prepare(dest: &Path, content: &[u8], mode: FileMode) -> Result<Candidate, WriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dest = &write_target(dest);
    let dir = parent_dir(dest);
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    // A leading dot keeps it out of globs; the destination's name last keeps its extension
    // for --check-cmd tools that look at it.
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}-{file_name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let existing = match mode {
        FileMode::LikeExisting => std::fs::metadata(dest).ok(),
        FileMode::Exactly(_) => None,
    };
    let mode = match mode {
        FileMode::LikeExisting => existing.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0o644),
        FileMode::Exactly(mode) => mode,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|source| WriteError::Create { dest: dest.to_owned(), source })?;
    let candidate = Candidate { temp: temp.clone(), dest: dest.to_owned(), committed: false };
    let write_error = |source| WriteError::Write { path: temp.clone(), source };
    file.write_all(content).map_err(write_error)?;
    // The umask may have narrowed the mode given at creation.
    file.set_permissions(Permissions::from_mode(mode)).map_err(write_error)?;
    if let Some(meta) = &existing {
        let mine = file.metadata().map_err(write_error)?;
        if (mine.uid(), mine.gid()) != (meta.uid(), meta.gid()) {
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
                // Only root may give a file away; an unprivileged sidecar writes as itself.
                tracing::warn!(
                    "cannot give {} to uid {} gid {} like {} ({e}); it will belong to uid {}",
                    temp.display(),
                    meta.uid(),
                    meta.gid(),
                    dest.display(),
                    mine.uid()
                );
            }
        }
    }
    file.sync_all().map_err(write_error)?;
    Ok(candidate)
}

/// `prepare` then `commit`: for files with no check to run in between.
pub(crate) fn write_atomic(dest: &Path, content: &[u8], mode: FileMode) -> Result<(), WriteError> {
    prepare(dest, content, mode)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_keeping_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("app.conf");
        std::fs::write(&dest, "old").unwrap();
        std::fs::set_permissions(&dest, Permissions::from_mode(0o640)).unwrap();
        write_atomic(&dest, b"new", FileMode::LikeExisting).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_candidate_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.json");
        let candidate = prepare(&dest, b"{}", FileMode::LikeExisting).unwrap();
        assert!(candidate.path().to_string_lossy().ends_with("-x.json"));
        assert!(candidate.path().exists());
        let temp = candidate.path().to_owned();
        drop(candidate);
        assert!(!temp.exists() && !dest.exists());
    }

    #[test]
    fn an_exact_mode_holds_whatever_the_old_file_had() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("key.pem");
        std::fs::write(&dest, "old").unwrap();
        std::fs::set_permissions(&dest, Permissions::from_mode(0o644)).unwrap();
        write_atomic(&dest, b"secret", FileMode::Exactly(0o600)).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "secret");
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
