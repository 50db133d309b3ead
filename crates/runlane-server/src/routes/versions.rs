//! Versions of an env's task definitions: register (optionally promoting), list, show and
//! promote.
//!
//! A body's `tasks` are read straight into the core's `TaskDef` (which refuses unknown
//! fields), so a field added to task definitions is accepted here with no change. Admin keys
//! and worker keys of the env register; only admin keys promote. Reads are open to admin keys
//! and to env and worker keys naming the env.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::backend::VersionInfo;
use runlane::core::{TaskDef, VersionDef};
use runlane::EngineError;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;

/// `POST /v1/envs/{env}/versions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVersion {
    /// The task definitions (`{name, queue?, queue_limit?, key_total_limit?, lane?, ttl?,
    /// retry?, max_duration?}`, durations in milliseconds; see docs/API.md).
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TaskDef>,
    /// Make the new version current at once (admin keys only; default false).
    #[serde(default)]
    pub promote: bool,
}

/// `POST /v1/versions`: [`RegisterVersion`] with its env in the body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVersionIn {
    /// The env.
    pub env: String,
    /// The task definitions, as in `POST /v1/envs/{env}/versions`.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TaskDef>,
    /// Make the new version current at once (admin keys only; default false).
    #[serde(default)]
    pub promote: bool,
}

/// A registered version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    /// Its number (1, 2, … per env).
    pub version: u32,
    /// Whether it was made current.
    pub promoted: bool,
}

/// A version with its task definitions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// Its number (0 is the implicit empty version).
    pub version: u32,
    /// When it was registered (ms since the epoch), or null (version 0).
    pub created_at_ms: Option<u64>,
    /// Whether it is the env's current version.
    pub current: bool,
    /// Its task definitions, every default filled in.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TaskDef>,
}

impl Version {
    fn new(info: VersionInfo, current: u32) -> Self {
        Version {
            version: info.number,
            created_at_ms: info.created_at.map(|t| t.as_millis()),
            current: info.number == current,
            tasks: info.def.tasks,
        }
    }
}

/// `GET /v1/envs/{env}/versions`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionList {
    /// The current version (0 before any promotion).
    pub current: u32,
    /// Every registered version, by number.
    pub versions: Vec<Version>,
}

/// `POST /v1/envs/{env}/versions/{version}/promote`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Promoted {
    /// The env's current version now.
    pub current: u32,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register_version, list_versions))
        .routes(routes!(register_version_in))
        .routes(routes!(get_version))
        .routes(routes!(promote_version))
}

/// The definition, checked: a duplicate name names `tasks`, a bad task `tasks[i].<field>`.
fn checked(tasks: Vec<TaskDef>) -> Result<VersionDef, ApiError> {
    let mut seen = HashSet::new();
    for (i, task) in tasks.iter().enumerate() {
        if !seen.insert(task.name.as_str()) {
            return Err(ApiError::invalid(
                "tasks",
                format!("duplicate task name {:?}", task.name.as_str()),
            ));
        }
        task.validate()
            .map_err(|e| ApiError::invalid(&format!("tasks[{i}].{}", e.field), e.reason))?;
    }
    Ok(VersionDef { tasks })
}

/// A version number from the path; 400 naming `version` when it is not one.
fn number(raw: &str) -> Result<u32, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid("version", format!("{raw:?} is not a version number")))
}

/// 404 for a version the env does not have; every other error as usual.
fn unknown_is_404(env: &str) -> impl Fn(EngineError) -> ApiError + '_ {
    move |e| match e {
        EngineError::UnknownVersion { version, .. } => {
            ApiError::not_found(format!("env {env:?} has no version {version}")).field("version")
        }
        other => other.into(),
    }
}

async fn register(
    state: &AppState,
    caller: &Caller,
    env: &str,
    tasks: Vec<TaskDef>,
    promote: bool,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    caller.require_version_writer(env)?;
    if promote {
        caller
            .require_admin()
            .map_err(|_| ApiError::forbidden("only an admin key may promote").field("promote"))?;
    }
    let def = checked(tasks)?;
    let engine = state.engine();
    let version = engine.register_version(env, def).await?;
    if promote {
        engine.promote(env, version).await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            version,
            promoted: promote,
        }),
    ))
}

/// Registers a version of an env's tasks (admin, or a worker key of `env`); `promote: true`
/// (admin only) also makes it current.
#[utoipa::path(post, path = "/v1/envs/{env}/versions", tag = "versions",
    request_body = RegisterVersion,
    params(("env" = String, Path, description = "The env")),
    responses((status = 201, body = Registered), (status = "4XX", body = ErrorBody)))]
async fn register_version(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    ApiJson(body): ApiJson<RegisterVersion>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    register(&state, &caller, &env, body.tasks, body.promote).await
}

/// Registers a version, the env named in the body (as `POST /v1/envs/{env}/versions`).
#[utoipa::path(post, path = "/v1/versions", tag = "versions",
    request_body = RegisterVersionIn,
    responses((status = 201, body = Registered), (status = "4XX", body = ErrorBody)))]
async fn register_version_in(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RegisterVersionIn>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    register(&state, &caller, &body.env, body.tasks, body.promote).await
}

/// An env's versions and which one is current (admin, or an env or worker key of `env`).
#[utoipa::path(get, path = "/v1/envs/{env}/versions", tag = "versions",
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = VersionList), (status = "4XX", body = ErrorBody)))]
async fn list_versions(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
) -> Result<Json<VersionList>, ApiError> {
    caller.require_env_reader(&env)?;
    let engine = state.engine();
    let current = engine.current_version(&env).await?;
    let versions = engine
        .versions(&env)
        .await?
        .into_iter()
        .map(|v| Version::new(v, current))
        .collect();
    Ok(Json(VersionList { current, versions }))
}

/// One version with its task definitions; 404 `not_found` for a version the env lacks.
#[utoipa::path(get, path = "/v1/envs/{env}/versions/{version}", tag = "versions",
    params(("env" = String, Path, description = "The env"),
        ("version" = u32, Path, description = "The version number")),
    responses((status = 200, body = Version), (status = "4XX", body = ErrorBody)))]
async fn get_version(
    State(state): State<AppState>,
    caller: Caller,
    Path((env, version)): Path<(String, String)>,
) -> Result<Json<Version>, ApiError> {
    caller.require_env_reader(&env)?;
    let version = number(&version)?;
    let engine = state.engine();
    let info = engine
        .version(&env, version)
        .await
        .map_err(unknown_is_404(&env))?;
    let current = engine.current_version(&env).await?;
    Ok(Json(Version::new(info, current)))
}

/// Makes a version current (admin): new unlocked triggers take its task definitions, and the
/// queue limits it sets are written (docs/API.md, the precedence rule).
#[utoipa::path(post, path = "/v1/envs/{env}/versions/{version}/promote", tag = "versions",
    params(("env" = String, Path, description = "The env"),
        ("version" = u32, Path, description = "The version number")),
    responses((status = 200, body = Promoted), (status = "4XX", body = ErrorBody)))]
async fn promote_version(
    State(state): State<AppState>,
    caller: Caller,
    Path((env, version)): Path<(String, String)>,
) -> Result<Json<Promoted>, ApiError> {
    caller.require_admin()?;
    let version = number(&version)?;
    state
        .engine()
        .promote(&env, version)
        .await
        .map_err(unknown_is_404(&env))?;
    Ok(Json(Promoted { current: version }))
}
