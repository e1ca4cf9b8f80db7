//! The real `sidecar` binary: `sidecar proxy` started in front of an upstream and waited for,
//! runs that should fail at start-up, and the ports it listens on.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{output_within, Sidecar, TestPki, Upstream, EXIT_LIMIT};

pub fn sidecar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecar")
}

/// A `sidecar` command with an isolated environment: no SIDECAR_* or RUST_LOG leaks in.
pub fn sidecar_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SIDECAR_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl Sidecar {
    /// Starts `sidecar proxy ARGS --listen 127.0.0.1:0` and waits until it listens.
    pub fn start(args: &[&str]) -> Sidecar {
        Sidecar::start_with(args, |_| {})
    }

    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Sidecar {
        let state_dir = tempfile::tempdir().unwrap();
        let mut full_args = vec!["proxy", "--listen", "127.0.0.1:0"];
        full_args.extend_from_slice(args);
        let mut cmd = sidecar_command(&full_args);
        cmd.env("XDG_STATE_HOME", state_dir.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        configure(&mut cmd);
        let mut sidecar = Sidecar::spawn(cmd);
        sidecar.state_dir = Some(state_dir);
        sidecar.addr = sidecar.logs.address_after("listening on https://", Duration::from_secs(20));
        sidecar
    }

    /// The admin API's address, from the start-up line ("; admin API on http://ADDR").
    pub fn admin_addr(&self) -> SocketAddr {
        self.logs.address_after("admin API on http://", Duration::from_secs(5))
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
}

/// Runs `sidecar ARGS` to completion (for start-up failures), bounded by `EXIT_LIMIT`, and
/// returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = sidecar_command(args);
    cmd.env("XDG_STATE_HOME", state_dir.path());
    let output = output_within(cmd, EXIT_LIMIT);
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `sidecar proxy` in front of `upstream` (a URL) with a fresh leaf of `pki`, `extra` flags and
/// the command adjusted by `configure`.
pub fn start_sidecar(upstream: &str, pki: &TestPki, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Sidecar {
    let leaf = pki.issue("leaf");
    let mut args =
        vec!["--upstream", upstream, "--cert", leaf.cert.to_str().unwrap(), "--key", leaf.key.to_str().unwrap()];
    args.extend_from_slice(extra);
    Sidecar::start_with(&args, configure)
}

/// An upstream, a test PKI and a sidecar in front of the upstream with a leaf of that PKI.
pub async fn proxy_in_front_of_upstream(extra: &[&str]) -> (Upstream, TestPki, Sidecar) {
    proxy_in_front_of_upstream_with(extra, |_| {}).await
}

/// The same, with the sidecar's command adjusted first (environment variables, say).
pub async fn proxy_in_front_of_upstream_with(
    extra: &[&str],
    configure: impl FnOnce(&mut Command),
) -> (Upstream, TestPki, Sidecar) {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let sidecar = start_sidecar(&upstream.url(), &pki, extra, configure);
    (upstream, pki, sidecar)
}

/// Sockets in LISTEN state on `port` (IPv4 and IPv6), from /proc/net.
pub fn listeners_on(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else { continue };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                count += 1;
            }
        }
    }
    count
}

/// A port that was free a moment ago (for servers that cannot report the port they picked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
