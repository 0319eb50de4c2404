//! REST API v1: the axum router, authentication of each request, request
//! validation, and the mapping of outcomes to `{code, message}` errors.
//!
//! Handlers are thin: they authenticate, validate, call
//! [`crate::lifecycle::Operations`] or the store, and shape the reply with
//! [`crate::wire`] types. The OpenAPI document is generated from the same
//! routes ([`crate::openapi`]), so it cannot list an endpoint the router lacks.
//!
//! Scoping: every sandbox and template lookup carries the caller's team in
//! SQL; another team's ID is answered 404, exactly like an unknown one.

mod admin;
pub use admin::mint_key;
pub(crate) mod files;
mod ports;
pub(crate) mod processes;
pub(crate) mod sandboxes;
mod snapshots;
mod templates;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{self, Caller};
use crate::error::Error;
use crate::hosts::HostRegistry;
use crate::lifecycle::Operations;
use crate::metrics::Metrics;
use crate::model::now_ms;
use crate::store::Store;
use crate::wire::ErrorBody;

/// Largest JSON request body (file uploads stream and are not limited by it).
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;
/// `last_used_at` is written at most this often per key, so authentication
/// stays a read on the hot path.
const KEY_TOUCH_INTERVAL_MS: i64 = 60_000;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub ops: Arc<Operations>,
    pub hosts: Arc<HostRegistry>,
    pub metrics: Arc<Metrics>,
    /// Host agents present it to register; see `POST /internal/v1/hosts`.
    /// `None`: the server runs with `--no-cluster-join-token`, and hosts
    /// join only with one-time tokens.
    pub join_token: Option<Arc<str>>,
    /// See [`crate::server::ServerConfig::answer_within`].
    pub answer_within: std::time::Duration,
    pub ingress: Arc<crate::ingress::Ingress>,
    /// Per-caller request rate and concurrency.
    pub limiter: Arc<crate::ratelimit::RateLimiter>,
}

/// The API's routes and their OpenAPI description, from one list.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(
            sandboxes::create_sandbox,
            sandboxes::list_sandboxes
        ))
        .routes(routes!(sandboxes::get_sandbox, sandboxes::delete_sandbox))
        .routes(routes!(sandboxes::pause_sandbox))
        .routes(routes!(sandboxes::resume_sandbox))
        .routes(routes!(sandboxes::set_sandbox_timeout))
        .routes(routes!(sandboxes::set_sandbox_network))
        .routes(routes!(sandboxes::snapshot_sandbox))
        .routes(routes!(ports::set_ingress))
        .routes(routes!(ports::create_link))
        .routes(routes!(ports::tunnel))
        .routes(routes!(processes::exec))
        .routes(routes!(processes::list_processes))
        .routes(routes!(processes::sandbox_metrics))
        .routes(routes!(processes::write_stdin))
        .routes(routes!(processes::signal_process))
        .routes(routes!(processes::process_events))
        .routes(routes!(processes::resize_pty))
        .routes(routes!(
            files::read_file,
            files::write_file,
            files::remove_file
        ))
        .routes(routes!(files::stat_file))
        .routes(routes!(files::list_dir))
        .routes(routes!(files::make_dir))
        .routes(routes!(files::rename))
        .routes(routes!(files::watch))
        .routes(routes!(
            templates::create_template,
            templates::list_templates
        ))
        .routes(routes!(templates::get_template, templates::delete_template))
        .routes(routes!(templates::list_builds))
        .routes(routes!(templates::get_build))
        .routes(routes!(snapshots::list_snapshots))
        .routes(routes!(snapshots::get_snapshot, snapshots::delete_snapshot))
        .routes(routes!(admin::create_key, admin::list_keys))
        .routes(routes!(admin::revoke_key))
        .routes(routes!(admin::create_team, admin::list_teams))
        .routes(routes!(admin::list_hosts))
        .routes(routes!(admin::revoke_host))
        .routes(routes!(admin::remove_host))
        .routes(routes!(admin::create_join_token, admin::list_join_tokens))
        .routes(routes!(admin::revoke_join_token))
        .routes(routes!(admin::list_audit))
        .routes(routes!(admin::team_usage))
        .routes(routes!(admin::register_host))
        .routes(routes!(admin::healthz))
        .routes(routes!(admin::metrics))
}

