//! `/v1/snapshots`: a team's named templates.
//!
//! DELETE semantics: the name is removed at once (a new template may take it
//! immediately) and the host keeps the build's data until no paused sandbox,
//! running sandbox or other build depends on it; the reply's `data_freed`
//! says which happened. Deleting never fails because of dependants.

use axum::Json;
use axum::extract::{Path, State};

use super::{ApiError, AppState, Auth};
use crate::model::{Template, rfc3339};
use crate::wire;

pub(super) fn to_wire(t: Template) -> wire::Snapshot {
    wire::Snapshot {
        name: t.name,
        build_id: t.build_id,
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
        source_sandbox_id: t.source_sandbox_id,
        size_bytes: t.size_bytes,
        created_at: rfc3339(t.created_at),
        defaults: t.defaults.map(|d| wire::TemplateDefaults {
            env_names: d.env.into_keys().collect(),
            workdir: d.workdir,
            user: d.user,
            start: d.start,
        }),
    }
}

/// List your team's templates.
#[utoipa::path(
    get, path = "/v1/snapshots", tag = "snapshots",
    responses(
        (status = 200, body = wire::SnapshotList),
        (status = 401, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_snapshots(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<wire::SnapshotList>, ApiError> {
    let team = auth.team()?;
    let snapshots = state
        .store
        .list_templates(team)
        .await?
        .into_iter()
        .map(to_wire)
        .collect();
    Ok(Json(wire::SnapshotList { snapshots }))
}

/// Get a template by name.
#[utoipa::path(
    get, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, body = wire::Snapshot),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_snapshot(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<wire::Snapshot>, ApiError> {
    let team = auth.team()?;
    let t = state
        .store
        .template(team, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no template named {name:?}")))?;
    Ok(Json(to_wire(t)))
}

/// Delete a template: the name goes now, the data when nothing uses it.
#[utoipa::path(
    delete, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, body = wire::DeletedSnapshot),
        (status = 401, body = wire::ErrorBody),
        (status = 404, body = wire::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete_snapshot(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<wire::DeletedSnapshot>, ApiError> {
    let team = auth.team()?;
    let (t, data_freed) = state.ops.delete_template(team, &name).await?;
    Ok(Json(wire::DeletedSnapshot {
        name: t.name,
        build_id: t.build_id,
        data_freed,
    }))
}
