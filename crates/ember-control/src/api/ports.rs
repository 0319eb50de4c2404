//! Sandbox ports: who may reach them (`/ingress`), one-time browser links
//! (`/links`) and raw TCP tunnels (`/tunnel/{port}`, what `ember sandbox
//! port-forward` uses). The proxy itself is [`crate::ingress`].

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::sandboxes::to_wire;
use super::{ApiError, ApiJson, AppState, Auth, sandbox_id};
use crate::error::Error;
use crate::model::{SandboxState, now_ms, rfc3339};
use crate::wire;

/// Make a sandbox's ports public or private, and choose whether traffic
/// wakes it when paused.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/ingress", tag = "ports",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::IngressUpdate,
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn set_ingress(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::IngressUpdate>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    let not_found = || Error::SandboxNotFound { id: id.clone() };
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .filter(|sb| sb.state != SandboxState::Destroyed)
        .ok_or_else(not_found)?;
    let mut ingress = sb.ingress;
    if let Some(public) = req.public {
        ingress.public = public;
    }
    if let Some(auto_resume) = req.auto_resume {
        ingress.auto_resume = auto_resume;
    }
    if !state.store.set_ingress(team, &id, &ingress).await? {
        return Err(not_found().into());
    }
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .ok_or_else(not_found)?;
    state.ops.push_ingress(&sb).await;
    Ok(Json(to_wire(&state, sb)))
}

/// A one-time link for a browser: opening it sets a cookie for the port's
/// host name (so the page's own requests are authorised) and redirects to
/// the page. Needs the host form (`--ingress-domain`): on the path form a
/// page would share the API's origin.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/links", tag = "ports",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::LinkRequest,
    responses(
        (status = 201, body = wire::Link),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "The server has no ingress domain", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_link(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::LinkRequest>,
) -> Result<(StatusCode, Json<wire::Link>), ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    if req.port == 0 {
        return Err(ApiError::invalid("port", "must be 1 to 65535"));
    }
    let path = req.path.unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ' || c == '#') {
        return Err(ApiError::invalid(
            "path",
            "must start with / and hold no spaces, control characters or #",
        ));
    }
    state
        .store
        .sandbox(Some(team), &id)
        .await?
        .filter(|sb| sb.state != SandboxState::Destroyed)
        .ok_or_else(|| Error::SandboxNotFound { id: id.clone() })?;
    let Some(base) = state.ingress.config.host_url(&id, req.port) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_ingress_domain",
            "browser links need the server's host form: start `ember server` with \
             --ingress-domain (and wildcard DNS pointing at it)",
        ));
    };
    let expires_ms = now_ms() + crate::ingress::LINK_TTL.as_millis() as i64;
    let ticket = crate::ingress::proxy_link_ticket(&state, &id, req.port, expires_ms);
    let sep = if path.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{}{sep}{}={ticket}",
        base.trim_end_matches('/'),
        path,
        crate::ingress::LINK_PARAM
    );
    Ok((
        StatusCode::CREATED,
        Json(wire::Link {
            url,
            expires_at: rfc3339(expires_ms),
        }),
    ))
}

/// A raw TCP connection to a port of the sandbox: answer `101 Switching
/// Protocols` to `Connection: Upgrade` + `Upgrade: ember-tcp`, then the
/// connection carries the port's bytes both ways.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/tunnel/{port}", tag = "ports",
    params(
        ("id" = String, Path, description = "Sandbox ID"),
        ("port" = u16, Path, description = "TCP port in the guest"),
    ),
    responses(
        (status = 101, description = "Switched: the connection is the port's"),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running (and not woken by traffic)", body = wire::ErrorBody),
        (status = 426, description = "Not an upgrade request", body = wire::ErrorBody),
        (status = 502, description = "Nothing listens on the port (`port_closed`)", body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn tunnel(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            ApiError::invalid("port", format!("{port:?} is not a TCP port (1-65535)"))
        })?;
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .filter(|sb| sb.state != SandboxState::Destroyed)
        .ok_or_else(|| Error::SandboxNotFound { id: id.clone() })?;
    crate::ingress::serve_tunnel(&state, sb, port, req).await
}
