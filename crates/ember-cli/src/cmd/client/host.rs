//! `ember host list|revoke|remove|join-token`: the host agents the server
//! schedules on, letting one in and taking one out of the cluster (admin
//! keys).

use std::process::ExitCode;

use ember_control::wire::{CreateJoinTokenRequest, CreatedJoinToken, HostList, JoinTokenList};
use serde_json::Value;

use super::api::{Api, typed};
use super::output::{Table, parse_seconds, print_json, short_time};
use super::{ClientArgs, config};

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    #[command(flatten)]
    api: ClientArgs,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Debug, clap::Subcommand)]
enum HostCommand {
    /// List the hosts with their health and what is reserved on them (admin key).
    #[command(alias = "ls")]
    List {
        /// Print a JSON array of the server's host objects.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a host's credentials: the server stops calling it and refuses
    /// its registrations (with its credential or the join token) until it
    /// is removed. For a host that is compromised or retired.
    Revoke {
        /// Host ID (`ember host list`).
        id: String,
    },
    /// Forget a revoked host with no sandboxes left, so its machine may
    /// join again as a new registration.
    #[command(alias = "rm")]
    Remove {
        /// Host ID.
        id: String,
    },
    /// One-time join tokens: each lets one new machine join
    /// (`ember agent --control-plane URL --token-file FILE`).
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
}

#[derive(Debug, clap::Subcommand)]
enum JoinTokenCommand {
    /// Make a token that admits one host; it is printed once, on stdout.
    Create {
        /// How long it admits a host (`10m`, `1h`, `3600`; 60 s to 7 days).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds, default_value = "1h")]
        expires_in: u64,
        #[arg(long)]
        json: bool,
    },
    /// List tokens: unused, used (by which host), expired, revoked.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token so it admits no host (a host it admitted keeps its
    /// own credential: `ember host revoke` takes that).
    Revoke {
        /// Token ID (`jt_…`).
        id: String,
    },
}

pub async fn run(args: HostArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("host", dispatch(args).await))
}

async fn dispatch(args: HostArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    match args.command {
        HostCommand::Revoke { id } => {
            let v = api
                .post(&format!("/v1/hosts/{id}/revoke"), &serde_json::json!({}))
                .await?;
            let host: ember_control::wire::Host = typed("the host", &v)?;
            println!(
                "revoked host {} (at {})",
                host.id,
                host.revoked_at
                    .as_deref()
                    .map(short_time)
                    .unwrap_or_default()
            );
        }
        HostCommand::JoinToken(command) => return join_token(&api, command).await,
        HostCommand::Remove { id } => {
            api.delete(&format!("/v1/hosts/{id}")).await?;
            println!("removed host {id}");
        }
        HostCommand::List { json } => {
            let v = api.get("/v1/hosts").await?;
            let list: HostList = typed("the host list", &v)?;
            if json {
                print_json(v.get("hosts").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&[
                "ID",
                "BACKEND",
                "ISOLATION",
                "HEALTHY",
                "VCPUS",
                "MEMORY",
                "LAST SEEN",
                "ADDRESS",
                "ERROR",
            ]);
            for h in list.hosts {
                t.row(vec![
                    h.id,
                    h.backend,
                    match h.isolation.as_deref() {
                        Some("tcg") => "tcg — not a security boundary".to_owned(),
                        Some(other) => other.to_owned(),
                        None => "unknown".to_owned(),
                    },
                    if h.healthy { "yes" } else { "no" }.to_owned(),
                    format!("{}/{}", h.vcpus_used, h.vcpus_total),
                    format!("{}/{} MiB", h.memory_mib_used, h.memory_mib_total),
                    h.last_seen_at
                        .as_deref()
                        .map(short_time)
                        .unwrap_or_default(),
                    h.address,
                    match &h.revoked_at {
                        Some(_) => "credentials revoked".to_owned(),
                        None => h.last_error.unwrap_or_default(),
                    },
                ]);
            }
            t.print();
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn join_token(api: &Api, command: JoinTokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        JoinTokenCommand::Create { expires_in, json } => {
            let v = api
                .post(
                    "/v1/hosts/join-tokens",
                    &CreateJoinTokenRequest {
                        expires_in_s: Some(expires_in),
                    },
                )
                .await?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let t: CreatedJoinToken = typed("the new join token", &v)?;
            println!("{}", t.token);
            eprintln!(
                "join token {} admits one host until {}: shown only now. On the new machine, \
                 put it in a file only root reads and run \
                 `ember agent --control-plane URL --token-file FILE`",
                t.info.id,
                short_time(&t.info.expires_at)
            );
        }
        JoinTokenCommand::List { json } => {
            let v = api.get("/v1/hosts/join-tokens").await?;
            let list: JoinTokenList = typed("the join token list", &v)?;
            if json {
                print_json(v.get("tokens").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["ID", "STATE", "CREATED", "EXPIRES", "HOST"]);
            for j in list.tokens {
                t.row(vec![
                    j.id,
                    j.state,
                    short_time(&j.created_at),
                    short_time(&j.expires_at),
                    j.used_by_host.unwrap_or_default(),
                ]);
            }
            t.print();
        }
        JoinTokenCommand::Revoke { id } => {
            api.delete(&format!("/v1/hosts/join-tokens/{id}")).await?;
            println!("revoked join token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
