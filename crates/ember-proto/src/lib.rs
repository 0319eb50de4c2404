//! gRPC definitions between the control plane and host agents.
//!
//! The `.proto` files under `proto/` are the source of truth; they are
//! compiled at build time by protox (no system `protoc`). Compatibility rule:
//! fields and RPCs are only added, never renumbered or removed, so a newer
//! control plane talks to an older host agent and vice versa.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

/// `ember.host.v1`: the host agent service.
pub mod host {
    tonic::include_proto!("ember.host.v1");
}
