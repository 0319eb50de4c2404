//! E2B's control-plane REST API over Ember's lifecycle: E2B's paths, field
//! names, status codes and `{code, message}` error bodies (`code` is the
//! HTTP status), authenticated by `X-API-Key` with any Ember key.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, sandbox_id};
use crate::auth::Caller;
use crate::lifecycle::{BASE_TEMPLATE, CreateSpec};
use crate::model::{self, OnTimeout, Sandbox, SandboxState, now_ms, rfc3339};
use crate::store::{PageAfter, SandboxFilter};

/// The envd version Ember answers as: what its envd layer implements
/// (stdin, the default user, CloseStdin, octet-stream uploads), and not
/// what it does not (file metadata from 0.6.2, directory watching).
pub const ENVD_VERSION: &str = "0.5.7";
/// The base image's disk (ember-image's `DEFAULT_DISK_SIZE`).
const DISK_SIZE_MB: u32 = 2048;
/// E2B's default sandbox timeout.
const DEFAULT_TIMEOUT_S: u64 = 300;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// E2B's REST routes (no fallback: they sit beside Ember's own).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", axum::routing::delete(delete_template))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(update_network),
        )
}

/// An E2B error: the status, and `{"code": <status>, "message": …}`.
#[derive(Debug)]
pub struct E2bError {
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn bad(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(id: &str) -> E2bError {
        E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> E2bError {
        let mut out = E2bError::new(e.status, e.body.message);
        out.retry_after_s = e.retry_after_s;
        out
    }
}

impl From<crate::error::Error> for E2bError {
    fn from(e: crate::error::Error) -> E2bError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        resp
    }
}

type E2bResult<T> = Result<T, E2bError>;

/// [`team`], for calls that change something or reach into a guest:
/// refused to read-only keys.
async fn team_that_writes(state: &AppState, headers: &HeaderMap) -> E2bResult<String> {
    let (team, role) = team_and_role(state, headers).await?;
    if role == crate::auth::Role::ReadOnly {
        return Err(crate::api::read_only_refusal().into());
    }
    Ok(team)
}

async fn team(state: &AppState, headers: &HeaderMap) -> E2bResult<String> {
    Ok(team_and_role(state, headers).await?.0)
}

async fn team_and_role(
    state: &AppState,
    headers: &HeaderMap,
) -> E2bResult<(String, crate::auth::Role)> {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            E2bError::new(
                StatusCode::UNAUTHORIZED,
                "missing X-API-Key: set E2B_API_KEY to an Ember API key",
            )
        })?;
    match crate::api::authenticate(state, key.trim()).await? {
        Caller::Team { team_id, role, .. } => Ok((team_id, role)),
        Caller::Sandbox { .. } => Err(E2bError::new(
            StatusCode::UNAUTHORIZED,
            "a sandbox access token is not an API key",
        )),
    }
}

/// E2B's sandbox states: anything on its way to or from running counts as
/// running, a pause in progress as paused.
fn e2b_state(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Paused | SandboxState::Pausing => "paused",
        _ => "running",
    }
}

fn visible(sb: &Sandbox) -> bool {
    !matches!(sb.state, SandboxState::Destroyed | SandboxState::Destroying)
}

/// The reply to create and connect.
fn sandbox_json(state: &AppState, sb: &Sandbox) -> Value {
    json!({
        "templateID": sb.template,
        "sandboxID": sb.id,
        "alias": sb.template,
        "clientID": sb.host_id.clone().unwrap_or_else(|| "ember".into()),
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": state.ops.access_token(&sb.id),
        "domain": domain(state),
        "trafficAccessToken": traffic_token(state, sb),
    })
}

/// The ingress domain, which E2B's SDKs build `get_host(port)` from.
fn domain(state: &AppState) -> Value {
    state
        .ingress
        .config
        .domain
        .as_ref()
        .map_or(Value::Null, |d| json!(d))
}

/// E2B hands out a traffic token only for sandboxes without public traffic.
fn traffic_token(state: &AppState, sb: &Sandbox) -> Value {
    if sb.ingress.public {
        Value::Null
    } else {
        json!(state.ops.traffic_token(&sb.id))
    }
}

