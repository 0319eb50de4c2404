//! The reverse proxy: authorise, wake if asked to, open the guest port
//! through the sandbox's host, and relay one HTTP exchange (or an upgraded
//! connection: WebSocket and any other `Upgrade`) over it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_ingress::relay::{self, RelayError, Strip};
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;

use super::tunnel::{self, OpenError};
use super::{Form, LINK_PARAM, TRAFFIC_COOKIE, TRAFFIC_TOKEN_HEADER, Target};
use crate::api::{ApiError, AppState};
use crate::auth::{self, Caller};
use crate::error::Error;
use crate::model::{Sandbox, SandboxState, now_ms};

/// How often a waiting request looks at a resuming sandbox's row.
const WAKE_POLL: Duration = Duration::from_millis(50);
/// After a wake, how long a refused port is retried (the guest's server
/// may still be accepting its restored listen socket's backlog).
const WOKEN_PORT_RETRY: Duration = Duration::from_secs(10);
/// The upgrade protocol of `GET /v1/sandboxes/{id}/tunnel/{port}`.
pub const TCP_UPGRADE: &str = "ember-tcp";
/// Serve one request for a sandbox port.
pub async fn serve(state: AppState, target: Target, req: Request) -> Response {
    let started = Instant::now();
    let result = serve_inner(&state, &target, req, started).await;
    let outcome = match &result {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(e) => e.status.as_u16().to_string(),
    };
    state.metrics.ingress_request(&outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn serve_inner(
    state: &AppState,
    target: &Target,
    mut req: Request,
    started: Instant,
) -> Result<Response, ApiError> {
    let sb = visible(state, &target.sandbox_id).await?;
    if target.form == Form::Host
        && let Some(ticket) = relay::query_param(&target.path_and_query, LINK_PARAM)
    {
        return redeem_link(state, &sb, target, &ticket);
    }
    let strip = authorize(state, &sb, target, req.headers()).await?;
    let (sb, woke) = ensure_running(state, sb).await?;
    let pipe = open_port(state, &sb, target.port, woke.is_some()).await?;
    touch(state, &sb).await;
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let upgrade = relay::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upstream_req = relay::upstream_request(req, target, &strip, client_ip)?;
    let what = format!("port {} in sandbox {}", target.port, sb.id);
    let timeout = state.ingress.config.response_timeout;
    let mut resp = relay::exchange(pipe, upstream_req, upgrade, timeout, &what).await?;
    if let Some(woke) = woke {
        let ms = woke.as_millis().to_string();
        if let Ok(v) = HeaderValue::from_str(&ms) {
            resp.headers_mut().insert("x-ember-woke-ms", v);
        }
        state
            .metrics
            .observe("wake_first_response", started.elapsed().as_secs_f64());
    }
    relay::finish(&target.form, &mut resp);
    Ok(resp)
}

/// The sandbox, unless it does not exist or is destroyed (404 either way).
async fn visible(state: &AppState, id: &str) -> Result<Sandbox, ApiError> {
    state
        .store
        .sandbox(None, id)
        .await?
        .filter(|sb| sb.state != SandboxState::Destroyed)
        .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() }.into())
}

