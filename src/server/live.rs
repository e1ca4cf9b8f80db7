//! What can change while the proxy runs: the serving snapshot (config and HTTP settings) and the
//! TLS state, each swapped whole by the reloader and read without a lock by everyone else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;

use super::BoxingExecutor;
use crate::config::ProxyConfig;
use crate::proxy::health::UpstreamHealth;
use crate::tls::{TlsContext, TlsState};

/// One immutable view of how connections are served; swapped whole on reload.
pub(crate) struct ServingSnapshot {
    pub(crate) config: Arc<ProxyConfig>,
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<BoxingExecutor>,
}

impl ServingSnapshot {
    pub(crate) fn new(config: ProxyConfig) -> ServingSnapshot {
        let mut http1 = http1::Builder::new();
        http1
            // The header-read timeout is the connection watch's (see `watch`), not hyper's.
            .header_read_timeout(None)
            .max_buf_size(config.limits.max_header_size as usize)
            // Queued, not flattened: rustls seals a vectored write of head and body into one
            // record anyway, and flattening copied every body byte once more (1 MiB responses:
            // about 5% less CPU queued).
            .writev(true)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(BoxingExecutor);
        http2.timer(TokioTimer::new()).max_header_list_size(config.limits.max_header_size).keep_alive_interval(None);
        ServingSnapshot { config: Arc::new(config), http1, http2 }
    }
}

/// Counters of reload outcomes, per kind.
#[derive(Debug, Default)]
pub(crate) struct ReloadStats {
    pub(crate) config_ok: AtomicU64,
    pub(crate) config_failed: AtomicU64,
    pub(crate) tls_ok: AtomicU64,
    pub(crate) tls_failed: AtomicU64,
}

/// The reload counters at one moment, for `/status` and `/metrics` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ReloadCounts {
    pub(crate) config_ok: u64,
    pub(crate) config_failed: u64,
    pub(crate) tls_ok: u64,
    pub(crate) tls_failed: u64,
}

impl ReloadStats {
    pub(crate) fn counts(&self) -> ReloadCounts {
        let relaxed = Ordering::Relaxed;
        ReloadCounts {
            config_ok: self.config_ok.load(relaxed),
            config_failed: self.config_failed.load(relaxed),
            tls_ok: self.tls_ok.load(relaxed),
            tls_failed: self.tls_failed.load(relaxed),
        }
    }
}

/// Everything that can change while the proxy runs. Readers load; only the reloader stores.
pub(crate) struct LiveState {
    pub(crate) serving: ArcSwap<ServingSnapshot>,
    pub(crate) tls: TlsState,
    pub(crate) tls_context: TlsContext,
    pub(crate) stats: ReloadStats,
    /// The app's health for readiness, checked while the admin API runs.
    pub(crate) upstream_health: Arc<UpstreamHealth>,
}