fn end_at(sb: &Sandbox) -> i64 {
    sb.expires_at
        .unwrap_or(sb.state_changed_at + sb.timeout_s as i64 * 1000)
}

fn listed_json(sb: &Sandbox) -> Value {
    json!({
        "templateID": sb.template,
        "alias": sb.template,
        "sandboxID": sb.id,
        "clientID": sb.host_id.clone().unwrap_or_else(|| "ember".into()),
        "startedAt": rfc3339(sb.created_at),
        "endAt": rfc3339(end_at(sb)),
        "cpuCount": sb.vcpus,
        "memoryMB": sb.memory_mib,
        "diskSizeMB": DISK_SIZE_MB,
        "state": e2b_state(sb.state),
        "envdVersion": ENVD_VERSION,
        "metadata": sb.metadata,
    })
}

fn detail_json(state: &AppState, sb: &Sandbox) -> Value {
    let mut v = listed_json(sb);
    v["envdAccessToken"] = json!(state.ops.access_token(&sb.id));
    v["domain"] = domain(state);
    v["trafficAccessToken"] = traffic_token(state, sb);
    v["allowInternetAccess"] = json!(!denies_all(&sb.network));
    v["lifecycle"] = json!({
        "autoResume": sb.ingress.auto_resume,
        "onTimeout": match sb.on_timeout { OnTimeout::Pause => "pause", OnTimeout::Kill => "kill" },
    });
    v["network"] = json!({"allowOut": sb.network.allow_out, "denyOut": sb.network.deny_out});
    v
}

/// Everything a guest could reach: IPv4 only, since a guest's IPv6 traffic
/// is always dropped (and host agents refuse IPv6 rules).
const ALL_V4: &str = "0.0.0.0/0";

fn denies_all(n: &model::NetworkPolicy) -> bool {
    n.deny_out.iter().any(|c| c == ALL_V4) && n.allow_out.is_empty()
}

fn body_json(body: &Bytes) -> E2bResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| E2bError::bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(E2bError::bad("the body must be a JSON object"));
    }
    Ok(v)
}

fn string_map(v: &Value, name: &str) -> E2bResult<BTreeMap<String, String>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_owned()))
                    .ok_or_else(|| E2bError::bad(format!("{name}.{k} must be a string")))
            })
            .collect(),
        Some(_) => Err(E2bError::bad(format!(
            "{name} must be an object of strings"
        ))),
    }
}

fn strings(v: Option<&Value>, name: &str) -> E2bResult<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| E2bError::bad(format!("{name} must be a list of strings")))
            })
            .collect(),
        Some(_) => Err(E2bError::bad(format!("{name} must be a list of strings"))),
    }
}

/// E2B's egress options as Ember's rules: `allowOut`/`denyOut` of `net`
/// (field names in errors prefixed by `prefix`), and `allow_internet_access:
/// false` as denying everything.
fn egress(
    net: Option<&Value>,
    allow_internet_access: Option<&Value>,
    prefix: &str,
    ceiling: &ember_types::cidr::EgressCeiling,
) -> E2bResult<model::NetworkPolicy> {
    let mut allow_out = strings(
        net.and_then(|n| n.get("allowOut")),
        &format!("{prefix}allowOut"),
    )?;
    let mut deny_out = strings(
        net.and_then(|n| n.get("denyOut")),
        &format!("{prefix}denyOut"),
    )?;
    if allow_internet_access.and_then(Value::as_bool) == Some(false) {
        allow_out.clear();
        deny_out = vec![ALL_V4.into()];
    }
    for (name, rules) in [("allowOut", &allow_out), ("denyOut", &deny_out)] {
        if rules.len() > crate::api::MAX_NETWORK_RULES {
            return Err(E2bError::bad(format!(
                "{prefix}{name}: at most {} rules",
                crate::api::MAX_NETWORK_RULES
            )));
        }
    }
    for (i, c) in allow_out.iter().enumerate() {
        crate::api::validate_cidr(&format!("{prefix}allowOut[{i}]"), c)?;
    }
    for (i, c) in deny_out.iter().enumerate() {
        crate::api::validate_cidr(&format!("{prefix}denyOut[{i}]"), c)?;
    }
    for (i, c) in allow_out.iter().enumerate() {
        crate::api::check_allow_out(ceiling, &format!("{prefix}allowOut[{i}]"), c)?;
    }
    Ok(model::NetworkPolicy {
        allow_out,
        deny_out,
    })
}

