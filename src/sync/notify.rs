//! Telling the app that its file changed: a signal to a pid from `--pid-file` (re-read every
//! time: the app may have restarted) or to every process named `--process-name` (a shared
//! process namespace in a Pod), optionally to its whole process group; a POST to
//! `--reload-url`; or `--exec CMD`. Coalescing of bursts happens before this, in the worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};
use rustix::process::{Pid, Signal};

use super::client::{ClientError, HttpClient};
use super::shell::{self, ShellFailure};
use super::spec::NotifySpec;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    #[error("cannot read pid file {}: {source}", path.display())]
    PidFile { path: PathBuf, source: std::io::Error },
    #[error("pid file {} does not hold a pid: {content:?}", path.display())]
    BadPid { path: PathBuf, content: String },
    #[error("no process to signal: {what}")]
    NoProcess { what: String },
    #[error("cannot send {signal} to {target}: {source}")]
    Signal { target: String, signal: String, source: std::io::Error },
    #[error("reload URL {url}: {source}")]
    ReloadUrl { url: String, source: ClientError },
    #[error("reload URL {url} answered {status}")]
    ReloadStatus { url: String, status: http::StatusCode },
    #[error("reload command `{cmd}` failed ({status}): {output}")]
    Exec { cmd: String, status: String, output: String },
    #[error("reload command `{cmd}` could not run: {source}")]
    ExecSpawn { cmd: String, source: std::io::Error },
    #[error("reload command `{cmd}` did not finish within {}", humantime::format_duration(*timeout))]
    ExecTimeout { cmd: String, timeout: Duration },
}

impl NotifyError {
    /// The app's process is not there (escalation has nothing to act on).
    pub(crate) fn is_no_process(&self) -> bool {
        matches!(self, NotifyError::NoProcess { .. } | NotifyError::PidFile { .. })
    }
}

const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const RELOAD_URL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Notifier {
    spec: NotifySpec,
    client: HttpClient,
}

impl Notifier {
    pub(crate) fn new(spec: &NotifySpec, ca_file: Option<&Path>) -> Notifier {
        Notifier { spec: spec.clone(), client: HttpClient::new(ca_file) }
    }

    pub(crate) fn is_configured(&self) -> bool {
        self.spec.signal.is_some() || self.spec.reload_url.is_some() || self.spec.exec.is_some()
    }

    pub(crate) fn targets_process(&self) -> bool {
        self.spec.targets_process()
    }

    /// Every configured way, in order; the first failure is returned after all were tried.
    pub(crate) async fn notify(&mut self, dest: &Path, hash: &str) -> Result<String, NotifyError> {
        let mut done = Vec::new();
        let mut first_error = None;
        if let Some(signal) = self.spec.signal {
            match self.signal(signal.signal, signal.name) {
                Ok(targets) => done.push(format!("SIG{} to {targets}", signal.name)),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(url) = self.spec.reload_url.clone() {
            match self.post(&url).await {
                Ok(()) => done.push(format!("POST {url}")),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(cmd) = self.spec.exec.clone() {
            match exec(&cmd, dest, hash).await {
                Ok(()) => done.push(format!("ran `{cmd}`")),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done.join(", ")),
        }
    }

    /// The app's pids now: the pid file read afresh, or a scan of /proc for the name.
    pub(crate) fn pids(&self) -> Result<Vec<Pid>, NotifyError> {
        if let Some(path) = &self.spec.pid_file {
            return read_pid_file(path).map(|pid| vec![pid]);
        }
        if let Some(name) = &self.spec.process_name {
            let pids = pids_named(name);
            if pids.is_empty() {
                return Err(NotifyError::NoProcess { what: format!("no process named {name}") });
            }
            return Ok(pids);
        }
        Ok(Vec::new())
    }

    /// Sends `signal` to the app's processes (or their groups); returns who got it.
    pub(crate) fn signal(&self, signal: Signal, name: &str) -> Result<String, NotifyError> {
        let pids = self.pids()?;
        let mut targets = Vec::new();
        for pid in pids {
            let (target, result) = if self.spec.process_group {
                (format!("process group {}", pid.as_raw_nonzero()), rustix::process::kill_process_group(pid, signal))
            } else {
                (format!("pid {}", pid.as_raw_nonzero()), rustix::process::kill_process(pid, signal))
            };
            match result {
                Ok(()) => targets.push(target),
                Err(rustix::io::Errno::SRCH) => {
                    return Err(NotifyError::NoProcess { what: format!("{target} does not exist") });
                }
                Err(e) => return Err(NotifyError::Signal { target, signal: format!("SIG{name}"), source: e.into() }),
            }
        }
        Ok(targets.join(", "))
    }

    async fn post(&mut self, url: &Uri) -> Result<(), NotifyError> {
        let reply = self
            .client
            .fetch(super::client::request(Method::POST, url, ""), RELOAD_URL_TIMEOUT, 64 * 1024)
            .await
            .map_err(|source| NotifyError::ReloadUrl { url: url.to_string(), source })?;
        if !reply.status.is_success() {
            return Err(NotifyError::ReloadStatus { url: url.to_string(), status: reply.status });
        }
        Ok(())
    }
}

fn read_pid_file(path: &Path) -> Result<Pid, NotifyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| NotifyError::PidFile { path: path.to_owned(), source })?;
    text.trim()
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .filter(|pid| !pid.is_init())
        .ok_or_else(|| NotifyError::BadPid { path: path.to_owned(), content: text.trim().chars().take(40).collect() })
}

/// Processes whose comm, or the file name of argv[0] or of the first non-option argument (the
/// script, for an interpreter), is `name`; never this process.
pub(crate) fn pids_named(name: &str) -> Vec<Pid> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(raw) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if raw == me || !is_alive(raw) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let base = |arg: &[u8]| {
            Path::new(&*String::from_utf8_lossy(arg)).file_name().map(|n| n.to_string_lossy().into_owned())
        };
        let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
        let program = args.next();
        // For `python3 -u app.py`, the script: the first argument that is not an option.
        let script = args.find(|a| !a.starts_with(b"-"));
        let matches =
            comm.trim() == name || [program, script].into_iter().flatten().any(|a| base(a).as_deref() == Some(name));
        if let Some(pid) = matches.then(|| i32::try_from(raw).ok().and_then(Pid::from_raw)).flatten() {
            pids.push(pid);
        }
    }
    pids.sort_by_key(|p| p.as_raw_nonzero());
    pids
}

/// Whether the process exists and is not a zombie (a killed child of someone else that was
/// not reaped yet is gone as far as the app is concerned).
pub(crate) fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn exec(cmd: &str, dest: &Path, hash: &str) -> Result<(), NotifyError> {
    let envs = [("SIDECAR_SYNC_DEST", dest.as_os_str()), ("SIDECAR_SYNC_HASH", std::ffi::OsStr::new(hash))];
    shell::run(cmd, &envs, EXEC_TIMEOUT).await.map_err(|failure| match failure {
        ShellFailure::Timeout => NotifyError::ExecTimeout { cmd: cmd.to_owned(), timeout: EXEC_TIMEOUT },
        ShellFailure::Spawn(source) => NotifyError::ExecSpawn { cmd: cmd.to_owned(), source },
        ShellFailure::Failed { status, output } => NotifyError::Exec { cmd: cmd.to_owned(), status, output },
    })
}
