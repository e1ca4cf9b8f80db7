//! The `--config` TOML file: its `[proxy]` defaults (`config::file::read_proxy_defaults`,
//! `load_proxy_defaults`), the proxy's command line with it (`cli::parse_from`, then
//! `ProxyConfig`), and its `[[sync]]` tables made destinations (`load_sync_sections`,
//! `SyncSpec::from_args`, `check_unique`).
//!
//! Input: the file. Invariants:
//! - every problem is reported on one line (each is a log line, or a line of `sidecar check`);
//! - the proxy stops at the first problem `sidecar check` lists, and at none when it lists none;
//! - `sidecar check` counts the `[[sync]]` tables the sync role then reads, and reports a
//!   problem exactly when the tables cannot be read;
//! - a file with a problem never configures a proxy.
#![no_main]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{load_config_file, proxy_config, read_config_file, sync_tables};

static FILE: LazyLock<PathBuf> = LazyLock::new(|| sidecar_fuzz::scratch_dir().join("sidecar.toml"));

fn one_line(message: &str) {
    assert!(!message.contains(['\n', '\r']), "a message over several lines: {message:?}");
}

fuzz_target!(|data: &[u8]| {
    let path = FILE.as_path();
    std::fs::write(path, data).expect("the scratch file is writable");
    let found = match read_config_file(path) {
        Ok(found) => found,
        Err(refused) => {
            one_line(&refused.message);
            assert_eq!(load_config_file(path).map_err(|e| e.message), Err(refused.message.clone()));
            assert!(sync_tables(path).is_err(), "unreadable for check, readable for sync");
            return;
        }
    };
    found.problems.iter().for_each(|p| one_line(p));
    match (load_config_file(path), found.problems.first()) {
        (Ok(n), None) => assert_eq!(n, found.defaults.len()),
        (Err(e), Some(first)) => assert_eq!(&e.message, first, "the proxy stops at another problem"),
        (result, first) => panic!("the proxy says {result:?}, check says {first:?}"),
    }
    match sync_tables(path) {
        Ok(tables) => {
            assert_eq!(tables.specs.len(), found.sync_tables, "check counts other tables");
            for spec in &tables.specs {
                if let Err(e) = spec {
                    one_line(&e.message);
                }
            }
        }
        Err(e) => {
            one_line(&e.message);
            assert!(found.problems.contains(&e.message), "a [[sync]] problem check does not report: {e}");
            assert_eq!(found.sync_tables, 0);
        }
    }
    // The upstream from the file when it names one, else from the command line.
    let mut argv: Vec<&OsStr> = ["sidecar", "proxy", "--config"].map(OsStr::new).to_vec();
    argv.push(path.as_os_str());
    if !data.windows(8).any(|w| w == b"upstream") {
        argv.extend(["--upstream", "http://127.0.0.1:1"].map(OsStr::new));
    }
    let config = proxy_config(&argv);
    if !found.problems.is_empty() {
        assert!(config.is_err(), "a file with problems configured a proxy: {:?}", found.problems);
    }
});