fn timeout_arg(v: &Value) -> E2bResult<Option<u64>> {
    match v.get("timeout") {
        None | Some(Value::Null) => Ok(None),
        Some(t) => {
            let t = t
                .as_u64()
                .ok_or_else(|| E2bError::bad("timeout must be a whole number of seconds"))?;
            crate::api::sandboxes::validate_timeout(t)?;
            Ok(Some(t))
        }
    }
}

/// Options Ember does not have are refused by name, never ignored.
fn refuse_unsupported(v: &Value) -> E2bResult<()> {
    let set = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    let truthy = |x: Option<&Value>| match x {
        Some(Value::Bool(b)) => *b,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        _ => false,
    };
    for k in ["mcp", "iam"] {
        if set(k) && truthy(v.get(k)) {
            return Err(E2bError::bad(format!("{k} is not supported by Ember")));
        }
    }
    if truthy(v.get("volumeMounts")) {
        return Err(E2bError::bad("volume mounts are not supported by Ember"));
    }
    if v.get("autoPauseMemory").and_then(Value::as_bool) == Some(false) {
        return Err(E2bError::bad(
            "a filesystem-only pause is not supported by Ember: its pauses keep memory",
        ));
    }
    if let Some(n) = v.get("network").filter(|n| !n.is_null()) {
        for k in [
            "dnsServers",
            "rules",
            "egressProxy",
            "maskRequestHost",
            "httpsPorts",
        ] {
            if truthy(n.get(k)) {
                return Err(E2bError::bad(format!(
                    "network.{k} is not supported by Ember"
                )));
            }
        }
    }
    Ok(())
}

/// E2B's `network.allowPublicTraffic` (true unless said otherwise: E2B's
/// default, unlike Ember's API) and `autoResume.enabled`.
fn ingress(v: &Value) -> E2bResult<crate::model::Ingress> {
    let public = match v.get("network").and_then(|n| n.get("allowPublicTraffic")) {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(E2bError::bad(
                "network.allowPublicTraffic must be a boolean",
            ));
        }
    };
    let auto_resume = match v.get("autoResume").and_then(|a| a.get("enabled")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(E2bError::bad("autoResume.enabled must be a boolean")),
    };
    Ok(crate::model::Ingress {
        public,
        auto_resume,
    })
}

async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> E2bResult<(
    StatusCode,
    axum::Extension<crate::audit::AuditTarget>,
    axum::Json<Value>,
)> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    refuse_unsupported(&v)?;
    let template = match v.get("templateID") {
        None | Some(Value::Null) => BASE_TEMPLATE.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(E2bError::bad("templateID must be a string")),
    };
    if template != BASE_TEMPLATE {
        crate::api::validate_name("templateID", &template)?;
    }
    let timeout_s = timeout_arg(&v)?.unwrap_or(DEFAULT_TIMEOUT_S);
    let metadata = string_map(&v, "metadata")?;
    crate::api::sandboxes::validate_metadata(&metadata)?;
    let env = string_map(&v, "envVars")?;
    crate::api::sandboxes::validate_env("envVars", &env)?;
    let on_timeout = if v.get("autoPause").and_then(Value::as_bool) == Some(true) {
        OnTimeout::Pause
    } else {
        OnTimeout::Kill
    };
    let network = egress(
        v.get("network").filter(|n| !n.is_null()),
        v.get("allow_internet_access"),
        "network.",
        &state.ops.egress_for(&team).await?,
    )?;
    let spec = CreateSpec {
        team_id: team,
        template,
        vcpus: None,
        memory_mib: None,
        timeout_s,
        on_timeout,
        metadata,
        env,
        network,
        cold: false,
        ingress: ingress(&v)?,
        image: None,
    };
    let (sb, _token) = state.ops.create(spec).await?;
    Ok((
        StatusCode::CREATED,
        axum::Extension(crate::audit::AuditTarget(sb.id.clone())),
        axum::Json(sandbox_json(&state, &sb)),
    ))
}

