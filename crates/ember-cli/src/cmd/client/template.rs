//! `ember template …`: build templates from a container image or a
//! Dockerfile (the server runs the build in a sandbox; this command sends
//! the request and the build context, then follows the build's log), and
//! list, show and delete templates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use ember_control::wire::{CreateTemplateRequest, TemplateBuild, TemplateBuildList};
use serde_json::Value;

use super::api::{Api, encode, typed};
use super::output::{Table, print_json, short_time};
use super::{ClientArgs, config};

#[derive(Debug, clap::Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    api: ClientArgs,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TemplateCommand {
    /// Build a template from an image (--image) or a Dockerfile (-f), with
    /// an optional service started and ready before the snapshot; shows
    /// each step and its output as it runs.
    Build(BuildArgs),
    /// List your team's templates (as `snapshot list`).
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (as `snapshot delete`).
    #[command(alias = "rm")]
    Delete { name: String },
    /// The builds of a template name, newest first.
    Builds {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// A build's log (follow it while it runs with --follow).
    Logs {
        name: String,
        build_id: String,
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// The template's name.
    #[arg(long, short = 't')]
    name: String,
    /// Build from this image: docker://HOST[:PORT]/REPO[:TAG|@DIGEST].
    #[arg(long, conflicts_with = "file")]
    image: Option<String>,
    /// Build from this Dockerfile.
    #[arg(long, short = 'f', value_name = "DOCKERFILE")]
    file: Option<PathBuf>,
    /// The build context COPY reads from [default: the Dockerfile's directory].
    context: Option<PathBuf>,
    /// NAME=VALUE for the Dockerfile's ARG NAME (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// Start this (shell) command before the snapshot [default: the
    /// Dockerfile's ENTRYPOINT/CMD].
    #[arg(long)]
    start_cmd: Option<String>,
    /// Snapshot once this shell command exits 0.
    #[arg(long, conflicts_with = "ready_port")]
    ready_cmd: Option<String>,
    /// Snapshot once this port accepts connections.
    #[arg(long)]
    ready_port: Option<u16>,
    /// Seconds to wait for the ready check [default: 300].
    #[arg(long)]
    ready_timeout: Option<u64>,
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Registry user; the password comes from EMBER_REGISTRY_PASSWORD.
    #[arg(long, env = "EMBER_REGISTRY_USERNAME")]
    registry_user: Option<String>,
    /// Print the finished build as JSON instead of following its log.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: TemplateArgs) -> anyhow::Result<ExitCode> {
    Ok(super::report("template", dispatch(args).await))
}

async fn dispatch(args: TemplateArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    match args.command {
        TemplateCommand::Build(b) => build(&api, b).await,
        TemplateCommand::List { json } => {
            let v = api.get("/v1/templates").await?;
            if json {
                print_json(v.get("snapshots").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["NAME", "VCPUS", "MEMORY", "CREATED", "BUILD"]);
            for s in v["snapshots"].as_array().into_iter().flatten() {
                t.row(vec![
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["vcpus"].to_string(),
                    format!("{} MiB", s["memory_mib"]),
                    short_time(s["created_at"].as_str().unwrap_or_default()),
                    s["build_id"].as_str().unwrap_or_default().to_owned(),
                ]);
            }
            t.print();
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Delete { name } => {
            api.delete(&format!("/v1/templates/{}", encode(&name)))
                .await?;
            println!("{name} deleted");
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Builds { name, json } => {
            let v = api
                .get(&format!("/v1/templates/{}/builds", encode(&name)))
                .await?;
            if json {
                print_json(v.get("builds").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let list: TemplateBuildList = typed("the build list", &v)?;
            let mut t = Table::new(&["BUILD", "STATUS", "STEP", "SOURCE", "CREATED"]);
            for b in list.builds {
                t.row(vec![
                    b.build_id,
                    b.status,
                    format!("{}/{}", b.step, b.steps_total),
                    b.source,
                    short_time(&b.created_at),
                ]);
            }
            t.print();
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Logs {
            name,
            build_id,
            follow,
        } => {
            let b = follow_build(&api, &name, &build_id, follow, true).await?;
            Ok(outcome(&b))
        }
    }
}

async fn build(api: &Api, args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut build_args = std::collections::BTreeMap::new();
    for pair in &args.build_args {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--build-arg {pair:?}: expected NAME=VALUE"))?;
        build_args.insert(k.to_owned(), v.to_owned());
    }
    let (dockerfile, context) = match &args.file {
        None => (None, None),
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the Dockerfile {}", file.display()))?;
            let dir = match &args.context {
                Some(d) => d.clone(),
                None => file
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_owned(),
            };
            let tar = pack_context(&dir)?;
            eprintln!(
                "sending the build context {} ({} KiB)",
                dir.display(),
                tar.len() / 1024
            );
            (
                Some(text),
                Some(base64::engine::general_purpose::STANDARD.encode(tar)),
            )
        }
    };
    if args.image.is_none() && dockerfile.is_none() {
        anyhow::bail!("give --image docker://… or -f Dockerfile to build from");
    }
    let req = CreateTemplateRequest {
        name: args.name.clone(),
        image: args.image,
        dockerfile,
        context_tar_base64: context,
        build_args,
        start_cmd: args.start_cmd,
        ready_cmd: args.ready_cmd,
        ready_port: args.ready_port,
        ready_timeout_s: args.ready_timeout,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        registry_username: args.registry_user,
        registry_password: std::env::var("EMBER_REGISTRY_PASSWORD").ok(),
    };
    let v = api.post("/v1/templates", &req).await?;
    let started: TemplateBuild = typed("the build", &v)?;
    if !args.json {
        eprintln!("build {} of template {}", started.build_id, started.name);
    }
    let b = follow_build(api, &started.name, &started.build_id, true, !args.json).await?;
    if args.json {
        let v = api
            .get(&format!(
                "/v1/templates/{}/builds/{}?offset={}",
                encode(&b.name),
                encode(&b.build_id),
                b.log_offset
            ))
            .await?;
        print_json(&v);
    }
    Ok(outcome(&b))
}

fn outcome(b: &TemplateBuild) -> ExitCode {
    match b.status.as_str() {
        "ready" => ExitCode::SUCCESS,
        "failed" => {
            eprintln!(
                "ember template: build {} failed: {}",
                b.build_id,
                b.error.as_deref().unwrap_or("(no reason recorded)")
            );
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Print the build's log from the start and, with `follow`, poll for more
/// until it ends. Returns its last state.
async fn follow_build(
    api: &Api,
    name: &str,
    build_id: &str,
    follow: bool,
    print: bool,
) -> anyhow::Result<TemplateBuild> {
    use std::io::Write;
    let mut offset = 0;
    loop {
        let v = api
            .get(&format!(
                "/v1/templates/{}/builds/{}?offset={offset}",
                encode(name),
                encode(build_id)
            ))
            .await?;
        let b: TemplateBuild = typed("the build", &v)?;
        if print && !b.log.is_empty() {
            let mut out = std::io::stdout().lock();
            out.write_all(b.log.as_bytes())?;
            out.flush()?;
        }
        offset = b.log_offset;
        if !follow || b.status == "ready" || b.status == "failed" {
            return Ok(b);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The build context as a gzip'd tar, rooted at `dir` (symlinks followed:
/// the server takes files and directories only).
fn pack_context(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    tar.append_dir_all(".", dir)
        .with_context(|| format!("packing the build context {}", dir.display()))?;
    let gz = tar.into_inner().context("finishing the build context")?;
    gz.finish().context("compressing the build context")
}
