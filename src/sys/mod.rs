//! Operating-system glue shared by the roles: signals and shutdown, open-file limits, returning
//! memory, directory watches, logging set-up, a small plain-HTTP listener, and the crate's one
//! atomic file writer. Nothing here knows a role; it imports only `metrics` from the crate.

pub(crate) mod atomic_file;
pub(crate) mod file_watch;
pub(crate) mod logging;
pub(crate) mod memory;
pub(crate) mod open_files;
pub(crate) mod plain_http;
pub(crate) mod process_stats;
pub(crate) mod shutdown;
pub(crate) mod trust_store;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex` even when a thread panicked while holding it. The crate's mutexes guard plain
/// values (statuses, idle lists, task handles, session state) that a panic leaves as valid as
/// the last assignment did; refusing them would turn one panic into a panic per caller.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The directory holding `file`: `.` for a bare file name.
pub(crate) fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}
