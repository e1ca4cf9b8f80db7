//! The proxy's open-file limit. Every client connection holds a descriptor and its upstream
//! connection another, so the soft limit that shells and service managers often start processes
//! with (1024) caps a proxy at a few hundred clients while the hard limit allows far more. As
//! nginx's `worker_rlimit_nofile` and Go's runtime do, the proxy raises its soft limit to the
//! hard one at start. Commands it runs (a sync table's `exec` or `check-cmd`) get the limit the
//! proxy was started with, as Go's runtime gives its children: a program may still use select(),
//! which fails on descriptors above 1023.

use std::sync::OnceLock;

use rustix::io::Errno;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Linux refuses an unlimited RLIMIT_NOFILE; this is the kernel's default `fs.nr_open`.
const UNLIMITED_FALLBACK: u64 = 1 << 20;

/// The limit the process started with, once it has been raised.
static STARTED_WITH: OnceLock<Rlimit> = OnceLock::new();

/// Raises the soft open-file limit to the hard one, and says so at debug level; a refusal is a
/// warning, since the proxy then runs out of descriptors sooner than its operator expects.
pub(crate) fn raise_soft_limit() {
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else { return };
    let target = limit.maximum.unwrap_or(UNLIMITED_FALLBACK);
    if soft >= target {
        tracing::debug!("open-file limit {soft} (the hard limit)");
        return;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum }) {
        Ok(()) => {
            let _ = STARTED_WITH.set(limit);
            tracing::debug!("open-file limit raised from {soft} to the hard limit {target}")
        }
        Err(e) => tracing::warn!(
            "cannot raise the open-file limit from {soft} to the hard limit {target}: {e}; with a descriptor for \
             each client and one for its app connection, about {} clients fit",
            soft / 2
        ),
    }
}

/// Makes `command` start with the open-file limit the proxy started with, if it was raised.
pub(crate) fn started_with_for(command: &mut tokio::process::Command) {
    let Some(&limit) = STARTED_WITH.get() else { return };
    // SAFETY: the closure runs in the forked child before exec; it makes one system call
    // (rustix's, no libc state), allocates nothing and takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || setrlimit(Resource::Nofile, limit).map_err(Into::into));
    }
}

/// The soft open-file limit now; `None` when unlimited.
pub(crate) fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// How many descriptors the process holds (Linux: /proc/self/fd, less the one reading it).
pub(crate) fn open_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|entries| entries.count().saturating_sub(1))
}

/// What an operator can do about a failed accept, when the failure is a descriptor limit.
pub(crate) fn accept_error_hint(error: &std::io::Error) -> Option<String> {
    match Errno::from_io_error(error)? {
        Errno::MFILE => Some(match soft_limit() {
            Some(soft) => format!(
                "the proxy holds its limit of {soft} open files; new clients wait in the listen queue until \
                 connections close (raise the hard limit: `ulimit -Hn`, systemd's LimitNOFILE=, the container's \
                 nofile ulimit)"
            ),
            None => "the proxy holds as many open files as the kernel allows (fs.nr_open)".to_owned(),
        }),
        Errno::NFILE => Some("the system's open-file table is full (fs.file-max)".to_owned()),
        _ => None,
    }
}