/// May this request reach the sandbox's ports?
async fn authorize(
    state: &AppState,
    sb: &Sandbox,
    target: &Target,
    headers: &HeaderMap,
) -> Result<Strip, ApiError> {
    if sb.ingress.public {
        return Ok(Strip::default());
    }
    let expected = state.ops.traffic_token(&sb.id);
    if let Some(token) = relay::presented_token(headers, &target.form) {
        return if auth::secret_eq(&token, &expected) {
            Ok(Strip::default())
        } else {
            Err(ApiError::unauthorized(format!(
                "wrong traffic token for sandbox {}: use the `traffic_token` of GET /v1/sandboxes/{}",
                sb.id, sb.id
            )))
        };
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .filter(|t| auth::api_key_prefix(t).is_some() || auth::access_token_sandbox(t).is_some());
    if let Some(token) = bearer {
        let allowed = match crate::api::authenticate(state, token).await? {
            Caller::Team {
                team_id,
                role: crate::auth::Role::ReadOnly,
                ..
            } if team_id == sb.team_id => {
                return Err(ApiError::forbidden(
                    "a read-only key cannot reach a sandbox's ports: use a member key or the traffic token",
                ));
            }
            Caller::Team { team_id, .. } => team_id == sb.team_id,
            Caller::Sandbox { sandbox_id, .. } => sandbox_id == sb.id,
        };
        return if allowed {
            Ok(Strip {
                authorization: true,
            })
        } else {
            // As for any other of another team's sandboxes.
            Err(Error::SandboxNotFound { id: sb.id.clone() }.into())
        };
    }
    Err(ApiError::unauthorized(format!(
        "sandbox {id}'s ports are private: send header {TRAFFIC_TOKEN_HEADER}: <traffic_token> \
         (from GET /v1/sandboxes/{id}) or an API key of its team, or make them public with \
         PUT /v1/sandboxes/{id}/ingress {{\"public\": true}}",
        id = sb.id
    )))
}

/// The running sandbox, resumed first if it is paused and may be woken
/// (with how long that took).
async fn ensure_running(
    state: &AppState,
    sb: Sandbox,
) -> Result<(Sandbox, Option<Duration>), ApiError> {
    let wake = state.ingress.config.wake_timeout;
    match sb.state {
        SandboxState::Running => Ok((sb, None)),
        SandboxState::Paused | SandboxState::Pausing | SandboxState::Resuming
            if sb.ingress.auto_resume =>
        {
            let started = Instant::now();
            let deadline = started + wake;
            let mut sb = sb;
            loop {
                match sb.state {
                    SandboxState::Running => break,
                    SandboxState::Paused => {
                        tracing::info!(sandbox = %sb.id, "traffic wakes a paused sandbox");
                        match state
                            .ops
                            .resume(&sb.team_id, &sb.id, None, Default::default())
                            .await
                        {
                            Ok(resumed) => sb = resumed,
                            // Someone else resumed it first: wait for them.
                            Err(Error::StateConflict { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    SandboxState::Pausing | SandboxState::Resuming => {}
                    other => {
                        return Err(not_serving(&sb.id, other));
                    }
                }
                if sb.state == SandboxState::Running {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "wake_timeout",
                        format!(
                            "sandbox {} did not resume within {}s",
                            sb.id,
                            wake.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(WAKE_POLL).await;
                sb = visible(state, &sb.id).await?;
            }
            let took = started.elapsed();
            state.metrics.observe("wake", took.as_secs_f64());
            Ok((sb, Some(took)))
        }
        SandboxState::Paused | SandboxState::Pausing => Err(ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_paused",
            format!(
                "sandbox {id} is paused: resume it (POST /v1/sandboxes/{id}/resume, or \
                 `ember sandbox resume {id}`), or let traffic wake it with \
                 PUT /v1/sandboxes/{id}/ingress {{\"auto_resume\": true}}",
                id = sb.id
            ),
        )),
        other => Err(not_serving(&sb.id, other)),
    }
}

fn not_serving(id: &str, state: SandboxState) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!("sandbox {id} is {state}; its ports are served only while it runs"),
    )
}

/// Open `port` of a running sandbox: 502 naming the port if nothing
/// listens there (retried for a moment after a wake).
pub async fn open_port(
    state: &AppState,
    sb: &Sandbox,
    port: u16,
    just_woken: bool,
) -> Result<DuplexStream, ApiError> {
    let host_id = sb.host_id.clone().unwrap_or_default();
    let mut client = state.hosts.client(&host_id)?;
    let retry_until = Instant::now() + WOKEN_PORT_RETRY;
    loop {
        match tunnel::open(&mut client, &sb.id, port, state.ingress.config.idle_timeout).await {
            Ok(pipe) => return Ok(pipe),
            Err(OpenError::Closed) if just_woken && Instant::now() < retry_until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(OpenError::Closed) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "port_closed",
                    format!(
                        "nothing listens on port {port} in sandbox {}: start a server there \
                         bound to 0.0.0.0 (not 127.0.0.1)",
                        sb.id
                    ),
                ));
            }
            Err(OpenError::Host(status)) => {
                if status.code() == tonic::Code::Unavailable
                    && status
                        .metadata()
                        .contains_key(crate::hosts::AGENT_ERROR_CODE)
                {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "port_unreachable",
                        status.message().to_owned(),
                    ));
                }
                return Err(
                    crate::api::processes::guest_error(state, sb, "OpenPort", status).await,
                );
            }
        }
    }
}

