//! QEMU `-M microvm` backend, driven over QMP.
//!
//! Ember's backend on hosts without usable KVM (TCG) and a second production
//! backend where KVM works. Guest RAM is always a `memory-backend-file` with
//! `share=on` over a file the caller names, so the RAM file *is* the memory
//! snapshot; a snapshot writes only device state (see [`vm`]).
//!
//! Submodules: [`qmp`] (the protocol client), `cmdline` (the command line as
//! a pure function), `accel` (KVM or TCG, and why), `drives` (the stable
//! per-VM drive paths), `process` (spawn, signal, exit), `vm` (the running
//! VM).
//!
//! Files in a VM's run directory: `qmp.sock` (removed on kill and shutdown),
//! `serial.log` (the guest console, appended to), `qemu.log` (QEMU's own
//! stdout and stderr), and `drives/<id>` links (see `drives`). Logs
//! are left for post-mortems; the caller removes the run directory.
//!
//! Not owned here: the network namespace and TAP (`ember-net`), disks and
//! kernels (`ember-image`), copying memory files for restores (the caller).

pub mod accel;
mod cmdline;
mod drives;
mod process;
pub mod qmp;
mod vm;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use accel::{Accel, AccelChoice, AccelDecision};
pub use vm::QemuVm;

use self::cmdline::{LaunchPlan, PlannedNet};
use self::process::{Process, log_tail};
use self::qmp::{Qmp, QmpError, RunState};
use crate::jail::{self, JailPlan};
use crate::layout::{Placement, RunLayout, entry};
use crate::{BackendKind, Launch, MemoryBackend, RestoreSpec, Result, Vm, Vmm, VmmError};

/// How to run QEMU on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QemuConfig {
    /// A path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    pub accel: AccelChoice,
    /// Host TSC frequency for TCG guests; detected when `None`.
    pub tsc_khz: Option<u32>,
    /// How long QEMU may take to open its QMP socket.
    pub socket_timeout: Duration,
    /// Default deadline of one QMP command.
    pub command_timeout: Duration,
    /// Deadline of a snapshot's or restore's device-state transfer.
    pub migration_timeout: Duration,
    /// How [`Vmm::restore`] uses the memory file (see [`RestoreMemory`]).
    pub restore_memory: RestoreMemory,
}

/// How a restored VM uses its `MemoryBackend::File`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreMemory {
    /// `share=on`: the file becomes the VM's RAM file and QEMU writes guest
    /// memory into it, so the caller passes a private, writable copy. The
    /// VM can be snapshotted again like a booted one.
    #[default]
    SharedCopy,
    /// `share=off`: the file is mapped copy-on-write and never written, so
    /// any number of restores (forks of one template) share its clean pages
    /// through the page cache and need no copy. Such a VM's memory lives in
    /// no file: it cannot be snapshotted.
    PrivateMapping,
}

impl Default for QemuConfig {
    fn default() -> QemuConfig {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            tsc_khz: None,
            // Generous: TCG start-up on a loaded two-core host is slow.
            socket_timeout: Duration::from_secs(20),
            command_timeout: Duration::from_secs(10),
            migration_timeout: Duration::from_secs(60),
            restore_memory: RestoreMemory::SharedCopy,
        }
    }
}

/// Paths of one VM's files in its run directory.
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub run_dir: PathBuf,
    pub qmp: PathBuf,
    pub serial: PathBuf,
    pub log: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path) -> RunPaths {
        RunPaths {
            run_dir: run_dir.to_path_buf(),
            qmp: run_dir.join("qmp.sock"),
            serial: run_dir.join("serial.log"),
            log: run_dir.join("qemu.log"),
        }
    }
}

/// The QEMU backend.
#[derive(Debug)]
pub struct Qemu {
    config: QemuConfig,
    accel: AccelDecision,
    tsc_khz: Option<u32>,
}

