//! Child processes: a handle that collects a process's output as log lines and kills it on
//! drop, bounded runs of commands that should exit, tools, and waiting for a condition.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A child process (the sidecar binary, or any program a test drives) whose stderr and stdout
/// lines are collected in `logs`; killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<LogLines>,
    /// Keeps the dev-cert state directory alive for the run.
    pub state_dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
pub struct LogLines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    closed: Mutex<bool>,
}

impl LogLines {
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a line containing `needle` appears; panics with the log after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || *self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
                // Release the lock before panicking, so the reader threads are not poisoned.
                let text = lines.join("\n");
                drop(lines);
                panic!("no log line containing {needle:?} within {timeout:?}; log so far:\n{text}");
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The socket address logged right after `marker` ("listening on https://ADDR ...",
    /// "; admin API on http://ADDR"), waiting for the line.
    pub fn address_after(&self, marker: &str, timeout: Duration) -> SocketAddr {
        let line = self.wait_for(marker, timeout);
        let addr = line.split(marker).nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        addr.trim_end_matches(';').parse().unwrap_or_else(|e| panic!("no address after {marker:?} ({e}): {line}"))
    }

    /// Waits (at most `timeout`) until the process has closed its stdout and stderr.
    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        while !*self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` (1-based) lines contain `needle` and returns the `n`-th such
    /// line; panics with the log after `timeout`. For waiting on the next reload: take
    /// `count(needle)` before the change and wait for `count + 1`.
    pub fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> String {
        assert!(n >= 1, "wait_for_nth counts from 1");
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || *self.closed.lock().unwrap() {
                panic!(
                    "fewer than {n} log lines containing {needle:?} within {timeout:?}; log so far:\n{}",
                    lines.join("\n")
                );
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

impl Sidecar {
    /// Spawns any sidecar command and collects its stderr and stdout lines.
    pub fn spawn(mut cmd: Command) -> Sidecar {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the sidecar binary");
        let logs = Arc::new(LogLines::default());
        let streams: Vec<Box<dyn std::io::Read + Send>> =
            vec![Box::new(child.stderr.take().unwrap()), Box::new(child.stdout.take().unwrap())];
        let open = Arc::new(AtomicUsize::new(streams.len()));
        for stream in streams {
            let logs = logs.clone();
            let open = open.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    logs.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    logs.changed.notify_all();
                }
                if open.fetch_sub(1, Ordering::SeqCst) == 1 {
                    *logs.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    let _guard = logs.lines.lock().unwrap_or_else(|e| e.into_inner());
                    logs.changed.notify_all();
                }
            });
        }
        Sidecar { child, addr: "0.0.0.0:0".parse().unwrap(), logs, state_dir: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader threads may not have taken the last lines yet: wait for the end of
                // both streams, so that the log is whole when this returns. Bounded, because a
                // child the sidecar started may hold the pipes open.
                self.logs.wait_closed(Duration::from_secs(2));
                return status;
            }
            assert!(Instant::now() < deadline, "sidecar did not exit within {timeout:?}; log:\n{}", self.logs.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a command that should stop by itself (a start-up failure, `check`, a tool) may run.
pub const EXIT_LIMIT: Duration = Duration::from_secs(15);

/// Runs `cmd` to its end and returns its output; a command still running after `limit` (a
/// sidecar that wrongly accepted its input and started serving) is killed and fails the test,
/// instead of hanging the suite.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.expect("collect the command's output"),
        Err(_) => {
            // Only the process started above, by its id.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let partial = rx
                .recv()
                .ok()
                .and_then(Result::ok)
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("{cmd:?} was still running after {limit:?}; its stderr:\n{partial}");
        }
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A tool the tests need; in CI its absence is a failure (the CI script installs it).
pub fn require_tool(tool: &str) -> bool {
    if which(tool) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{tool} is required in CI (scripts/install-test-deps.sh installs it)");
    eprintln!("skipping: {tool} is not installed (run scripts/install-test-deps.sh)");
    false
}

/// Whether this test runs as root (mounts and chown need it).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}
