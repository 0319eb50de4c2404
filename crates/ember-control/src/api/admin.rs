//! Keys, teams, hosts, host registration, health and metrics.
//!
//! A member key manages its own team's keys; an admin key (role `admin`, of
//! a team with `admin: true`) also creates teams, manages any team's keys,
//! sees the hosts and reads the audit log; `/metrics` takes any key of an
//! admin team (a read-only one suffices for a scraper). Host agents register
//! with the cluster join token, not a key.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;

use super::{ApiError, ApiJson, ApiQuery, AppState, Auth, bearer_token, validate_name};
use crate::auth;
use crate::model::{self, now_ms, rfc3339};
use crate::wire;

fn key_to_wire(k: model::ApiKey) -> wire::ApiKey {
    wire::ApiKey {
        id: k.prefix,
        name: k.name,
        team_id: k.team_id,
        created_at: rfc3339(k.created_at),
        last_used_at: k.last_used_at.map(rfc3339),
        revoked_at: k.revoked_at.map(rfc3339),
        role: k.role,
        expires_at: k.expires_at.map(rfc3339),
    }
}

fn team_to_wire(t: model::Team) -> wire::Team {
    wire::Team {
        id: t.id,
        name: t.name,
        admin: t.is_admin,
        created_at: rfc3339(t.created_at),
    }
}

/// Mint a key for `team_id` and store its hash; the key itself is returned once.
pub async fn mint_key(
    store: &crate::store::Store,
    team_id: &str,
    name: &str,
    role: auth::Role,
) -> crate::error::Result<(String, model::ApiKey)> {
    mint_key_shaped(store, team_id, name, role, None, false).await
}

/// [`mint_key`], expiring at `expires_at` (Unix ms) if set, and in E2B's
/// key shape (`e2b_<40 hex>`) when `e2b` is set.
pub async fn mint_key_shaped(
    store: &crate::store::Store,
    team_id: &str,
    name: &str,
    role: auth::Role,
    expires_at: Option<i64>,
    e2b: bool,
) -> crate::error::Result<(String, model::ApiKey)> {
    loop {
        let new = if e2b {
            auth::new_e2b_api_key()
        } else {
            auth::new_api_key()
        };
        let row = model::ApiKey {
            prefix: new.prefix,
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            secret_sha256: new.secret_sha256,
            created_at: now_ms(),
            last_used_at: None,
            revoked_at: None,
            role,
            expires_at,
        };
        // A prefix collision (1 in 36^8) just draws again.
        if store.insert_key(&row).await? {
            return Ok((new.key, row));
        }
    }
}

/// Create an API key (for your team, or any team with an admin key).
#[utoipa::path(
    post, path = "/v1/keys", tag = "keys",
    request_body = wire::CreateKeyRequest,
    responses(
        (status = 201, description = "The key is in `key`, shown only now", body = wire::CreatedKey),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, description = "No such team", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_key(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<wire::CreateKeyRequest>,
) -> Result<
    (
        StatusCode,
        axum::Extension<crate::audit::AuditTarget>,
        Json<wire::CreatedKey>,
    ),
    ApiError,
> {
    let own = auth.team()?.to_owned();
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(ApiError::invalid("name", "must be 1-128 characters"));
    }
    let team_id = req.team_id.clone().unwrap_or_else(|| own.clone());
    if team_id != own {
        auth.admin()?;
    }
    let Some(team) = state.store.team(&team_id).await? else {
        let mut e = ApiError::not_found(format!("no team {team_id}"));
        e.body.field = Some("team_id".into());
        return Err(e);
    };
    let role = req.role.unwrap_or(auth::Role::Member);
    if role == auth::Role::Admin {
        if !auth.is_admin() {
            let mut e = ApiError::forbidden("only an admin key mints admin keys");
            e.body.field = Some("role".into());
            return Err(e);
        }
        if !team.is_admin {
            return Err(ApiError::invalid(
                "role",
                format!(
                    "team {} is not an admin team: its keys may be member or read_only",
                    team.name
                ),
            ));
        }
    }
    const TEN_YEARS_S: u64 = 10 * 366 * 24 * 3600;
    let expires_at = match req.expires_in_s {
        Some(s) if s == 0 || s > TEN_YEARS_S => {
            return Err(ApiError::invalid(
                "expires_in_s",
                format!("must be 1-{TEN_YEARS_S} seconds (or left out: no expiry)"),
            ));
        }
        Some(s) => Some(now_ms() + (s as i64) * 1000),
        None => None,
    };
    let (key, row) =
        mint_key_shaped(&state.store, &team.id, &req.name, role, expires_at, req.e2b).await?;
    Ok((
        StatusCode::CREATED,
        axum::Extension(crate::audit::AuditTarget(row.prefix.clone())),
        Json(wire::CreatedKey {
            key,
            info: key_to_wire(row),
        }),
    ))
}

