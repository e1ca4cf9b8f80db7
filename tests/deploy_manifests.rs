//! The deployment files under deploy/ checked against the real binary, so that they cannot drift
//! from it: every YAML document under deploy/kubernetes/, the systemd unit, and the Dockerfile.
//!
//! - Every `--flag` a sidecar container (or the unit's ExecStart) passes is listed by
//!   `sidecar proxy --help` / `sidecar sync --help` of the built binary.
//! - The TOML config in a ConfigMap parses: its [proxy] keys are `sidecar proxy` options, its
//!   [[sync]] keys `sidecar sync` options, and the real binary, started with it, gets past
//!   parsing (it stops only at the certificate, which exists only in the Pod); where the build
//!   has `sidecar check`, that finds no problem with local stand-ins for the Pod's files.
//! - The effective options (flags > environment of the image and container > config file >
//!   default, computed with the binary's own parser) agree with the manifest: container ports
//!   are the --listen and --admin ports, probes hit /healthz and /readyz on the admin port, the
//!   Service's targetPort is the https port, the grace period outlasts shutdown-delay +
//!   drain-timeout, the memory limit holds --max-connections idle connections.
//! - The Pod shape: the proxy is a native sidecar (initContainers, restartPolicy Always),
//!   shareProcessNamespace only where the sync role signals the app, readiness tolerates one
//!   failed probe, the containers run non-root, read-only, without capabilities.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::CommandFactory;
use common::*;
use yaml_rust2::{Yaml, YamlLoader};

// ---------------------------------------------------------------------------------------------
// The real binary's surface.
// ---------------------------------------------------------------------------------------------

/// The long options `sidecar SUB --help` lists, or `None` when that subcommand fails.
fn help_flags(sub: &str) -> Option<BTreeSet<String>> {
    let output = sidecar_command(&[sub, "--help"]).stdin(Stdio::null()).output().unwrap();
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut flags = BTreeSet::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // Option headers ("  -h, --help", "      --listen <ADDR>"), not prose that names a flag.
        if !trimmed.starts_with('-') || !(1..=6).contains(&indent) {
            continue;
        }
        let first_long = trimmed.split(|c: char| c.is_whitespace() || c == ',').find(|w| w.starts_with("--"));
        if let Some(flag) = first_long {
            flags.insert(flag.trim_start_matches("--").split('=').next().unwrap().to_owned());
        }
    }
    assert!(flags.contains("help"), "no options found in `sidecar {sub} --help`:\n{text}");
    Some(flags)
}

struct Surface {
    proxy: BTreeSet<String>,
    /// `None` when `sidecar sync --help` fails (the sync role not built in): its flags are not checked.
    sync: Option<BTreeSet<String>>,
}

impl Surface {
    fn load() -> Surface {
        let proxy = help_flags("proxy").expect("`sidecar proxy --help` succeeds");
        let sync = help_flags("sync");
        if sync.is_none() {
            println!(
                "note: `sidecar sync --help` failed; flags of `sync` containers and [[sync]] keys are not checked"
            );
        }
        Surface { proxy, sync }
    }

    /// Checks every `--flag` in `words` (a subcommand and its arguments); `what` names the place.
    fn check_flags(&self, words: &[String], what: &str) {
        let sub = words.first().map(String::as_str).unwrap_or_else(|| panic!("{what}: no subcommand"));
        let known = match sub {
            "proxy" => &self.proxy,
            "sync" => match &self.sync {
                Some(flags) => flags,
                None => {
                    println!("note: {what}: skipped the flags of `sidecar sync` (its --help fails in this build)");
                    return;
                }
            },
            other => panic!("{what}: `{other}` is not a sidecar subcommand (proxy, sync)"),
        };
        for word in &words[1..] {
            if let Some(flag) = word.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    known.contains(flag),
                    "{what}: `--{flag}` is not an option of `sidecar {sub}` (see `sidecar {sub} --help`)"
                );
            }
        }
    }
}

/// Options given as flags in `words`.
fn given(words: &[String]) -> BTreeSet<String> {
    words.iter().filter_map(|w| w.strip_prefix("--")).map(|f| f.split('=').next().unwrap().to_owned()).collect()
}

/// Replaces the value of `--flag` in `words` (either form), or appends it.
fn set_flag(words: &mut Vec<String>, flag: &str, value: &str) {
    let long = format!("--{flag}");
    if let Some(i) = words.iter().position(|w| *w == long) {
        words[i + 1] = value.to_owned();
    } else if let Some(i) = words.iter().position(|w| w.starts_with(&format!("{long}="))) {
        words[i] = format!("{long}={value}");
    } else {
        words.push(long);
        words.push(value.to_owned());
    }
}

fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    let long = format!("--{flag}");
    let prefix = format!("{long}=");
    words.iter().enumerate().find_map(|(i, w)| match w {
        w if *w == long => words.get(i + 1).map(String::as_str),
        w => w.strip_prefix(&prefix),
    })
}

