//! Arguments, once parsed, into the runtime settings the roles take: the raw clap types stop
//! here, so nothing below `cli` knows how a setting was given.

use std::path::PathBuf;

use super::{FleetEtcdArgs, ProxyArgs, SyncArgs};
use crate::config::{CertSource, Limits, ProxyConfig, Timeouts, UpstreamPolicy};
use crate::devcert::default_state_dir;
use crate::sync::fleet::gateway::GatewayOptions;
use crate::sync::fleet::{host_name, FleetSpec};
use crate::sync::spec::{
    default_history_dir, ends_with_slash, name_of, NotifySpec, Output, SourceAuth, SourceSpec, SpecError, SyncSpec,
};

impl ProxyArgs {
    /// The proxy's configuration snapshot.
    pub(crate) fn to_config(&self) -> ProxyConfig {
        let cert = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => CertSource::Files { cert: cert.clone(), key: key.clone() },
            // `parse_from` refuses a lone --cert or --key before we get here.
            _ => CertSource::DevSelfSigned { state_dir: self.state_dir.clone().unwrap_or_else(default_state_dir) },
        };
        ProxyConfig {
            listen: self.listen,
            upstream: self.upstream.clone(),
            forwarded: self.forwarded_headers,
            timeouts: Timeouts {
                tls_handshake: self.tls_handshake_timeout,
                header_read: self.header_read_timeout,
                idle: self.idle_timeout,
                upstream: self.upstream_timeout,
                upstream_connect: self.upstream_connect_timeout,
                upstream_idle: self.upstream_idle_timeout,
                drain: self.drain_timeout,
            },
            limits: Limits { max_header_size: self.max_header_size, max_connections: self.max_connections },
            cert,
            sni: self.sni_cert.clone(),
            client_ca: self.client_ca.clone(),
            client_auth: self.client_auth,
            redirect_http: self.redirect_http,
            public_https_port: self.public_https_port,
            config_file: self.config.clone(),
            reload_debounce: self.reload_debounce,
            admin: self.admin,
            admin_token_file: self.admin_token_file.clone(),
            shutdown_delay: self.shutdown_delay,
            workers: self.workers.map(usize::from),
            access_log: self.access_log.clone(),
            access_log_format: self.access_log_format,
            proxy_protocol: self.proxy_protocol,
            upstream_policy: UpstreamPolicy {
                health_path: self.upstream_health_path.clone(),
                keepalive: self.upstream_keepalive,
                upgrade_protocols: self.upgrade_protocols.iter().map(|p| p.to_ascii_lowercase()).collect(),
                max_requests_per_connection: self.max_requests_per_connection,
            },
        }
    }
}

/// The longest wait for one request to the fleet's etcd.
const FLEET_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

impl FleetEtcdArgs {
    /// How `sidecar fleet` reaches etcd.
    pub(crate) fn gateway(&self) -> GatewayOptions {
        let auth = SourceAuth {
            user: self.fleet_user.clone(),
            password_file: self.fleet_password_file.clone(),
            ca: self.fleet_ca.clone(),
            cert: self.fleet_cert.clone(),
            key: self.fleet_key.clone(),
            ..SourceAuth::default()
        };
        GatewayOptions { auth, timeout: self.timeout }
    }
}

