//! envd's data plane, answered by the control plane: the Connect services
//! `process.Process` and `filesystem.Filesystem`, and the HTTP `/files` and
//! `/health`. Each request names its sandbox with the `E2b-Sandbox-Id`
//! header (or a `{port}-{sandboxID}.{domain}` host name) and proves access
//! with `X-Access-Token`, the sandbox's access token; it then goes to the
//! sandbox's host agent exactly as Ember's own process and file endpoints
//! do.
//!
//! Semantics follow E2B's envd where the SDKs depend on them: a started
//! process runs on when its client disconnects, until its own deadline
//! (`Connect-Timeout-Ms`); calls run as the user named by
//! `Authorization: Basic <user:>`, by default `user`; relative paths are
//! relative to that user's home.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ember_proto::host as pb;
use futures::StreamExt;
use serde_json::{Value, json};

use super::connect::{self, RpcError, field};
use crate::api::AppState;
use crate::auth::Caller;
use crate::hosts::HostClient;
use crate::model::{Sandbox, SandboxState};

/// The user E2B's SDKs run as when they name none.
pub const DEFAULT_USER: &str = "user";
/// envd's port, the one `E2b-Sandbox-Port` names for envd calls.
pub const ENVD_PORT: u16 = 49983;
/// Most entries one `ListDir` returns (whatever its depth).
const MAX_LIST_ENTRIES: usize = 10_000;

/// The routes of envd, answered for the sandbox each request names.
pub fn router(state: AppState) -> Router {
    let audit_store = state.store.clone();
    Router::new()
        .route("/health", get(health))
        .route("/files", get(read_file).post(write_files))
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_process))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            crate::audit::layer(
                audit_store.clone(),
                crate::audit::envd_changes_something,
                req,
                next,
            )
        }))
        .fallback(|req: Request| async move {
            RpcError::unimplemented(format!(
                "{} is not an envd call Ember answers",
                req.uri().path()
            ))
        })
        .layer(DefaultBodyLimit::max(connect::MAX_MESSAGE + 5))
        .with_state(state)
}

/// The sandbox a request names, from its headers: `E2b-Sandbox-Id`, a host
/// name `{port}-{sandboxID}.{domain}`, or else the sandbox its access token
/// names (Ember's tokens carry their sandbox's ID; E2B's SDKs before 2.8
/// send no `E2b-Sandbox-Id` for a sandbox they connected to).
pub fn requested_sandbox(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        return Some(id.trim().to_owned());
    }
    let from_host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|host| host.split('.').next())
        .and_then(|label| label.split_once('-'))
        .filter(|(port, id)| {
            port.parse::<u16>().is_ok() && id.parse::<ember_types::SandboxId>().is_ok()
        })
        .map(|(_, id)| id.to_owned());
    from_host.or_else(|| {
        let token = headers.get("x-access-token")?.to_str().ok()?;
        crate::auth::access_token_sandbox(token.trim()).map(str::to_owned)
    })
}

// ------------------------------------------------------------------ access

/// An authenticated call on a running sandbox.
struct Target {
    sb: Sandbox,
    client: HostClient,
    user: String,
}

impl Target {
    fn home(&self) -> String {
        home_of(&self.user)
    }

    /// `path` made absolute: relative paths (and `~`) are relative to the
    /// user's home, as envd resolves them.
    fn path(&self, path: &str) -> Result<String, RpcError> {
        resolve(&self.home(), path)
    }
}

fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".into()
    } else {
        format!("/home/{user}")
    }
}

fn resolve(home: &str, path: &str) -> Result<String, RpcError> {
    if path.contains('\0') || path.len() > 4096 {
        return Err(RpcError::invalid(
            "a path must be at most 4096 bytes, without NUL",
        ));
    }
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else if path == "~" || path.is_empty() {
        home.to_owned()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else {
        format!("{home}/{path}")
    })
}

/// The user from `Authorization: Basic base64(user:)`, if any.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        RpcError::new(
            "unauthenticated",
            "Authorization must be `Basic base64(<user>:)`",
        )
    };
    let v = v.to_str().map_err(|_| bad())?;
    let (scheme, b64) = v.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let raw = STANDARD.decode(b64.trim()).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let user = raw.split(':').next().unwrap_or_default();
    Ok((!user.is_empty()).then(|| user.to_owned()))
}

