//! `sidecar`: a TLS-terminating reverse proxy that runs beside a legacy plain-HTTP app.
//!
//! The binary is a thin shell around this library; tests and benches drive the same code.
// Two audited exceptions: `memory::collect` calls mimalloc's mi_collect, and
// `open_files::started_with_for` sets a child's open-file limit between fork and exec.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
pub mod devca;
pub mod devcert;
pub mod file_watch;
// The fuzz targets' one way in (fuzz/). Always compiled, not only under cfg(fuzzing), so that
// a change that breaks it fails the normal build and clippy rather than the next fuzz run.
#[doc(hidden)]
pub mod fuzz_api;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod open_files;
pub mod plain_http;
pub mod proxy;
pub mod proxy_protocol;
pub mod redirect;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod tls;
pub mod transport;

/// Locks `mutex` even when a thread panicked while holding it. The crate's mutexes guard plain
/// values (statuses, idle lists, task handles, session state) that a panic leaves as valid as
/// the last assignment did; refusing them would turn one panic into a panic per caller.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
