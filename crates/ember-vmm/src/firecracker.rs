//! Firecracker backend: the production [`Vmm`] on KVM hosts.
//!
//! - [`models`] and [`ApiClient`]: Firecracker's HTTP API on its Unix socket,
//!   typed, with deadlines and distinguishable failures.
//! - `process`: the Firecracker process in its own session, network
//!   namespace and mount namespace; exit watching, pidfd signalling, adoption.
//! - [`vsock`]: host→guest connections through the hybrid vsock socket.
//! - [`jailer`]: the optional jailer's command line and jail paths.
//! - [`FirecrackerVm`]: one VM, implementing [`Vm`].
//!
//! Every Firecracker process sees its files under
//! [`layout::STABLE_DIR`](crate::layout::STABLE_DIR), so snapshots record the
//! same drive, vsock and socket paths whatever the host paths are. This
//! module does not create run directories, disks, TAP devices or network
//! namespaces: callers pass paths that exist.

pub mod client;
pub mod jailer;
pub mod models;
mod process;
mod vm;
pub mod vsock;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use client::{ApiClient, ApiTimeouts};
pub use vm::FirecrackerVm;

use self::jailer::{Jail, JailerConfig};
use self::models::*;
use self::process::{LaunchCommand, VmmProcess};
use crate::jail::JailPlan;
use crate::layout::{RunLayout, ViewPlan, entry};
use crate::{
    BackendKind, DiskFormat, Launch, MemoryBackend, RestoreSpec, Result, Vm, VmConfig, Vmm,
    VmmError,
};

/// The environment variable naming the Firecracker binary when the config
/// does not.
pub const BINARY_ENV: &str = "EMBER_FIRECRACKER_BIN";

/// The guest's vsock context ID (any value ≥ 3; each VM has its own device).
pub const DEFAULT_GUEST_CID: u32 = 3;

/// How to run Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary; `None` reads [`BINARY_ENV`].
    pub binary: Option<PathBuf>,
    /// Run under the jailer.
    pub jailer: Option<JailerConfig>,
    pub timeouts: ApiTimeouts,
    /// How long a new process may take to open its API socket.
    pub startup_timeout: Duration,
    /// Track dirty pages from boot, so a booted VM's snapshots can be diffs.
    /// (Restores choose with [`RestoreSpec::track_dirty_pages`].)
    pub track_dirty_pages: bool,
    /// Give booted VMs a vsock device with this guest CID (`None`: none).
    /// A restored VM has whatever device its snapshot has.
    pub vsock_cid: Option<u32>,
    /// Give booted VMs a virtio-rng device.
    pub entropy: bool,
    pub log_level: LogLevel,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: None,
            jailer: None,
            timeouts: ApiTimeouts::default(),
            startup_timeout: Duration::from_secs(10),
            track_dirty_pages: true,
            vsock_cid: Some(DEFAULT_GUEST_CID),
            entropy: false,
            log_level: LogLevel::Info,
        }
    }
}

/// The Firecracker [`Vmm`].
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    config: FirecrackerConfig,
}