/// The long option of `sidecar SUB` (or a global one) read from environment variable `env`.
fn option_for_env(sub: &str, env: &str) -> Option<String> {
    let command = sidecar::cli::Cli::command();
    let own = command.find_subcommand(sub).into_iter().flat_map(|s| s.get_arguments());
    let global = command.get_arguments().filter(|a| a.is_global_set());
    let long =
        own.chain(global).find(|a| a.get_env().is_some_and(|e| e == env)).and_then(|a| a.get_long()).map(str::to_owned);
    long
}

/// Fails early rather than letting the test process's SIDECAR_* variables leak into the
/// in-process parse below (the binary's parser reads the environment).
fn assert_clean_environment() {
    let leaked: Vec<String> = std::env::vars().map(|(k, _)| k).filter(|k| k.starts_with("SIDECAR_")).collect();
    assert!(
        leaked.is_empty(),
        "unset {leaked:?} to run this test: the manifests' effective options are computed in-process"
    );
}

/// The effective `sidecar proxy` options for `words` run with environment `env`: flags win over
/// the environment, which wins over the config file. The environment is handed to the real
/// parser as flags for the options not already given, which keeps exactly that precedence.
fn effective_proxy(words: &[String], env: &[(String, String)]) -> sidecar::cli::ProxyArgs {
    let mut argv: Vec<String> = vec!["sidecar".into()];
    argv.extend(words.iter().cloned());
    let flags = given(words);
    for (key, value) in env {
        if let Some(long) = option_for_env("proxy", key) {
            if !flags.contains(&long) {
                argv.push(format!("--{long}={value}"));
            }
        }
    }
    match sidecar::cli::parse_from(&argv) {
        Ok(sidecar::cli::Cli { command: sidecar::cli::Command::Proxy(args), .. }) => args,
        Ok(_) => panic!("{argv:?} is not a proxy command line"),
        Err(e) => panic!("`{}` does not parse: {e}", argv.join(" ")),
    }
}

fn effective_sync(words: &[String]) -> sidecar::cli::SyncArgs {
    let mut argv: Vec<String> = vec!["sidecar".into()];
    argv.extend(words.iter().cloned());
    match sidecar::cli::parse_from(&argv) {
        Ok(sidecar::cli::Cli { command: sidecar::cli::Command::Sync(args), .. }) => args,
        Ok(_) => panic!("{argv:?} is not a sync command line"),
        Err(e) => panic!("`{}` does not parse: {e}", argv.join(" ")),
    }
}

/// Runs the real binary with `words` and `env` until it exits (bounded); (code, stderr).
fn run_bounded(words: &[String], env: &[(String, String)], bound: Duration) -> (i32, String) {
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    let state = tempfile::tempdir().unwrap();
    let mut cmd = sidecar_command(&args);
    cmd.env("XDG_STATE_HOME", state.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = output_within(cmd, bound);
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Starts the real binary with a container's command line, its config file and environment,
/// but with certificate paths that exist nowhere: it must get through every option, the config
/// file and its [[sync]] tables, and stop at the certificate (exit 2 naming it). This is
/// `sidecar check` where that command does not exist.
fn real_binary_accepts(words: &[String], env: &[(String, String)], what: &str) {
    let nowhere = tempfile::tempdir().unwrap();
    let cert = nowhere.path().join("absent/tls.crt");
    let key = nowhere.path().join("absent/tls.key");
    let mut words = words.to_vec();
    set_flag(&mut words, "cert", cert.to_str().unwrap());
    set_flag(&mut words, "key", key.to_str().unwrap());
    let (code, stderr) = run_bounded(&words, env, Duration::from_secs(20));
    assert_eq!(code, 2, "{what}: expected to stop at the (absent) certificate:\n{stderr}");
    assert!(
        stderr.contains(cert.to_str().unwrap()),
        "{what}: stopped before the certificate, so something else is wrong:\n{stderr}"
    );
    assert!(!stderr.contains("config file"), "{what}: the config file is refused:\n{stderr}");
}

/// `sidecar check` on a container's (or the unit's) `sidecar proxy` command line, when this
/// build has that command: with the same environment, and with local stand-ins for the files
/// that exist only where it is deployed (a test certificate and key, a token file), it must find
/// no problem at all.
fn check_command(words: &[String], env: &[(String, String)], token_file: bool, what: &str) {
    let has_check = sidecar_command(&["check", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if !has_check {
        println!("note: {what}: no `sidecar check` in this build; checked by starting `sidecar proxy` instead");
        return;
    }
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let token = pki.dir.path().join("token");
    std::fs::write(&token, "test-token\n").unwrap();
    let mut words = words.to_vec();
    assert_eq!(words[0], "proxy");
    words[0] = "check".into();
    set_flag(&mut words, "cert", leaf.cert.to_str().unwrap());
    set_flag(&mut words, "key", leaf.key.to_str().unwrap());
    if token_file {
        set_flag(&mut words, "admin-token-file", token.to_str().unwrap());
    }
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    let mut cmd = sidecar_command(&args);
    cmd.stdin(Stdio::null()).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{what}: `sidecar {}` finds problems:\n{text}", args.join(" "));
    println!("{what}: sidecar check: {}", stdout.lines().next().unwrap_or(""));
}

// ---------------------------------------------------------------------------------------------
// Reading the files.
// ---------------------------------------------------------------------------------------------

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
}

/// `ENV` settings of the runtime stage of the Dockerfile (the image every container runs).
fn image_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let runtime = joined.rsplit_once("\nFROM ").map(|(_, r)| r).unwrap_or(&joined);
    let mut env = Vec::new();
    for line in runtime.lines().filter_map(|l| l.trim().strip_prefix("ENV ")) {
        for pair in line.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("Dockerfile: ENV {pair} is not KEY=VALUE"));
            env.push((k.to_owned(), v.trim_matches('"').to_owned()));
        }
    }
    env
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or("")
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(y: &Yaml) -> Vec<String> {
    list(y)
        .iter()
        .map(|v| match v {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            Yaml::Real(r) => r.clone(),
            Yaml::Boolean(b) => b.to_string(),
            other => panic!("not a scalar: {other:?}"),
        })
        .collect()
}

fn toml_scalar(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// `128Mi`, `64M`, `1Gi`, bytes: in bytes.
fn memory_bytes(quantity: &str) -> u64 {
    let units: [(&str, u64); 6] =
        [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000), ("M", 1_000_000), ("G", 1_000_000_000)];
    for (suffix, factor) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap_or_else(|_| panic!("memory quantity {quantity}")) * factor;
        }
    }
    quantity.parse().unwrap_or_else(|_| panic!("memory quantity {quantity}"))
}