impl SyncArgs {
    /// The fleet's credentials: each `--fleet-*` given, else (same cluster, one set of
    /// credentials) the etcd source's `--source-*`. A user and its password, or a certificate
    /// and its key, come from one place, never half from each.
    fn fleet_auth(&self) -> SourceAuth {
        let etcd_source = matches!(self.source, SourceSpec::Etcd { .. });
        let inherit = |fleet: &Option<PathBuf>, source: &Option<PathBuf>| {
            fleet.clone().or_else(|| source.clone().filter(|_| etcd_source))
        };
        let (user, password_file) = match (&self.fleet_user, &self.fleet_password_file) {
            (Some(user), Some(file)) => (Some(user.clone()), Some(file.clone())),
            _ if etcd_source => (self.source_user.clone(), self.source_password_file.clone()),
            _ => (None, None),
        };
        let (cert, key) = match (&self.fleet_cert, &self.fleet_key) {
            (Some(cert), Some(key)) => (Some(cert.clone()), Some(key.clone())),
            _ if etcd_source => (self.source_cert.clone(), self.source_key.clone()),
            _ => (None, None),
        };
        SourceAuth {
            user,
            password_file,
            cert,
            key,
            ca: inherit(&self.fleet_ca, &self.source_ca),
            ..SourceAuth::default()
        }
    }

