//! `/v1/sandboxes`: create, list, get, delete, pause, resume, timeout, snapshot.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{
    ApiError, ApiJson, ApiQuery, AppState, Auth, check_allow_out, sandbox_id, validate_cidr,
    validate_name,
};
use crate::lifecycle::{BASE_TEMPLATE, CreateSpec};
use crate::model::{self, SandboxState, now_ms, rfc3339};
use crate::store::{PageAfter, SandboxFilter};
use crate::wire;

pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;
const MAX_METADATA: usize = 64;
const MAX_ENV: usize = 256;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub(super) fn to_wire(state: &AppState, sb: model::Sandbox) -> wire::Sandbox {
    let traffic_token = state.ops.traffic_token(&sb.id);
    let port_url = state
        .ingress
        .config
        .host_url(&sb.id, 0)
        .map(|u| u.replacen("0-", "{port}-", 1))
        .unwrap_or_else(|| format!("/v1/sandboxes/{}/ports/{{port}}/", sb.id));
    let direct_port_url = sb
        .host_id
        .as_deref()
        .filter(|_| sb.state == SandboxState::Running)
        .and_then(|h| state.hosts.ingress_url(h))
        .and_then(|u| {
            let (scheme, domain) = u.split_once("://")?;
            Some(format!("{scheme}://{{port}}-{}.{domain}/", sb.id))
        });
    wire::Sandbox {
        id: sb.id,
        state: sb.state,
        template: sb.template,
        host_id: sb.host_id,
        vcpus: sb.vcpus,
        memory_mib: sb.memory_mib,
        metadata: sb.metadata,
        network: wire::NetworkPolicy {
            allow_out: sb.network.allow_out,
            deny_out: sb.network.deny_out,
        },
        timeout_s: sb.timeout_s,
        on_timeout: sb.on_timeout,
        expires_at: sb.expires_at.map(rfc3339),
        failure_reason: sb.failure_reason,
        created_at: rfc3339(sb.created_at),
        state_changed_at: rfc3339(sb.state_changed_at),
        last_operation: sb.last_operation,
        public: sb.ingress.public,
        auto_resume: sb.ingress.auto_resume,
        traffic_token,
        domain: state.ingress.config.domain.clone(),
        port_url,
        direct_port_url,
        access_token: None,
    }
}

pub(crate) fn validate_timeout(timeout_s: u64) -> Result<(), ApiError> {
    if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
        return Err(ApiError::invalid(
            "timeout_s",
            format!("must be between 1 and {MAX_TIMEOUT_S} seconds"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_ENV} variables"),
        ));
    }
    for (k, v) in env {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(ApiError::invalid(
                &format!("{field}.{k}"),
                "variable names are letters, digits and _, not starting with a digit",
            ));
        }
        if v.contains('\0') || v.len() > 32 * 1024 {
            return Err(ApiError::invalid(
                &format!("{field}.{k}"),
                "values are at most 32 KiB, without NUL",
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > MAX_METADATA {
        return Err(ApiError::invalid(
            "metadata",
            format!("at most {MAX_METADATA} entries"),
        ));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > 256 || k.contains('=') || k.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "metadata",
                format!("key {k:?}: 1-256 characters, no '=' or control characters"),
            ));
        }
        if v.len() > 1024 || v.contains('\0') {
            return Err(ApiError::invalid(
                &format!("metadata.{k}"),
                "values are at most 1024 bytes, without NUL",
            ));
        }
    }
    Ok(())
}

