//! `ember sandbox …`: create, list, get, exec, pause, resume, kill,
//! timeout, `files get|put|ls|rm`, each one REST call (exec and files
//! stream), and the port commands of [`super::ports`] (url, ingress,
//! port-forward).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ember_control::wire::{
    CreateSandboxRequest, DirListing, FileStat, FileType, NetworkPolicy, OnTimeout, RenameRequest,
    ResumeRequest, Sandbox, SandboxList, TimeoutRequest,
};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

use super::api::{Api, encode, typed};
use super::exec::{self, Input, OnInterrupt};
use super::output::{self, Table, fields, parse_pair, parse_seconds, print_json, short_time};
use super::{ClientArgs, config, exit};

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    api: ClientArgs,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and print its ID (with --json: the sandbox, including
    /// its access token, shown only now).
    Create(CreateArgs),
    /// List sandboxes, newest first (destroyed ones only with --all).
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show one sandbox.
    Get {
        id: String,
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox; exits with its exit code.
    Exec(ExecArgs),
    /// Pause a sandbox: its memory and disk are saved and it holds no CPU or
    /// memory until resumed.
    Pause {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        /// A new timeout (seconds, or 5m, 1h).
        #[arg(long, value_parser = parse_seconds)]
        timeout: Option<u64>,
        /// Environment variable added for its processes, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_pair)]
        env: Vec<(String, String)>,
        #[arg(long)]
        json: bool,
    },
    /// Destroy sandboxes and everything they hold.
    #[command(alias = "rm")]
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Set a running sandbox's timeout: it now expires this long from now.
    Timeout {
        id: String,
        /// Seconds, or 5m, 1h.
        #[arg(value_parser = parse_seconds)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Replace a running or paused sandbox's egress rules (both lists; an
    /// omitted list is cleared).
    Network {
        id: String,
        /// CIDR or address the sandbox may reach despite the default rules (repeatable).
        #[arg(long = "allow-out", value_name = "CIDR")]
        allow_out: Vec<String>,
        /// CIDR or address the sandbox may never reach (repeatable).
        #[arg(long = "deny-out", value_name = "CIDR")]
        deny_out: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Files in a sandbox.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Print the URL of a port of a sandbox (where its server is reached
    /// through Ember's ingress proxy).
    Url(super::ports::UrlArgs),
    /// Choose who may reach a sandbox's ports, and whether traffic wakes it.
    Ingress(super::ports::IngressArgs),
    /// Listen on a local port and tunnel each connection to a port of a
    /// sandbox (any TCP protocol), until Ctrl-C.
    PortForward(super::ports::ForwardArgs),
    /// What a running sandbox uses: CPU, memory, disk, network (recent samples).
    Metrics {
        id: String,
        /// Every sample of the last 10 minutes, not only the latest.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Template (a snapshot's name) to start from, or `base`.
    #[arg(long, short = 't', default_value = "base")]
    template: String,
    /// Seconds of inactivity before the sandbox is killed (or paused); 5m, 1h work too.
    #[arg(long, default_value = "300", value_parser = parse_seconds)]
    timeout: u64,
    /// What happens when the timeout passes.
    #[arg(long, value_enum, default_value = "kill")]
    on_timeout: OnTimeoutArg,
    /// vCPUs [default: the template's; 1 for base].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory in MiB [default: the template's; 512 for base].
    #[arg(long)]
    memory: Option<u32>,
    /// Metadata, KEY=VALUE (repeatable); `sandbox list --metadata` filters on it.
    #[arg(long, short = 'm', value_parser = parse_pair)]
    metadata: Vec<(String, String)>,
    /// Environment variable for every process, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// A destination (CIDR) the sandbox may reach although the defaults deny it (repeatable).
    #[arg(long)]
    allow_out: Vec<String>,
    /// A destination (CIDR) the sandbox may never reach (repeatable).
    #[arg(long)]
    deny_out: Vec<String>,
    /// Boot the base image instead of forking the host's warm base (slower).
    #[arg(long)]
    cold: bool,
    /// Its ports are reachable without its traffic token.
    #[arg(long)]
    public: bool,
    /// A request to one of its ports while it is paused resumes it.
    #[arg(long)]
    auto_resume: bool,
    /// Print the server's JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnTimeoutArg {
    Kill,
    Pause,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only these states, comma-separated (creating, running, paused, failed, destroyed, …).
    #[arg(long)]
    state: Option<String>,
    /// Only sandboxes from this template.
    #[arg(long)]
    template: Option<String>,
    /// Only sandboxes with this metadata, KEY=VALUE (repeatable; all must match).
    #[arg(long, short = 'm', value_parser = parse_pair)]
    metadata: Vec<(String, String)>,
    /// Include destroyed sandboxes (kept for a day).
    #[arg(long, conflicts_with = "state")]
    all: bool,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
    /// Print a JSON array of the server's sandbox objects.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit code: the command's own; 128+N if signal N killed it; 124 if --timeout did; \
                  130 on Ctrl-C; 125 if Ember failed (no such sandbox, not running, server unreachable)."
)]
struct ExecArgs {
    /// Forward stdin to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give the command a terminal (a PTY in the sandbox); with -i and a
    /// terminal here, an interactive session.
    #[arg(long, short = 't')]
    tty: bool,
    /// Environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Working directory in the sandbox.
    #[arg(long)]
    cwd: Option<String>,
    /// User to run as (name or uid) [default: root].
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Kill the command after this long (seconds, or 5m, 1h).
    #[arg(long, value_parser = parse_seconds)]
    timeout: Option<u64>,
    /// The sandbox.
    id: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
enum FilesCommand {
    /// Download a file; to stdout unless LOCAL is given.
    Get {
        id: String,
        /// Absolute path in the sandbox.
        remote: String,
        /// Local file to write (replaced only once the download is complete); `-` is stdout.
        local: Option<PathBuf>,
    },
    /// Upload a file (`-` reads stdin); creates or replaces REMOTE.
    Put {
        id: String,
        /// Local file, or `-` for stdin.
        local: PathBuf,
        /// Absolute path in the sandbox.
        remote: String,
        /// Permission bits of a new file, octal (e.g. 755).
        #[arg(long)]
        mode: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List a directory.
    Ls {
        id: String,
        /// Absolute path in the sandbox.
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Watch a directory: one line per change ("create sub/f"), until Ctrl-C.
    Watch {
        id: String,
        /// Absolute path of the directory.
        path: String,
        /// Also every directory below it.
        #[arg(long, short = 'r')]
        recursive: bool,
        /// Print the server's JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Move or rename a file or directory.
    Mv {
        id: String,
        /// Absolute path of what to move.
        from: String,
        /// Absolute path it moves to.
        to: String,
        /// Replace what is at TO.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Remove a file, or a directory with -r.
    Rm {
        id: String,
        path: String,
        #[arg(long, short = 'r')]
        recursive: bool,
    },
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let name = match &args.command {
        SandboxCommand::Create(_) => "sandbox create",
        SandboxCommand::List(_) => "sandbox list",
        SandboxCommand::Get { .. } => "sandbox get",
        SandboxCommand::Exec(_) => "sandbox exec",
        SandboxCommand::Pause { .. } => "sandbox pause",
        SandboxCommand::Resume { .. } => "sandbox resume",
        SandboxCommand::Kill { .. } => "sandbox kill",
        SandboxCommand::Timeout { .. } => "sandbox timeout",
        SandboxCommand::Network { .. } => "sandbox network",
        SandboxCommand::Files(_) => "sandbox files",
        SandboxCommand::Metrics { .. } => "sandbox metrics",
        SandboxCommand::Url(_) => "sandbox url",
        SandboxCommand::Ingress(_) => "sandbox ingress",
        SandboxCommand::PortForward(_) => "sandbox port-forward",
    };
    let is_exec = matches!(args.command, SandboxCommand::Exec(_));
    let result = dispatch(args).await;
    if is_exec && let Err(e) = &result {
        // exec's own codes are the command's; every Ember failure is 125.
        eprintln!("ember {name}: {}", super::describe(e));
        return Ok(ExitCode::from(exit::EMBER_FAILED));
    }
    Ok(super::report(name, result))
}

/// A pause or resume of a large sandbox is answered while it is still
/// `pausing`/`resuming` (202): poll the sandbox until it settles in
/// `wanted`, or say where it ended instead.
async fn settle(api: &Api, mut v: Value, wanted: &str, verb: &str) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        match v["state"].as_str() {
            Some(s) if s == wanted => return Ok(v),
            Some(s) if s == verb && std::time::Instant::now() > deadline => anyhow::bail!(
                "sandbox {} is still {verb} after an hour; `ember sandbox get` shows where it is",
                v["id"].as_str().unwrap_or("?")
            ),
            Some(s) if s == verb => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                v = api.get(&sandbox_path(&id)).await?;
            }
            other => anyhow::bail!(
                "sandbox {} is {} after {verb} in the background{}",
                v["id"].as_str().unwrap_or("?"),
                other.unwrap_or("in an unknown state"),
                v["failure_reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        }
    }
}

async fn dispatch(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config::endpoint(&args.api)?)?;
    match args.command {
        SandboxCommand::Create(a) => create(&api, a).await,
        SandboxCommand::List(a) => list(&api, a).await,
        SandboxCommand::Get { id, json } => {
            let v = api.get(&sandbox_path(&id)).await?;
            show(&v, json)
        }
        SandboxCommand::Exec(a) => exec_cmd(&api, a).await,
        SandboxCommand::Pause { id, json } => {
            let bar = output::spinner(format!("pausing {id}"));
            let v = match api
                .call::<()>(Method::POST, &format!("{}/pause", sandbox_path(&id)), None)
                .await
            {
                Ok(v) => settle(&api, v, "paused", "pausing").await,
                Err(e) => Err(e.into()),
            };
            bar.finish_and_clear();
            announce(&v?, json, "paused")
        }
        SandboxCommand::Resume {
            id,
            timeout,
            env,
            json,
        } => {
            let body = ResumeRequest {
                timeout_s: timeout,
                env: env.into_iter().collect(),
            };
            let bar = output::spinner(format!("resuming {id}"));
            let v = match api
                .post(&format!("{}/resume", sandbox_path(&id)), &body)
                .await
            {
                Ok(v) => settle(&api, v, "running", "resuming").await,
                Err(e) => Err(e.into()),
            };
            bar.finish_and_clear();
            announce(&v?, json, "resumed")
        }
        SandboxCommand::Kill { ids } => kill(&api, &ids).await,
        SandboxCommand::Network {
            id,
            allow_out,
            deny_out,
            json,
        } => {
            let v = api
                .put(
                    &format!("{}/network", sandbox_path(&id)),
                    &NetworkPolicy {
                        allow_out,
                        deny_out,
                    },
                )
                .await?;
            if json {
                print_json(&v);
            } else {
                let sb: Sandbox = typed("the sandbox", &v)?;
                println!(
                    "{}: allow out [{}], deny out [{}]",
                    sb.id,
                    sb.network.allow_out.join(", "),
                    sb.network.deny_out.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Timeout { id, timeout, json } => {
            let v = api
                .post(
                    &format!("{}/timeout", sandbox_path(&id)),
                    &TimeoutRequest { timeout_s: timeout },
                )
                .await?;
            if json {
                print_json(&v);
            } else {
                let sb: Sandbox = typed("the sandbox", &v)?;
                println!(
                    "{} expires at {}",
                    sb.id,
                    sb.expires_at.as_deref().map(short_time).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Files(f) => files(&api, f).await,
        SandboxCommand::Url(a) => super::ports::url(&api, a).await,
        SandboxCommand::Ingress(a) => super::ports::ingress(&api, a).await,
        SandboxCommand::PortForward(a) => super::ports::port_forward(&api, a).await,
        SandboxCommand::Metrics { id, all, json } => {
            let v = api.get(&format!("{}/metrics", sandbox_path(&id))).await?;
            if json {
                print_json(v.get("samples").unwrap_or(&serde_json::Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let m: ember_control::wire::SandboxMetrics = typed("the metrics", &v)?;
            let mut t = Table::new(&["TIME", "CPU", "MEMORY", "DISK", "NET IN", "NET OUT", "PIDS"]);
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
            let shown = if all {
                &m.samples[..]
            } else {
                &m.samples[m.samples.len().saturating_sub(1)..]
            };
            for s in shown {
                t.row(vec![
                    short_time(&s.timestamp),
                    format!("{:.1}%", s.cpu_percent),
                    format!("{} / {}", mib(s.memory_bytes), mib(s.memory_limit_bytes)),
                    mib(s.disk_bytes),
                    mib(s.net_rx_bytes),
                    mib(s.net_tx_bytes),
                    s.pids.to_string(),
                ]);
            }
            t.print();
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn sandbox_path(id: &str) -> String {
    format!("/v1/sandboxes/{}", encode(id))
}

async fn create(api: &Api, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let body = CreateSandboxRequest {
        template: a.template.clone(),
        vcpus: a.vcpus,
        memory_mib: a.memory,
        timeout_s: a.timeout,
        on_timeout: match a.on_timeout {
            OnTimeoutArg::Kill => OnTimeout::Kill,
            OnTimeoutArg::Pause => OnTimeout::Pause,
        },
        metadata: a.metadata.into_iter().collect(),
        env: a.env.into_iter().collect(),
        network: NetworkPolicy {
            allow_out: a.allow_out,
            deny_out: a.deny_out,
        },
        cold: a.cold,
        public: a.public,
        auto_resume: a.auto_resume,
    };
    let bar = output::spinner(format!("creating a sandbox from {}", a.template));
    let v = api.post("/v1/sandboxes", &body).await;
    bar.finish_and_clear();
    let v = v?;
    if a.json {
        print_json(&v);
    } else {
        let sb: Sandbox = typed("the new sandbox", &v)?;
        println!("{}", sb.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Every sandbox the filters match, following pages, at most `limit`.
pub async fn list_all(
    api: &Api,
    query: &[(String, String)],
    limit: Option<usize>,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q: Vec<(String, String)> = query.to_vec();
        if let Some(t) = &token {
            q.push(("page_token".into(), t.clone()));
        }
        let qs = q
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let path = if qs.is_empty() {
            "/v1/sandboxes".to_owned()
        } else {
            format!("/v1/sandboxes?{qs}")
        };
        let page = api.get(&path).await?;
        let list: SandboxList = typed("the sandbox list", &page)?;
        if let Some(items) = page.get("sandboxes").and_then(Value::as_array) {
            out.extend(items.iter().cloned());
        }
        if limit.is_some_and(|l| out.len() >= l) {
            out.truncate(limit.unwrap_or(usize::MAX));
            return Ok(out);
        }
        match list.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

async fn list(api: &Api, a: ListArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(s) = a.state {
        q.push(("state".to_owned(), s));
    } else if a.all {
        q.push((
            "state".to_owned(),
            "creating,running,pausing,paused,resuming,snapshotting,destroying,failed,destroyed"
                .to_owned(),
        ));
    }
    if let Some(t) = a.template {
        q.push(("template".to_owned(), t));
    }
    for (k, v) in a.metadata {
        q.push((format!("metadata.{k}"), v));
    }
    let items = list_all(api, &q, a.limit).await?;
    if a.json {
        print_json(&Value::Array(items));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "ID", "STATE", "TEMPLATE", "VCPUS", "MEMORY", "CREATED", "EXPIRES", "METADATA",
    ]);
    for v in &items {
        let sb: Sandbox = typed("a sandbox", v)?;
        t.row(vec![
            sb.id,
            sb.state.to_string(),
            sb.template,
            sb.vcpus.to_string(),
            format!("{} MiB", sb.memory_mib),
            short_time(&sb.created_at),
            sb.expires_at.as_deref().map(short_time).unwrap_or_default(),
            metadata_text(&sb.metadata),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

fn metadata_text(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One sandbox, as `key: value` lines or JSON.
fn show(v: &Value, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(v);
        return Ok(ExitCode::SUCCESS);
    }
    let sb: Sandbox = typed("the sandbox", v)?;
    let mut f = vec![
        ("id", sb.id.clone()),
        ("state", sb.state.to_string()),
        ("template", sb.template.clone()),
        ("host", sb.host_id.clone().unwrap_or_default()),
        ("vcpus", sb.vcpus.to_string()),
        ("memory", format!("{} MiB", sb.memory_mib)),
        (
            "timeout",
            format!("{} s, then {}", sb.timeout_s, sb.on_timeout.as_str()),
        ),
        (
            "expires",
            sb.expires_at.as_deref().map(short_time).unwrap_or_default(),
        ),
        ("created", short_time(&sb.created_at)),
        ("state since", short_time(&sb.state_changed_at)),
        ("metadata", metadata_text(&sb.metadata)),
    ];
    if !sb.network.allow_out.is_empty() {
        f.push(("allow out", sb.network.allow_out.join(", ")));
    }
    if !sb.network.deny_out.is_empty() {
        f.push(("deny out", sb.network.deny_out.join(", ")));
    }
    if let Some(r) = &sb.failure_reason {
        f.push(("failure", r.clone()));
    }
    output::print_out(&fields(&f));
    Ok(ExitCode::SUCCESS)
}

/// After pause or resume: `sb-… paused`, or the JSON.
fn announce(v: &Value, json: bool, what: &str) -> anyhow::Result<ExitCode> {
    if json {
        print_json(v);
    } else {
        let sb: Sandbox = typed("the sandbox", v)?;
        println!("{} {what}", sb.id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn kill(api: &Api, ids: &[String]) -> anyhow::Result<ExitCode> {
    let mut first_error = None;
    for id in ids {
        let bar = output::spinner(format!("destroying {id}"));
        let r = api.delete(&sandbox_path(id)).await;
        bar.finish_and_clear();
        match r {
            Ok(_) => println!("{id} destroyed"),
            Err(e) => {
                eprintln!("ember sandbox kill: {e}");
                first_error.get_or_insert(e.exit_code());
            }
        }
    }
    Ok(first_error.map_or(ExitCode::SUCCESS, ExitCode::from))
}

async fn exec_cmd(api: &Api, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let (cmd, args) = a.command.split_first().expect("clap requires a command");
    let input = match (a.tty, a.interactive) {
        (true, _) => Input::Terminal,
        (false, true) => Input::Forward,
        (false, false) => Input::None,
    };
    if a.tty && a.interactive && !std::io::stdin().is_terminal() {
        eprintln!("ember sandbox exec: stdin is not a terminal; its input is forwarded as is");
    }
    let command = exec::Command {
        cmd: cmd.clone(),
        args: args.to_vec(),
        env: a.env,
        cwd: a.cwd,
        user: a.user,
        timeout_s: a.timeout,
        // -t without -i: a terminal for output formatting, but no input.
        input: if a.tty && !a.interactive {
            Input::Terminal
        } else {
            input
        },
        on_interrupt: OnInterrupt::Forward,
        tag: Some("ember sandbox exec".to_owned()),
    };
    let code = exec::run(api, &a.id, &command).await?;
    Ok(ExitCode::from(code))
}

fn file_query(path: &str, extra: &[(&str, String)]) -> String {
    let mut q = format!("path={}", encode(path));
    for (k, v) in extra {
        q.push_str(&format!("&{k}={}", encode(v)));
    }
    q
}

async fn files(api: &Api, cmd: FilesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FilesCommand::Get { id, remote, local } => {
            let path = format!("{}/files?{}", sandbox_path(&id), file_query(&remote, &[]));
            let resp = api.send(api.request(Method::GET, &path)).await?;
            let mut body = resp.bytes_stream();
            match local.filter(|l| l != Path::new("-")) {
                None => {
                    let mut out = std::io::stdout().lock();
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.context("the download broke off")?;
                        out.write_all(&chunk).context("writing to stdout")?;
                    }
                    out.flush().context("writing to stdout")?;
                }
                Some(local) => {
                    // Into a temporary file beside the target, renamed only
                    // when complete: a broken download replaces nothing.
                    let dir = local
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    let mut tmp = tempfile_in(dir)?;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.context("the download broke off")?;
                        tmp.1
                            .write_all(&chunk)
                            .with_context(|| format!("writing {}", tmp.0.display()))?;
                    }
                    tmp.1.sync_all().ok();
                    std::fs::rename(&tmp.0, &local).with_context(|| {
                        format!("moving the download into place at {}", local.display())
                    })?;
                    tmp.0 = PathBuf::new();
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FilesCommand::Put {
            id,
            local,
            remote,
            mode,
            json,
        } => {
            let mut extra = Vec::new();
            if let Some(m) = mode {
                extra.push(("mode", m));
            }
            let path = format!(
                "{}/files?{}",
                sandbox_path(&id),
                file_query(&remote, &extra)
            );
            let body = if local == Path::new("-") {
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
            } else {
                let f = tokio::fs::File::open(&local)
                    .await
                    .with_context(|| format!("opening {}", local.display()))?;
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f))
            };
            let resp = api
                .send(
                    api.request(Method::PUT, &path)
                        .header("content-type", "application/octet-stream")
                        .body(body),
                )
                .await?;
            let v: Value = resp.json().await.context("reading the server's answer")?;
            if json {
                print_json(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        FilesCommand::Ls { id, path, json } => {
            let p = format!(
                "{}/files/list?{}",
                sandbox_path(&id),
                file_query(&path, &[])
            );
            let v = api.get(&p).await?;
            let listing: DirListing = typed("the listing", &v)?;
            if json {
                print_json(v.get("entries").unwrap_or(&Value::Null));
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["TYPE", "MODE", "SIZE", "MODIFIED", "NAME"]);
            for e in listing.entries {
                t.row(file_row(e));
            }
            t.print();
            Ok(ExitCode::SUCCESS)
        }
        FilesCommand::Watch {
            id,
            path,
            recursive,
            json,
        } => {
            let extra = [("recursive", recursive.to_string())];
            let p = format!(
                "{}/files/watch?{}",
                sandbox_path(&id),
                file_query(&path, &extra)
            );
            let resp = api.send(api.request(Method::GET, &p)).await?;
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut out = std::io::stdout();
            while let Some(chunk) = body.next().await {
                buf.extend_from_slice(&chunk.map_err(|e| anyhow::anyhow!("the watch broke: {e}"))?);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let v: Value = serde_json::from_slice(&line)?;
                    if v["type"] == "error" {
                        anyhow::bail!("the watch broke: {}", v["message"].as_str().unwrap_or("?"));
                    }
                    if json {
                        out.write_all(&line)?;
                    } else if v["type"] == "started" {
                        eprintln!(
                            "watching {path}{}",
                            if recursive { " and below" } else { "" }
                        );
                        continue;
                    } else {
                        let slash = if v["is_dir"] == true { "/" } else { "" };
                        writeln!(
                            out,
                            "{:<7} {}{slash}",
                            v["type"].as_str().unwrap_or("?"),
                            v["name"].as_str().unwrap_or("")
                        )?;
                    }
                    out.flush()?;
                }
            }
            anyhow::bail!("the watch ended: the sandbox stopped or was paused")
        }
        FilesCommand::Mv {
            id,
            from,
            to,
            force,
        } => {
            api.post(
                &format!("{}/files/rename", sandbox_path(&id)),
                &RenameRequest {
                    from,
                    to,
                    overwrite: force,
                    user: None,
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        FilesCommand::Rm {
            id,
            path,
            recursive,
        } => {
            let extra = if recursive {
                vec![("recursive", "true".to_owned())]
            } else {
                Vec::new()
            };
            api.delete(&format!(
                "{}/files?{}",
                sandbox_path(&id),
                file_query(&path, &extra)
            ))
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn file_row(e: FileStat) -> Vec<String> {
    let kind = match e.file_type {
        FileType::File => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "link",
        FileType::Other => "other",
    };
    let name = match &e.symlink_target {
        Some(t) => format!("{} -> {t}", e.name),
        None if e.file_type == FileType::Directory => format!("{}/", e.name),
        None => e.name.clone(),
    };
    vec![
        kind.to_owned(),
        e.mode,
        e.size.to_string(),
        short_time(&e.modified_at),
        name,
    ]
}

/// A temporary file in `dir`, removed on drop unless its path was cleared.
struct TempFile(PathBuf, std::fs::File);

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn tempfile_in(dir: &Path) -> anyhow::Result<TempFile> {
    use rand::Rng;
    let name = format!(".ember-download-{:016x}", rand::thread_rng().r#gen::<u64>());
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(TempFile(path, f))
}
