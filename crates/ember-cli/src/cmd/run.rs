//! `ember run [--vcpus N --memory MiB] -- CMD...`: boot a throwaway sandbox
//! on this machine, run one command in it with its output streamed, exit
//! with the command's exit code, and tear everything down — the VMM, the
//! network slot, the disk layer, the RAM file, sockets — on success, on
//! failure and on Ctrl-C.
//!
//! When a server is configured (`EMBER_API_URL`, `--api-url`, `api_url` in
//! the client config file) or `--server` is given, the sandbox is made
//! through the server's API instead ([`crate::cmd::client::run`]), with the
//! same exit codes; `--local` forces this machine.
//!
//! Local mode drives the crates directly (image, network slot, QEMU, guest
//! agent) without a host agent, so it works on a bare machine. Exit codes:
//! the command's own; 128+N when a signal N killed it; 124 when `--timeout`
//! killed it; 125 when Ember itself failed (no image, VM died, ...); 130 on
//! Ctrl-C.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use ember_guest_api::{GuestClient, InitRequest, ProcessEvent, StartProcess, UserSpec};
use ember_image::{Image, ImageSpec};
use ember_net::{EgressPolicy, PoolConfig, Slot, SlotPool};
use ember_vmm::qemu::{Qemu, QemuConfig};
use ember_vmm::{DiskFormat, DriveSpec, Launch, MachineSpec, NetSpec, Vm, VmConfig, Vmm};
use futures::StreamExt;
use tracing::{info, warn};

/// Exit code when Ember, not the command, failed.
const EMBER_FAILED: u8 = 125;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run through the Ember server (EMBER_API_URL, default http://127.0.0.1:3000).
    #[arg(long, conflicts_with = "local")]
    server: bool,
    /// Run on this machine even when a server is configured.
    #[arg(long)]
    local: bool,
    #[command(flatten)]
    api: crate::cmd::client::ClientArgs,
    /// Template to start from (server mode).
    #[arg(long, default_value = "base")]
    template: String,
    /// vCPUs of the sandbox [default: 1, or the template's].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory of the sandbox in MiB [default: 512, or the template's].
    #[arg(long)]
    memory: Option<u32>,
    /// Environment variable for the command, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(long)]
    cwd: Option<String>,
    /// User to run as inside the sandbox (name or uid) [default: root].
    #[arg(long)]
    user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Ember's data directory (guest image cache).
    #[arg(long, env = "EMBER_DATA_DIR", default_value = "/var/lib/ember")]
    data_dir: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let on_server = match (args.local, args.server) {
        (true, _) => false,
        (_, true) => true,
        _ => match crate::cmd::client::config::server_configured(&args.api) {
            Ok(configured) => configured,
            Err(e) => {
                eprintln!("ember run: {e}");
                return Ok(ExitCode::from(EMBER_FAILED));
            }
        },
    };
    if on_server {
        return Ok(
            crate::cmd::client::run::run(crate::cmd::client::run::RemoteRun {
                api: args.api,
                template: args.template,
                vcpus: args.vcpus,
                memory_mib: args.memory,
                env: args.env,
                cwd: args.cwd,
                user: args.user,
                timeout_s: args.timeout,
                command: args.command,
            })
            .await,
        );
    }
    if args.template != "base" {
        eprintln!("ember run: --template needs a server (--server or EMBER_API_URL)");
        return Ok(ExitCode::from(EMBER_FAILED));
    }
    let mut sandbox = None;
    let outcome = tokio::select! {
        r = run_in(&mut sandbox, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("ember run: interrupted, tearing the sandbox down");
            Ok(ExitCode::from(130))
        }
    };
    let problems = match sandbox.as_mut() {
        Some(sb) => sb.teardown().await,
        None => Vec::new(),
    };
    for p in &problems {
        eprintln!("ember run: cleanup: {p}");
    }
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("ember run: {e:#}");
            Ok(ExitCode::from(EMBER_FAILED))
        }
    }
}

