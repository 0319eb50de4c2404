//! Files in a sandbox: read and write as streamed bodies (never buffered
//! whole; the JSON body limit does not apply), remove, stat, list, mkdir.
//!
//! Paths must be absolute and free of NUL; `..` is resolved by the guest
//! agent, which confines every path to what the guest user may see.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_proto::host as pb;
use futures::StreamExt;

use super::processes::guest_error;
use super::{ApiError, ApiJson, ApiQuery, AppState, Auth, sandbox_id, validate_path};
use crate::wire;

fn parse_mode(raw: Option<&str>) -> Result<Option<u32>, ApiError> {
    raw.map(|m| {
        u32::from_str_radix(m, 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .ok_or_else(|| {
                ApiError::invalid("mode", format!("{m:?} is not an octal mode like 644"))
            })
    })
    .transpose()
}

pub(super) fn stat_to_wire(s: pb::FileStat) -> wire::FileStat {
    let file_type = match s.r#type() {
        pb::FileType::File => wire::FileType::File,
        pb::FileType::Directory => wire::FileType::Directory,
        pb::FileType::Symlink => wire::FileType::Symlink,
        pb::FileType::Other | pb::FileType::Unspecified => wire::FileType::Other,
    };
    wire::FileStat {
        path: s.path,
        name: s.name,
        file_type,
        size: s.size,
        mode: format!("{:o}", s.mode & 0o7777),
        modified_at: s.modified_at,
        symlink_target: (!s.symlink_target.is_empty()).then_some(s.symlink_target),
        uid: s.uid,
        gid: s.gid,
    }
}

/// Download a file (streamed, `application/octet-stream`).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::FileQuery),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn read_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::FileQuery>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::FileRef {
        sandbox_id: id,
        path: q.path,
        user: q.user.unwrap_or_default(),
    };
    let mut stream = match client.read_file(preq).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Err(guest_error(&state, &sb, "ReadFile", status).await),
    };
    // The first message tells whether the file opened; errors after it can
    // only cut the body short (the client sees a truncated transfer).
    let first = match stream.message().await {
        Ok(first) => first,
        Err(status) => return Err(guest_error(&state, &sb, "ReadFile", status).await),
    };
    let head =
        futures::stream::iter(first.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c.data))));
    let rest = stream.map(|r| {
        r.map(|c| bytes::Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(crate::hosts::status_reason(&s)))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(head.chain(rest)),
    )
        .into_response())
}

/// Upload a file (the request body, streamed); creates or replaces it.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, body = wire::FileStat),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn write_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::FileQuery>,
    body: Body,
) -> Result<Json<wire::FileStat>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let mode = parse_mode(q.mode.as_deref())?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let header = pb::WriteFileRequest {
        part: Some(pb::write_file_request::Part::Header(pb::WriteFileHeader {
            sandbox_id: id,
            path: q.path,
            user: q.user.unwrap_or_default(),
            mode,
        })),
    };
    // If the upload breaks, the gRPC call is dropped (cancelled), never
    // ended cleanly: a clean end would commit a truncated file.
    let (broke_tx, broke_rx) = tokio::sync::oneshot::channel::<String>();
    let data = futures::stream::unfold(
        (body.into_data_stream(), Some(broke_tx)),
        |(mut body, mut broke)| async move {
            match body.next().await {
                Some(Ok(chunk)) => Some((
                    pb::WriteFileRequest {
                        part: Some(pb::write_file_request::Part::Data(chunk.to_vec())),
                    },
                    (body, broke),
                )),
                Some(Err(e)) => {
                    if let Some(tx) = broke.take() {
                        let _ = tx.send(e.to_string());
                    }
                    futures::future::pending::<()>().await;
                    None
                }
                None => None,
            }
        },
    );
    let upload = futures::stream::once(async move { header }).chain(data);
    let call = client.write_file(upload);
    let stat = tokio::select! {
        r = call => match r {
            Ok(s) => s.into_inner(),
            Err(status) => return Err(guest_error(&state, &sb, "WriteFile", status).await),
        },
        Ok(why) = broke_rx => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("the upload body broke off: {why}; nothing was written")));
        }
    };
    Ok(Json(stat_to_wire(stat)))
}

/// Remove a file, or a directory with `recursive=true`.
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::FileQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn remove_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::FileQuery>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::RemoveFileRequest {
        sandbox_id: id,
        path: q.path,
        user: q.user.unwrap_or_default(),
        recursive: q.recursive.unwrap_or(false),
    };
    match client.remove_file(preq).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(status) => Err(guest_error(&state, &sb, "RemoveFile", status).await),
    }
}

/// Stat a path.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/stat", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::FileQuery),
    responses(
        (status = 200, body = wire::FileStat),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn stat_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::FileQuery>,
) -> Result<Json<wire::FileStat>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::FileRef {
        sandbox_id: id,
        path: q.path,
        user: q.user.unwrap_or_default(),
    };
    match client.stat_file(preq).await {
        Ok(s) => Ok(Json(stat_to_wire(s.into_inner()))),
        Err(status) => Err(guest_error(&state, &sb, "StatFile", status).await),
    }
}

