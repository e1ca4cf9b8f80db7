//! Adding a CA certificate to this machine's trust stores and taking it out again, as mkcert
//! does: the NSS databases that Chrome/Chromium and Firefox read (with `certutil`), and the
//! system store of Debian/Ubuntu or Fedora/RHEL when it is writable. Every store is tried;
//! each reports what happened, so one that cannot be changed does not hide the others.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which kinds of store to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrustStore {
    /// The system store (update-ca-certificates or update-ca-trust); needs root.
    System,
    /// The NSS databases of Chrome/Chromium and Firefox profiles under $HOME (certutil).
    Nss,
}

/// What happened to one store.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// For people: "NSS database /home/me/.pki/nssdb (Chrome/Chromium)".
    pub(crate) store: String,
    pub(crate) result: Result<&'static str, String>,
}

/// The system store's file for the CA, as (directory, file name, update command), by distribution.
const SYSTEM_STORES: [(&str, &str, &[&str]); 2] = [
    ("/usr/local/share/ca-certificates", "sidecar-development-ca.crt", &["update-ca-certificates"]),
    ("/etc/pki/ca-trust/source/anchors", "sidecar-development-ca.pem", &["update-ca-trust", "extract"]),
];

/// Whether the CA goes into the stores or out of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Install,
    Uninstall,
}

/// Adds `ca_pem` (a file) under `nickname` to `stores`, or takes it out again.
pub(crate) fn change(
    action: Action,
    ca_pem: &Path,
    nickname: &str,
    home: &Path,
    stores: &[TrustStore],
) -> Vec<Outcome> {
    let add = action == Action::Install;
    let mut outcomes = Vec::new();
    if stores.contains(&TrustStore::System) {
        outcomes.push(system(ca_pem, add));
    }
    if stores.contains(&TrustStore::Nss) {
        outcomes.extend(nss(home, add, |db| {
            if add {
                let ca_pem = ca_pem.to_string_lossy();
                return certutil(&["-A", "-d", &db, "-t", "C,,", "-n", nickname, "-i", &ca_pem]).map(|()| "added");
            }
            if certutil(&["-L", "-d", &db, "-n", nickname]).is_err() {
                return Ok("not there");
            }
            certutil(&["-D", "-d", &db, "-n", nickname]).map(|()| "removed")
        }));
    }
    outcomes
}

fn system(ca_pem: &Path, add: bool) -> Outcome {
    let found = SYSTEM_STORES.iter().find_map(|(dir, name, update)| {
        let program = find_program(update[0]).filter(|_| Path::new(dir).is_dir())?;
        Some((dir, name, program, &update[1..]))
    });
    let Some((dir, name, update, update_args)) = found else {
        return Outcome {
            store: "system store".into(),
            result: Err("no update-ca-certificates or update-ca-trust found (Debian/Ubuntu, Fedora/RHEL)".into()),
        };
    };
    let file = Path::new(dir).join(name);
    let store = format!("system store {}", file.display());
    let changed = if add {
        std::fs::copy(ca_pem, &file).map(|_| "added")
    } else {
        // Only this CA's file: another CA under the same name is someone else's.
        let ours = std::fs::read(&file).ok() == std::fs::read(ca_pem).ok();
        if !file.exists() || !ours {
            return Outcome { store, result: Ok("not there") };
        }
        std::fs::remove_file(&file).map(|()| "removed")
    };
    let result = match changed {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "{dir} is not writable: run `sudo sidecar cert --{}`",
            if add { "install" } else { "uninstall" }
        )),
        Err(e) => Err(format!("{}: {e}", file.display())),
        Ok(done) => run(&update, update_args).map(|()| done),
    };
    Outcome { store, result }
}

/// Runs `change` on each NSS database under `home` (as `sql:DIR`). Chromium's user database
/// is created first when installing, as Chromium itself would on its first start.
fn nss(home: &Path, add: bool, change: impl Fn(String) -> Result<&'static str, String>) -> Vec<Outcome> {
    let chromium = home.join(".pki/nssdb");
    if find_program("certutil").is_none() {
        return vec![Outcome {
            store: "NSS databases (Chrome/Chromium, Firefox)".into(),
            result: Err("certutil not found: install libnss3-tools (Debian/Ubuntu) or nss-tools (Fedora)".into()),
        }];
    }
    let mut databases = Vec::new();
    if add && !chromium.join("cert9.db").exists() {
        let created = std::fs::create_dir_all(&chromium)
            .map_err(|e| e.to_string())
            .and_then(|()| certutil(&["-N", "-d", &sql(&chromium), "--empty-password"]));
        if let Err(e) = created {
            return vec![Outcome {
                store: format!("NSS database {} (Chrome/Chromium)", chromium.display()),
                result: Err(e),
            }];
        }
    }
    for (dir, what) in [(chromium, "Chrome/Chromium"), (home.join("snap/chromium/current/.pki/nssdb"), "Chromium snap")]
    {
        if dir.join("cert9.db").exists() {
            databases.push((dir, what.to_owned()));
        }
    }
    for profiles in [home.join(".mozilla/firefox"), home.join("snap/firefox/common/.mozilla/firefox")] {
        let Ok(entries) = std::fs::read_dir(&profiles) else { continue };
        for profile in entries.flatten().map(|e| e.path()) {
            if profile.join("cert9.db").exists() {
                databases.push((profile, "Firefox profile".to_owned()));
            }
        }
    }
    databases
        .into_iter()
        .map(|(dir, what)| Outcome {
            store: format!("NSS database {} ({what})", dir.display()),
            result: change(sql(&dir)),
        })
        .collect()
}

fn sql(dir: &Path) -> String {
    format!("sql:{}", dir.display())
}

fn certutil(args: &[&str]) -> Result<(), String> {
    run(&find_program("certutil").unwrap_or_else(|| "certutil".into()), args)
}

/// Runs `program` to its end; its stderr is the error.
fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let name = program.display();
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!("{name} failed ({}): {}", output.status, stderr.trim()))
}

/// `program` on PATH, or in the sbin directories a user's PATH often lacks.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path).chain(sbin).map(|dir| dir.join(program)).find(|p| p.is_file())
}