/// The router, ready to serve.
pub fn router(state: AppState) -> axum::Router {
    let (router, _doc) = routes().split_for_parts();
    let envd = crate::e2b::envd::router(state.clone());
    let ingress_state = state.clone();
    let audit_store = state.store.clone();
    router
        .merge(crate::e2b::api::routes())
        .route_layer(axum::middleware::from_fn(move |req, next| {
            crate::audit::layer(
                audit_store.clone(),
                crate::audit::changes_something,
                req,
                next,
            )
        }))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req, next| {
            crate::e2b::dispatch(envd.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            crate::ingress::dispatch(ingress_state.clone(), req, next)
        }))
}

// ------------------------------------------------------------------ errors

/// An error response: a status and a `{code, message, field?}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Sent as `Retry-After` (seconds), for 429s.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                field: None,
            },
            retry_after_s: None,
        }
    }

    /// 400 for a bad value of `field`.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        );
        e.body.field = Some(field.to_owned());
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> ApiError {
        let msg = err.to_string();
        match &err {
            Error::SandboxNotFound { .. } => ApiError::not_found(msg),
            Error::TemplateNotFound { .. } => {
                let mut e = ApiError::not_found(msg);
                e.body.field = Some("template".into());
                e
            }
            Error::StateConflict { .. }
            | Error::NotRunning { .. }
            | Error::TemplateExists { .. }
            | Error::HostIdTaken { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            Error::TemplateLocked { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_locked", msg)
            }
            Error::NoCapacity(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", msg)
            }
            Error::QuotaExceeded { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", msg)
            }
            // The host's own accounting says it is full (it may hold VMs the
            // database no longer counts, e.g. leftovers awaiting cleanup).
            Error::HostCall { source, .. } if source.code() == tonic::Code::ResourceExhausted => {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_capacity",
                    format!("{msg}: {}", crate::hosts::status_reason(source)),
                )
            }
            Error::HostCall { source, .. } => {
                tracing::warn!(error = %msg, status = %source, "host call failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "host_error",
                    crate::redact::host_detail(&format!(
                        "{msg}: {}",
                        crate::hosts::status_reason(source)
                    )),
                )
            }
            Error::HostReply { .. } | Error::UnknownHost { .. } => {
                tracing::warn!(error = %msg, "host error");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "host_error",
                    crate::redact::host_detail(&msg),
                )
            }
            _ => {
                tracing::error!(error = ?err, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server's log",
                )
            }
        }
    }
}

/// The field a serde error is about: `unknown field `x``, `missing field `x``,
/// or the path serde_path_to_error put in front of the message.
fn serde_field(message: &str) -> Option<String> {
    let backticked = |marker: &str| {
        let start = message.find(marker)? + marker.len();
        let end = message[start..].find('`')?;
        Some(message[start..start + end].to_owned())
    };
    let named = backticked("unknown field `").or_else(|| backticked("missing field `"));
    let path = message
        .split_once(": ")
        .map(|(p, _)| p)
        .filter(|p| !p.contains(' ') && *p != ".")
        .map(str::to_owned);
    match (path, named) {
        // serde_path_to_error already ends the path with an unknown field's name.
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => Some(p),
        (Some(p), Some(n)) => Some(format!("{p}.{n}")),
        (Some(p), None) => Some(p),
        (None, n) => n,
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    let text = rej.body_text();
    match rej {
        JsonRejection::JsonDataError(_) => {
            let detail = text
                .strip_prefix("Failed to deserialize the JSON body into the target type: ")
                .unwrap_or(&text)
                .to_owned();
            let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", detail.clone());
            e.body.field = serde_field(&detail);
            e
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", text)
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("JSON bodies are limited to {JSON_BODY_LIMIT} bytes"),
        ),
        other => ApiError::new(other.status(), "invalid_request", text),
    }
}

/// `axum::Json` whose rejections are API errors naming the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

/// `axum::Query` whose rejections are API errors naming the parameter.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rej) => {
                let text = match &rej {
                    QueryRejection::FailedToDeserializeQueryString(e) => e.body_text(),
                    other => other.body_text(),
                };
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_owned();
                let mut e =
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", detail.clone());
                e.body.field = serde_field(&detail);
                Err(e)
            }
        }
    }
}