/// List keys (never the keys themselves).
#[utoipa::path(
    get, path = "/v1/keys", tag = "keys",
    params(wire::KeysQuery),
    responses(
        (status = 200, body = wire::KeyList),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_keys(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<wire::KeysQuery>,
) -> Result<Json<wire::KeyList>, ApiError> {
    let own = auth.team()?.to_owned();
    let team = match q.team_id {
        Some(t) if t != own => {
            auth.admin()?;
            t
        }
        _ => own,
    };
    let keys = state
        .store
        .list_keys(&team)
        .await?
        .into_iter()
        .map(key_to_wire)
        .collect();
    Ok(Json(wire::KeyList { keys }))
}

/// Revoke a key by its ID (prefix). It stops working at once.
#[utoipa::path(
    delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key ID (its prefix)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let own = auth.team()?;
    let scope = if auth.is_admin() { None } else { Some(own) };
    if state.store.revoke_key(scope, &id, now_ms()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no live key {id}")))
    }
}

/// Create a team (admin).
#[utoipa::path(
    post, path = "/v1/teams", tag = "teams",
    request_body = wire::CreateTeamRequest,
    responses(
        (status = 201, body = wire::Team),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 409, description = "The name is taken", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_team(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<wire::CreateTeamRequest>,
) -> Result<(StatusCode, Json<wire::Team>), ApiError> {
    auth.admin()?;
    validate_name("name", &req.name)?;
    let team = model::Team {
        id: ember_types::TeamId::new().to_string(),
        name: req.name.clone(),
        is_admin: req.admin,
        created_at: now_ms(),
    };
    if !state.store.insert_team(&team).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a team named {:?} already exists", req.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(team_to_wire(team))))
}

/// List teams (admin).
#[utoipa::path(
    get, path = "/v1/teams", tag = "teams",
    responses(
        (status = 200, body = wire::TeamList),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_teams(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<wire::TeamList>, ApiError> {
    auth.admin()?;
    let teams = state
        .store
        .list_teams()
        .await?
        .into_iter()
        .map(team_to_wire)
        .collect();
    Ok(Json(wire::TeamList { teams }))
}

async fn hosts_to_wire(
    state: &AppState,
    hosts: Vec<model::Host>,
) -> Result<Vec<wire::Host>, ApiError> {
    let usage = state.store.host_usage().await?;
    let credentials = state.store.host_credentials().await?;
    Ok(hosts
        .into_iter()
        .map(|h| {
            let used = usage.get(&h.id).copied().unwrap_or_default();
            wire::Host {
                revoked_at: credentials
                    .get(&h.id)
                    .and_then(|c| c.revoked_at)
                    .map(rfc3339),
                healthy: state.hosts.is_healthy(&h.id),
                isolation: state
                    .hosts
                    .info(&h.id)
                    .map(|i| i.isolation)
                    .filter(|i| !i.is_empty()),
                id: h.id,
                address: h.address,
                backend: h.backend,
                version: h.version,
                last_error: h.last_error,
                vcpus_total: h.vcpus_total,
                memory_mib_total: h.memory_mib_total,
                vcpus_used: used.vcpus,
                memory_mib_used: used.memory_mib,
                registered_at: rfc3339(h.registered_at),
                last_seen_at: h.last_seen_at.map(rfc3339),
            }
        })
        .collect())
}

/// The host agents (admin).
#[utoipa::path(
    get, path = "/v1/hosts", tag = "hosts",
    responses(
        (status = 200, body = wire::HostList),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_hosts(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<wire::HostList>, ApiError> {
    auth.admin()?;
    let hosts = state.store.list_hosts().await?;
    Ok(Json(wire::HostList {
        hosts: hosts_to_wire(&state, hosts).await?,
    }))
}

/// Register a host agent (called by `ember agent --control-plane URL`).
///
/// A host's first registration presents a join token (a one-time one from
/// `POST /v1/hosts/join-tokens`, or the cluster's) and is answered with the
/// host's own `credential`; every later one (a restart, a new address)
/// presents that credential. A one-time token admits the first host ID
/// that presents it and no other. A host ID is pinned to its credential: a
/// join token alone cannot take over a registered host (409), and a
/// revoked host is refused (403) until removed. The control plane then
/// dials `address` over TLS trusting only `tls_cert`, asks `HostInfo`, and
/// calls the host with its `control_token` from then on.
#[utoipa::path(
    post, path = "/internal/v1/hosts", tag = "internal",
    request_body = wire::RegisterHostRequest,
    responses(
        (status = 200, body = wire::HostRegistration),
        (status = 400, body = wire::ErrorBody),
        (status = 401, description = "Neither a usable join token nor this host's credential", body = wire::ErrorBody),
        (status = 403, description = "The host's credentials were revoked", body = wire::ErrorBody),
        (status = 409, description = "The host ID is registered with another credential", body = wire::ErrorBody),
        (status = 502, description = "The agent could not be reached at that address", body = wire::ErrorBody),
    ),
    security(("join_token" = []))
)]
pub async fn register_host(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::RegisterHostRequest>,
) -> Result<Json<wire::HostRegistration>, ApiError> {
    let presented = bearer_token(&headers)?;
    let by_credential = presented.starts_with(auth::HOST_CREDENTIAL_PREFIX);
    let by_cluster_token = !by_credential
        && state
            .join_token
            .as_deref()
            .is_some_and(|t| auth::secret_eq(presented, t));
    let one_time = match by_credential || by_cluster_token {
        true => None,
        false => Some(
            state
                .store
                .join_token_by_hash(&auth::sha256_hex(presented))
                .await?
                .ok_or_else(|| {
                    ApiError::unauthorized(
                        "neither a join token of this cluster nor a host credential \
                         (an admin makes one: `ember host join-token create`)",
                    )
                })?,
        ),
    };
    check_registration(&req)?;
    let now = model::now_ms();
    if let Some(t) = &one_time {
        join_token_usable(t, &req.host_id, now)?;
    }
    let existing = state.store.host_credential(&req.host_id).await?;
    let revoked = |id: &str| {
        ApiError::forbidden(format!(
            "host {id}'s credentials were revoked; an admin removes it (`ember host remove {id}`) \
             before it may join again"
        ))
    };
    let mut issued = None;
    let cred = if by_credential {
        let Some(c) = existing.filter(|c| {
            c.credential_hash
                .as_deref()
                .is_some_and(|h| auth::digest_matches(presented, h))
        }) else {
            return Err(ApiError::unauthorized(format!(
                "not host {}'s credential (a removed host joins again with the join token)",
                req.host_id
            )));
        };
        if c.revoked_at.is_some() {
            return Err(revoked(&req.host_id));
        }
        model::HostCredential {
            control_token: req.control_token.clone(),
            tls_cert: req.tls_cert.clone(),
            ..c
        }
    } else {
        match &existing {
            Some(c) if c.revoked_at.is_some() => return Err(revoked(&req.host_id)),
            // Only the agent itself knows its control token: this is its
            // first join again (the answer to the last one was lost, or
            // it lost its credential file but kept its identity).
            Some(c) if !auth::secret_eq(&req.control_token, &c.control_token) => {
                tracing::warn!(host = %req.host_id, "refused a join-token registration of a host registered with its own credential");
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "host {} is registered with its own credential; a second agent cannot \
                         take its ID over with the join token (an agent that lost its identity \
                         directory is revoked and removed first: `ember host revoke`, `ember host remove`)",
                        req.host_id
                    ),
                ));
            }
            _ => {}
        }
        // Bound to this host before it is dialled: of two hosts racing
        // with one token, one wins; a retry by the winner is let through.
        if let Some(t) = &one_time
            && !state
                .store
                .claim_join_token(&t.id, &req.host_id, now)
                .await?
        {
            let t = state
                .store
                .join_token_by_hash(&t.token_hash)
                .await?
                .unwrap_or_else(|| t.clone());
            join_token_usable(&t, &req.host_id, now)?;
            return Err(ApiError::unauthorized(format!(
                "join token {} was just used by another host",
                t.id
            )));
        }
        let credential = auth::new_host_credential();
        let cred = model::HostCredential {
            host_id: req.host_id.clone(),
            credential_hash: Some(auth::sha256_hex(&credential)),
            control_token: req.control_token.clone(),
            tls_cert: req.tls_cert.clone(),
            issued_at: model::now_ms(),
            revoked_at: None,
        };
        issued = Some(credential);
        cred
    };
    let host = state.hosts.register(&req.address, cred).await?;
    let mut hosts = hosts_to_wire(&state, vec![host]).await?;
    Ok(Json(wire::HostRegistration {
        host: hosts.remove(0),
        credential: issued,
    }))
}

