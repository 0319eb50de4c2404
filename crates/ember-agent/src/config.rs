//! How a host agent is set up: where it keeps things, which backend it
//! drives, how big the machine is.

use std::path::PathBuf;

use ember_net::PoolConfig;
use ember_types::HostId;
use serde::{Deserialize, Serialize};

/// Which VMM the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Firecracker where a Firecracker binary and a KVM that can run the
    /// guest exist; QEMU (KVM or TCG) otherwise.
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "firecracker" => Ok(BackendChoice::Firecracker),
            "qemu" => Ok(BackendChoice::Qemu),
            other => Err(format!(
                "unknown backend {other:?}: use \"auto\", \"firecracker\" or \"qemu\""
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub host_id: HostId,
    /// Images, builds, sandbox records (persistent).
    pub data_dir: PathBuf,
    /// Sockets and per-VM run directories (may be tmpfs; lost on reboot).
    pub run_dir: PathBuf,
    /// Guest RAM files of QEMU VMs (tmpfs: RAM files on disk would be
    /// written back to disk continuously).
    pub memory_dir: PathBuf,
    pub backend: BackendChoice,
    /// Firecracker binary; defaults to `EMBER_FIRECRACKER_BIN`.
    pub firecracker_bin: Option<PathBuf>,
    /// Firecracker's `jailer` (same release as Firecracker); when set, each
    /// Firecracker VM is started through it, as its sandbox's uid, chrooted
    /// under `<run dir>/jailer`. Without it Ember's own jail does the same.
    /// Defaults to `EMBER_JAILER_BIN`.
    pub jailer_bin: Option<PathBuf>,
    pub qemu: ember_vmm::qemu::QemuConfig,
    /// The `ember` binary, started as `ember uffd` for page servers.
    pub ember_bin: PathBuf,
    pub net: PoolConfig,
    /// vCPUs and memory the agent may hand out, counted against each
    /// sandbox's nominal size: the host's CPUs × `CPU_OVERSUBSCRIPTION`
    /// and its memory (less the reserve) × `MEMORY_OVERSUBSCRIPTION` by
    /// default. Sandboxes idle most of the time and touch a fraction of
    /// their memory; what they really use is guarded by
    /// `memory_reserve_mib`.
    pub capacity_vcpus: u32,
    pub capacity_memory_mib: u64,
    /// Nominal guest memory per MiB of host memory (what
    /// `capacity_memory_mib` was computed with). For QEMU the RAM file
    /// system's size stays a hard cap, never oversubscribed: a guest whose
    /// RAM file cannot grow dies of SIGBUS, so it is sized by the operator.
    pub memory_oversubscription: f64,
    /// The memory-pressure guard: a create or resume is refused when the
    /// host's available memory (or the RAM file system's free space), less
    /// what the sandbox will soon use, would fall below this many MiB.
    pub memory_reserve_mib: u64,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    /// The guest agent's binary baked into the base image.
    pub guest_bin: Option<PathBuf>,
    /// A statically linked `ember-guest`, put into container images pulled
    /// for a create (it must run on any libc, or none) [default: `guest_bin`].
    pub static_guest_bin: Option<PathBuf>,
    /// Registries (`HOST[:PORT]`) reached over plain HTTP: loopback or a
    /// trusted network only.
    pub insecure_registries: Vec<String>,
    /// Registries (`HOST[:PORT]`) on a private address that creates may
    /// pull from over TLS; any other must resolve to public addresses.
    pub private_registries: Vec<String>,
    /// PEM CA certificates trusted for registries, besides the system's.
    pub registry_ca: Vec<PathBuf>,
    /// Use this built image (an `images/<key>` directory) instead of
    /// building or finding one under `data_dir` (several agents on one
    /// machine, or tests, share one image this way).
    pub image_dir: Option<PathBuf>,
    /// How sandboxes' VMMs and helpers are confined (uids, limits).
    pub confine: crate::confine::ConfineConfig,
    /// Plain creates fork from a warm base (the image booted once per
    /// shape and snapshotted before its first `/init`) instead of booting;
    /// the first create of a shape boots and makes it. A create that asks
    /// for `cold` always boots.
    pub warm_base: bool,
    /// How the agent knows a guest is up.
    pub guest_readiness: GuestReadiness,
    /// Serve running sandboxes' ports on this host directly
    /// (`{port}-{id}.{domain}`, see [`crate::ingress`]); the listener is
    /// the caller's. `None`: ports go through the control plane only.
    pub ingress: Option<ember_ingress::IngressConfig>,
}

/// How the agent knows a guest has come up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GuestReadiness {
    /// Ember's guest agent answers; the agent then hands it its token,
    /// environment, clock and entropy. Every real sandbox.
    #[default]
    Agent,
    /// A line holding this text appears on the guest's serial console.
    /// For test guests without Ember's guest agent (Firecracker's tiny test
    /// guests, `ember-fc-fake`), so the VMM path can be exercised where a
    /// Linux guest cannot run: such sandboxes get no token and cannot run
    /// commands or move files. Never for tenants.
    Serial(String),
}

