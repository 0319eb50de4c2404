//! The fake's microVM: configuration, the state machine Firecracker
//! enforces, and what start, pause, snapshot and load do to guest memory
//! and devices. Fault messages are Firecracker's where the driver or its
//! tests may see them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{self, ActionType, BackendType, HugePages, RateLimiter, SnapshotType, VmState};
use crate::devices::{self, GuestVsock, VsockDevice};
use crate::guest::{Memory, PAGE, TICK_ADDR, WALK_ADDR, WALK_PAGES};

const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const NO_DEVICE: &str = "Internal VMM error: Failed perform action on device: Device not found";

/// The fake's own log file (Firecracker's `--log-path`).
#[derive(Debug)]
pub struct Log {
    file: Option<File>,
    id: String,
}

impl Log {
    pub fn open(path: Option<&Path>, id: &str) -> Self {
        let file = path.and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok());
        Self {
            file,
            id: id.to_owned(),
        }
    }

    pub fn line(&mut self, message: &str) {
        if let Some(file) = &mut self.file {
            let _ = writeln!(file, "[{}:fc_api] {message}", self.id);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Paused,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MachineCfg {
    vcpu_count: u8,
    mem_size_mib: usize,
    smt: bool,
    track_dirty_pages: bool,
    huge_pages: HugePages,
}

impl MachineCfg {
    fn validate(&self) -> Result<(), String> {
        if self.vcpu_count == 0
            || self.vcpu_count > 32
            || (self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2))
        {
            return Err("Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.".into());
        }
        let multiple = if self.huge_pages == HugePages::TwoM {
            2
        } else {
            1
        };
        if self.mem_size_mib == 0 || !self.mem_size_mib.is_multiple_of(multiple) {
            return Err("Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DriveCfg {
    drive_id: String,
    partuuid: Option<String>,
    is_root_device: bool,
    cache_type: String,
    is_read_only: bool,
    path_on_host: Option<String>,
    rate_limiter: Option<RateLimiter>,
    io_engine: String,
    socket: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NetCfg {
    iface_id: String,
    host_dev_name: String,
    guest_mac: Option<String>,
    mtu: Option<u16>,
    rx_rate_limiter: Option<RateLimiter>,
    tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VsockCfg {
    guest_cid: u32,
    uds_path: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct BalloonCfg {
    amount_mib: u32,
    deflate_on_oom: bool,
    stats_polling_interval_s: u16,
    free_page_hinting: bool,
    free_page_reporting: bool,
}

/// What the fake writes as "vmstate": the device configuration a restore
/// needs (with the paths Firecracker would record) and the boot arguments
/// that steer the simulated guest.
#[derive(Debug, Serialize, Deserialize)]
struct VmStateFile {
    ember_fc_fake_vmstate: u32,
    machine: MachineCfg,
    drives: Vec<DriveCfg>,
    nets: Vec<NetCfg>,
    vsock: Option<VsockCfg>,
    balloon: Option<BalloonCfg>,
    entropy: bool,
    boot_args: String,
}

#[derive(Debug)]
pub struct Vm {
    id: String,
    pub log: Log,
    /// Set when the process must exit after answering.
    pub exit_code: Option<i32>,
    phase: Phase,
    /// Anything but the logger and metrics configured: no snapshot load.
    boot_specific: bool,
    machine: MachineCfg,
    kernel: Option<(api::BootSource, File)>,
    drives: Vec<(DriveCfg, File)>,
    nets: Vec<(NetCfg, File)>,
    vsock: Option<(VsockCfg, VsockDevice)>,
    balloon: Option<BalloonCfg>,
    entropy: bool,
    metrics: Option<File>,
    boot_args: String,
    memory: Option<Arc<Mutex<Memory>>>,
    running: Arc<AtomicBool>,
    guest_vsock: Arc<GuestVsock>,
}

impl Vm {
    pub fn new(id: String, log: Log, metrics_path: Option<PathBuf>) -> Self {
        let running = Arc::new(AtomicBool::new(false));
        Self {
            id,
            log,
            exit_code: None,
            phase: Phase::NotStarted,
            boot_specific: false,
            machine: MachineCfg {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: false,
                track_dirty_pages: false,
                huge_pages: HugePages::None,
            },
            kernel: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            balloon: None,
            entropy: false,
            metrics: metrics_path
                .and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok()),
            boot_args: String::new(),
            memory: None,
            guest_vsock: Arc::new(GuestVsock::new(running.clone())),
            running,
        }
    }

    fn started(&self) -> bool {
        self.phase != Phase::NotStarted
    }

    fn before_start(&self) -> Result<(), String> {
        if self.started() {
            Err(AFTER_START.into())
        } else {
            Ok(())
        }
    }

    fn after_start(&self) -> Result<(), String> {
        if self.started() {
            Ok(())
        } else {
            Err(BEFORE_START.into())
        }
    }

    fn serial(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ember-fc-fake: {line}");
        let _ = out.flush();
    }

    // --- Queries ---------------------------------------------------------

    pub fn instance_info(&self) -> Value {
        let state = match self.phase {
            Phase::NotStarted => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        };
        json!({
            "id": self.id,
            "state": state,
            "vmm_version": crate::IMITATED_VERSION,
            "app_name": "Firecracker",
        })
    }

    pub fn machine_config(&self) -> Value {
        json!(self.machine)
    }

    pub fn full_config(&self) -> Value {
        let boot = self.kernel.as_ref().map(|(b, _)| b);
        json!({
            "balloon": self.balloon,
            "drives": self.drives.iter().map(|(d, _)| d).collect::<Vec<_>>(),
            "boot-source": {
                "kernel_image_path": boot.map(|b| b.kernel_image_path.clone()).unwrap_or_default(),
                "initrd_path": boot.and_then(|b| b.initrd_path.clone()),
                "boot_args": boot.and_then(|b| b.boot_args.clone()),
            },
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine,
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": self.nets.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "vsock": self.vsock.as_ref().map(|(v, _)| v),
            "entropy": self.entropy.then(|| json!({"rate_limiter": null})),
            "pmem": [],
            "memory-hotplug": null,
        })
    }

    // --- Configuration -----------------------------------------------------

    pub fn put_machine_config(&mut self, b: api::MachineConfig) -> Result<Option<Value>, String> {
        self.before_start()?;
        let cfg = MachineCfg {
            vcpu_count: b.vcpu_count,
            mem_size_mib: b.mem_size_mib,
            smt: b.smt,
            track_dirty_pages: b.track_dirty_pages,
            huge_pages: b.huge_pages,
        };
        cfg.validate()?;
        self.machine = cfg;
        self.boot_specific = true;
        Ok(None)
    }

    pub fn patch_machine_config(
        &mut self,
        b: api::MachineConfigUpdate,
    ) -> Result<Option<Value>, String> {
        self.before_start()?;
        let empty = b.vcpu_count.is_none()
            && b.mem_size_mib.is_none()
            && b.smt.is_none()
            && b.cpu_template.is_none()
            && b.track_dirty_pages.is_none()
            && b.huge_pages.is_none();
        if empty {
            return Err("Empty PATCH request.".into());
        }
        let mut cfg = self.machine.clone();
        cfg.vcpu_count = b.vcpu_count.unwrap_or(cfg.vcpu_count);
        cfg.mem_size_mib = b.mem_size_mib.unwrap_or(cfg.mem_size_mib);
        cfg.smt = b.smt.unwrap_or(cfg.smt);
        cfg.track_dirty_pages = b.track_dirty_pages.unwrap_or(cfg.track_dirty_pages);
        cfg.huge_pages = b.huge_pages.unwrap_or(cfg.huge_pages);
        cfg.validate()?;
        self.machine = cfg;
        self.boot_specific = true;
        Ok(None)
    }

    pub fn put_boot_source(&mut self, b: api::BootSource) -> Result<Option<Value>, String> {
        self.before_start()?;
        let kernel = File::open(&b.kernel_image_path)
            .map_err(|e| format!("Boot source error: The kernel file cannot be opened: {e}"))?;
        if let Some(initrd) = &b.initrd_path {
            File::open(initrd).map_err(|e| {
                format!("Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}")
            })?;
        }
        self.boot_args = b.boot_args.clone().unwrap_or_default();
        self.kernel = Some((b, kernel));
        self.boot_specific = true;
        Ok(None)
    }

    pub fn put_drive(&mut self, b: api::Drive) -> Result<Option<Value>, String> {
        self.before_start()?;
        let other_root = self
            .drives
            .iter()
            .any(|(d, _)| d.is_root_device && d.drive_id != b.drive_id);
        if b.is_root_device && other_root {
            return Err("Drive config error: A root block device already exists!".into());
        }
        let Some(path) = b.path_on_host.clone() else {
            return Err("Drive config error: Unable to create the virtio block device: path_on_host is required for virtio-block".into());
        };
        let read_only = b.is_read_only.unwrap_or(false);
        let file = devices::open_drive(&path, read_only)?;
        let cfg = DriveCfg {
            drive_id: b.drive_id,
            partuuid: b.partuuid,
            is_root_device: b.is_root_device,
            cache_type: format!("{:?}", b.cache_type.unwrap_or(api::CacheType::Unsafe)),
            is_read_only: read_only,
            path_on_host: Some(path),
            rate_limiter: b.rate_limiter,
            io_engine: format!("{:?}", b.io_engine.unwrap_or(api::IoEngine::Sync)),
            socket: b.socket,
        };
        self.drives.retain(|(d, _)| d.drive_id != cfg.drive_id);
        self.drives.push((cfg, file));
        self.boot_specific = true;
        Ok(None)
    }

    pub fn patch_drive(&mut self, b: api::PartialDrive) -> Result<Option<Value>, String> {
        self.after_start()?;
        let Some((cfg, file)) = self
            .drives
            .iter_mut()
            .find(|(d, _)| d.drive_id == b.drive_id)
        else {
            return Err("Drive config error: Unable to patch the block device: Failed perform action on device: Device not found Please verify the request arguments.".into());
        };
        if let Some(path) = b.path_on_host {
            *file = devices::open_drive(&path, cfg.is_read_only)?;
            cfg.path_on_host = Some(path);
        }
        if b.rate_limiter.is_some() {
            cfg.rate_limiter = b.rate_limiter;
        }
        Ok(None)
    }

    pub fn put_network_interface(
        &mut self,
        b: api::NetworkInterface,
    ) -> Result<Option<Value>, String> {
        self.before_start()?;
        if self
            .nets
            .iter()
            .any(|(n, _)| n.host_dev_name == b.host_dev_name && n.iface_id != b.iface_id)
        {
            return Err(format!(
                "The host device name {} is already in use.",
                b.host_dev_name
            ));
        }
        self.nets.retain(|(n, _)| n.iface_id != b.iface_id);
        let tap = devices::open_tap(&b.host_dev_name)?;
        let cfg = NetCfg {
            iface_id: b.iface_id,
            host_dev_name: b.host_dev_name,
            guest_mac: b.guest_mac,
            mtu: b.mtu,
            rx_rate_limiter: b.rx_rate_limiter,
            tx_rate_limiter: b.tx_rate_limiter,
        };
        self.nets.push((cfg, tap));
        self.boot_specific = true;
        Ok(None)
    }

    pub fn patch_network_interface(
        &mut self,
        b: api::PartialNetworkInterface,
    ) -> Result<Option<Value>, String> {
        self.after_start()?;
        let Some((cfg, _)) = self.nets.iter_mut().find(|(n, _)| n.iface_id == b.iface_id) else {
            return Err(NO_DEVICE.into());
        };
        cfg.rx_rate_limiter = b.rx_rate_limiter.or(cfg.rx_rate_limiter);
        cfg.tx_rate_limiter = b.tx_rate_limiter.or(cfg.tx_rate_limiter);
        Ok(None)
    }

    pub fn put_vsock(&mut self, b: api::Vsock) -> Result<Option<Value>, String> {
        self.before_start()?;
        self.vsock = None;
        let device = VsockDevice::bind(Path::new(&b.uds_path), self.guest_vsock.clone())?;
        self.vsock = Some((
            VsockCfg {
                guest_cid: b.guest_cid,
                uds_path: b.uds_path,
            },
            device,
        ));
        self.boot_specific = true;
        Ok(None)
    }

    pub fn put_balloon(&mut self, b: api::Balloon) -> Result<Option<Value>, String> {
        self.before_start()?;
        self.balloon = Some(BalloonCfg {
            amount_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_hinting: b.free_page_hinting,
            free_page_reporting: b.free_page_reporting,
        });
        self.boot_specific = true;
        Ok(None)
    }

    pub fn patch_balloon(&mut self, _b: api::BalloonUpdate) -> Result<Option<Value>, String> {
        self.after_start()?;
        self.balloon.as_ref().ok_or(NO_DEVICE)?;
        // The simulated guest, like the tiny test guest, has no balloon
        // driver, so the device is never activated.
        Err("Balloon update error: Balloon: Device not activated yet.".into())
    }

    pub fn balloon(&self) -> Result<Option<Value>, String> {
        let balloon = self.balloon.as_ref().ok_or(NO_DEVICE)?;
        Ok(Some(json!(balloon)))
    }

    pub fn balloon_stats(&self) -> Result<Option<Value>, String> {
        self.after_start()?;
        let balloon = self.balloon.as_ref().ok_or(NO_DEVICE)?;
        if balloon.stats_polling_interval_s == 0 {
            return Err(
                "Balloon device error: Statistics for the balloon device are not enabled".into(),
            );
        }
        Ok(Some(json!({
            "target_pages": balloon.amount_mib * 256,
            "actual_pages": 0,
            "target_mib": balloon.amount_mib,
            "actual_mib": 0,
        })))
    }

    pub fn patch_balloon_stats(
        &mut self,
        b: api::BalloonStatsUpdate,
    ) -> Result<Option<Value>, String> {
        self.after_start()?;
        let balloon = self.balloon.as_mut().ok_or(NO_DEVICE)?;
        if balloon.stats_polling_interval_s == 0 || b.stats_polling_interval_s == 0 {
            return Err(
                "Balloon device error: Statistics cannot be enabled or disabled after activation"
                    .into(),
            );
        }
        balloon.stats_polling_interval_s = b.stats_polling_interval_s;
        Ok(None)
    }

    pub fn put_entropy(&mut self, _b: api::Entropy) -> Result<Option<Value>, String> {
        self.before_start()?;
        self.entropy = true;
        self.boot_specific = true;
        Ok(None)
    }

    pub fn put_logger(&mut self, b: api::Logger) -> Result<Option<Value>, String> {
        if let Some(path) = &b.log_path {
            let log = Log::open(Some(Path::new(path)), &self.id);
            if log.file.is_none() {
                return Err(format!("Logger error: Failed to open {path}"));
            }
            self.log = log;
        }
        Ok(None)
    }

    pub fn put_metrics(&mut self, b: api::Metrics) -> Result<Option<Value>, String> {
        if self.metrics.is_some() {
            return Err("Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.".into());
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&b.metrics_path)
            .map_err(|e| {
                format!(
                    "Metrics error: Cannot initialize the metrics system due to bad user input: {e}"
                )
            })?;
        self.metrics = Some(file);
        Ok(None)
    }

    pub fn put_serial(&mut self, _b: api::Serial) -> Result<Option<Value>, String> {
        self.before_start()?;
        self.boot_specific = true;
        Ok(None)
    }

    // --- Lifecycle -------------------------------------------------------

    pub fn action(&mut self, b: api::Action) -> Result<Option<Value>, String> {
        match b.action_type {
            ActionType::InstanceStart => self.start(),
            ActionType::SendCtrlAltDel => {
                self.after_start()?;
                if self.boot_args.contains("ember_fake.ctrl_alt_del=exit") {
                    self.serial("guest powers off on Ctrl+Alt+Del");
                    self.exit_code = Some(0);
                }
                Ok(None)
            }
            ActionType::FlushMetrics => {
                self.after_start()?;
                if let Some(file) = &mut self.metrics {
                    let _ = writeln!(file, "{}", json!({"vcpu": {"exit_io_out": 0}}));
                }
                Ok(None)
            }
        }
    }

    fn start(&mut self) -> Result<Option<Value>, String> {
        self.before_start()?;
        let Some((_, kernel)) = &mut self.kernel else {
            return Err(
                "Start microvm error: Cannot start microvm without kernel configuration.".into(),
            );
        };
        let mut memory = Memory::anonymous(
            self.machine.mem_size_mib << 20,
            self.machine.track_dirty_pages,
        )
        .map_err(|e| format!("Start microvm error: Cannot allocate guest memory: {e}"))?;
        memory.load_elf(kernel)?;
        self.run(memory, true);
        Ok(None)
    }

    /// Put memory in place and start the simulated vCPU.
    fn run(&mut self, memory: Memory, resume: bool) {
        let ports = guest_vsock_ports(&self.boot_args);
        *self.guest_vsock.listening.lock().expect("vsock ports lock") = ports;
        let memory = Arc::new(Mutex::new(memory));
        spawn_vcpu(memory.clone(), self.running.clone());
        self.memory = Some(memory);
        self.set_running(resume);
    }

    fn set_running(&mut self, running: bool) {
        if running && !self.running.load(Ordering::SeqCst) {
            self.serial("guest running");
        }
        self.running.store(running, Ordering::SeqCst);
        self.phase = if running {
            Phase::Running
        } else {
            Phase::Paused
        };
    }

    pub fn patch_vm(&mut self, b: api::VmUpdate) -> Result<Option<Value>, String> {
        self.after_start()?;
        self.set_running(b.state == VmState::Resumed);
        Ok(None)
    }

    pub fn create_snapshot(&mut self, b: api::SnapshotCreate) -> Result<Option<Value>, String> {
        self.after_start()?;
        if self.phase == Phase::Running {
            return Err("Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running".into());
        }
        let state = VmStateFile {
            ember_fc_fake_vmstate: 1,
            machine: self.machine.clone(),
            drives: self.drives.iter().map(|(d, _)| d.clone()).collect(),
            nets: self.nets.iter().map(|(n, _)| n.clone()).collect(),
            vsock: self.vsock.as_ref().map(|(v, _)| v.clone()),
            balloon: self.balloon,
            entropy: self.entropy,
            boot_args: self.boot_args.clone(),
        };
        let vmstate = serde_json::to_vec(&state).expect("vmstate serialises");
        std::fs::write(&b.snapshot_path, vmstate).map_err(|e| {
            format!("Create snapshot error: Cannot perform open on the snapshot backing file: {e}")
        })?;
        let kind = b.snapshot_type.unwrap_or(SnapshotType::Full);
        let memory = self.memory.as_ref().expect("a started VM has memory");
        let checksum = tokio::task::block_in_place(|| {
            let mut memory = memory.lock().expect("memory lock");
            memory.dump(Path::new(&b.mem_file_path), kind)?;
            Ok::<_, String>(memory.checksum())
        })?;
        self.serial(&format!(
            "snapshot {kind:?} memory checksum {checksum:016x}"
        ));
        Ok(None)
    }

    pub async fn load_snapshot(&mut self, b: api::SnapshotLoad) -> Result<Option<Value>, String> {
        let parse_error = |m: &str| {
            format!("An error occurred when deserializing the json body of a request: {m}.")
        };
        let backend = match (&b.mem_backend, &b.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err(parse_error(
                    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
                ));
            }
            (None, None) => {
                return Err(parse_error(
                    "missing field: either `mem_backend` or `mem_file_path` is required",
                ));
            }
            (Some(m), None) => (m.backend_type, m.backend_path.clone()),
            (None, Some(path)) => (BackendType::File, path.clone()),
        };
        self.before_start()?;
        if self.boot_specific {
            return Err("Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
        }
        // From here on a failure ends the process, as it does Firecracker's.
        match self.restore(&b, backend) {
            Ok(()) => Ok(None),
            Err(message) => {
                self.exit_code = Some(1);
                Err(format!(
                    "Load snapshot error: Failed to restore from snapshot: {message}"
                ))
            }
        }
    }

    fn restore(
        &mut self,
        b: &api::SnapshotLoad,
        (backend_type, backend_path): (BackendType, String),
    ) -> Result<(), String> {
        let raw = std::fs::read(&b.snapshot_path).map_err(|e| {
            format!("Failed to get snapshot state from file: Failed to open snapshot file: {e}")
        })?;
        let state: VmStateFile = serde_json::from_slice(&raw).map_err(|e| {
            format!("Failed to get snapshot state from file: Failed to load snapshot state from file: {e}")
        })?;
        let size = state.machine.mem_size_mib << 20;
        let track = b
            .track_dirty_pages
            .or(b.enable_diff_snapshots)
            .unwrap_or(false);
        let memory = tokio::task::block_in_place(|| match backend_type {
            BackendType::File => Memory::from_file(Path::new(&backend_path), size, track),
            BackendType::Uffd => Memory::from_uffd(Path::new(&backend_path), size, track),
        })
        .map_err(|e| format!("Failed to load guest memory: {e}"))?;

        let build = |e: String| format!("Failed to build microVM from snapshot: {e}");
        let mut drives = Vec::new();
        for d in &state.drives {
            let path = d.path_on_host.as_deref().unwrap_or_default();
            drives.push((
                d.clone(),
                devices::open_drive(path, d.is_read_only).map_err(build)?,
            ));
        }
        let overrides = b.network_overrides.as_deref().unwrap_or_default();
        let mut nets = Vec::new();
        for n in &state.nets {
            let mut n = n.clone();
            if let Some(o) = overrides.iter().find(|o| o.iface_id == n.iface_id) {
                n.host_dev_name = o.host_dev_name.clone();
            }
            let tap = devices::open_tap(&n.host_dev_name).map_err(build)?;
            nets.push((n, tap));
        }
        let vsock = match &state.vsock {
            None => None,
            Some(v) => {
                let mut v = v.clone();
                if let Some(o) = &b.vsock_override {
                    v.uds_path = o.uds_path.clone();
                }
                let device = VsockDevice::bind(Path::new(&v.uds_path), self.guest_vsock.clone())
                    .map_err(build)?;
                Some((v, device))
            }
        };

        let checksum = tokio::task::block_in_place(|| memory.checksum());
        self.serial(&format!("restored memory checksum {checksum:016x}"));
        self.machine = state.machine;
        self.drives = drives;
        self.nets = nets;
        self.vsock = vsock;
        self.balloon = state.balloon;
        self.entropy = state.entropy;
        self.boot_args = state.boot_args;
        self.run(memory, b.resume_vm.unwrap_or(false));
        Ok(())
    }
}

/// `ember_fake.vsock_listen=5000,5001` in the boot arguments.
fn guest_vsock_ports(boot_args: &str) -> std::collections::BTreeSet<u32> {
    boot_args
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("ember_fake.vsock_listen="))
        .flat_map(|ports| ports.split(','))
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The simulated vCPU: while running, it increments the word at
/// [`TICK_ADDR`] every few milliseconds, dirtying that page, and reads and
/// rewrites a word in the next page of a walk over [`WALK_PAGES`] pages from
/// [`WALK_ADDR`], so a diff snapshot holds at most `WALK_PAGES + 1` pages
/// and what it holds depends on everything before. It stops when
/// the VM drops the memory.
fn spawn_vcpu(memory: Arc<Mutex<Memory>>, running: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(5));
            if Arc::strong_count(&memory) == 1 {
                return;
            }
            if running.load(Ordering::SeqCst) {
                let mut memory = memory.lock().expect("memory lock");
                let tick = memory.read_u64(TICK_ADDR).wrapping_add(1);
                memory.write(TICK_ADDR, &tick.to_le_bytes());
                // Read and rewrite one page of the walk in turn.
                let at = WALK_ADDR + (tick as usize % WALK_PAGES) * PAGE;
                let word = memory.read_u64(at).rotate_left(5) ^ tick;
                memory.write(at, &word.to_le_bytes());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_ports_come_from_boot_args() {
        let ports = guest_vsock_ports("console=ttyS0 ember_fake.vsock_listen=52,1024 quiet");
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![52, 1024]);
        assert!(guest_vsock_ports("console=ttyS0").is_empty());
    }

    #[test]
    fn machine_config_rules_match_firecracker() {
        let ok = MachineCfg {
            vcpu_count: 2,
            mem_size_mib: 128,
            smt: true,
            track_dirty_pages: false,
            huge_pages: HugePages::TwoM,
        };
        assert!(ok.validate().is_ok());
        assert!(
            MachineCfg {
                vcpu_count: 3,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            MachineCfg {
                vcpu_count: 0,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            MachineCfg {
                mem_size_mib: 127,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            MachineCfg {
                vcpu_count: 3,
                smt: false,
                ..ok
            }
            .validate()
            .is_ok()
        );
    }
}
