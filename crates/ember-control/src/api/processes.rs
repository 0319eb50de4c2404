//! Processes in a sandbox: exec (streamed as NDJSON or started in the
//! background), stdin, signals, the process list, and reconnecting to a
//! process's event stream. Calls go to the sandbox's host agent, which
//! proxies them to the guest agent.
//!
//! Each line of a stream is one [`wire::ExecEvent`]; output chunks are
//! `text` when valid UTF-8 and `data_b64` otherwise, so the stream is
//! lossless and still readable with `curl -N`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ember_proto::host as pb;
use futures::StreamExt;

use super::{ApiError, ApiJson, ApiQuery, AppState, Auth, sandbox_id};
use crate::model::Sandbox;
use crate::wire;

pub const NDJSON: &str = "application/x-ndjson";

/// A guest-side failure the caller can act on, or a host failure (502).
pub(crate) async fn guest_error(
    state: &AppState,
    sb: &Sandbox,
    call: &'static str,
    status: tonic::Status,
) -> ApiError {
    let msg = status.message().to_owned();
    match status.code() {
        tonic::Code::NotFound => ApiError::not_found(msg),
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", msg)
        }
        tonic::Code::PermissionDenied => ApiError::forbidden(msg),
        tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => {
            ApiError::new(StatusCode::CONFLICT, "conflict", msg)
        }
        _ => state.ops.guest_call_error(sb, call, status).await.into(),
    }
}

/// Convert one host event to its wire form.
pub fn event_to_wire(ev: pb::ExecEvent) -> Option<wire::ExecEvent> {
    use pb::exec_event::Event;
    let seq = ev.seq;
    let output = |bytes: Vec<u8>| match String::from_utf8(bytes) {
        Ok(text) => (Some(text), None),
        Err(e) => (None, Some(STANDARD.encode(e.into_bytes()))),
    };
    Some(match ev.event? {
        Event::StartedPid(pid) => wire::ExecEvent::Started { seq, pid },
        Event::Stdout(b) => {
            let (text, data_b64) = output(b);
            wire::ExecEvent::Stdout {
                seq,
                text,
                data_b64,
            }
        }
        Event::Stderr(b) => {
            let (text, data_b64) = output(b);
            wire::ExecEvent::Stderr {
                seq,
                text,
                data_b64,
            }
        }
        Event::Exit(x) => wire::ExecEvent::Exit {
            seq,
            exit_code: x.exit_code,
            signal: x.signal,
            timed_out: x.timed_out,
        },
    })
}

