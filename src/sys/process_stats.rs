//! The process's CPU time, resident memory and start time, read from /proc at scrape time for
//! the standard `process_*` metrics (the names every Prometheus client library exports).

use rustix::param::{clock_ticks_per_second, page_size};

pub(crate) struct ProcessStats {
    pub(crate) cpu_seconds: f64,
    pub(crate) resident_bytes: u64,
    /// Since the Unix epoch.
    pub(crate) start_time_seconds: f64,
}

/// `None` where /proc is not Linux's.
pub(crate) fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from after its end.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // proc(5) numbers fields from 1; `fields[0]` is field 3, the state.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = clock_ticks_per_second() as f64;
    let boot_time: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        resident_bytes: field(24)? * page_size() as u64,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let stats = super::read().expect("Linux /proc");
        assert!(stats.resident_bytes > 1 << 20, "{}", stats.resident_bytes);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(stats.start_time_seconds <= now + 1.0 && stats.start_time_seconds > now - 3600.0);
        assert!(stats.cpu_seconds >= 0.0);
    }
}
