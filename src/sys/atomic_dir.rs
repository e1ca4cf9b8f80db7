//! Atomic replacement of a whole directory of files, the way the kubelet updates a mounted
//! ConfigMap: the new set is written into a new timestamped directory `..2026_12_06_09_49_12.N`
//! beside the old one, a symlink `..data_tmp -> ..2026_…` is renamed over `..data` (the one
//! atomic step), and each visible name is a stable symlink `name -> ..data/name`. A reader that
//! opens `name` gets the old file or the new one, never half of one; a reader that resolves
//! `..data` once (or checks it did not change while it read) sees one whole set. A name the new
//! set adds is linked before the swap (its link leads nowhere until then, as if absent); a name
//! it no longer has is unlinked after the swap (until then it leads nowhere), and the old
//! timestamped directory is removed.
//!
//! The new directory exists as a [`DirCandidate`] before the swap, so that `--check-cmd` can
//! be run against exactly the files that will become visible.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The symlink to the current timestamped directory.
pub(crate) const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// A visible name's symlink, made here then renamed into place.
const LINK_TMP: &str = "..link_tmp";

#[derive(Debug, thiserror::Error)]
pub(crate) enum DirWriteError {
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot switch {} to the new set: {source}", path.display())]
    Swap { path: PathBuf, source: std::io::Error },
    #[error("cannot link {}: {source}", path.display())]
    Link { path: PathBuf, source: std::io::Error },
    #[error("{} is a real directory where the set needs its symlink; move it away", path.display())]
    InTheWay { path: PathBuf },
    #[error("{} is not a relative path of plain components", path.display())]
    BadPath { path: PathBuf },
}

/// A written, fsynced timestamped directory waiting to become `..data`. Removed on drop unless
/// committed.
#[derive(Debug)]
pub(crate) struct DirCandidate {
    dest: PathBuf,
    dir_name: String,
    /// The visible (top-level) names of the new set.
    names: BTreeSet<OsString>,
    committed: bool,
}

impl DirCandidate {
    /// The new timestamped directory.
    pub(crate) fn path(&self) -> PathBuf {
        self.dest.join(&self.dir_name)
    }

    /// Links the new set's visible names, swaps `..data` to the new directory, unlinks the
    /// names it no longer has, and removes the older timestamped directories.
    pub(crate) fn commit(mut self) -> Result<(), DirWriteError> {
        // Before the swap: a reader sees a new name only once its file is there too.
        for name in &self.names {
            link_visible(&self.dest, name)?;
        }
        let tmp = self.dest.join(DATA_TMP);
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.dir_name, &tmp)
            .map_err(|source| DirWriteError::Swap { path: tmp.clone(), source })?;
        let data = self.dest.join(DATA);
        if let Err(source) = std::fs::rename(&tmp, &data) {
            let _ = std::fs::remove_file(&tmp);
            return Err(DirWriteError::Swap { path: data, source });
        }
        self.committed = true;
        sync_dir(&self.dest)?;
        // Only after the swap: a reader never finds a name gone that the set it sees has.
        if let Ok(entries) = std::fs::read_dir(&self.dest) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let path = entry.path();
                if name.as_encoded_bytes().starts_with(b"..") {
                    let is_old_dir = name != *DATA
                        && name.to_str() != Some(&self.dir_name)
                        && entry.file_type().is_ok_and(|t| t.is_dir());
                    if is_old_dir {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                } else if !self.names.contains(&name) && points_into_data(&path) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        sync_dir(&self.dest)
    }
}

impl Drop for DirCandidate {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(self.path());
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), DirWriteError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| DirWriteError::Swap { path: dir.to_owned(), source })
}

/// Whether `path` is one of the set's symlinks (`..data/…`).
fn points_into_data(path: &Path) -> bool {
    std::fs::read_link(path).is_ok_and(|target| target.starts_with(DATA))
}

/// `name -> ..data/name`, made beside and renamed into place (a regular file there is replaced;
/// a real directory is refused rather than deleted).
fn link_visible(dest: &Path, name: &OsString) -> Result<(), DirWriteError> {
    let path = dest.join(name);
    let target = Path::new(DATA).join(name);
    if std::fs::read_link(&path).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
        return Err(DirWriteError::InTheWay { path });
    }
    let tmp = dest.join(LINK_TMP);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|source| DirWriteError::Link { path: path.clone(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| DirWriteError::Link { path, source })
}

/// `..2026_12_06_09_49_12.123456789`, the kubelet's naming, unique within this process.
fn timestamped_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = time::OffsetDateTime::now_utc();
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        match COUNTER.fetch_add(1, Ordering::Relaxed) {
            0 => String::new(),
            n => format!("-{n}"),
        }
    )
}

/// Writes `files` (relative paths of normal components, checked by the caller, and checked
/// again here) into a new timestamped directory of `dest`, each fsynced.
pub(crate) fn prepare(dest: &Path, files: &[(PathBuf, &[u8])]) -> Result<DirCandidate, DirWriteError> {
    std::fs::create_dir_all(dest).map_err(|source| DirWriteError::CreateDir { path: dest.to_owned(), source })?;
    let dir_name = timestamped_name();
    let root = dest.join(&dir_name);
    std::fs::create_dir(&root).map_err(|source| DirWriteError::CreateDir { path: root.clone(), source })?;
    let mut candidate = DirCandidate { dest: dest.to_owned(), dir_name, names: BTreeSet::new(), committed: false };
    let mut dirs = BTreeSet::from([root.clone()]);
    for (relative, content) in files {
        let plain = relative.components().all(|c| matches!(c, Component::Normal(_)));
        let Some(Component::Normal(top)) = relative.components().next().filter(|_| plain) else {
            return Err(DirWriteError::BadPath { path: relative.clone() });
        };
        candidate.names.insert(top.to_owned());
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            if dirs.insert(parent.to_owned()) {
                std::fs::create_dir_all(parent)
                    .map_err(|source| DirWriteError::CreateDir { path: parent.to_owned(), source })?;
            }
        }
        let write_error = |source| DirWriteError::Write { path: path.clone(), source };
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path).map_err(write_error)?;
        file.write_all(content).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
    }
    for dir in dirs.iter().rev() {
        sync_dir(dir)?;
    }
    Ok(candidate)
}

