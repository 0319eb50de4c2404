//! The `ember` binary. Each subcommand lives in its own module under `cmd/`
//! and is a thin layer over a library crate; nothing depends on this crate.

use ember_cli::cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "Ember: sandboxes in microVMs that pause, resume and fork in milliseconds",
    after_help = cmd::client::EXIT_CODES_HELP
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `ember_vmm=debug`.
    #[arg(long, global = true, env = "EMBER_LOG", default_value = "warn")]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "EMBER_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The host agent of this machine (gRPC), optionally joining a control plane.
    Agent(Box<cmd::agent::AgentArgs>),
    /// The audit log: who changed what, newest first (admin).
    Audit(cmd::client::key::AuditArgs),
    /// Host agents of the server (admin).
    Host(cmd::client::host::HostArgs),
    /// Guest images: kernel, initramfs and root filesystem.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// API keys: create, list, revoke.
    Key(cmd::client::key::KeyArgs),
    /// Boot a throwaway sandbox, run one command in it, exit with its exit code
    /// (through the server when one is configured, else on this machine).
    Run(cmd::run::RunArgs),
    /// Sandboxes on the server: create, list, exec, files, pause, resume, kill.
    Sandbox(cmd::client::sandbox::SandboxArgs),
    /// The control plane: REST API, store, scheduler, reconciler, timeouts.
    Server(Box<cmd::server::ServerArgs>),
    /// Templates frozen from running sandboxes: create, list, get, delete.
    Snapshot(cmd::client::snapshot::SnapshotArgs),
    /// Templates built from container images and Dockerfiles: build, list,
    /// follow builds, delete.
    Template(cmd::client::template::TemplateArgs),
    /// What your team holds against the server's limits.
    Usage(cmd::client::key::UsageArgs),
    /// Serve a restored VM's memory through userfaultfd (started by the host agent).
    Uffd(Box<cmd::uffd::UffdArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    match cli.command {
        // Files private to Ember (guest RAM, disks, tokens, the database);
        // the OOM killer takes a VMM long before the agent or control plane.
        Command::Agent(_) | Command::Server(_) => ember_agent::confine::harden_self(true),
        // A local `ember run` hosts its VM too; as a client it only needs
        // the private umask, not a place ahead of the VMs in the OOM order.
        Command::Run(_) => ember_agent::confine::harden_self(false),
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Agent(a) => cmd::agent::run(*a).await,
            Command::Audit(a) => cmd::client::key::audit(a).await,
            Command::Host(a) => cmd::client::host::run(a).await,
            Command::Image(c) => cmd::image::run(c).await,
            Command::Key(a) => cmd::client::key::run(a).await,
            Command::Run(a) => cmd::run::run(a).await,
            Command::Sandbox(a) => cmd::client::sandbox::run(a).await,
            Command::Server(a) => cmd::server::run(*a).await,
            Command::Snapshot(a) => cmd::client::snapshot::run(a).await,
            Command::Template(a) => cmd::client::template::run(a).await,
            Command::Usage(a) => cmd::client::key::usage(a).await,
            Command::Uffd(a) => cmd::uffd::run(*a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