    /// The `--fleet-*` options given, by name (refused without --fleet).
    fn fleet_options_given(&self) -> Vec<&'static str> {
        let given = [
            ("--fleet-ca", self.fleet_ca.is_some()),
            ("--fleet-cert", self.fleet_cert.is_some()),
            ("--fleet-key", self.fleet_key.is_some()),
            ("--fleet-user", self.fleet_user.is_some()),
            ("--fleet-password-file", self.fleet_password_file.is_some()),
        ];
        given.into_iter().filter(|(_, given)| *given).map(|(name, _)| name).collect()
    }

    /// One destination's settings, checked.
    pub fn to_spec(&self) -> Result<SyncSpec, SpecError> {
        let name = name_of(self.name.as_deref(), &self.dest)?;
        let fleet_options = self.fleet_options_given();
        if self.fleet.is_none() && !fleet_options.is_empty() {
            let message = format!("{} apply only with --fleet", fleet_options.join(", "));
            return Err(SpecError::Auth { name, message });
        }
        let targets_process = self.pid_file.is_some() || self.process_name.is_some();
        let spec = SyncSpec {
            source: self.source.clone(),
            dest: self.dest.clone(),
            notify: NotifySpec {
                pid_file: self.pid_file.clone(),
                process_name: self.process_name.clone(),
                signal: targets_process.then_some(self.signal),
                process_group: self.process_group,
                kill_ambiguous: self.kill_ambiguous,
                reload_url: self.reload_url.clone(),
                exec: self.exec.clone(),
            },
            health_url: self.health_url.clone(),
            health_timeout: self.health_timeout,
            kill_after: self.kill_after,
            validate: self.validate,
            check_cmd: self.check_cmd.clone(),
            history_dir: self.history_dir.clone().unwrap_or_else(|| default_history_dir(&self.dest, &name)),
            history_keep: self.history_keep,
            poll_interval: self.poll_interval,
            min_quiet: self.min_quiet,
            max_quiet: self.max_quiet,
            max_size: self.max_size,
            source_timeout: self.source_timeout,
            source_auth: SourceAuth {
                user: self.source_user.clone(),
                password_file: self.source_password_file.clone(),
                token_file: self.source_token_file.clone(),
                cert: self.source_cert.clone(),
                key: self.source_key.clone(),
                ca: self.source_ca.clone(),
                headers: self.source_header.clone(),
            },
            retry_max: self.retry_max,
            require_source: self.require_source,
            max_apply_rate: self.max_apply_rate,
            apply_jitter: self.apply_jitter,
            fleet: self.fleet.clone().map(|url| FleetSpec {
                url,
                instance: self.instance.clone().unwrap_or_else(host_name),
                reject_after: self.fleet_reject_after,
                waves: self.fleet_waves,
                wave_delay: self.fleet_wave_delay,
                lease_ttl: self.fleet_lease_ttl,
                // A hung etcd delays an apply by this much at most: the fleet keys are small.
                gateway: GatewayOptions {
                    auth: self.fleet_auth(),
                    timeout: self.source_timeout.min(FLEET_TIMEOUT_MAX),
                },
            }),
            output: match (&self.template, ends_with_slash(&self.dest)) {
                (Some(template), _) => Output::Template(template.clone()),
                (None, true) => Output::Directory,
                (None, false) => Output::File,
            },
            name,
        };
        spec.check()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_from, Command};
    use crate::config::ProxyConfig;

    fn config_from(argv: &[&str]) -> ProxyConfig {
        let mut full = vec!["sidecar", "proxy", "--upstream", "http://127.0.0.1:1"];
        full.extend_from_slice(argv);
        match parse_from(full).unwrap().command {
            Command::Proxy(args) => args.to_config(),
            _ => unreachable!("a proxy command line"),
        }
    }

    #[test]
    fn fleet_options_come_from_flags_or_a_sync_table_and_default_to_the_host_name() {
        let argv = ["sidecar", "sync", "--source", "etcd://127.0.0.1:2379/k", "--dest", "/tmp/sidecar-test/k"];
        let Command::Sync(args) = parse_from(argv).unwrap().command else { unreachable!("a sync command line") };
        assert!(args.to_spec().unwrap().fleet.is_none(), "off unless asked for");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidecar.toml");
        std::fs::write(
            &file,
            "[[sync]]\nsource = \"etcd://127.0.0.1:2379/k\"\ndest = \"/tmp/sidecar-test/k\"\n\
             fleet = \"etcd+https://etcd:2379/fleet\"\nfleet-waves = 3\nfleet-wave-delay = \"90s\"\n\
             fleet-reject-after = 2\nsource-ca = \"/etc/ca.pem\"\n",
        )
        .unwrap();
        let tables = super::super::file::load_sync_sections(&file).unwrap();
        let fleet = tables[0].to_spec().unwrap().fleet.unwrap();
        assert_eq!(fleet.url.prefix, "/fleet/");
        assert_eq!((fleet.waves, fleet.reject_after), (3, 2));
        assert_eq!(fleet.wave_delay, std::time::Duration::from_secs(90));
        assert_eq!(fleet.lease_ttl, std::time::Duration::from_secs(10));
        assert_eq!(fleet.instance, crate::sync::fleet::host_name());
        assert_eq!(
            fleet.gateway.auth.ca.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem")),
            "--source-ca serves the fleet's TLS too"
        );
        std::fs::write(&file, "[[sync]]\nsource = \"/tmp/s\"\ndest = \"/tmp/d\"\ninstance = \"a/b\"\n").unwrap();
        let message = super::super::file::load_sync_sections(&file).unwrap_err().to_string();
        assert!(message.contains("an instance id holds letters"), "{message}");
    }

    fn sync_spec(argv: &[&str]) -> Result<crate::sync::spec::SyncSpec, String> {
        let mut full = vec!["sidecar", "sync", "--dest", "/tmp/sidecar-test/k"];
        full.extend_from_slice(argv);
        let Command::Sync(args) = parse_from(full).map_err(|e| e.to_string())?.command else {
            unreachable!("a sync command line")
        };
        args.to_spec().map_err(|e| e.to_string())
    }

    #[test]
    fn the_fleet_uses_its_own_credentials_else_the_etcd_sources_and_never_half_of_each() {
        use std::path::Path;
        let etcd = ["--source", "etcd+https://127.0.0.1:2379/k", "--fleet", "etcd+https://127.0.0.1:2379/f/"];
        let source_creds = [
            "--source-user",
            "app",
            "--source-password-file",
            "/run/s/pw",
            "--source-cert",
            "/run/s/c.pem",
            "--source-key",
            "/run/s/k.pem",
            "--source-ca",
            "/run/s/ca.pem",
        ];
        // Same cluster: the source's credentials serve the fleet.
        let spec = sync_spec(&[&etcd[..], &source_creds[..]].concat()).unwrap();
        let auth = spec.fleet.unwrap().gateway.auth;
        assert_eq!(auth.user.as_deref(), Some("app"));
        assert_eq!(auth.password_file.as_deref(), Some(Path::new("/run/s/pw")));
        assert_eq!(auth.cert.as_deref(), Some(Path::new("/run/s/c.pem")));
        assert_eq!(auth.ca.as_deref(), Some(Path::new("/run/s/ca.pem")));

        // Each --fleet-* given wins; a user and its password come from one place.
        let fleet_creds =
            ["--fleet-user", "fleet", "--fleet-password-file", "/run/f/pw", "--fleet-ca", "/run/f/ca.pem"];
        let spec = sync_spec(&[&etcd[..], &source_creds[..], &fleet_creds[..]].concat()).unwrap();
        let auth = spec.fleet.unwrap().gateway.auth;
        assert_eq!(auth.user.as_deref(), Some("fleet"));
        assert_eq!(auth.password_file.as_deref(), Some(Path::new("/run/f/pw")));
        assert_eq!(auth.ca.as_deref(), Some(Path::new("/run/f/ca.pem")));
        assert_eq!(auth.cert.as_deref(), Some(Path::new("/run/s/c.pem")), "not given: the source's");
        assert_eq!(auth.token_file, None);

        // A file source lends nothing, and a client certificate for the fleet is fine there.
        let file = ["--source", "/tmp/sidecar-test/src", "--fleet", "etcd+https://127.0.0.1:2379/f/"];
        let spec = sync_spec(&[&file[..], &["--fleet-cert", "/c.pem", "--fleet-key", "/k.pem"][..]].concat()).unwrap();
        let auth = spec.fleet.unwrap().gateway.auth;
        assert_eq!((auth.cert.as_deref(), auth.user.as_deref()), (Some(Path::new("/c.pem")), None));
        let spec = sync_spec(&[&file[..], &["--source-ca", "/ca.pem"][..]].concat());
        assert!(
            spec.is_ok_and(|s| s.fleet.unwrap().gateway.auth.ca.is_none()),
            "a file source's CA is not the fleet's"
        );

        // Refused: --fleet-* without --fleet, a certificate over plain HTTP, half a login.
        let message =
            sync_spec(&["--source", "/tmp/s", "--fleet-user", "u", "--fleet-password-file", "/p"]).unwrap_err();
        assert!(message.contains("--fleet-user, --fleet-password-file apply only with --fleet"), "{message}");
        let plain =
            ["--source", "/tmp/s", "--fleet", "etcd://127.0.0.1:2379/f/", "--fleet-cert", "/c", "--fleet-key", "/k"];
        let message = sync_spec(&plain).unwrap_err();
        assert!(message.contains("needs TLS to its etcd"), "{message}");
        assert!(sync_spec(&["--source", "/tmp/s", "--fleet", "etcd://h:1/f/", "--fleet-user", "u"]).is_err());
    }

    #[test]
    fn proxy_protocol_is_off_by_default_on_by_flag_or_file_and_needs_a_restart() {
        assert!(!config_from(&[]).proxy_protocol);
        assert!(config_from(&["--proxy-protocol"]).proxy_protocol);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidecar.toml");
        std::fs::write(&file, "[proxy]\nproxy-protocol = true\n").unwrap();
        let on = config_from(&["--config", file.to_str().unwrap()]);
        assert!(on.proxy_protocol);
        // A flag turns off what the file turned on.
        assert!(!config_from(&["--config", file.to_str().unwrap(), "--proxy-protocol=false"]).proxy_protocol);
        std::fs::write(&file, "[proxy]\nproxy_protocol = false\n").unwrap();
        let mut off = config_from(&["--config", file.to_str().unwrap()]);
        assert!(!off.proxy_protocol);

        // A reload that turns it off keeps it on, and says so.
        assert_eq!(off.keep_restart_only(&on), vec!["proxy-protocol"]);
        assert!(off.proxy_protocol);
        assert_eq!(off, on);
    }
}
