//! Open-file limits of the processes the tests start.

/// Starts the sidecar with these RLIMIT_NOFILE limits, as a shell's `ulimit -n` would.
pub fn with_open_file_limit(soft: u64, hard: u64) -> impl FnOnce(&mut std::process::Command) {
    move |cmd| {
        use std::os::unix::process::CommandExt;
        let limit = rustix::process::Rlimit { current: Some(soft), maximum: Some(hard) };
        // SAFETY: the closure runs in the forked child before exec; it makes one system call
        // and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).map_err(Into::into)
            })
        };
    }
}

/// A hard open-file limit above a soft one of 256 for a child: the test's own, at most 4096
/// (lowering it needs no privilege; 4096 is what a shell with a soft 1024 often has).
pub fn hard_open_file_limit_for_a_child() -> u64 {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(4096).min(4096);
    assert!(hard > 256, "these tests need a hard open-file limit above 256, not {hard}");
    hard
}

/// The soft and hard "Max open files" of a process, from /proc.
pub fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("/proc/PID/limits lists open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}
