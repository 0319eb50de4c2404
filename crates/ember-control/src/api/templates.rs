//! `/v1/templates`: build templates from container images and Dockerfiles
//! ([`crate::builds`]), follow their builds, list and delete them.
//!
//! A template made this way is the same object as one made by snapshotting
//! a sandbox (`/v1/snapshots` lists both); the step cache's hidden
//! templates (`.cache-…`) are listed by neither.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::{ApiError, ApiQuery, AppState, Auth, validate_name};
use crate::builds::{self, BuildSpec, Ready, Source};
use crate::dockerfile::Dockerfile;
use crate::lifecycle::BASE_TEMPLATE;
use crate::model::{TemplateBuild, rfc3339};
use crate::wire;

/// Request bodies up to this size (a base64 context of 48 MiB, plus the rest).
pub const BUILD_BODY_LIMIT: usize = 65 * 1024 * 1024;
const MAX_CONTEXT: usize = 48 * 1024 * 1024;
/// Builds listed per template name.
const LISTED_BUILDS: u32 = 50;

fn to_wire(b: TemplateBuild, offset: u64) -> wire::TemplateBuild {
    // Bytes before `log_dropped` are gone; an offset inside them sees all we kept.
    let skip = offset.saturating_sub(b.log_dropped) as usize;
    let mut start = skip.min(b.log.len());
    while !b.log.is_char_boundary(start) {
        start += 1;
    }
    wire::TemplateBuild {
        log_offset: b.log_dropped + b.log.len() as u64,
        log: b.log[start..].to_owned(),
        build_id: b.id,
        name: b.name,
        status: b.status,
        source: b.source,
        step: b.step,
        steps_total: b.steps_total,
        step_text: b.step_text,
        cached_steps: b.cached_steps,
        error: b.error,
        created_at: rfc3339(b.created_at),
        finished_at: b.finished_at.map(rfc3339),
    }
}

/// Start building a template; follow it at the returned build's URL.
#[utoipa::path(
    post, path = "/v1/templates", tag = "templates",
    request_body = wire::CreateTemplateRequest,
    responses(
        (status = 202, body = wire::TemplateBuild, description = "The build started; poll GET /v1/templates/{name}/builds/{build_id}"),
        (status = 400, body = wire::ErrorBody),
        (status = 401, body = wire::ErrorBody),
        (status = 409, body = wire::ErrorBody, description = "The name is taken, or a build of it is running"),
    ),
    security(("api_key" = []))
)]
pub async fn create_template(
    State(state): State<AppState>,
    auth: Auth,
    body: Body,
) -> Result<Response, ApiError> {
    let team = auth.team()?.to_owned();
    let bytes = axum::body::to_bytes(body, BUILD_BODY_LIMIT)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "a template build request is limited to {BUILD_BODY_LIMIT} bytes (a context of 48 MiB): \
                     put large files in the image instead"
                ),
            )
        })?;
    let req: wire::CreateTemplateRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not a template build request: {e}"),
        )
    })?;
    let spec = spec(&team, req)?;
    if state.store.template(&team, &spec.name).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "a template named {:?} already exists: delete it first or pick another name",
                spec.name
            ),
        ));
    }
    builds::fail_orphans(&state.store).await?;
    let active = state
        .store
        .list_template_builds(&team, Some(&spec.name), LISTED_BUILDS)
        .await?
        .into_iter()
        .find(|b| b.status == "queued" || b.status == "running");
    if let Some(b) = active {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "build {} of template {:?} is still {}: wait for it to end",
                b.id, spec.name, b.status
            ),
        ));
    }
    let row = builds::new_job(&spec);
    state.store.insert_template_build(&row).await?;
    tracing::info!(build = %row.id, template = %spec.name, team = %team, source = %row.source, "template build queued");
    tokio::spawn(builds::run(state.ops.clone(), spec, row.clone()));
    Ok((StatusCode::ACCEPTED, Json(to_wire(row, 0))).into_response())
}