async fn target(
    state: &AppState,
    headers: &HeaderMap,
    user: Option<String>,
) -> Result<Target, RpcError> {
    let id = requested_sandbox(headers).ok_or_else(|| {
        RpcError::invalid("name the sandbox with the E2b-Sandbox-Id header or X-Access-Token")
    })?;
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            RpcError::new(
                "unauthenticated",
                "missing X-Access-Token: send the envdAccessToken the sandbox was created or connected with",
            )
        })?;
    let caller = crate::api::authenticate(state, token)
        .await
        .map_err(|e| RpcError::new("unauthenticated", e.body.message))?;
    let team = match caller {
        Caller::Sandbox {
            sandbox_id,
            team_id,
        } if sandbox_id == id => team_id,
        _ => {
            return Err(RpcError::new(
                "unauthenticated",
                format!("this access token is not sandbox {id}'s"),
            ));
        }
    };
    let (sb, client) = state.ops.running(&team, &id).await.map_err(|e| match e {
        crate::error::Error::NotRunning { state, .. } => RpcError::new(
            "unavailable",
            format!(
                "sandbox {id} was not found running: it is {}{}",
                state.as_str(),
                if state == SandboxState::Paused {
                    " (connect resumes it)"
                } else {
                    ""
                }
            ),
        ),
        crate::error::Error::SandboxNotFound { .. } => {
            RpcError::new("unavailable", format!("sandbox {id} was not found"))
        }
        other => RpcError::new("unavailable", other.to_string()),
    })?;
    let user = match user {
        Some(u) => Some(u),
        None => basic_user(headers)?,
    }
    .unwrap_or_else(|| DEFAULT_USER.to_owned());
    Ok(Target { sb, client, user })
}

/// A host or guest failure as a Connect error.
fn from_status(status: tonic::Status) -> RpcError {
    let msg = status.message().to_owned();
    let code = match status.code() {
        tonic::Code::NotFound => "not_found",
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => "invalid_argument",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::AlreadyExists => "already_exists",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Unimplemented => "unimplemented",
        tonic::Code::Unavailable => "unavailable",
        _ => "internal",
    };
    RpcError::new(code, crate::hosts::status_reason(&status).if_empty(msg))
}

trait IfEmpty {
    fn if_empty(self, other: String) -> String;
}

impl IfEmpty for String {
    fn if_empty(self, other: String) -> String {
        if self.is_empty() { other } else { self }
    }
}

type RpcResult = Result<Response, RpcError>;

// ------------------------------------------------------------------ process

