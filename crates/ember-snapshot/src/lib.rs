//! Snapshot builds: the generational header format, the on-disk build store,
//! diffs and integrity checks.

mod blockset;
mod error;
pub mod header;

pub use blockset::BlockSet;
pub use error::{Result, SnapshotError};
pub use header::{Header, HeaderMeta, Mapping, Resolved, Segment};
