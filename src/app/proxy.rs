//! `sidecar proxy`: the HTTPS server, its admin API, and the `[[sync]]` tables of its config
//! file, assembled into one process.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{current_thread_runtime, shutdown_on_signals};
use crate::admin::{AdminError, AdminServer, ProxyAdmin};
use crate::cli::file::{load_sync_sections, FileError};
use crate::cli::{reparse_proxy_args, ProxyArgs};
use crate::server::{ConfigSource, ProxyServer, StartError};
use crate::sync::spec::{SpecError, SyncSpec};
use crate::sync::{SyncError, SyncManager};
use crate::sys::open_files;

/// Why the proxy role did not start.
#[derive(Debug, thiserror::Error)]
enum ProxyRoleError {
    #[error(transparent)]
    Server(#[from] StartError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    ConfigFile(#[from] FileError),
    #[error(transparent)]
    SyncSpec(#[from] SpecError),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// The parts of a started proxy role.
struct ProxyRole {
    server: ProxyServer,
    admin: Option<AdminServer>,
    /// The `[[sync]]` tables of the config file, running beside the proxy.
    sync: Option<Arc<SyncManager>>,
}

pub(super) fn run(args: ProxyArgs, argv: Vec<OsString>) -> ExitCode {
    open_files::raise_soft_limit();
    // This thread runs signals, reloads and the admin API; connections run on worker threads.
    let runtime = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let shutdown = match shutdown_on_signals() {
            Ok(token) => token,
            Err(code) => return code,
        };
        match start(&args, argv, shutdown).await {
            Ok(role) => {
                role.run().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(2)
            }
        }
    })
}

/// Everything that can fail, in the order a person fixes it: certificates and listeners, the
/// admin API, then the sync tables.
async fn start(
    args: &ProxyArgs,
    argv: Vec<OsString>,
    shutdown: CancellationToken,
) -> Result<ProxyRole, ProxyRoleError> {
    let config = args.to_config();
    // A change to the --config file is read as the first start read it: flags and environment
    // still win over the file.
    let config_source: ConfigSource = Box::new(move || Ok(reparse_proxy_args(&argv)?.to_config()));
    let admin = config.admin.map(|addr| (addr, config.admin_token_file.clone()));
    let server = ProxyServer::start(config, Some(config_source), shutdown.clone())?;
    let admin = match admin {
        Some((addr, token_file)) => Some(AdminServer::bind(addr, token_file.as_deref(), shutdown.clone())?),
        None => None,
    };
    let sync = start_sync_tables(args.config.as_deref(), shutdown).await?;
    Ok(ProxyRole { server, admin, sync })
}

/// The `[[sync]]` tables of the config file, started; `None` when there are none.
async fn start_sync_tables(
    file: Option<&Path>,
    shutdown: CancellationToken,
) -> Result<Option<Arc<SyncManager>>, ProxyRoleError> {
    let Some(file) = file else { return Ok(None) };
    let tables = load_sync_sections(file)?;
    if tables.is_empty() {
        return Ok(None);
    }
    let specs = tables.iter().map(|t| t.to_spec()).collect::<Result<Vec<SyncSpec>, _>>()?;
    Ok(Some(SyncManager::start(specs, shutdown).await?))
}

impl ProxyRole {
    async fn run(self) {
        let ProxyRole { server, admin, sync } = self;
        // The admin API outlives the drain, so that probes see "not ready" rather than nothing.
        let admin_stop = CancellationToken::new();
        let admin_addr = admin.map(|mut admin| {
            admin.set_proxy(ProxyAdmin {
                live: server.live().clone(),
                reload: server.reload_handle(),
                https_addr: server.local_addr(),
                redirect_addr: server.redirect_addr(),
            });
            if let Some(sync) = &sync {
                admin.set_sync(sync.clone());
            }
            let addr = admin.local_addr();
            tokio::spawn(admin.run(admin_stop.clone()));
            addr
        });
        server.run(admin_addr).await;
        admin_stop.cancel();
        // Held until here: the sync tables' workers answer the admin API until the end.
        drop(sync);
    }
}
