//! The per-sandbox state machine and its persisted record.
//!
//! ```text
//!            create                pause                 (resources freed)
//!  creating ───────▶ running ─────────▶ pausing ───────▶ paused
//!                     │  ▲  ▲                               │ resume
//!          snapshot   │  │  └──────────── resuming ◀────────┘
//!                     ▼  │
//!                 snapshotting
//!  any non-terminal ──▶ destroying ──▶ destroyed
//!  any ──▶ failed (reason kept; destroy still allowed)
//! ```
//!
//! Transitional states (`creating`, `pausing`, `resuming`, `snapshotting`,
//! `destroying`) are entered before an operation starts and left when it
//! ends, and are persisted, so an agent that crashes mid-operation finds
//! them on restart and knows what to finish or roll back.

use std::collections::BTreeMap;

use ember_net::EgressPolicy;
use ember_types::{BackendKind, BuildId, SandboxId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Snapshotting,
    Destroying,
    Failed,
    Destroyed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Snapshotting => "snapshotting",
            SandboxState::Destroying => "destroying",
            SandboxState::Failed => "failed",
            SandboxState::Destroyed => "destroyed",
        }
    }

    /// States in which the sandbox owns a VMM process, a slot and a disk layer.
    pub fn holds_vm(self) -> bool {
        matches!(
            self,
            SandboxState::Creating
                | SandboxState::Running
                | SandboxState::Pausing
                | SandboxState::Resuming
                | SandboxState::Snapshotting
        )
    }

    /// An operation is under way; another one must wait or be refused.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            SandboxState::Creating
                | SandboxState::Pausing
                | SandboxState::Resuming
                | SandboxState::Snapshotting
                | SandboxState::Destroying
        )
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation a caller asks for; checked against the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pause,
    Resume,
    Snapshot,
    Destroy,
    /// Exec and file calls: need a running guest.
    Guest,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Snapshot => "snapshot",
            Operation::Destroy => "destroy",
            Operation::Guest => "exec or file access",
        }
    }

    /// The transitional state this operation enters from `from`, or `None` if
    /// it is illegal there. `Guest` enters no state.
    pub fn enter(self, from: SandboxState) -> Option<SandboxState> {
        use SandboxState::*;
        match (self, from) {
            (Operation::Pause, Running) => Some(Pausing),
            (Operation::Resume, Paused) => Some(Resuming),
            (Operation::Snapshot, Running) => Some(Snapshotting),
            (Operation::Destroy, Destroyed | Destroying) => None,
            (Operation::Destroy, _) => Some(Destroying),
            (Operation::Guest, Running) => Some(Running),
            _ => None,
        }
    }
}

/// What the agent keeps on disk about one sandbox (`<data>/sandboxes/<id>/state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub state: SandboxState,
    pub backend: BackendKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The template build it was created from; `None` = cold boot of the base image.
    pub source_build: Option<BuildId>,
    /// The build holding this sandbox's latest state: its paused state, or the
    /// build its running VM descends from (parent of the next pause's diff).
    pub build: Option<BuildId>,
    /// Image identity (key) the sandbox's lineage started from.
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub network: EgressPolicy,
    /// Token the guest agent currently requires.
    pub guest_token: String,
    pub failure_reason: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub state_changed_at: String,
    pub last_operation_ms: u64,
    /// Where the last lifecycle operation's time went (`total` last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_operation_phases: Vec<crate::timing::Phase>,
    /// Present while the sandbox holds a VM.
    pub runtime: Option<RuntimeRecord>,
    /// A build being written from this sandbox (pause or snapshot), recorded
    /// (and synced) before the build is begun, cleared once the outcome is
    /// recorded: gc keeps it, and a restarted agent finds what a crash
    /// interrupted. Intent before commit.
    #[serde(default)]
    pub pending_build: Option<BuildId>,
    /// Who may reach its ports through this host's ingress.
    #[serde(default)]
    pub ingress: IngressRecord,
    /// Bytes the files of its latest pause's build take (0 before one).
    #[serde(default)]
    pub build_stored_bytes: u64,
    /// What the container image it booted asks of processes (its config's
    /// Env, WorkingDir, User, Entrypoint, Cmd); `None` unless booted from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_defaults: Option<ember_image::oci::ImageDefaults>,
    /// Working directory and user of an exec that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_user: Option<String>,
}

/// A sandbox's port access as the control plane last set it. The token is
/// kept as its SHA-256 only: this host checks tokens, it cannot mint them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRecord {
    pub public: bool,
    /// Empty: no token opens the ports (only `public` does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_sha256: Vec<u8>,
}

/// Where a running sandbox's resources are, so a restarted agent can adopt
/// or reclaim them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    pub slot: u32,
    pub vmm_pid: u32,
    /// The userfaultfd page server serving this VM's memory, if any.
    pub page_server_pid: Option<u32>,
    /// The `ember_vmm::Launch` the VM was started with (JSON), for adoption.
    pub launch: ember_vmm::Launch,
    /// The build this VM was restored from, if any: its page server and
    /// disk base read from it while the VM runs.
    #[serde(default)]
    pub restored_from: Option<BuildId>,
    /// The sandbox's cgroup, removed with it (also after a restart).
    #[serde(default)]
    pub cgroup: Option<ember_jail::cgroup::Cgroup>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operation_is_legal_only_from_its_states() {
        use SandboxState::*;
        let all = [
            Creating,
            Running,
            Pausing,
            Paused,
            Resuming,
            Snapshotting,
            Destroying,
            Failed,
            Destroyed,
        ];
        for s in all {
            assert_eq!(
                Operation::Pause.enter(s).is_some(),
                s == Running,
                "pause from {s}"
            );
            assert_eq!(
                Operation::Resume.enter(s).is_some(),
                s == Paused,
                "resume from {s}"
            );
            assert_eq!(
                Operation::Snapshot.enter(s).is_some(),
                s == Running,
                "snapshot from {s}"
            );
            assert_eq!(
                Operation::Guest.enter(s).is_some(),
                s == Running,
                "guest from {s}"
            );
            assert_eq!(
                Operation::Destroy.enter(s).is_some(),
                !matches!(s, Destroying | Destroyed),
                "destroy from {s}"
            );
        }
    }

    #[test]
    fn transitional_states_hold_their_vm_except_destroying() {
        assert!(SandboxState::Pausing.holds_vm());
        assert!(!SandboxState::Paused.holds_vm());
        assert!(SandboxState::Destroying.is_transitional());
        assert!(!SandboxState::Failed.is_transitional());
    }
}
