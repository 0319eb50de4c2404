//! Choosing the VMM backend for this host, and the facts about it that
//! builds record.

use std::sync::Arc;

use ember_types::BackendKind;
use ember_vmm::Vmm;
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
    let vmm: Arc<dyn Vmm> = match kind {
        BackendKind::Firecracker => {
            let fc = FirecrackerConfig {
                binary: fc_bin.or_else(|| config.firecracker_bin.clone()),
                ..FirecrackerConfig::default()
            };
            Arc::new(FirecrackerVmm::new(fc))
        }
        BackendKind::Qemu => {
            Arc::new(
                Qemu::new(config.qemu.clone()).map_err(|e| AgentError::Backend {
                    backend: "qemu",
                    source: e,
                })?,
            )
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
    })
}
