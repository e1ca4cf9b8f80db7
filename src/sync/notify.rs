//! Telling the app that its file changed: a signal to a pid from `--pid-file` (re-read every
//! time: the app may have restarted) or to every process named `--process-name` (a shared
//! process namespace in a Pod), optionally to its whole process group, each verified first
//! ([`super::process`]); a POST to
//! `--reload-url`; or `--exec CMD`. Coalescing of bursts happens before this, in the worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};
use rustix::process::{Pid, Signal};

use super::client::{ClientError, HttpClient};
use super::process::{self, AppProcess, ProcInfo};
use super::shell::{self, ShellFailure};
use super::spec::NotifySpec;
use crate::sys::human_duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    #[error("cannot read pid file {}: {source}", path.display())]
    PidFile { path: PathBuf, source: std::io::Error },
    #[error("pid file {} does not hold a pid: {content:?}", path.display())]
    BadPid { path: PathBuf, content: String },
    #[error("the pid file {} names a different process: {process} started {} after the file was written; not signalled", path.display(), human_duration(*late))]
    NotTheApp { path: PathBuf, process: String, late: Duration },
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
    #[error("reload command `{cmd}` did not finish within {}", human_duration(*timeout))]
    ExecTimeout { cmd: String, timeout: Duration },
}

impl NotifyError {
    /// The app's process is not there (escalation has nothing to act on).
    pub(crate) fn is_no_process(&self) -> bool {
        matches!(self, NotifyError::NoProcess { .. } | NotifyError::PidFile { .. } | NotifyError::NotTheApp { .. })
    }

    /// A signal was refused because the pid no longer names the app.
    pub(crate) fn is_not_the_app(&self) -> bool {
        matches!(self, NotifyError::NotTheApp { .. })
    }
}

/// The app's processes for one round of signals.
pub(crate) struct Targets {
    pub(crate) processes: Vec<AppProcess>,
    /// `--process-name` matched more than one program: none is surely the app.
    pub(crate) ambiguous: bool,
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

    /// The app's processes now, verified and held: the pid file read afresh, or a scan of
    /// /proc for the name. `ambiguous` when the name matched more than one program.
    pub(crate) fn targets(&self) -> Result<Targets, NotifyError> {
        if let Some(path) = &self.spec.pid_file {
            let info = pid_file_process(path)?;
            let pid = info.pid;
            let held = AppProcess::hold(info).map_err(|_| no_such_pid(pid))?;
            return Ok(Targets { processes: vec![held], ambiguous: false });
        }
        if let Some(name) = &self.spec.process_name {
            let found = process::named(name);
            let ambiguous = process::distinct_programs(&found) > 1;
            // One that exited since the scan is simply not a target any more.
            let processes: Vec<AppProcess> = found.into_iter().filter_map(|p| AppProcess::hold(p).ok()).collect();
            if processes.is_empty() {
                return Err(NotifyError::NoProcess {
                    what: format!("no process named {name} that this sidecar may signal"),
                });
            }
            if ambiguous {
                let pids: Vec<String> = processes.iter().map(|p| describe(&p.info)).collect();
                tracing::warn!("--process-name {name} matches more than one program: {}", pids.join(", "));
            }
            return Ok(Targets { processes, ambiguous });
        }
        Ok(Targets { processes: Vec::new(), ambiguous: false })
    }

    /// Sends `signal` to the app's processes (or their groups); returns who got it.
    pub(crate) fn signal(&self, signal: Signal, name: &str) -> Result<String, NotifyError> {
        self.signal_targets(&self.targets()?, signal, name)
    }

    /// Sends `signal` to processes verified earlier (escalation signals the ones it verified
    /// first, whatever holds their pids by then).
    pub(crate) fn signal_targets(&self, targets: &Targets, signal: Signal, name: &str) -> Result<String, NotifyError> {
        let mut done = Vec::new();
        for process in &targets.processes {
            let pid = process.info.pid.as_raw_nonzero();
            let target = if self.spec.process_group { format!("process group {pid}") } else { format!("pid {pid}") };
            match process.send(signal, self.spec.process_group) {
                Ok(()) => done.push(target),
                Err(rustix::io::Errno::SRCH) => {
                    return Err(NotifyError::NoProcess { what: format!("{target} does not exist") });
                }
                Err(e) => return Err(NotifyError::Signal { target, signal: format!("SIG{name}"), source: e.into() }),
            }
        }
        Ok(done.join(", "))
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

/// The process the pid file names, if it can be the one that wrote it: a process that started
/// after the file was last written holds a recycled pid.
fn pid_file_process(path: &Path) -> Result<ProcInfo, NotifyError> {
    let pid = read_pid_file(path)?;
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|source| NotifyError::PidFile { path: path.to_owned(), source })?;
    let info = ProcInfo::read(pid).ok_or_else(|| no_such_pid(pid))?;
    if let Some(late) = info.started_after(written) {
        return Err(NotifyError::NotTheApp { path: path.to_owned(), process: describe(&info), late });
    }
    Ok(info)
}

fn no_such_pid(pid: Pid) -> NotifyError {
    NotifyError::NoProcess { what: format!("pid {} does not exist", pid.as_raw_nonzero()) }
}

fn describe(info: &ProcInfo) -> String {
    format!("pid {} ({})", info.pid.as_raw_nonzero(), info.comm)
}

async fn exec(cmd: &str, dest: &Path, hash: &str) -> Result<(), NotifyError> {
    let envs = [("SIDECAR_SYNC_DEST", dest.as_os_str()), ("SIDECAR_SYNC_HASH", std::ffi::OsStr::new(hash))];
    shell::run(cmd, &envs, EXEC_TIMEOUT).await.map_err(|failure| match failure {
        ShellFailure::Timeout => NotifyError::ExecTimeout { cmd: cmd.to_owned(), timeout: EXEC_TIMEOUT },
        ShellFailure::Spawn(source) => NotifyError::ExecSpawn { cmd: cmd.to_owned(), source },
        ShellFailure::Failed { status, output } => NotifyError::Exec { cmd: cmd.to_owned(), status, output },
    })
}
