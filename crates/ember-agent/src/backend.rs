//! Choosing the VMM backend for this host, and the facts about it that
//! builds record.

use std::sync::Arc;

use ember_types::BackendKind;
use ember_vmm::Vmm;
use ember_vmm::firecracker::jailer::JailerConfig;
use ember_vmm::firecracker::{FirecrackerConfig, FirecrackerVmm};
use ember_vmm::qemu::accel::HostFacts;
use ember_vmm::qemu::{Accel, AccelChoice, Qemu};

use crate::config::{AgentConfig, BackendChoice};
use crate::error::AgentError;

/// The backend an agent drives, with a sentence saying why it was chosen.
#[derive(Debug, Clone)]
pub struct Backend {
    pub vmm: Arc<dyn Vmm>,
    pub kind: BackendKind,
    pub detail: String,
    pub version: String,
    /// What separates a guest from the host: hardware virtualisation, or
    /// none worth the name.
    pub isolation: Isolation,
    /// How this backend's VMs hold memory and disks, and what their
    /// snapshots hold: the one place the lifecycle asks.
    pub strategy: Strategy,
}

/// The choices that differ between backends, made once per backend so the
/// lifecycle (create, pause, resume, fork) reads the same for all of them;
/// a new backend is a new [`Strategy::of`] arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    pub memory: MemoryKind,
    /// The format of each sandbox's own root disk layer.
    pub disk: ember_types::DiskFormat,
    /// A VM restored from a build snapshots only the pages dirtied since
    /// (a `Diff` build over that build); otherwise every snapshot is Full.
    pub diff_snapshots: bool,
}

/// Where a backend's guest memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// A file the agent makes in the memory directory (QEMU's
    /// `memory-backend-file`): a restore materialises the build's memory
    /// into it, and the memory file system's size caps the host's capacity
    /// (a guest whose RAM file cannot grow dies of SIGBUS).
    RamFile,
    /// Anonymous memory in the VMM, restored lazily through a userfaultfd
    /// page server the agent starts (Firecracker's `Uffd` backend).
    PageServer,
}

impl Strategy {
    pub fn of(kind: BackendKind) -> Strategy {
        match kind {
            // qcow2 overlays share the base; QEMU's snapshots hold all of
            // RAM (its RAM file), so each pause is Full.
            BackendKind::Qemu => Strategy {
                memory: MemoryKind::RamFile,
                disk: ember_types::DiskFormat::Qcow2,
                diff_snapshots: false,
            },
            // Firecracker opens raw files only; KVM's dirty log makes
            // Diff snapshots of restored VMs.
            BackendKind::Firecracker => Strategy {
                memory: MemoryKind::PageServer,
                disk: ember_types::DiskFormat::Raw,
                diff_snapshots: true,
            },
        }
    }

    /// The kind of snapshot a VM descended from `parent` takes.
    pub fn snapshot_kind(self, parent: Option<ember_types::BuildId>) -> ember_vmm::SnapshotKind {
        match parent {
            Some(_) if self.diff_snapshots => ember_vmm::SnapshotKind::Diff,
            _ => ember_vmm::SnapshotKind::Full,
        }
    }
}

/// What a guest escape has to break through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// KVM: the guest runs in hardware virtualisation.
    Kvm,
    /// QEMU's TCG: the guest is emulated in the VMM's own address space.
    /// A bug in QEMU's emulation is a way out; the jail, uid and cgroup
    /// around the VMM are all that remain. Not a security boundary.
    Tcg,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Kvm => "kvm",
            Isolation::Tcg => "tcg",
        }
    }

    /// For people: says plainly when it is no boundary.
    pub fn describe(self) -> &'static str {
        match self {
            Isolation::Kvm => "kvm",
            Isolation::Tcg => "tcg — not a security boundary",
        }
    }
}

/// Firecracker needs a binary and a KVM that can run a stock Linux guest;
/// everything else gets QEMU, which picks KVM or TCG itself.
pub async fn choose(config: &AgentConfig) -> Result<Backend, AgentError> {
    // The same test QEMU uses to pick KVM over TCG: if QEMU would not trust
    // KVM with a Linux guest, neither can Firecracker.
    let kvm_runs_linux = ember_vmm::qemu::accel::decide(AccelChoice::Auto, None, HostFacts::probe)
        .is_ok_and(|d| d.accel == Accel::Kvm);
    let fc_bin = config.firecracker_bin.clone().filter(|p| p.is_file());
    let (kind, detail) = match config.backend {
        BackendChoice::Firecracker => (BackendKind::Firecracker, "configured".to_owned()),
        BackendChoice::Qemu => (BackendKind::Qemu, "configured".to_owned()),
        BackendChoice::Auto => match (&fc_bin, kvm_runs_linux) {
            (Some(bin), true) => (
                BackendKind::Firecracker,
                format!("Firecracker binary {} and a usable KVM", bin.display()),
            ),
            (Some(_), false) => (
                BackendKind::Qemu,
                "a Firecracker binary exists but KVM cannot run stock Linux guests here".to_owned(),
            ),
            (None, _) => (
                BackendKind::Qemu,
                "no Firecracker binary configured".to_owned(),
            ),
        },
    };
    let binary = match kind {
        BackendKind::Qemu => Some(config.qemu.binary.clone()),
        BackendKind::Firecracker => config.firecracker_bin.clone(),
    };
    crate::preflight::check(kind, binary.as_deref())?;
    let (vmm, isolation): (Arc<dyn Vmm>, Isolation) = match kind {
        BackendKind::Firecracker => {
            let jailer = match &config.jailer_bin {
                Some(bin) => {
                    if !bin.is_file() {
                        return Err(AgentError::InvalidArgument(format!(
                            "jailer {} does not exist: build Firecracker's jailer or drop \
                             --jailer-bin",
                            bin.display()
                        )));
                    }
                    let base = config.run_dir.join("jailer");
                    crate::confine::private_dir(&base)?;
                    // The VM's uid must reach its jail under the base.
                    std::fs::set_permissions(
                        &base,
                        std::os::unix::fs::PermissionsExt::from_mode(0o711),
                    )
                    .map_err(|e| AgentError::io(format!("chmod {}", base.display()), e))?;
                    // Every confined launch overrides the uid with its sandbox's.
                    let mut j =
                        JailerConfig::new(bin, config.confine.uid_base, config.confine.uid_base);
                    j.chroot_base = base;
                    Some(j)
                }
                None => None,
            };
            let fc = FirecrackerConfig {
                binary: fc_bin.or_else(|| config.firecracker_bin.clone()),
                jailer,
                ..FirecrackerConfig::default()
            };
            (Arc::new(FirecrackerVmm::new(fc)), Isolation::Kvm)
        }
        BackendKind::Qemu => {
            let qemu = Qemu::new(config.qemu.clone()).map_err(|e| AgentError::Backend {
                backend: "qemu",
                source: e,
            })?;
            let isolation = match qemu.accel().accel {
                Accel::Kvm => Isolation::Kvm,
                Accel::Tcg => Isolation::Tcg,
            };
            (Arc::new(qemu), isolation)
        }
    };
    let version = vmm.version().await.map_err(|e| AgentError::Backend {
        backend: kind.as_str(),
        source: e,
    })?;
    let detail = format!("{kind}: {detail}; {version}");
    Ok(Backend {
        vmm,
        kind,
        detail,
        version,
        isolation,
        strategy: Strategy::of(kind),
    })
}