/// The set `..data` holds now: relative path (with `/`) to bytes; `None` when the directory has
/// no `..data` (never written this way).
pub(crate) fn read_current(dest: &Path) -> std::io::Result<Option<BTreeMap<String, Vec<u8>>>> {
    let data = dest.join(DATA);
    let target = match std::fs::read_link(&data) {
        Ok(target) => dest.join(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut files = BTreeMap::new();
    read_tree(&target, "", &mut files)?;
    Ok(Some(files))
}

fn read_tree(dir: &Path, prefix: &str, files: &mut BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = format!("{prefix}{name}");
        if entry.file_type()?.is_dir() {
            read_tree(&entry.path(), &format!("{key}/"), files)?;
        } else {
            files.insert(key, std::fs::read(entry.path())?);
        }
    }
    Ok(())
}

/// Removes what a write that did not finish left: `..data_tmp`, `..link_tmp`, timestamped
/// directories `..data` does not point to, and visible links into `..data` that lead nowhere
/// (a name of the set before a crash after the swap, or of a set never swapped in); returns
/// what was removed.
pub(crate) fn remove_stale(dest: &Path) -> Vec<PathBuf> {
    let current = std::fs::read_link(dest.join(DATA)).ok();
    let Ok(entries) = std::fs::read_dir(dest) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let path = entry.path();
        if name == *DATA_TMP || name == *LINK_TMP {
            if std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        } else if name.as_encoded_bytes().starts_with(b"..") {
            let old_dir = name != *DATA
                && current.as_deref() != Some(Path::new(&name))
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if old_dir && std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        } else if points_into_data(&path) && !path.exists() && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dest: &Path, files: &[(&str, &str)]) {
        let files: Vec<(PathBuf, &[u8])> = files.iter().map(|(p, c)| (PathBuf::from(p), c.as_bytes())).collect();
        prepare(dest, &files).unwrap().commit().unwrap();
    }

    fn visible(dest: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_set_replaces_the_last_one_in_one_swap_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("conf.d");
        write(&dest, &[("a.conf", "a1"), ("db/host", "h1"), ("gone", "x")]);
        assert_eq!(std::fs::read_to_string(dest.join("db/host")).unwrap(), "h1");
        assert_eq!(std::fs::read_link(dest.join("a.conf")).unwrap(), Path::new("..data/a.conf"));
        let first = std::fs::read_link(dest.join(DATA)).unwrap();
        write(&dest, &[("a.conf", "a2"), ("db/host", "h2"), ("new", "n")]);
        assert_eq!(std::fs::read_to_string(dest.join("a.conf")).unwrap(), "a2");
        assert_eq!(std::fs::read_to_string(dest.join("new")).unwrap(), "n");
        let names = visible(&dest);
        let second = std::fs::read_link(dest.join(DATA)).unwrap();
        assert_ne!(first, second);
        let expected =
            vec![second.to_string_lossy().into_owned(), "..data".into(), "a.conf".into(), "db".into(), "new".into()];
        assert_eq!(names, expected);
        let current = read_current(&dest).unwrap().unwrap();
        assert_eq!(current.keys().collect::<Vec<_>>(), ["a.conf", "db/host", "new"]);
    }

    #[test]
    fn an_uncommitted_candidate_is_removed_and_stale_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d");
        write(&dest, &[("a", "1")]);
        let candidate = prepare(&dest, &[(PathBuf::from("a"), b"2".as_slice())]).unwrap();
        let path = candidate.path();
        assert!(path.join("a").is_file());
        drop(candidate);
        assert!(!path.exists());
        std::fs::create_dir(dest.join("..2020_01_01_00_00_00.1")).unwrap();
        std::os::unix::fs::symlink("x", dest.join(DATA_TMP)).unwrap();
        assert_eq!(remove_stale(&dest).len(), 2);
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "1");
        assert!(prepare(&dest, &[(PathBuf::from("../x"), b"".as_slice())]).is_err());
        assert!(read_current(dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_crash_between_the_swap_and_the_cleanup_leaves_no_name_that_leads_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d");
        write(&dest, &[("a", "1"), ("gone", "x")]);
        // The new set without `gone`, swapped in by hand; the process dies before the cleanup.
        let candidate = prepare(&dest, &[(PathBuf::from("a"), b"2".as_slice())]).unwrap();
        std::os::unix::fs::symlink(&candidate.dir_name, dest.join(DATA_TMP)).unwrap();
        std::fs::rename(dest.join(DATA_TMP), dest.join(DATA)).unwrap();
        let new_dir = candidate.dir_name.clone();
        std::mem::forget(candidate);
        assert!(std::fs::symlink_metadata(dest.join("gone")).is_ok() && !dest.join("gone").exists());

        let removed = remove_stale(&dest);
        assert_eq!(removed.len(), 2, "the old directory and the dangling link: {removed:?}");
        assert_eq!(visible(&dest), vec![new_dir, "..data".into(), "a".into()]);
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "2");
    }
}