/// Create a sandbox.
#[utoipa::path(
    post, path = "/v1/sandboxes", tag = "sandboxes",
    request_body = wire::CreateSandboxRequest,
    responses(
        (status = 201, description = "Created and running; `access_token` is shown only here", body = wire::Sandbox),
        (status = 400, description = "Invalid input (the `field` names it)", body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, description = "No such template", body = wire::ErrorBody),
        (status = 413, body = wire::ErrorBody),
        (status = 422, description = "vcpus/memory_mib differ from the template's locked values", body = wire::ErrorBody),
        (status = 502, description = "The host failed to start it", body = wire::ErrorBody),
        (status = 503, description = "No host has capacity (`no_capacity`)", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<wire::CreateSandboxRequest>,
) -> Result<
    (
        StatusCode,
        axum::Extension<crate::audit::AuditTarget>,
        Json<wire::Sandbox>,
    ),
    ApiError,
> {
    let team = auth.team()?.to_owned();
    if req.template != BASE_TEMPLATE {
        validate_name("template", &req.template)?;
    }
    if let Some(v) = req.vcpus
        && !(1..=MAX_VCPUS).contains(&v)
    {
        return Err(ApiError::invalid(
            "vcpus",
            format!("must be between 1 and {MAX_VCPUS}"),
        ));
    }
    if let Some(m) = req.memory_mib
        && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m)
    {
        return Err(ApiError::invalid(
            "memory_mib",
            format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"),
        ));
    }
    validate_timeout(req.timeout_s)?;
    validate_metadata(&req.metadata)?;
    validate_env("env", &req.env)?;
    validate_network(&req.network, &state.ops.egress_for(&team).await?)?;
    if req.cold && req.template != crate::lifecycle::BASE_TEMPLATE {
        return Err(ApiError::invalid(
            "cold",
            "applies to `base` only: a template is always forked from its snapshot",
        ));
    }
    let spec = CreateSpec {
        team_id: team,
        template: req.template,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        timeout_s: req.timeout_s,
        on_timeout: req.on_timeout,
        metadata: req.metadata,
        env: req.env,
        network: model::NetworkPolicy {
            allow_out: req.network.allow_out,
            deny_out: req.network.deny_out,
        },
        cold: req.cold,
        ingress: model::Ingress {
            public: req.public,
            auto_resume: req.auto_resume,
        },
        image: None,
    };
    let (sb, token) = state.ops.create(spec).await?;
    let mut out = to_wire(&state, sb);
    out.access_token = Some(token);
    Ok((
        StatusCode::CREATED,
        axum::Extension(crate::audit::AuditTarget(out.id.clone())),
        Json(out),
    ))
}

pub(crate) fn page_token(after: &PageAfter) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", after.created_at, after.id))
}

pub(crate) fn parse_page_token(token: &str) -> Option<PageAfter> {
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (ts, id) = raw.split_once(':')?;
    Some(PageAfter {
        created_at: ts.parse().ok()?,
        id: id.parse::<ember_types::SandboxId>().ok()?.to_string(),
    })
}

/// List your team's sandboxes, newest first.
#[utoipa::path(
    get, path = "/v1/sandboxes", tag = "sandboxes",
    params(
        wire::ListSandboxesQuery,
        ("metadata.KEY" = Option<String>, Query, description = "Only sandboxes whose metadata KEY equals this value; repeat for several keys"),
    ),
    responses(
        (status = 200, body = wire::SandboxList),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_sandboxes(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(params): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<wire::SandboxList>, ApiError> {
    let team = auth.team()?;
    let mut filter = SandboxFilter::default();
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    for (k, v) in params {
        match k.as_str() {
            "state" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    let st: SandboxState = s
                        .parse()
                        .map_err(|e: String| ApiError::invalid("state", e))?;
                    filter.states.push(st);
                }
            }
            "template" => filter.template = Some(v),
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("must be between 1 and {MAX_PAGE}"))
                    })?;
            }
            "page_token" => {
                after = Some(parse_page_token(&v).ok_or_else(|| {
                    ApiError::invalid("page_token", "not a token from a previous page")
                })?);
            }
            other => match other.strip_prefix("metadata.") {
                Some(key) if !key.is_empty() => {
                    filter.metadata.insert(key.to_owned(), v);
                }
                _ => {
                    return Err(ApiError::invalid(
                        other,
                        "unknown parameter: use state, template, limit, page_token or metadata.KEY",
                    ));
                }
            },
        }
    }
    // One extra row tells whether another page exists.
    let mut rows = state
        .store
        .list_sandboxes(team, &filter, after.as_ref(), limit + 1)
        .await?;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| {
            page_token(&PageAfter {
                created_at: r.created_at,
                id: r.id.clone(),
            })
        })
    } else {
        None
    };
    Ok(Json(wire::SandboxList {
        sandboxes: rows.into_iter().map(|sb| to_wire(&state, sb)).collect(),
        next_page_token: next,
    }))
}