/// Traffic is activity: push the sandbox's expiry out (at most one write
/// every few seconds per sandbox).
async fn touch(state: &AppState, sb: &Sandbox) {
    let next = crate::ttl::extended_expiry(sb.expires_at, sb.timeout_s, now_ms());
    if sb.expires_at.is_none_or(|e| next - e > 5_000) {
        state.ops.touch(sb).await;
    }
}

/// A one-time link's ticket: `{expires_ms}.{nonce}.{signature}`.
pub fn link_ticket(state: &AppState, sandbox_id: &str, port: u16, expires_ms: i64) -> String {
    let nonce = auth::new_nonce();
    let sig = state
        .ops
        .link_signature(sandbox_id, port, expires_ms, &nonce);
    format!("{expires_ms}.{nonce}.{sig}")
}

/// Open a one-time link: set the traffic cookie for this host and send the
/// browser on to the same URL without the ticket.
fn redeem_link(
    state: &AppState,
    sb: &Sandbox,
    target: &Target,
    ticket: &str,
) -> Result<Response, ApiError> {
    let refused = || {
        ApiError::unauthorized(format!(
            "this link to sandbox {} is invalid, expired or already used: ask for a new one \
             (`ember sandbox url {} {} --link`)",
            sb.id, sb.id, target.port
        ))
    };
    let mut parts = ticket.splitn(3, '.');
    let (Some(expires), Some(nonce), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refused());
    };
    let expires_ms: i64 = expires.parse().map_err(|_| refused())?;
    let expected = state
        .ops
        .link_signature(&sb.id, target.port, expires_ms, nonce);
    let now = now_ms();
    if !auth::secret_eq(sig, &expected) || expires_ms <= now {
        return Err(refused());
    }
    if !state.ingress.use_link(nonce, expires_ms, now) {
        return Err(refused());
    }
    let secure = if state.ingress.config.scheme == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{TRAFFIC_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400{secure}",
        state.ops.traffic_token(&sb.id)
    );
    let location = relay::without_param(&target.path_and_query, LINK_PARAM);
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|_| refused())?,
    );
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| refused())?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `GET /v1/sandboxes/{id}/tunnel/{port}` after authentication: answer
/// `101` and splice the upgraded connection to the guest port.
pub async fn serve_tunnel(
    state: &AppState,
    sb: Sandbox,
    port: u16,
    mut req: Request,
) -> Result<Response, ApiError> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TCP_UPGRADE));
    if !wants || !relay::is_upgrade(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!(
                "send `Connection: Upgrade` and `Upgrade: {TCP_UPGRADE}` (`ember sandbox \
                 port-forward` does)"
            ),
        ));
    }
    let (sb, woke) = ensure_running(state, sb).await?;
    let mut pipe = open_port(state, &sb, port, woke.is_some()).await?;
    touch(state, &sb).await;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let id = sb.id.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut pipe).await;
            }
            Err(e) => tracing::debug!(sandbox = %id, error = %e, "tunnel upgrade failed"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    Ok(resp)
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> ApiError {
        ApiError::new(e.status, e.code, e.message)
    }
}
