//! `meta.json`: what a build is (the VM it came from, its parent) and the
//! size and SHA-256 of every file it holds. Typed here so every component
//! reads the same fields; `extra` is the open end for data others attach.

use std::collections::BTreeMap;

use ember_types::{BackendKind, BuildId};
use serde::{Deserialize, Serialize};

/// Version of the `meta.json` layout this code writes.
pub const META_FORMAT: u32 = 1;

/// The files a build may hold (`meta.json` aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BuildFile {
    #[serde(rename = "memfile")]
    Memfile,
    #[serde(rename = "memfile.header")]
    MemfileHeader,
    #[serde(rename = "rootfs")]
    Rootfs,
    #[serde(rename = "rootfs.header")]
    RootfsHeader,
    #[serde(rename = "vmstate")]
    Vmstate,
}

impl BuildFile {
    pub const ALL: [BuildFile; 5] = [
        BuildFile::Memfile,
        BuildFile::MemfileHeader,
        BuildFile::Rootfs,
        BuildFile::RootfsHeader,
        BuildFile::Vmstate,
    ];

    /// The file's name inside the build directory.
    pub fn name(self) -> &'static str {
        match self {
            BuildFile::Memfile => "memfile",
            BuildFile::MemfileHeader => "memfile.header",
            BuildFile::Rootfs => "rootfs",
            BuildFile::RootfsHeader => "rootfs.header",
            BuildFile::Vmstate => "vmstate",
        }
    }
}

impl std::fmt::Display for BuildFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The two images a build can carry, each a data file plus its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// Guest memory (`memfile`).
    Memory,
    /// The root disk (`rootfs`).
    Rootfs,
}

impl ImageKind {
    pub const ALL: [ImageKind; 2] = [ImageKind::Memory, ImageKind::Rootfs];

    pub fn data_file(self) -> BuildFile {
        match self {
            ImageKind::Memory => BuildFile::Memfile,
            ImageKind::Rootfs => BuildFile::Rootfs,
        }
    }

    pub fn header_file(self) -> BuildFile {
        match self {
            ImageKind::Memory => BuildFile::MemfileHeader,
            ImageKind::Rootfs => BuildFile::RootfsHeader,
        }
    }
}

/// Size and SHA-256 (lowercase hex) of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

/// The VM a build was snapshotted from; restoring needs the same values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub backend: BackendKind,
    /// Version string the VMM reports (snapshots are not portable across versions).
    pub vmm_version: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Identity of the guest kernel (e.g. its SHA-256 or artifact name).
    pub kernel: String,
    /// Guest page size in bytes; the memfile header's block size.
    pub page_size: u64,
}

/// What the caller knows about a build before writing it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The build this one is a diff of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BuildId>,
    /// Absent for a disk-only build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    /// Identity of the root filesystem image the disk descends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Anything else a component wants to keep with the build.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildMeta {
    pub format: u32,
    pub build_id: BuildId,
    /// Milliseconds since the Unix epoch at commit.
    pub created_at_unix_ms: u64,
    #[serde(flatten)]
    pub info: BuildInfo,
    /// Every file the build holds, with its size and checksum.
    pub files: BTreeMap<BuildFile, FileDigest>,
}

impl BuildMeta {
    pub fn has(&self, file: BuildFile) -> bool {
        self.files.contains_key(&file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_json_uses_file_names_as_keys_and_round_trips() {
        let meta = BuildMeta {
            format: META_FORMAT,
            build_id: BuildId::new(),
            created_at_unix_ms: 1_700_000_000_000,
            info: BuildInfo {
                parent: Some(BuildId::new()),
                vm: Some(VmInfo {
                    backend: BackendKind::Qemu,
                    vmm_version: "7.2.0".into(),
                    vcpus: 2,
                    memory_mib: 512,
                    kernel: "vmlinux-6.1".into(),
                    page_size: 4096,
                }),
                image: None,
                extra: BTreeMap::from([("working_set".into(), serde_json::json!([1, 2]))]),
            },
            files: BTreeMap::from([(
                BuildFile::MemfileHeader,
                FileDigest {
                    size: 3,
                    sha256: "ab".into(),
                },
            )]),
        };
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["files"]["memfile.header"]["size"], 3);
        assert_eq!(json["vm"]["backend"], "qemu");
        assert_eq!(json["extra"]["working_set"][1], 2);
        assert!(json.get("image").is_none());
        let back: BuildMeta = serde_json::from_value(json).unwrap();
        assert_eq!(back, meta);
    }
}