/// Get one sandbox (destroyed ones are kept for a day).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))?;
    Ok(Json(to_wire(&state, sb)))
}

/// Destroy a sandbox (running, paused or failed) and everything it holds.
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 204, description = "Destroyed"),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "An operation is in progress, or it is already destroyed", body = wire::ErrorBody),
        (status = 502, description = "The host did not answer; the destroy is retried in the background", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    state.ops.destroy(Some(team), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a running sandbox: its memory and disk become a build; it holds no
/// CPU or memory until resumed. Paused sandboxes do not time out. A pause
/// that takes longer than the server's `answer_within` (a large sandbox) is
/// answered 202 with the sandbox still `pausing`: it goes on to its end;
/// poll `GET /v1/sandboxes/{id}` until the sandbox is `paused`.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 202, description = "Still pausing; poll the sandbox (see Location)", body = wire::Sandbox),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running", body = wire::ErrorBody),
        (status = 502, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn pause_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let team = auth.team()?.to_owned();
    let id = sandbox_id(&id)?;
    let ops = state.ops.clone();
    let op = {
        let (team, id) = (team.clone(), id.clone());
        async move { ops.pause(Some(&team), &id).await }
    };
    answer_or_accept(&state, &team, &id, op, |sb| {
        Json(to_wire(&state, sb)).into_response()
    })
    .await
}

/// Run a pause, resume or snapshot in a task of its own, so that it goes on to its
/// end whatever becomes of this request (a client that hangs up, a proxy's
/// timeout); answer with its result if it ends within `answer_within`, or
/// else `202 Accepted` with the sandbox as it is now and a `Location` to
/// poll.
async fn answer_or_accept<T: Send + 'static>(
    state: &AppState,
    team: &str,
    id: &str,
    op: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
    answer: impl FnOnce(T) -> Response,
) -> Result<Response, ApiError> {
    let mut task = tokio::spawn(op);
    match tokio::time::timeout(state.answer_within, &mut task).await {
        Ok(Ok(result)) => Ok(answer(result?)),
        Ok(Err(join)) => {
            tracing::error!(sandbox = %id, error = %join, "a lifecycle task stopped unexpectedly");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server's log",
            ))
        }
        Err(_) => {
            tracing::info!(sandbox = %id, after_s = state.answer_within.as_secs_f64(), "still in progress; answering 202");
            let sb = state
                .store
                .sandbox(Some(team), id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))?;
            Ok((
                StatusCode::ACCEPTED,
                [(header::LOCATION, format!("/v1/sandboxes/{id}"))],
                Json(to_wire(state, sb)),
            )
                .into_response())
        }
    }
}

/// Resume a paused sandbox on the host that holds its build. Like a pause,
/// one that takes longer than `answer_within` is answered 202 (`resuming`).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body(content = wire::ResumeRequest, description = "Optional: an empty body keeps the timeout and env"),
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 202, description = "Still resuming; poll the sandbox (see Location)", body = wire::Sandbox),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not paused", body = wire::ErrorBody),
        (status = 502, body = wire::ErrorBody),
        (status = 503, description = "Its host is down or full", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn resume_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let team = auth.team()?.to_owned();
    let id = sandbox_id(&id)?;
    let req: wire::ResumeRequest = if body.is_empty() {
        wire::ResumeRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
            err.body.field = super::serde_field(&e.to_string());
            err
        })?
    };
    if let Some(t) = req.timeout_s {
        validate_timeout(t)?;
    }
    validate_env("env", &req.env)?;
    let ops = state.ops.clone();
    let op = {
        let (team, id) = (team.clone(), id.clone());
        async move { ops.resume(&team, &id, req.timeout_s, req.env).await }
    };
    answer_or_accept(&state, &team, &id, op, |sb| {
        Json(to_wire(&state, sb)).into_response()
    })
    .await
}