impl Qemu {
    /// Choose the accelerator (configuration, then `EMBER_QEMU_ACCEL`, then
    /// detection) and, for TCG, find the host TSC frequency.
    pub fn new(config: QemuConfig) -> Result<Qemu> {
        let env = std::env::var(accel::ACCEL_ENV).ok();
        let accel = accel::decide(config.accel, env.as_deref(), accel::HostFacts::probe)?;
        let tsc_khz = match accel.accel {
            Accel::Kvm => None,
            Accel::Tcg => Some(config.tsc_khz.or_else(accel::host_tsc_khz).ok_or_else(|| {
                VmmError::Config(
                    "TCG guests need the host TSC frequency, which is neither in the kernel log \
                     nor in /proc/cpuinfo: set QemuConfig::tsc_khz"
                        .into(),
                )
            })?),
        };
        tracing::info!(accel = %accel.accel, reason = %accel.reason, tsc_khz, "QEMU accelerator chosen");
        Ok(Qemu {
            config,
            accel,
            tsc_khz,
        })
    }

    /// Clean up a run directory whose QEMU died unseen (the host agent and
    /// the VM both crashed): remove its stale QMP socket and drive links,
    /// keeping the logs. Refuses while a QEMU still listens on the socket;
    /// adopt that one instead.
    pub fn reclaim(run_dir: &Path) -> Result<()> {
        let paths = RunPaths::new(run_dir);
        if std::os::unix::net::UnixStream::connect(&paths.qmp).is_ok() {
            return Err(VmmError::InvalidState {
                operation: "reclaiming a run directory",
                state: format!("still served by a live QEMU at {}", paths.qmp.display()),
            });
        }
        match std::fs::remove_file(&paths.qmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VmmError::Io {
                    context: format!("removing stale {}", paths.qmp.display()),
                    source,
                });
            }
        }
        RunLayout::new(run_dir)
            .remove_transient()
            .map_err(|source| VmmError::Io {
                context: format!("removing stale VM files in {}", run_dir.display()),
                source,
            })
    }

    /// Which accelerator VMs run on, and why.
    pub fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Start QEMU for `launch` over `memory_file` and connect to its QMP
    /// socket. On any failure nothing is left running.
    async fn start(
        &self,
        launch: &Launch,
        memory_file: &Path,
        memory_shared: bool,
        incoming: bool,
    ) -> Result<QemuVm> {
        let config = &launch.config;
        cmdline::validate_vm_id(&launch.vm_id)?;
        if config.machine.vcpus == 0 || config.machine.memory_mib == 0 {
            return Err(VmmError::Config(
                "a VM needs at least one vCPU and some memory".into(),
            ));
        }
        if !launch.run_dir.is_dir() {
            return Err(VmmError::Config(format!(
                "run directory {} does not exist",
                launch.run_dir.display()
            )));
        }
        for (what, path) in [
            ("kernel", Some(&config.kernel)),
            ("initrd", config.initrd.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(VmmError::Config(format!(
                    "{what} {} is not a file",
                    path.display()
                )));
            }
        }
        let net = match &config.net {
            Some(net) => {
                cmdline::validate_net(&net.tap, &net.guest_mac)?;
                Some(PlannedNet {
                    tap: net.tap.clone(),
                    mac: net.guest_mac.to_ascii_lowercase(),
                })
            }
            None => None,
        };
        let binary = resolve_binary(&self.config.binary)?;
        let paths = RunPaths::new(&launch.run_dir);
        cmdline::validate_socket_path(&paths.qmp)?;

        // A live QEMU in this run directory is a caller bug; a dead one's
        // socket and placeholders are stale.
        Qemu::reclaim(&launch.run_dir)?;
        let view = drives::view(&launch.run_dir, config, memory_file)?;
        let layout = RunLayout::new(&launch.run_dir);
        let cleanup = || {
            let _ = layout.remove_transient();
        };
        view.plan
            .create_placeholders()
            .map_err(|source| VmmError::Io {
                context: format!("creating mount points in {}", launch.run_dir.display()),
                source,
            })
            .inspect_err(|_| cleanup())?;
        let (program, placement) = self
            .placement(launch, &view, &binary, memory_file)
            .inspect_err(|_| cleanup())?;

        let plan = LaunchPlan {
            vm_id: launch.vm_id.clone(),
            accel: self.accel.accel,
            tsc_khz: self.tsc_khz,
            machine: config.machine,
            kernel: view.kernel.clone(),
            initrd: view.initrd.clone(),
            kernel_args: config.kernel_args.clone(),
            memory_file: view.memory.clone(),
            memory_shared,
            drives: view.drives.clone(),
            net,
            qmp_socket: RunLayout::vmm(entry::QMP_SOCKET),
            serial_log: RunLayout::vmm(entry::SERIAL_LOG),
            incoming,
        };
        let args = cmdline::qemu_args(&plan);
        tracing::info!(
            vm_id = %launch.vm_id,
            accel = %self.accel.accel,
            incoming,
            confined = launch.confinement.is_some(),
            netns = ?config.net.as_ref().and_then(|n| n.netns.as_ref()),
            "starting QEMU"
        );
        tracing::debug!(vm_id = %launch.vm_id, ?args, "QEMU command line");
        let netns = config.net.as_ref().and_then(|n| n.netns.as_deref());
        let process = Process::spawn(&program, &args, &paths.log, netns, Some(placement))
            .inspect_err(|_| cleanup())?;
        let qmp = match self.connect(&process, &paths).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = process.kill();
                let _ = process.wait_timeout(Duration::from_secs(10)).await;
                cleanup();
                return Err(e);
            }
        };
        Ok(QemuVm::new(
            launch.vm_id.clone(),
            paths,
            memory_file.to_path_buf(),
            memory_shared,
            process,
            qmp,
            self.timeouts(),
        ))
    }

    /// The program path and placement of `launch`'s QEMU: unconfined, the
    /// stable view in a private mount namespace; confined, the same view
    /// inside a jail, with the files QEMU writes handed to its identity.
    fn placement(
        &self,
        launch: &Launch,
        view: &drives::QemuView,
        binary: &Path,
        memory_file: &Path,
    ) -> Result<(PathBuf, Placement)> {
        let io = |context: String| move |source| VmmError::Io { context, source };
        let Some(c) = &launch.confinement else {
            let prepared = view
                .plan
                .prepare()
                .map_err(io("preparing QEMU's mount namespace".into()))?;
            return Ok((binary.to_path_buf(), Placement::View(prepared)));
        };
        let mut jail: JailPlan = c.plan();
        if let Some(net) = &launch.config.net {
            jail = jail.device(jail::DEV_TUN).tap(&net.tap);
        }
        if self.accel.accel == Accel::Kvm {
            jail = jail.device(jail::DEV_KVM);
        }
        let program = jail.executable(binary);
        let jail = view.plan.into_jail(jail);
        let mut owned = vec![launch.run_dir.clone(), memory_file.to_path_buf()];
        owned.extend(
            launch
                .config
                .drives
                .iter()
                .filter(|d| !d.read_only)
                .map(|d| d.host_path.clone()),
        );
        for path in owned {
            jail::give(&path, c.identity)
                .map_err(io(format!("handing {} to the VM's uid", path.display())))?;
        }
        let prepared = jail
            .prepare()
            .map_err(io(format!("preparing the jail of VM {}", launch.vm_id)))?;
        Ok((program, Placement::Jail(prepared)))
    }

    fn timeouts(&self) -> vm::Timeouts {
        vm::Timeouts {
            command: self.config.command_timeout,
            migration: self.config.migration_timeout,
        }
    }

    /// Wait for QEMU's QMP socket to accept and negotiate, or for QEMU to die.
    async fn connect(&self, process: &Process, paths: &RunPaths) -> Result<Qmp> {
        let limit = self.config.socket_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = process.exit_status() {
                return Err(VmmError::Exited {
                    status,
                    log_tail: log_tail(&paths.log, 12),
                });
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(VmmError::SocketTimeout {
                    path: paths.qmp.clone(),
                    waited: limit,
                });
            }
            if paths.qmp.exists() {
                match Qmp::connect(&paths.qmp, remaining.min(self.config.command_timeout)).await {
                    Ok(qmp) => return Ok(qmp),
                    // Not listening yet, or QEMU died mid-handshake (the
                    // next round sees the exit).
                    Err(QmpError::Connection { .. }) => {}
                    Err(QmpError::Timeout { .. }) if process.exit_status().is_none() => {
                        return Err(VmmError::SocketTimeout {
                            path: paths.qmp.clone(),
                            waited: limit,
                        });
                    }
                    Err(QmpError::Timeout { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait::async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    /// `qemu-system-x86_64 --version`'s first line plus the accelerator and
    /// why it was chosen.
    async fn version(&self) -> Result<String> {
        let binary = resolve_binary(&self.config.binary)?;
        let output = tokio::time::timeout(
            self.config.command_timeout,
            tokio::process::Command::new(&binary)
                .arg("--version")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| VmmError::Timeout {
            call: format!("{} --version", binary.display()),
            after: self.config.command_timeout,
        })?
        .map_err(VmmError::Spawn)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().next().unwrap_or("").trim();
        if !output.status.success() || line.is_empty() {
            return Err(VmmError::Protocol {
                call: format!("{} --version", binary.display()),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(format!("{line}; accel {}", self.accel))
    }

    async fn boot(&self, launch: &Launch) -> Result<Box<dyn Vm>> {
        Ok(Box::new(self.boot_vm(launch).await?))
    }

    async fn restore(&self, launch: &Launch, restore: &RestoreSpec) -> Result<Box<dyn Vm>> {
        Ok(Box::new(self.restore_vm(launch, restore).await?))
    }

    async fn adopt(&self, launch: &Launch, pid: u32) -> Result<Box<dyn Vm>> {
        Ok(Box::new(self.adopt_vm(launch, pid).await?))
    }
}

/// The [`Vmm`] operations returning the concrete [`QemuVm`] (with its QMP
/// client) for callers that need more than the trait.
impl Qemu {
    /// Boot from the kernel over a fresh, zeroed `Launch::memory_file`
    /// (required: it becomes the guest RAM and later the memory snapshot).
    pub async fn boot_vm(&self, launch: &Launch) -> Result<QemuVm> {
        let Some(memory_file) = &launch.memory_file else {
            return Err(VmmError::Config(
                "QEMU keeps guest RAM in a file: set Launch::memory_file".into(),
            ));
        };
        // Before touching the RAM file: it may belong to a VM still running.
        Qemu::reclaim(&launch.run_dir)?;
        create_ram_file(memory_file, launch.config.machine.memory_mib)?;
        let started = std::time::Instant::now();
        let mut vm = self.start(launch, memory_file, true, false).await?;
        vm.start_phases.push(("vmm.spawn", started.elapsed()));
        let state = vm.run_state().await?;
        if state != RunState::Running {
            return Err(VmmError::InvalidState {
                operation: "boot",
                state: state.to_string(),
            });
        }
        tracing::info!(vm_id = %launch.vm_id, pid = vm.pid(), elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "QEMU VM booted");
        Ok(vm)
    }

    /// Restore over `restore.memory`, which must be `MemoryBackend::File`
    /// of exactly the machine's size, used as `QemuConfig::restore_memory`
    /// says: by default QEMU writes guest memory into it, so the caller
    /// passes a private, writable copy, never the snapshot's own file.
    /// `Launch::memory_file` is ignored. `track_dirty_pages` has no effect
    /// (the whole file is the memory).
    pub async fn restore_vm(&self, launch: &Launch, restore: &RestoreSpec) -> Result<QemuVm> {
        self.restore_vm_with(launch, restore, self.config.restore_memory)
            .await
    }

    /// [`Qemu::restore_vm`] with the memory mode chosen per call (a fork of
    /// a template maps it privately, a resumed sandbox takes a copy).
    pub async fn restore_vm_with(
        &self,
        launch: &Launch,
        restore: &RestoreSpec,
        memory: RestoreMemory,
    ) -> Result<QemuVm> {
        let memory_file = match &restore.memory {
            MemoryBackend::File(path) => path,
            MemoryBackend::Uffd(_) => {
                return Err(VmmError::Unsupported(
                    "restoring QEMU from a userfaultfd page server",
                ));
            }
        };
        check_ram_file(memory_file, launch.config.machine.memory_mib)?;
        let vmstate = File::open(&restore.vmstate).map_err(|e| {
            VmmError::Config(format!(
                "cannot read snapshot state {}: {e}",
                restore.vmstate.display()
            ))
        })?;
        let started = std::time::Instant::now();
        let shared = memory == RestoreMemory::SharedCopy;
        let mut vm = self.start(launch, memory_file, shared, true).await?;
        vm.start_phases.push(("vmm.spawn", started.elapsed()));
        let loaded = async {
            let t = std::time::Instant::now();
            vm.load_incoming(&vmstate).await?;
            let mut phases = vec![("vmm.load_state", t.elapsed())];
            if restore.resume {
                let t = std::time::Instant::now();
                vm.resume().await?;
                phases.push(("vmm.resume", t.elapsed()));
            }
            Ok::<_, VmmError>(phases)
        }
        .await;
        let loaded = loaded.map(|phases| vm.start_phases.extend(phases));
        if let Err(e) = loaded {
            let _ = vm.kill().await;
            return Err(e);
        }
        tracing::info!(
            vm_id = %launch.vm_id,
            pid = vm.pid(),
            resumed = restore.resume,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "QEMU VM restored"
        );
        Ok(vm)
    }

    /// Re-attach to the QEMU of `launch.vm_id` running as `pid`, e.g. after
    /// a host-agent restart. A process that is not this VM's QEMU (by its
    /// command line) is left alone.
    pub async fn adopt_vm(&self, launch: &Launch, pid: u32) -> Result<QemuVm> {
        cmdline::validate_vm_id(&launch.vm_id)?;
        let paths = RunPaths::new(&launch.run_dir);
        let process = Process::adopt(pid).map_err(|e| VmmError::Exited {
            status: format!("process {pid} is not running ({e})"),
            log_tail: log_tail(&paths.log, 12),
        })?;
        // Read after the pidfd is open: the pid cannot be reused under us.
        let argv =
            std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|source| VmmError::Io {
                context: format!("reading the command line of process {pid}"),
                source,
            })?;
        let (named, memory_shared) = identify(&argv, &launch.vm_id).ok_or_else(|| {
            VmmError::Config(format!(
                "process {pid} is not the QEMU of VM {}",
                launch.vm_id
            ))
        })?;
        // QEMU is told the stable path; the host's is the launch's.
        let memory_file = if named.starts_with(crate::layout::STABLE_DIR) {
            launch.memory_file.clone().ok_or_else(|| {
                VmmError::Config("adopting a QEMU VM needs Launch::memory_file".into())
            })?
        } else {
            named
        };
        if process.exit_status().is_some() {
            return Err(VmmError::Exited {
                status: format!("process {pid} exited while being adopted"),
                log_tail: log_tail(&paths.log, 12),
            });
        }
        let qmp = self.connect(&process, &paths).await?;
        let vm = QemuVm::new(
            launch.vm_id.clone(),
            paths,
            memory_file,
            memory_shared,
            process,
            qmp,
            self.timeouts(),
        );
        let state = vm.run_state().await?;
        tracing::info!(vm_id = %launch.vm_id, pid, %state, "QEMU VM adopted");
        Ok(vm)
    }
}

/// If `argv` (NUL-separated, from `/proc/<pid>/cmdline`) is a QEMU started
/// for `vm_id`, the path of its RAM file and whether it is mapped shared.
fn identify(argv: &[u8], vm_id: &str) -> Option<(PathBuf, bool)> {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<&[u8]> = argv.split(|&b| b == 0).collect();
    let program = Path::new(std::ffi::OsStr::from_bytes(args.first()?));
    if !program.file_name()?.as_bytes().starts_with(b"qemu-system-") {
        return None;
    }
    let name = format!("guest={vm_id}");
    if !args
        .windows(2)
        .any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
    {
        return None;
    }
    args.windows(2).find_map(|w| {
        let opts = w[1];
        let is_ram = w[0] == b"-object"
            && opts.starts_with(b"memory-backend-file,")
            && cmdline::option_value(opts, "id").as_deref() == Some(Path::new(cmdline::RAM_ID));
        if !is_ram {
            return None;
        }
        let shared = cmdline::option_value(opts, "share").as_deref() == Some(Path::new("on"));
        Some((cmdline::option_value(opts, "mem-path")?, shared))
    })
}

fn resolve_binary(binary: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let missing = || VmmError::BinaryMissing {
        path: binary.to_path_buf(),
    };
    if binary.components().count() > 1 {
        return executable(binary)
            .then(|| binary.to_path_buf())
            .ok_or_else(missing);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| executable(candidate))
        .ok_or_else(missing)
}

fn ram_bytes(memory_mib: u32) -> u64 {
    u64::from(memory_mib) << 20
}

/// A new guest starts from zeroed RAM: truncate, then size (sparse).
fn create_ram_file(path: &Path, memory_mib: u32) -> Result<()> {
    if path.is_dir() {
        // QEMU would make an anonymous temporary file inside it, silently
        // losing the memory snapshot.
        return Err(VmmError::Config(format!(
            "memory file {} is a directory",
            path.display()
        )));
    }
    let io = |source| VmmError::Io {
        context: format!("creating memory file {}", path.display()),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    file.set_len(ram_bytes(memory_mib)).map_err(io)
}

fn check_ram_file(path: &Path, memory_mib: u32) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| VmmError::Config(format!("memory file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(VmmError::Config(format!(
            "memory file {} is not a regular file",
            path.display()
        )));
    }
    if meta.len() != ram_bytes(memory_mib) {
        return Err(VmmError::Config(format!(
            "memory file {} holds {} bytes but the VM has {memory_mib} MiB: restore with the snapshot's machine size",
            path.display(),
            meta.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for a in args {
            out.extend_from_slice(a.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn adoption_recognises_only_this_vms_qemu() {
        let ours = argv(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=sbx-1",
            "-object",
            "memory-backend-file,id=ram,size=256M,mem-path=/m/ra,,m,share=on",
        ]);
        assert_eq!(
            identify(&ours, "sbx-1"),
            Some((PathBuf::from("/m/ra,m"), true))
        );
        assert_eq!(identify(&ours, "sbx-2"), None);
        assert_eq!(identify(&ours, "sbx"), None);
        let not_qemu = argv(&["/bin/sleep", "-name", "guest=sbx-1"]);
        assert_eq!(identify(&not_qemu, "sbx-1"), None);
        let no_ram = argv(&["qemu-system-x86_64", "-name", "guest=sbx-1"]);
        assert_eq!(identify(&no_ram, "sbx-1"), None);
    }

    #[test]
    fn reclaim_removes_a_dead_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, b"d").unwrap();
        std::fs::create_dir_all(dir.path().join("drives")).unwrap();
        std::fs::write(dir.path().join("drives/root"), b"").unwrap();
        std::fs::write(dir.path().join("serial.log"), b"console").unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(matches!(
            Qemu::reclaim(dir.path()),
            Err(VmmError::InvalidState { .. })
        ));
        assert!(sock.exists() && dir.path().join("drives/root").exists());
        drop(listener);
        Qemu::reclaim(dir.path()).unwrap();
        assert!(!sock.exists());
        assert!(!dir.path().join("drives").exists());
        assert!(dir.path().join("serial.log").exists() && disk.exists());
        // Nothing left to do is fine.
        Qemu::reclaim(dir.path()).unwrap();
    }

    #[test]
    fn binaries_resolve_by_path_or_name() {
        assert!(resolve_binary(Path::new("sh")).is_ok());
        assert!(matches!(
            resolve_binary(Path::new("/nonexistent/qemu-system-x86_64")),
            Err(VmmError::BinaryMissing { .. })
        ));
        assert!(matches!(
            resolve_binary(Path::new("ember-no-such-binary")),
            Err(VmmError::BinaryMissing { .. })
        ));
        // Not executable.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qemu");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            resolve_binary(&file),
            Err(VmmError::BinaryMissing { .. })
        ));
    }

    #[test]
    fn ram_files_are_created_zeroed_and_checked_on_restore() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        std::fs::write(&ram, b"old guest").unwrap();
        create_ram_file(&ram, 2).unwrap();
        let bytes = std::fs::read(&ram).unwrap();
        assert_eq!(bytes.len(), 2 << 20);
        assert!(bytes.iter().all(|&b| b == 0));
        check_ram_file(&ram, 2).unwrap();
        let err = check_ram_file(&ram, 4).unwrap_err();
        assert!(matches!(err, VmmError::Config(m) if m.contains("machine size")));
        assert!(matches!(
            create_ram_file(dir.path(), 2),
            Err(VmmError::Config(_))
        ));
        assert!(matches!(
            check_ram_file(&dir.path().join("missing"), 2),
            Err(VmmError::Config(_))
        ));
    }
}
