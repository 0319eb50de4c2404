//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong planning or applying network slots.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A CIDR string a user (or a policy) supplied does not parse.
    #[error("invalid CIDR {input:?}: {reason}")]
    InvalidCidr { input: String, reason: String },

    /// The pool configuration cannot work; `reason` says what to change.
    #[error("invalid network pool configuration: {reason}")]
    InvalidConfig { reason: String },

    #[error("all {capacity} network slots of pool {pool} (prefix {prefix:?}) are in use")]
    Exhausted {
        capacity: u32,
        pool: String,
        prefix: String,
    },

    #[error("slot index {index} is outside the pool (capacity {capacity})")]
    NoSuchSlot { index: u32, capacity: u32 },

    /// `adopt` found the slot's lock held by a live process.
    #[error("network slot {index} is held by another process")]
    SlotBusy { index: u32 },

    /// `adopt` found the slot incomplete (never finished, or partly torn down).
    #[error("network slot {index} is not intact: {missing} is missing")]
    SlotNotIntact { index: u32, missing: String },

    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// A privileged command (`ip`, `nft`) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot enter network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    #[error("cannot list the host's interface addresses")]
    HostAddresses(#[source] nix::Error),

    /// A worker thread that entered a namespace panicked.
    #[error("namespace worker thread panicked")]
    WorkerPanicked,
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

impl NetError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NetError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
