//! `ember uffd`: one page server process per restored Firecracker VM,
//! started by the host agent (in its own session, so an agent restart
//! leaves it and its VM running). A thin layer over `ember_uffd`: it picks
//! the image (a build from the store, or a flat memory file), loads the
//! working set to prefetch, prints `ready` once the socket listens, maps
//! signals to session requests and the outcome to an exit status.
//!
//! Exit status: 0 when the VMM exited or on SIGTERM/SIGINT (the VMM is
//! killed first: without its page server it would hang); 1 when the server
//! failed closed (it killed the VMM) or could not start.
//! Signals: SIGTERM/SIGINT stop; SIGUSR1 writes the working set now.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ember_types::BuildId;
use ember_uffd::{Config, Ending, Image, Layout, PageServer, SessionHandle, WorkingSet};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct UffdArgs {
    /// Unix socket to listen on for Firecracker's handshake. It appears
    /// only once the server listens; it is removed when the VMM connects.
    #[arg(long)]
    socket: PathBuf,
    /// The build whose memory to serve (read from `<data-dir>/builds/<id>/`).
    #[arg(long, requires = "data_dir", conflicts_with = "memfile")]
    build: Option<BuildId>,
    /// Ember's data directory (holds `builds/`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve a flat memory file instead of a build (e.g. a Firecracker
    /// full-snapshot memfile).
    #[arg(long, required_unless_present = "build")]
    memfile: Option<PathBuf>,
    /// Prefetch the recorded working set, if the build has one.
    #[arg(long, value_enum, default_value = "on")]
    prefetch: Switch,
    /// Record the order in which the VM first touches memory and write it as
    /// the build's working set at exit (merged after the prefetched one).
    #[arg(long)]
    record_working_set: bool,
    /// Working-set file (default: `<data-dir>/builds/<id>/working-set`;
    /// required to record or prefetch with `--memfile`).
    #[arg(long)]
    working_set: Option<PathBuf>,
    /// Track pages the guest writes (userfaultfd write-protect); ask for
    /// them on the control socket.
    #[arg(long)]
    dirty_tracking: bool,
    /// Serve the control protocol (metrics, dirty pages, write working set)
    /// on this Unix socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Write the final metrics as JSON to this file at exit.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Bytes populated per fault in 4 KiB regions (the aligned window
    /// around the fault, only pages not yet present). Default 64 KiB;
    /// 4 KiB when recording a working set, so that it holds exactly the
    /// pages the VM touched.
    #[arg(long)]
    readahead: Option<u64>,
    /// Largest window for a sequential stream of faults (each fault where
    /// the last window ended doubles it). Default 1 MiB; when recording a
    /// working set, the same as --readahead.
    #[arg(long)]
    readahead_max: Option<u64>,
    /// Threads serving faults.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Seconds to wait for the VMM to connect and hand over its memory.
    #[arg(long, default_value_t = 60)]
    handshake_timeout: u64,
}

