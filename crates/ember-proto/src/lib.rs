//! gRPC definitions between the control plane and host agents.
//!
//! The `.proto` files under `proto/` are the source of truth; they are
//! compiled at build time by protox (no system `protoc`). Compatibility rule:
//! fields and RPCs are only added, never renumbered or removed, so a newer
//! control plane talks to an older host agent and vice versa.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

/// The DNS name in every host agent's self-signed certificate, and the name
/// the control plane asks for when it dials one over TLS. The certificate
/// is pinned per host at registration; the name only has to match.
pub const AGENT_TLS_NAME: &str = "agent.ember.internal";

/// `ember.host.v1`: the host agent service.
pub mod host {
    tonic::include_proto!("ember.host.v1");
}