/// Set a running sandbox's timeout: it now expires `timeout_s` from now.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::TimeoutRequest,
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn set_sandbox_timeout(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::TimeoutRequest>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    validate_timeout(req.timeout_s)?;
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))?;
    let expires = now_ms().saturating_add(req.timeout_s as i64 * 1000);
    if !state
        .store
        .set_expiry(Some(team), &id, expires, false)
        .await?
    {
        return Err(crate::error::Error::NotRunning {
            id,
            state: sb.state,
        }
        .into());
    }
    state.store.set_timeout(team, &id, req.timeout_s).await?;
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))?;
    Ok(Json(to_wire(&state, sb)))
}

/// Replace a running or paused sandbox's egress rules. A running sandbox's
/// filter changes at once; a paused one resumes with the new rules.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/network", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::NetworkPolicy,
    responses(
        (status = 200, body = wire::Sandbox),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Neither running nor paused", body = wire::ErrorBody),
        (status = 502, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn set_sandbox_network(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::NetworkPolicy>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    let team = auth.team()?;
    let id = sandbox_id(&id)?;
    validate_network(&req, &state.ops.egress_for(team).await?)?;
    let sb = state
        .ops
        .set_network(
            team,
            &id,
            model::NetworkPolicy {
                allow_out: req.allow_out,
                deny_out: req.deny_out,
            },
        )
        .await?;
    Ok(Json(to_wire(&state, sb)))
}

pub(crate) fn validate_network(
    n: &wire::NetworkPolicy,
    ceiling: &ember_types::cidr::EgressCeiling,
) -> Result<(), ApiError> {
    for (field, rules) in [
        ("network.allow_out", &n.allow_out),
        ("network.deny_out", &n.deny_out),
    ] {
        if rules.len() > super::MAX_NETWORK_RULES {
            return Err(ApiError::invalid(
                field,
                format!("at most {} rules", super::MAX_NETWORK_RULES),
            ));
        }
    }
    for (i, c) in n.allow_out.iter().enumerate() {
        validate_cidr(&format!("network.allow_out[{i}]"), c)?;
    }
    for (i, c) in n.deny_out.iter().enumerate() {
        validate_cidr(&format!("network.deny_out[{i}]"), c)?;
    }
    for (i, c) in n.allow_out.iter().enumerate() {
        check_allow_out(ceiling, &format!("network.allow_out[{i}]"), c)?;
    }
    Ok(())
}

/// Freeze a running sandbox into a named template (it keeps running). A
/// snapshot that takes longer than the server's `answer_within` (a large
/// sandbox) is answered 202 with the sandbox still `snapshotting`: poll
/// `GET /v1/sandboxes/{id}` until it is `running` again, then
/// `GET /v1/snapshots/{name}`; a 404 there means the snapshot failed (the
/// server's log says why) and the sandbox runs on unchanged.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/snapshots", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::CreateSnapshotRequest,
    responses(
        (status = 201, body = wire::Snapshot),
        (status = 202, description = "Still snapshotting; poll the sandbox (see Location), then the snapshot", body = wire::Sandbox),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running, or the name is taken", body = wire::ErrorBody),
        (status = 502, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn snapshot_sandbox(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::CreateSnapshotRequest>,
) -> Result<Response, ApiError> {
    let team = auth.team()?.to_owned();
    let id = sandbox_id(&id)?;
    validate_name("name", &req.name)?;
    if req.name == BASE_TEMPLATE {
        return Err(ApiError::invalid(
            "name",
            "\"base\" is reserved for the base image",
        ));
    }
    let ops = state.ops.clone();
    let op = {
        let (team, id) = (team.clone(), id.clone());
        async move { ops.snapshot(&team, &id, &req.name).await }
    };
    answer_or_accept(&state, &team, &id, op, |t| {
        (StatusCode::CREATED, Json(super::snapshots::to_wire(t))).into_response()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let a = PageAfter {
            created_at: 1_700_000_000_000,
            id: ember_types::SandboxId::new().to_string(),
        };
        assert_eq!(parse_page_token(&page_token(&a)), Some(a));
        assert_eq!(parse_page_token("nope"), None);
        assert_eq!(
            parse_page_token(&URL_SAFE_NO_PAD.encode("1:'; DROP TABLE")),
            None
        );
    }
}
