//! A drop-in for E2B: the unmodified `e2b` SDKs (PyPI, npm) drive Ember
//! when pointed at `ember server` with
//! `E2B_API_URL=E2B_SANDBOX_URL=http://<server>` and `E2B_API_KEY=<an Ember key>`.
//!
//! - [`api`]: E2B's control-plane REST API (`/sandboxes`, `/v2/sandboxes`,
//!   …) over Ember's lifecycle, on the same listener as Ember's `/v1`.
//! - [`envd`]: envd's data plane (Connect `process.Process` and
//!   `filesystem.Filesystem`, HTTP `/files` and `/health`). A request is
//!   envd's when it carries `E2b-Sandbox-Id` (every SDK call does once
//!   `E2B_SANDBOX_URL` is set) or arrives for a host name
//!   `{port}-{sandboxID}.{domain}` (wildcard DNS with `E2B_DOMAIN`);
//!   [`dispatch`] sends it there before Ember's own routes see it.
//! - [`connect`]: the Connect protocol's JSON codec and envelopes.
//!
//! `docs/e2b.md` is the user's side: what maps to what, what differs.

pub mod api;
pub mod connect;
pub mod envd;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tower::ServiceExt;

/// Whether a path is one of envd's (E2B's SDKs also send `E2b-Sandbox-Id`
/// on some control-plane calls, so the header alone does not decide).
fn is_envd_path(path: &str) -> bool {
    path == "/health"
        || path == "/files"
        || path.starts_with("/process.Process/")
        || path.starts_with("/filesystem.Filesystem/")
}

/// Send envd requests to the envd router; everything else goes on.
pub async fn dispatch(envd: axum::Router, req: Request, next: Next) -> Response {
    if is_envd_path(req.uri().path()) && envd::requested_sandbox(req.headers()).is_some() {
        match envd.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    } else {
        next.run(req).await
    }
}
