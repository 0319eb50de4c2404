//! The userfaultfd page server that restores Firecracker VMs lazily from
//! snapshot builds.
//!
//! One server serves one restored VM, normally as its own process
//! (`ember uffd`, so that a host-agent restart leaves running VMs alone):
//! it listens on a Unix socket, takes Firecracker's handshake (regions as
//! JSON plus the userfaultfd), and from then on answers every missing-page
//! fault by copying the page from the build's data files, or zeros where
//! the build has none or the guest gave memory back. It can record the
//! order in which the VM first touched memory (the *working set*), prefetch
//! a recorded working set on later restores, and track which pages the
//! guest wrote (for diff snapshots). If it cannot serve a page it kills the
//! VMM rather than let the guest run on wrong memory.
//!
//! Modules, bottom up: [`uffd`] (the kernel interface), [`handshake`]
//! (Firecracker's socket protocol), [`source`] (where image bytes live),
//! [`build`] (a build from `ember-snapshot`'s store as a source),
//! [`working_set`], [`metrics`], [`server`] (the serving threads),
//! [`control`] (the control socket), [`vmm_side`] (Firecracker's half of the
//! protocol, for tests, benchmarks and fake VMMs).
//!
//! Not here: the snapshot header format and build store (`ember-snapshot`),
//! deciding when to restore (`ember-agent`), driving Firecracker (`ember-vmm`).

use std::path::PathBuf;

mod bitmap;
pub mod build;
pub mod control;
pub mod handshake;
pub mod metrics;
pub mod server;
pub mod source;
pub mod uffd;
pub mod vmm_side;
pub mod working_set;

pub use handshake::GuestRegion;
pub use metrics::MetricsSnapshot;
pub use server::{Config, Ending, Outcome, PageServer, Session, SessionHandle};
pub use source::{Backing, Extent, Image, Layout, Mapping, MemorySource};
pub use working_set::WorkingSet;

/// Errors of the page server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("handshake with the VMM failed: {0}")]
    Handshake(String),
    #[error("memory image layout is invalid: {0}")]
    CorruptLayout(String),
    #[error("cannot open data file {path}")]
    SourceFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("working-set file is invalid: {0}")]
    CorruptWorkingSet(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {0} is in use by a live page server; pick another path or stop that server")]
    SocketInUse(PathBuf),
    #[error(
        "cannot serve build {build} at image offset {offset:#x}: {reason}; the VMM (pid {pid}) was killed"
    )]
    FailedClosed {
        build: String,
        offset: u64,
        reason: String,
        pid: i32,
    },
    #[error(
        "dirty-page tracking is off; start the page server with dirty tracking to ask for dirty pages"
    )]
    DirtyTrackingOff,
    #[error("cannot open build {build}")]
    Build {
        build: ember_types::BuildId,
        #[source]
        source: ember_snapshot::SnapshotError,
    },
}
