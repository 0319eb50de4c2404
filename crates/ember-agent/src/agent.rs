//! The host agent: every sandbox on this machine, its lifecycle, and the
//! bookkeeping that lets it survive restarts.
//!
//! Concurrency: each sandbox has an operation lock, so lifecycle calls on
//! one sandbox run one after another; a call that finds the sandbox in a
//! state it cannot start from fails with [`AgentError::IllegalTransition`]
//! before touching anything. Reads (get, list) never wait for an operation.
//! Exec and file calls take the guest client under a short lock and then
//! run without holding anything, so a long exec never blocks a pause (it
//! is cut off when the VM stops, and may reconnect after the resume).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_guest_api::{GuestClient, InitRequest};
use ember_image::Image;
use ember_net::{EgressPolicy, SlotPool};
use ember_snapshot::{Base, BuildInfo, BuildStore, ImageKind, VmInfo};
use ember_types::{BuildId, DiskFormat, SandboxId};
use ember_vmm::{
    DriveSpec, Launch, MachineSpec, MemoryBackend, MemoryDump, NetSpec, RestoreSpec,
    SnapshotRequest, VmConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::backend::Backend;
use crate::backend::MemoryKind;
use crate::config::{AgentConfig, GuestReadiness};
use crate::disk;
use crate::error::{AgentError, chain};
use crate::records::{Records, TemplateRecord};
use crate::runtime::{DiskLayer, PageServer, Runtime};
use crate::state::{IngressRecord, Operation, RuntimeRecord, SandboxRecord, SandboxState};
use crate::timing::Phases;

/// Guest memory is tracked and stored in pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// Disk diffs are made of blocks of this size.
pub const DISK_BLOCK: u64 = 4096;
/// How long a booting or restored guest agent may take to answer. TCG
/// boots take seconds, more on a loaded machine.
const GUEST_READY: Duration = Duration::from_secs(120);

/// What a build records about the VM beyond `VmInfo`, so any host with the
/// same image can restore it (kept in `BuildInfo::extra["ember"]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildVm {
    /// Image key: the kernel, initramfs and base root filesystem.
    pub image: String,
    pub kernel_args: String,
    /// Token the guest agent requires in this snapshot.
    pub guest_token: String,
    /// The sandbox the snapshot was taken from.
    pub source_sandbox: SandboxId,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: SandboxId,
    pub build: Option<BuildId>,
    /// 0 = the template's, or the default.
    pub vcpus: u32,
    pub memory_mib: u32,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub network: EgressPolicy,
    pub guest_token: String,
    /// Boot the image even where a warm base of this shape exists.
    pub cold: bool,
    pub ingress: IngressRecord,
    /// Boot this container image instead of the base image; only without
    /// `build`: an imported one (key or digest) or a `docker://` reference.
    pub image: Option<String>,
    /// Credentials for pulling `image`; never stored.
    pub registry: RegistryCredentials,
    /// Working directory and user of an exec that names none (default:
    /// the image's WorkingDir and User, when booting one).
    pub exec_cwd: Option<String>,
    pub exec_user: Option<String>,
}

/// Registry credentials for one pull. `Debug` hides the password.
#[derive(Clone, Default)]
pub struct RegistryCredentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| ".."))
            .finish()
    }
}

/// What a cold boot starts from: a disk-only build, its root filesystem
/// file, and the kernel command line that boots it.
#[derive(Debug, Clone)]
struct BootRoot {
    build: BuildId,
    rootfs: PathBuf,
    kernel_args: String,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub creates: AtomicU64,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    /// What page servers that have ended served.
    pub page_servers: Arc<crate::runtime::PageServerTotals>,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub id: SandboxId,
    /// Serialises lifecycle operations on this sandbox.
    pub op: Mutex<()>,
    pub record: StdMutex<SandboxRecord>,
    pub runtime: Mutex<Option<Runtime>>,
    /// Recent samples of what it uses while running.
    pub usage: StdMutex<crate::usage::History>,
    /// When this host's ingress last carried a request to it (Unix ms; 0:
    /// never since the agent started).
    pub last_traffic_ms: std::sync::atomic::AtomicU64,
}

impl Entry {
    pub fn record(&self) -> SandboxRecord {
        self.record.lock().expect("record lock").clone()
    }

    pub fn state(&self) -> SandboxState {
        self.record.lock().expect("record lock").state
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    vcpus: u32,
    memory_mib: u64,
}

/// A host agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub config: AgentConfig,
    pub backend: Backend,
    pub store: BuildStore,
    pub records: Records,
    pub slots: SlotPool,
    pub confiner: crate::confine::Confiner,
    pub image: Image,
    /// The image's root filesystem, imported as a disk-only build so every
    /// disk diff has a header to be a diff of.
    pub base_build: BuildId,
    sandboxes: StdMutex<HashMap<SandboxId, Arc<Entry>>>,
    usage: StdMutex<Usage>,
    pub metrics: Metrics,
    /// One flat root filesystem per build, materialised once even when many
    /// sandboxes fork from it at once.
    flat_locks: StdMutex<HashMap<BuildId, Arc<Mutex<()>>>>,
    /// Shapes (vcpus, memory) whose warm base a create is making now.
    warming: StdMutex<std::collections::HashSet<(u32, u32)>>,
}

/// MiB the pressure guard keeps free on the RAM file system (QEMU).
const RAM_FS_MARGIN_MIB: u64 = 32;

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn now_unix_ms() -> u64 {
    unix_ns() / 1_000_000
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(crate) fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Run blocking work (file copies, commands, locks) off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, AgentError>
where
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::io("blocking task", std::io::Error::other(e.to_string())))?
}