/// Is one-time join token `t` one that host `host_id` may join with now?
/// Each refusal says what the operator does about it.
fn join_token_usable(t: &model::JoinToken, host_id: &str, now: i64) -> Result<(), ApiError> {
    let another = "create another with `ember host join-token create`";
    if t.revoked_at.is_some() {
        return Err(ApiError::unauthorized(format!(
            "join token {} was revoked (or the host it admitted was removed); {another}",
            t.id
        )));
    }
    if t.expires_at <= now {
        return Err(ApiError::unauthorized(format!(
            "join token {} expired at {}; {another}",
            t.id,
            rfc3339(t.expires_at)
        )));
    }
    match &t.used_by_host {
        Some(h) if h != host_id => Err(ApiError::unauthorized(format!(
            "join token {} already admitted host {h}: each admits one host; {another}",
            t.id
        ))),
        _ => Ok(()),
    }
}

fn join_token_to_wire(t: model::JoinToken, now: i64) -> wire::JoinToken {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.used_at.is_some() {
        "used"
    } else if t.expires_at <= now {
        "expired"
    } else {
        "unused"
    };
    wire::JoinToken {
        id: t.id,
        state: state.into(),
        created_at: rfc3339(t.created_at),
        expires_at: rfc3339(t.expires_at),
        used_at: t.used_at.map(rfc3339),
        used_by_host: t.used_by_host,
        revoked_at: t.revoked_at.map(rfc3339),
    }
}

