//! `ember snapshot …`: freeze a running sandbox into a named template, and
//! list, show and delete templates.

use std::process::ExitCode;

use ember_control::wire::{CreateSnapshotRequest, DeletedSnapshot, Snapshot, SnapshotList};
use serde_json::Value;

use super::api::{Api, encode, typed};
use super::output::{self, Table, bytes, fields, print_json, short_time};
use super::sandbox::sandbox_path;
use super::{ClientArgs, config};

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    api: ClientArgs,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// Freeze a running sandbox into a template NAME (the sandbox keeps
    /// running); `sandbox create --template NAME` starts new ones from it.
    Create {
        /// The sandbox to freeze.
        sandbox: String,
        /// Template name: 1-63 of a-z 0-9 . _ -, starting with a letter or digit.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List your team's templates.
    #[command(alias = "ls")]
    List {
        /// Print a JSON array of the server's snapshot objects.
        #[arg(long)]
        json: bool,
    },
    /// Show one template.
    Get {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a template: the name goes now, its data once nothing uses it.
    #[command(alias = "rm")]
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("snapshot", dispatch(args).await))
}

async fn dispatch(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    match args.command {
        SnapshotCommand::Create {
            sandbox,
            name,
            json,
        } => {
            let bar = output::spinner(format!("snapshotting {sandbox} as {name}"));
            let v = api
                .post(
                    &format!("{}/snapshots", sandbox_path(&sandbox)),
                    &CreateSnapshotRequest { name: name.clone() },
                )
                .await;
            let v = match v {
                Ok(v) => settle_snapshot(&api, v, &name).await,
                Err(e) => Err(e.into()),
            };
            bar.finish_and_clear();
            let v = v?;
            if json {
                print_json(&v);
            } else {
                let s: Snapshot = typed("the snapshot", &v)?;
                println!("{}", s.name);
            }
        }
        SnapshotCommand::List { json } => {
            let v = api.get("/v1/snapshots").await?;
            let list: SnapshotList = typed("the snapshot list", &v)?;
            if json {
                print_json(v.get("snapshots").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&[
                "NAME", "VCPUS", "MEMORY", "SIZE", "SOURCE", "CREATED", "BUILD",
            ]);
            for s in list.snapshots {
                t.row(vec![
                    s.name,
                    s.vcpus.to_string(),
                    format!("{} MiB", s.memory_mib),
                    bytes(s.size_bytes),
                    s.source_sandbox_id.unwrap_or_default(),
                    short_time(&s.created_at),
                    s.build_id,
                ]);
            }
            t.print();
        }
        SnapshotCommand::Get { name, json } => {
            let v = api.get(&format!("/v1/snapshots/{}", encode(&name))).await?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let s: Snapshot = typed("the snapshot", &v)?;
            output::print_out(&fields(&[
                ("name", s.name),
                ("build", s.build_id),
                ("vcpus", s.vcpus.to_string()),
                ("memory", format!("{} MiB", s.memory_mib)),
                ("size", bytes(s.size_bytes)),
                ("source", s.source_sandbox_id.unwrap_or_default()),
                ("created", short_time(&s.created_at)),
            ]));
        }
        SnapshotCommand::Delete { name, json } => {
            let v = api
                .delete(&format!("/v1/snapshots/{}", encode(&name)))
                .await?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let d: DeletedSnapshot = typed("the deleted snapshot", &v)?;
            if d.data_freed {
                println!("{} deleted", d.name);
            } else {
                println!(
                    "{} deleted (its data stays while sandboxes or builds use it)",
                    d.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A snapshot of a large sandbox is answered while the sandbox is still
/// `snapshotting` (202, with the sandbox): poll it until it runs again,
/// then fetch the snapshot, which is absent only if the snapshot failed.
async fn settle_snapshot(api: &Api, mut v: Value, name: &str) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    while v["state"].as_str() == Some("snapshotting") {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "sandbox {} is still snapshotting after an hour; `ember sandbox get` shows where it is",
                v["id"].as_str().unwrap_or("?")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        v = api.get(&sandbox_path(&id)).await?;
    }
    if v.get("build_id").is_some() && v.get("name").is_some() {
        return Ok(v);
    }
    match api.get(&format!("/v1/snapshots/{}", encode(name))).await {
        Ok(s) => Ok(s),
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "the snapshot of sandbox {} as {name} did not complete (the server's log says why); the sandbox is {}",
            v["id"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("in an unknown state"),
        ))),
    }
}
