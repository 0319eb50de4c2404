//! The crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("could not start {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {output}")]
    CommandFailed {
        tool: String,
        status: String,
        output: String,
    },
    #[error(
        "{tool} could not reach the Debian mirror {mirror}: check this machine's network access to it ({output})"
    )]
    MirrorUnreachable {
        tool: String,
        mirror: String,
        output: String,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "ember-guest binary not found at {path}: build it with `cargo build -p ember-guest`, or point EMBER_GUEST_BIN at it"
    )]
    GuestBinaryMissing { path: PathBuf },
    #[error(
        "{path} is not a static ember-guest, and an imported image may lack the libraries a dynamic one needs: build one with scripts/build-guest and point EMBER_GUEST_BIN at it"
    )]
    GuestNotStatic { path: PathBuf },
    #[error("image {image}: {reason}")]
    ImageImport { image: String, reason: String },
    #[error("{path} is not a static busybox: apt-get install busybox-static")]
    BusyboxNotStatic { path: PathBuf },
    #[error("apt knows no package {package}: run `apt-get update`, or check the package name")]
    PackageUnknown { package: String },
    #[error("kernel image {path}: {reason}")]
    KernelFormat { path: PathBuf, reason: String },
    #[error(
        "kernel {path} has no PVH entry point (ELF note XEN_ELFNOTE_PHYS32_ENTRY); Firecracker and QEMU microvm cannot boot it"
    )]
    NoPvhEntry { path: PathBuf },
    #[error("the kernel has no module {module}, which the guest needs")]
    ModuleMissing { module: String },
    #[error("kernel modules: {reason}")]
    ModuleDeps { reason: String },
    #[error("not an LZ4 legacy stream")]
    NotLz4Legacy,
    #[error("corrupt LZ4 block at offset {offset}")]
    Lz4Block {
        offset: usize,
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    #[error("{reason}")]
    Elf { reason: &'static str },
    #[error("malformed cpio archive at offset {offset}: {reason}")]
    Cpio { offset: usize, reason: &'static str },
    #[error("building the root filesystem needs root (debootstrap and chroot); run as root")]
    NotRoot,
    #[error("the root filesystem does not fit in {size} bytes: choose a larger image size")]
    DiskTooSmall { size: u64 },
    #[error("{path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("unexpected output from {tool}: {reason}")]
    ToolOutput { tool: String, reason: String },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}