async fn load(state: &AppState, team: &str, raw: &str) -> E2bResult<Sandbox> {
    let id = sandbox_id(raw).map_err(|_| E2bError::not_found(raw))?;
    let sb = state
        .store
        .sandbox(Some(team), &id)
        .await?
        .filter(visible)
        .ok_or_else(|| E2bError::not_found(raw))?;
    if sb.state == SandboxState::Failed {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!(
                "sandbox {} failed: {}",
                sb.id,
                sb.failure_reason.as_deref().unwrap_or("no reason recorded")
            ),
        ));
    }
    Ok(sb)
}

async fn get_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> E2bResult<axum::Json<Value>> {
    let team = team(&state, &headers).await?;
    let sb = load(&state, &team, &id).await?;
    Ok(axum::Json(detail_json(&state, &sb)))
}

/// E2B's list filter `metadata`: a form-encoded `k=v&…` whose keys and
/// values are percent-encoded once more.
fn metadata_filter(raw: &str) -> E2bResult<BTreeMap<String, String>> {
    let decode = |s: &str| -> E2bResult<String> {
        let plus = s.replace('+', " ");
        percent_decode(&plus)
            .ok_or_else(|| E2bError::bad(format!("metadata: {s:?} is not percent-encoded")))
    };
    let mut out = BTreeMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        let (k, v) = (
            percent_decode(&k).unwrap_or(k),
            percent_decode(&v).unwrap_or(v),
        );
        out.insert(k, v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> E2bResult<Response> {
    let team = team(&state, &headers).await?;
    let mut filter = SandboxFilter::default();
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    let mut states = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "metadata" | "query" => filter.metadata.extend(metadata_filter(&v)?),
            "state" => {
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match s {
                        "running" => states.extend([
                            SandboxState::Creating,
                            SandboxState::Running,
                            SandboxState::Resuming,
                            SandboxState::Snapshotting,
                        ]),
                        "paused" => states.extend([SandboxState::Pausing, SandboxState::Paused]),
                        other => {
                            return Err(E2bError::bad(format!(
                                "state {other:?}: use running and/or paused"
                            )));
                        }
                    }
                }
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| E2bError::bad(format!("limit must be 1 to {MAX_PAGE}")))?;
            }
            "nextToken" => {
                after = Some(crate::api::sandboxes::parse_page_token(&v).ok_or_else(|| {
                    E2bError::bad("nextToken is not a token from a previous page")
                })?);
            }
            "template" => filter.template = Some(v),
            // Ordering and start-time filters are accepted and answered
            // newest first, as Ember lists.
            "order" | "startedAfter" => {}
            other => return Err(E2bError::bad(format!("unknown parameter {other:?}"))),
        }
    }
    if states.is_empty() {
        states = vec![
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Resuming,
            SandboxState::Snapshotting,
            SandboxState::Pausing,
            SandboxState::Paused,
        ];
    }
    filter.states = states;
    let mut rows = state
        .store
        .list_sandboxes(&team, &filter, after.as_ref(), limit + 1)
        .await?;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| {
            crate::api::sandboxes::page_token(&PageAfter {
                created_at: r.created_at,
                id: r.id.clone(),
            })
        })
    } else {
        None
    };
    let items: Vec<Value> = rows.iter().map(listed_json).collect();
    let mut resp = axum::Json(Value::Array(items)).into_response();
    if let Some(token) = next
        && let Ok(v) = HeaderValue::from_str(&token)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