/// Create a one-time join token (admin): it admits one host, once, before
/// it expires. The token is in the answer only.
#[utoipa::path(
    post, path = "/v1/hosts/join-tokens", tag = "hosts",
    request_body = wire::CreateJoinTokenRequest,
    responses(
        (status = 201, description = "The token is in `token`, shown only now", body = wire::CreatedJoinToken),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_join_token(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<wire::CreateJoinTokenRequest>,
) -> Result<
    (
        StatusCode,
        axum::Extension<crate::audit::AuditTarget>,
        Json<wire::CreatedJoinToken>,
    ),
    ApiError,
> {
    auth.admin()?;
    const WEEK_S: u64 = 7 * 24 * 3600;
    let ttl_s = req.expires_in_s.unwrap_or(3600);
    if !(60..=WEEK_S).contains(&ttl_s) {
        return Err(ApiError::invalid(
            "expires_in_s",
            format!("must be 60-{WEEK_S} seconds (default 3600)"),
        ));
    }
    let (id, token) = auth::new_one_time_join_token();
    let now = now_ms();
    let row = model::JoinToken {
        id: id.clone(),
        token_hash: auth::sha256_hex(&token),
        created_at: now,
        expires_at: now + (ttl_s as i64) * 1000,
        created_by: match &auth.0 {
            auth::Caller::Team { key_prefix, .. } => Some(key_prefix.clone()),
            auth::Caller::Sandbox { .. } => None,
        },
        used_at: None,
        used_by_host: None,
        revoked_at: None,
    };
    state.store.insert_join_token(&row).await?;
    tracing::info!(join_token = %id, ttl_s, "one-time join token created");
    Ok((
        StatusCode::CREATED,
        axum::Extension(crate::audit::AuditTarget(format!("join-token:{id}"))),
        Json(wire::CreatedJoinToken {
            token,
            info: join_token_to_wire(row, now),
        }),
    ))
}

/// List one-time join tokens (admin; never the tokens themselves).
#[utoipa::path(
    get, path = "/v1/hosts/join-tokens", tag = "hosts",
    responses(
        (status = 200, body = wire::JoinTokenList),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_join_tokens(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<wire::JoinTokenList>, ApiError> {
    auth.admin()?;
    let now = now_ms();
    const MONTH_MS: i64 = 30 * 24 * 3600 * 1000;
    let tokens = state.store.list_join_tokens(now - MONTH_MS).await?;
    Ok(Json(wire::JoinTokenList {
        tokens: tokens
            .into_iter()
            .map(|t| join_token_to_wire(t, now))
            .collect(),
    }))
}

/// Revoke a one-time join token (admin). A host it already admitted keeps
/// its own credential (`ember host revoke` takes that away).
#[utoipa::path(
    delete, path = "/v1/hosts/join-tokens/{id}", tag = "hosts",
    params(("id" = String, Path, description = "Join token ID (`jt_…`)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn revoke_join_token(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(axum::Extension<crate::audit::AuditTarget>, StatusCode), ApiError> {
    auth.admin()?;
    if !state.store.revoke_join_token(&id, now_ms()).await? {
        return Err(ApiError::not_found(format!("no join token {id}")));
    }
    Ok((
        axum::Extension(crate::audit::AuditTarget(format!("join-token:{id}"))),
        StatusCode::NO_CONTENT,
    ))
}

/// Bounds and shapes of a registration, each refusal naming its field.
fn check_registration(req: &wire::RegisterHostRequest) -> Result<(), ApiError> {
    let uri: http::Uri = req
        .address
        .parse()
        .map_err(|_| ApiError::invalid("address", "must be a URL like https://10.0.0.2:7001"))?;
    let loopback = uri.host().is_some_and(|h| {
        h == "localhost"
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match uri.scheme_str() {
        Some("https") if uri.host().is_some() => {}
        Some("http") if loopback => {}
        Some("http") => {
            return Err(ApiError::invalid(
                "address",
                "control-plane traffic to a host goes over TLS: an http:// address is \
                 accepted only on loopback (agents that join advertise https://)",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "address",
                "must be a URL like https://10.0.0.2:7001",
            ));
        }
    }
    if req.host_id.parse::<ember_types::HostId>().is_err() {
        return Err(ApiError::invalid(
            "host_id",
            "must be the ID the agent keeps in <data_dir>/host-id",
        ));
    }
    let token_ok = req.control_token.len() >= 32
        && req.control_token.len() <= 256
        && req.control_token.bytes().all(|b| b.is_ascii_graphic());
    if !token_ok {
        return Err(ApiError::invalid(
            "control_token",
            "must be 32–256 printable ASCII characters",
        ));
    }
    match &req.tls_cert {
        Some(pem) if pem.len() > 16 * 1024 || !pem.contains("-----BEGIN CERTIFICATE-----") => {
            return Err(ApiError::invalid(
                "tls_cert",
                "must be one PEM certificate (at most 16 KiB)",
            ));
        }
        None if uri.scheme_str() == Some("https") => {
            return Err(ApiError::invalid(
                "tls_cert",
                "an https:// host sends its certificate, which the control plane pins",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Revoke a host's credentials (admin): the control plane stops calling it
/// and refuses its registrations, with its credential or the join token,
/// until it is removed. Its sandboxes are reported lost as the host stays
/// unreachable.
#[utoipa::path(
    post, path = "/v1/hosts/{id}/revoke", tag = "hosts",
    params(("id" = String, Path, description = "Host ID")),
    responses(
        (status = 200, body = wire::Host),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn revoke_host(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(axum::Extension<crate::audit::AuditTarget>, Json<wire::Host>), ApiError> {
    auth.admin()?;
    let Some(host) = state.store.host(&id).await? else {
        return Err(ApiError::not_found(format!("no host {id}")));
    };
    let now = model::now_ms();
    if !state.store.revoke_host_credential(&id, now).await? {
        // Registered before per-host credentials: a tombstone keeps it out.
        state
            .store
            .put_host_credential(&model::HostCredential {
                host_id: id.clone(),
                credential_hash: None,
                control_token: String::new(),
                tls_cert: None,
                issued_at: now,
                revoked_at: Some(now),
            })
            .await?;
    }
    state.hosts.forget(&id);
    state
        .store
        .set_host_health(&id, false, Some("credentials revoked"), None)
        .await?;
    tracing::warn!(host = %id, "host credentials revoked");
    let host = state.store.host(&id).await?.unwrap_or(host);
    let mut hosts = hosts_to_wire(&state, vec![host]).await?;
    Ok((
        axum::Extension(crate::audit::AuditTarget(format!("host:{id}"))),
        Json(hosts.remove(0)),
    ))
}

/// Remove a revoked host (admin): its row and credentials are deleted, so
/// the machine may join again (as a new registration with the join token).
/// Refused while sandboxes other than destroyed ones still name it.
#[utoipa::path(
    delete, path = "/v1/hosts/{id}", tag = "hosts",
    params(("id" = String, Path, description = "Host ID")),
    responses(
        (status = 204),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not revoked, or sandboxes still on it", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn remove_host(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(axum::Extension<crate::audit::AuditTarget>, StatusCode), ApiError> {
    auth.admin()?;
    if state.store.host(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no host {id}")));
    }
    let revoked = state
        .store
        .host_credential(&id)
        .await?
        .is_some_and(|c| c.revoked_at.is_some());
    if !revoked {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("host {id} is not revoked: `ember host revoke {id}` first"),
        ));
    }
    let on_it = state.store.sandboxes_on_host(&id, i64::MAX).await?.len();
    if on_it > 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "{on_it} sandbox(es) still name host {id}: destroy them first (they are lost with it)"
            ),
        ));
    }
    state.store.delete_host(&id, now_ms()).await?;
    state.hosts.forget(&id);
    Ok((
        axum::Extension(crate::audit::AuditTarget(format!("host:{id}"))),
        StatusCode::NO_CONTENT,
    ))
}

/// Liveness and database reachability (no authentication).
#[utoipa::path(
    get, path = "/healthz", tag = "system",
    responses(
        (status = 200, body = wire::Health),
        (status = 503, description = "The database does not answer", body = wire::ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Result<Json<wire::Health>, ApiError> {
    state.store.count_teams().await.map_err(|e| {
        tracing::error!(error = %e, "health check: database");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database does not answer",
        )
    })?;
    Ok(Json(wire::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// Prometheus metrics (text exposition format). Takes a key of an admin
/// team; a `read_only` one is enough for a scraper (Prometheus:
/// `authorization: {credentials_file: …}`).
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = wire::ErrorBody),
        (status = 403, description = "Not a key of an admin team", body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn metrics(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<impl IntoResponse, ApiError> {
    let team = auth.team()?;
    let admin_team = state.store.team(team).await?.is_some_and(|t| t.is_admin);
    if !admin_team {
        return Err(ApiError::forbidden(
            "metrics cover every team: use a key of an admin team (read_only is enough)",
        ));
    }
    let counts = state.store.count_by_state().await?;
    state.metrics.set_sandbox_counts(&counts);
    let infos = state.hosts.infos();
    let hosts: Vec<crate::metrics::HostReport> = state
        .hosts
        .host_ids()
        .into_iter()
        .map(|id| crate::metrics::HostReport {
            healthy: state.hosts.is_healthy(&id),
            info: infos.iter().find(|(h, _)| *h == id).map(|(_, i)| i.clone()),
            id,
        })
        .collect();
    state.metrics.set_hosts(&hosts);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    ))
}

/// The audit log (admin): every authenticated call that changed something,
/// newest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    params(wire::AuditQuery),
    responses(
        (status = 200, body = wire::AuditList),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_audit(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<wire::AuditQuery>,
) -> Result<Json<wire::AuditList>, ApiError> {
    auth.admin()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be 1-1000"));
    }
    let entries = state
        .store
        .list_audit(
            q.team_id.as_deref(),
            q.target.as_deref(),
            q.before.as_deref(),
            limit,
        )
        .await?;
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    Ok(Json(wire::AuditList {
        entries: entries
            .into_iter()
            .map(|e| wire::AuditEntry {
                id: e.id,
                at: rfc3339(e.at),
                team_id: e.team_id,
                actor: e.actor,
                method: e.method,
                route: e.route,
                target: e.target,
                status: e.status,
            })
            .collect(),
        next_before,
    }))
}

/// What a team holds against its limits: your own team with any key, any
/// team with an admin key.
#[utoipa::path(
    get, path = "/v1/teams/{id}/usage", tag = "teams",
    params(("id" = String, Path, description = "Team ID, or `me` for the caller's team")),
    responses(
        (status = 200, body = wire::TeamUsage),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn team_usage(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<wire::TeamUsage>, ApiError> {
    let own = auth.team()?;
    let id = if id == "me" { own.to_owned() } else { id };
    if id != own {
        // Another team's usage is an admin's business; to others it does
        // not exist.
        if !auth.is_admin() {
            return Err(ApiError::not_found(format!("no team {id}")));
        }
        if state.store.team(&id).await?.is_none() {
            return Err(ApiError::not_found(format!("no team {id}")));
        }
    }
    let used = state.store.team_usage(&id).await?;
    let quota = state.ops.quota;
    let rate = state.limiter.limits();
    let item = |used, limit| wire::UsageItem { used, limit };
    Ok(Json(wire::TeamUsage {
        team_id: id,
        running_sandboxes: item(used.running_sandboxes, quota.running_sandboxes),
        vcpus: item(used.vcpus, quota.vcpus),
        memory_mib: item(used.memory_mib, quota.memory_mib),
        paused_sandboxes: item(used.paused_sandboxes, quota.paused_sandboxes),
        templates: item(used.templates, quota.templates),
        storage_mib: item(used.storage_mib(), quota.storage_mib),
        requests_per_second: rate.per_second,
        request_burst: rate.burst,
        concurrent_requests: rate.concurrent,
        max_running_s: state.ops.lifetime.max_running_s,
        paused_retention_s: state.ops.lifetime.paused_retention_s,
    }))
}
