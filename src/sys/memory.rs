//! The allocator, and giving memory back to the system after a burst of load.
//!
//! mimalloc (v2, transparent huge pages off) replaces glibc's malloc for the whole process,
//! the C code of aws-lc included. Measured side by side against glibc (`benches/compare.sh`
//! scenarios, interleaved runs): HTTP/2 about 10% less CPU per request and 9% more requests/s,
//! the other scenarios level; 1.2 MB more idle RSS and about 1 KB more per idle TLS connection.
//! With huge pages (mimalloc's default, and v3's) idle RSS grew by 14 to 16 MB, so they are off.
//!
//! An allocator keeps the memory of freed connections for reuse. mimalloc returns a thread's
//! freed pages when that thread allocates again, so a worker that goes quiet after a burst
//! would hold them for good: in a Pod that is memory charged to the container until it
//! restarts. Each worker therefore collects its own heap every [`COLLECT_INTERVAL`]; under
//! steady load there is little to collect, so it costs little.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often each thread's freed memory is handed back.
const COLLECT_INTERVAL: Duration = Duration::from_secs(10);

/// Hands the calling thread's freed memory back every [`COLLECT_INTERVAL`] until `stop` is
/// cancelled. Run it on every current-thread runtime: the main one and each worker's.
pub(crate) async fn return_freed_memory(stop: CancellationToken) {
    let mut tick = tokio::time::interval(COLLECT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let started = std::time::Instant::now();
        collect();
        tracing::trace!(elapsed = ?started.elapsed(), "heap collected");
    }
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect takes no pointers; it frees what the calling thread's heap no longer
    // uses and returns unused pages to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;

    extern "C" {
        fn malloc(size: usize) -> *mut c_void;
        fn free(pointer: *mut c_void);
    }

    #[test]
    #[allow(unsafe_code)]
    fn rust_and_c_allocations_are_served_by_mimalloc() {
        let boxed = Box::new([0u8; 64]);
        // SAFETY: the addresses are only inspected; the C allocation is freed right after.
        unsafe {
            assert!(libmimalloc_sys::mi_is_in_heap_region(boxed.as_ptr().cast()), "Rust's global allocator");
            // `override`: what C code (aws-lc) allocates with malloc comes from mimalloc too.
            let c = malloc(64);
            assert!(libmimalloc_sys::mi_is_in_heap_region(c), "C malloc");
            free(c);
        }
    }

    /// Resident memory of this process, in bytes (Linux).
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages");
        pages * 4096
    }

    #[test]
    fn collecting_hands_a_quiet_threads_freed_memory_back() {
        // On a thread of its own, as a worker is: its heap is not shared with other tests.
        let (before, after) = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 256 * 1024]).collect();
            drop(std::hint::black_box(blocks));
            let before = rss();
            super::collect();
            (before, rss())
        })
        .join()
        .unwrap();
        assert!(before >= after + 32 * 1024 * 1024, "64 MB freed, RSS {before} before collecting, {after} after");
    }
}