async fn kill(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    // Failed sandboxes are destroyed too (their resources freed).
    let sb_id = sandbox_id(&id).map_err(|_| E2bError::not_found(&id))?;
    match state.ops.destroy(Some(&team), &sb_id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(crate::error::Error::SandboxNotFound { .. }) => Err(E2bError::not_found(&id)),
        Err(crate::error::Error::StateConflict {
            state: SandboxState::Destroyed | SandboxState::Destroying,
            ..
        }) => Err(E2bError::not_found(&id)),
        Err(e) => Err(e.into()),
    }
}

async fn set_timeout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    let timeout = timeout_arg(&v)?.ok_or_else(|| E2bError::bad("timeout is required"))?;
    let sb = load(&state, &team, &id).await?;
    state.store.set_timeout(&team, &sb.id, timeout).await?;
    if sb.state == SandboxState::Running {
        let expires = now_ms().saturating_add(timeout as i64 * 1000);
        state
            .store
            .set_expiry(Some(&team), &sb.id, expires, false)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// E2B's keep-alive: extend a running sandbox by `duration` seconds.
async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    let sb = load(&state, &team, &id).await?;
    let secs = v
        .get("duration")
        .and_then(Value::as_u64)
        .unwrap_or(sb.timeout_s)
        .min(crate::api::sandboxes::MAX_TIMEOUT_S);
    let expires = now_ms().saturating_add(secs as i64 * 1000);
    state
        .store
        .set_expiry(Some(&team), &sb.id, expires, true)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replace the egress rules (omitted lists are cleared, as E2B does).
async fn update_network(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    refuse_unsupported(&json!({ "network": v }))?;
    let network = egress(
        Some(&v),
        v.get("allow_internet_access"),
        "",
        &state.ops.egress_for(&team).await?,
    )?;
    let sb = load(&state, &team, &id).await?;
    state.ops.set_network(&team, &sb.id, network).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// E2B's snapshot of a running sandbox: an Ember template, whose name is
/// the snapshot's ID (E2B's `Sandbox.create(snapshot_id)` starts from it).
async fn create_snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<(StatusCode, axum::Json<Value>)> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    if v.get("memory").and_then(Value::as_bool) == Some(false) {
        return Err(E2bError::bad(
            "filesystem-only snapshots are not supported by Ember: its snapshots keep memory",
        ));
    }
    let name = match v.get("name") {
        None | Some(Value::Null) => format!(
            "snap-{}",
            ember_types::SandboxId::new()
                .as_str()
                .trim_start_matches("sb-")
        ),
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(E2bError::bad("name must be a string")),
    };
    crate::api::validate_name("name", &name)?;
    if name == BASE_TEMPLATE {
        return Err(E2bError::bad("\"base\" is reserved for the base image"));
    }
    let sb = load(&state, &team, &id).await?;
    let ops = state.ops.clone();
    let t = run_to_end(async move { ops.snapshot(&team, &sb.id, &name).await }).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"snapshotID": t.name, "names": [t.name]})),
    ))
}

/// The team's snapshots (Ember templates), optionally those of one sandbox
/// or one name; pages by `nextToken` (an offset).
async fn list_snapshots(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> E2bResult<Response> {
    let team = team(&state, &headers).await?;
    let (mut sandbox, mut name, mut limit, mut offset) = (None, None, DEFAULT_PAGE as usize, 0);
    for (k, v) in params {
        match k.as_str() {
            "sandboxID" => sandbox = Some(v),
            "name" => name = Some(v),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE as usize).contains(l))
                    .ok_or_else(|| E2bError::bad(format!("limit must be 1 to {MAX_PAGE}")))?;
            }
            "nextToken" => {
                offset = v
                    .parse()
                    .map_err(|_| E2bError::bad("nextToken is not a token from a previous page"))?;
            }
            other => return Err(E2bError::bad(format!("unknown parameter {other:?}"))),
        }
    }
    let all: Vec<_> = state
        .store
        .list_templates(&team)
        .await?
        .into_iter()
        .filter(|t| sandbox.is_none() || t.source_sandbox_id == sandbox)
        .filter(|t| name.as_ref().is_none_or(|n| &t.name == n))
        .collect();
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|t| json!({"snapshotID": t.name, "names": [t.name]}))
        .collect();
    let mut resp = axum::Json(Value::Array(page)).into_response();
    if offset + limit < all.len()
        && let Ok(v) = HeaderValue::from_str(&(offset + limit).to_string())
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// Delete a snapshot (an Ember template) by its ID (its name).
async fn delete_template(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    match state.ops.delete_template(&team, &id).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(crate::error::Error::TemplateNotFound { .. }) => Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("snapshot {id} not found"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Run a lifecycle call to its end in a task of its own: a client that
/// hangs up never cuts a pause or resume short.
async fn run_to_end<T: Send + 'static>(
    op: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
) -> E2bResult<T> {
    match tokio::spawn(op).await {
        Ok(r) => r.map_err(E2bError::from),
        Err(e) => {
            tracing::error!(error = %e, "a lifecycle task stopped unexpectedly");
            Err(E2bError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; see the server's log",
            ))
        }
    }
}

