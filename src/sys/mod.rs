//! Operating-system glue shared by the roles: signals and shutdown, open-file limits, returning
//! memory, directory watches, logging set-up, a small plain-HTTP listener, and the crate's one
//! atomic file writer. Nothing here knows a role; it imports only `metrics` from the crate.

pub(crate) mod atomic_dir;
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

/// A duration as people write it: "4s" rather than "3s 999ms 998us 307ns" (a deadline's
/// remainder), "1s 500ms", "250ms"; to the second from 10s on, to 100ms from 1s on.
pub(crate) fn human_duration(d: std::time::Duration) -> humantime::FormattedDuration {
    let step: u128 = match d.as_millis() {
        10_000.. => 1000,
        1000.. => 100,
        _ => 1,
    };
    let ms = (d.as_nanos() + step * 500_000) / (step * 1_000_000) * step;
    humantime::format_duration(std::time::Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_are_rounded_as_people_write_them() {
        let show = |d: Duration| super::human_duration(d).to_string();
        assert_eq!(show(Duration::from_nanos(3_999_998_307)), "4s");
        assert_eq!(show(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(show(Duration::from_micros(249_700)), "250ms");
        assert_eq!(show(Duration::from_millis(12_345)), "12s");
    }
}