async fn run_in(sandbox: &mut Option<LocalSandbox>, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let image = ensure_image(&args.data_dir).await?;
    let sb = sandbox.insert(LocalSandbox::new());
    sb.boot(
        &image,
        args.vcpus.unwrap_or(1),
        args.memory.unwrap_or(512),
        &BTreeMap::new(),
    )
    .await?;
    info!(ms = started.elapsed().as_millis() as u64, "sandbox ready");

    let (cmd, cmd_args) = args.command.split_first().expect("clap requires a command");
    let forward_stdin = !std::io::stdin().is_terminal();
    let request = StartProcess {
        cmd: cmd.clone(),
        args: cmd_args.to_vec(),
        env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd.clone(),
        user: args.user.as_deref().map(UserSpec::name),
        timeout_ms: args.timeout.map(|s| s * 1000),
        stdin: forward_stdin,
        pty: None,
        background: false,
        tag: Some("ember run".to_owned()),
    };
    let guest = sb.guest().clone();
    let mut events = guest
        .start_process(&request)
        .await
        .with_context(|| format!("start {cmd:?} in the sandbox"))?;
    let pid = events.pid();
    if forward_stdin {
        let g = guest.clone();
        tokio::spawn(async move {
            let _ = g.write_stdin_from(pid, tokio::io::stdin()).await;
            let _ = g.close_stdin(pid).await;
        });
    }
    let vm = sb.vm().expect("booted");
    let run_dir = sb.run_dir().expect("booted").to_path_buf();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let next = tokio::select! {
            e = events.next() => e,
            status = vm.wait() => {
                return Err(anyhow!("the VM exited while the command ran ({status}); {}", console_tail(&run_dir)));
            }
        };
        let Some(record) = next else {
            return Err(anyhow!(
                "the guest agent closed the output stream before the command exited"
            ));
        };
        let record = record.map_err(|e| {
            let vm_gone = vm
                .exit_status()
                .map(|s| format!("; the VM exited ({s})"))
                .unwrap_or_default();
            anyhow!(e).context(format!("lost the command's output stream{vm_gone}"))
        })?;
        match record.event {
            ProcessEvent::Stdout { data } => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            ProcessEvent::Stderr { data } => {
                stderr.write_all(&data)?;
                stderr.flush()?;
            }
            ProcessEvent::Exit(exit) => {
                let code = if exit.timed_out {
                    eprintln!("ember run: the command timed out and was killed");
                    124
                } else if let Some(code) = exit.exit_code {
                    code.clamp(0, 255) as u8
                } else {
                    128 + exit.signal.unwrap_or(0).clamp(0, 127) as u8
                };
                return Ok(ExitCode::from(code));
            }
            ProcessEvent::Lost { first_seq } => {
                warn!(first_seq, seq = record.seq, "output lost");
            }
            _ => {}
        }
    }
}

/// The current guest image, built first if there is none.
pub async fn ensure_image(data_dir: &Path) -> anyhow::Result<Image> {
    if let Some(image) = Image::locate(data_dir) {
        return Ok(image);
    }
    eprintln!("ember run: no guest image yet; building one (a few minutes, once)");
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut view = crate::cmd::image::StepView::new();
        Image::ensure(&data_dir, &ImageSpec::default(), &mut |p| view.show(p))
    })
    .await?
    .context("build the guest image")
}

/// A throwaway sandbox on this machine, driven without a host agent: a
/// QEMU VM (KVM when it can run the guest, else TCG) in a network slot, on a
/// qcow2 layer over the image's root filesystem, with its RAM in a file on
/// tmpfs. Used by `ember run` and by end-to-end tests. Call
/// [`LocalSandbox::teardown`] on every path; it releases whatever was set up,
/// even after a failed boot.
#[derive(Debug, Default)]
pub struct LocalSandbox {
    /// flock on `<run_dir>/lock`, held for the sandbox's life: a run
    /// directory whose lock is free belongs to an `ember run` that died.
    lock: Option<std::fs::File>,
    vm: Option<Box<dyn Vm>>,
    slot: Option<Slot>,
    run_dir: Option<PathBuf>,
    memory_file: Option<PathBuf>,
    guest: Option<GuestClient>,
    cgroup: Option<ember_vmm::cgroup::Cgroup>,
}

