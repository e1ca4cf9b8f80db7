//! The app's processes as the sidecar may signal them. A pid alone is not an identity: pid
//! files outlive their process (SIGKILL, OOM) and pids are recycled. A process is verified
//! (it is alive, the sidecar may signal it, and for a pid file it started before the file was
//! written) and from then on held by a pidfd, so that a signal never reaches whatever process
//! inherits the pid later, not even SIGKILL after `--kill-after`.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustix::process::{Pid, PidfdFlags, Signal};

/// How much later than its pid file a process may seem to start: /proc/uptime and the
/// start time in clock ticks are each rounded, and some filesystems keep coarse mtimes.
const START_SLACK: Duration = Duration::from_secs(1);

/// What /proc says about one process.
#[derive(Debug, Clone)]
pub(crate) struct ProcInfo {
    pub(crate) pid: Pid,
    pub(crate) ppid: i32,
    pub(crate) comm: String,
    /// Clock ticks after boot; with the pid, the process's identity.
    start_ticks: u64,
    /// The real and saved uids, which `kill(2)` compares with the sender's.
    uids: [u32; 2],
}

impl ProcInfo {
    /// `None` when there is no such process or it is a zombie (already gone for the app).
    pub(crate) fn read(pid: Pid) -> Option<ProcInfo> {
        let dir = format!("/proc/{}", pid.as_raw_nonzero());
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        // The command name is parenthesised and may itself hold spaces or parentheses.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields are numbered from 1 in proc(5); `rest` starts at field 3 (state).
        let state = *fields.first()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let ppid = fields.get(1)?.parse().ok()?;
        let start_ticks = fields.get(19)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let uid_line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        let ids: Vec<u32> = uid_line.split_whitespace().filter_map(|u| u.parse().ok()).collect();
        let uids = [*ids.first()?, *ids.get(2)?];
        Some(ProcInfo { pid, ppid, comm, start_ticks, uids })
    }

    /// When the process started, on the wall clock.
    pub(crate) fn started_at(&self) -> Option<SystemTime> {
        let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
        let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
        let age = (uptime - self.start_ticks as f64 / hz).max(0.0);
        SystemTime::now().checked_sub(Duration::from_secs_f64(age))
    }

    /// Whether `kill(2)` from this process may reach it; root may signal anyone.
    pub(crate) fn may_signal(&self) -> bool {
        let (me, real) = (rustix::process::geteuid().as_raw(), rustix::process::getuid().as_raw());
        me == 0 || self.uids.iter().any(|u| *u == me || *u == real)
    }

    /// Whether the pid still belongs to this process (it may have exited and the pid be reused).
    pub(crate) fn is_running(&self) -> bool {
        ProcInfo::read(self.pid).is_some_and(|now| now.start_ticks == self.start_ticks)
    }

    /// Whether the process started later than `written` (plus rounding): it cannot be the
    /// process that wrote its pid into a file last modified then.
    pub(crate) fn started_after(&self, written: SystemTime) -> Option<Duration> {
        let started = self.started_at()?;
        started.duration_since(written).ok().filter(|late| *late > START_SLACK)
    }
}

/// A verified process of the app, held by a pidfd.
pub(crate) struct AppProcess {
    pub(crate) info: ProcInfo,
    pidfd: OwnedFd,
}

impl AppProcess {
    /// Opens a pidfd for `info.pid` and checks that it still is the process `info` describes
    /// (it could have exited and the pid been reused between the read and the open).
    pub(crate) fn hold(info: ProcInfo) -> rustix::io::Result<AppProcess> {
        let pidfd = rustix::process::pidfd_open(info.pid, PidfdFlags::empty())?;
        if !info.is_running() {
            return Err(rustix::io::Errno::SRCH);
        }
        Ok(AppProcess { info, pidfd })
    }

    /// `signal` to the process, or to its process group: the group is signalled by id, so its
    /// leader's identity is checked right before.
    pub(crate) fn send(&self, signal: Signal, group: bool) -> rustix::io::Result<()> {
        if group {
            if !self.info.is_running() {
                return Err(rustix::io::Errno::SRCH);
            }
            return rustix::process::kill_process_group(self.info.pid, signal);
        }
        rustix::process::pidfd_send_signal(&self.pidfd, signal)
    }
}

/// Interpreters whose script, not the interpreter, is the program a person names.
const INTERPRETERS: &[&str] = &[
    "python", "node", "nodejs", "ruby", "perl", "java", "sh", "bash", "dash", "zsh", "ksh", "php", "lua", "deno", "bun",
];

/// `python3.11` is `python`, `perl5.36` is `perl`.
fn is_interpreter(program: &str) -> bool {
    let bare = program.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-');
    INTERPRETERS.contains(&bare)
}

fn file_name(arg: &[u8]) -> Option<String> {
    Path::new(&*String::from_utf8_lossy(arg)).file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether a process with this comm and command line is what `--process-name NAME` means: its
/// comm, the file name of its executable, or of its script when argv[0] is an interpreter
/// (`python3 -u app.py`), never a file some other program has open (`tail -f app.py`).
pub(crate) fn names_program(name: &str, comm: &str, cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let program = args.next().and_then(file_name);
    if comm == name || program.as_deref() == Some(name) {
        return true;
    }
    if !program.as_deref().is_some_and(is_interpreter) {
        return false;
    }
    // The script: the first argument that is not an option.
    args.find(|a| !a.starts_with(b"-")).and_then(file_name).as_deref() == Some(name)
}

/// Processes named `name` that this process may signal, never itself, in pid order.
pub(crate) fn named(name: &str) -> Vec<ProcInfo> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(raw) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if raw as u32 == me {
            continue;
        }
        let Some(info) = Pid::from_raw(raw).and_then(ProcInfo::read) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if names_program(name, &info.comm, &cmdline) && info.may_signal() {
            found.push(info);
        }
    }
    found.sort_by_key(|p| p.pid.as_raw_nonzero());
    found
}

/// How many separate programs `found` holds: a match whose parent also matches is a worker of
/// the same app (a pre-forking server), not a second candidate.
pub(crate) fn distinct_programs(found: &[ProcInfo]) -> usize {
    found.iter().filter(|p| !found.iter().any(|q| q.pid.as_raw_nonzero().get() == p.ppid)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_counts_only_under_an_interpreter() {
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        assert!(names_program("app.py", "python3", &cmd(&["/usr/bin/python3", "-u", "/srv/app.py"])));
        assert!(names_program("app.py", "python3.11", &cmd(&["python3.11", "/srv/app.py"])));
        assert!(names_program("nginx", "nginx", &cmd(&["nginx: master process"])));
        assert!(names_program("app", "x", &cmd(&["/opt/bin/app", "--flag"])));
        assert!(!names_program("app.py", "tail", &cmd(&["tail", "-f", "/srv/app.py"])));
        assert!(!names_program("app.py", "vim", &cmd(&["vim", "app.py"])));
    }
}