/// List a directory.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::FileQuery),
    responses(
        (status = 200, body = wire::DirListing),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn list_dir(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::FileQuery>,
) -> Result<Json<wire::DirListing>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::FileRef {
        sandbox_id: id,
        path: q.path,
        user: q.user.unwrap_or_default(),
    };
    match client.list_dir(preq).await {
        Ok(r) => Ok(Json(wire::DirListing {
            entries: r
                .into_inner()
                .entries
                .into_iter()
                .map(stat_to_wire)
                .collect(),
        })),
        Err(status) => Err(guest_error(&state, &sb, "ListDir", status).await),
    }
}

/// Make a directory.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::MakeDirRequest,
    responses(
        (status = 200, body = wire::FileStat),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn make_dir(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::MakeDirRequest>,
) -> Result<Json<wire::FileStat>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &req.path)?;
    let mode = parse_mode(req.mode.as_deref())?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::MakeDirRequest {
        sandbox_id: id,
        path: req.path,
        user: req.user.unwrap_or_default(),
        mode,
        parents: req.parents,
    };
    match client.make_dir(preq).await {
        Ok(s) => Ok(Json(stat_to_wire(s.into_inner()))),
        Err(status) => Err(guest_error(&state, &sb, "MakeDir", status).await),
    }
}

/// Watch a directory: an NDJSON stream of changes (`started` first, once
/// the watch is in place) until the client hangs up. With `recursive`,
/// directories made later are watched too (what was put in one before its
/// watch was in place is reported as created).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/watch", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), wire::WatchQuery),
    responses(
        (status = 200, description = "NDJSON stream of WatchEvent lines", content((wire::WatchEvent = "application/x-ndjson"))),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running, not a directory, or the sandbox's guest agent is too old to watch", body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn watch(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<wire::WatchQuery>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("path", &q.path)?;
    let events = watch_events(&state, team, &id, q.path, q.recursive, q.user).await?;
    let lines = events.map(|ev| {
        let line = match ev {
            Ok(ev) => serde_json::to_vec(&ev),
            Err(e) => serde_json::to_vec(&serde_json::json!({
                "type": "error", "code": e.body.code, "message": e.body.message,
            })),
        };
        let mut line = line.unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    Ok((
        [
            (header::CONTENT_TYPE, super::processes::NDJSON),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// A running sandbox's watch of `path`, from its host: the events as wire
/// values, the first of them `started`. Shared with the E2B layer.
pub(crate) async fn watch_events(
    state: &AppState,
    team: &str,
    id: &str,
    path: String,
    recursive: bool,
    user: Option<String>,
) -> Result<
    impl futures::Stream<Item = Result<wire::WatchEvent, ApiError>> + Send + 'static,
    ApiError,
> {
    let (sb, mut client) = state.ops.running(team, id).await?;
    let preq = pb::WatchDirRequest {
        sandbox_id: id.to_owned(),
        path,
        user: user.unwrap_or_default(),
        recursive,
    };
    let stream = match client.watch_dir(preq).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Err(guest_error(state, &sb, "WatchDir", status).await),
    };
    state.ops.touch(&sb).await;
    Ok(stream.filter_map(|item| async move {
        match item {
            Ok(ev) => {
                let event_type = match ev.kind() {
                    pb::WatchEventKind::Started => wire::WatchEventType::Started,
                    pb::WatchEventKind::Create => wire::WatchEventType::Create,
                    pb::WatchEventKind::Write => wire::WatchEventType::Write,
                    pb::WatchEventKind::Remove => wire::WatchEventType::Remove,
                    pb::WatchEventKind::Rename => wire::WatchEventType::Rename,
                    pb::WatchEventKind::Chmod => wire::WatchEventType::Chmod,
                    pb::WatchEventKind::Overflow => wire::WatchEventType::Overflow,
                    pb::WatchEventKind::Unspecified => return None,
                };
                Some(Ok(wire::WatchEvent {
                    event_type,
                    name: ev.name,
                    is_dir: ev.is_dir,
                }))
            }
            Err(status) => Some(Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "host_error",
                crate::hosts::status_reason(&status),
            ))),
        }
    }))
}

/// Move or rename a file or directory (within the sandbox).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/files/rename", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = wire::RenameRequest,
    responses(
        (status = 200, description = "What is now at `to`", body = wire::FileStat),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 403, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
        (status = 409, description = "Not running, or `to` exists and `overwrite` is false", body = wire::ErrorBody),
    ),
    security(("api_key" = []), ("access_token" = []))
)]
pub async fn rename(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::RenameRequest>,
) -> Result<Json<wire::FileStat>, ApiError> {
    let id = sandbox_id(&id)?;
    let team = auth.guest_access(&id)?;
    validate_path("from", &req.from)?;
    validate_path("to", &req.to)?;
    let (sb, mut client) = state.ops.running(team, &id).await?;
    let preq = pb::RenameFileRequest {
        sandbox_id: id,
        from: req.from,
        to: req.to,
        user: req.user.unwrap_or_default(),
        overwrite: req.overwrite,
    };
    match client.rename_file(preq).await {
        Ok(s) => Ok(Json(stat_to_wire(s.into_inner()))),
        Err(status) => Err(guest_error(&state, &sb, "RenameFile", status).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode(Some("644")).unwrap(), Some(0o644));
        assert_eq!(parse_mode(None).unwrap(), None);
        assert!(parse_mode(Some("9")).is_err());
        assert!(parse_mode(Some("77777")).is_err());
    }
}
