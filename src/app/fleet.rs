//! `sidecar fleet status` and `sidecar fleet rollback`: one-shot reads and writes of a
//! fleet's keys in etcd. Exit 0 on success, 1 when etcd refused or could not be reached, 2 for
//! a start-up error.

use std::process::ExitCode;

use super::current_thread_runtime;
use super::output::{complain, say};
use crate::cli::{FleetCommand, FleetRollbackArgs, FleetStatusArgs};
use crate::sync::fleet::rollback::rollback;
use crate::sync::fleet::{read_view, FleetView};

pub(super) fn run(command: FleetCommand) -> ExitCode {
    let runtime = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        match command {
            FleetCommand::Status(args) => status(&args).await,
            FleetCommand::Rollback(args) => roll_back(&args).await,
        }
    })
}

async fn status(args: &FleetStatusArgs) -> ExitCode {
    let views = match read_view(&args.etcd.fleet, &args.etcd.gateway(), args.name.as_deref()).await {
        Ok(views) => views,
        Err(e) => {
            complain(format_args!("sidecar fleet status: {e}"));
            return ExitCode::from(1);
        }
    };
    if args.json {
        let json = serde_json::json!({ "fleet": args.etcd.fleet.to_string(), "destinations": views });
        say(serde_json::to_string_pretty(&json).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    if views.is_empty() {
        let which = args.name.as_deref().map(|n| format!(" named `{n}`")).unwrap_or_default();
        say(format_args!("no instance or rejection{which} under {}", args.etcd.fleet));
        return ExitCode::SUCCESS;
    }
    for (i, view) in views.iter().enumerate() {
        if i > 0 {
            say("");
        }
        table(view);
    }
    ExitCode::SUCCESS
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// One destination as a person reads it: instances, then rejected versions.
fn table(view: &FleetView) {
    say(format_args!("{}: {} instance(s)", view.name, view.instances.len()));
    let mut rows = vec![[
        "INSTANCE".to_owned(),
        "WAVE".into(),
        "VERSION".into(),
        "REVISION".into(),
        "STATE".into(),
        "SINCE".into(),
        "HEALTHY".into(),
    ]];
    for i in &view.instances {
        rows.push([
            i.instance.clone(),
            i.wave.to_string(),
            i.applied_hash.as_deref().map(short).unwrap_or("-").to_owned(),
            i.source_revision.clone().unwrap_or_else(|| "-".into()),
            i.state.clone(),
            i.since.clone(),
            match i.app_healthy {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        say(format_args!("  {}", cells.join("  ").trim_end()));
    }
    for i in &view.instances {
        if let Some(held) = &i.held_back {
            say(format_args!("  {}: {held}", i.instance));
        }
        if let Some(error) = &i.last_error {
            say(format_args!("  {} last error: {error}", i.instance));
        }
    }
    if view.rejected.is_empty() {
        say("  rejected versions: none");
        return;
    }
    say("  rejected versions:");
    for rejected in &view.rejected {
        say(format_args!("    {} by {} instance(s):", short(&rejected.hash), rejected.by.len()));
        for by in &rejected.by {
            say(format_args!("      {} at {}: {}", by.instance, by.at, by.reason));
        }
    }
}

async fn roll_back(args: &FleetRollbackArgs) -> ExitCode {
    match rollback(&args.etcd.fleet, &args.etcd.gateway(), &args.name, args.source.clone(), &args.to).await {
        Ok(done) => {
            match done.new_revision {
                Some(revision) => say(format_args!(
                    "wrote version {} ({} bytes, from revision {}) back to {}: now revision {revision}; the fleet applies it like any change",
                    short(&done.hash),
                    done.size,
                    done.from_revision,
                    done.key
                )),
                None => say(format_args!(
                    "{} holds version {} (from revision {}) already: nothing written",
                    done.key,
                    short(&done.hash),
                    done.from_revision
                )),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain(format_args!("sidecar fleet rollback: {e}"));
            ExitCode::from(1)
        }
    }
}
