//! `sidecar sync` with its admin API, and a builder for its command line.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{http_exchange, http_get_json, sidecar_command, Sidecar};

/// `sidecar sync ARGS --admin 127.0.0.1:0`, started and waited for.
pub struct SyncProcess {
    pub proc: Sidecar,
    pub admin: SocketAddr,
}

impl SyncProcess {
    pub fn start(args: &[&str]) -> SyncProcess {
        let mut full = vec!["sync", "--admin", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let mut cmd = sidecar_command(&full);
        cmd.stdin(Stdio::null());
        let proc = Sidecar::spawn(cmd);
        let line = proc.logs.wait_for("admin API on http://", Duration::from_secs(20));
        let admin = line
            .split("admin API on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("admin address");
        SyncProcess { proc, admin }
    }

    /// The status of destination `name` from GET /sync/{name}.
    pub fn status(&self, name: &str) -> serde_json::Value {
        http_get_json(self.admin, &format!("/sync/{name}"))
    }

    /// Everything a user can see of a running sync: its log, /sync and /status.
    pub fn visible(&self) -> String {
        let (_, status) = http_exchange(self.admin, "GET", "/status", &[], "").expect("GET /status");
        let (_, all) = http_exchange(self.admin, "GET", "/sync", &[], "").expect("GET /sync");
        format!("{}\n{status}\n{all}", self.proc.logs.text())
    }

    pub fn state(&self, name: &str) -> String {
        self.status(name)["state"].as_str().unwrap_or("").to_owned()
    }

    /// Waits for `name` to be synced at the source's `revision`. A file already synced shows
    /// its new contents a moment before the status names their revision (the rename comes
    /// first), so a new version is waited for by its revision, not by the first synced status.
    pub fn wait_revision(&self, name: &str, revision: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(name, &format!("synced at {revision}"), timeout, |s| {
            s["state"] == "synced" && s["source_revision"] == revision
        })
    }

    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(name, state, timeout, |s| s["state"] == state)
    }

    /// Polls `name`'s status until `done` holds; on timeout the panic shows the last status
    /// and the log.
    pub fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.status(name);
            if done(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "sync {name} not {what} within {timeout:?}: {last:#}\nlog:\n{}",
                self.proc.logs.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn assert_no_secret(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "a secret shows: {secret} in\n{text}");
    }
}

/// The arguments of `sidecar sync` for one source and destination, flag by flag, in the order
/// given; `start` runs them as a [`SyncProcess`], as often as a test restarts it.
pub struct SyncCommand {
    args: Vec<String>,
}

impl SyncCommand {
    /// `--source SOURCE --dest DEST`, each a URL or a path.
    pub fn new(source: impl AsRef<OsStr>, dest: impl AsRef<OsStr>) -> SyncCommand {
        SyncCommand { args: Vec::new() }.arg("--source", source).arg("--dest", dest)
    }

    /// `FLAG VALUE`, for any option.
    pub fn arg(mut self, flag: &str, value: impl AsRef<OsStr>) -> SyncCommand {
        let value = value.as_ref().to_str().unwrap_or_else(|| panic!("the value of {flag} is not UTF-8"));
        self.args.extend([flag.to_owned(), value.to_owned()]);
        self
    }

    /// A flag without a value, such as `--process-group`.
    pub fn flag(mut self, flag: &str) -> SyncCommand {
        self.args.push(flag.to_owned());
        self
    }

    pub fn poll_interval(self, interval: &str) -> SyncCommand {
        self.arg("--poll-interval", interval)
    }

    pub fn min_quiet(self, quiet: &str) -> SyncCommand {
        self.arg("--min-quiet", quiet)
    }

    pub fn retry_max(self, max: &str) -> SyncCommand {
        self.arg("--retry-max", max)
    }

    pub fn source_timeout(self, timeout: &str) -> SyncCommand {
        self.arg("--source-timeout", timeout)
    }

    pub fn exec(self, command: &str) -> SyncCommand {
        self.arg("--exec", command)
    }

    pub fn pid_file(self, path: impl AsRef<OsStr>) -> SyncCommand {
        self.arg("--pid-file", path)
    }

    pub fn health_url(self, url: &str) -> SyncCommand {
        self.arg("--health-url", url)
    }

    /// Starts `sidecar sync` with these arguments and waits for its admin API.
    pub fn start(&self) -> SyncProcess {
        SyncProcess::start(&self.args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}