async fn pause(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let team = team_that_writes(&state, &headers).await?;
    let sb = load(&state, &team, &id).await?;
    if matches!(sb.state, SandboxState::Paused | SandboxState::Pausing) {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already paused", sb.id),
        ));
    }
    let ops = state.ops.clone();
    run_to_end(async move { ops.pause(Some(&team), &sb.id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resume a paused sandbox (201), or keep a running one and push its end
/// out if `timeout` asks for later (200). E2B's SDK resumes by connecting.
async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<(StatusCode, axum::Json<Value>)> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    let timeout = timeout_arg(&v)?;
    let sb = load(&state, &team, &id).await?;
    match sb.state {
        SandboxState::Paused => {
            let ops = state.ops.clone();
            let team2 = team.clone();
            let sb =
                run_to_end(
                    async move { ops.resume(&team2, &sb.id, timeout, BTreeMap::new()).await },
                )
                .await?;
            Ok((StatusCode::CREATED, axum::Json(sandbox_json(&state, &sb))))
        }
        SandboxState::Running => {
            if let Some(t) = timeout {
                let expires = now_ms().saturating_add(t as i64 * 1000);
                state
                    .store
                    .set_expiry(Some(&team), &sb.id, expires, true)
                    .await?;
            }
            Ok((StatusCode::OK, axum::Json(sandbox_json(&state, &sb))))
        }
        other => Err(E2bError::new(
            StatusCode::CONFLICT,
            format!(
                "sandbox {} is {}; connect again when it is running or paused",
                sb.id,
                other.as_str()
            ),
        )),
    }
}

/// E2B's first 2.x SDKs resume with `POST /sandboxes/{id}/resume`.
async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult<(StatusCode, axum::Json<Value>)> {
    let team = team_that_writes(&state, &headers).await?;
    let v = body_json(&body)?;
    let timeout = timeout_arg(&v)?;
    let sb = load(&state, &team, &id).await?;
    if sb.state != SandboxState::Paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is {}, not paused", sb.id, e2b_state(sb.state)),
        ));
    }
    let ops = state.ops.clone();
    let sb = run_to_end(async move { ops.resume(&team, &sb.id, timeout, BTreeMap::new()).await })
        .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_json(&state, &sb))))
}

