//! Arguments, once parsed, into the runtime settings the roles take: the raw clap types stop
//! here, so nothing below `cli` knows how a setting was given.

use super::{ProxyArgs, SyncArgs};
use crate::config::{CertSource, Limits, ProxyConfig, Timeouts, UpstreamPolicy};
use crate::devcert::default_state_dir;
use crate::sync::spec::{default_history_dir, ends_with_slash, name_of, NotifySpec, Output, SpecError, SyncSpec};

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

impl SyncArgs {
    /// One destination's settings, checked.
    pub fn to_spec(&self) -> Result<SyncSpec, SpecError> {
        let name = name_of(self.name.as_deref(), &self.dest)?;
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
            source_ca: self.source_ca.clone(),
            retry_max: self.retry_max,
            require_source: self.require_source,
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
