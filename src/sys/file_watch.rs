//! Watching the directories of input files (certificates, the proxy's config, a synced file).
//!
//! A directory is watched, not the file: editors replace a file by rename and Kubernetes
//! updates a mounted Secret or ConfigMap by swapping its `..data` symlink, both of which a
//! watch on the file's old inode would miss.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

use notify::{EventKindMask, RecommendedWatcher, RecursiveMode, Watcher};

/// The events that can change what a name in the directory holds: creation, removal, renames,
/// attributes, and on Linux the close that ends a write. Not each write() and open() in the
/// directory: a log beside a certificate made inotify wake the watcher thread at every line.
fn change_kinds() -> EventKindMask {
    let kinds = EventKindMask::CREATE | EventKindMask::REMOVE | EventKindMask::MODIFY_NAME | EventKindMask::MODIFY_META;
    if cfg!(target_os = "linux") {
        // inotify reports IN_CLOSE_WRITE; an in-place writer is done when it closes.
        kinds | EventKindMask::ACCESS_CLOSE
    } else {
        // kqueue and FSEvents have no close event; a write is all they report.
        kinds | EventKindMask::MODIFY_DATA
    }
}

/// Watches `dirs` and calls `on_change` for each event naming one of `names` or a name that
/// starts with `..` (Kubernetes' `..data` and the timestamped directory it points to).
pub(crate) struct DirectoryWatch {
    _watcher: RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl DirectoryWatch {
    /// Fails only when no watcher can be made; a directory that cannot be watched is returned
    /// with its error, and the others are watched.
    pub(crate) fn new(
        dirs: BTreeSet<PathBuf>,
        names: BTreeSet<OsString>,
        on_change: impl Fn() + Send + 'static,
    ) -> notify::Result<(DirectoryWatch, Vec<(PathBuf, notify::Error)>)> {
        Self::watch(dirs, Some(names), on_change)
    }

    /// Like `new`, for every name in `dirs` and their subdirectories (a directory whose files
    /// are all inputs).
    pub(crate) fn every_name(
        dirs: BTreeSet<PathBuf>,
        on_change: impl Fn() + Send + 'static,
    ) -> notify::Result<(DirectoryWatch, Vec<(PathBuf, notify::Error)>)> {
        Self::watch(dirs, None, on_change)
    }

    fn watch(
        dirs: BTreeSet<PathBuf>,
        names: Option<BTreeSet<OsString>>,
        on_change: impl Fn() + Send + 'static,
    ) -> notify::Result<(DirectoryWatch, Vec<(PathBuf, notify::Error)>)> {
        let mode = if names.is_some() { RecursiveMode::NonRecursive } else { RecursiveMode::Recursive };
        let wanted = names.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            let named = event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    wanted.as_ref().is_none_or(|w| w.contains(n)) || n.as_encoded_bytes().starts_with(b"..")
                })
            });
            if named {
                on_change();
            }
        };
        let mut watcher = RecommendedWatcher::new(handler, notify::Config::default().with_event_kinds(change_kinds()))?;
        let mut failed = Vec::new();
        for dir in &dirs {
            if let Err(e) = watcher.watch(dir, mode) {
                failed.push((dir.clone(), e));
            }
        }
        Ok((DirectoryWatch { _watcher: watcher, dirs, names: names.unwrap_or_default() }, failed))
    }

    /// Whether this watch was made for these directories (those that could not be watched
    /// included) and these names.
    pub(crate) fn is_for(&self, dirs: &BTreeSet<PathBuf>, names: &BTreeSet<OsString>) -> bool {
        self.dirs == *dirs && self.names == *names
    }
}
