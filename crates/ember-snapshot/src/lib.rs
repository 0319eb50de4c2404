//! Snapshot builds: the generational header format, the on-disk build store,
//! diffs and integrity checks.
//!
//! - [`header`]: which build holds each block of a memory or disk image
//!   ([`Header::resolve`]), the binary header format, deriving generations.
//! - [`BuildStore`]: the directory of immutable builds; opening headers,
//!   [`ImageReader`] for byte ranges across builds, `materialize`, `verify`,
//!   `gc`, `recover`.
//! - [`BuildWriter`]: writing a new build from a full image, a sparse
//!   dirty-only file or an explicit dirty block list, committed atomically.
//!
//! Memory and disk diffs are the same machinery; they differ in block size
//! (the guest page size, 4 KiB for disks) and file names ([`ImageKind`]).

mod blockset;
mod error;
pub mod header;
mod meta;
mod reader;
mod store;
mod sys;
mod writer;

pub use blockset::BlockSet;
pub use error::{Result, SnapshotError};
pub use header::{Header, HeaderMeta, Mapping, Resolved, Segment};
pub use meta::{BuildFile, BuildInfo, BuildMeta, FileDigest, ImageKind, META_FORMAT, VmInfo};
pub use reader::{ImageReader, MaterializeReport};
pub use store::{BuildStore, GcReport};
pub use writer::{Base, BuildWriter, WriteReport};
