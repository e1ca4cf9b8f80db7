//! Shared test harness: a real upstream app, the real `sidecar` binary, a test PKI made at test
//! time, and real TLS clients. Every process a test starts is killed when its handle drops.
//! Each fixture has its file; everything is re-exported here, so tests use `common::X`.
#![allow(dead_code)]

mod body;
mod chromium;
mod consul;
mod etcd;
mod files;
mod grpc;
mod legacy_app;
mod limits;
mod nginx;
mod plain_http;
mod process;
mod promtool;
mod proxy;
mod relay;
mod sync;
mod tls;
mod upstreams;

// Each test binary uses a part of the harness; the rest of these re-exports is unused there.
#[allow(unused_imports)]
pub use {
    body::*, chromium::*, consul::*, etcd::*, files::*, grpc::*, legacy_app::*, limits::*, nginx::*, plain_http::*,
    process::*, promtool::*, proxy::*, relay::*, sync::*, tls::*, upstreams::*,
};
