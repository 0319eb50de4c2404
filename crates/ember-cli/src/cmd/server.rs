//! `ember server`: the control plane (REST API, store, scheduler,
//! reconciler, TTLs) in one process.
//!
//! Settings come from flags, then `EMBER_*` environment variables, then a
//! TOML file (`--config`), then defaults: listen on 127.0.0.1:3000 (loopback
//! only until you choose otherwise), data in /var/lib/ember, SQLite at
//! `<data dir>/control.db`.
//!
//! Phase 2 starts an embedded host agent here by default and attaches it
//! through `ControlPlane::hosts()` (see `attach_embedded_agent`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ember_control::server::{ControlPlane, ServerConfig};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ember";

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Address for the REST API [default: 127.0.0.1:3000].
    #[arg(long, env = "EMBER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where Ember keeps its state [default: /var/lib/ember].
    #[arg(long, env = "EMBER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `sqlite://PATH` or `postgres://USER:PASS@HOST/DB` [default: sqlite in the data dir].
    #[arg(long, env = "EMBER_DATABASE_URL")]
    database_url: Option<String>,
    /// Token host agents present at their first join (each is then issued
    /// its own credential); generated and stored on first start if not
    /// given. From the environment only: on the command line, where every
    /// local user could read it, it is refused (use --join-token-file).
    #[arg(long, env = "EMBER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token (its first line); better than
    /// --join-token, which every local user can read in /proc.
    #[arg(long, env = "EMBER_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Accept no cluster-wide join token: machines join only with one-time
    /// tokens (`ember host join-token create`), each admitting one host.
    #[arg(long, env = "EMBER_NO_CLUSTER_JOIN_TOKEN", conflicts_with_all = ["join_token", "join_token_file"])]
    no_cluster_join_token: bool,
    /// Serve sandbox ports at `{port}-{sandbox id}.DOMAIN` (point wildcard
    /// DNS for *.DOMAIN at this server). `https://` (the default) or
    /// `http://` before it says how URLs are written; a `:port` may follow.
    /// Without it, ports are served at /v1/sandboxes/{id}/ports/{port}/.
    #[arg(long, env = "EMBER_INGRESS_DOMAIN", value_name = "DOMAIN")]
    ingress_domain: Option<String>,
    /// Let tenants' `allow_out` open this private or special range (the
    /// cloud metadata service, the LAN, …), which sandboxes otherwise never
    /// reach. Repeat for more; the public internet needs no grant.
    #[arg(
        long = "egress-grant",
        env = "EMBER_EGRESS_GRANTS",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    egress_grants: Vec<String>,
    /// TOML file with any of: listen, data_dir, database_url, join_token,
    /// cluster_join_token (false: as --no-cluster-join-token),
    /// tls_cert, tls_key, ingress_domain, egress_grants, a [team_egress_grants] table (team name =
    /// [CIDR, …]), reconcile_interval_s, ttl_interval_s,
    /// orphan_grace_s, stuck_after_s, host_lost_after_s, answer_within_s,
    /// max_running_s (default 86400), paused_retention_s (default: keep),
    /// audit_retention_s (default: keep), a
    /// [rate_limits] table (requests_per_second, burst, concurrent_requests:
    /// per API key, defaults 100/200/64, 0 = none), and a [team_limits] table (running_sandboxes, vcpus, memory_mib,
    /// paused_sandboxes, templates, storage_mib: per team, absent = no limit).
    #[arg(long, env = "EMBER_CONFIG")]
    config: Option<PathBuf>,
    /// Serve the API over TLS with this PEM certificate (chain); needs
    /// --tls-key. Clients that do not trust its issuer pass `--ca`.
    #[arg(long, env = "EMBER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "EMBER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Do not run a host agent in this process (hosts join with `ember agent`).
    #[arg(long, env = "EMBER_NO_AGENT")]
    no_agent: bool,
    #[command(flatten)]
    agent: crate::cmd::agent::AgentOptions,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    join_token: Option<String>,
    /// `false`: no cluster join token; hosts join with one-time tokens.
    cluster_join_token: Option<bool>,
    /// PEM certificate (chain) and key: serve the API over TLS.
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    ingress_domain: Option<String>,
    /// CIDRs of the special ranges tenants may open (see --egress-grant).
    egress_grants: Option<Vec<String>>,
    /// More such ranges for some teams: `team-name = ["10.50.0.0/16"]`.
    team_egress_grants: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// What each team may hold at once; absent keys: no limit.
    team_limits: Option<TeamLimits>,
    /// Longest a sandbox runs between a create or resume before its
    /// on_timeout applies, whatever its timeout (default 86400; 0: no limit).
    max_running_s: Option<u64>,
    /// Paused sandboxes older than this are destroyed (default: kept; 0: kept).
    paused_retention_s: Option<u64>,
    /// Audit entries older than this are deleted (default: kept; 0: kept).
    audit_retention_s: Option<u64>,
    /// Per API key (and per sandbox access token): requests_per_second,
    /// burst, concurrent_requests (defaults 100, 200, 64; 0: no limit).
    rate_limits: Option<RateLimitsFile>,
    reconcile_interval_s: Option<u64>,
    ttl_interval_s: Option<u64>,
    orphan_grace_s: Option<u64>,
    stuck_after_s: Option<u64>,
    /// Seconds a host may be unreachable before its running sandboxes are failed.
    host_lost_after_s: Option<u64>,
    /// Seconds a pause or resume request waits before it is answered 202
    /// (the operation goes on; clients poll the sandbox).
    answer_within_s: Option<u64>,
}