// ------------------------------------------------------------------ authentication

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Auth(pub Caller);

impl Auth {
    /// The caller's team, for endpoints that take an API key only.
    pub fn team(&self) -> Result<&str, ApiError> {
        match &self.0 {
            Caller::Team { team_id, .. } => Ok(team_id),
            Caller::Sandbox { sandbox_id, .. } => Err(ApiError::forbidden(format!(
                "a sandbox access token only grants exec and files on {sandbox_id}; use an API key"
            ))),
        }
    }

    /// The caller's team, for admin-only endpoints.
    pub fn admin(&self) -> Result<&str, ApiError> {
        match &self.0 {
            Caller::Team {
                team_id,
                is_admin: true,
                ..
            } => Ok(team_id),
            Caller::Team { .. } => Err(ApiError::forbidden("this endpoint needs an admin key")),
            Caller::Sandbox { .. } => self.team(),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self.0, Caller::Team { is_admin: true, .. })
    }

    /// The team whose sandbox `sandbox_id` the caller may watch from the host
    /// side (its resource use): any key of the team, read-only included, or
    /// the sandbox's access token.
    pub fn observer(&self, sandbox_id: &str) -> Result<&str, ApiError> {
        match &self.0 {
            Caller::Team { team_id, .. } => Ok(team_id),
            Caller::Sandbox { .. } => self.guest_access(sandbox_id),
        }
    }

