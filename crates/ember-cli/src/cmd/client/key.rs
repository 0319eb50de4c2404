//! `ember key …`: create, list and revoke API keys; `ember audit`: the
//! audit log (admin keys); `ember usage`: a team's use against its limits.

use std::process::ExitCode;

use ember_control::auth::Role;
use ember_control::wire::{AuditList, CreateKeyRequest, CreatedKey, KeyList, TeamUsage};
use serde_json::Value;

use super::api::{Api, encode, typed};
use super::output::{Table, parse_seconds, print_json, short_time};
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
        /// What it may do: member (everything for its team), read-only
        /// (lists and reads; no changes, no exec, files or ports), or admin
        /// (every team; admin keys of admin teams only).
        #[arg(long, default_value = "member", value_parser = parse_role)]
        role: Role,
        /// Stop working after this long (`30d`, `12h`, `3600`); default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        expires_in: Option<u64>,
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

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
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
            role,
            expires_in,
            json,
        } => {
            let v = api
                .post(
                    "/v1/keys",
                    &CreateKeyRequest {
                        name,
                        team_id: team,
                        e2b,
                        role: Some(role),
                        expires_in_s: expires_in,
                    },
                )
                .await?;
            if json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let k: CreatedKey = typed("the new key", &v)?;
            println!("{}", k.key);
            let expiry = match &k.info.expires_at {
                Some(at) => format!(", expires {at}"),
                None => String::new(),
            };
            eprintln!(
                "key {} ({}, {}{expiry}) for team {}: shown only now, store it safely",
                k.info.id,
                k.info.name,
                k.info.role.as_str(),
                k.info.team_id
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
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "ROLE",
                "TEAM",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "REVOKED",
            ]);
            for k in list.keys {
                t.row(vec![
                    k.id,
                    k.name,
                    k.role.as_str().to_owned(),
                    k.team_id,
                    short_time(&k.created_at),
                    k.expires_at.as_deref().map(short_time).unwrap_or_default(),
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

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    api: ClientArgs,
    /// Only this team's entries.
    #[arg(long)]
    team: Option<String>,
    /// Only entries about this sandbox, template, key or team.
    #[arg(long)]
    target: Option<String>,
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Print the server's entry objects as a JSON array.
    #[arg(long)]
    json: bool,
}

/// `ember audit`: who changed what (admin keys).
pub async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("audit", audit_inner(args).await))
}

async fn audit_inner(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    let mut path = format!("/v1/audit?limit={}", args.limit);
    if let Some(t) = &args.team {
        path.push_str(&format!("&team_id={}", encode(t)));
    }
    if let Some(t) = &args.target {
        path.push_str(&format!("&target={}", encode(t)));
    }
    let v = api.get(&path).await?;
    let list: AuditList = typed("the audit log", &v)?;
    if args.json {
        print_json(v.get("entries").unwrap_or(&Value::Null));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["AT", "ACTOR", "TEAM", "STATUS", "CALL", "TARGET"]);
    for e in list.entries {
        t.row(vec![
            short_time(&e.at),
            e.actor,
            e.team_id.unwrap_or_default(),
            e.status.to_string(),
            format!("{} {}", e.method, e.route),
            e.target.unwrap_or_default(),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    #[command(flatten)]
    api: ClientArgs,
    /// Another team (admin keys only; default: yours).
    #[arg(long)]
    team: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `ember usage`: what a team holds against its limits.
pub async fn usage(args: UsageArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("usage", usage_inner(args).await))
}

async fn usage_inner(args: UsageArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    let team = args.team.as_deref().unwrap_or("me");
    let v = api
        .get(&format!("/v1/teams/{}/usage", encode(team)))
        .await?;
    if args.json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let u: TeamUsage = typed("the team's usage", &v)?;
    let mut t = Table::new(&["WHAT", "USED", "LIMIT"]);
    for (what, item) in [
        ("running sandboxes", u.running_sandboxes),
        ("vcpus", u.vcpus),
        ("memory MiB", u.memory_mib),
        ("paused sandboxes", u.paused_sandboxes),
        ("templates", u.templates),
        ("snapshot storage MiB", u.storage_mib),
    ] {
        t.row(vec![
            what.to_owned(),
            item.used.to_string(),
            item.limit.map_or("-".to_owned(), |l| l.to_string()),
        ]);
    }
    t.print();
    let or_none = |v: Option<u64>| v.map_or("no limit".to_owned(), |s| format!("{s} s"));
    println!(
        "team {}: max running {}, paused kept {}, {} requests/s per key (bursts of {}, {} at once)",
        u.team_id,
        or_none(u.max_running_s),
        u.paused_retention_s
            .map_or("until deleted".to_owned(), |s| format!("{s} s")),
        u.requests_per_second,
        u.request_burst,
        u.concurrent_requests
    );
    Ok(ExitCode::SUCCESS)
}
