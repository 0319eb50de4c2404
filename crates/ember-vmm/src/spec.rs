//! Plain-data descriptions of a VM, its launch, snapshots and restores.

use std::path::PathBuf;

use ember_types::DiskFormat;

pub use ember_jail::Confinement;
use serde::{Deserialize, Serialize};

/// vCPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// A block device.
///
/// `host_path` is wherever the disk really is. The VMM never sees it: each
/// backend presents the drive at a stable path derived from `id` (see
/// `layout`), because a snapshot records drive paths and a restore must find
/// them again whatever the real disk's path is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DriveSpecRecord")]
pub struct DriveSpec {
    /// `[a-z0-9_]+`, unique within the VM; `root` for the root disk.
    pub id: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    pub root: bool,
    /// How the VMM reads the file: always stated, never probed.
    pub format: DiskFormat,
    /// The files under a qcow2 drive, top first, each with its format: the
    /// VMM is given the whole chain and never follows a path a header names
    /// (a confined VMM could not see it anyway). Empty for a raw drive.
    pub backing: Vec<BackingFile>,
}

/// A read-only file under a qcow2 drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingFile {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// A [`DriveSpec`] as stored. Records written before `format` existed
/// named their disks `*.qcow2` or `*.raw`: the extension is Ember's choice,
/// not the guest's, so it is what an absent format is taken from.
#[derive(Deserialize)]
struct DriveSpecRecord {
    id: String,
    host_path: PathBuf,
    read_only: bool,
    root: bool,
    #[serde(default)]
    format: Option<DiskFormat>,
    #[serde(default)]
    backing: Vec<BackingFile>,
}

impl From<DriveSpecRecord> for DriveSpec {
    fn from(r: DriveSpecRecord) -> Self {
        let format = r.format.unwrap_or_else(|| {
            if r.host_path.extension().is_some_and(|e| e == "qcow2") {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            }
        });
        DriveSpec {
            id: r.id,
            host_path: r.host_path,
            read_only: r.read_only,
            root: r.root,
            format,
            backing: r.backing,
        }
    }
}

/// The VM's network interface: a TAP device inside a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// TAP device name inside `netns` (always `tap0` in Ember).
    pub tap: String,
    /// Guest MAC as `aa:bb:cc:dd:ee:ff`.
    pub guest_mac: String,
    /// Path of the network namespace to run the VMM in (`/run/netns/<name>`);
    /// `None` runs it in the caller's namespace.
    pub netns: Option<PathBuf>,
}

/// The shape of a VM: everything a snapshot of it also needs to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub machine: MachineSpec,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    /// Root drive first.
    pub drives: Vec<DriveSpec>,
    pub net: Option<NetSpec>,
}

/// One VM process to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Unique name of this VM on the host (the sandbox ID).
    pub vm_id: String,
    /// A private directory for this VM's sockets, logs and serial console.
    /// Created by the caller; the VMM removes what it put there on kill.
    pub run_dir: PathBuf,
    pub config: VmConfig,
    /// Where guest RAM lives when the backend keeps it in a file (QEMU:
    /// `memory-backend-file`, `share=on`). Ignored by Firecracker.
    pub memory_file: Option<PathBuf>,
    /// `None` runs the VMM as the caller, unconfined: only for tests of the
    /// drivers themselves. The host agent always confines.
    #[serde(default)]
    pub confinement: Option<Confinement>,
}

/// Full: every page of guest memory. Diff: only pages written since the
/// last snapshot or restore (needs dirty-page tracking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// Host paths to write a snapshot to. Their parent directories exist and are
/// not inside another VM's run directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub kind: SnapshotKind,
    /// Where to write device and vCPU state.
    pub vmstate: PathBuf,
    /// Where to write guest memory, for backends that write it (Firecracker).
    /// Backends whose RAM already lives in a file (QEMU) leave it unwritten and
    /// return that file in [`SnapshotOutput::memory`].
    pub memory: PathBuf,
}

/// What a snapshot wrote for guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryDump {
    /// The file holds all of guest memory at offset = guest physical offset.
    Full(PathBuf),
    /// A sparse file: its data extents (SEEK_DATA) are the pages written since
    /// the previous snapshot or restore; holes are unchanged pages.
    DirtyOnly(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOutput {
    pub vmstate: PathBuf,
    pub memory: MemoryDump,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackend {
    /// A file holding all of guest memory. Firecracker maps it private;
    /// QEMU uses it as its RAM file (see `Launch::memory_file`).
    File(PathBuf),
    /// A userfaultfd page server listening on this Unix socket
    /// (Firecracker's `Uffd` backend).
    Uffd(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub vmstate: PathBuf,
    pub memory: MemoryBackend,
    /// Keep tracking dirty pages so the next snapshot can be a diff.
    pub track_dirty_pages: bool,
    /// Resume vCPUs once loaded.
    pub resume: bool,
}