/// The pid a `ProcessSelector` names: a pid, or the tag of a running process.
async fn selected_pid(t: &mut Target, msg: &Value) -> Result<u32, RpcError> {
    let sel = field(msg, "process", "process")
        .ok_or_else(|| RpcError::invalid("name the process: {\"process\": {\"pid\": N}}"))?;
    if let Some(pid) = field(sel, "pid", "pid").and_then(connect::u32_field) {
        return Ok(pid);
    }
    let tag = field(sel, "tag", "tag")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid("a process selector needs a pid or a tag"))?;
    let list = t
        .client
        .list_processes(pb::SandboxRef {
            sandbox_id: t.sb.id.clone(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    list.processes
        .iter()
        .find(|p| p.running && p.tag == tag)
        .map(|p| p.pid)
        .ok_or_else(|| RpcError::new("not_found", format!("no running process tagged {tag:?}")))
}

fn event(inner: Value) -> Bytes {
    connect::message(&json!({ "event": inner }))
}

fn exit_event(x: &pb::ExitStatus) -> Value {
    match (x.exit_code, x.signal) {
        (Some(code), _) => json!({
            "end": {"exitCode": code, "exited": true, "status": format!("exit status {code}")}
        }),
        (None, Some(sig)) => json!({
            "end": {"exitCode": -1, "exited": false, "status": format!("signal: {}", signal_name(sig))}
        }),
        (None, None) => json!({"end": {"exitCode": -1, "exited": false, "status": "unknown"}}),
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        9 => "killed".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// Relay a process's host events as envd's stream: `start` first (exactly
/// once), then `data`, then `end` and the end-of-stream envelope. The relay
/// stops when the client goes; the process does not (it was started in the
/// background).
fn relay(
    mut events: tonic::Streaming<pb::ExecEvent>,
    known_pid: Option<u32>,
    keepalive: Option<Duration>,
    pty: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut started = false;
        if let Some(pid) = known_pid {
            if tx
                .send(event(json!({"start": {"pid": pid}})))
                .await
                .is_err()
            {
                return;
            }
            started = true;
        }
        let period = keepalive.unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            let next = tokio::select! {
                m = events.message() => m,
                _ = tick.tick(), if keepalive.is_some() && started => {
                    if tx.send(event(json!({"keepalive": {}}))).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            use pb::exec_event::Event;
            let frame = match next {
                Ok(Some(pb::ExecEvent {
                    event: Some(ev), ..
                })) => match ev {
                    Event::StartedPid(pid) if !started => {
                        started = true;
                        event(json!({"start": {"pid": pid}}))
                    }
                    Event::StartedPid(_) => continue,
                    Event::Stdout(b) => {
                        let key = if pty { "pty" } else { "stdout" };
                        event(json!({"data": {key: STANDARD.encode(b)}}))
                    }
                    Event::Stderr(b) => event(json!({"data": {"stderr": STANDARD.encode(b)}})),
                    Event::Exit(x) if x.timed_out => {
                        let _ = tx
                            .send(
                                RpcError::new(
                                    "deadline_exceeded",
                                    "the process ran past its deadline (Connect-Timeout-Ms) and was killed",
                                )
                                .end_frame(),
                            )
                            .await;
                        return;
                    }
                    Event::Exit(x) => {
                        if tx.send(event(exit_event(&x))).await.is_err() {
                            return;
                        }
                        let _ = tx.send(connect::end_ok()).await;
                        return;
                    }
                },
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let _ = tx
                        .send(
                            RpcError::new(
                                "unavailable",
                                "the process's output stream ended before it exited: the sandbox stopped or was paused",
                            )
                            .end_frame(),
                        )
                        .await;
                    return;
                }
                Err(status) => {
                    let _ = tx.send(from_status(status).end_frame()).await;
                    return;
                }
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    connect::stream_response(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.max(1)))
}

fn pty_size(msg: &Value) -> Option<pb::PtySize> {
    let size = field(msg, "pty", "pty").and_then(|p| field(p, "size", "size"))?;
    Some(pb::PtySize {
        cols: field(size, "cols", "cols").and_then(connect::u32_field)?,
        rows: field(size, "rows", "rows").and_then(connect::u32_field)?,
    })
}

async fn start(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let process = field(&msg, "process", "process")
        .ok_or_else(|| RpcError::invalid("Start needs a process: {\"process\": {\"cmd\": …}}"))?;
    let cmd = field(process, "cmd", "cmd")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty() && !c.contains('\0'))
        .ok_or_else(|| RpcError::invalid("process.cmd must be a non-empty program name"))?
        .to_owned();
    let args = match field(process, "args", "args") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| RpcError::invalid("process.args must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(RpcError::invalid("process.args must be a list")),
    };
    let env = match field(process, "envs", "envs") {
        None => Default::default(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|v| (k.clone(), v.to_owned()))
                    .ok_or_else(|| RpcError::invalid("process.envs values must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(RpcError::invalid("process.envs must be an object")),
    };
    let cwd = match field(process, "cwd", "cwd").and_then(Value::as_str) {
        Some(c) => t.path(c)?,
        None => t.home(),
    };
    let pty = pty_size(&msg);
    let tag = field(&msg, "tag", "tag")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Absent (E2B's first 2.x SDKs, whose protocol had no such field) means
    // envd's old behaviour: stdin stays open.
    let stdin = field(&msg, "stdin", "stdin")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let preq = pb::ExecRequest {
        sandbox_id: t.sb.id.clone(),
        cmd,
        args,
        env,
        cwd,
        user: t.user.clone(),
        timeout_ms: connect::timeout_ms(&headers).unwrap_or(0),
        stdin: stdin || pty.is_some(),
        pty,
        // E2B's semantics: the process outlives its client.
        background: true,
        tag,
    };
    crate::api::processes::validate_exec(&preq).map_err(|e| RpcError::invalid(e.body.message))?;
    let is_pty = preq.pty.is_some();
    let events = t.client.exec(preq).await.map_err(from_status)?.into_inner();
    state.ops.touch(&t.sb).await;
    Ok(relay(events, None, keepalive(&headers), is_pty))
}

async fn connect_process(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let pid = selected_pid(&mut t, &msg).await?;
    // From the first event: a client that connects late still sees the
    // whole output (as far as the guest keeps it) and the exit.
    let events = t
        .client
        .connect_process(pb::ConnectProcessRequest {
            sandbox_id: t.sb.id.clone(),
            pid,
            after_seq: 0,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    state.ops.touch(&t.sb).await;
    Ok(relay(events, Some(pid), keepalive(&headers), false))
}

async fn list(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let reply = t
        .client
        .list_processes(pb::SandboxRef {
            sandbox_id: t.sb.id.clone(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let processes: Vec<Value> = reply
        .processes
        .into_iter()
        .filter(|p| p.running)
        .map(|p| {
            let mut info = json!({
                "config": {"cmd": p.cmd, "args": p.args, "envs": {}},
                "pid": p.pid,
            });
            if !p.tag.is_empty() {
                info["tag"] = json!(p.tag);
            }
            info
        })
        .collect();
    Ok(connect::unary(json!({ "processes": processes })))
}

async fn write_input(t: &mut Target, pid: u32, data: Vec<u8>, close: bool) -> Result<(), RpcError> {
    t.client
        .write_stdin(pb::WriteStdinRequest {
            sandbox_id: t.sb.id.clone(),
            pid,
            data,
            close,
        })
        .await
        .map_err(from_status)?;
    Ok(())
}

fn input_bytes(msg: &Value) -> Result<Vec<u8>, RpcError> {
    let input = field(msg, "input", "input").ok_or_else(|| {
        RpcError::invalid("SendInput needs input: {\"stdin\": base64} or {\"pty\": base64}")
    })?;
    match field(input, "stdin", "stdin").or_else(|| field(input, "pty", "pty")) {
        Some(v) => connect::bytes_field(v),
        None => Ok(Vec::new()),
    }
}

async fn send_input(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let pid = selected_pid(&mut t, &msg).await?;
    let data = input_bytes(&msg)?;
    write_input(&mut t, pid, data, false).await?;
    Ok(connect::unary(json!({})))
}

/// Client streaming: `start` names the process, each `data` carries input.
async fn stream_input(State(state): State<AppState>, req: Request) -> RpcResult {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let mut t = target(&state, &headers, None).await?;
    let mut reader = connect::EnvelopeReader::new(body);
    let mut pid = None;
    while let Some(msg) = reader.next().await? {
        if let Some(start) = field(&msg, "start", "start") {
            pid = Some(selected_pid(&mut t, start).await?);
        } else if let Some(data) = field(&msg, "data", "data") {
            let pid = pid.ok_or_else(|| RpcError::invalid("StreamInput must begin with start"))?;
            let bytes = input_bytes(data)?;
            write_input(&mut t, pid, bytes, false).await?;
        }
    }
    let frames = futures::stream::iter([connect::message(&json!({})), connect::end_ok()]);
    Ok(connect::stream_response(frames))
}

async fn send_signal(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let pid = selected_pid(&mut t, &msg).await?;
    let signal = match field(&msg, "signal", "signal") {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => "KILL",
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => "TERM",
        Some(v) if connect::u32_field(v) == Some(9) => "KILL",
        Some(v) if connect::u32_field(v) == Some(15) => "TERM",
        other => {
            return Err(RpcError::invalid(format!(
                "signal {other:?}: envd's signals are SIGNAL_SIGKILL and SIGNAL_SIGTERM"
            )));
        }
    };
    t.client
        .signal_process(pb::SignalProcessRequest {
            sandbox_id: t.sb.id.clone(),
            pid,
            signal: signal.into(),
        })
        .await
        .map_err(|status| match status.code() {
            // envd knows only running processes: one that has exited is gone.
            tonic::Code::FailedPrecondition => {
                RpcError::new("not_found", format!("process {pid} is not running"))
            }
            _ => from_status(status),
        })?;
    Ok(connect::unary(json!({})))
}

async fn close_stdin(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let pid = selected_pid(&mut t, &msg).await?;
    write_input(&mut t, pid, Vec::new(), true).await?;
    Ok(connect::unary(json!({})))
}

async fn update(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let pid = selected_pid(&mut t, &msg).await?;
    if let Some(size) = pty_size(&msg) {
        t.client
            .resize_pty(pb::ResizePtyRequest {
                sandbox_id: t.sb.id.clone(),
                pid,
                size: Some(size),
            })
            .await
            .map_err(from_status)?;
    }
    Ok(connect::unary(json!({})))
}

// ------------------------------------------------------------------ filesystem

fn owner_name(id: u32) -> String {
    match id {
        0 => "root".into(),
        1000 => DEFAULT_USER.into(),
        n => n.to_string(),
    }
}

fn permissions(kind: pb::FileType, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        pb::FileType::Directory => 'd',
        pb::FileType::Symlink => 'l',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// envd's `EntryInfo` for a host `FileStat`.
fn entry(s: &pb::FileStat) -> Value {
    let kind = s.r#type();
    let type_name = match kind {
        pb::FileType::File => "FILE_TYPE_FILE",
        pb::FileType::Directory => "FILE_TYPE_DIRECTORY",
        pb::FileType::Symlink => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let mut e = json!({
        "name": s.name,
        "type": type_name,
        "path": s.path,
        "size": s.size.to_string(),
        "mode": s.mode & 0o7777,
        "permissions": permissions(kind, s.mode),
        "owner": owner_name(s.uid),
        "group": owner_name(s.gid),
        "modifiedTime": s.modified_at,
    });
    if kind == pb::FileType::Symlink {
        e["symlinkTarget"] = json!(s.symlink_target);
        e["isSymlink"] = json!(true);
    }
    e
}

fn path_arg(msg: &Value, camel: &str, snake: &str) -> Result<String, RpcError> {
    field(msg, camel, snake)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| RpcError::invalid(format!("{camel} is required")))
}

async fn stat_path(t: &mut Target, path: &str) -> Result<pb::FileStat, RpcError> {
    Ok(t.client
        .stat_file(pb::FileRef {
            sandbox_id: t.sb.id.clone(),
            path: path.to_owned(),
            user: t.user.clone(),
        })
        .await
        .map_err(from_status)?
        .into_inner())
}

async fn stat(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let path = t.path(&path_arg(&msg, "path", "path")?)?;
    let s = stat_path(&mut t, &path).await?;
    Ok(connect::unary(json!({ "entry": entry(&s) })))
}

async fn make_dir(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let path = t.path(&path_arg(&msg, "path", "path")?)?;
    match stat_path(&mut t, &path).await {
        Ok(_) => {
            return Err(RpcError::new(
                "already_exists",
                format!("{path} already exists"),
            ));
        }
        Err(e) if e.code == "not_found" => {}
        Err(e) => return Err(e),
    }
    let s = t
        .client
        .make_dir(pb::MakeDirRequest {
            sandbox_id: t.sb.id.clone(),
            path,
            user: t.user.clone(),
            mode: None,
            parents: true,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    Ok(connect::unary(json!({ "entry": entry(&s) })))
}

async fn move_entry(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let from = t.path(&path_arg(&msg, "source", "source")?)?;
    let to = t.path(&path_arg(&msg, "destination", "destination")?)?;
    let s = t
        .client
        .rename_file(pb::RenameFileRequest {
            sandbox_id: t.sb.id.clone(),
            from,
            to,
            user: t.user.clone(),
            overwrite: true,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    Ok(connect::unary(json!({ "entry": entry(&s) })))
}

async fn list_dir(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let root = t.path(&path_arg(&msg, "path", "path")?)?;
    let depth = field(&msg, "depth", "depth")
        .and_then(connect::u32_field)
        .unwrap_or(1)
        .max(1);
    let mut out = Vec::new();
    let mut level = vec![root];
    for d in 1..=depth {
        let mut next = Vec::new();
        for dir in level {
            let reply = t
                .client
                .list_dir(pb::FileRef {
                    sandbox_id: t.sb.id.clone(),
                    path: dir,
                    user: t.user.clone(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            for s in reply.entries {
                if d < depth && s.r#type() == pb::FileType::Directory {
                    next.push(s.path.clone());
                }
                out.push(entry(&s));
                if out.len() > MAX_LIST_ENTRIES {
                    return Err(RpcError::new(
                        "resource_exhausted",
                        format!("more than {MAX_LIST_ENTRIES} entries; list with a smaller depth"),
                    ));
                }
            }
        }
        level = next;
    }
    Ok(connect::unary(json!({ "entries": out })))
}

async fn remove(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let mut t = target(&state, &headers, None).await?;
    let path = t.path(&path_arg(&msg, "path", "path")?)?;
    t.client
        .remove_file(pb::RemoveFileRequest {
            sandbox_id: t.sb.id.clone(),
            path,
            user: t.user.clone(),
            recursive: true,
        })
        .await
        .map_err(from_status)?;
    Ok(connect::unary(json!({})))
}

/// envd's `FilesystemEvent` for a watch event (`None`: nothing to report).
fn fs_event(ev: &crate::wire::WatchEvent) -> Option<Value> {
    use crate::wire::WatchEventType as T;
    let t = match ev.event_type {
        T::Create => "EVENT_TYPE_CREATE",
        T::Write => "EVENT_TYPE_WRITE",
        T::Remove => "EVENT_TYPE_REMOVE",
        T::Rename => "EVENT_TYPE_RENAME",
        T::Chmod => "EVENT_TYPE_CHMOD",
        T::Started | T::Overflow => return None,
    };
    Some(json!({"name": ev.name, "type": t}))
}

fn watch_args(t: &Target, msg: &Value) -> Result<(String, bool), RpcError> {
    let path = t.path(&path_arg(msg, "path", "path")?)?;
    let recursive = field(msg, "recursive", "recursive")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((path, recursive))
}

type WatchStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<crate::wire::WatchEvent, crate::api::ApiError>>
            + Send
            + 'static,
    >,
>;

async fn open_watch(
    state: &AppState,
    t: &Target,
    path: String,
    recursive: bool,
) -> Result<WatchStream, RpcError> {
    let events = crate::api::files::watch_events(
        state,
        &t.sb.team_id,
        &t.sb.id,
        path,
        recursive,
        Some(t.user.clone()),
    )
    .await
    .map_err(|e| {
        let code = match e.status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::BAD_REQUEST => "invalid_argument",
            StatusCode::FORBIDDEN => "permission_denied",
            StatusCode::CONFLICT => "failed_precondition",
            _ => "unavailable",
        };
        RpcError::new(code, e.body.message)
    })?;
    Ok(Box::pin(events))
}

/// The streaming watch (E2B's async SDKs): `start`, then `filesystem`
/// events and keep-alives, until the client hangs up.
async fn watch_dir(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let t = target(&state, &headers, None).await?;
    let (path, recursive) = watch_args(&t, &msg)?;
    let mut events = open_watch(&state, &t, path, recursive).await?;
    let keepalive = keepalive(&headers);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if tx
            .send(connect::message(&json!({"start": {}})))
            .await
            .is_err()
        {
            return;
        }
        let period = keepalive.unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            let frame = tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick(), if keepalive.is_some() => connect::message(&json!({"keepalive": {}})),
                ev = events.next() => match ev {
                    Some(Ok(ev)) => match fs_event(&ev) {
                        Some(e) => connect::message(&json!({"filesystem": e})),
                        None => continue,
                    },
                    Some(Err(e)) => {
                        let _ = tx.send(RpcError::new("unavailable", e.body.message).end_frame()).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(connect::end_ok()).await;
                        return;
                    }
                },
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    Ok(connect::stream_response(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// A watcher of E2B's polling API (its sync SDKs): the watch runs here and
/// buffers events between polls. One server's memory: a replica other than
/// the one that made it answers `not_found`.
#[derive(Debug)]
struct Watcher {
    sandbox_id: String,
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::AbortHandle,
    last_poll: std::time::Instant,
}

/// Most watchers per sandbox, and events one keeps between polls.
const MAX_WATCHERS_PER_SANDBOX: usize = 64;
const MAX_BUFFERED_EVENTS: usize = 10_000;
/// A watcher nobody polls for this long is removed.
const WATCHER_IDLE: Duration = Duration::from_secs(600);

type Watchers = HashMap<String, Watcher>;

fn watchers() -> MutexGuard<'static, Watchers> {
    static W: OnceLock<Mutex<Watchers>> = OnceLock::new();
    W.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn expire_idle_watchers() {
    watchers().retain(|_, w| {
        let keep = w.last_poll.elapsed() < WATCHER_IDLE && !w.task.is_finished();
        if !keep {
            w.task.abort();
        }
        keep
    });
}

async fn create_watcher(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let t = target(&state, &headers, None).await?;
    expire_idle_watchers();
    let open = watchers()
        .values()
        .filter(|w| w.sandbox_id == t.sb.id)
        .count();
    if open >= MAX_WATCHERS_PER_SANDBOX {
        return Err(RpcError::new(
            "resource_exhausted",
            format!("sandbox {} has {open} watchers; remove some first", t.sb.id),
        ));
    }
    let (path, recursive) = watch_args(&t, &msg)?;
    let mut events = open_watch(&state, &t, path, recursive).await?;
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(ev)) = events.next().await {
            if let Some(e) = fs_event(&ev) {
                let mut b = sink.lock().unwrap_or_else(|p| p.into_inner());
                if b.len() >= MAX_BUFFERED_EVENTS {
                    b.remove(0);
                }
                b.push(e);
            }
        }
    });
    let id = format!(
        "w-{}",
        ember_types::SandboxId::new()
            .as_str()
            .trim_start_matches("sb-")
    );
    watchers().insert(
        id.clone(),
        Watcher {
            sandbox_id: t.sb.id.clone(),
            events: buffer,
            task: task.abort_handle(),
            last_poll: std::time::Instant::now(),
        },
    );
    Ok(connect::unary(json!({ "watcherId": id })))
}

fn watcher_id(msg: &Value) -> Result<String, RpcError> {
    field(msg, "watcherId", "watcher_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| RpcError::invalid("watcherId is required"))
}

fn no_watcher(id: &str, sandbox: &str) -> RpcError {
    RpcError::new("not_found", format!("no watcher {id} on sandbox {sandbox}"))
}

async fn get_watcher_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let t = target(&state, &headers, None).await?;
    let id = watcher_id(&msg)?;
    let mut all = watchers();
    let w = all
        .get_mut(&id)
        .filter(|w| w.sandbox_id == t.sb.id)
        .ok_or_else(|| no_watcher(&id, &t.sb.id))?;
    w.last_poll = std::time::Instant::now();
    let events = std::mem::take(&mut *w.events.lock().unwrap_or_else(|p| p.into_inner()));
    if events.is_empty() && w.task.is_finished() {
        all.remove(&id);
        return Err(RpcError::new(
            "unavailable",
            format!("watcher {id} ended: its sandbox stopped or was paused"),
        ));
    }
    Ok(connect::unary(json!({ "events": events })))
}

async fn remove_watcher(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> RpcResult {
    let msg = connect::request_message(&headers, &body)?;
    let t = target(&state, &headers, None).await?;
    let id = watcher_id(&msg)?;
    let mut all = watchers();
    match all.get(&id) {
        Some(w) if w.sandbox_id == t.sb.id => {
            w.task.abort();
            all.remove(&id);
            Ok(connect::unary(json!({})))
        }
        _ => Err(no_watcher(&id, &t.sb.id)),
    }
}

// ------------------------------------------------------------------ HTTP

/// envd's HTTP errors: a status and `{code: <status>, message}`.
struct HttpError(RpcError);

impl From<RpcError> for HttpError {
    fn from(e: RpcError) -> HttpError {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            // envd answers 502 for a sandbox that is not there to answer.
            "unavailable" => StatusCode::BAD_GATEWAY,
            _ => self.0.clone().into_response().status(),
        };
        (
            status,
            axum::Json(json!({"code": status.as_u16(), "message": self.0.message})),
        )
            .into_response()
    }
}

async fn health(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, HttpError> {
    target(&state, &headers, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    user: Option<String>,
}

async fn read_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<FilesQuery>,
) -> Result<Response, HttpError> {
    let mut t = target(&state, &headers, q.username.or(q.user)).await?;
    let path = t.path(
        q.path
            .as_deref()
            .ok_or_else(|| RpcError::invalid("the path parameter is required"))?,
    )?;
    let mut stream = t
        .client
        .read_file(pb::FileRef {
            sandbox_id: t.sb.id.clone(),
            path,
            user: t.user.clone(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let first = stream.message().await.map_err(from_status)?;
    let head = futures::stream::iter(first.map(|c| Ok::<_, std::io::Error>(Bytes::from(c.data))));
    let rest = stream.map(|r| {
        r.map(|c| Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(crate::hosts::status_reason(&s)))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(head.chain(rest)),
    )
        .into_response())
}

/// Write one file from a stream of chunks; a stream that breaks off
/// cancels the call, so nothing truncated is committed.
async fn write_one<S>(t: &mut Target, path: String, data: S) -> Result<Value, RpcError>
where
    S: futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static,
{
    // envd creates missing parent directories.
    if let Some((parent, _)) = path.rsplit_once('/')
        && !parent.is_empty()
    {
        let _ = t
            .client
            .make_dir(pb::MakeDirRequest {
                sandbox_id: t.sb.id.clone(),
                path: parent.to_owned(),
                user: t.user.clone(),
                mode: None,
                parents: true,
            })
            .await;
    }
    let header = pb::WriteFileRequest {
        part: Some(pb::write_file_request::Part::Header(pb::WriteFileHeader {
            sandbox_id: t.sb.id.clone(),
            path: path.clone(),
            user: t.user.clone(),
            mode: None,
        })),
    };
    let (broke_tx, broke_rx) = tokio::sync::oneshot::channel::<String>();
    let chunks =
        futures::stream::unfold((data, Some(broke_tx)), |(mut data, mut broke)| async move {
            match data.next().await {
                Some(Ok(chunk)) => Some((
                    pb::WriteFileRequest {
                        part: Some(pb::write_file_request::Part::Data(chunk.to_vec())),
                    },
                    (data, broke),
                )),
                Some(Err(e)) => {
                    if let Some(tx) = broke.take() {
                        let _ = tx.send(e);
                    }
                    futures::future::pending::<()>().await;
                    None
                }
                None => None,
            }
        });
    let upload = futures::stream::once(async move { header }).chain(chunks);
    let call = t.client.write_file(upload);
    let stat = tokio::select! {
        r = call => r.map_err(from_status)?.into_inner(),
        Ok(why) = broke_rx => {
            return Err(RpcError::invalid(format!("the upload broke off: {why}; nothing was written")));
        }
    };
    Ok(json!({"name": stat.name, "type": "file", "path": stat.path}))
}

/// A gzip stream inflated as it arrives.
fn gunzip<S>(body: S) -> impl futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static
where
    S: futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static,
{
    use std::io::Write;
    let decoder = flate2::write::GzDecoder::new(Vec::new());
    Box::pin(futures::stream::unfold(
        (body, Some(decoder)),
        |(mut body, mut decoder)| async move {
            let mut dec = decoder.take()?;
            loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        if let Err(e) = dec.write_all(&chunk) {
                            return Some((Err(format!("not gzip: {e}")), (body, None)));
                        }
                        let out = std::mem::take(dec.get_mut());
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (body, Some(dec))));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (body, None))),
                    None => {
                        return match dec.finish() {
                            Ok(rest) if rest.is_empty() => None,
                            Ok(rest) => Some((Ok(Bytes::from(rest)), (body, None))),
                            Err(e) => {
                                Some((Err(format!("a truncated gzip body: {e}")), (body, None)))
                            }
                        };
                    }
                }
            }
        },
    ))
}

async fn write_files(
    State(state): State<AppState>,
    Query(q): Query<FilesQuery>,
    req: Request,
) -> Result<Response, HttpError> {
    let headers = req.headers().clone();
    let mut t = target(&state, &headers, q.username.or(q.user)).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let mut written = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let mut form = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| RpcError::invalid(format!("a malformed multipart body: {e}")))?;
        loop {
            let part = form
                .next_field()
                .await
                .map_err(|e| RpcError::invalid(format!("a malformed multipart body: {e}")))?;
            let Some(part) = part else { break };
            if part.name() != Some("file") {
                continue;
            }
            let target_path = match (&q.path, part.file_name()) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) if !f.is_empty() => f.to_owned(),
                _ => {
                    return Err(RpcError::invalid(
                        "name the file: a path parameter, or the part's filename",
                    )
                    .into());
                }
            };
            let path = t.path(&target_path)?;
            // A part is read through before the next one can be: buffer it
            // through a channel so the upload streams to the host as it comes.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(8);
            let writer = {
                let mut t2 = Target {
                    sb: t.sb.clone(),
                    client: t.client.clone(),
                    user: t.user.clone(),
                };
                tokio::spawn(async move {
                    write_one(
                        &mut t2,
                        path,
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    )
                    .await
                })
            };
            let mut part = part;
            loop {
                match part.chunk().await {
                    Ok(Some(c)) => {
                        if tx.send(Ok(c)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        break;
                    }
                }
            }
            drop(tx);
            let info = writer
                .await
                .map_err(|e| RpcError::new("internal", e.to_string()))??;
            written.push(info);
        }
        if written.is_empty() {
            return Err(RpcError::invalid("the multipart body has no part named file").into());
        }
    } else {
        let path = t.path(
            q.path
                .as_deref()
                .ok_or_else(|| RpcError::invalid("the path parameter is required"))?,
        )?;
        let body = req
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(|e| e.to_string()));
        let info = if gzip {
            write_one(&mut t, path, gunzip(body)).await?
        } else {
            write_one(&mut t, path, body).await?
        };
        written.push(info);
    }
    state.ops.touch(&t.sb).await;
    Ok(axum::Json(Value::Array(written)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_users_home() {
        assert_eq!(resolve("/home/user", "a/b").unwrap(), "/home/user/a/b");
        assert_eq!(resolve("/home/user", "/etc/x").unwrap(), "/etc/x");
        assert_eq!(resolve("/root", "~/x").unwrap(), "/root/x");
        assert_eq!(resolve("/root", "~").unwrap(), "/root");
        assert!(resolve("/root", "a\0b").is_err());
        assert_eq!(home_of("root"), "/root");
        assert_eq!(home_of("user"), "/home/user");
    }

    #[test]
    fn the_user_comes_from_basic_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        h.insert(header::AUTHORIZATION, "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("root"));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(basic_user(&h).is_err());
    }

    #[test]
    fn the_sandbox_comes_from_the_header_or_the_host_name() {
        let id = ember_types::SandboxId::new().to_string();
        let mut h = HeaderMap::new();
        assert_eq!(requested_sandbox(&h), None);
        h.insert(
            header::HOST,
            format!("49983-{id}.ember.test").parse().unwrap(),
        );
        assert_eq!(requested_sandbox(&h), Some(id.clone()));
        h.insert(header::HOST, "api.ember.test".parse().unwrap());
        assert_eq!(requested_sandbox(&h), None);
        let token = crate::auth::access_token(b"k", &id);
        h.insert("x-access-token", token.parse().unwrap());
        assert_eq!(
            requested_sandbox(&h),
            Some(id.clone()),
            "the token names it"
        );
        let other = ember_types::SandboxId::new().to_string();
        h.insert("e2b-sandbox-id", other.parse().unwrap());
        assert_eq!(requested_sandbox(&h), Some(other), "the header wins");
    }

    #[test]
    fn entries_and_exits_have_envds_shape() {
        let s = pb::FileStat {
            path: "/home/user/d".into(),
            name: "d".into(),
            r#type: pb::FileType::Directory as i32,
            size: 4096,
            mode: 0o40755,
            modified_at: "2026-12-06T00:00:00Z".into(),
            symlink_target: String::new(),
            uid: 1000,
            gid: 1000,
        };
        let e = entry(&s);
        assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(e["size"], "4096");
        assert_eq!(e["mode"], 0o755);
        assert_eq!(e["permissions"], "drwxr-xr-x");
        assert_eq!(e["owner"], "user");
        assert!(e.get("symlinkTarget").is_none());
        let x = pb::ExitStatus {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
        };
        assert_eq!(exit_event(&x)["end"]["exitCode"], 3);
        let k = pb::ExitStatus {
            exit_code: None,
            signal: Some(9),
            timed_out: false,
        };
        assert_eq!(exit_event(&k)["end"]["status"], "signal: killed");
    }
}
