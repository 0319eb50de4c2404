//! Ingress: HTTP (and any TCP) into what listens inside a sandbox.
//!
//! The forms a request may take (host, path, header) and the relay of an
//! exchange are `ember_ingress`'s, shared with each host agent's own
//! ingress (see `ember_agent::ingress`), which serves the host form for the
//! sandboxes running there without a hop through the control plane.
//!
//! Access: a sandbox is private unless created (or later set) `public`. A
//! private sandbox's ports need its traffic token (`X-Ember-Traffic-Token`,
//! or E2B's `E2b-Traffic-Access-Token`; on the host form also the cookie a
//! one-time link sets), an API key of its team, or its access token. The
//! credential is removed before the request reaches the guest: the guest is
//! hostile and must never see a key.
//!
//! A paused sandbox with `auto_resume` is resumed by the first request,
//! which is held until the port answers; without it the answer is 409.
//! Bytes travel through the sandbox's host agent (`OpenPort`), which dials
//! the guest at its slot address: the control plane never enters a
//! sandbox's network namespace, and the sandbox's own egress rules are
//! untouched. Traffic counts as activity for the sandbox's timeout.

mod proxy;
pub mod tunnel;

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use ember_ingress::{
    BadHost, E2B_TRAFFIC_TOKEN_HEADER, ENVD_PORT, Form, IngressConfig, LINK_PARAM, LINK_TTL,
    PORT_HEADER, SANDBOX_HEADER, TRAFFIC_COOKIE, TRAFFIC_TOKEN_HEADER, Target, route,
};
pub use proxy::{TCP_UPGRADE, link_ticket as proxy_link_ticket, open_port, serve_tunnel};

use crate::api::AppState;

/// The ingress's state in a server: its configuration and the one-time
/// links already used (per replica: a link is also bounded by its expiry).
#[derive(Debug, Default)]
pub struct Ingress {
    pub config: IngressConfig,
    used_links: Mutex<HashMap<String, i64>>,
}

impl Ingress {
    pub fn new(config: IngressConfig) -> Ingress {
        Ingress {
            config,
            used_links: Mutex::default(),
        }
    }

    /// Mark a link's nonce used; false if it already was.
    fn use_link(&self, nonce: &str, expires_ms: i64, now_ms: i64) -> bool {
        let mut used = self.used_links.lock().expect("link set lock");
        used.retain(|_, exp| *exp > now_ms);
        used.insert(nonce.to_owned(), expires_ms).is_none()
    }
}

/// Send sandbox-port requests to the proxy; everything else goes on.
pub async fn dispatch(state: AppState, req: Request, next: Next) -> Response {
    match route(&state.ingress.config, &req) {
        Some(Ok(target)) => proxy::serve(state, target, req).await,
        Some(Err(BadHost(what))) => crate::api::ApiError::not_found(format!(
            "{what} names no sandbox port: use {{port}}-{{sandbox id}}.{} or /v1/sandboxes/{{id}}/ports/{{port}}/",
            state.ingress.config.domain.as_deref().unwrap_or("<domain>")
        ))
        .into_response(),
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_time_links_are_used_once() {
        let ingress = Ingress::new(IngressConfig::default());
        assert!(ingress.use_link("n1", 2_000, 1_000));
        assert!(!ingress.use_link("n1", 2_000, 1_500));
        // Expired entries are forgotten (the expiry check refuses the link).
        assert!(ingress.use_link("n1", 4_000, 3_000));
    }
}
