//! The audit log: one append-only row per authenticated API call that
//! changes something (POST, PUT, PATCH, DELETE), naming the caller, the
//! route, what it acted on and how it ended.
//!
//! How the caller reaches the log without every handler passing it on: the
//! [`layer`] middleware runs each request inside a task-local slot, and
//! [`note_caller`] (called by authentication itself) fills it. Whatever path
//! authenticates — the REST extractor, the E2B adapter — is audited alike.
//! Unauthenticated calls are not logged: they change nothing, and logging
//! them would let anyone fill the table.
//!
//! Request bodies are never logged (they hold file contents, commands and
//! environments); the route and its path parameters are.

use std::cell::RefCell;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::auth::Caller;
use crate::model::{AuditEntry, now_ms};
use crate::store::Store;

/// What authentication leaves for the request's scope: who called, and the
/// rate limiter's permit, held until the request is answered.
#[derive(Debug, Default)]
struct Slot {
    caller: Option<Caller>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

tokio::task_local! {
    static SLOT: RefCell<Slot>;
}

/// What a handler may attach to its response when the thing it acted on is
/// not in the path (a created sandbox's or key's ID).
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

/// Record who the current request's caller is, for the audit layer, and
/// keep its limiter permit until the request is answered. Outside a scoped
/// request (the ingress proxy, tests) the permit is released at once.
pub fn note_caller(caller: &Caller, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
    let _ = SLOT.try_with(|slot| {
        *slot.borrow_mut() = Slot {
            caller: Some(caller.clone()),
            _permit: permit,
        }
    });
}

/// REST: every method but the reading ones changes something.
pub fn changes_something(method: &Method, _route: &str) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// E2B's envd protocol (Connect RPC) posts reads as well as writes; these
/// are its calls that change something in the guest.
pub fn envd_changes_something(method: &Method, route: &str) -> bool {
    *method == Method::POST
        && matches!(
            route,
            "/files"
                | "/process.Process/Start"
                | "/process.Process/SendInput"
                | "/process.Process/StreamInput"
                | "/process.Process/SendSignal"
                | "/process.Process/CloseStdin"
                | "/process.Process/Update"
                | "/filesystem.Filesystem/MakeDir"
                | "/filesystem.Filesystem/Move"
                | "/filesystem.Filesystem/Remove"
        )
}

/// The actor column for a caller.
pub fn actor(caller: &Caller) -> (String, String) {
    match caller {
        Caller::Team {
            team_id,
            key_prefix,
            ..
        } => (team_id.clone(), format!("key:{key_prefix}")),
        Caller::Sandbox {
            sandbox_id,
            team_id,
        } => (team_id.clone(), format!("sandbox:{sandbox_id}")),
    }
}

/// The first path parameter of `route` (`/v1/sandboxes/{id}/pause`) in
/// `path` (`/v1/sandboxes/sb-…/pause`): what the call acted on.
fn first_param(route: &str, path: &str) -> Option<String> {
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| r.starts_with('{') && r.ends_with('}'))
        .map(|(_, p)| p.chars().take(200).collect())
}

/// Middleware (a `route_layer`, so the matched route is known): run the
/// request with a slot for its caller and limiter permit, then append an
/// entry for a call `audited` says changes something, once its caller
/// authenticated.
pub async fn layer(
    store: Store,
    audited: fn(&Method, &str) -> bool,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let path = req.uri().path().to_owned();
    let (resp, caller) = SLOT
        .scope(RefCell::new(Slot::default()), async move {
            let resp = next.run(req).await;
            (
                resp,
                SLOT.with(|s| std::mem::take(&mut *s.borrow_mut()).caller),
            )
        })
        .await;
    if !audited(&method, &route) {
        return resp;
    }
    let Some(caller) = caller else {
        return resp;
    };
    let (team_id, actor) = actor(&caller);
    let target = resp
        .extensions()
        .get::<AuditTarget>()
        .map(|t| t.0.clone())
        .or_else(|| first_param(&route, &path))
        .or_else(|| match &caller {
            Caller::Sandbox { sandbox_id, .. } => Some(sandbox_id.clone()),
            Caller::Team { .. } => None,
        });
    let entry = AuditEntry {
        id: uuid::Uuid::now_v7().to_string(),
        at: now_ms(),
        team_id: Some(team_id),
        actor,
        method: method.to_string(),
        route,
        target,
        status: resp.status().as_u16(),
    };
    // The call has happened; a failed write is logged loudly, not turned
    // into a failure of the call.
    if let Err(err) = store.insert_audit(&entry).await {
        tracing::error!(error = %err, actor = %entry.actor, route = %entry.route, "audit log write failed");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_first_path_parameter() {
        assert_eq!(
            first_param("/v1/sandboxes/{id}/pause", "/v1/sandboxes/sb-abc/pause"),
            Some("sb-abc".into())
        );
        assert_eq!(first_param("/v1/sandboxes", "/v1/sandboxes"), None);
        assert_eq!(
            first_param("/v1/keys/{id}", "/v1/keys/abcd1234"),
            Some("abcd1234".into())
        );
    }

    #[test]
    fn only_changes_are_audited() {
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(changes_something(&m, "/v1/sandboxes"), "{m}");
        }
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(!changes_something(&m, "/v1/sandboxes"), "{m}");
        }
        assert!(envd_changes_something(
            &Method::POST,
            "/process.Process/Start"
        ));
        assert!(!envd_changes_something(
            &Method::POST,
            "/filesystem.Filesystem/ListDir"
        ));
        assert!(!envd_changes_something(&Method::GET, "/files"));
    }

    #[tokio::test]
    async fn the_slot_carries_the_caller_out_of_the_request() {
        let caller = Caller::Sandbox {
            sandbox_id: "sb-x".into(),
            team_id: "team-y".into(),
        };
        let got = SLOT
            .scope(RefCell::new(Slot::default()), async {
                note_caller(&caller, None);
                SLOT.with(|s| s.borrow_mut().caller.take())
            })
            .await;
        assert_eq!(got, Some(caller.clone()));
        note_caller(&caller, None); // outside a scope: nothing, no panic
    }
}
