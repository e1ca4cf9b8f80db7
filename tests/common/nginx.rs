//! A real nginx, as a sync source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, read_text, wait_until, Sidecar};

/// nginx serving `root` on a loopback port, not daemonized, everything in a temp dir. Its
/// access log (just the status codes) is at `access_log`.
pub struct Nginx {
    pub proc: Option<Sidecar>,
    pub port: u16,
    /// Listening on this Unix socket instead of `port`.
    pub socket: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_on(root, free_port())
    }

    pub fn start_on(root: &Path, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let mut nginx = Nginx { proc: None, port, socket: None, dir, root: root.to_owned() };
        nginx.launch();
        nginx
    }

    /// Serving `root` on the Unix socket `socket` (`listen unix:`), an app with no TCP port.
    /// `/echo` answers with the request's Host, X-Forwarded-For and X-Forwarded-Proto.
    pub fn start_unix(root: &Path, socket: &Path) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let mut nginx = Nginx { proc: None, port: 0, socket: Some(socket.to_owned()), dir, root: root.to_owned() };
        nginx.launch();
        nginx
    }

    pub fn launch(&mut self) {
        let d = self.dir.path().display();
        let listen = match &self.socket {
            Some(socket) => format!("unix:{}", socket.display()),
            None => format!("127.0.0.1:{}", self.port),
        };
        let config = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n  log_format status '$status';\n  access_log {d}/access.log status;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {listen};\n    root {};\n    location = /broken {{ return 500 \"<html>oops</html>\"; }}\n\
             location = /echo {{ return 200 \"$http_host|$http_x_forwarded_for|$http_x_forwarded_proto\"; }}\n  }}\n}}\n",
            self.root.display()
        );
        let conf = self.dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(self.dir.path()).stdin(Stdio::null());
        self.proc = Some(Sidecar::spawn(cmd));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let error_log = self.dir.path().join("error.log");
        wait_until("nginx to listen", Duration::from_secs(20), || {
            assert!(!read_text(&error_log).contains("[emerg]"), "nginx failed: {}", read_text(&error_log));
            match &self.socket {
                Some(socket) => std::os::unix::net::UnixStream::connect(socket).is_ok(),
                None => std::net::TcpStream::connect(addr).is_ok(),
            }
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Status codes of the requests served so far.
    pub fn statuses(&self) -> Vec<String> {
        read_text(&self.dir.path().join("access.log")).lines().map(str::to_owned).collect()
    }
}