impl FirecrackerVmm {
    pub fn new(config: FirecrackerConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// The Firecracker binary this driver runs.
    pub fn binary(&self) -> Result<PathBuf> {
        let path = match &self.config.binary {
            Some(path) => path.clone(),
            None => std::env::var_os(BINARY_ENV)
                .map(PathBuf::from)
                .ok_or_else(|| VmmError::BinaryMissing {
                    path: PathBuf::from(format!("firecracker (set {BINARY_ENV})")),
                })?,
        };
        process::check_binary(&path)?;
        Ok(path)
    }

    /// Boot a VM and hand back the concrete handle (with the API client and
    /// vsock dialer that `Box<dyn Vm>` hides).
    pub async fn boot_vm(&self, launch: &Launch) -> Result<FirecrackerVm> {
        validate(launch)?;
        let config = &launch.config;
        let mut view = drive_view(launch).bind(&config.kernel, entry::KERNEL);
        if let Some(initrd) = &config.initrd {
            view = view.bind(initrd, entry::INITRD);
        }
        let started = Instant::now();
        let mut vm = self.start(launch, view).await?;
        vm.start_phases.push(("vmm.spawn", started.elapsed()));
        let api = vm.client();

        api.put_machine_config(&MachineConfig {
            vcpu_count: u8::try_from(config.machine.vcpus).map_err(|_| {
                VmmError::Config(format!("{} vCPUs is too many", config.machine.vcpus))
            })?,
            mem_size_mib: config.machine.memory_mib as usize,
            smt: None,
            track_dirty_pages: Some(self.config.track_dirty_pages),
            huge_pages: None,
        })
        .await?;
        api.put_boot_source(&BootSource {
            kernel_image_path: RunLayout::vmm(entry::KERNEL),
            boot_args: Some(config.kernel_args.clone()),
            initrd_path: config
                .initrd
                .as_ref()
                .map(|_| RunLayout::vmm(entry::INITRD)),
        })
        .await?;
        for drive in &config.drives {
            api.put_drive(&Drive {
                drive_id: drive.id.clone(),
                path_on_host: Some(RunLayout::vmm(entry::drive(&drive.id))),
                is_root_device: drive.root,
                is_read_only: Some(drive.read_only),
                partuuid: None,
                cache_type: None,
                io_engine: None,
                rate_limiter: None,
            })
            .await?;
        }
        if let Some(net) = &config.net {
            api.put_network_interface(&NetworkInterface {
                iface_id: NET_IFACE_ID.into(),
                host_dev_name: net.tap.clone(),
                guest_mac: Some(net.guest_mac.clone()),
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .await?;
        }
        if let Some(cid) = self.config.vsock_cid {
            api.put_vsock(&Vsock {
                guest_cid: cid,
                uds_path: RunLayout::vmm(entry::VSOCK_SOCKET),
            })
            .await?;
        }
        if self.config.entropy {
            api.put_entropy(&EntropyDevice::default()).await?;
        }
        api.action(ActionType::InstanceStart).await?;
        vm.set_state(InstanceState::Running);
        tracing::info!(vm_id = %launch.vm_id, pid = vm.pid(), took = ?started.elapsed(), "firecracker VM booted");
        Ok(vm)
    }

    /// Restore a VM and hand back the concrete handle.
    pub async fn restore_vm(
        &self,
        launch: &Launch,
        restore: &RestoreSpec,
    ) -> Result<FirecrackerVm> {
        validate(launch)?;
        let mut view = drive_view(launch).bind(&restore.vmstate, entry::RESTORE_VMSTATE);
        let mem_backend = match &restore.memory {
            MemoryBackend::File(path) => {
                view = view.bind(path, entry::RESTORE_MEMORY);
                models::MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: RunLayout::vmm(entry::RESTORE_MEMORY),
                }
            }
            MemoryBackend::Uffd(socket) => {
                view = view.bind(socket, entry::PAGE_SERVER_SOCKET);
                models::MemoryBackend {
                    backend_type: MemoryBackendType::Uffd,
                    backend_path: RunLayout::vmm(entry::PAGE_SERVER_SOCKET),
                }
            }
        };
        let started = Instant::now();
        let mut vm = self.start(launch, view).await?;
        vm.start_phases.push(("vmm.spawn", started.elapsed()));
        let loading = Instant::now();
        vm.client()
            .load_snapshot(&SnapshotLoadParams {
                snapshot_path: RunLayout::vmm(entry::RESTORE_VMSTATE),
                mem_backend,
                track_dirty_pages: Some(restore.track_dirty_pages),
                resume_vm: Some(restore.resume),
                network_overrides: Vec::new(),
                vsock_override: None,
                clock_realtime: None,
            })
            .await?;
        vm.start_phases.push(("vmm.load_state", loading.elapsed()));
        vm.set_state(if restore.resume {
            InstanceState::Running
        } else {
            InstanceState::Paused
        });
        let machine = vm.client().machine_config().await?;
        let wanted = launch.config.machine;
        if u32::from(machine.vcpu_count) != wanted.vcpus
            || machine.mem_size_mib != wanted.memory_mib as usize
        {
            return Err(VmmError::Config(format!(
                "the snapshot is of a VM with {} vCPUs and {} MiB, but {} vCPUs and {} MiB were asked for",
                machine.vcpu_count, machine.mem_size_mib, wanted.vcpus, wanted.memory_mib
            )));
        }
        tracing::info!(vm_id = %launch.vm_id, pid = vm.pid(), took = ?started.elapsed(), "firecracker VM restored");
        Ok(vm)
    }

    /// Re-attach to a Firecracker process and hand back the concrete handle.
    pub async fn adopt_vm(&self, launch: &Launch, pid: u32) -> Result<FirecrackerVm> {
        validate_vm_id(&launch.vm_id)?;
        let process = VmmProcess::adopt(pid)?;
        let api_sock = RunLayout::vmm(entry::API_SOCKET);
        let api_sock = api_sock.to_str().unwrap_or_default();
        let id_arg = format!("--id={}", launch.vm_id);
        let ours = process::cmdline_has(pid, &["--api-sock", api_sock])
            && (process::cmdline_has(pid, &["--id", &launch.vm_id])
                || process::cmdline_has(pid, &[&id_arg]));
        if !ours {
            return Err(VmmError::Config(format!(
                "process {pid} is not the Firecracker process of VM {}",
                launch.vm_id
            )));
        }
        let layout = RunLayout::new(&launch.run_dir);
        let jail = self.jail(&launch.vm_id)?;
        let client = ApiClient::new(layout.host(entry::API_SOCKET), self.config.timeouts);
        let info = client.describe_instance().await?;
        if info.id != launch.vm_id {
            return Err(VmmError::Config(format!(
                "the VMM at {} serves VM {}, not {}",
                client.socket().display(),
                info.id,
                launch.vm_id
            )));
        }
        let vm = FirecrackerVm::new(launch, layout, client, process, jail);
        vm.set_state(info.state);
        tracing::info!(vm_id = %launch.vm_id, pid, state = %info.state, "firecracker VM adopted");
        Ok(vm)
    }

    fn jail(&self, vm_id: &str) -> Result<Option<Jail>> {
        let Some(jailer) = &self.config.jailer else {
            return Ok(None);
        };
        let binary = self.binary()?;
        jailer
            .jail(&binary, vm_id)
            .map(Some)
            .map_err(|source| VmmError::Io {
                context: format!("locating the jail under {}", jailer.chroot_base.display()),
                source,
            })
    }

    /// The command line and mount view for one VM.
    fn command(&self, launch: &Launch, view: ViewPlan) -> Result<(LaunchCommand, Option<Jail>)> {
        let binary = self.binary()?;
        let layout = RunLayout::new(&launch.run_dir);
        let mut fc_args: Vec<OsString> = vec![
            "--api-sock".into(),
            RunLayout::vmm(entry::API_SOCKET).into(),
            "--log-path".into(),
            RunLayout::vmm(entry::VMM_LOG).into(),
            "--level".into(),
            self.config.log_level.as_str().into(),
            "--show-level".into(),
        ];
        let netns = launch.config.net.as_ref().and_then(|n| n.netns.clone());
        let stdout = layout.host(entry::SERIAL_LOG);
        let stderr = layout.host(entry::STDERR_LOG);
        match &self.config.jailer {
            None => {
                fc_args.splice(0..0, ["--id".into(), launch.vm_id.clone().into()]);
                let jail = match &launch.confinement {
                    Some(c) => Some(self.ember_jail(launch, c, &view, &binary)?),
                    None => None,
                };
                Ok((
                    LaunchCommand {
                        program: binary,
                        args: fc_args,
                        netns,
                        view,
                        jail,
                        stdout,
                        stderr,
                    },
                    None,
                ))
            }
            Some(jailer) => {
                process::check_binary(&jailer.binary)?;
                let jail = self.jail(&launch.vm_id)?.expect("jailer configured");
                let jailer = jailer_for(jailer, launch);
                let args = jailer.args(&binary, &launch.vm_id, netns.as_deref(), &fc_args);
                let view = view.inside(&jail.root());
                Ok((
                    LaunchCommand {
                        program: jailer.binary.clone(),
                        args,
                        netns: None,
                        view,
                        jail: None,
                        stdout,
                        stderr,
                    },
                    Some(jail),
                ))
            }
        }
    }

    /// Ember's jail for a confined VM without the jailer: the stable view
    /// inside it, `/dev/kvm` and `/dev/userfaultfd` for this VM only, its
    /// TAP device made its own, and the run directory and writable drives
    /// handed to its uid.
    fn ember_jail(
        &self,
        launch: &Launch,
        c: &crate::Confinement,
        view: &ViewPlan,
        binary: &Path,
    ) -> Result<(JailPlan, PathBuf)> {
        let mut jail = c
            .plan()
            .device(crate::jail::DEV_KVM)
            .device(crate::jail::DEV_USERFAULTFD);
        if let Some(net) = &launch.config.net {
            jail = jail.device(crate::jail::DEV_TUN).tap(&net.tap);
        }
        let program = jail.executable(binary);
        let jail = view.into_jail(jail);
        let io = |context: String| move |source| VmmError::Io { context, source };
        let owned = std::iter::once(launch.run_dir.clone()).chain(
            launch
                .config
                .drives
                .iter()
                .filter(|d| !d.read_only)
                .map(|d| d.host_path.clone()),
        );
        for path in owned {
            crate::jail::give(&path, c.identity)
                .map_err(io(format!("handing {} to the VM's uid", path.display())))?;
        }
        Ok((jail, program))
    }

    /// Start a Firecracker process for `launch` and wait for its API.
    async fn start(&self, launch: &Launch, view: ViewPlan) -> Result<FirecrackerVm> {
        let layout = RunLayout::new(&launch.run_dir);
        if !layout.run_dir().is_dir() {
            return Err(VmmError::Config(format!(
                "run directory {} does not exist",
                layout.run_dir().display()
            )));
        }
        layout.reclaim()?;
        let (command, jail) = self.command(launch, view)?;
        if let Some(jail) = &jail {
            // A jail left by a crash would hand the new VM stale files.
            jail.remove().map_err(|source| VmmError::Io {
                context: format!("removing stale jail {}", jail.dir.display()),
                source,
            })?;
            let jailer = self.config.jailer.as_ref().expect("jailer configured");
            prepare_jailed_run_dir(&layout, &jailer_for(jailer, launch), launch)?;
        }
        let process = VmmProcess::spawn(&command)?;
        if let (Some(_), Some(c)) = (&jail, &launch.confinement) {
            // The jailer execs Firecracker in place: the PID we started is
            // the VMM's, moved into the sandbox's cgroup before it boots.
            for procs in &c.cgroup_procs {
                std::fs::write(procs, process.pid().to_string()).map_err(|source| {
                    VmmError::Io {
                        context: format!("moving Firecracker into {}", procs.display()),
                        source,
                    }
                })?;
            }
        }
        let client = ApiClient::new(layout.host(entry::API_SOCKET), self.config.timeouts);
        // From here on, dropping `vm` kills the process and cleans up.
        let vm = FirecrackerVm::new(launch, layout, client, process, jail);
        let logs = vm.log_paths();
        let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
        vm.process()
            .wait_for_socket(vm.client().socket(), self.config.startup_timeout, &logs)
            .await?;
        Ok(vm)
    }
}

/// The interface ID Ember gives the one network interface.
const NET_IFACE_ID: &str = "eth0";

/// The drives every Firecracker process of this VM sees, boot or restore.
fn drive_view(launch: &Launch) -> ViewPlan {
    launch
        .config
        .drives
        .iter()
        .fold(ViewPlan::new(&launch.run_dir), |view, d| {
            view.bind(&d.host_path, entry::drive(&d.id))
        })
}

/// The jailer settings of one VM: a confined launch runs as its sandbox's
/// own uid and gid, not the configuration's shared one.
fn jailer_for(jailer: &JailerConfig, launch: &Launch) -> JailerConfig {
    let mut jailer = jailer.clone();
    if let Some(c) = &launch.confinement {
        jailer.uid = c.identity.uid;
        jailer.gid = c.identity.gid;
    }
    jailer
}

/// Under the jailer, Firecracker runs as the jail's uid and must be able to
/// create its sockets and log in the run directory, and write its
/// writable drives (readable by nobody else).
fn prepare_jailed_run_dir(
    layout: &RunLayout,
    jailer: &JailerConfig,
    launch: &Launch,
) -> Result<()> {
    let io = |context: String| move |source| VmmError::Io { context, source };
    let log = layout.host(entry::VMM_LOG);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io(format!("creating {}", log.display())))?;
    for path in [layout.run_dir().to_path_buf(), log] {
        std::os::unix::fs::chown(&path, Some(jailer.uid), Some(jailer.gid))
            .map_err(io(format!("handing {} to the jail's user", path.display())))?;
    }
    if launch.confinement.is_some() {
        let identity = crate::jail::Identity {
            uid: jailer.uid,
            gid: jailer.gid,
        };
        for d in launch.config.drives.iter().filter(|d| !d.read_only) {
            crate::jail::give(&d.host_path, identity).map_err(io(format!(
                "handing {} to the jail's user",
                d.host_path.display()
            )))?;
        }
    }
    Ok(())
}

/// Firecracker's own limit on instance IDs (it aborts on others).
fn validate_vm_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c == '-' || c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(VmmError::Config(format!(
            "VM ID {id:?} must be 1 to 64 letters, digits or hyphens"
        )))
    }
}