    /// The team whose sandbox `sandbox_id` the caller may exec in and touch
    /// files of: its team key, or that sandbox's own access token.
    pub fn guest_access(&self, sandbox_id: &str) -> Result<&str, ApiError> {
        match &self.0 {
            Caller::Team {
                role: auth::Role::ReadOnly,
                ..
            } => Err(ApiError::forbidden(
                "a read-only key cannot reach into a sandbox (exec, files, processes, ports): use a member key",
            )),
            Caller::Team { team_id, .. } => Ok(team_id),
            Caller::Sandbox {
                sandbox_id: own,
                team_id,
            } if own == sandbox_id => Ok(team_id),
            // Same answer whether or not the other sandbox exists.
            Caller::Sandbox { .. } => Err(ApiError::forbidden(
                "this access token is for another sandbox",
            )),
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(
            "missing Authorization header: send `Authorization: Bearer <API key>`",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII"))?;
    auth::bearer(value).ok_or_else(|| {
        ApiError::unauthorized("the Authorization header must be `Bearer <API key>`")
    })
}

/// What a read-only key gets when it tries to change something.
pub(crate) fn read_only_refusal() -> ApiError {
    ApiError::forbidden(
        "this API key is read-only (role read_only): it lists and reads, and changes nothing; use a member key",
    )
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    /// Authenticates, and refuses read-only keys any method but GET/HEAD,
    /// so no handler can forget to.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let caller = authenticate(state, token).await?;
        let reads = matches!(parts.method, http::Method::GET | http::Method::HEAD);
        if !reads
            && matches!(
                caller,
                Caller::Team {
                    role: auth::Role::ReadOnly,
                    ..
                }
            )
        {
            return Err(read_only_refusal());
        }
        Ok(Auth(caller))
    }
}

pub(crate) async fn authenticate(state: &AppState, token: &str) -> Result<Caller, ApiError> {
    let invalid = || ApiError::unauthorized("invalid or revoked API key");
    if let Some(sandbox_id) = auth::access_token_sandbox(token) {
        let sb = state
            .store
            .sandbox(None, sandbox_id)
            .await?
            .ok_or_else(invalid)?;
        // Tokens are derived from the server's key; a sandbox created
        // before tokens were derived keeps its random one (its digest).
        let derived = state.ops.access_token(&sb.id);
        let matches_derived: bool =
            subtle::ConstantTimeEq::ct_eq(token.as_bytes(), derived.as_bytes()).into();
        if !matches_derived && !auth::digest_matches(token, &sb.access_token_sha256) {
            return Err(invalid());
        }
        let caller = Caller::Sandbox {
            sandbox_id: sb.id,
            team_id: sb.team_id,
        };
        admit(state, &caller)?;
        return Ok(caller);
    }
    let prefix = auth::api_key_prefix(token).ok_or_else(invalid)?;
    let (key, is_admin) = state
        .store
        .key_with_team(prefix)
        .await?
        .ok_or_else(invalid)?;
    if key.revoked_at.is_some() || !auth::digest_matches(token, &key.secret_sha256) {
        return Err(invalid());
    }
    let now = now_ms();
    if let Some(at) = key.expires_at.filter(|&at| at <= now) {
        return Err(ApiError::unauthorized(format!(
            "API key {} expired at {}: ask your team for a new one",
            key.prefix,
            crate::model::rfc3339(at)
        )));
    }
    if key
        .last_used_at
        .is_none_or(|t| now - t >= KEY_TOUCH_INTERVAL_MS)
    {
        let store = state.store.clone();
        let prefix = key.prefix.clone();
        tokio::spawn(async move {
            if let Err(err) = store.touch_key(&prefix, now).await {
                tracing::warn!(key = %prefix, error = %err, "recording key use failed");
            }
        });
    }
    let caller = Caller::Team {
        team_id: key.team_id,
        is_admin: is_admin && key.role == auth::Role::Admin,
        role: key.role,
        key_prefix: key.prefix,
    };
    admit(state, &caller)?;
    Ok(caller)
}

/// Count the request against its caller's limits (the permit, if any, is
/// held by the request's scope until it is answered) and note the caller
/// for the audit log.
fn admit(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    let (_, who) = crate::audit::actor(caller);
    match state.limiter.admit(&who, std::time::Instant::now()) {
        Ok(permit) => {
            crate::audit::note_caller(caller, permit);
            Ok(())
        }
        Err(refusal) => {
            state.metrics.note_rate_limited();
            let limits = state.limiter.limits();
            let message = match refusal {
                crate::ratelimit::Refusal::Rate { .. } => format!(
                    "too many requests from {who}: the limit is {} per second (bursts of {}); retry after {} s",
                    limits.per_second,
                    limits.burst,
                    refusal.retry_after_s()
                ),
                crate::ratelimit::Refusal::Concurrency => format!(
                    "too many requests from {who} at once: the limit is {} in flight; retry when one finishes",
                    limits.concurrent
                ),
            };
            let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
            e.retry_after_s = Some(refusal.retry_after_s());
            Err(e)
        }
    }
}

// ------------------------------------------------------------------ validation

/// A sandbox ID from a path; a malformed one cannot exist.
pub fn sandbox_id(raw: &str) -> Result<String, ApiError> {
    raw.parse::<ember_types::SandboxId>()
        .map(|id| id.to_string())
        .map_err(|_| ApiError::not_found(format!("no sandbox {raw}")))
}

/// Template and team names: 1–63 of `a-z 0-9 . _ -`, starting alphanumeric.
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "{name:?} is not a valid name: use 1-63 of a-z 0-9 . _ -, starting with a letter or digit"
            ),
        ))
    }
}

