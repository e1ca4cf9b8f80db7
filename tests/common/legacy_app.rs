//! The stand-in legacy app (tests/apps/legacy_app.py) that `sidecar sync` signals, reloads and
//! health-checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{http_get_json, Sidecar};

/// The path of the stand-in legacy app, under tests/apps.
pub fn legacy_app_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/legacy_app.py")
}

/// The stand-in legacy app (tests/apps/legacy_app.py), killed (with its process group, when
/// it has one) on drop.
pub struct LegacyApp {
    pub proc: Sidecar,
    pub addr: SocketAddr,
    pub pid: u32,
    own_group: bool,
}

impl LegacyApp {
    /// `script` lets a test run a renamed copy (for --process-name); `own_group` puts it in a
    /// new process group.
    pub fn start_with(
        script: &Path,
        config: &Path,
        pid_file: Option<&Path>,
        child: bool,
        own_group: bool,
    ) -> LegacyApp {
        LegacyApp::launch(script, config, pid_file, child, own_group, 0)
    }

    /// On a port chosen before it starts: the app a sidecar was told about before it runs.
    pub fn start_on_port(config: &Path, pid_file: Option<&Path>, port: u16) -> LegacyApp {
        LegacyApp::launch(&legacy_app_script(), config, pid_file, false, false, port)
    }

    fn launch(
        script: &Path,
        config: &Path,
        pid_file: Option<&Path>,
        child: bool,
        own_group: bool,
        port: u16,
    ) -> LegacyApp {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("python3");
        cmd.arg("-u").arg(script).arg("--config").arg(config).arg("--port").arg(port.to_string()).stdin(Stdio::null());
        if let Some(pid_file) = pid_file {
            cmd.arg("--pid-file").arg(pid_file);
        }
        if child {
            cmd.arg("--child");
        }
        if own_group {
            cmd.process_group(0);
        }
        let proc = Sidecar::spawn(cmd);
        let line = proc.logs.wait_for("listening on ", Duration::from_secs(20));
        let mut words = line.split_whitespace().skip(2);
        let addr = words.next().and_then(|a| a.parse().ok()).expect("address in the app's first line");
        let pid = proc.pid();
        LegacyApp { proc, addr, pid, own_group }
    }

    pub fn start(config: &Path, pid_file: Option<&Path>) -> LegacyApp {
        LegacyApp::start_with(&legacy_app_script(), config, pid_file, false, false)
    }

    pub fn state(&self) -> serde_json::Value {
        http_get_json(self.addr, "/state")
    }

    pub fn hups(&self) -> u64 {
        self.state()["hups"].as_u64().unwrap_or(0)
    }

    pub fn health_url(&self) -> String {
        format!("http://{}/healthz", self.addr)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for LegacyApp {
    fn drop(&mut self) {
        if self.own_group {
            let _ =
                Command::new("kill").args(["-KILL", "--", &format!("-{}", self.pid)]).stderr(Stdio::null()).status();
        }
    }
}