/// Check a request and turn it into a build: every problem that can be
/// found without a sandbox is a 400 here, naming the field (or the line).
fn spec(team: &str, req: wire::CreateTemplateRequest) -> Result<BuildSpec, ApiError> {
    validate_name("name", &req.name)?;
    if req.name == BASE_TEMPLATE {
        return Err(ApiError::invalid(
            "name",
            "\"base\" is reserved for the base image",
        ));
    }
    let source = match (req.image, req.dockerfile) {
        (Some(image), None) => {
            if req.context_tar_base64.is_some() {
                return Err(ApiError::invalid(
                    "context_tar_base64",
                    "a context goes with a dockerfile, not an image",
                ));
            }
            if !image.starts_with("docker://") || image.len() <= "docker://".len() {
                return Err(ApiError::invalid(
                    "image",
                    format!(
                        "{image:?}: give a registry reference, docker://HOST[:PORT]/REPO[:TAG|@DIGEST]"
                    ),
                ));
            }
            Source::Image(image)
        }
        (None, Some(text)) => {
            let dockerfile =
                Dockerfile::parse(&text).map_err(|e| ApiError::invalid("dockerfile", e))?;
            let context = match req.context_tar_base64 {
                None => Vec::new(),
                Some(b64) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|e| {
                            ApiError::invalid("context_tar_base64", format!("not base64: {e}"))
                        })?;
                    if bytes.len() > MAX_CONTEXT {
                        return Err(ApiError::invalid(
                            "context_tar_base64",
                            format!("{} bytes: a context is at most {MAX_CONTEXT}", bytes.len()),
                        ));
                    }
                    builds::read_context(&bytes)
                        .map_err(|e| ApiError::invalid("context_tar_base64", e))?;
                    bytes
                }
            };
            Source::Dockerfile {
                dockerfile,
                context,
            }
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "image",
                "give an image or a dockerfile, not both (a Dockerfile's FROM names its image)",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "image",
                "give an image (docker://…) or a dockerfile to build from",
            ));
        }
    };
    let ready = match (req.ready_cmd, req.ready_port) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "ready_cmd",
                "give ready_cmd or ready_port, not both",
            ));
        }
        (Some(c), None) if c.trim().is_empty() => {
            return Err(ApiError::invalid("ready_cmd", "must not be empty"));
        }
        (Some(c), None) => Some(Ready::Command(c)),
        (None, Some(0)) => return Err(ApiError::invalid("ready_port", "must be 1 to 65535")),
        (None, Some(p)) => Some(Ready::Port(p)),
        (None, None) => None,
    };
    if req
        .start_cmd
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(ApiError::invalid("start_cmd", "must not be empty"));
    }
    let ready_timeout_s = req.ready_timeout_s.unwrap_or(300);
    if !(1..=3600).contains(&ready_timeout_s) {
        return Err(ApiError::invalid("ready_timeout_s", "must be 1 to 3600"));
    }
    if req.vcpus == Some(0) {
        return Err(ApiError::invalid("vcpus", "must be at least 1"));
    }
    if req.memory_mib.is_some_and(|m| m < 128) {
        return Err(ApiError::invalid("memory_mib", "must be at least 128"));
    }
    Ok(BuildSpec {
        team_id: team.to_owned(),
        name: req.name,
        source,
        start_cmd: req.start_cmd,
        ready,
        ready_timeout: Duration::from_secs(ready_timeout_s),
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        build_args: req.build_args,
        registry_username: req.registry_username,
        registry_password: req.registry_password,
    })
}

/// List your team's templates (as `GET /v1/snapshots`).
#[utoipa::path(
    get, path = "/v1/templates", tag = "templates",
    responses(
        (status = 200, body = wire::SnapshotList),
        (status = 401, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_templates(
    state: State<AppState>,
    auth: Auth,
) -> Result<Json<wire::SnapshotList>, ApiError> {
    super::snapshots::list_snapshots(state, auth).await
}

/// Get a template by name (as `GET /v1/snapshots/{name}`).
#[utoipa::path(
    get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, body = wire::Snapshot),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_template(
    state: State<AppState>,
    auth: Auth,
    name: Path<String>,
) -> Result<Json<wire::Snapshot>, ApiError> {
    super::snapshots::get_snapshot(state, auth, name).await
}

/// Delete a template (as `DELETE /v1/snapshots/{name}`).
#[utoipa::path(
    delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, body = wire::DeletedSnapshot),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete_template(
    state: State<AppState>,
    auth: Auth,
    name: Path<String>,
) -> Result<Json<wire::DeletedSnapshot>, ApiError> {
    super::snapshots::delete_snapshot(state, auth, name).await
}