fn ndjson_line(ev: &wire::ExecEvent) -> bytes::Bytes {
    let mut line = serde_json::to_vec(ev).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

/// Stream host events as NDJSON; a broken stream ends with an `error` event.
fn ndjson_response(stream: tonic::Streaming<pb::ExecEvent>) -> Response {
    let body = stream
        .map(|item| {
            let ev = match item {
                Ok(ev) => event_to_wire(ev)?,
                Err(status) => wire::ExecEvent::Error {
                    code: "host_error".into(),
                    message: crate::hosts::status_reason(&status),
                },
            };
            Some(ev)
        })
        .filter_map(
            |ev| async move { ev.map(|e| Ok::<_, std::convert::Infallible>(ndjson_line(&e))) },
        );
    (
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Run a command. Streams NDJSON events until it exits, or with
/// `background: true` answers `{pid}` at once.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/exec", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::ExecRequest,
    responses(
        (status = 200, description = "NDJSON stream of ExecEvent lines (`application/x-ndjson`), or `{pid}` in background mode",
            content(
                (wire::ExecEvent = "application/x-ndjson"),
                (wire::BackgroundProcess = "application/json"),
            )),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running", body = wire::ErrorBody),
        (status = 502, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn exec(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::ExecRequest>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    if let Some(cwd) = &req.cwd {
        super::validate_path("cwd", cwd)?;
    }
    let background = req.background;
    let preq = pb::ExecRequest {
        sandbox_id: id.clone(),
        cmd: req.cmd,
        args: req.args,
        env: req.env.into_iter().collect(),
        cwd: req.cwd.unwrap_or_default(),
        user: req.user.unwrap_or_default(),
        timeout_ms: req.timeout_ms,
        stdin: req.stdin,
        pty: req.pty.map(|p| pb::PtySize {
            rows: p.rows,
            cols: p.cols,
        }),
        background,
        tag: req.tag.unwrap_or_default(),
    };
    validate_exec(&preq)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    state.ops.touch(&sb).await;
    let mut stream = match client.exec(preq).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Err(guest_error(&state, &sb, "Exec", status).await),
    };
    if !background {
        return Ok(ndjson_response(stream));
    }
    // Background: the first event is the pid; the process outlives this request.
    loop {
        match stream.message().await {
            Ok(Some(pb::ExecEvent {
                event: Some(pb::exec_event::Event::StartedPid(pid)),
                ..
            })) => return Ok(Json(wire::BackgroundProcess { pid }).into_response()),
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "host_error",
                    "the host ended the exec stream before the process started",
                ));
            }
            Err(status) => return Err(guest_error(&state, &sb, "Exec", status).await),
        }
    }
}

/// Most arguments of one command, and most bytes of them together.
const MAX_ARGS: usize = 4096;
const MAX_ARGS_BYTES: usize = 256 * 1024;
const MAX_TAG: usize = 256;
const MAX_USER: usize = 64;

/// What the guest will run, bounded and checked before it leaves the
/// control plane (the guest agent checks again): NUL-free program and
/// arguments within the limits, env as at create, a short printable tag,
/// a user name or uid.
pub(crate) fn validate_exec(req: &pb::ExecRequest) -> Result<(), ApiError> {
    if req.cmd.is_empty() || req.cmd.contains('\0') || req.cmd.len() > 4096 {
        return Err(ApiError::invalid(
            "cmd",
            "must be a program name of 1 to 4096 bytes without NUL",
        ));
    }
    if req.args.len() > MAX_ARGS {
        return Err(ApiError::invalid(
            "args",
            format!("at most {MAX_ARGS} arguments"),
        ));
    }
    if let Some(i) = req.args.iter().position(|a| a.contains('\0')) {
        return Err(ApiError::invalid(
            &format!("args[{i}]"),
            "arguments cannot hold NUL",
        ));
    }
    if req.args.iter().map(String::len).sum::<usize>() > MAX_ARGS_BYTES {
        return Err(ApiError::invalid(
            "args",
            format!("at most {MAX_ARGS_BYTES} bytes together (pass data on stdin or in a file)"),
        ));
    }
    let env: std::collections::BTreeMap<String, String> = req
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    super::sandboxes::validate_env("env", &env)?;
    if req.tag.len() > MAX_TAG || req.tag.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "tag",
            format!("at most {MAX_TAG} bytes, without control characters"),
        ));
    }
    let user_ok = req.user.is_empty()
        || (req.user.len() <= MAX_USER
            && !req.user.starts_with('-')
            && req
                .user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    if !user_ok {
        return Err(ApiError::invalid(
            "user",
            format!("a user name or uid: at most {MAX_USER} of a-z A-Z 0-9 . _ -"),
        ));
    }
    Ok(())
}

fn pid_of(raw: &str) -> Result<u32, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid("pid", format!("{raw:?} is not a process ID")))
}

/// Processes started through the API, running or finished.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, body = wire::ProcessList),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn list_processes(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<wire::ProcessList>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let reply = match client
        .list_processes(pb::SandboxRef { sandbox_id: id })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(guest_error(&state, &sb, "ListProcesses", status).await),
    };
    let processes = reply
        .processes
        .into_iter()
        .map(|p| wire::Process {
            pid: p.pid,
            cmd: p.cmd,
            args: p.args,
            tag: (!p.tag.is_empty()).then_some(p.tag),
            running: p.running,
            background: p.background,
            exit: p.exit.map(|x| wire::ExitStatus {
                exit_code: x.exit_code,
                signal: x.signal,
                timed_out: x.timed_out,
            }),
            started_at: p.started_at,
        })
        .collect();
    Ok(Json(wire::ProcessList { processes }))
}

