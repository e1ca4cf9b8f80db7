//! Client faults: counted by reason, and told to the operator in WARN lines that name the peer,
//! at most one per reason every ten seconds so that an attacker cannot flood the log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::metrics::{metrics, ClientFault};

/// The least time between two WARN lines for one reason.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Per reason: when its last WARN line was written (milliseconds since `epoch()`, plus one, so
/// that zero means never), and how many faults went unlogged since.
struct WarnState {
    last: AtomicU64,
    unlogged: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn warn_state(fault: ClientFault) -> &'static WarnState {
    static STATES: [WarnState; ClientFault::ALL.len()] =
        [const { WarnState { last: AtomicU64::new(0), unlogged: AtomicU64::new(0) } }; ClientFault::ALL.len()];
    &STATES[fault as usize]
}

/// Counts `fault` of `peer` and logs it: at WARN, rate-limited, for faults that point at a
/// broken or hostile client; at DEBUG for the everyday ones (idle, cancelled).
pub(crate) fn client_fault(fault: ClientFault, peer: SocketAddr, detail: &dyn std::fmt::Display) {
    metrics().client_fault(fault);
    let reason = fault.label();
    if matches!(fault, ClientFault::IdleTimeout | ClientFault::StreamCancelled) {
        tracing::debug!(%peer, reason, "{detail}");
        return;
    }
    let state = warn_state(fault);
    let now = epoch().elapsed().as_millis() as u64 + 1;
    let last = state.last.load(Ordering::Relaxed);
    let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
    if !due || state.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        state.unlogged.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match state.unlogged.swap(0, Ordering::Relaxed) {
        0 => tracing::warn!(%peer, reason, "client fault: {detail}"),
        more => tracing::warn!(%peer, reason, "client fault: {detail} ({more} more since the last line like this)"),
    }
}
