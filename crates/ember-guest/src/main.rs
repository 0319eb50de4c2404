//! `ember-guest`: the agent inside every Ember VM, running as its PID 1.
//!
//! As PID 1 it sets the system up (`system`), reaps every process
//! (`process`), and serves the host↔guest protocol (`api`, specified in
//! `ember-guest-api`) on the guest's fixed port. Started as an ordinary
//! process (tests; anything not PID 1, or `--no-system-setup`) it touches
//! nothing system-wide, becomes a subreaper so orphans still come to it, and
//! prints `listening on <addr>` on stdout once it serves.

mod api;
mod auth;
mod error;
mod eventlog;
mod files;
mod fsid;
mod process;
mod system;
mod users;
mod watch;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ember_types::guest::AGENT_PORT;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{AppState, SystemEffects};
use crate::process::ProcessTable;
use crate::users::UserDb;

#[derive(Debug, Parser)]
#[command(version, about = "Ember's in-VM agent (PID 1 of every guest)")]
struct Cli {
    /// Address to serve the API on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], AGENT_PORT)))]
    listen: SocketAddr,
    /// Run as an ordinary process: no mounts, network, hostname, clock or
    /// resolv.conf changes (implied when not PID 1).
    #[arg(long)]
    no_system_setup: bool,
    /// Directory with the passwd and group files users are resolved from.
    #[arg(long, default_value = "/etc")]
    users_dir: PathBuf,
    /// Where `/init`'s nameservers are written (default /etc/resolv.conf as
    /// PID 1; nowhere otherwise).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// Bytes of events buffered per process for replay.
    #[arg(long, default_value_t = 1 << 20)]
    output_buffer_bytes: usize,
}

impl Cli {
    fn defaults() -> Self {
        Cli::parse_from(["ember-guest"])
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // The kernel hands PID 1 whatever boot arguments it did not use;
        // refusing them would panic the kernel.
        Err(e) if pid1 => {
            eprintln!("ember-guest: ignoring arguments: {e}");
            Cli::defaults()
        }
        Err(e) => e.exit(),
    };
    let system_setup = pid1 && !cli.no_system_setup;
    init_logging();
    let result = run(cli, pid1, system_setup);
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "ember-guest failed");
    }
    if pid1 {
        // PID 1 must not exit (the kernel would panic): power off instead.
        let e = system::power_off();
        tracing::error!(error = %e, "power-off failed");
        loop {
            std::thread::park();
        }
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_GUEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn run(cli: Cli, pid1: bool, system_setup: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(cli, pid1, system_setup))
}

async fn serve(cli: Cli, pid1: bool, system_setup: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before any child exists, so no SIGCHLD is missed.
    let mut sigchld = signal(SignalKind::child()).context("handling SIGCHLD")?;
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;

    let resolv_conf = if system_setup {
        Some(
            cli.resolv_conf
                .clone()
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
        )
    } else {
        cli.resolv_conf.clone()
    };
    if system_setup {
        set_up_system();
    } else {
        if pid1 {
            tracing::warn!("PID 1 without system setup (--no-system-setup)");
        }
        become_subreaper();
    }

    let processes = Arc::new(ProcessTable::new(
        UserDb::new(cli.users_dir.clone()),
        cli.output_buffer_bytes,
    ));
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let state = Arc::new(AppState {
        processes: processes.clone(),
        token: auth::TokenState::default(),
        init_lock: tokio::sync::Mutex::new(()),
        started,
        effects: SystemEffects {
            set_clock: system_setup,
            set_hostname: system_setup,
            credit_entropy: system_setup,
            resolv_conf,
        },
        shutdown: shutdown_tx,
    });

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, pid1, system_setup, boot_ms = started.elapsed().as_millis() as u64, "serving");
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    }

    let reaper = {
        let processes = processes.clone();
        tokio::spawn(async move {
            processes.reap();
            // The periodic pass is a safety net; SIGCHLD does the real work.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                processes.reap();
            }
        })
    };

    let server = axum::serve(listener, api::router(state));
    let reason = tokio::select! {
        result = server => {
            result.context("serving the API")?;
            "server stopped"
        }
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT (Ctrl-Alt-Del)",
        _ = shutdown_rx.recv() => {
            // Let the 202 of POST /shutdown reach the client first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            "POST /shutdown"
        }
    };
    tracing::info!(reason, "shutting down: stopping every process");
    processes.kill_all(pid1).await;
    nix::unistd::sync();
    reaper.abort();
    Ok(())
}

fn set_up_system() {
    let plan = system::boot_plan(Path::new("/"));
    let mounts = system::apply_mounts(&plan);
    system::ensure_console_stdio();
    if let Err(e) = system::disable_ctrl_alt_del() {
        tracing::error!(error = %e, "cannot route Ctrl-Alt-Del to SIGINT");
    }
    if let Err(e) = system::set_hostname(plan.hostname) {
        tracing::error!(error = %e, "cannot set the hostname");
    }
    let network = system::apply_network(&plan);
    if let Err(e) = system::write_resolv_conf(&plan.resolv_conf, &plan.nameservers) {
        tracing::error!(error = %e, "cannot write /etc/resolv.conf");
    }
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o022) };
    if mounts.failed + network.failed > 0 {
        tracing::error!(
            failed_mounts = mounts.failed,
            failed_network_steps = network.failed,
            "SYSTEM SETUP INCOMPLETE; serving anyway"
        );
    } else {
        tracing::info!("system set up");
    }
}

/// Outside a VM, orphans of our processes come to us rather than the host's
/// init, so reaping works the same as under PID 1.
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot become a subreaper");
    }
}