/// Write to a process's stdin (it must have been started with `stdin: true`).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    request_body = wire::StdinRequest,
    responses(
        (status = 204, description = "Written"),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn write_stdin(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, pid)): Path<(String, String)>,
    ApiJson(req): ApiJson<wire::StdinRequest>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let pid = pid_of(&pid)?;
    let data = match (req.text, req.data_b64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "data_b64",
                "give text or data_b64, not both",
            ));
        }
        (Some(t), None) => t.into_bytes(),
        (None, Some(b)) => STANDARD
            .decode(b)
            .map_err(|e| ApiError::invalid("data_b64", format!("not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::WriteStdinRequest {
        sandbox_id: id,
        pid,
        data,
        close: req.close,
    };
    match client.write_stdin(preq).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(status) => Err(guest_error(&state, &sb, "WriteStdin", status).await),
    }
}

/// Send a signal to a process.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    request_body = wire::SignalRequest,
    responses(
        (status = 204, description = "Sent"),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn signal_process(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, pid)): Path<(String, String)>,
    ApiJson(req): ApiJson<wire::SignalRequest>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let pid = pid_of(&pid)?;
    let named = [
        "TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT",
    ];
    let sig = req.signal.trim_start_matches("SIG").to_owned();
    if !named.contains(&sig.as_str()) && !sig.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n)) {
        return Err(ApiError::invalid(
            "signal",
            format!("{:?} is not a signal name or number", req.signal),
        ));
    }
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::SignalProcessRequest {
        sandbox_id: id,
        pid,
        signal: sig,
    };
    match client.signal_process(preq).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(status) => Err(guest_error(&state, &sb, "SignalProcess", status).await),
    }
}

/// Resize a process's terminal (it must have been started with `pty`).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/resize", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    request_body = wire::PtySize,
    responses(
        (status = 204, description = "Resized"),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running, or the process has no terminal", body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn resize_pty(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, pid)): Path<(String, String)>,
    ApiJson(size): ApiJson<wire::PtySize>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let pid = pid_of(&pid)?;
    if !(1..=1000).contains(&size.rows) || !(1..=1000).contains(&size.cols) {
        return Err(ApiError::invalid("rows", "rows and cols must be 1 to 1000"));
    }
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::ResizePtyRequest {
        sandbox_id: id,
        pid,
        size: Some(pb::PtySize {
            rows: size.rows,
            cols: size.cols,
        }),
    };
    match client.resize_pty(preq).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(status) => Err(guest_error(&state, &sb, "ResizePty", status).await),
    }
}

