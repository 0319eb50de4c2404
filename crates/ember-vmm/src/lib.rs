//! The `Vmm` trait — what the host agent needs from a virtual machine monitor —
//! and its two backends:
//!
//! - [`firecracker`]: Firecracker driven over its HTTP API on a Unix socket;
//!   the production backend on KVM hosts.
//! - [`qemu`]: QEMU `-M microvm` driven over QMP, with KVM when KVM can run the
//!   guest and TCG otherwise.
//!
//! The host agent holds a `Box<dyn Vmm>` and never asks which backend it has.
//! This crate owns VMM processes and their sockets; it does not own network
//! namespaces (`ember-net`), disks and images (`ember-image`), or snapshot
//! builds (`ember-snapshot`): callers pass in paths that already exist.

mod spec;

pub mod firecracker;
pub mod layout;
pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

pub use ember_jail::{cgroup, jail};
pub use ember_types::{BackendKind, DiskFormat};
pub use spec::{
    BackingFile, Confinement, DriveSpec, Launch, MachineSpec, MemoryBackend, MemoryDump, NetSpec,
    RestoreSpec, SnapshotKind, SnapshotOutput, SnapshotRequest, VmConfig,
};

/// Everything that can go wrong driving a VMM. Backend-specific detail (a
/// Firecracker fault message, a QMP error class) is kept in the message and
/// in `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("VMM binary {path} not found or not executable")]
    BinaryMissing { path: PathBuf },
    #[error("failed to start the VMM process")]
    Spawn(#[source] std::io::Error),
    #[error("VMM did not open its control socket {path} within {waited:?}")]
    SocketTimeout { path: PathBuf, waited: Duration },
    #[error("VMM process exited ({status}); last log lines: {log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("{call} was refused by the VMM: {message}")]
    Refused { call: String, message: String },
    #[error("{call} timed out after {after:?}")]
    Timeout { call: String, after: Duration },
    #[error("the VMM's control connection failed during {call}")]
    Connection {
        call: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed response to {call}: {detail}")]
    Protocol { call: String, detail: String },
    #[error("{operation} is not possible while the VM is {state}")]
    InvalidState {
        operation: &'static str,
        state: String,
    },
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// A virtual machine monitor that can start VMs, cold or from a snapshot.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Which backend this is; recorded in every build it snapshots.
    fn kind(&self) -> BackendKind;

    /// The VMM's own version string (recorded in builds for diagnostics).
    async fn version(&self) -> Result<String>;

    /// Boot a VM from a kernel. Returns once the VM is running.
    async fn boot(&self, launch: &Launch) -> Result<Box<dyn Vm>>;

    /// Start a VM from a snapshot. The VM is left paused unless
    /// `restore.resume` is set.
    async fn restore(&self, launch: &Launch, restore: &RestoreSpec) -> Result<Box<dyn Vm>>;

    /// Re-attach to a VM process that outlived the process that started it
    /// (a host-agent restart). Fails if the process is gone or is not the VM.
    async fn adopt(&self, launch: &Launch, pid: u32) -> Result<Box<dyn Vm>>;
}

/// A handle on one running VM process.
///
/// Dropping the handle kills the VM and removes its sockets unless
/// [`Vm::detach`] was called first (the host agent detaches on shutdown so
/// VMs outlive it and are adopted by the next agent).
#[async_trait::async_trait]
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// The VMM process ID.
    fn pid(&self) -> u32;

    /// Files this VM owns: control sockets, logs, serial console.
    fn serial_log(&self) -> PathBuf;

    /// Pause all vCPUs.
    async fn pause(&self) -> Result<()>;

    /// Resume vCPUs after [`Vm::pause`] or a restore without `resume`.
    async fn resume(&self) -> Result<()>;

    /// Write a snapshot. The VM must be paused; it stays paused.
    async fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotOutput>;

    /// Ask the guest to stop, wait up to `grace`, then kill the process.
    /// Removes the VM's sockets either way.
    async fn shutdown(&self, grace: Duration) -> Result<()>;

    /// Kill the process now and remove its sockets.
    async fn kill(&self) -> Result<()>;

    /// Has the VMM process exited? Returns a description of its exit status.
    fn exit_status(&self) -> Option<String>;

    /// Wait for the VMM process to exit and describe how it did.
    async fn wait(&self) -> String;

    /// Stop owning the process: dropping the handle leaves it running.
    fn detach(&mut self);

    /// How long the steps of this VM's start took (`vmm.spawn`,
    /// `vmm.load_state`, `vmm.resume`), in order; empty for an adopted VM.
    fn start_phases(&self) -> Vec<(&'static str, Duration)> {
        Vec::new()
    }
}