/// One file's documents, with the ConfigMaps it defines.
struct Manifest {
    path: PathBuf,
    docs: Vec<Yaml>,
}

impl Manifest {
    fn name(&self) -> String {
        self.path.strip_prefix(repo()).unwrap_or(&self.path).display().to_string()
    }

    fn config_map_data(&self, name: &str, key: &str) -> Option<String> {
        self.docs
            .iter()
            .find(|d| s(&d["kind"]) == "ConfigMap" && s(&d["metadata"]["name"]) == name)
            .and_then(|d| d["data"][key].as_str())
            .map(str::to_owned)
    }
}

/// What backs a path inside a container.
#[derive(Debug, PartialEq)]
enum Backing {
    Secret,
    ConfigMap { name: String, key: String },
    EmptyDir(String),
    Other,
}

/// Resolves `path` through `container`'s volumeMounts and the Pod's volumes; also whether the
/// mount is read-only.
fn backing(pod: &Yaml, container: &Yaml, path: &str) -> Option<(Backing, bool)> {
    let mount = list(&container["volumeMounts"])
        .iter()
        .filter(|m| {
            let at = s(&m["mountPath"]).trim_end_matches('/');
            path == at || path.starts_with(&format!("{at}/"))
        })
        .max_by_key(|m| s(&m["mountPath"]).len())?;
    let volume = list(&pod["volumes"]).iter().find(|v| s(&v["name"]) == s(&mount["name"]))?;
    let read_only = mount["readOnly"].as_bool().unwrap_or(false);
    let relative = path[s(&mount["mountPath"]).trim_end_matches('/').len()..].trim_start_matches('/').to_owned();
    let kind = if !volume["secret"].is_badvalue() {
        Backing::Secret
    } else if !volume["configMap"].is_badvalue() {
        let items = list(&volume["configMap"]["items"]);
        let key = items.iter().find(|i| s(&i["path"]) == relative).map(|i| s(&i["key"]).to_owned()).unwrap_or(relative);
        Backing::ConfigMap { name: s(&volume["configMap"]["name"]).to_owned(), key }
    } else if !volume["emptyDir"].is_badvalue() {
        Backing::EmptyDir(s(&volume["name"]).to_owned())
    } else {
        Backing::Other
    };
    Some((kind, read_only))
}

/// A container's arguments to `sidecar`: `command` (after the binary) then `args`.
fn sidecar_words(container: &Yaml, what: &str) -> Vec<String> {
    let command = strings(&container["command"]);
    let mut words = Vec::new();
    if let Some((binary, rest)) = command.split_first() {
        assert!(binary.ends_with("sidecar"), "{what}: command {command:?} does not run sidecar");
        words.extend(rest.iter().cloned());
    }
    words.extend(strings(&container["args"]));
    words
}

fn is_sidecar_image(container: &Yaml) -> bool {
    let image = s(&container["image"]);
    let without_digest = image.split('@').next().unwrap();
    let last = without_digest.rsplit('/').next().unwrap();
    last.split(':').next().unwrap() == "sidecar"
}