/// A path inside the sandbox: absolute, no NUL. `..` is resolved by the
/// guest agent, which confines paths to what the guest user may see.
pub fn validate_path(field: &str, path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} must be an absolute path (start with /)"),
        ));
    }
    if path.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL"));
    }
    if path.len() > 4096 {
        return Err(ApiError::invalid(field, "is longer than 4096 bytes"));
    }
    Ok(())
}

/// A CIDR (`a.b.c.d/n`, `x::/n`) or a single address.
pub fn validate_cidr(field: &str, cidr: &str) -> Result<(), ApiError> {
    // The host agents' own parser: a rule the API takes is a rule every
    // host can apply (an IPv6 or host-bits rule used to fail the sandbox
    // on its host, after it was placed).
    ember_types::cidr::parse_ipv4_cidr(cidr)
        .map(|_| ())
        .map_err(|reason| ApiError::invalid(field, format!("{cidr:?}: {reason}")))
}

/// An `allow_out` rule (already parsed) within the operator's ceiling, or
/// 400 naming the range it may not open.
pub fn check_allow_out(
    ceiling: &ember_types::cidr::EgressCeiling,
    field: &str,
    cidr: &str,
) -> Result<(), ApiError> {
    ceiling
        .check(cidr)
        .map_err(|reason| ApiError::invalid(field, format!("{cidr:?}: {reason}")))
}

/// At most this many rules in each of `allow_out` and `deny_out`.
pub const MAX_NETWORK_RULES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_name_their_field() {
        assert_eq!(
            serde_field(
                "unknown field `vcpu`, expected one of `template`, `vcpus` at line 1 column 7"
            )
            .as_deref(),
            Some("vcpu")
        );
        assert_eq!(
            serde_field("missing field `timeout_s` at line 1 column 2").as_deref(),
            Some("timeout_s")
        );
        assert_eq!(
            serde_field("network: unknown field `allow`, expected `allow_out` or `deny_out`")
                .as_deref(),
            Some("network.allow")
        );
        assert_eq!(
            serde_field("network.allow: unknown field `allow`, expected `allow_out` or `deny_out`")
                .as_deref(),
            Some("network.allow")
        );
        assert_eq!(
            serde_field("vcpu: unknown field `vcpu`, expected one of `template`").as_deref(),
            Some("vcpu")
        );
        assert_eq!(
            serde_field("vcpus: invalid type: string \"2\", expected u32 at line 1 column 30")
                .as_deref(),
            Some("vcpus")
        );
    }

    #[test]
    fn paths_must_be_absolute_and_clean_of_nul() {
        assert!(validate_path("path", "/etc/hosts").is_ok());
        assert!(validate_path("path", "/a/../../etc").is_ok());
        for bad in ["", "etc/hosts", "../x", "/a\0b"] {
            let e = validate_path("path", bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.body.field.as_deref(), Some("path"));
        }
    }

    #[test]
    fn names_and_cidrs() {
        assert!(validate_name("name", "py-3.12_base").is_ok());
        for bad in ["", "-x", "UPPER", "a/b", &"x".repeat(64)] {
            assert!(validate_name("name", bad).is_err(), "{bad}");
        }
        for ok in ["10.0.0.0/8", "1.2.3.4", "0.0.0.0/0"] {
            assert!(validate_cidr("c", ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x",
            "::/0",
            "2001:db8::/32",
            "1.2.3.4/",
            "10.1.0.0/8",
        ] {
            let e = validate_cidr("c", bad).unwrap_err();
            assert!(e.body.message.contains(bad), "{bad}: {}", e.body.message);
        }
        let e = validate_cidr("network.allow_out[0]", "10.1.0.0/8").unwrap_err();
        assert!(
            e.body.message.contains("write 10.0.0.0/8"),
            "{}",
            e.body.message
        );
    }

    #[test]
    fn malformed_sandbox_ids_are_not_found() {
        assert_eq!(
            sandbox_id("../../etc").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        let id = ember_types::SandboxId::new().to_string();
        assert_eq!(sandbox_id(&id).unwrap(), id);
    }
}