impl LocalSandbox {
    pub fn new() -> LocalSandbox {
        LocalSandbox::default()
    }

    /// Boot `image` and initialise its guest agent with a fresh token and
    /// `env` as the default environment of its processes.
    pub async fn boot(
        &mut self,
        image: &Image,
        vcpus: u32,
        memory_mib: u32,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let qemu = Qemu::new(QemuConfig::default()).context("QEMU cannot be used")?;
        info!(accel = %qemu.accel(), "QEMU backend");
        reclaim_stale_runs();
        let id = format!("run-{}", random_hex(8));
        let run_dir = PathBuf::from(RUNS_DIR).join(&id);
        for dir in [Path::new(RUNS_DIR), Path::new(MEMORY_DIR)] {
            ember_agent::confine::private_dir(dir)?;
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("create {}", run_dir.display()))?;
        self.run_dir = Some(run_dir.clone());
        self.lock = Some(lock_exclusive(&run_dir.join("lock"))?);
        let mem_dir = PathBuf::from(MEMORY_DIR);
        self.memory_file = Some(mem_dir.join(format!("{id}.ram")));
        let confiner = ember_agent::confine::Confiner::new(
            ember_agent::confine::ConfineConfig::default(),
            Path::new(RUNS_DIR),
            "ember-run",
            Path::new(RUNS_DIR),
        )?;

        let pool = SlotPool::new(PoolConfig::default()).context("network slot pool")?;
        let slot = tokio::task::spawn_blocking(move || pool.acquire(EgressPolicy::default()))
            .await?
            .context("acquire a network slot")?;
        let net = slot.vmm_net();
        let agent_addr = slot.agent_addr();
        let slot_index = slot.index();
        self.slot = Some(slot);
        self.cgroup = confiner.cgroup(&id, vcpus, memory_mib)?;
        let confinement = confiner.confinement(slot_index, self.cgroup.as_ref());

        let disk = run_dir.join("disk.qcow2");
        {
            let (base, disk) = (image.rootfs.clone(), disk.clone());
            tokio::task::spawn_blocking(move || {
                let size = std::fs::metadata(&base)?.len();
                ember_image::cow::qcow2_overlay(&base, DiskFormat::Raw, size, &disk)
                    .map_err(anyhow::Error::from)
            })
            .await?
            .context("create the disk layer")?;
        }
        let launch = Launch {
            vm_id: id.clone(),
            run_dir: run_dir.clone(),
            config: VmConfig {
                machine: MachineSpec { vcpus, memory_mib },
                kernel: image.vmlinux.clone(),
                initrd: Some(image.initrd.clone()),
                kernel_args: image.kernel_args().to_owned(),
                drives: vec![DriveSpec {
                    id: "root".to_owned(),
                    host_path: disk,
                    read_only: false,
                    root: true,
                    format: DiskFormat::Qcow2,
                    backing: vec![ember_vmm::BackingFile {
                        path: image.rootfs.clone(),
                        format: DiskFormat::Raw,
                    }],
                }],
                net: Some(NetSpec {
                    tap: net.tap,
                    guest_mac: net.guest_mac,
                    netns: Some(net.netns),
                }),
            },
            memory_file: self.memory_file.clone(),
            confinement: Some(confinement),
        };
        let vm = qemu.boot(&launch).await.context("boot the VM")?;
        let vm = &*self.vm.insert(vm);
        info!(
            sandbox = %id,
            vmm_pid = vm.pid(),
            netns = %self.slot.as_ref().map(|s| s.netns_name().to_owned()).unwrap_or_default(),
            "VM started"
        );

        let guest = GuestClient::new(agent_addr);
        let ready = tokio::select! {
            r = guest.wait_ready(std::time::Instant::now() + Duration::from_secs(120)) => r.map_err(anyhow::Error::from),
            status = vm.wait() => Err(anyhow!("the VM exited while booting ({status})")),
        };
        ready.map_err(|e| e.context(console_tail(&run_dir)))?;
        guest
            .init(&InitRequest {
                token: random_hex(32),
                time_unix_ns: Some(unix_ns()),
                env: Some(env.clone()),
                entropy_b64: Some(random_bytes()),
                dns: None,
                hostname: None,
            })
            .await
            .context("initialise the guest agent")?;
        self.guest = Some(guest);
        Ok(())
    }