/// Write a secret to a new file readable by its owner only (0600),
/// replacing what was there.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// `[rate_limits]` of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitsFile {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    concurrent_requests: Option<u32>,
}

/// `[team_limits]` of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamLimits {
    /// Sandboxes holding host resources (creating, running, resuming, …).
    running_sandboxes: Option<u64>,
    /// vCPUs and MiB of memory of those sandboxes, summed.
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    /// Paused sandboxes (a team's own pauses; a timeout's pause always runs).
    paused_sandboxes: Option<u64>,
    /// Templates (named snapshots).
    templates: Option<u64>,
    /// MiB of the snapshots its paused sandboxes and templates hold.
    storage_mib: Option<u64>,
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(p) => read_config(p)?,
        None => ConfigFile::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let database_url = match args.database_url.or(file.database_url) {
        Some(u) => u,
        None => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
            format!("sqlite://{}", data_dir.join("control.db").display())
        }
    };
    let mut config = ServerConfig::new(database_url);
    config.join_token = super::secret(
        args.join_token,
        args.join_token_file.as_deref(),
        "join-token",
    )?
    .or(file.join_token);
    config.cluster_join_token =
        !args.no_cluster_join_token && file.cluster_join_token != Some(false);
    if !config.cluster_join_token && config.join_token.is_some() {
        anyhow::bail!(
            "a join_token is set but the cluster join token is off (cluster_join_token = false): drop one"
        );
    }
    if let Some(s) = file.reconcile_interval_s {
        config.reconcile_interval = Duration::from_secs(s.max(1));
    }
    if let Some(s) = file.ttl_interval_s {
        config.ttl_interval = Duration::from_secs(s.max(1));
    }
    if let Some(s) = file.orphan_grace_s {
        config.reconciler.grace_ms = (s as i64).saturating_mul(1000);
    }
    if let Some(s) = file.stuck_after_s {
        config.reconciler.stuck_after_ms = (s as i64).saturating_mul(1000);
    }
    if let Some(s) = file.host_lost_after_s {
        config.reconciler.host_lost_ms = (s as i64).saturating_mul(1000);
    }
    if let Some(s) = file.answer_within_s {
        config.answer_within = Duration::from_secs(s.max(1));
    }
    match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => {
            config.tls = Some(ember_control::tls::server_config(&cert, &key)?);
        }
        (None, None) => {}
        _ => anyhow::bail!("TLS needs both tls_cert and tls_key (flags or config file)"),
    }
    config.ingress = ember_control::ingress::IngressConfig::from_domain(
        args.ingress_domain.or(file.ingress_domain).as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let grants = if args.egress_grants.is_empty() {
        file.egress_grants.unwrap_or_default()
    } else {
        args.egress_grants
    };
    config.egress = ember_types::cidr::EgressCeiling::new(&grants)
        .map_err(|e| anyhow::anyhow!("--egress-grant: {e}"))?;
    if !grants.is_empty() {
        tracing::info!(?grants, "tenants may open these ranges with allow_out");
    }
    for (team, extra) in file.team_egress_grants.unwrap_or_default() {
        let all: Vec<&String> = grants.iter().chain(extra.iter()).collect();
        let ceiling = ember_types::cidr::EgressCeiling::new(&all)
            .map_err(|e| anyhow::anyhow!("team_egress_grants.{team}: {e}"))?;
        tracing::info!(%team, grants = ?extra, "this team may also open these ranges");
        config.team_egress.insert(team, ceiling);
    }
    if let Some(s) = file.max_running_s {
        config.lifetime.max_running_s = (s > 0).then_some(s);
    }
    if let Some(s) = file.paused_retention_s {
        config.lifetime.paused_retention_s = (s > 0).then_some(s);
    }
    if let Some(s) = file.audit_retention_s {
        config.lifetime.audit_retention_s = (s > 0).then_some(s);
    }
    if let Some(r) = file.rate_limits {
        let l = &mut config.rate_limits;
        if let Some(v) = r.requests_per_second {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "rate_limits.requests_per_second must be a number >= 0 (0: no limit)"
            );
            l.per_second = v;
        }
        if let Some(v) = r.burst {
            l.burst = v;
        }
        if let Some(v) = r.concurrent_requests {
            l.concurrent = v;
        }
    }
    if let Some(l) = file.team_limits {
        config.quota = ember_control::store::TeamQuota {
            running_sandboxes: l.running_sandboxes,
            vcpus: l.vcpus,
            memory_mib: l.memory_mib,
            paused_sandboxes: l.paused_sandboxes,
            templates: l.templates,
            storage_mib: l.storage_mib,
        };
    }

    let plane = ControlPlane::open(config)
        .await
        .context("opening the control plane")?;
    // First-start secrets go to files only root can read, not to the
    // terminal or a log collector; the paths are printed.
    if let Some(key) = &plane.first_start.admin_key {
        let path = data_dir.join("admin.key");
        match write_secret(&path, key) {
            Ok(()) => {
                eprintln!(
                    "ember server: first start; an admin API key was created, in a file only root can read:"
                );
                eprintln!("    EMBER_ADMIN_KEY_FILE={}", path.display());
                eprintln!(
                    "    (export EMBER_API_KEY=$(sudo cat {}); store it safely, then delete the file)",
                    path.display()
                );
            }
            Err(err) => {
                // The key exists only now: losing it would leave no admin.
                eprintln!(
                    "ember server: could not write {} ({err}); the first admin key, shown only now:",
                    path.display()
                );
                eprintln!("    EMBER_ADMIN_KEY={key}");
            }
        }
    }
    if let Some(token) = &plane.first_start.new_join_token {
        let path = data_dir.join("join.token");
        match write_secret(&path, token) {
            Ok(()) => {
                eprintln!(
                    "ember server: the cluster join token (for `ember agent --token-file`; also stored in the database):"
                );
                eprintln!("    EMBER_JOIN_TOKEN_FILE={}", path.display());
            }
            Err(err) => {
                eprintln!(
                    "ember server: could not write {} ({err}); the cluster join token:",
                    path.display()
                );
                eprintln!("    EMBER_JOIN_TOKEN={token}");
            }
        }
    }
    if plane.join_token().is_none() {
        eprintln!(
            "ember server: no cluster join token; each machine joins with a one-time token: `ember host join-token create`"
        );
    }
    let shutdown = CancellationToken::new();
    let agent = if args.no_agent {
        None
    } else {
        Some(attach_embedded_agent(&plane, &args.agent, &data_dir, shutdown.clone()).await?)
    };

    let listener = ember_control::server::bind(listen).await?;
    let addr = listener.local_addr()?;
    let scheme = if plane.serves_tls() { "https" } else { "http" };
    eprintln!("ember server: listening on {scheme}://{addr}");
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    plane.serve(listener, shutdown).await?;
    if let Some((agent, task)) = agent {
        let _ = task.await;
        agent.detach_all().await;
    }
    eprintln!("ember server: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Start this machine's host agent in this process, serving gRPC over TLS
/// on a loopback port with its own identity (certificate and control
/// token, as a joined agent has), and register it as a host.
async fn attach_embedded_agent(
    plane: &ControlPlane,
    options: &crate::cmd::agent::AgentOptions,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    ember_agent::Agent,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let config = options.config(data_dir.to_path_buf());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the embedded agent's gRPC port")?;
    let addr = listener.local_addr()?;
    let identity = ember_agent::identity::Identity::load_or_create(data_dir)
        .context("the embedded agent's identity (<data_dir>/identity)")?;
    let (agent, task) = crate::cmd::agent::start_agent(
        config,
        listener,
        Some(identity.control_token.clone()),
        Some((identity.cert_pem.clone(), identity.key_pem.clone())),
        shutdown,
    )
    .await?;
    let address = format!("https://{addr}");
    plane
        .hosts()
        .register_local(
            &address,
            &agent.config().host_id.to_string(),
            &identity.control_token,
            Some(&identity.cert_pem),
        )
        .await
        .context("registering the embedded host agent")?;
    eprintln!(
        "ember server: host agent {} ({}) attached",
        agent.config().host_id,
        agent.backend().detail
    );
    Ok((agent, task))
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("installing signal handlers failed; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("ember server: shutting down");
    token.cancel();
}