/// Reconnect to a process: replay buffered events after `after`, then follow.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}/events", tag = "processes",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID"), wire::EventsQuery),
    responses(
        (status = 200, description = "NDJSON stream of ExecEvent lines", content((wire::ExecEvent = "application/x-ndjson"))),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn process_events(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, pid)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<wire::EventsQuery>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    let pid = pid_of(&pid)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    state.ops.touch(&sb).await;
    let preq = pb::ConnectProcessRequest {
        sandbox_id: id,
        pid,
        after_seq: q.after.unwrap_or(0),
    };
    match client.connect_process(preq).await {
        Ok(s) => Ok(ndjson_response(s.into_inner())),
        Err(status) => Err(guest_error(&state, &sb, "ConnectProcess", status).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_are_bounded_and_name_the_bad_field() {
        let ok = pb::ExecRequest {
            cmd: "python3".into(),
            args: vec!["-c".into(), "print(1)".into()],
            env: [("A_B".to_owned(), "1".to_owned())].into(),
            user: "user".into(),
            tag: "web server".into(),
            ..Default::default()
        };
        assert!(validate_exec(&ok).is_ok());
        let field = |r: pb::ExecRequest| validate_exec(&r).unwrap_err().body.field.unwrap();
        let with = |f: &dyn Fn(&mut pb::ExecRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            r
        };
        assert_eq!(field(with(&|r| r.cmd = "a\0b".into())), "cmd");
        assert_eq!(field(with(&|r| r.args.push("x\0".into()))), "args[2]");
        assert_eq!(
            field(with(&|r| r.args = vec![String::new(); MAX_ARGS + 1])),
            "args"
        );
        assert_eq!(
            field(with(&|r| r.args = vec!["x".repeat(MAX_ARGS_BYTES + 1)])),
            "args"
        );
        assert_eq!(
            field(with(&|r| {
                r.env.insert("1X".into(), "v".into());
            })),
            "env.1X"
        );
        assert_eq!(field(with(&|r| r.tag = "a\nb".into())), "tag");
        assert_eq!(field(with(&|r| r.tag = "t".repeat(MAX_TAG + 1))), "tag");
        assert_eq!(field(with(&|r| r.user = "-rf".into())), "user");
        assert_eq!(field(with(&|r| r.user = "a b".into())), "user");
        assert!(validate_exec(&with(&|r| r.user = "1000".into())).is_ok());
    }

    #[test]
    fn output_is_text_when_utf8_and_base64_otherwise() {
        let ev = pb::ExecEvent {
            seq: 3,
            event: Some(pb::exec_event::Event::Stdout(b"hi\n".to_vec())),
        };
        let w = event_to_wire(ev).unwrap();
        assert_eq!(
            String::from_utf8(ndjson_line(&w).to_vec()).unwrap(),
            "{\"type\":\"stdout\",\"seq\":3,\"text\":\"hi\\n\"}\n"
        );
        let ev = pb::ExecEvent {
            seq: 4,
            event: Some(pb::exec_event::Event::Stderr(vec![0xff, 0x00])),
        };
        assert_eq!(
            event_to_wire(ev).unwrap(),
            wire::ExecEvent::Stderr {
                seq: 4,
                text: None,
                data_b64: Some("/wA=".into())
            }
        );
        let ev = pb::ExecEvent {
            seq: 5,
            event: Some(pb::exec_event::Event::Exit(pb::ExitStatus {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
            })),
        };
        assert_eq!(
            String::from_utf8(ndjson_line(&event_to_wire(ev).unwrap()).to_vec()).unwrap(),
            "{\"type\":\"exit\",\"seq\":5,\"exit_code\":0,\"timed_out\":false}\n"
        );
        assert_eq!(
            event_to_wire(pb::ExecEvent {
                seq: 1,
                event: None
            }),
            None
        );
    }
}

/// What a running sandbox uses: recent samples (every 5 s, the last 10
/// minutes) of CPU, memory, disk and network, from its cgroup and host.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/metrics", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, body = wire::SandboxMetrics),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn sandbox_metrics(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<wire::SandboxMetrics>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.observer(&id)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let reply = match client
        .get_sandbox_metrics(pb::SandboxRef { sandbox_id: id })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(guest_error(&state, &sb, "GetSandboxMetrics", status).await),
    };
    let samples = reply
        .samples
        .into_iter()
        .map(|s| wire::MetricSample {
            timestamp: crate::model::rfc3339(s.at_unix_ms as i64),
            cpu_percent: s.cpu_percent,
            cpu_seconds: s.cpu_seconds,
            memory_bytes: s.memory_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            disk_bytes: s.disk_bytes,
            net_rx_bytes: s.net_rx_bytes,
            net_tx_bytes: s.net_tx_bytes,
            pids: s.pids,
        })
        .collect();
    Ok(Json(wire::SandboxMetrics { samples }))
}
