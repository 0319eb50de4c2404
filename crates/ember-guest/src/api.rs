//! The HTTP API: routes, authentication, request parsing into wire types,
//! and responses (JSON, NDJSON streams, raw file bodies). The protocol
//! itself is specified in `ember-guest-api`; the work is done by `process`,
//! `files` and `system`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ember_guest_api::{
    EventsQuery, Health, InitRequest, InitResponse, MkdirRequest, PROTOCOL_VERSION, PathQuery,
    ProcessList, PtySize, RemoveQuery, RenameRequest, SignalRequest, StartProcess, StdinWritten,
    UserSpec, WriteQuery, capability,
};
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use crate::auth::{Check, TokenState, bearer, validate_token};
use crate::error::AgentError;
use crate::files;
use crate::process::{ProcessTable, parse_signal};
use crate::system;
use crate::users::Identity;

/// Which system-wide effects `/init` may have. A test agent on a host must
/// not set the host's clock or hostname.
#[derive(Debug, Clone)]
pub struct SystemEffects {
    pub set_clock: bool,
    pub set_hostname: bool,
    pub credit_entropy: bool,
    /// Where `/init`'s `dns` goes; `None` ignores it.
    pub resolv_conf: Option<PathBuf>,
}

#[derive(Debug)]
pub struct AppState {
    pub processes: Arc<ProcessTable>,
    pub token: TokenState,
    /// Serialises `/init`s, so the first-init-claims rule holds under races.
    pub init_lock: tokio::sync::Mutex<()>,
    pub started: Instant,
    pub effects: SystemEffects,
    pub shutdown: tokio::sync::mpsc::Sender<()>,
}

const NDJSON: &str = "application/x-ndjson";
const FILE_CHUNK: usize = 256 << 10;
/// JSON request bodies are small; refuse anything larger than this.
const MAX_JSON_BODY: usize = 4 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/init", post(init))
        .route("/shutdown", post(shutdown))
        .route("/processes", get(list_processes).post(start_process))
        .route("/processes/{pid}", get(process_info))
        .route("/processes/{pid}/events", get(process_events))
        .route("/processes/{pid}/stdin", post(write_stdin))
        .route("/processes/{pid}/stdin/close", post(close_stdin))
        .route("/processes/{pid}/signal", post(signal))
        .route("/processes/{pid}/resize", post(resize))
        .route("/files", get(read_file).put(write_file).delete(remove))
        .route("/files/stat", get(stat))
        .route("/files/list", get(list_dir))
        .route("/files/mkdir", post(mkdir))
        .route("/files/rename", post(rename))
        .route("/files/watch", get(watch_dir))
        .fallback(|req: Request| async move {
            AgentError::NoSuchEndpoint(format!("{} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|| async {
            AgentError::InvalidRequest("method not allowed on this endpoint".into()).into_response()
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // `/init` checks the token itself, atomically with setting the new one.
    if req.uri().path() == "/init" {
        return next.run(req).await;
    }
    match state.token.check(bearer(req.headers())) {
        Check::Accepted => next.run(req).await,
        Check::NotInitialized if req.uri().path() == "/health" => next.run(req).await,
        Check::NotInitialized => {
            AgentError::Unauthorized("the agent is not initialised yet: POST /init first")
                .into_response()
        }
        Check::Rejected => {
            AgentError::Unauthorized("missing or wrong bearer token").into_response()
        }
    }
}

/// A JSON body whose errors come back in the protocol's error body. The
/// content type is not insisted on.
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AgentError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BODY)
            .await
            .map_err(|e| AgentError::InvalidRequest(format!("reading the body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| AgentError::InvalidRequest(format!("bad JSON body: {e}")))
    }
}

/// A query string whose errors come back in the protocol's error body.
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AgentError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| AgentError::InvalidRequest(format!("bad query string: {}", e.body_text())))
    }
}

/// The `{pid}` of a process path.
struct Pid(u32);

impl<S: Send + Sync> FromRequestParts<S> for Pid {
    type Rejection = AgentError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<u32>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(pid)| Pid(pid))
            .map_err(|_| AgentError::InvalidRequest("the pid in the path must be a number".into()))
    }
}

fn ok_empty() -> Json<serde_json::Value> {
    Json(serde_json::json!({}))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        capabilities: capability::ALL_V2.iter().map(|c| c.to_string()).collect(),
        uptime_ms: state.started.elapsed().as_millis() as u64,
        initialized: state.token.initialized(),
    })
}

