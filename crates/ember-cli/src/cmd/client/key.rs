//! `ember key …`: create, list and revoke API keys.

use std::process::ExitCode;

use ember_control::wire::{CreateKeyRequest, CreatedKey, KeyList};
use serde_json::Value;

use super::api::{Api, encode, typed};
use super::output::{Table, print_json, short_time};
use super::{ClientArgs, config};

#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(flatten)]
    api: ClientArgs,
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Create a key and print it (shown only now; the server keeps a hash).
    Create {
        /// A label for people ("ci", "alice's laptop").
        name: String,
        /// The team it belongs to (admin keys only; default: yours).
        #[arg(long)]
        team: Option<String>,
        /// Mint it in E2B's shape (`e2b_` + 40 hex), for E2B's SDKs.
        #[arg(long)]
        e2b: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    #[command(alias = "ls")]
    List {
        /// Another team's keys (admin keys only).
        #[arg(long)]
        team: Option<String>,
        /// Print a JSON array of the server's key objects.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its ID (the prefix `key list` shows); it stops working at once.
    Revoke { id: String },
}

pub async fn run(args: KeyArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("key", dispatch(args).await))
}

async fn dispatch(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    match args.command {
        KeyCommand::Create {
            name,
            team,
            e2b,
            json,
        } => {
            let v = api
                .post(
                    "/v1/keys",
                    &CreateKeyRequest {
                        name,
                        team_id: team,
                        e2b,
                    },
                )
                .await?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let k: CreatedKey = typed("the new key", &v)?;
            println!("{}", k.key);
            eprintln!(
                "key {} ({}) for team {}: shown only now, store it safely",
                k.info.id, k.info.name, k.info.team_id
            );
        }
        KeyCommand::List { team, json } => {
            let path = match &team {
                Some(t) => format!("/v1/keys?team_id={}", encode(t)),
                None => "/v1/keys".to_owned(),
            };
            let v = api.get(&path).await?;
            let list: KeyList = typed("the key list", &v)?;
            if json {
                print_json(v.get("keys").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["ID", "NAME", "TEAM", "CREATED", "LAST USED", "REVOKED"]);
            for k in list.keys {
                t.row(vec![
                    k.id,
                    k.name,
                    k.team_id,
                    short_time(&k.created_at),
                    k.last_used_at
                        .as_deref()
                        .map(short_time)
                        .unwrap_or_default(),
                    k.revoked_at.as_deref().map(short_time).unwrap_or_default(),
                ]);
            }
            t.print();
        }
        KeyCommand::Revoke { id } => {
            api.delete(&format!("/v1/keys/{}", encode(&id))).await?;
            println!("{id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