    /// The guest agent's client (authenticated). Panics before `boot`.
    pub fn guest(&self) -> &GuestClient {
        self.guest
            .as_ref()
            .expect("LocalSandbox::guest before boot")
    }

    pub fn vm(&self) -> Option<&dyn Vm> {
        self.vm.as_deref()
    }

    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    pub fn memory_file(&self) -> Option<&Path> {
        self.memory_file.as_deref()
    }

    pub fn slot(&self) -> Option<&Slot> {
        self.slot.as_ref()
    }

    /// Release everything: the VMM first, then the slot, RAM file and run
    /// directory (sockets, disk layer, console log). Returns what failed.
    pub async fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        self.guest = None;
        if let Some(vm) = self.vm.take()
            && let Err(e) = vm.kill().await
        {
            problems.push(format!("kill the VM: {e}"));
        }
        if let Some(slot) = self.slot.take() {
            match tokio::task::spawn_blocking(move || slot.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("release the network slot: {e}")),
                Err(e) => problems.push(format!("release the network slot: {e}")),
            }
        }
        if let Some(f) = self.memory_file.take()
            && let Err(e) = std::fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {e}", f.display()));
        }
        if let Some(d) = self.run_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&d)
        {
            problems.push(format!("remove {}: {e}", d.display()));
        }
        if let Some(cgroup) = self.cgroup.take()
            && let Err(e) = ember_agent::confine::remove_cgroup(&cgroup).await
        {
            problems.push(format!("remove the cgroup: {e}"));
        }
        self.lock = None;
        problems
    }
}

const RUNS_DIR: &str = "/run/ember/run";
const MEMORY_DIR: &str = "/dev/shm/ember";

fn lock_exclusive(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("lock {}", path.display()));
    }
    Ok(file)
}

/// Remove what `ember run`s that were killed (SIGKILL, a crash) left
/// behind: their run directory, RAM file and any QEMU still running for
/// them. A run is dead when nobody holds its lock. Their network slots are
/// reclaimed by the slot pool itself when a later acquire lands on them.
fn reclaim_stale_runs() {
    let Ok(entries) = std::fs::read_dir(RUNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !id.starts_with("run-") || lock_exclusive(&dir.join("lock")).is_err() {
            continue;
        }
        for pid in qemu_pids_for(&id) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        warn!(run = %id, "removing what a killed `ember run` left behind");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(Path::new(MEMORY_DIR).join(format!("{id}.ram")));
    }
}

/// QEMU processes started for VM `id` (their command line names it).
fn qemu_pids_for(id: &str) -> Vec<i32> {
    let needle = format!("guest={id}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("qemu-system") && cmdline.split('\0').any(|a| a.contains(&needle)))
                .then_some(pid)
        })
        .collect()
}

fn console_tail(run_dir: &Path) -> String {
    let text = std::fs::read_to_string(run_dir.join("serial.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        return "the guest console is empty".to_owned();
    }
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!("guest console ends with:\n  {}", lines.join("\n  "))
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>()))
        .collect()
}

fn random_bytes() -> bytes::Bytes {
    use rand::Rng;
    let mut b = [0u8; 64];
    rand::thread_rng().fill(&mut b[..]);
    bytes::Bytes::copy_from_slice(&b)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