/// Default vCPUs handed out per host CPU: an idle guest uses next to none.
pub const CPU_OVERSUBSCRIPTION: f64 = 16.0;
/// Default nominal guest memory handed out per MiB of host memory: an idle
/// guest touches a fraction of its memory, and the pressure guard stops
/// admissions before the host runs short.
pub const MEMORY_OVERSUBSCRIPTION: f64 = 2.0;
/// Default MiB the pressure guard keeps free for the host.
pub const MEMORY_RESERVE_MIB: u64 = 1024;

/// `amount` × `ratio`, rounded down (ratios below 1 are taken as 1).
pub fn oversubscribed(amount: u64, ratio: f64) -> u64 {
    (amount as f64 * ratio.max(1.0)) as u64
}

/// This machine's CPUs and memory (MiB).
pub fn host_size() -> (u32, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cpus, host_memory_mib().unwrap_or(4096))
}

/// The host's available memory (`MemAvailable`), MiB.
pub fn host_available_mib() -> Option<u64> {
    meminfo_mib("MemAvailable:")
}

/// Nominal guest memory a host of `host_memory_mib` hands out: what is
/// left after the reserve (at least 512 MiB), times `ratio`.
pub fn nominal_memory_mib(host_memory_mib: u64, reserve_mib: u64, ratio: f64) -> u64 {
    oversubscribed(host_memory_mib.saturating_sub(reserve_mib).max(512), ratio)
}

/// The environment variable naming Firecracker's jailer binary.
pub const JAILER_ENV: &str = "EMBER_JAILER_BIN";

impl AgentConfig {
    /// Defaults for this machine under `data_dir`: run state under
    /// `/run/ember/agent`, RAM files under `/dev/shm/ember`, the machine's
    /// CPUs and memory (less 1 GiB for the host) oversubscribed by the
    /// default ratios (sandboxes idle most of the time), with the pressure
    /// guard keeping 1 GiB free.
    pub fn for_host(data_dir: PathBuf) -> AgentConfig {
        let (cpus, memory_mib) = host_size();
        AgentConfig {
            host_id: AgentConfig::load_or_create_host_id(&data_dir).unwrap_or_default(),
            run_dir: PathBuf::from("/run/ember/agent"),
            memory_dir: PathBuf::from("/dev/shm/ember"),
            data_dir,
            backend: BackendChoice::Auto,
            firecracker_bin: std::env::var_os(ember_vmm::firecracker::BINARY_ENV)
                .map(PathBuf::from),
            jailer_bin: std::env::var_os(JAILER_ENV).map(PathBuf::from),
            qemu: ember_vmm::qemu::QemuConfig::default(),
            ember_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ember")),
            net: PoolConfig::default(),
            capacity_vcpus: oversubscribed(u64::from(cpus), CPU_OVERSUBSCRIPTION) as u32,
            capacity_memory_mib: nominal_memory_mib(
                memory_mib,
                MEMORY_RESERVE_MIB,
                MEMORY_OVERSUBSCRIPTION,
            ),
            memory_oversubscription: MEMORY_OVERSUBSCRIPTION,
            memory_reserve_mib: MEMORY_RESERVE_MIB,
            default_vcpus: 1,
            default_memory_mib: 512,
            guest_bin: None,
            static_guest_bin: None,
            insecure_registries: Vec::new(),
            private_registries: Vec::new(),
            registry_ca: Vec::new(),
            image_dir: None,
            confine: crate::confine::ConfineConfig::default(),
            warm_base: true,
            guest_readiness: GuestReadiness::Agent,
            ingress: None,
        }
    }

    /// This host's ID, kept in `<data>/host-id` so it survives restarts.
    pub fn load_or_create_host_id(data_dir: &std::path::Path) -> std::io::Result<HostId> {
        let path = data_dir.join("host-id");
        match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let id = HostId::new();
                std::fs::write(&path, format!("{id}\n"))?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }
}

fn host_memory_mib() -> Option<u64> {
    meminfo_mib("MemTotal:")
}

/// One `/proc/meminfo` field (`name` with its colon), MiB.
fn meminfo_mib(name: &str) -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
