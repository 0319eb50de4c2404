//! `ember agent`: the host agent of one machine, serving its gRPC API,
//! optionally joining a control plane (`--control-plane URL
//! --token-file F`). A joined agent serves gRPC over TLS with its own
//! certificate and accepts only its own control token
//! (`ember_agent::identity`); the join token is sent once, to the control
//! plane, and drives nothing.
//! `ember server` runs the same agent in its own process (see
//! [`start_agent`]).
//!
//! On SIGTERM/SIGINT the agent stops serving and leaves its VMs running;
//! the next agent on this machine adopts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ember_agent::{Agent, AgentConfig, BackendChoice, HostService};
use ember_net::{Ipv4Cidr, PoolConfig};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Settings shared by `ember agent` and the agent `ember server` embeds.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOptions {
    /// Which VMM to drive: auto (Firecracker where a binary and a KVM that
    /// runs Linux guests exist, else QEMU), firecracker, or qemu.
    #[arg(long, env = "EMBER_BACKEND", default_value = "auto")]
    pub backend: BackendChoice,
    /// Firecracker binary.
    #[arg(long, env = "EMBER_FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
    /// Firecracker's jailer (same release): start each Firecracker VM
    /// through it, as its sandbox's uid, instead of Ember's own jail.
    #[arg(long, env = "EMBER_JAILER_BIN")]
    pub jailer_bin: Option<PathBuf>,
    /// Run state (sockets, per-VM directories) [default: /run/ember/agent].
    #[arg(long, env = "EMBER_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Where QEMU guests' RAM files live (tmpfs) [default: /dev/shm/ember].
    #[arg(long, env = "EMBER_MEMORY_DIR")]
    pub memory_dir: Option<PathBuf>,
    /// Use this built image directory instead of the data directory's.
    #[arg(long, env = "EMBER_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// Prefix of network namespaces and links [default: ember].
    #[arg(long, env = "EMBER_NET_PREFIX")]
    pub net_prefix: Option<String>,
    /// Address pool for the sandboxes' veth links [default: 10.200.0.0/16].
    #[arg(long, env = "EMBER_NET_POOL")]
    pub net_pool: Option<Ipv4Cidr>,
    /// vCPUs this host hands out [default: CPUs × --cpu-oversubscription].
    #[arg(long, env = "EMBER_CAPACITY_VCPUS")]
    pub capacity_vcpus: Option<u32>,
    /// MiB of guest memory (sandboxes' nominal sizes) this host hands out
    /// [default: (RAM − reserve) × --memory-oversubscription].
    #[arg(long, env = "EMBER_CAPACITY_MEMORY_MIB")]
    pub capacity_memory_mib: Option<u64>,
    /// vCPUs handed out per host CPU (an idle guest uses ~0.6 % of a core) [default: 16].
    #[arg(long, env = "EMBER_CPU_OVERSUBSCRIPTION")]
    pub cpu_oversubscription: Option<f64>,
    /// Nominal guest memory handed out per MiB of host memory (idle guests
    /// touch a fraction of theirs; the reserve guards what they really use)
    /// [default: 2]. With QEMU the RAM file system (--memory-dir) stays a
    /// hard cap: size that tmpfs for the density you want.
    #[arg(long, env = "EMBER_MEMORY_OVERSUBSCRIPTION")]
    pub memory_oversubscription: Option<f64>,
    /// MiB of host memory kept free: creates and resumes are refused
    /// (`no_capacity`, naming the shortage) rather than let the host swap
    /// or kill guests [default: 1024].
    #[arg(long, env = "EMBER_MEMORY_RESERVE_MIB")]
    pub memory_reserve_mib: Option<u64>,
    /// First uid of the sandboxes' own: the sandbox in network slot N runs
    /// its VMM as uid and gid BASE+N [default: 900000000].
    #[arg(long, env = "EMBER_VM_UID_BASE")]
    pub vm_uid_base: Option<u32>,
    /// Fork plain creates from a warm base (the image booted once per
    /// shape and snapshotted before any tenant saw it); `false` boots every
    /// sandbox.
    #[arg(long, env = "EMBER_WARM_BASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub warm_base: bool,
    /// A statically linked ember-guest (`scripts/build-guest`) to boot
    /// container images with [default: EMBER_GUEST_BIN's, which must then
    /// be static].
    #[arg(long, env = "EMBER_STATIC_GUEST_BIN")]
    pub static_guest_bin: Option<PathBuf>,
    /// A registry (HOST[:PORT]) to pull images from over plain HTTP, for
    /// loopback or a trusted network (repeatable, or comma-separated); it
    /// may be on a private address.
    #[arg(long, env = "EMBER_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registry: Vec<String>,
    /// A registry (HOST[:PORT]) on a private or loopback address that
    /// template builds may pull from over TLS (repeatable, or
    /// comma-separated). Other registries must resolve to public addresses,
    /// so callers cannot reach into this host's network.
    #[arg(long, env = "EMBER_PRIVATE_REGISTRIES", value_delimiter = ',')]
    pub private_registry: Vec<String>,
    /// A PEM CA certificate to trust for registries, besides the system's.
    #[arg(long, env = "EMBER_REGISTRY_CA", value_name = "FILE")]
    pub registry_ca: Vec<PathBuf>,
    /// Testing only: treat a guest as up when a line holding TEXT appears
    /// on its serial console, instead of waiting for Ember's guest agent.
    /// For test guests that have none (Firecracker's tiny test guests,
    /// `ember-fc-fake`); their sandboxes cannot run commands or move files.
    #[arg(long, value_name = "TEXT", hide = true)]
    pub guest_ready_serial: Option<String>,
}

