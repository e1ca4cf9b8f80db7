//! Giving memory back to the system after a burst of load.
//!
//! glibc's allocator keeps the memory of freed connections (buffers, TLS state, the upstream
//! pool's idle connections once they expire) in its free lists: measured after an HTTP/2 burst
//! of 640 concurrent streams, the heap had shrunk back to 16 MB while RSS stayed at 49 MB for
//! good. In a Pod that is memory charged to the container until it restarts. `malloc_trim`
//! hands the free pages back; under steady load there is little free, so it costs little.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often freed memory is handed back.
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Hands freed memory back every [`TRIM_INTERVAL`] until `stop` is cancelled.
pub async fn return_freed_memory(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let started = std::time::Instant::now();
        let released = trim();
        tracing::trace!(released, elapsed = ?started.elapsed(), "malloc_trim");
    }
}

/// Returns whether any memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe: it locks each arena in turn.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl, macOS) return memory on their own or offer no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
