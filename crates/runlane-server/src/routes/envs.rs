//! `/v1/envs`: create, list, get and change envs (their runtime settings).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::EnvSettings;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;
use crate::util::double_option;

/// An env and its settings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Env {
    /// The env's name.
    pub name: String,
    /// Concurrency limit of ordinary runs.
    pub limit: u32,
    /// Burst factor (1 to 10).
    pub burst: f64,
    /// Cap of fast-lane runs; null means the env limit.
    pub fast_lane_limit: Option<u32>,
    /// Fairness weight (1 to 1000).
    pub weight: u32,
    /// Refuse triggers of tasks no version defines.
    pub strict_tasks: bool,
    /// Let due runs of an empty queue key skip the queue.
    pub fast_path: bool,
}

impl Env {
    fn new(name: &str, s: EnvSettings) -> Self {
        Env {
            name: name.to_string(),
            limit: s.limit,
            burst: s.burst,
            fast_lane_limit: s.fast_lane_limit,
            weight: s.weight,
            strict_tasks: s.strict_tasks,
            fast_path: s.fast_path,
        }
    }
}

/// `POST /v1/envs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnv {
    /// The env's name.
    pub name: String,
    /// Concurrency limit (default 100).
    pub limit: Option<u32>,
    /// Burst factor (default 1).
    pub burst: Option<f64>,
    /// Fast-lane cap (default: the env limit).
    pub fast_lane_limit: Option<u32>,
    /// Fairness weight (default 1).
    pub weight: Option<u32>,
    /// Strict tasks (default false).
    pub strict_tasks: Option<bool>,
    /// Fast path (default true).
    pub fast_path: Option<bool>,
}

/// `PATCH /v1/envs/{env}`: any of the settings (`fast_lane_limit: null` clears it).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchEnv {
    /// Concurrency limit.
    pub limit: Option<u32>,
    /// Burst factor.
    pub burst: Option<f64>,
    /// Fast-lane cap; null clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub fast_lane_limit: Option<Option<u32>>,
    /// Fairness weight.
    pub weight: Option<u32>,
    /// Strict tasks.
    pub strict_tasks: Option<bool>,
    /// Fast path.
    pub fast_path: Option<bool>,
}

/// `GET /v1/envs`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvList {
    /// The envs the key may see.
    pub envs: Vec<Env>,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_env, list_envs))
        .routes(routes!(get_env, patch_env))
}

/// Creates an env (admin).
#[utoipa::path(post, path = "/v1/envs", tag = "envs", request_body = CreateEnv,
    responses((status = 201, body = Env), (status = "4XX", body = ErrorBody)))]
async fn create_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateEnv>,
) -> Result<(StatusCode, Json<Env>), ApiError> {
    caller.require_admin()?;
    let name =
        runlane::core::EnvName::new(&body.name).map_err(|e| ApiError::invalid("name", e.reason))?;
    let engine = state.engine();
    let d = EnvSettings::default();
    let settings = EnvSettings {
        limit: body.limit.unwrap_or(d.limit),
        burst: body.burst.unwrap_or(d.burst),
        fast_lane_limit: body.fast_lane_limit,
        weight: body.weight.unwrap_or(d.weight),
        strict_tasks: body.strict_tasks.unwrap_or(d.strict_tasks),
        fast_path: body.fast_path.unwrap_or(d.fast_path),
    };
    engine.create_env(name.as_str(), settings).await?;
    Ok((StatusCode::CREATED, Json(Env::new(name.as_str(), settings))))
}

/// Lists envs (an env key sees its envs).
#[utoipa::path(get, path = "/v1/envs", tag = "envs",
    responses((status = 200, body = EnvList), (status = "4XX", body = ErrorBody)))]
async fn list_envs(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<EnvList>, ApiError> {
    caller.require_not_worker()?;
    let envs = state
        .engine()
        .envs()
        .await?
        .into_iter()
        .filter(|(name, _)| caller.is_admin() || caller.key.names(name.as_str()))
        .map(|(name, s)| Env::new(name.as_str(), s))
        .collect();
    Ok(Json(EnvList { envs }))
}

/// One env (admin, or an env key of it).
#[utoipa::path(get, path = "/v1/envs/{env}", tag = "envs",
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = Env), (status = "4XX", body = ErrorBody)))]
async fn get_env(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
) -> Result<Json<Env>, ApiError> {
    caller.require_env(&env)?;
    let settings = state.engine().env_settings(&env).await?;
    Ok(Json(Env::new(&env, settings)))
}

/// Changes an env's settings (admin).
#[utoipa::path(patch, path = "/v1/envs/{env}", tag = "envs", request_body = PatchEnv,
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = Env), (status = "4XX", body = ErrorBody)))]
async fn patch_env(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    ApiJson(body): ApiJson<PatchEnv>,
) -> Result<Json<Env>, ApiError> {
    caller.require_admin()?;
    let engine = state.engine();
    let current = engine.env_settings(&env).await?;
    let settings = EnvSettings {
        limit: body.limit.unwrap_or(current.limit),
        burst: body.burst.unwrap_or(current.burst),
        fast_lane_limit: body.fast_lane_limit.unwrap_or(current.fast_lane_limit),
        weight: body.weight.unwrap_or(current.weight),
        strict_tasks: body.strict_tasks.unwrap_or(current.strict_tasks),
        fast_path: body.fast_path.unwrap_or(current.fast_path),
    };
    engine.set_env(&env, settings).await?;
    Ok(Json(Env::new(&env, settings)))
}
