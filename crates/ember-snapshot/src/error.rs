//! The crate's one error type. Variants name what went wrong; those about a
//! stored build name the build and the file so an operator can find it.

use std::path::PathBuf;

use ember_types::BuildId;

/// Everything that can go wrong decoding headers, deriving generations and
/// reading or writing the build store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("header is truncated: {len} bytes, expected {expected}")]
    HeaderTruncated { len: usize, expected: usize },
    #[error("not an Ember snapshot header (bad magic)")]
    HeaderMagic,
    #[error(
        "header format version {found} is not supported (this Ember reads version {supported})"
    )]
    HeaderVersion { found: u32, supported: u32 },
    #[error("header checksum does not match its contents")]
    HeaderChecksum,
    #[error("header is inconsistent: {reason}")]
    HeaderInvalid { reason: String },

    #[error("block size {block_size} is not supported: use a power of two between 512 B and 1 GiB")]
    BlockSize { block_size: u64 },
    #[error("image size must be greater than zero")]
    EmptyImage,
    #[error("block {block} is outside the image ({blocks} blocks)")]
    BlockOutOfRange { block: u64, blocks: u64 },
    #[error("block {block} is in both the dirty and the zero set")]
    DirtyAndZero { block: u64 },
    #[error("the image is {found} bytes but its parent header describes {expected}")]
    ImageSizeMismatch { expected: u64, found: u64 },
    #[error("block size {found} differs from the parent header's {expected}")]
    BlockSizeMismatch { expected: u64, found: u64 },
    #[error("nil build ID cannot name a build")]
    NilBuild,

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build {build} does not exist in the store")]
    BuildMissing { build: BuildId },
    #[error("build {build} already exists; builds are immutable")]
    BuildExists { build: BuildId },
    #[error("build {build} has no {file}")]
    BuildFileMissing { build: BuildId, file: &'static str },
    #[error("{file} of build {build} was already written")]
    BuildFileWritten { build: BuildId, file: &'static str },
    #[error("{file} of build {build} is {found} bytes, meta.json records {expected}")]
    SizeMismatch {
        build: BuildId,
        file: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("{file} of build {build} does not match its SHA-256 in meta.json")]
    ChecksumMismatch { build: BuildId, file: &'static str },
    #[error("{file} of build {build} is corrupt")]
    HeaderCorrupt {
        build: BuildId,
        file: &'static str,
        #[source]
        source: Box<SnapshotError>,
    },
    #[error("{file} of build {build} describes build {found}")]
    HeaderBuildMismatch {
        build: BuildId,
        file: &'static str,
        found: BuildId,
    },
    #[error("meta.json of build {build} is unreadable")]
    MetaCorrupt {
        build: BuildId,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "header of build {build} references builds that are not in the store: {}",
        list(missing)
    )]
    ReferencedBuildsMissing {
        build: BuildId,
        missing: Vec<BuildId>,
    },
    #[error("{file} of build {build} is {len} bytes but a header reads up to byte {needed} of it")]
    StorageOutOfRange {
        build: BuildId,
        file: &'static str,
        needed: u64,
        len: u64,
    },
    #[error("read of {len} bytes at {offset} goes past the end of the {size}-byte image")]
    ReadPastEnd { offset: u64, len: u64, size: u64 },
    #[error("block reader callback failed at image offset {offset}")]
    BlockSource {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("a build is being written; run gc again once it is committed")]
    StoreBusy,
    #[error("{path} already exists; materialize writes a new file")]
    DestinationExists { path: PathBuf },
}

fn list(builds: &[BuildId]) -> String {
    builds
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// Wrap an `io::Error` with the operation and path it concerns.
pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.into();
    move |source| SnapshotError::Io { op, path, source }
}