/// A port given by number or by the name of one of `container`'s ports.
fn resolve_port(container: &Yaml, port: &Yaml, what: &str) -> u16 {
    match port {
        Yaml::Integer(n) => u16::try_from(*n).unwrap(),
        Yaml::String(name) => list(&container["ports"])
            .iter()
            .find(|p| s(&p["name"]) == name)
            .and_then(|p| p["containerPort"].as_i64())
            .map(|n| u16::try_from(n).unwrap())
            .unwrap_or_else(|| panic!("{what}: no container port named {name}")),
        other => panic!("{what}: port {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------------------------

/// What one Pod template's proxy settles on, for the Service checks.
struct ProxyFacts {
    labels: BTreeMap<String, String>,
    https_port: u16,
    admin_port: Option<u16>,
    container_ports: BTreeMap<String, u16>,
}

fn check_pod(
    manifest: &Manifest,
    surface: &Surface,
    pod: &Yaml,
    labels: BTreeMap<String, String>,
    what: &str,
) -> ProxyFacts {
    let file = manifest.name();
    let what = format!("{file}: {what}");
    let pod_non_root = pod["securityContext"]["runAsNonRoot"].as_bool() == Some(true);
    if let Some(uid) = pod["securityContext"]["runAsUser"].as_i64() {
        assert_eq!(uid, 65532, "{what}: the image's user is distroless `nonroot` (65532)");
    }

    let init = list(&pod["initContainers"]);
    let regular = list(&pod["containers"]);
    assert!(
        regular.iter().all(|c| !is_sidecar_image(c)),
        "{what}: a sidecar image among the regular containers; it belongs under initContainers with restartPolicy: Always"
    );
    let env_of = |c: &Yaml| -> Vec<(String, String)> {
        let mut env = image_env();
        for var in list(&c["env"]) {
            assert!(
                var["valueFrom"].is_badvalue(),
                "{what}: env {} from a reference cannot be checked",
                s(&var["name"])
            );
            env.retain(|(k, _)| k != s(&var["name"]));
            env.push((s(&var["name"]).to_owned(), s(&var["value"]).to_owned()));
        }
        env
    };

    let mut facts = None;
    let mut sync_tables: Vec<sidecar::cli::SyncArgs> = Vec::new();
    let mut init_syncs = Vec::new();
    for container in init.iter().filter(|c| is_sidecar_image(c)) {
        let name = s(&container["name"]);
        let what = format!("{what}: container {name}");
        let mut words = sidecar_words(container, &what);
        surface.check_flags(&words, &what);

        let security = &container["securityContext"];
        assert!(pod_non_root || security["runAsNonRoot"].as_bool() == Some(true), "{what}: runAsNonRoot");
        assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}: readOnlyRootFilesystem");
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false), "{what}: allowPrivilegeEscalation");
        assert!(
            strings(&security["capabilities"]["drop"]).contains(&"ALL".to_owned()),
            "{what}: capabilities.drop ALL"
        );

        match words[0].as_str() {
            "sync" => {
                assert_ne!(
                    s(&container["restartPolicy"]),
                    "Always",
                    "{what}: a `sync --once` init container runs once"
                );
                if surface.sync.is_some() {
                    let args = effective_sync(&words);
                    let spec = args.to_spec().unwrap_or_else(|e| panic!("{what}: {e}"));
                    init_syncs.push((what.clone(), spec, container));
                }
            }
            "proxy" => {
                assert!(facts.is_none(), "{what}: a second proxy in one Pod");
                assert_eq!(
                    s(&container["restartPolicy"]),
                    "Always",
                    "{what}: a native sidecar needs restartPolicy: Always"
                );
                let env = env_of(container);
                let temp = tempfile::tempdir().unwrap();
                // The config file: from a ConfigMap of this file, written out for the parser.
                if let Some(config) = flag_value(&words, "config").map(str::to_owned) {
                    let Some((Backing::ConfigMap { name: cm, key }, _)) = backing(pod, container, &config) else {
                        panic!("{what}: --config {config} is not mounted from a ConfigMap")
                    };
                    let toml_text = manifest
                        .config_map_data(&cm, &key)
                        .unwrap_or_else(|| panic!("{what}: ConfigMap {cm} with key {key} is not in {file}"));
                    let local = temp.path().join(&key);
                    std::fs::write(&local, &toml_text).unwrap();
                    set_flag(&mut words, "config", local.to_str().unwrap());
                    let table: toml::Table =
                        toml_text.parse().unwrap_or_else(|e| panic!("{what}: ConfigMap {cm}/{key} is not TOML: {e}"));
                    for (section, value) in &table {
                        match (section.as_str(), value) {
                            ("proxy", toml::Value::Table(options)) => {
                                for key in options.keys() {
                                    let long = key.replace('_', "-");
                                    assert!(
                                        surface.proxy.contains(&long),
                                        "{what}: [proxy] `{key}` is not a `sidecar proxy` option"
                                    );
                                    // An environment variable would silently win over the file.
                                    if let Some((var, value)) = env
                                        .iter()
                                        .find(|(k, _)| option_for_env("proxy", k).as_deref() == Some(long.as_str()))
                                    {
                                        let file_value = toml_scalar(&options[key]);
                                        assert_eq!(
                                            &file_value, value,
                                            "{what}: [proxy] {key} is overridden by {var} from the image or container"
                                        );
                                    }
                                }
                            }
                            ("sync", toml::Value::Array(tables)) => {
                                for table in tables {
                                    for key in table
                                        .as_table()
                                        .map(|t| t.keys().cloned().collect::<Vec<_>>())
                                        .unwrap_or_default()
                                    {
                                        if let Some(flags) = &surface.sync {
                                            assert!(
                                                flags.contains(&key.replace('_', "-")),
                                                "{what}: [[sync]] `{key}` is not a `sidecar sync` option"
                                            );
                                        }
                                    }
                                }
                            }
                            (other, _) => panic!("{what}: unexpected table [{other}] in {cm}/{key}"),
                        }
                    }
                    if surface.sync.is_some() {
                        sync_tables =
                            sidecar::cli::file::load_sync_sections(&local).unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                }
                real_binary_accepts(&words, &env, &what);
                let args = effective_proxy(&words, &env);
                check_command(&words, &env, args.admin_token_file.is_some(), &what);

                // Listening where the Pod's ports and the kubelet can reach it.
                let mut ports = BTreeMap::new();
                for port in list(&container["ports"]) {
                    let number = u16::try_from(port["containerPort"].as_i64().unwrap()).unwrap();
                    ports.insert(s(&port["name"]).to_owned(), number);
                }
                assert!(
                    args.listen.ip().is_unspecified(),
                    "{what}: --listen {} is not reachable from the Service",
                    args.listen
                );
                assert!(
                    ports.values().any(|p| *p == args.listen.port()),
                    "{what}: no containerPort for --listen {} ({ports:?})",
                    args.listen
                );
                let admin = args.admin.unwrap_or_else(|| panic!("{what}: no --admin: the probes need the admin API"));
                assert!(
                    admin.ip().is_unspecified(),
                    "{what}: --admin {admin}: the kubelet probes the Pod IP, not loopback"
                );
                assert!(
                    ports.values().any(|p| *p == admin.port()),
                    "{what}: no containerPort for --admin {admin} ({ports:?})"
                );
                let expected: BTreeSet<u16> =
                    [Some(args.listen.port()), Some(admin.port()), args.redirect_http.map(|a| a.port())]
                        .into_iter()
                        .flatten()
                        .collect();
                assert!(
                    ports.values().all(|p| expected.contains(p)),
                    "{what}: container ports {ports:?} that the sidecar does not listen on"
                );

                // Files that come from Secrets.
                let token = args
                    .admin_token_file
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: a non-loopback --admin needs --admin-token-file"));
                for (label, path) in
                    [("--admin-token-file", Some(token)), ("--cert", args.cert.as_ref()), ("--key", args.key.as_ref())]
                {
                    let path = path.unwrap_or_else(|| panic!("{what}: no {label}")).to_str().unwrap();
                    assert!(
                        matches!(backing(pod, container, path), Some((Backing::Secret, _))),
                        "{what}: {label} {path} is not mounted from a Secret"
                    );
                }

                // Probes: open GET routes of the admin port.
                let probe = |kind: &str| -> Option<(String, u16)> {
                    let get = &container[kind]["httpGet"];
                    if container[kind].is_badvalue() {
                        return None;
                    }
                    assert!(!get.is_badvalue(), "{what}: {kind} must be an httpGet probe");
                    Some((s(&get["path"]).to_owned(), resolve_port(container, &get["port"], &what)))
                };
                assert_eq!(
                    probe("readinessProbe"),
                    Some(("/readyz".to_owned(), admin.port())),
                    "{what}: readinessProbe"
                );
                // One slow answer (a GC pause, a busy node) must not take the Pod out of the
                // endpoints; Kubernetes' default is 3.
                let failures = container["readinessProbe"]["failureThreshold"].as_i64().unwrap_or(3);
                assert!(failures > 1, "{what}: readinessProbe failureThreshold {failures} must be above 1");
                assert_eq!(
                    probe("livenessProbe"),
                    Some(("/healthz".to_owned(), admin.port())),
                    "{what}: livenessProbe"
                );
                if let Some((path, port)) = probe("startupProbe") {
                    assert!(path == "/healthz" || path == "/readyz", "{what}: startupProbe path {path}");
                    assert_eq!(port, admin.port(), "{what}: startupProbe port");
                }

                // The grace period outlasts the sidecar's shutdown, which in a native-sidecar Pod
                // starts only after the app containers (and their preStop sleeps) are done.
                let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30) as u64;
                let pre_stop: u64 = regular
                    .iter()
                    .filter_map(|c| c["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64())
                    .map(|n| n as u64)
                    .max()
                    .unwrap_or(0);
                let needed = args.shutdown_delay + args.drain_timeout + Duration::from_secs(pre_stop);
                assert!(
                    Duration::from_secs(grace) > needed,
                    "{what}: terminationGracePeriodSeconds {grace} is not more than shutdown-delay {:?} + drain-timeout {:?} + app preStop {pre_stop}s",
                    args.shutdown_delay,
                    args.drain_timeout
                );

                // Resources: the memory limit holds --max-connections idle TLS connections
                // (benchmarks: ~9 MB idle, ~28 KB per idle connection).
                let resources = &container["resources"];
                for (kind, key) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
                    assert!(!resources[kind][key].is_badvalue(), "{what}: resources.{kind}.{key}");
                }
                // Without a CPU limit, one worker per CPU means one per core of the node.
                if resources["limits"]["cpu"].is_badvalue() {
                    assert!(
                        args.workers.is_some(),
                        "{what}: no CPU limit and no --workers: one worker (and upstream pool) per node core"
                    );
                }
                let request = memory_bytes(s(&resources["requests"]["memory"]));
                let limit = memory_bytes(s(&resources["limits"]["memory"]));
                assert!(request <= limit, "{what}: memory request above the limit");
                let idle_worst = 9_000_000 + u64::from(args.max_connections) * 28_000;
                assert!(
                    idle_worst < limit,
                    "{what}: --max-connections {} idle connections need ~{} MB, over the {} MB limit",
                    args.max_connections,
                    idle_worst / 1_000_000,
                    limit / 1_000_000
                );

                facts = Some(ProxyFacts {
                    labels: labels.clone(),
                    https_port: args.listen.port(),
                    admin_port: Some(admin.port()),
                    container_ports: ports,
                });

                // Each [[sync]] destination is on a volume the sidecar writes and the app reads.
                for table in &sync_tables {
                    let dest = table.dest.to_str().unwrap();
                    let Some((Backing::EmptyDir(volume), read_only)) = backing(pod, container, dest) else {
                        panic!("{what}: [[sync]] dest {dest} is not on an emptyDir of the sidecar")
                    };
                    assert!(!read_only, "{what}: [[sync]] dest {dest} is mounted read-only in the sidecar");
                    assert!(
                        regular.iter().any(
                            |app| matches!(backing(pod, app, dest), Some((Backing::EmptyDir(v), _)) if v == volume)
                        ),
                        "{what}: no app container sees {dest} (emptyDir {volume})"
                    );
                    if table.process_name.is_some() || table.pid_file.is_some() {
                        assert_eq!(
                            pod["shareProcessNamespace"].as_bool(),
                            Some(true),
                            "{what}: signalling the app needs shareProcessNamespace"
                        );
                    }
                }
                if !sync_tables.is_empty() {
                    let specs: Vec<_> =
                        sync_tables.iter().map(|t| t.to_spec().unwrap_or_else(|e| panic!("{what}: {e}"))).collect();
                    sidecar::sync::spec::check_unique(&specs).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
            other => panic!("{what}: unknown subcommand {other}"),
        }
    }
    let facts = facts
        .unwrap_or_else(|| panic!("{what}: no `sidecar proxy` native sidecar (initContainers, restartPolicy: Always)"));
    // A shared process namespace shows the app's /proc (environment, memory) to the sidecar:
    // only where a [[sync]] table signals the app.
    let signals = sync_tables.iter().any(|t| t.process_name.is_some() || t.pid_file.is_some());
    assert_eq!(
        pod["shareProcessNamespace"].as_bool().unwrap_or(false),
        signals,
        "{what}: shareProcessNamespace only where the sync role signals the app"
    );

    // A `sync --once` init container prepares what a [[sync]] table then follows: same name
    // (so the same history and applied state), source and file.
    let specs: Vec<_> = sync_tables.iter().map(|t| t.to_spec().unwrap()).collect();
    for (what, init_spec, container) in init_syncs {
        let table = specs
            .iter()
            .find(|t| t.name == init_spec.name)
            .unwrap_or_else(|| panic!("{what}: no [[sync]] table named {}", init_spec.name));
        assert_eq!(init_spec.source, table.source, "{what}: source differs from the [[sync]] table's");
        assert_eq!(init_spec.dest, table.dest, "{what}: dest differs from the [[sync]] table's");
        assert!(
            matches!(backing(pod, container, init_spec.dest.to_str().unwrap()), Some((Backing::EmptyDir(_), false))),
            "{what}: dest not on a writable emptyDir"
        );
    }
    facts
}

fn check_service(manifest: &Manifest, service: &Yaml, pods: &[ProxyFacts]) {
    let name = s(&service["metadata"]["name"]);
    let what = format!("{}: Service {name}", manifest.name());
    let selector: BTreeMap<String, String> = service["spec"]["selector"]
        .as_hash()
        .into_iter()
        .flatten()
        .map(|(k, v)| (s(k).to_owned(), s(v).to_owned()))
        .collect();
    assert!(!selector.is_empty(), "{what}: no selector");
    let pod = pods
        .iter()
        .find(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("{what}: its selector {selector:?} matches no Pod template in this file"));
    let ports = list(&service["spec"]["ports"]);
    let https = ports.iter().find(|p| p["port"].as_i64() == Some(443)).unwrap_or_else(|| panic!("{what}: no port 443"));
    let target = match &https["targetPort"] {
        Yaml::Integer(n) => u16::try_from(*n).unwrap(),
        Yaml::String(name) => {
            *pod.container_ports.get(name).unwrap_or_else(|| panic!("{what}: targetPort {name} is no sidecar port"))
        }
        other => panic!("{what}: targetPort {other:?}"),
    };
    assert_eq!(target, pod.https_port, "{what}: port 443 must target the sidecar's https port");
    for port in ports {
        let target = port["targetPort"]
            .as_i64()
            .map(|n| n as u16)
            .or_else(|| port["targetPort"].as_str().and_then(|n| pod.container_ports.get(n).copied()));
        assert!(
            target != pod.admin_port,
            "{what}: the admin port is for probes and operators, not published by the Service"
        );
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_binary() {
    assert_clean_environment();
    let surface = Surface::load();
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy/kubernetes"), &mut files);
    files.sort();
    assert!(files.len() >= 2, "deploy/kubernetes holds deployment.yaml and etcd-sync.yaml: {files:?}");
    let mut workloads = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        let manifest = Manifest { path, docs: docs.into_iter().filter(|d| !d.is_null()).collect() };
        let mut pods = Vec::new();
        for doc in &manifest.docs {
            let kind = s(&doc["kind"]);
            assert!(
                !kind.is_empty() && !s(&doc["apiVersion"]).is_empty(),
                "{}: a document without kind/apiVersion",
                manifest.name()
            );
            let what = format!("{kind} {}", s(&doc["metadata"]["name"]));
            let (pod, labels) = match kind {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    (&doc["spec"]["template"]["spec"], &doc["spec"]["template"]["metadata"]["labels"])
                }
                "Pod" => (&doc["spec"], &doc["metadata"]["labels"]),
                _ => continue,
            };
            let labels: BTreeMap<String, String> =
                labels.as_hash().into_iter().flatten().map(|(k, v)| (s(k).to_owned(), s(v).to_owned())).collect();
            if kind != "Pod" {
                let selector = &doc["spec"]["selector"]["matchLabels"];
                for (k, v) in selector.as_hash().into_iter().flatten() {
                    assert_eq!(
                        labels.get(s(k)).map(String::as_str),
                        Some(s(v)),
                        "{}: {what}: selector does not match the template",
                        manifest.name()
                    );
                }
            }
            pods.push(check_pod(&manifest, &surface, pod, labels, &what));
            workloads += 1;
        }
        let services: Vec<&Yaml> = manifest.docs.iter().filter(|d| s(&d["kind"]) == "Service").collect();
        assert!(!services.is_empty() || pods.is_empty(), "{}: a workload without a Service", manifest.name());
        for service in services {
            check_service(&manifest, service, &pods);
        }
    }
    assert!(workloads >= 2, "expected a workload in deployment.yaml and in etcd-sync.yaml");
}

// ---------------------------------------------------------------------------------------------
// The systemd unit.
// ---------------------------------------------------------------------------------------------

/// `[Section]` → list of (key, value), continuation lines joined, comments dropped.
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("sidecar.service: `{line}` is not KEY=VALUE"));
        sections.entry(current.clone()).or_default().push((key.trim().to_owned(), value.trim().to_owned()));
    }
    sections
}