/// The builds of a template name, newest first (without their logs).
#[utoipa::path(
    get, path = "/v1/templates/{name}/builds", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, body = wire::TemplateBuildList),
        (status = 401, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_builds(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<wire::TemplateBuildList>, ApiError> {
    let team = auth.team()?;
    builds::fail_orphans(&state.store).await?;
    let builds = state
        .store
        .list_template_builds(team, Some(&name), LISTED_BUILDS)
        .await?
        .into_iter()
        .map(|b| {
            let end = b.log_dropped + b.log.len() as u64;
            to_wire(b, end)
        })
        .collect();
    Ok(Json(wire::TemplateBuildList { builds }))
}

/// A build's status and its log from `offset` on: poll with the returned
/// `log_offset` to follow it.
#[utoipa::path(
    get, path = "/v1/templates/{name}/builds/{build_id}", tag = "templates",
    params(
        ("name" = String, Path, description = "Template name"),
        ("build_id" = String, Path, description = "The build's ID (tb-…)"),
        wire::BuildLogQuery,
    ),
    responses(
        (status = 200, body = wire::TemplateBuild),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_build(
    State(state): State<AppState>,
    auth: Auth,
    Path((name, build_id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<wire::BuildLogQuery>,
) -> Result<Json<wire::TemplateBuild>, ApiError> {
    let team = auth.team()?;
    builds::fail_orphans(&state.store).await?;
    let build = state
        .store
        .template_build(team, &build_id)
        .await?
        .filter(|b| b.name == name)
        .ok_or_else(|| {
            ApiError::not_found(format!("no build {build_id:?} of template {name:?}"))
        })?;
    Ok(Json(to_wire(build, q.offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> Result<BuildSpec, ApiError> {
        spec("team", serde_json::from_value(json).unwrap())
    }

    #[test]
    fn bad_requests_name_the_field_and_the_line() {
        let cases = [
            (serde_json::json!({"name": "t"}), "image"),
            (
                serde_json::json!({"name": "t", "image": "busybox"}),
                "docker://",
            ),
            (
                serde_json::json!({"name": "base", "image": "docker://r/x"}),
                "reserved",
            ),
            (
                serde_json::json!({"name": "t", "image": "docker://r/x", "dockerfile": "FROM x"}),
                "not both",
            ),
            (
                serde_json::json!({"name": "t", "dockerfile": "FROM x\nONBUILD RUN y\n"}),
                "line 2: ONBUILD",
            ),
            (
                serde_json::json!({"name": "t", "image": "docker://r/x", "ready_port": 0}),
                "ready_port",
            ),
            (
                serde_json::json!({"name": "t", "image": "docker://r/x", "ready_port": 80, "ready_cmd": "true"}),
                "not both",
            ),
            (
                serde_json::json!({"name": "t", "dockerfile": "FROM x", "context_tar_base64": "%%%"}),
                "base64",
            ),
            (
                serde_json::json!({"name": "t", "image": "docker://r/x", "ready_timeout_s": 0}),
                "ready_timeout_s",
            ),
        ];
        for (json, needle) in cases {
            let e = request(json.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{json}");
            assert!(
                e.body.message.contains(needle),
                "{json}: {}",
                e.body.message
            );
        }
        let ok = request(
            serde_json::json!({"name": "t", "image": "docker://r/x:1", "ready_port": 8000}),
        )
        .unwrap();
        assert_eq!(ok.ready, Some(Ready::Port(8000)));
    }

    #[test]
    fn a_log_offset_returns_only_what_follows() {
        let mut b = builds::new_job(
            &request(serde_json::json!({"name": "t", "image": "docker://r/x"})).unwrap(),
        );
        b.log = "ccdd".into();
        b.log_dropped = 4; // "aabb" was dropped
        assert_eq!(to_wire(b.clone(), 0).log, "ccdd");
        assert_eq!(to_wire(b.clone(), 6).log, "dd");
        assert_eq!(to_wire(b.clone(), 99).log, "");
        assert_eq!(to_wire(b, 6).log_offset, 8);
    }
}