async fn init(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<Json<InitResponse>, AgentError> {
    validate_token(&req.token)?;
    let nameservers = req
        .dns
        .as_ref()
        .map(|list| {
            list.iter()
                .map(|s| {
                    s.parse::<IpAddr>().map_err(|_| {
                        AgentError::InvalidRequest(format!("dns entry {s:?} is not an IP address"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    if let Some(name) = &req.hostname
        && (name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
    {
        return Err(AgentError::InvalidRequest(format!(
            "hostname {name:?} must be 1 to 64 letters, digits, '-' or '.'"
        )));
    }
    if let Some(env) = &req.env
        && env
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(AgentError::InvalidRequest(
            "env names must be non-empty, without '=' or NUL".into(),
        ));
    }

    let _serial = state.init_lock.lock().await;
    if state.token.check(bearer(&headers)) == Check::Rejected {
        return Err(AgentError::Unauthorized("missing or wrong bearer token"));
    }
    // Effects first, token last: if an effect fails, the caller can retry
    // with the token it already has.
    let fx = &state.effects;
    let mut out = InitResponse::default();
    if let Some(ns) = req.time_unix_ns
        && fx.set_clock
    {
        system::set_clock(ns).map_err(|e| AgentError::io("setting the clock", e))?;
        out.clock_set = true;
    }
    if let Some(entropy) = &req.entropy_b64 {
        system::add_entropy(entropy, fx.credit_entropy)
            .map_err(|e| AgentError::io("adding entropy", e))?;
        out.entropy_bytes = entropy.len() as u64;
        out.entropy_credited = fx.credit_entropy;
    }
    if let (Some(ns), Some(path)) = (&nameservers, &fx.resolv_conf) {
        system::write_resolv_conf(path, ns)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))?;
        out.resolv_conf_written = true;
    }
    if let Some(name) = &req.hostname
        && fx.set_hostname
    {
        system::set_hostname(name).map_err(|e| AgentError::io("setting the hostname", e))?;
        out.hostname_set = true;
    }
    if let Some(env) = req.env {
        state.processes.set_default_env(env);
    }
    out.token_rotated = state.token.set(&req.token);
    tracing::info!(
        clock_set = out.clock_set,
        entropy_bytes = out.entropy_bytes,
        token_rotated = out.token_rotated,
        "initialised"
    );
    Ok(Json(out))
}

async fn shutdown(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let _ = state.shutdown.try_send(());
    (StatusCode::ACCEPTED, ok_empty())
}

fn ndjson(
    stream: impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp
}

async fn start_process(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<StartProcess>,
) -> Result<Response, AgentError> {
    let foreground = !req.background;
    let process = state.processes.start(req).await?;
    Ok(ndjson(state.processes.events(process, 0, foreground)))
}

async fn list_processes(State(state): State<Arc<AppState>>) -> Json<ProcessList> {
    Json(ProcessList {
        processes: state.processes.list(),
    })
}

async fn process_info(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
) -> Result<Json<ember_guest_api::ProcessInfo>, AgentError> {
    Ok(Json(state.processes.get(pid)?.info()))
}

async fn process_events(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, AgentError> {
    let process = state.processes.get(pid)?;
    Ok(ndjson(state.processes.events(process, q.after, false)))
}

async fn write_stdin(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    body: Body,
) -> Result<Json<StdinWritten>, AgentError> {
    let process = state.processes.get(pid)?;
    let written = state
        .processes
        .write_stdin(&process, body.into_data_stream())
        .await?;
    Ok(Json(StdinWritten { written }))
}

async fn close_stdin(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
) -> Result<Json<serde_json::Value>, AgentError> {
    let process = state.processes.get(pid)?;
    state.processes.close_stdin(&process).await?;
    Ok(ok_empty())
}

async fn signal(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let signal = parse_signal(&req.signal)?;
    state.processes.signal(pid, signal, req.group)?;
    Ok(ok_empty())
}

async fn resize(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    ApiJson(size): ApiJson<PtySize>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let process = state.processes.get(pid)?;
    state.processes.resize(&process, size)?;
    Ok(ok_empty())
}

fn identity(state: &AppState, user: Option<&str>) -> Result<Identity, AgentError> {
    let spec = user.map(|u| u.parse::<UserSpec>().unwrap_or_else(|e| match e {}));
    state.processes.users().resolve(spec.as_ref())
}

async fn read_file(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let id = identity(&state, q.user.as_deref())?;
    let file = files::open_for_read(&id, path).await?;
    let body = match file.len {
        Some(len) => {
            Body::from_stream(ReaderStream::with_capacity(file.file.take(len), FILE_CHUNK))
        }
        None => Body::from_stream(ReaderStream::with_capacity(file.file, FILE_CHUNK)),
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = file.len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(resp)
}

async fn write_file(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<WriteQuery>,
    body: Body,
) -> Result<Json<ember_guest_api::FileInfo>, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let mode = q.mode.as_deref().map(files::parse_mode).transpose()?;
    let id = identity(&state, q.user.as_deref())?;
    let info = files::write(
        &id,
        path,
        mode,
        q.parents.unwrap_or(true),
        body.into_data_stream(),
    )
    .await?;
    Ok(Json(info))
}

async fn stat(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<ember_guest_api::FileInfo>, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let id = identity(&state, q.user.as_deref())?;
    Ok(Json(files::stat(&id, path).await?))
}

async fn list_dir(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<ember_guest_api::DirListing>, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let id = identity(&state, q.user.as_deref())?;
    Ok(Json(files::list(&id, path).await?))
}

async fn watch_dir(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ember_guest_api::WatchQuery>,
) -> Result<Response, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let id = identity(&state, q.user.as_deref())?;
    let events = crate::watch::watch(&id, path, q.recursive).await?;
    Ok(ndjson(events))
}

async fn mkdir(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<Json<ember_guest_api::FileInfo>, AgentError> {
    let path = files::absolute_path(&req.path)?;
    let id = state.processes.users().resolve(req.user.as_ref())?;
    Ok(Json(files::mkdir(&id, path, req.mode, req.parents).await?))
}

async fn remove(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let path = files::absolute_path(&q.path)?;
    let id = identity(&state, q.user.as_deref())?;
    files::remove(&id, path, q.recursive).await?;
    Ok(ok_empty())
}

async fn rename(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Json<ember_guest_api::FileInfo>, AgentError> {
    let from = files::absolute_path(&req.from)?;
    let to = files::absolute_path(&req.to)?;
    let id = state.processes.users().resolve(req.user.as_ref())?;
    Ok(Json(files::rename(&id, from, to, req.overwrite).await?))
}