impl AgentOptions {
    pub fn config(&self, data_dir: PathBuf) -> AgentConfig {
        let mut c = AgentConfig::for_host(data_dir);
        c.backend = self.backend;
        if self.firecracker_bin.is_some() {
            c.firecracker_bin = self.firecracker_bin.clone();
        }
        if self.jailer_bin.is_some() {
            c.jailer_bin = self.jailer_bin.clone();
        }
        if let Some(d) = &self.run_dir {
            c.run_dir = d.clone();
        }
        if let Some(d) = &self.memory_dir {
            c.memory_dir = d.clone();
        }
        c.image_dir = self.image_dir.clone();
        let mut net = PoolConfig::default();
        if let Some(p) = &self.net_prefix {
            net.prefix = p.clone();
            net.run_dir = PathBuf::from("/run/ember/net");
        }
        if let Some(pool) = self.net_pool {
            net.pool = pool;
        }
        c.net = net;
        use ember_agent::config::{host_size, nominal_memory_mib, oversubscribed};
        let (cpus, memory_mib) = host_size();
        if let Some(r) = self.cpu_oversubscription {
            c.capacity_vcpus = oversubscribed(u64::from(cpus), r) as u32;
        }
        if let Some(r) = self.memory_oversubscription {
            c.memory_oversubscription = r;
        }
        if let Some(m) = self.memory_reserve_mib {
            c.memory_reserve_mib = m;
        }
        c.capacity_memory_mib =
            nominal_memory_mib(memory_mib, c.memory_reserve_mib, c.memory_oversubscription);
        if let Some(v) = self.capacity_vcpus {
            c.capacity_vcpus = v;
        }
        if let Some(m) = self.capacity_memory_mib {
            c.capacity_memory_mib = m;
        }
        if let Some(base) = self.vm_uid_base {
            c.confine.uid_base = base;
        }
        c.warm_base = self.warm_base;
        c.static_guest_bin = self.static_guest_bin.clone();
        c.insecure_registries = self.insecure_registry.clone();
        c.private_registries = self.private_registry.clone();
        c.registry_ca = self.registry_ca.clone();
        if let Some(text) = &self.guest_ready_serial {
            c.guest_readiness = ember_agent::config::GuestReadiness::Serial(text.clone());
        }
        c
    }
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address of the gRPC API.
    #[arg(long, env = "EMBER_AGENT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address the control plane dials [default: the listen address].
    #[arg(long, env = "EMBER_AGENT_ADVERTISE")]
    advertise: Option<String>,
    /// The control plane to join, e.g. https://10.0.0.1:3000.
    #[arg(long, env = "EMBER_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// A PEM file of the CA (or the certificate itself) that signed the
    /// control plane's TLS certificate, when the system does not trust it.
    #[arg(long, env = "EMBER_CA")]
    ca: Option<PathBuf>,
    /// With --control-plane: a join token, sent once, at this host's first
    /// join: a one-time one (`ember host join-token create`) or the
    /// cluster's (`ember server` writes it to <data_dir>/join.token).
    /// Without: the token every gRPC caller must present. From the
    /// environment only: on the command line, where every local user could
    /// read it, it is refused (use --token-file).
    #[arg(long, env = "EMBER_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token (its first line).
    #[arg(long, env = "EMBER_JOIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where this host keeps images, builds and sandbox records.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = "/var/lib/ember")]
    data_dir: PathBuf,
    /// Serve the ports of sandboxes running here directly on this address
    /// (HTTP; put TLS in front), as `{port}-{id}.` names under
    /// --ingress-domain.
    #[arg(long, env = "EMBER_INGRESS_LISTEN", requires = "ingress_domain")]
    ingress_listen: Option<SocketAddr>,
    /// The domain whose wildcard DNS points at this host's
    /// --ingress-listen, e.g. `https://h1.sandboxes.example.com` (the
    /// scheme, default https, is how URLs are written).
    #[arg(long, env = "EMBER_INGRESS_DOMAIN", requires = "ingress_listen")]
    ingress_domain: Option<String>,
    #[command(flatten)]
    options: AgentOptions,
}

