//! The host agent: sandbox lifecycle on one machine — create, exec, pause,
//! resume, templates, destroy — and the gRPC service the control plane
//! drives it through.
//!
//! - [`agent`]: the [`Agent`], its per-sandbox state machine and lifecycle.
//! - [`state`], [`records`]: the state machine's data and its on-disk form.
//! - [`runtime`]: what a running sandbox holds and how it is released.
//! - [`disk`]: root-disk layers and disk diffs.
//! - [`recovery`]: what a starting agent does with what the last one left.
//! - [`service`]: the gRPC service (`ember.host.v1.HostAgent`).
//! - [`backend`], [`config`]: choosing the VMM; the agent's settings.
//! - [`confine`]: each sandbox's uid, cgroup and limits; private directories.
//! - [`usage`]: sampling what each running sandbox uses.
//! - [`timing`]: the phases of a lifecycle operation and how long each took.
//! - [`preflight`]: the host tools an agent needs, checked at start.
//! - [`identity`]: the certificate, token and credential of a joined host.
//!
//! Not here: VMMs (`ember-vmm`), network slots (`ember-net`), images
//! (`ember-image`), builds (`ember-snapshot`), page servers (`ember-uffd`,
//! run as `ember uffd` processes).

pub mod agent;
pub mod backend;
pub mod config;
pub mod confine;
pub mod disk;
pub mod error;
pub mod failpoint;
pub mod identity;
pub mod ingress;
pub mod preflight;
pub mod records;
mod recovery;
pub mod runtime;
pub mod service;
pub mod state;
pub mod timing;
pub mod usage;

pub use agent::{Agent, CreateRequest};
pub use config::{AgentConfig, BackendChoice};
pub use error::AgentError;
pub use service::HostService;
pub use state::{SandboxRecord, SandboxState};
