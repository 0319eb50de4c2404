//! The control plane: REST API v1, the store (SQLite or PostgreSQL), auth,
//! the scheduler, the reconciler and timeouts. It talks to host agents over
//! gRPC (`ember-proto`) and never touches VMs itself.
//!
//! Layout: [`wire`] holds the REST types and [`api`] the handlers that serve
//! them; [`lifecycle`] moves sandboxes through their state machine;
//! [`store`] persists everything; [`scheduler`], [`reconciler`] and [`ttl`]
//! hold their policies as pure functions beside the loops that run them;
//! [`builds`] runs template builds (images, [`dockerfile`]s) in sandboxes;
//! [`hosts`] keeps a client per host agent; [`ingress`] proxies traffic to
//! sandbox ports through them; [`server`] ties it together.

pub mod api;
pub mod audit;
pub mod auth;
pub mod builds;
pub mod dockerfile;
pub mod e2b;
pub mod error;
pub mod hosts;
pub mod ingress;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod ratelimit;
pub mod reconciler;
pub mod redact;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;
pub mod ttl;
pub mod wire;

pub use error::{Error, Result};