#[derive(Debug, serde::Deserialize)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<MetricsQuery>,
) -> E2bResult<axum::Json<Value>> {
    let team = team(&state, &headers).await?;
    let sb = load(&state, &team, &id).await?;
    if sb.state != SandboxState::Running {
        return Ok(axum::Json(json!([])));
    }
    let (sb, mut client) = state.ops.running(&team, &sb.id).await?;
    let reply = client
        .get_sandbox_metrics(ember_proto::host::SandboxRef {
            sandbox_id: sb.id.clone(),
        })
        .await
        .map_err(|s| E2bError::new(StatusCode::BAD_GATEWAY, crate::hosts::status_reason(&s)))?
        .into_inner();
    // Seconds (2.x) or milliseconds (the first 2.x releases).
    let secs = |t: i64| if t > 100_000_000_000 { t / 1000 } else { t };
    let (start, end) = (q.start.map(secs), q.end.map(secs));
    let samples: Vec<Value> = reply
        .samples
        .into_iter()
        .filter(|s| {
            let t = (s.at_unix_ms / 1000) as i64;
            start.is_none_or(|a| t >= a) && end.is_none_or(|b| t <= b)
        })
        .map(|s| {
            json!({
                "timestamp": rfc3339(s.at_unix_ms as i64),
                "timestampUnix": s.at_unix_ms / 1000,
                "cpuCount": sb.vcpus,
                "cpuUsedPct": s.cpu_percent,
                "memUsed": s.memory_bytes,
                "memTotal": s.memory_limit_bytes,
                "memCache": 0,
                "diskUsed": s.disk_bytes,
                "diskTotal": u64::from(DISK_SIZE_MB) << 20,
            })
        })
        .collect();
    Ok(axum::Json(Value::Array(samples)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_filter_is_decoded_twice() {
        // What the SDK sends for {"k": "v w", "a": "b"} after query decoding.
        let got = metadata_filter("k=v%2520w&a=b").unwrap();
        assert_eq!(got.get("k").map(String::as_str), Some("v w"));
        assert_eq!(got.get("a").map(String::as_str), Some("b"));
        assert!(metadata_filter("k=%zz").is_err());
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let refused = |v: Value| refuse_unsupported(&v).unwrap_err().message;
        assert!(refused(json!({"volumeMounts": [{"name": "v", "path": "/v"}]})).contains("volume"));
        assert!(
            refused(json!({"network": {"egressProxy": {"address": "x"}}})).contains("egressProxy")
        );
        assert!(
            refuse_unsupported(&json!({"autoResume": {"enabled": true}, "volumeMounts": []}))
                .is_ok()
        );
    }

    #[test]
    fn public_traffic_is_e2bs_default_and_auto_resume_is_opt_in() {
        let i = ingress(&json!({})).unwrap();
        assert!(i.public && !i.auto_resume);
        let i = ingress(
            &json!({"network": {"allowPublicTraffic": false}, "autoResume": {"enabled": true}}),
        )
        .unwrap();
        assert!(!i.public && i.auto_resume);
        assert!(ingress(&json!({"autoResume": {"enabled": "yes"}})).is_err());
    }

    #[test]
    fn egress_options_become_rules() {
        let n = json!({"allowOut": ["1.1.1.1"], "denyOut": ["10.0.0.0/8"]});
        let none = ember_types::cidr::EgressCeiling::default();
        let p = egress(Some(&n), None, "network.", &none).unwrap();
        assert_eq!(
            (p.allow_out, p.deny_out),
            (vec!["1.1.1.1".to_owned()], vec!["10.0.0.0/8".to_owned()])
        );
        let p = egress(Some(&n), Some(&json!(false)), "", &none).unwrap();
        assert!(p.allow_out.is_empty() && p.deny_out == vec![ALL_V4]);
        let bad = json!({"allowOut": ["example.com"]});
        let e = egress(Some(&bad), None, "network.", &none).unwrap_err();
        assert!(e.message.contains("network.allowOut[0]"), "{}", e.message);
        // The metadata service is beyond the ceiling unless granted.
        let meta = json!({"allowOut": ["169.254.169.254"]});
        let e = egress(Some(&meta), None, "network.", &none).unwrap_err();
        assert!(e.message.contains("network.allowOut[0]"), "{}", e.message);
        let granted = ember_types::cidr::EgressCeiling::new(&["169.254.169.254/32"]).unwrap();
        assert!(egress(Some(&meta), None, "network.", &granted).is_ok());
    }

    #[test]
    fn states_map_onto_running_and_paused() {
        assert_eq!(e2b_state(SandboxState::Paused), "paused");
        assert_eq!(e2b_state(SandboxState::Pausing), "paused");
        assert_eq!(e2b_state(SandboxState::Resuming), "running");
        assert_eq!(e2b_state(SandboxState::Running), "running");
    }
}