/// Check a launch before anything is started.
fn validate(launch: &Launch) -> Result<()> {
    validate_vm_id(&launch.vm_id)?;
    validate_config(&launch.config).map_err(VmmError::Config)
}

fn validate_config(config: &VmConfig) -> std::result::Result<(), String> {
    let m = config.machine;
    if m.vcpus == 0 || m.vcpus > 32 {
        return Err(format!("{} vCPUs: Firecracker runs 1 to 32", m.vcpus));
    }
    if m.memory_mib == 0 {
        return Err("memory_mib must be positive".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in config.drives.iter().enumerate() {
        let id_ok = !d.id.is_empty()
            && d.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !id_ok {
            return Err(format!(
                "drive ID {:?} must be lowercase letters, digits or underscores",
                d.id
            ));
        }
        if !seen.insert(&d.id) {
            return Err(format!("drive ID {:?} is used twice", d.id));
        }
        if d.root && i != 0 {
            return Err(format!(
                "root drive {:?} must come first, and only one drive can be root",
                d.id
            ));
        }
        if d.format != DiskFormat::Raw {
            return Err(format!(
                "drive {:?} is {}: Firecracker reads raw disks only",
                d.id, d.format
            ));
        }
    }
    if let Some(net) = &config.net {
        if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains('/') {
            return Err(format!(
                "TAP name {:?} must be 1 to 15 characters without '/'",
                net.tap
            ));
        }
        let mac_ok = net.guest_mac.len() == 17
            && net.guest_mac.split(':').count() == 6
            && net
                .guest_mac
                .split(':')
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(format!(
                "guest MAC {:?} must look like aa:bb:cc:dd:ee:ff",
                net.guest_mac
            ));
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Vmm for FirecrackerVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn version(&self) -> Result<String> {
        let binary = self.binary()?;
        let output = tokio::time::timeout(
            self.config.timeouts.call,
            tokio::process::Command::new(&binary)
                .arg("--version")
                .env_clear()
                .output(),
        )
        .await
        .map_err(|_| VmmError::Timeout {
            call: format!("{} --version", binary.display()),
            after: self.config.timeouts.call,
        })?
        .map_err(VmmError::Spawn)?;
        let text = String::from_utf8_lossy(&output.stdout);
        parse_version(&text).ok_or_else(|| VmmError::Protocol {
            call: format!("{} --version", binary.display()),
            detail: format!("no \"Firecracker vX.Y.Z\" line in {text:?}"),
        })
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

/// `Firecracker v1.16.1` → `1.16.1`.
fn parse_version(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let v = line.trim().strip_prefix("Firecracker v")?;
        let v = v.split_whitespace().next()?;
        v.chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
            .then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DriveSpec, MachineSpec, NetSpec};

    fn config() -> VmConfig {
        VmConfig {
            machine: MachineSpec {
                vcpus: 1,
                memory_mib: 128,
            },
            kernel: "/k".into(),
            initrd: None,
            kernel_args: String::new(),
            drives: vec![DriveSpec {
                id: "root".into(),
                host_path: "/d".into(),
                read_only: false,
                root: true,
                format: DiskFormat::Raw,
                backing: Vec::new(),
            }],
            net: Some(NetSpec {
                tap: "tap0".into(),
                guest_mac: "06:00:ac:10:00:02".into(),
                netns: None,
            }),
        }
    }

    #[test]
    fn version_line_is_parsed() {
        assert_eq!(
            parse_version("Firecracker v1.16.1\n\n").as_deref(),
            Some("1.16.1")
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn vm_ids_follow_firecracker_rules() {
        assert!(validate_vm_id("sb-0123456789abcdefghij").is_ok());
        for bad in ["", "a_b", "a/b", &"x".repeat(65)] {
            assert!(validate_vm_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn configs_are_checked_before_anything_starts() {
        assert_eq!(validate_config(&config()), Ok(()));
        let mut c = config();
        c.machine.vcpus = 0;
        assert!(validate_config(&c).unwrap_err().contains("vCPUs"));
        let mut c = config();
        c.drives.push(c.drives[0].clone());
        assert!(validate_config(&c).unwrap_err().contains("twice"));
        let mut c = config();
        c.drives[0].id = "Root".into();
        assert!(validate_config(&c).is_err());
        let mut c = config();
        let mut extra = c.drives[0].clone();
        extra.id = "data".into();
        c.drives.insert(
            0,
            DriveSpec {
                root: false,
                ..extra
            },
        );
        assert!(validate_config(&c).unwrap_err().contains("first"));
        let mut c = config();
        c.net.as_mut().unwrap().guest_mac = "06:00:ac:10:00".into();
        assert!(validate_config(&c).unwrap_err().contains("MAC"));
        let mut c = config();
        c.net.as_mut().unwrap().tap = "a-very-long-tap-name".into();
        assert!(validate_config(&c).unwrap_err().contains("TAP"));
        let mut c = config();
        c.drives[0].format = DiskFormat::Qcow2;
        assert!(validate_config(&c).unwrap_err().contains("raw disks only"));
    }

    #[test]
    fn missing_binary_names_the_variable() {
        let vmm = FirecrackerVmm::new(FirecrackerConfig {
            binary: Some("/nonexistent/firecracker".into()),
            ..Default::default()
        });
        assert!(matches!(vmm.binary(), Err(VmmError::BinaryMissing { .. })));
    }

    #[test]
    fn unjailed_command_line_uses_stable_paths() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker");
        std::fs::write(&bin, b"").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let vmm = FirecrackerVmm::new(FirecrackerConfig {
            binary: Some(bin.clone()),
            ..Default::default()
        });
        let mut launch = Launch {
            vm_id: "sb-1".into(),
            run_dir: dir.path().join("run"),
            config: config(),
            memory_file: None,
            confinement: None,
        };
        launch.config.net.as_mut().unwrap().netns = Some("/run/netns/sb-1".into());
        let (cmd, jail) = vmm.command(&launch, drive_view(&launch)).unwrap();
        assert!(jail.is_none());
        assert_eq!(cmd.program, bin);
        let args: Vec<&str> = cmd.args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--id",
                "sb-1",
                "--api-sock",
                "/run/ember/vm/api.sock",
                "--log-path",
                "/run/ember/vm/vmm.log",
                "--level",
                "Info",
                "--show-level"
            ]
        );
        assert_eq!(cmd.netns.as_deref(), Some(Path::new("/run/netns/sb-1")));
        assert_eq!(cmd.view.mount_point, Path::new("/run/ember/vm"));
        assert_eq!(cmd.view.files[0].entry, Path::new("drives/root"));
        assert_eq!(cmd.stdout, dir.path().join("run/serial.log"));
    }

    #[test]
    fn a_confined_launch_runs_the_jailer_as_its_sandbox_uid() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker");
        let jailer_bin = dir.path().join("jailer");
        for b in [&bin, &jailer_bin] {
            std::fs::write(b, b"").unwrap();
            std::fs::set_permissions(b, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let mut jailer = JailerConfig::new(&jailer_bin, 123, 123);
        jailer.chroot_base = dir.path().join("jails");
        std::fs::create_dir(&jailer.chroot_base).unwrap();
        let vmm = FirecrackerVmm::new(FirecrackerConfig {
            binary: Some(bin.clone()),
            jailer: Some(jailer),
            ..Default::default()
        });
        let mut launch = Launch {
            vm_id: "sb-2".into(),
            run_dir: dir.path().join("run"),
            config: config(),
            memory_file: None,
            confinement: Some(crate::Confinement {
                identity: crate::jail::Identity {
                    uid: 900_000_007,
                    gid: 900_000_007,
                },
                jail_mountpoint: dir.path().join("mnt"),
                cgroup_procs: Vec::new(),
            }),
        };
        let args = |launch: &Launch| -> Vec<String> {
            let (cmd, jail) = vmm.command(launch, drive_view(launch)).unwrap();
            assert!(jail.is_some());
            assert_eq!(cmd.program, jailer_bin);
            cmd.args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let confined = args(&launch);
        let uid = confined.iter().position(|a| a == "--uid").unwrap();
        let gid = confined.iter().position(|a| a == "--gid").unwrap();
        assert_eq!(confined[uid + 1], "900000007");
        assert_eq!(confined[gid + 1], "900000007");
        launch.confinement = None;
        let shared = args(&launch);
        let uid = shared.iter().position(|a| a == "--uid").unwrap();
        assert_eq!(
            shared[uid + 1],
            "123",
            "unconfined launches keep the configured uid"
        );
    }
}