pub async fn run(mut args: AgentArgs) -> anyhow::Result<ExitCode> {
    args.token = super::secret(args.token.take(), args.token_file.as_deref(), "token")?;
    let identity = match &args.control_plane {
        Some(_) => Some(
            ember_agent::identity::Identity::load_or_create(&args.data_dir)
                .context("this host's identity (<data_dir>/identity)")?,
        ),
        None => None,
    };
    let joined_before = identity
        .as_ref()
        .is_some_and(|i| i.credential().ok().flatten().is_some());
    if args.control_plane.is_some() && args.token.is_none() && !joined_before {
        anyhow::bail!(
            "--control-plane needs the join token for this host's first join: --token-file \
             PATH or EMBER_JOIN_TOKEN"
        );
    }
    if args.control_plane.is_none() && args.token.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {} is reachable from the network, and without a token anyone there could \
             drive this host's sandboxes: set --token-file PATH (or EMBER_JOIN_TOKEN), or \
             listen on 127.0.0.1",
            args.listen
        );
    }
    let mut config = args.options.config(args.data_dir.clone());
    if args.ingress_domain.is_some() {
        let ingress = ember_ingress::IngressConfig::from_domain(args.ingress_domain.as_deref())
            .map_err(anyhow::Error::msg)?;
        config.ingress = Some(ingress);
    }
    let ingress_listener = match args.ingress_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --ingress-listen {addr}"))?,
        ),
        None => None,
    };
    let agent = Agent::start(config)
        .await
        .context("starting the host agent")?;
    warn_if_not_isolated(&agent, "ember agent");
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "ember agent: {} on {} serving gRPC on {addr}",
        agent.config().host_id,
        agent.backend().detail
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    if let (Some(listener), Some(ingress)) = (ingress_listener, agent.config().ingress.clone()) {
        eprintln!(
            "ember agent: serving sandbox ports on {} as {{port}}-{{id}}.{}",
            listener.local_addr()?,
            ingress.domain.as_deref().unwrap_or_default()
        );
        let stop = shutdown.clone().cancelled_owned();
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = ember_agent::ingress::serve(agent, ingress, listener, stop).await {
                warn!(error = %e, "the host's ingress stopped");
            }
        });
    }
    let (grpc_token, tls) = match &identity {
        Some(id) => (
            Some(id.control_token.clone()),
            Some((id.cert_pem.clone(), id.key_pem.clone())),
        ),
        None => (args.token.clone(), None),
    };
    let served = serve(agent.clone(), listener, grpc_token, tls, shutdown.clone());
    if let (Some(url), Some(identity)) = (&args.control_plane, identity) {
        let advertise = args
            .advertise
            .clone()
            .unwrap_or_else(|| format!("https://{addr}"));
        let http = control_plane_client(args.ca.as_deref())?;
        tokio::spawn(register_until_accepted(
            http,
            Join {
                url: url.clone(),
                join_token: args.token.clone(),
                host_id: agent.config().host_id.to_string(),
                advertise,
                identity,
            },
            shutdown.clone(),
        ));
    }
    served.await?;
    agent.detach_all().await;
    eprintln!("ember agent: stopped; running sandboxes keep running");
    Ok(ExitCode::SUCCESS)
}

/// Start an agent and serve its gRPC API on `listener` until `shutdown`
/// (over TLS with `tls`, a PEM certificate and key), checking for VMs that
/// died every 2 s. Returns the agent and the task.
pub async fn start_agent(
    config: AgentConfig,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<(String, String)>,
    shutdown: CancellationToken,
) -> anyhow::Result<(Agent, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let agent = Agent::start(config)
        .await
        .context("starting the host agent")?;
    warn_if_not_isolated(&agent, "ember server");
    let task = tokio::spawn(serve(agent.clone(), listener, token, tls, shutdown));
    Ok((agent, task))
}

