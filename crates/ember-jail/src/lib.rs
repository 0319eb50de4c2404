//! Confinement of every process Ember runs on a guest's behalf — VMMs, page
//! servers, `qemu-img` — in one place, so they are all confined the same
//! way:
//!
//! - [`jail`]: who the process is (its own unprivileged uid and gid, no
//!   capabilities, `no_new_privs`) and what it sees (a root of its own with
//!   the system's programs read-only, a minimal `/dev` and its VM's files),
//!   as a plan applied in the child before `exec`;
//! - [`cgroup`]: one cgroup per sandbox with CPU, memory, process and
//!   block-I/O limits, on cgroup v2 or the v1/hybrid layout, and the usage
//!   figures the per-sandbox metrics read.
//!
//! Not here: choosing uids and limits (the host agent), seccomp filters
//! (QEMU's `-sandbox`, Firecracker's own, the page server's), network
//! namespaces (`ember-net`).

pub mod cgroup;
pub mod jail;

pub use jail::{Confinement, Identity, JailPlan, PreparedJail};