#[test]
fn systemd_unit_agrees_with_the_binary() {
    assert_clean_environment();
    let surface = Surface::load();
    let path = repo().join("deploy/systemd/sidecar.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let unit = parse_unit(&text);
    let service = unit.get("Service").expect("a [Service] section");
    let get = |key: &str| -> Vec<&str> { service.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect() };
    let one = |key: &str| -> &str {
        let values = get(key);
        assert_eq!(values.len(), 1, "sidecar.service: {key}= set {} times", values.len());
        values[0]
    };

    let exec = one("ExecStart");
    let words: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
    assert!(words[0].ends_with("/sidecar"), "ExecStart runs {}", words[0]);
    let words = words[1..].to_vec();
    assert_eq!(words[0], "proxy", "ExecStart runs `sidecar proxy`");
    surface.check_flags(&words, "sidecar.service ExecStart");
    assert!(
        words.iter().all(|w| !w.contains('$')),
        "ExecStart: variables are not expanded by this check; put options in /etc/default/sidecar instead"
    );

    // The unit's own Environment= lines, as the service sees them (systemd expands %S).
    let env: Vec<(String, String)> = get("Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|pair| {
            let (k, v) = pair.trim_matches('"').split_once('=').unwrap();
            (k.to_owned(), v.replace("%S", "/var/lib"))
        })
        .collect();
    assert!(
        env.contains(&("SIDECAR_STATE_DIR".into(), "/var/lib/sidecar".into())),
        "Environment=SIDECAR_STATE_DIR=%S/sidecar: {env:?}"
    );
    real_binary_accepts(&words, &env, "sidecar.service ExecStart");
    let args = effective_proxy(&words, &env);
    check_command(&words, &env, args.admin_token_file.is_some(), "sidecar.service ExecStart");

    assert_eq!(one("Type"), "exec");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID", "SIGHUP reloads certificates and config");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "sidecar");
    assert_eq!(one("EnvironmentFile"), "-/etc/default/sidecar");
    for (key, value) in
        [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes")]
    {
        assert_eq!(one(key), value, "sidecar.service: {key}");
    }
    let stop = humantime::parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec as a duration");
    assert!(
        stop > args.shutdown_delay + args.drain_timeout,
        "TimeoutStopSec {stop:?} is not more than shutdown-delay {:?} + drain-timeout {:?}",
        args.shutdown_delay,
        args.drain_timeout
    );
    // No capabilities, unless it binds a privileged port itself.
    let privileged = args.listen.port() < 1024 || args.redirect_http.is_some_and(|a| a.port() < 1024);
    let bounding = get("CapabilityBoundingSet");
    let ambient = get("AmbientCapabilities");
    if privileged {
        assert_eq!(bounding, ["CAP_NET_BIND_SERVICE"], "a port below 1024 needs CAP_NET_BIND_SERVICE, and only that");
        assert_eq!(ambient, ["CAP_NET_BIND_SERVICE"]);
    } else {
        assert_eq!(bounding, [""], "CapabilityBoundingSet= (empty): --listen {} needs no capability", args.listen);
        assert!(ambient.is_empty(), "AmbientCapabilities with --listen {}", args.listen);
    }
    assert!(
        args.admin.is_none_or(|a| a.ip().is_loopback() || args.admin_token_file.is_some()),
        "an admin API off loopback needs a token file"
    );

    // systemd's own parser, where it is installed: no unknown keys or bad values.
    if which("systemd-analyze") {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sidecar.service");
        std::fs::write(&copy, text.replace("/usr/local/bin/sidecar", sidecar_bin())).unwrap();
        let output = std::process::Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let complaints: Vec<&str> = report.lines().filter(|l| l.contains("sidecar.service")).collect();
        assert!(output.status.success() && complaints.is_empty(), "systemd-analyze verify:\n{report}");
    } else {
        println!("note: systemd-analyze is not installed; the unit is checked by this test's own parser only");
    }
}

#[test]
fn dockerfile_builds_the_image_the_manifests_expect() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let instructions: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let froms: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "a multi-stage build");
    // buildah and podman refuse short names under the default registries.conf.
    for from in &froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let registry = image.split('/').next().unwrap();
        assert!(
            image.contains('/') && (registry.contains('.') || registry.contains(':') || registry == "localhost"),
            "Dockerfile: {from}: name the registry (docker.io/library/..., gcr.io/...)"
        );
    }
    // Symbols and line tables are ~80% of the binary: the image ships it stripped.
    let joined = text.replace("\\\n", " ");
    assert!(
        joined.lines().any(|l| l.starts_with("RUN ") && l.contains("strip target/release/sidecar")),
        "Dockerfile: strip the binary"
    );
    // An ENV in the image wins over the keys of a mounted --config file, silently: defaults the
    // image needs go in flags or the file, where the user's file overrides them.
    let env = image_env();
    assert!(env.iter().all(|(k, _)| !k.starts_with("SIDECAR_")), "Dockerfile: runtime ENV {env:?} beats the TOML file");
    assert!(
        froms.last().unwrap().contains("distroless") && froms.last().unwrap().contains(":nonroot"),
        "runtime: distroless nonroot"
    );
    assert!(
        instructions.iter().any(|l| l.starts_with("RUN ") && l.contains("cargo build --release")),
        "a release build"
    );
    assert!(instructions.contains(&"USER nonroot:nonroot"));
    assert!(instructions.contains(&"EXPOSE 8443 9901"));
    assert!(
        instructions.contains(&r#"ENTRYPOINT ["/usr/local/bin/sidecar"]"#),
        "containers give the subcommand as their first argument"
    );
    // distroless has no shell or curl for a HEALTHCHECK; orchestrators probe the admin API.
    assert!(!instructions.iter().any(|l| l.starts_with("HEALTHCHECK")));
    // cargo refuses a manifest whose declared targets are missing, and the image copies only
    // Cargo.toml, Cargo.lock and src/: each declared bench, test or example needs a stub.
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap().parse().unwrap();
    for (kind, dir) in [("bench", "benches"), ("test", "tests"), ("example", "examples")] {
        for target in manifest.get(kind).and_then(|v| v.as_array()).into_iter().flatten() {
            let name = target["name"].as_str().unwrap();
            let path = target
                .get("path")
                .and_then(|p| p.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            assert!(text.contains(&path), "Dockerfile: Cargo.toml declares {kind} `{name}` at {path}, which the build stage neither copies nor stubs");
        }
    }
}