impl Agent {
    /// Start an agent: choose the backend, ensure the guest image, import it
    /// as the base build, then recover whatever a previous agent left.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        // Guest RAM, disks, tokens and sockets: no other local user may read
        // them or swap them for links.
        for dir in [&config.data_dir, &config.run_dir, &config.memory_dir] {
            crate::confine::private_dir(dir)?;
        }
        let confiner = crate::confine::Confiner::new(
            config.confine.clone(),
            &config.run_dir,
            &config.net.prefix,
            &config.data_dir,
        )?;
        let backend = crate::backend::choose(&config).await?;
        info!(backend = %backend.kind, detail = %backend.detail, "backend chosen");
        let image = ensure_image(&config).await?;
        let store = {
            let data = config.data_dir.clone();
            blocking(move || BuildStore::open(&data).map_err(AgentError::Store)).await?
        };
        let base_build = import_base_image(&store, &image).await?;
        let dropped = {
            let data = config.data_dir.clone();
            blocking(move || disk::drop_cache_after_reboot(&data)).await?
        };
        if dropped > 0 {
            info!(
                files = dropped,
                "rootfs cache dropped: written before this boot of the host"
            );
        }
        let records = Records::open(&config.data_dir)?;
        let slots = SlotPool::new(config.net.clone()).map_err(AgentError::Net)?;
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                backend,
                store,
                records,
                slots,
                confiner,
                image,
                base_build,
                sandboxes: StdMutex::new(HashMap::new()),
                usage: StdMutex::new(Usage::default()),
                metrics: Metrics::default(),
                flat_locks: StdMutex::new(HashMap::new()),
                warming: StdMutex::new(std::collections::HashSet::new()),
            }),
        };
        crate::recovery::recover(&agent).await?;
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn entry(&self, id: &SandboxId) -> Result<Arc<Entry>, AgentError> {
        self.inner
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::SandboxNotFound(id.clone()))
    }

    pub(crate) fn insert_entry(
        &self,
        record: SandboxRecord,
        runtime: Option<Runtime>,
    ) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            id: record.id.clone(),
            op: Mutex::new(()),
            record: StdMutex::new(record),
            runtime: Mutex::new(runtime),
            usage: StdMutex::new(crate::usage::History::default()),
            last_traffic_ms: std::sync::atomic::AtomicU64::new(0),
        });
        self.inner
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .insert(entry.id.clone(), entry.clone());
        entry
    }

    /// Every sandbox's entry, copied out so no lock is held while each is
    /// worked on.
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.inner
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .cloned()
            .collect()
    }

    fn remove_entry(&self, id: &SandboxId) {
        self.inner
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .remove(id);
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxRecord, AgentError> {
        Ok(self.entry(id)?.record())
    }

    pub fn list(&self) -> Vec<SandboxRecord> {
        let entries = self.entries();
        let mut out: Vec<_> = entries.iter().map(|e| e.record()).collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        out
    }

    /// vCPUs and MiB in use by sandboxes that hold a VM.
    pub fn usage(&self) -> (u32, u64) {
        let u = *self.inner.usage.lock().expect("usage lock");
        (u.vcpus, u.memory_mib)
    }

    /// MiB of guest memory this host can hold: the configured capacity,
    /// and for QEMU, whose guest RAM is a file in the memory directory, no
    /// more than that file system's size (a tmpfs such as /dev/shm is often
    /// half the host's RAM; a guest past it would die of SIGBUS).
    pub fn memory_capacity_mib(&self) -> u64 {
        let cfg = &self.inner.config;
        if self.inner.backend.strategy.memory != MemoryKind::RamFile {
            return cfg.capacity_memory_mib;
        }
        match nix::sys::statvfs::statvfs(&cfg.memory_dir) {
            Ok(fs) => {
                let size_mib = (fs.blocks() * fs.fragment_size()) >> 20;
                cfg.capacity_memory_mib.min(size_mib)
            }
            Err(_) => cfg.capacity_memory_mib,
        }
    }

    /// The memory-pressure guard: refuses a sandbox that will soon use
    /// `need_mib` when that would leave less than the reserve of the host's
    /// available memory or, for QEMU, of the RAM file system's free space
    /// (a guest whose RAM file cannot grow dies of SIGBUS).
    fn check_pressure(&self, need_mib: u64) -> Result<(), AgentError> {
        let cfg = &self.inner.config;
        let reserve_mib = cfg.memory_reserve_mib;
        let short = |resource: String, available_mib: u64, reserve_mib: u64| {
            if available_mib < reserve_mib + need_mib {
                Err(AgentError::MemoryPressure {
                    resource,
                    available_mib,
                    reserve_mib,
                    need_mib,
                })
            } else {
                Ok(())
            }
        };
        if let Some(available) = crate::config::host_available_mib() {
            short("host memory".to_owned(), available, reserve_mib)?;
        }
        if self.inner.backend.strategy.memory == MemoryKind::RamFile
            && let Ok(fs) = nix::sys::statvfs::statvfs(&cfg.memory_dir)
        {
            let free_mib = (fs.blocks_available() * fs.fragment_size()) >> 20;
            // The RAM file system needs room for what guests touch, not
            // for the host: a small margin only.
            short(
                format!("the RAM file system {}", cfg.memory_dir.display()),
                free_mib,
                RAM_FS_MARGIN_MIB,
            )?;
        }
        Ok(())
    }

    /// What a sandbox restored from `build` (or booted, without one) will
    /// soon use, MiB: the memory the build holds (what the guest had
    /// touched) or, for a boot, what booting touches, plus its VMM.
    fn expected_use_mib(&self, memory_mib: u32, build: Option<BuildId>) -> u64 {
        const VMM_MIB: u64 = 64;
        const BOOT_MIB: u64 = 160;
        let held = build.and_then(|b| {
            let path = self.inner.store.build_dir(b).join("memfile");
            std::fs::metadata(path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.blocks() * 512) >> 20
            })
        });
        held.unwrap_or(BOOT_MIB).min(u64::from(memory_mib)) + VMM_MIB
    }

    fn reserve(&self, vcpus: u32, memory_mib: u32) -> Result<(), AgentError> {
        let capacity_mib = self.memory_capacity_mib();
        let mut u = self.inner.usage.lock().expect("usage lock");
        let cfg = &self.inner.config;
        let free_vcpus = cfg.capacity_vcpus.saturating_sub(u.vcpus);
        let free_mem = capacity_mib.saturating_sub(u.memory_mib);
        if vcpus > free_vcpus || u64::from(memory_mib) > free_mem {
            return Err(AgentError::NoCapacity {
                vcpus,
                memory_mib,
                free_vcpus,
                free_memory_mib: free_mem,
            });
        }
        u.vcpus += vcpus;
        u.memory_mib += u64::from(memory_mib);
        Ok(())
    }

    pub(crate) fn reserve_unchecked(&self, vcpus: u32, memory_mib: u32) {
        let mut u = self.inner.usage.lock().expect("usage lock");
        u.vcpus += vcpus;
        u.memory_mib += u64::from(memory_mib);
    }

    fn release(&self, vcpus: u32, memory_mib: u32) {
        let mut u = self.inner.usage.lock().expect("usage lock");
        u.vcpus = u.vcpus.saturating_sub(vcpus);
        u.memory_mib = u.memory_mib.saturating_sub(u64::from(memory_mib));
    }

    /// Persist a change to a sandbox's record (state changes are logged).
    pub(crate) fn update(
        &self,
        entry: &Entry,
        f: impl FnOnce(&mut SandboxRecord),
    ) -> Result<SandboxRecord, AgentError> {
        let mut rec = entry.record.lock().expect("record lock");
        let before = rec.state;
        let mut next = rec.clone();
        f(&mut next);
        if next.state != before {
            next.state_changed_at = now_rfc3339();
            info!(sandbox = %next.id, from = %before, to = %next.state, "state change");
        }
        self.inner.records.save(&next)?;
        *rec = next.clone();
        Ok(next)
    }

    /// Move into the transitional state of `op`, or refuse.
    fn begin(&self, entry: &Entry, op: Operation) -> Result<SandboxState, AgentError> {
        let from = entry.state();
        let Some(to) = op.enter(from) else {
            return Err(AgentError::IllegalTransition {
                id: entry.id.clone(),
                operation: op.as_str(),
                state: from.to_string(),
            });
        };
        self.update(entry, |r| r.state = to)?;
        Ok(from)
    }

    // ------------------------------------------------------------ create

    pub async fn create(&self, req: CreateRequest) -> Result<SandboxRecord, AgentError> {
        if let Ok(existing) = self.entry(&req.id) {
            // A retried create (the control plane lost our answer) gets the
            // same sandbox back; it must wait for the first attempt to end.
            let _op = existing.op.lock().await;
            return Ok(existing.record());
        }
        if req.guest_token.is_empty() {
            return Err(AgentError::InvalidArgument(
                "guest_token must not be empty".to_owned(),
            ));
        }
        let cfg = &self.inner.config;
        let imported = match (&req.image, req.build) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(AgentError::InvalidArgument(
                    "give an image or a build to start from, not both".to_owned(),
                ));
            }
            (Some(name), None) => Some(self.imported_root(name, &req.registry).await?),
        };
        let mut env = req.env.clone();
        if let Some((_, image)) = &imported {
            // The image's environment (PATH above all) under the caller's.
            for pair in &image.manifest.defaults.env {
                if let Some((k, v)) = pair.split_once('=') {
                    env.entry(k.to_owned()).or_insert_with(|| v.to_owned());
                }
            }
        }
        let (vcpus, memory_mib) = match req.build {
            None => (
                if req.vcpus == 0 {
                    cfg.default_vcpus
                } else {
                    req.vcpus
                },
                if req.memory_mib == 0 {
                    cfg.default_memory_mib
                } else {
                    req.memory_mib
                },
            ),
            Some(build) => {
                let meta = self.build_meta(build).await?;
                let vm = meta
                    .info
                    .vm
                    .as_ref()
                    .ok_or(AgentError::BuildNotFound(build))?;
                let (tv, tm) = (vm.vcpus, vm.memory_mib as u32);
                if (req.vcpus != 0 && req.vcpus != tv)
                    || (req.memory_mib != 0 && req.memory_mib != tm)
                {
                    return Err(AgentError::TemplateShapeMismatch {
                        build,
                        template_vcpus: tv,
                        template_memory_mib: tm,
                        asked_vcpus: req.vcpus,
                        asked_memory_mib: req.memory_mib,
                    });
                }
                (tv, tm)
            }
        };
        if vcpus > 32 || !(128..=65536).contains(&memory_mib) {
            return Err(AgentError::InvalidArgument(format!(
                "vcpus must be 1..=32 and memory_mib 128..=65536 (got {vcpus} and {memory_mib})"
            )));
        }
        // A plain create forks from this shape's warm base where there is
        // one; the sandbox descends from it as a fork from its template.
        let warm_base = match req.build {
            None if cfg.warm_base && !req.cold && imported.is_none() => {
                self.warm_base(vcpus, memory_mib)
            }
            _ => None,
        };
        self.check_pressure(self.expected_use_mib(memory_mib, req.build.or(warm_base)))?;
        self.reserve(vcpus, memory_mib)?;
        let now = now_rfc3339();
        let record = SandboxRecord {
            id: req.id.clone(),
            state: SandboxState::Creating,
            backend: self.inner.backend.kind,
            vcpus,
            memory_mib,
            source_build: req.build,
            // A sandbox booted from an imported image descends from its
            // disk-only build, as a fork from its template.
            build: req
                .build
                .or(warm_base)
                .or(imported.as_ref().map(|(root, _)| root.build)),
            image: self.inner.image.manifest.key.clone(),
            env: env.clone(),
            metadata: req.metadata.clone(),
            network: req.network.clone(),
            guest_token: req.guest_token.clone(),
            failure_reason: None,
            created_at: now.clone(),
            state_changed_at: now,
            last_operation_ms: 0,
            last_operation_phases: Vec::new(),
            runtime: None,
            pending_build: None,
            ingress: req.ingress.clone(),
            build_stored_bytes: 0,
            image_defaults: imported
                .as_ref()
                .map(|(_, image)| image.manifest.defaults.clone()),
            exec_cwd: req.exec_cwd.clone().or_else(|| {
                imported
                    .as_ref()
                    .and_then(|(_, i)| i.manifest.defaults.working_dir.clone())
            }),
            exec_user: req.exec_user.clone().or_else(|| {
                imported
                    .as_ref()
                    .and_then(|(_, i)| i.manifest.defaults.user.clone())
            }),
        };
        if let Err(e) = self.inner.records.save(&record) {
            self.release(vcpus, memory_mib);
            return Err(e);
        }
        let entry = self.insert_entry(record.clone(), None);
        let _op = entry.op.lock().await;
        let started = Instant::now();
        let phases = Phases::new();
        let result = match (req.build.or(warm_base), imported) {
            (_, Some((root, _))) => self.boot_cold(&entry, &record, &root, false, &phases).await,
            (None, None) => {
                let make_warm = cfg.warm_base && !req.cold;
                let root = BootRoot {
                    build: self.inner.base_build,
                    rootfs: self.inner.image.rootfs.clone(),
                    kernel_args: self.inner.image.kernel_args().to_owned(),
                };
                self.boot_cold(&entry, &record, &root, make_warm, &phases)
                    .await
            }
            (Some(build), None) => {
                self.start_from_build(&record, build, &req.guest_token, &env, &phases)
                    .await
            }
        };
        match result {
            Ok(rt) => {
                let rt_record = runtime_record(&rt);
                *entry.runtime.lock().await = Some(rt);
                self.inner.metrics.creates.fetch_add(1, Ordering::Relaxed);
                let ms = started.elapsed().as_millis() as u64;
                info!(sandbox = %record.id, ms, "created");
                let timing = phases.finish(started.elapsed());
                self.update(&entry, |r| {
                    r.state = SandboxState::Running;
                    r.runtime = Some(rt_record);
                    r.last_operation_ms = ms;
                    r.last_operation_phases = timing;
                })
            }
            Err(e) => {
                self.release(vcpus, memory_mib);
                let reason = chain(&e);
                error!(sandbox = %record.id, error = %reason, "create failed");
                self.update(&entry, |r| {
                    r.state = SandboxState::Failed;
                    r.failure_reason = Some(format!("create failed: {reason}"));
                })?;
                Err(e)
            }
        }
    }

    async fn build_meta(&self, build: BuildId) -> Result<ember_snapshot::BuildMeta, AgentError> {
        let store = self.inner.store.clone();
        let meta = blocking(move || {
            if !store.exists(build) {
                return Err(AgentError::BuildNotFound(build));
            }
            store.read_meta(build).map_err(AgentError::Store)
        })
        .await?;
        if let Some(vm) = &meta.info.vm
            && vm.backend != self.inner.backend.kind
        {
            return Err(AgentError::BackendMismatch {
                build,
                made_by: vm.backend.to_string(),
                runs: self.inner.backend.kind.to_string(),
            });
        }
        Ok(meta)
    }

    fn run_dir(&self, id: &SandboxId) -> PathBuf {
        self.inner.config.run_dir.join("vms").join(id.as_str())
    }

    fn memory_file(&self, id: &SandboxId) -> PathBuf {
        self.inner.config.memory_dir.join(format!("{id}.ram"))
    }

    /// Slot and run directory: the first things every VM start needs.
    async fn prepare(
        &self,
        record: &SandboxRecord,
        phases: &Phases,
    ) -> Result<Runtime, AgentError> {
        let mut rt = Runtime::default();
        let run_dir = self.run_dir(&record.id);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| AgentError::io(format!("create {}", run_dir.display()), e))?;
        rt.run_dir = Some(run_dir);
        let pool = self.inner.slots.clone();
        let policy = record.network.clone();
        let acquired = phases
            .time(
                "slot",
                blocking(move || pool.acquire(policy).map_err(AgentError::Net)),
            )
            .await;
        match acquired {
            Ok(slot) => rt.slot = Some(slot),
            Err(e) => {
                rt.teardown().await;
                return Err(e);
            }
        }
        let cgroup_started = Instant::now();
        let cgroup =
            self.inner
                .confiner
                .cgroup(record.id.as_str(), record.vcpus, record.memory_mib);
        phases.record("cgroup", cgroup_started.elapsed());
        match cgroup {
            Ok(cgroup) => rt.cgroup = cgroup,
            Err(e) => {
                rt.teardown().await;
                return Err(e);
            }
        }
        Ok(rt)
    }

    fn launch(
        &self,
        record: &SandboxRecord,
        rt: &Runtime,
        image: &Image,
        kernel_args: &str,
    ) -> Launch {
        let slot = rt.slot.as_ref().expect("prepared runtime has a slot");
        let net = slot.vmm_net();
        Launch {
            vm_id: record.id.to_string(),
            run_dir: rt.run_dir.clone().expect("prepared runtime has a run dir"),
            config: VmConfig {
                machine: MachineSpec {
                    vcpus: record.vcpus,
                    memory_mib: record.memory_mib,
                },
                kernel: image.vmlinux.clone(),
                initrd: Some(image.initrd.clone()),
                kernel_args: kernel_args.to_owned(),
                drives: vec![{
                    let disk = rt.disk.as_ref().expect("disk prepared");
                    DriveSpec {
                        id: "root".to_owned(),
                        host_path: disk.path().to_path_buf(),
                        read_only: false,
                        root: true,
                        format: disk.format(),
                        backing: match disk {
                            DiskLayer::Qcow2 { below, .. } => below.clone(),
                            DiskLayer::Raw { .. } => Vec::new(),
                        },
                    }
                }],
                net: Some(NetSpec {
                    tap: net.tap,
                    guest_mac: net.guest_mac,
                    netns: Some(net.netns),
                }),
            },
            memory_file: rt.memory_file.clone(),
            confinement: Some(
                self.inner
                    .confiner
                    .confinement(slot.index(), rt.cgroup.as_ref()),
            ),
        }
    }

    /// An imported container image as a root to boot: its root filesystem
    /// imported into the build store as a disk-only build (once).
    async fn imported_root(
        &self,
        name: &str,
        registry: &RegistryCredentials,
    ) -> Result<(BootRoot, ember_image::oci::ImportedImage), AgentError> {
        let cfg = &self.inner.config;
        let data_dir = cfg.data_dir.clone();
        let image = if let Some(reference) = name.strip_prefix("docker://") {
            // Only registry references come from the API: a local layout or
            // archive path would let a caller make the agent read host files.
            // The caller names the host this agent connects to: only a
            // public one, unless the operator listed it (no SSRF into the
            // host's network).
            let host =
                ember_image::registry::registry_of(reference).map_err(AgentError::ImageImport)?;
            let listed = |list: &[String]| list.contains(&host);
            if !listed(&cfg.insecure_registries) && !listed(&cfg.private_registries) {
                ember_image::registry::check_public(&host)
                    .await
                    .map_err(AgentError::ImageImport)?;
            }
            let options = ember_image::registry::RegistryOptions {
                username: registry.username.clone(),
                password: registry.password.clone(),
                plain_http: listed(&cfg.insecure_registries),
                ca_certificates: cfg.registry_ca.clone(),
            };
            let guest = cfg
                .static_guest_bin
                .clone()
                .unwrap_or_else(ember_image::default_guest_binary);
            let mut log = |p: ember_image::Progress| info!(image = %reference, progress = ?p, "pulling image");
            ember_image::registry::import(&data_dir, reference, &options, &guest, &mut log)
                .await
                .map_err(AgentError::ImageImport)?
        } else {
            let wanted = name.to_owned();
            blocking(move || {
                ember_image::oci::find(&data_dir, &wanted).ok_or(AgentError::ImageNotFound(wanted))
            })
            .await?
        };
        let key = format!("oci:{}", image.manifest.key);
        let build = import_rootfs_build(&self.inner.store, &key, &image.rootfs).await?;
        let root = BootRoot {
            build,
            rootfs: image.rootfs.clone(),
            kernel_args: format!("{} {}", self.inner.image.kernel_args(), image.kernel_args()),
        };
        Ok((root, image))
    }

    async fn boot_cold(
        &self,
        entry: &Entry,
        record: &SandboxRecord,
        root: &BootRoot,
        make_warm: bool,
        phases: &Phases,
    ) -> Result<Runtime, AgentError> {
        let mut rt = self.prepare(record, phases).await?;
        let result = async {
            let image = self.inner.image.clone();
            rt.disk = Some(
                phases
                    .time(
                        "disk",
                        self.disk_for(
                            &record.id,
                            root.build,
                            Some(disk::LayerBase::raw(root.rootfs.clone())),
                        ),
                    )
                    .await?,
            );
            if self.inner.backend.strategy.memory == MemoryKind::RamFile {
                rt.memory_file = Some(self.memory_file(&record.id));
            }
            let launch = self.launch(record, &rt, &image, &root.kernel_args);
            let vm = self
                .inner
                .backend
                .vmm
                .boot(&launch)
                .await
                .map_err(|e| AgentError::operation(&record.id, "boot", e))?;
            for (name, took) in vm.start_phases() {
                phases.record(name, took);
            }
            rt.vm = Some(vm);
            rt.launch = Some(launch);
            let guest = self.guest_client(&rt, None);
            if make_warm {
                self.make_warm_base(entry, record, &rt, &guest, phases)
                    .await;
            }
            self.init_guest(
                record,
                &rt,
                &guest,
                &record.guest_token,
                &record.env,
                phases,
            )
            .await?;
            rt.guest = Some(guest);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(rt),
            Err(e) => {
                let e = self.with_console(&rt, e);
                rt.teardown().await;
                Err(e)
            }
        }
    }

    /// This shape's warm base for the agent's image, if one is ready.
    fn warm_base(&self, vcpus: u32, memory_mib: u32) -> Option<BuildId> {
        self.inner
            .records
            .warm(&self.inner.image.manifest.key)
            .into_iter()
            .find(|w| w.vcpus == vcpus && w.memory_mib == memory_mib)
            .map(|w| w.build)
            .filter(|b| self.inner.store.exists(*b))
    }

    /// Snapshot a just-booted VM, before its first `/init` (no token, no
    /// environment, nothing of a tenant's in it), as the warm base of its
    /// shape, then let it go on. Best effort: a create never fails because
    /// its warm base could not be made (the next one tries again).
    async fn make_warm_base(
        &self,
        entry: &Entry,
        record: &SandboxRecord,
        rt: &Runtime,
        guest: &GuestClient,
        phases: &Phases,
    ) {
        let shape = (record.vcpus, record.memory_mib);
        if !self.inner.warming.lock().expect("warming").insert(shape) {
            return; // another create is making it
        }
        let started = Instant::now();
        let result: Result<BuildId, AgentError> = async {
            phases
                .time(
                    "guest.ready",
                    self.guest_up(&record.id, rt, guest, Instant::now() + GUEST_READY),
                )
                .await?;
            let (build, _) = self.snapshot_build(entry, record, rt, phases).await?;
            self.prepare_template_disk(rt, build, phases).await;
            let vm = rt.vm.as_ref().expect("VM");
            let resumed = vm
                .resume()
                .await
                .map_err(|e| AgentError::operation(&record.id, "resume after snapshot", e));
            self.inner.records.save_warm(&crate::records::WarmRecord {
                build,
                image: record.image.clone(),
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
                created_at: now_rfc3339(),
            })?;
            // The VM descends from the warm base now: its next pause is a
            // diff of it.
            self.update(entry, |r| {
                r.build = Some(build);
                r.pending_build = None;
            })?;
            resumed.map(|()| build)
        }
        .await;
        self.inner.warming.lock().expect("warming").remove(&shape);
        match result {
            Ok(build) => info!(
                sandbox = %record.id,
                build = %build,
                vcpus = shape.0,
                memory_mib = shape.1,
                ms = started.elapsed().as_millis() as u64,
                "warm base made: plain creates of this shape fork from it"
            ),
            Err(e) => {
                warn!(sandbox = %record.id, error = %chain(&e), "warm base not made; creates of this shape boot");
                let _ = self.update(entry, |r| r.pending_build = None);
            }
        }
    }

    /// Restore a VM from `build` for `record`: a fork of a template, or the
    /// resume of a paused sandbox. The slot, the disk layer and (on QEMU)
    /// the memory file are independent and prepared concurrently.
    async fn start_from_build(
        &self,
        record: &SandboxRecord,
        build: BuildId,
        new_token: &str,
        env: &BTreeMap<String, String>,
        phases: &Phases,
    ) -> Result<Runtime, AgentError> {
        let (meta, image) = phases.time("build.lookup", self.build_image(build)).await?;
        let ram_file = self.inner.backend.strategy.memory == MemoryKind::RamFile;
        let (prepared, disk, memory_file) = tokio::join!(
            self.prepare(record, phases),
            phases.time("disk", self.disk_for(&record.id, build, None)),
            async {
                if ram_file {
                    Some(
                        phases
                            .time("memory", self.materialize_memory(&record.id, build))
                            .await,
                    )
                } else {
                    None
                }
            },
        );
        // Whatever was made is owned by the runtime, so one teardown
        // releases it all when another part failed.
        let (mut rt, mut failed) = match prepared {
            Ok(rt) => (rt, None),
            Err(e) => (Runtime::default(), Some(e)),
        };
        match disk {
            Ok(d) => rt.disk = Some(d),
            Err(e) => failed = failed.or(Some(e)),
        }
        match memory_file {
            Some(Ok(path)) => rt.memory_file = Some(path),
            Some(Err(e)) => failed = failed.or(Some(e)),
            None => {}
        }
        if let Some(e) = failed {
            rt.teardown().await;
            return Err(e);
        }
        let result = async {
            let memory = match &rt.memory_file {
                Some(path) => MemoryBackend::File(path.clone()),
                None => {
                    let slot = rt.slot.as_ref().expect("prepared runtime has a slot");
                    let confinement = self
                        .inner
                        .confiner
                        .confinement(slot.index(), rt.cgroup.as_ref());
                    let ps = phases
                        .time(
                            "page_server",
                            PageServer::spawn(
                                &self.inner.config.ember_bin,
                                &self.inner.store,
                                rt.run_dir.as_ref().expect("run dir"),
                                build,
                                Some(&confinement),
                                self.inner.metrics.page_servers.clone(),
                            ),
                        )
                        .await?;
                    let socket = ps.socket.clone();
                    rt.page_server = Some(ps);
                    MemoryBackend::Uffd(socket)
                }
            };
            let build_dir = self.inner.store.build_dir(build);
            crate::runtime::servable(&build_dir).map_err(|e| {
                AgentError::io(format!("open {} to the VMM", build_dir.display()), e)
            })?;
            let launch = self.launch(record, &rt, &image, &meta.kernel_args);
            let spec = RestoreSpec {
                vmstate: self
                    .inner
                    .store
                    .file_path(build, ember_snapshot::BuildFile::Vmstate),
                memory,
                track_dirty_pages: true,
                resume: true,
            };
            let vm = self
                .inner
                .backend
                .vmm
                .restore(&launch, &spec)
                .await
                .map_err(|e| AgentError::operation(&record.id, "restore", e))?;
            for (name, took) in vm.start_phases() {
                phases.record(name, took);
            }
            rt.vm = Some(vm);
            rt.launch = Some(launch);
            let guest = self.guest_client(&rt, Some(&meta.guest_token));
            self.init_guest(record, &rt, &guest, new_token, env, phases)
                .await?;
            rt.guest = Some(guest);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(rt),
            Err(e) => {
                let e = self.with_console(&rt, e);
                rt.teardown().await;
                Err(e)
            }
        }
    }

    /// What restoring `build` needs to know: the VM it holds and the image
    /// (kernel, initrd) it was made with.
    async fn build_image(&self, build: BuildId) -> Result<(BuildVm, Image), AgentError> {
        let meta = self.build_meta(build).await?;
        let vm_extra: BuildVm = meta
            .info
            .extra
            .get("ember")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("build {build} holds no VM to restore"))
            })?;
        if vm_extra.image == self.inner.image.manifest.key {
            return Ok((vm_extra, self.inner.image.clone()));
        }
        // An older image this build was made with: images are immutable and
        // sit side by side under images/.
        let dir = self
            .inner
            .image
            .dir
            .parent()
            .map(|p| p.join(&vm_extra.image))
            .unwrap_or_default();
        let image = blocking(move || Image::open(&dir).map_err(AgentError::Image)).await?;
        Ok((vm_extra, image))
    }

    /// QEMU's RAM file for `id`, holding `build`'s memory: a private,
    /// writable copy (QEMU writes guest memory into it).
    async fn materialize_memory(
        &self,
        id: &SandboxId,
        build: BuildId,
    ) -> Result<PathBuf, AgentError> {
        let path = self.memory_file(id);
        let store = self.inner.store.clone();
        let dst = path.clone();
        blocking(move || {
            let header = store
                .open_header(build, ImageKind::Memory)
                .map_err(AgentError::Store)?;
            let _ = std::fs::remove_file(&dst);
            let made = store.materialize(&header, ImageKind::Memory, &dst);
            if made.is_err() {
                let _ = std::fs::remove_file(&dst);
            }
            made.map_err(AgentError::Store)?;
            Ok(())
        })
        .await?;
        Ok(path)
    }

    /// Add the end of the guest's serial console to a failed start: the
    /// guest's last words are usually the diagnosis.
    fn with_console(&self, rt: &Runtime, e: AgentError) -> AgentError {
        let Some(dir) = &rt.run_dir else { return e };
        let tail = crate::runtime::tail_of(&dir.join("serial.log"));
        if tail.is_empty() {
            return e;
        }
        AgentError::StartFailed {
            console: tail,
            source: Box::new(e),
        }
    }

    fn guest_client(&self, rt: &Runtime, token: Option<&str>) -> GuestClient {
        let slot = rt.slot.as_ref().expect("slot");
        let client = GuestClient::new(slot.agent_addr());
        match token {
            Some(t) => client.with_token(t),
            None => client,
        }
    }

    /// Wait until the guest is up: its agent answers or, for test guests
    /// without one, the configured line reaches its serial console.
    async fn guest_up(
        &self,
        id: &SandboxId,
        rt: &Runtime,
        guest: &GuestClient,
        deadline: Instant,
    ) -> Result<(), AgentError> {
        match &self.inner.config.guest_readiness {
            GuestReadiness::Agent => {
                guest
                    .wait_ready(deadline)
                    .await
                    .map(|_| ())
                    .map_err(|source| AgentError::Guest {
                        id: id.clone(),
                        source,
                    })
            }
            GuestReadiness::Serial(text) => {
                let started = Instant::now();
                let log = rt.run_dir.as_ref().expect("run dir").join("serial.log");
                if crate::runtime::wait_for_serial(&log, text, deadline).await {
                    Ok(())
                } else {
                    Err(AgentError::SerialNotReady {
                        id: id.clone(),
                        text: text.clone(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
            }
        }
    }

    /// Wait for the guest agent, then give it the time, env, a fresh token
    /// and fresh entropy (forks of one snapshot must not share RNG state).
    async fn init_guest(
        &self,
        record: &SandboxRecord,
        rt: &Runtime,
        guest: &GuestClient,
        token: &str,
        env: &BTreeMap<String, String>,
        phases: &Phases,
    ) -> Result<(), AgentError> {
        let guest_err = |source| AgentError::Guest {
            id: record.id.clone(),
            source,
        };
        phases
            .time(
                "guest.ready",
                self.guest_up(&record.id, rt, guest, Instant::now() + GUEST_READY),
            )
            .await?;
        if self.inner.config.guest_readiness != GuestReadiness::Agent {
            return Ok(()); // a test guest: no agent to hand anything to
        }
        let entropy: [u8; 64] = {
            use rand::Rng;
            let mut b = [0u8; 64];
            rand::thread_rng().fill(&mut b[..]);
            b
        };
        let request = InitRequest {
            token: token.to_owned(),
            time_unix_ns: Some(unix_ns()),
            env: Some(env.clone()),
            entropy_b64: Some(bytes::Bytes::copy_from_slice(&entropy)),
            dns: None,
            hostname: None,
        };
        phases
            .time("guest.init", guest.init(&request))
            .await
            .map_err(guest_err)?;
        Ok(())
    }

    /// The sandbox's root disk layered over `build`'s root filesystem.
    async fn disk_for(
        &self,
        id: &SandboxId,
        build: BuildId,
        known_flat: Option<disk::LayerBase>,
    ) -> Result<DiskLayer, AgentError> {
        let dir = self.inner.records.sandbox_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
        let base = match known_flat {
            Some(f) => f,
            None => self.flat_rootfs(build).await?,
        };
        let format = self.inner.backend.strategy.disk;
        let store = self.inner.store.clone();
        blocking(move || match format {
            DiskFormat::Qcow2 => {
                let size = store
                    .open_header(build, ImageKind::Rootfs)
                    .map_err(AgentError::Store)?
                    .size();
                let overlay = dir.join("disk.qcow2");
                let _ = std::fs::remove_file(&overlay);
                ember_image::cow::qcow2_overlay(&base.path, base.format, size, &overlay)
                    .map_err(AgentError::Image)?;
                Ok(DiskLayer::Qcow2 {
                    overlay,
                    below: base.chain(),
                })
            }
            DiskFormat::Raw => {
                if base.format != DiskFormat::Raw {
                    return Err(AgentError::io(
                        format!("copy {} as a raw disk", base.path.display()),
                        std::io::Error::other(format!("a {} base is not raw", base.format)),
                    ));
                }
                let path = dir.join("disk.raw");
                let _ = std::fs::remove_file(&path);
                ember_image::cow::raw_copy(&base.path, &path).map_err(AgentError::Image)?;
                Ok(DiskLayer::Raw { path })
            }
        })
        .await
    }

    /// Make the template `build`'s disk base ready for its forks while its
    /// source VM is paused: a copy of the VM's qcow2 overlay (small), or on
    /// raw disks a flat copy made in the background, which forks arriving
    /// first wait for (they take the same per-build lock). Failing here
    /// costs only speed: the first fork then makes the base itself.
    async fn prepare_template_disk(&self, rt: &Runtime, build: BuildId, phases: &Phases) {
        let Some(disk) = rt.disk.clone() else { return };
        let data_dir = self.inner.config.data_dir.clone();
        let copy = blocking(move || disk::copy_as_cache(&data_dir, &disk, build));
        match phases.time("disk.cache", copy).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(build = %build, error = %chain(&e), "template disk not cached; its first fork will make it");
                return;
            }
        }
        let lock = self.flat_lock(build);
        let guard = lock.lock_owned().await;
        let agent = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            match agent.flat_rootfs_locked(build).await {
                Ok(_) => {
                    info!(build = %build, ms = started.elapsed().as_millis() as u64, "template disk ready for forks")
                }
                Err(e) => {
                    warn!(build = %build, error = %chain(&e), "template disk not cached; its first fork will make it")
                }
            }
            drop(guard);
        });
    }

    fn flat_lock(&self, build: BuildId) -> Arc<Mutex<()>> {
        self.inner
            .flat_locks
            .lock()
            .expect("flat locks")
            .entry(build)
            .or_default()
            .clone()
    }

    /// A read-only file holding `build`'s root filesystem for disk layers
    /// to sit on (see `disk`), with the format to read it in: cached, made
    /// once even when many sandboxes fork from the build at once.
    async fn flat_rootfs(&self, build: BuildId) -> Result<disk::LayerBase, AgentError> {
        if build == self.inner.base_build {
            return Ok(disk::LayerBase::raw(self.inner.image.rootfs.clone()));
        }
        let lock = self.flat_lock(build);
        let _guard = lock.lock().await;
        self.flat_rootfs_locked(build).await
    }

    /// [`Agent::flat_rootfs`] with `build`'s lock held.
    async fn flat_rootfs_locked(&self, build: BuildId) -> Result<disk::LayerBase, AgentError> {
        let data_dir = &self.inner.config.data_dir;
        let path = disk::flat_cache_path(data_dir, build);
        if let Some(cached) = disk::cached_base(data_dir, build) {
            // Firecracker needs raw files: it copies the cache either way.
            return Ok(cached);
        }
        let store = self.inner.store.clone();
        let dst = path.clone();
        blocking(move || disk::materialize_flat(&store, build, &dst)).await?;
        Ok(disk::LayerBase::raw(path))
    }

    // ------------------------------------------------------------ snapshots

    /// Pause the VM, write its memory, disk and device state as a new build
    /// that is a diff of `record.build`, and leave the VM paused. On failure
    /// the VM is resumed and nothing of the build is left.
    ///
    /// The new build's ID is the record's `pending_build` from before the
    /// build is begun until the caller records the outcome (and clears it):
    /// gc keeps it meanwhile, and a restarted agent knows what to finish.
    async fn snapshot_build(
        &self,
        entry: &Entry,
        record: &SandboxRecord,
        rt: &Runtime,
        phases: &Phases,
    ) -> Result<(BuildId, ember_snapshot::BuildMeta), AgentError> {
        let vm = rt.vm.as_ref().expect("running sandbox has a VM");
        let id = &record.id;
        phases
            .time("vmm.pause", vm.pause())
            .await
            .map_err(|e| AgentError::operation(id, "pause vCPUs", e))?;
        let result = self.write_build(entry, record, rt, phases).await;
        if result.is_err()
            && let Err(e) = self.update(entry, |r| r.pending_build = None)
        {
            warn!(sandbox = %id, error = %chain(&e), "could not clear a failed build's intent; gc keeps it until the next pause");
        }
        if result.is_err()
            && let Err(e) = vm.resume().await
        {
            warn!(sandbox = %id, error = %e, "could not resume the VM after a failed snapshot");
        }
        result
    }

    async fn write_build(
        &self,
        entry: &Entry,
        record: &SandboxRecord,
        rt: &Runtime,
        phases: &Phases,
    ) -> Result<(BuildId, ember_snapshot::BuildMeta), AgentError> {
        let id = &record.id;
        let vm = rt.vm.as_ref().expect("VM");
        let work = self.inner.records.sandbox_dir(id).join("snapshot.tmp");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .map_err(|e| AgentError::io(format!("create {}", work.display()), e))?;
        let parent = record.build;
        let kind = self.inner.backend.strategy.snapshot_kind(parent);
        let request = SnapshotRequest {
            kind,
            vmstate: work.join("vmstate"),
            memory: work.join("memory"),
        };
        let out = phases
            .time("vmm.snapshot", vm.snapshot(&request))
            .await
            .map_err(|e| AgentError::operation(id, "snapshot", e))?;
        let build_id = BuildId::new();
        // Intent before commit: synced to disk before the build can exist.
        let intent_started = Instant::now();
        self.update(entry, |r| r.pending_build = Some(build_id))?;
        phases.record("intent", intent_started.elapsed());
        let extra = BuildVm {
            image: record.image.clone(),
            kernel_args: rt
                .launch
                .as_ref()
                .map(|l| l.config.kernel_args.clone())
                .unwrap_or_default(),
            guest_token: record.guest_token.clone(),
            source_sandbox: id.clone(),
        };
        let info = BuildInfo {
            parent,
            vm: Some(VmInfo {
                backend: self.inner.backend.kind,
                vmm_version: self.inner.backend.version.clone(),
                vcpus: record.vcpus,
                memory_mib: u64::from(record.memory_mib),
                kernel: record.image.clone(),
                page_size: PAGE_SIZE,
            }),
            image: Some(record.image.clone()),
            extra: [(
                "ember".to_owned(),
                serde_json::to_value(&extra).expect("BuildVm serialises"),
            )]
            .into_iter()
            .collect(),
        };
        let store = self.inner.store.clone();
        let base_build = self.inner.base_build;
        let disk = rt.disk.clone().expect("disk");
        let confinement = rt.launch.as_ref().and_then(|l| l.confinement.clone());
        let started = Instant::now();
        let work2 = work.clone();
        let result = phases
            .time(
                "build.write",
                blocking(move || {
                    let mut w = store.begin(build_id, info).map_err(AgentError::Store)?;
                    let mem_parent = match parent {
                        Some(p) if store.header_path(p, ImageKind::Memory).exists() => Some(
                            store
                                .open_header(p, ImageKind::Memory)
                                .map_err(AgentError::Store)?,
                        ),
                        _ => None,
                    };
                    let mem_base = match &mem_parent {
                        Some(h) => Base::Parent(h),
                        None => Base::Fresh {
                            block_size: PAGE_SIZE,
                        },
                    };
                    let mem = match &out.memory {
                        MemoryDump::Full(p) => {
                            w.write_image_from_full(ImageKind::Memory, mem_base, p)
                        }
                        MemoryDump::DirtyOnly(p) => {
                            w.write_image_from_sparse(ImageKind::Memory, mem_base, p)
                        }
                    }
                    .map_err(AgentError::Store)?;
                    let disk_parent_build = parent.unwrap_or(base_build);
                    let disk_parent = store
                        .open_header(disk_parent_build, ImageKind::Rootfs)
                        .map_err(AgentError::Store)?;
                    let disk_report = disk::write_disk_diff(
                        &store,
                        &mut w,
                        &disk,
                        &disk_parent,
                        confinement.as_ref(),
                    )?;
                    let vmstate = std::fs::File::open(&out.vmstate).map_err(|e| {
                        AgentError::io(format!("open {}", out.vmstate.display()), e)
                    })?;
                    w.write_vmstate(vmstate).map_err(AgentError::Store)?;
                    let meta = w.commit().map_err(AgentError::Store)?;
                    info!(
                        build = %build_id,
                        memory_written = mem.bytes_written,
                        memory_size = mem.image_size,
                        disk_written = disk_report.bytes_written,
                        disk_size = disk_report.image_size,
                        "build written"
                    );
                    Ok(meta)
                }),
            )
            .await;
        let _ = std::fs::remove_dir_all(&work2);
        let meta = result?;
        info!(sandbox = %id, build = %build_id, ms = started.elapsed().as_millis() as u64, "snapshot stored");
        Ok((build_id, meta))
    }

    // ------------------------------------------------------------ pause / resume

    pub async fn pause(&self, id: &SandboxId) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        self.begin(&entry, Operation::Pause)?;
        let started = Instant::now();
        let mut runtime = entry.runtime.lock().await;
        let record = entry.record();
        let rt = runtime.as_ref().expect("running sandbox has a runtime");
        let phases = Phases::new();
        let outcome = match self.snapshot_build(&entry, &record, rt, &phases).await {
            // A crash here leaves a committed build and a paused VM: the
            // restarted agent finishes the pause from the record's intent.
            Ok((build, _)) => match crate::failpoint::hit("pause.committed").await {
                Ok(()) => Ok(build),
                Err(e) => {
                    let _ = self.update(&entry, |r| r.pending_build = None);
                    if let Some(vm) = &rt.vm {
                        let _ = vm.resume().await;
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(build) => {
                let mut rt = runtime.take().expect("runtime");
                drop(runtime);
                // Stop the VM first so its disk is quiet, then keep the disk
                // as the new build's rootfs cache: the resume needs no copy.
                if let Some(vm) = &rt.vm {
                    let _ = phases.time("vmm.kill", vm.kill()).await;
                }
                // What the guest touched since its restore is what the
                // resume of the new build prefetches.
                if let Some(ps) = rt.page_server.take() {
                    phases.time("page_server.stop", ps.stop()).await;
                    ps.file_working_set_into(
                        &self
                            .inner
                            .store
                            .build_dir(build)
                            .join(crate::runtime::WORKING_SET),
                    );
                }
                if let Some(d) = &rt.disk
                    && let Err(e) = disk::keep_as_cache(&self.inner.config.data_dir, d, build)
                {
                    warn!(sandbox = %id, error = %chain(&e), "disk not kept as cache; a resume will copy it");
                }
                let problems = phases.time("teardown", rt.teardown()).await;
                if !problems.is_empty() {
                    warn!(sandbox = %id, ?problems, "pause released resources with problems");
                }
                self.release(record.vcpus, record.memory_mib);
                self.inner.metrics.pauses.fetch_add(1, Ordering::Relaxed);
                let stored = self.build_sizes(build).await.0;
                let ms = started.elapsed().as_millis() as u64;
                let timing = phases.finish(started.elapsed());
                let rec = self.update(&entry, |r| {
                    r.state = SandboxState::Paused;
                    r.build = Some(build);
                    r.build_stored_bytes = stored;
                    r.pending_build = None;
                    r.runtime = None;
                    r.last_operation_ms = ms;
                    r.last_operation_phases = timing;
                })?;
                info!(sandbox = %id, build = %build, ms, "paused");
                // Off the pause's critical path: the answer does not wait
                // for the parent builds this one made unreferenced.
                let agent = self.clone();
                tokio::spawn(async move { agent.collect_garbage().await });
                Ok(rec)
            }
            Err(e) => {
                let alive = rt.vm.as_ref().is_some_and(|vm| vm.exit_status().is_none());
                drop(runtime);
                let reason = chain(&e);
                if alive {
                    warn!(sandbox = %id, error = %reason, "pause failed; the sandbox keeps running");
                    self.update(&entry, |r| r.state = SandboxState::Running)?;
                } else {
                    self.fail(&entry, format!("pause failed and the VM is gone: {reason}"))
                        .await?;
                }
                Err(e)
            }
        }
    }

    pub async fn resume(
        &self,
        id: &SandboxId,
        env: BTreeMap<String, String>,
        new_token: Option<String>,
        ingress: Option<IngressRecord>,
        network: Option<EgressPolicy>,
    ) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        self.begin(&entry, Operation::Resume)?;
        let mut record = entry.record();
        // The slot is made with the rules it resumes under; they are
        // recorded only once it runs (a failed resume keeps the old ones).
        if let Some(n) = &network {
            record.network = n.clone();
        }
        let admitted = self
            .check_pressure(self.expected_use_mib(record.memory_mib, record.build))
            .and_then(|()| self.reserve(record.vcpus, record.memory_mib));
        if let Err(e) = admitted {
            self.update(&entry, |r| r.state = SandboxState::Paused)?;
            return Err(e);
        }
        let build = record.build.expect("a paused sandbox has a build");
        let token = new_token.unwrap_or_else(random_token);
        let mut merged_env = record.env.clone();
        merged_env.extend(env);
        let started = Instant::now();
        let phases = Phases::new();
        match self
            .start_from_build(&record, build, &token, &merged_env, &phases)
            .await
        {
            Ok(rt) => {
                let rt_record = runtime_record(&rt);
                *entry.runtime.lock().await = Some(rt);
                self.inner.metrics.resumes.fetch_add(1, Ordering::Relaxed);
                let ms = started.elapsed().as_millis() as u64;
                info!(sandbox = %id, ms, "resumed");
                let timing = phases.finish(started.elapsed());
                self.update(&entry, |r| {
                    r.state = SandboxState::Running;
                    r.runtime = Some(rt_record);
                    r.guest_token = token;
                    r.env = merged_env;
                    if let Some(ingress) = ingress {
                        r.ingress = ingress;
                    }
                    if let Some(network) = network {
                        r.network = network;
                    }
                    r.last_operation_ms = ms;
                    r.last_operation_phases = timing;
                    r.failure_reason = None;
                })
            }
            Err(e) => {
                self.release(record.vcpus, record.memory_mib);
                let reason = chain(&e);
                warn!(sandbox = %id, error = %reason, "resume failed; the sandbox stays paused");
                // The build is untouched: the sandbox stays paused and a
                // later resume (after fixing the cause) may succeed.
                self.update(&entry, |r| {
                    r.state = SandboxState::Paused;
                    r.failure_reason = Some(format!("last resume failed: {reason}"));
                })?;
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------ templates

    /// Freeze a running sandbox into a template build; it keeps running.
    pub async fn create_snapshot(&self, id: &SandboxId) -> Result<TemplateRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        self.begin(&entry, Operation::Snapshot)?;
        let record = entry.record();
        let runtime = entry.runtime.lock().await;
        let rt = runtime.as_ref().expect("running sandbox has a runtime");
        let phases = Phases::new();
        let result = self.snapshot_build(&entry, &record, rt, &phases).await;
        let outcome = match result {
            Ok((build, _)) => {
                // Ready to fork now, not at the first fork: the disk the
                // VM is paused on is the template's root filesystem.
                self.prepare_template_disk(rt, build, &phases).await;
                // A crash here leaves a committed build no template names:
                // the restarted agent discards it (the caller saw an error).
                let vm = rt.vm.as_ref().expect("VM");
                if let Err(e) = crate::failpoint::hit("snapshot.committed").await {
                    let _ = self.update(&entry, |r| r.pending_build = None);
                    let _ = vm.resume().await;
                    Err((None, e))
                } else {
                    match vm.resume().await {
                        Ok(()) => Ok(build),
                        Err(e) => Err((
                            Some(build),
                            AgentError::operation(id, "resume after snapshot", e),
                        )),
                    }
                }
            }
            Err(e) => Err((None, e)),
        };
        drop(runtime);
        match outcome {
            Ok(build) => {
                let template = TemplateRecord {
                    build,
                    vcpus: record.vcpus,
                    memory_mib: record.memory_mib,
                    source_sandbox: id.clone(),
                    created_at: now_rfc3339(),
                };
                self.inner.records.save_template(&template)?;
                // The running VM now descends from the template: its next
                // pause is a diff of it.
                self.update(&entry, |r| {
                    r.state = SandboxState::Running;
                    r.build = Some(build);
                    r.pending_build = None;
                })?;
                info!(sandbox = %id, build = %build, "template created");
                Ok(template)
            }
            Err((build, e)) => {
                if let Some(b) = build {
                    // No template names the build: gc removes it.
                    warn!(sandbox = %id, build = %b, "snapshot written but the VM did not resume");
                    let _ = self.update(&entry, |r| r.pending_build = None);
                }
                let alive = {
                    let runtime = entry.runtime.lock().await;
                    runtime
                        .as_ref()
                        .and_then(|rt| rt.vm.as_ref())
                        .is_some_and(|vm| vm.exit_status().is_none())
                };
                if alive {
                    self.update(&entry, |r| r.state = SandboxState::Running)?;
                } else {
                    self.fail(
                        &entry,
                        format!("snapshot failed and the VM is gone: {}", chain(&e)),
                    )
                    .await?;
                }
                Err(e)
            }
        }
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>, AgentError> {
        self.inner.records.templates()
    }

    /// Forget a template. Its data stays while paused sandboxes or other
    /// builds still reference it; returns whether it was freed now.
    pub async fn delete_snapshot(&self, build: BuildId) -> Result<bool, AgentError> {
        if !self.inner.records.remove_template(&build)? {
            return Err(AgentError::BuildNotFound(build));
        }
        self.collect_garbage().await;
        Ok(!self.inner.store.exists(build))
    }

    // ------------------------------------------------------------ destroy

    pub async fn destroy(&self, id: &SandboxId) -> Result<(), AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let from = self.begin(&entry, Operation::Destroy)?;
        if let Some(rt) = entry.runtime.lock().await.take() {
            let problems = rt.teardown().await;
            if !problems.is_empty() {
                warn!(sandbox = %id, ?problems, "destroy released resources with problems");
            }
        }
        let record = entry.record();
        if from.holds_vm() {
            self.release(record.vcpus, record.memory_mib);
        }
        self.inner.records.remove(id)?;
        self.remove_entry(id);
        info!(sandbox = %id, "destroyed");
        self.collect_garbage().await;
        Ok(())
    }

    /// Mark a sandbox failed and free whatever it held.
    pub(crate) async fn fail(&self, entry: &Entry, reason: String) -> Result<(), AgentError> {
        error!(sandbox = %entry.id, %reason, "sandbox failed");
        let held = entry.state().holds_vm();
        if let Some(rt) = entry.runtime.lock().await.take() {
            rt.teardown().await;
        }
        let rec = self.update(entry, |r| {
            r.state = SandboxState::Failed;
            r.failure_reason = Some(reason);
            r.runtime = None;
            r.pending_build = None;
        })?;
        if held {
            self.release(rec.vcpus, rec.memory_mib);
        }
        Ok(())
    }

    /// Notice VMs that died on their own: each becomes failed with the
    /// VMM's exit status and the end of its console, and its resources go.
    pub async fn check_vms(&self) {
        let entries = self.entries();
        for entry in entries {
            // Only look at settled running sandboxes; an operation in
            // progress owns the runtime and reports its own failures.
            let Ok(_op) = entry.op.try_lock() else {
                continue;
            };
            if entry.state() != SandboxState::Running {
                continue;
            }
            let (exited, page_server_gone, run_dir) = {
                let runtime = entry.runtime.lock().await;
                let Some(rt) = runtime.as_ref() else { continue };
                (
                    rt.vm.as_ref().and_then(|vm| vm.exit_status()),
                    rt.page_server
                        .as_ref()
                        .filter(|ps| !crate::runtime::pid_alive(ps.pid))
                        .map(|ps| ps.pid),
                    rt.run_dir.clone(),
                )
            };
            let tail = |file: &str| {
                run_dir
                    .as_ref()
                    .map(|d| crate::runtime::tail_of(&d.join(file)))
                    .unwrap_or_default()
            };
            if let Some(status) = exited {
                let console = tail("serial.log");
                let _ = self
                    .fail(&entry, format!("VMM exited ({status}); console: {console}"))
                    .await;
            } else if let Some(pid) = page_server_gone {
                // Nothing can serve the guest's missing pages any more: its
                // next fault would hang a vCPU for ever. Stop it now.
                let log = tail("page-server.log");
                let _ = self
                    .fail(
                        &entry,
                        format!(
                            "page server (pid {pid}) exited, so the guest's memory could no \
                             longer be served and its VM was stopped; page server log: {log}"
                        ),
                    )
                    .await;
            }
        }
    }

    /// Page faults served, pages prefetched and bytes copied by this host's
    /// page servers: those that ended, and the live ones (asked now).
    pub async fn page_server_metrics(&self) -> (u64, u64, u64) {
        let (mut faults, mut prefetched, mut bytes) = self.inner.metrics.page_servers.snapshot();
        for entry in self.entries() {
            // A runtime busy with an operation is skipped, never waited for.
            let socket = match entry.runtime.try_lock() {
                Ok(rt) => rt
                    .as_ref()
                    .and_then(|rt| rt.page_server.as_ref())
                    .map(|ps| ps.control_socket.clone()),
                Err(_) => None,
            };
            let Some(socket) = socket else { continue };
            if let Some(m) = PageServer::metrics_at(socket).await {
                faults += m.faults;
                prefetched += m.pages_prefetched;
                bytes += m.bytes_copied;
            }
        }
        (faults, prefetched, bytes)
    }

    /// What the page server of `id`'s VM has served, if it has one.
    pub async fn page_server_of(
        &self,
        id: &SandboxId,
    ) -> Option<ember_uffd::metrics::MetricsSnapshot> {
        let entry = self.entry(id).ok()?;
        let socket = {
            let runtime = entry.runtime.lock().await;
            runtime
                .as_ref()?
                .page_server
                .as_ref()?
                .control_socket
                .clone()
        };
        PageServer::metrics_at(socket).await
    }

    /// Network slots this host can still hand out.
    pub fn slots_free(&self) -> u32 {
        let held = self.list().iter().filter(|r| r.state.holds_vm()).count() as u32;
        self.inner.slots.layout().capacity().saturating_sub(held)
    }

    // ------------------------------------------------------------ usage

    /// Sample every running sandbox's use (called every
    /// [`crate::usage::INTERVAL`]); a sandbox busy with an operation is
    /// skipped this round.
    pub async fn sample_usage(&self) {
        let entries = self.entries();
        for entry in entries {
            if entry.state() != SandboxState::Running {
                entry.usage.lock().expect("usage lock").clear();
                continue;
            }
            let Ok(runtime) = entry.runtime.try_lock() else {
                continue;
            };
            let Some(rt) = runtime.as_ref() else { continue };
            let previous = entry.usage.lock().expect("usage lock").last().copied();
            let sample = crate::usage::sample(
                rt.cgroup.as_ref(),
                rt.disk.as_ref().map(|d| d.path()),
                rt.slot.as_ref().map(|s| s.plan().host_link.name.as_str()),
                previous.as_ref(),
            );
            drop(runtime);
            entry.usage.lock().expect("usage lock").push(sample);
        }
    }

    /// A running sandbox's recent samples, oldest first (one is taken now
    /// if none was yet).
    pub async fn usage_of(&self, id: &SandboxId) -> Result<Vec<crate::usage::Sample>, AgentError> {
        let entry = self.entry(id)?;
        let state = entry.state();
        if state != SandboxState::Running {
            return Err(AgentError::IllegalTransition {
                id: id.clone(),
                operation: "read the metrics of",
                state: state.to_string(),
            });
        }
        if entry.usage.lock().expect("usage lock").last().is_none() {
            let runtime = entry.runtime.lock().await;
            if let Some(rt) = runtime.as_ref() {
                let sample = crate::usage::sample(
                    rt.cgroup.as_ref(),
                    rt.disk.as_ref().map(|d| d.path()),
                    rt.slot.as_ref().map(|s| s.plan().host_link.name.as_str()),
                    None,
                );
                entry.usage.lock().expect("usage lock").push(sample);
            }
        }
        Ok(entry.usage.lock().expect("usage lock").samples())
    }

    /// Sums over the running sandboxes' latest samples.
    pub fn usage_totals(&self) -> crate::usage::Sample {
        let entries = self.entries();
        let mut total = crate::usage::Sample::default();
        for e in entries {
            if let Some(s) = e.usage.lock().expect("usage lock").last() {
                total.cpu_percent += s.cpu_percent;
                total.memory_bytes += s.memory_bytes;
                total.disk_bytes += s.disk_bytes;
                total.net_rx_bytes += s.net_rx_bytes;
                total.net_tx_bytes += s.net_tx_bytes;
            }
        }
        total
    }

    // ------------------------------------------------------------ garbage

    /// Builds something still needs: templates, every sandbox's build and
    /// source, and the base image.
    fn live_builds(&self) -> Vec<BuildId> {
        let mut roots = vec![self.inner.base_build];
        for r in self.list() {
            roots.extend(r.build);
            roots.extend(r.source_build);
            roots.extend(r.pending_build);
            if let Some(rt) = &r.runtime {
                roots.extend(rt.restored_from);
            }
        }
        if let Ok(t) = self.inner.records.templates() {
            roots.extend(t.into_iter().map(|t| t.build));
        }
        let warm = self.inner.records.warm(&self.inner.image.manifest.key);
        roots.extend(warm.into_iter().map(|w| w.build));
        roots
    }

    /// Delete builds nothing needs. The roots are read under the store's
    /// gc lock, so a build committed by a concurrent pause or snapshot is
    /// either still being written (gc waits for another turn) or already
    /// named by its sandbox's `pending_build`.
    pub async fn collect_garbage(&self) {
        let agent = self.clone();
        let store = self.inner.store.clone();
        let data_dir = self.inner.config.data_dir.clone();
        let result = blocking(move || {
            let report = store
                .gc_with(|| agent.live_builds())
                .map_err(AgentError::Store)?;
            disk::remove_caches(&data_dir, &report.deleted);
            Ok(report)
        })
        .await;
        match result {
            Ok(report) if !report.deleted.is_empty() => {
                info!(deleted = ?report.deleted, "unreferenced builds deleted")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %chain(&e), "build garbage collection skipped"),
        }
    }

    /// The guest client of a running sandbox, for exec and file calls.
    pub async fn guest(&self, id: &SandboxId) -> Result<GuestClient, AgentError> {
        let entry = self.entry(id)?;
        if self.inner.config.guest_readiness != GuestReadiness::Agent {
            return Err(AgentError::NoGuestAgent(id.clone()));
        }
        let state = entry.state();
        if Operation::Guest.enter(state).is_none() {
            return Err(AgentError::IllegalTransition {
                id: id.clone(),
                operation: Operation::Guest.as_str(),
                state: state.to_string(),
            });
        }
        let runtime = entry.runtime.lock().await;
        runtime
            .as_ref()
            .and_then(|rt| rt.guest.clone())
            .ok_or_else(|| AgentError::IllegalTransition {
                id: id.clone(),
                operation: Operation::Guest.as_str(),
                state: entry.state().to_string(),
            })
    }

    /// Where this host reaches `port` of a running sandbox's guest: its
    /// slot address, which the slot's namespace forwards to the guest.
    /// Works whether or not the guest runs Ember's agent.
    pub async fn guest_port(&self, id: &SandboxId, port: u16) -> Result<SocketAddr, AgentError> {
        let entry = self.entry(id)?;
        let not_running = || AgentError::IllegalTransition {
            id: id.clone(),
            operation: "port access",
            state: entry.state().to_string(),
        };
        if Operation::Guest.enter(entry.state()).is_none() {
            return Err(not_running());
        }
        let runtime = entry.runtime.lock().await;
        runtime
            .as_ref()
            .and_then(|rt| rt.slot.as_ref())
            .map(|slot| slot.guest_addr(port))
            .ok_or_else(not_running)
    }

    /// Who may reach a sandbox's ports through this host's ingress.
    pub fn set_ingress(
        &self,
        id: &SandboxId,
        ingress: IngressRecord,
    ) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(id)?;
        self.update(&entry, |r| r.ingress = ingress)
    }

    /// A running sandbox's port access and where its guest's `port` is,
    /// for this host's ingress.
    pub async fn ingress_target(
        &self,
        id: &SandboxId,
        port: u16,
    ) -> Result<(IngressRecord, SocketAddr), AgentError> {
        let entry = self.entry(id)?;
        let ingress = entry.record().ingress;
        let addr = self.guest_port(id, port).await?;
        Ok((ingress, addr))
    }

    /// A request reached `id` through this host's ingress: activity.
    pub fn note_traffic(&self, id: &SandboxId) {
        if let Ok(entry) = self.entry(id) {
            entry
                .last_traffic_ms
                .store(now_unix_ms(), Ordering::Relaxed);
        }
    }

    /// When this host's ingress last carried a request to `id` (0: never).
    pub fn last_traffic_ms(&self, id: &SandboxId) -> u64 {
        self.entry(id)
            .map(|e| e.last_traffic_ms.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub async fn set_network_policy(
        &self,
        id: &SandboxId,
        policy: EgressPolicy,
    ) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let mut runtime = entry.runtime.lock().await;
        if let Some(slot) = runtime.as_mut().and_then(|rt| rt.slot.take()) {
            let p = policy.clone();
            let (slot, result) = blocking(move || {
                let mut slot = slot;
                let r = slot.set_policy(p);
                Ok((slot, r))
            })
            .await?;
            runtime.as_mut().expect("runtime").slot = Some(slot);
            result.map_err(AgentError::Net)?;
        }
        drop(runtime);
        self.update(&entry, |r| r.network = policy)
    }

    /// Stop serving but leave every VM running for the next agent.
    pub async fn detach_all(&self) {
        let entries = self.entries();
        for entry in entries {
            let _op = entry.op.lock().await;
            if let Some(rt) = entry.runtime.lock().await.take() {
                rt.detach();
            }
        }
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Builds stored on this host.
    pub async fn builds_on_disk(&self) -> Vec<BuildId> {
        let store = self.inner.store.clone();
        blocking(move || store.list().map_err(AgentError::Store))
            .await
            .unwrap_or_default()
    }

    /// What the control plane shows about a template build.
    pub async fn snapshot_info(&self, t: &TemplateRecord) -> ember_proto::host::Snapshot {
        let sizes = self.build_sizes(t.build).await;
        ember_proto::host::Snapshot {
            build_id: t.build.to_string(),
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            stored_bytes: sizes.0,
            memory_bytes: sizes.1,
            disk_bytes: sizes.2,
            source_sandbox_id: t.source_sandbox.to_string(),
            created_at: t.created_at.clone(),
        }
    }

    /// Build `build`'s sizes: (bytes its own files take, memory size,
    /// disk size); zeros where they cannot be read.
    async fn build_sizes(&self, build: BuildId) -> (u64, u64, u64) {
        let store = self.inner.store.clone();
        blocking(move || {
            let meta = store.read_meta(build).map_err(AgentError::Store)?;
            let stored: u64 = meta.files.values().map(|f| f.size).sum();
            let mem = store
                .open_header(build, ImageKind::Memory)
                .map(|h| h.size())
                .unwrap_or(0);
            let disk = store
                .open_header(build, ImageKind::Rootfs)
                .map(|h| h.size())
                .unwrap_or(0);
            Ok((stored, mem, disk))
        })
        .await
        .unwrap_or((0, 0, 0))
    }
}

pub(crate) fn runtime_record(rt: &Runtime) -> RuntimeRecord {
    RuntimeRecord {
        slot: rt.slot.as_ref().map_or(0, |s| s.index()),
        vmm_pid: rt.vm.as_ref().map_or(0, |v| v.pid()),
        page_server_pid: rt.page_server.as_ref().map(|p| p.pid),
        launch: rt.launch.clone().expect("a started runtime has a launch"),
        restored_from: None,
        cgroup: rt.cgroup.clone(),
    }
}

async fn ensure_image(config: &AgentConfig) -> Result<Image, AgentError> {
    if let Some(dir) = config.image_dir.clone() {
        return blocking(move || Image::open(&dir).map_err(AgentError::Image)).await;
    }
    let data = config.data_dir.clone();
    let guest_bin = config.guest_bin.clone();
    blocking(move || {
        let spec = match guest_bin {
            Some(bin) => ember_image::ImageSpec::new(bin),
            None => ember_image::ImageSpec::default(),
        };
        let mut log = |p: ember_image::Progress| info!(progress = ?p, "guest image");
        Image::ensure(&data, &spec, &mut log).map_err(AgentError::Image)
    })
    .await
}

/// The image's root filesystem as build `uuid5(image key)` (deterministic,
/// so every agent on every host agrees on it).
async fn import_base_image(store: &BuildStore, image: &Image) -> Result<BuildId, AgentError> {
    import_rootfs_build(store, &image.manifest.key, &image.rootfs).await
}

/// A root filesystem file as a disk-only build, named by `key` (made once;
/// later calls find it).
async fn import_rootfs_build(
    store: &BuildStore,
    key: &str,
    rootfs: &Path,
) -> Result<BuildId, AgentError> {
    // Two creates from the same new image must not both write its build.
    static IMPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _importing = IMPORTING.lock().await;
    let id = base_build_id(key);
    if store.exists(id) {
        return Ok(id);
    }
    let store = store.clone();
    let rootfs = rootfs.to_owned();
    let key = key.to_owned();
    blocking(move || {
        let started = Instant::now();
        let mut w = store
            .begin(
                id,
                BuildInfo {
                    image: Some(key),
                    ..BuildInfo::default()
                },
            )
            .map_err(AgentError::Store)?;
        w.link_image(ImageKind::Rootfs, DISK_BLOCK, &rootfs)
            .map_err(AgentError::Store)?;
        w.commit().map_err(AgentError::Store)?;
        info!(build = %id, ms = started.elapsed().as_millis() as u64, "base image imported");
        Ok(id)
    })
    .await
}

pub fn base_build_id(image_key: &str) -> BuildId {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_2b7e_4d3a_4e59_9b1f_0c8d_2a5e_7f31);
    BuildId(uuid::Uuid::new_v5(&NAMESPACE, image_key.as_bytes()))
}
