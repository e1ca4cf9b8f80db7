//! `sidecar`: a TLS-terminating reverse proxy that runs beside a legacy plain-HTTP app, and a
//! config sync that keeps the app's files in step with a config store.
//!
//! The binary is a thin shell around [`app::main`]; tests and benches drive the same code.
//!
//! Modules are layered; each imports only from its own layer or below, and
//! `tests/layering.rs` keeps it so (top to bottom):
//!
//! | layer | modules | job |
//! |---|---|---|
//! | process | `app` | subcommand dispatch, runtimes, signals, exit codes, printing |
//! | input and control | `cli`, `admin` | clap and the TOML file into runtime settings; the admin API and scrape-time metrics |
//! | serving | `server` | listeners, workers, connections, live state, reload, redirect |
//! | engines | `proxy`, `sync` | forwarding one request; keeping one file in step with its source |
//! | settings | `config`, `access_log`, `devca` | the proxy's runtime config; the access log; the development CA |
//! | protocols | `tls`, `devcert`, `transport`, `proxy_protocol` | rustls and certificates; sockets; the PROXY header |
//! | OS glue | `sys` | shutdown, open files, memory, file watches, logging, a plain-HTTP listener, atomic writes |
//! | counters | `metrics` | process-wide counters; imports nothing from the crate |
//!
//! The public surface is what the binary, the integration tests and the benches use: [`app::main`];
//! [`cli`]'s argument types and parser (the deployment tests read manifests through them);
//! [`sync::spec`] and [`sync::hash`]; and the per-request header and HTTP/1.1 code the
//! `hot_path` bench times ([`proxy::h1`], [`proxy::headers`], [`config::parse_upstream`], and the
//! per-request counting of [`metrics::Metrics`]).
//! Everything else is `pub(crate)`.
// Three audited exceptions: `sys::memory::collect` calls mimalloc's mi_collect,
// `sys::open_files::started_with_for` sets a child's open-file limit between fork and exec, and
// `proxy::h1` takes header values httparse has validated without checking them again.
#![deny(unsafe_code)]

mod access_log;
mod admin;
pub mod app;
pub mod cli;
pub mod config;
mod devca;
mod devcert;
// The fuzz targets' one way in (fuzz/). Always compiled, not only under cfg(fuzzing), so that
// a change that breaks it fails the normal build and clippy rather than the next fuzz run.
#[doc(hidden)]
pub mod fuzz_api;
pub mod metrics;
pub mod proxy;
mod proxy_protocol;
mod server;
pub mod sync;
mod sys;
mod tls;
mod transport;