pub async fn run(args: UffdArgs) -> anyhow::Result<ExitCode> {
    let (image, ws_path) = open_image(&args)?;
    let prefetch = match (&ws_path, args.prefetch) {
        (Some(path), Switch::On) => match WorkingSet::read(path) {
            Ok(ws) => ws,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring the working set");
                None
            }
        },
        _ => None,
    };
    if args.record_working_set && ws_path.is_none() {
        bail!("--record-working-set with --memfile needs --working-set <path> to write it to");
    }
    let defaults = Config::default();
    let readahead = args.readahead.unwrap_or(if args.record_working_set {
        4096
    } else {
        defaults.readahead
    });
    let readahead_max = args.readahead_max.unwrap_or(if args.record_working_set {
        readahead
    } else {
        defaults.readahead_max.max(readahead)
    });
    for (name, v) in [
        ("--readahead", readahead),
        ("--readahead-max", readahead_max),
    ] {
        if v < 4096 || !v.is_multiple_of(4096) {
            bail!("{name} must be a positive multiple of 4096, got {v}");
        }
    }
    if readahead_max < readahead {
        bail!("--readahead-max ({readahead_max}) must be at least --readahead ({readahead})");
    }
    let config = Config {
        readahead,
        readahead_max,
        workers: args.workers.max(1),
        prefetch,
        record_working_set: ws_path.filter(|_| args.record_working_set),
        dirty_tracking: args.dirty_tracking,
        control_socket: args.control_socket.clone(),
        metrics_file: args.metrics_file.clone(),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        ..Config::default()
    };
    let build = image.name().to_owned();
    let server = PageServer::bind(&args.socket, image, config)?;
    // The host agent waits for this line (or for the socket to exist)
    // before telling Firecracker to load the snapshot.
    println!("ready socket={}", args.socket.display());
    std::io::stdout().flush().ok();
    info!(build = %build, socket = %args.socket.display(), "listening for the VMM");

    let (handle_tx, mut handle_rx) = tokio::sync::oneshot::channel::<SessionHandle>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("uffd-session".into())
        .spawn(move || {
            let result = server.accept().and_then(|session| {
                let _ = handle_tx.send(session.handle());
                session.wait()
            });
            let _ = done_tx.send(result);
        })
        .context("spawning the session thread")?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut handle: Option<SessionHandle> = None;
    let result = loop {
        tokio::select! {
            result = &mut done_rx => break result.context("the session thread died")?,
            h = &mut handle_rx, if handle.is_none() => handle = h.ok(),
            _ = term.recv() => stop(handle.as_ref(), &args.socket, "SIGTERM"),
            _ = int.recv() => stop(handle.as_ref(), &args.socket, "SIGINT"),
            _ = usr1.recv() => write_working_set(handle.as_ref()),
        }
    };
    match result {
        Ok(outcome) => {
            let how = match outcome.ending {
                Ending::PeerExited => "the VMM exited",
                Ending::Terminated => "terminated",
            };
            info!(build = %build, faults = outcome.metrics.faults, "page server stopped: {how}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

/// The image to serve and where its working set lives.
fn open_image(args: &UffdArgs) -> anyhow::Result<(Image, Option<PathBuf>)> {
    if let (Some(build), Some(data_dir)) = (args.build, &args.data_dir) {
        let store = ember_snapshot::BuildStore::open_read_only(data_dir)
            .with_context(|| format!("opening the build store in {}", data_dir.display()))?;
        let image = ember_uffd::build::open(&store, build)?;
        let ws = args
            .working_set
            .clone()
            .unwrap_or_else(|| ember_uffd::build::working_set_path(&store, build));
        return Ok((image, Some(ws)));
    }
    let Some(memfile) = &args.memfile else {
        bail!("give --build <id> --data-dir <dir>, or --memfile <path>");
    };
    let size = std::fs::metadata(memfile)
        .with_context(|| format!("reading {}", memfile.display()))?
        .len();
    let layout = Layout::flat(size).with_context(|| {
        format!(
            "{} is {size} bytes, not a whole number of 4 KiB pages",
            memfile.display()
        )
    })?;
    let image = Image::open(
        memfile_name(memfile),
        Arc::new(layout),
        std::slice::from_ref(memfile),
    )?;
    Ok((image, args.working_set.clone()))
}

fn memfile_name(path: &Path) -> String {
    format!("memfile:{}", path.display())
}

fn stop(handle: Option<&SessionHandle>, socket: &Path, signal: &str) {
    match handle {
        Some(h) => {
            info!(build = h.build(), "{signal}: stopping");
            h.terminate();
        }
        None => {
            // No VMM yet: nothing to kill; leave no socket behind.
            info!("{signal} before the VMM connected: exiting");
            let _ = std::fs::remove_file(socket);
            std::process::exit(0);
        }
    }
}

fn write_working_set(handle: Option<&SessionHandle>) {
    let Some(h) = handle else {
        return;
    };
    match h.write_working_set() {
        Ok(Some((path, ws))) => {
            info!(path = %path.display(), ranges = ws.ranges.len(), "SIGUSR1: wrote the working set")
        }
        Ok(None) => warn!("SIGUSR1: not recording a working set (start with --record-working-set)"),
        Err(e) => warn!(error = %e, "SIGUSR1: cannot write the working set"),
    }
}