/// Say plainly, at start, when guests run under software emulation: QEMU's
/// TCG is no security boundary, whatever confines the VMM around it.
fn warn_if_not_isolated(agent: &Agent, who: &str) {
    if agent.backend().isolation == ember_agent::backend::Isolation::Tcg {
        warn!("guests run under QEMU TCG (software emulation): not a security boundary");
        eprintln!(
            "{who}: WARNING: no usable KVM here; guests run under QEMU TCG, which is not a \
             security boundary. Each VMM is confined (own uid, jail, seccomp, cgroup), but do \
             not run code you would not run on this host."
        );
    }
}

async fn serve(
    agent: Agent,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<(String, String)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let watcher = {
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut sample = tokio::time::interval(ember_agent::usage::INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => agent.check_vms().await,
                    _ = sample.tick() => agent.sample_usage().await,
                }
            }
        })
    };
    // Server::tcp_nodelay applies only to listeners tonic binds itself:
    // without this, small replies (exec output, port bytes) wait for
    // delayed ACKs (~40 ms each).
    use futures::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("the gRPC listener's TLS certificate")?;
    }
    let result = server
        .add_service(HostService::new(agent).into_server(token))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .context("serving gRPC");
    watcher.abort();
    result
}

/// An HTTP client for the control plane, trusting `ca` on top of the
/// system's roots.
pub fn control_plane_client(ca: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(path) = ca {
        let pem =
            std::fs::read(path).with_context(|| format!("reading --ca {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca {}: not PEM certificates", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("--ca {} holds no PEM certificate", path.display());
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().context("building the HTTP client")
}

/// What a host joins a control plane with.
struct Join {
    url: String,
    join_token: Option<String>,
    host_id: String,
    advertise: String,
    identity: ember_agent::identity::Identity,
}

/// Join the control plane, retrying (it may start after us) until it
/// accepts or we shut down. The first join presents the join token and
/// keeps the credential it is issued; every later one presents that.
async fn register_until_accepted(client: reqwest::Client, join: Join, shutdown: CancellationToken) {
    let endpoint = format!("{}/internal/v1/hosts", join.url.trim_end_matches('/'));
    if endpoint.starts_with("http://") && !is_loopback_url(&join.url) {
        warn!(url = %join.url, "the control plane is plain HTTP on the network: the join token and this host's credential cross it in clear; serve it with --tls-cert");
    }
    let mut delay = Duration::from_millis(500);
    // After a refusal of our credential (the host was removed), the next
    // attempt joins afresh with the join token.
    let mut credential_refused = false;
    loop {
        let credential = match join.identity.credential() {
            Ok(c) => c.filter(|_| !credential_refused),
            Err(e) => {
                tracing::error!(error = %e, "reading this host's credential");
                None
            }
        };
        let Some(bearer) = credential.as_deref().or(join.join_token.as_deref()) else {
            tracing::error!(
                "the control plane refused this host's credential and there is no join token \
                 to join again with: restart with --token-file"
            );
            return;
        };
        let sent = client
            .post(&endpoint)
            .bearer_auth(bearer)
            .json(&serde_json::json!({
                "address": join.advertise,
                "host_id": join.host_id,
                "control_token": join.identity.control_token,
                "tls_cert": join.identity.cert_pem,
            }))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if let Some(issued) = body["credential"].as_str()
                    && let Err(e) = join.identity.store_credential(issued)
                {
                    // The next registration presents the join token with
                    // our control token, and is issued another.
                    tracing::error!(error = %e, path = %join.identity.credential_path().display(), "keeping this host's credential");
                }
                info!(url = %join.url, advertise = %join.advertise, "joined the control plane");
                eprintln!("ember agent: joined {} as {}", join.url, join.advertise);
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if status == reqwest::StatusCode::UNAUTHORIZED && credential.is_some() {
                    credential_refused = true;
                }
                warn!(%status, %body, "the control plane refused this host; retrying");
                eprintln!("ember agent: the control plane refused this host ({status}): {body}");
            }
            Ok(r) => warn!(status = %r.status(), "the control plane is not ready; retrying"),
            Err(e) => warn!(error = %e, "cannot reach the control plane; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

fn is_loopback_url(url: &str) -> bool {
    let url = reqwest::Url::parse(url).ok();
    url.as_ref().and_then(|u| u.host_str()).is_some_and(|h| {
        h == "localhost"
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
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
    eprintln!("ember agent: shutting down");
    token.cancel();
}
