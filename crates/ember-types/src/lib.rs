//! Ember's shared vocabulary: typed identifiers and the fixed facts every
//! component agrees on (the guest's network identity, the guest agent's port).
//!
//! This crate does no I/O. Wire types of the REST API live in `ember-control`,
//! those of the host↔guest protocol in `ember-guest-api`.

pub mod cidr;
pub mod guest;
mod id;

pub use id::{BuildId, HostId, IdError, SandboxId, TeamId, TemplateId};

/// Which virtual machine monitor runs (or made) a VM. A build records its
/// backend and is restored only by the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Firecracker,
    Qemu,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firecracker" => Ok(BackendKind::Firecracker),
            "qemu" => Ok(BackendKind::Qemu),
            other => Err(format!(
                "unknown backend {other:?}: expected \"firecracker\" or \"qemu\""
            )),
        }
    }
}

/// How a disk image's bytes are to be read. Ember always states it: a
/// format is never guessed from a file's content, because a guest controls
/// the content of its own disk (a guest that writes a qcow2 header at the
/// start of a raw disk must never make the host follow it to a backing file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The bytes are the disk, whatever they say.
    Raw,
    /// A qcow2 image that Ember (through `qemu-img`) created.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and `qemu-img` use for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
