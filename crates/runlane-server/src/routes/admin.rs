//! Lanes (list with depth, add) and queues (list with depth, running and limits; change
//! limits, pause, resume).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::backend::{LaneInfo, QueueInfo};
use runlane::core::{QueueName, QueueSettings};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;
use crate::util::double_option;

/// A lane and its depth.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Lane {
    /// The lane.
    pub name: String,
    /// Ready runs waiting in it.
    pub ready: u64,
    /// Consumers whose chain covers it.
    pub consumers: u32,
    /// Since when it holds ready runs and no consumer (an orphan lane), or null.
    pub orphan_since_at_ms: Option<u64>,
}

impl From<LaneInfo> for Lane {
    fn from(l: LaneInfo) -> Self {
        Lane {
            name: l.name.to_string(),
            ready: l.ready,
            consumers: l.consumers,
            orphan_since_at_ms: l.orphan_since.map(|t| t.as_millis()),
        }
    }
}

/// `GET /v1/lanes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LaneList {
    /// Every lane.
    pub lanes: Vec<Lane>,
}

/// `POST /v1/lanes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLane {
    /// The new lane's name.
    pub name: String,
}

/// A queue with its depth, running count and settings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Queue {
    /// The queue.
    pub name: String,
    /// Delayed runs.
    pub delayed: u64,
    /// Queued runs.
    pub queued: u64,
    /// Runs holding slots (ready and executing).
    pub running: u64,
    /// Per-key concurrency limit; null means the env limit.
    pub limit: Option<u32>,
    /// Cap on runs holding slots across the queue's keys, or null.
    pub key_total_limit: Option<u32>,
    /// Cap on waiting runs per key, or null.
    pub max_queued: Option<u32>,
    /// A paused queue admits nothing.
    pub paused: bool,
}

impl From<QueueInfo> for Queue {
    fn from(q: QueueInfo) -> Self {
        Queue {
            name: q.name.to_string(),
            delayed: q.delayed,
            queued: q.queued,
            running: q.running,
            limit: q.settings.limit,
            key_total_limit: q.settings.key_total_limit,
            max_queued: q.settings.max_queued,
            paused: q.settings.paused,
        }
    }
}

/// `GET /v1/envs/{env}/queues`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    /// The env's queues.
    pub queues: Vec<Queue>,
}

/// `PATCH /v1/envs/{env}/queues/{queue}`: `null` clears a setting.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchQueue {
    /// Per-key concurrency limit.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub limit: Option<Option<u32>>,
    /// Cap across the queue's keys.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub key_total_limit: Option<Option<u32>>,
    /// Cap on waiting runs per key.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub max_queued: Option<Option<u32>>,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_lanes, create_lane))
        .routes(routes!(list_queues))
        .routes(routes!(patch_queue))
        .routes(routes!(pause_queue))
        .routes(routes!(resume_queue))
}

/// Lanes with depth and consumers (admin, env keys).
#[utoipa::path(get, path = "/v1/lanes", tag = "lanes",
    responses((status = 200, body = LaneList), (status = "4XX", body = ErrorBody)))]
async fn list_lanes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<LaneList>, ApiError> {
    caller.require_not_worker()?;
    let lanes = state.engine().lanes().await?;
    Ok(Json(LaneList {
        lanes: lanes.into_iter().map(Lane::from).collect(),
    }))
}

/// Adds a lane (admin); 409 `conflict` if it exists.
#[utoipa::path(post, path = "/v1/lanes", tag = "lanes", request_body = CreateLane,
    responses((status = 201, body = Lane), (status = "4XX", body = ErrorBody)))]
async fn create_lane(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateLane>,
) -> Result<(StatusCode, Json<Lane>), ApiError> {
    caller.require_admin()?;
    let name = runlane::core::LaneName::new(&body.name)?;
    let engine = state.engine();
    if engine.lanes().await?.iter().any(|l| l.name == name) {
        return Err(ApiError::conflict(format!("lane {:?} exists", body.name)).field("name"));
    }
    engine.add_lane(name.as_str()).await?;
    let lane = engine
        .lanes()
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(Lane::from)
        .unwrap_or(Lane {
            name: body.name,
            ready: 0,
            consumers: 0,
            orphan_since_at_ms: None,
        });
    Ok((StatusCode::CREATED, Json(lane)))
}

/// An env's queues (admin, or an env key of `env`).
#[utoipa::path(get, path = "/v1/envs/{env}/queues", tag = "queues",
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = QueueList), (status = "4XX", body = ErrorBody)))]
async fn list_queues(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
) -> Result<Json<QueueList>, ApiError> {
    caller.require_env(&env)?;
    let queues = state.engine().queues(&env).await?;
    Ok(Json(QueueList {
        queues: queues.into_iter().map(Queue::from).collect(),
    }))
}

/// The queue as it is now (a queue no run used yet has its settings and no depth).
async fn current(state: &AppState, env: &str, queue: &str) -> Result<Queue, ApiError> {
    let name = QueueName::new(queue)?;
    let found = state
        .engine()
        .queues(env)
        .await?
        .into_iter()
        .find(|q| q.name == name);
    Ok(match found {
        Some(q) => q.into(),
        None => Queue {
            name: queue.to_string(),
            delayed: 0,
            queued: 0,
            running: 0,
            limit: None,
            key_total_limit: None,
            max_queued: None,
            paused: false,
        },
    })
}

/// Changes a queue's limits (admin, or an env key of `env`).
#[utoipa::path(patch, path = "/v1/envs/{env}/queues/{queue}", tag = "queues",
    request_body = PatchQueue,
    params(("env" = String, Path, description = "The env"),
        ("queue" = String, Path, description = "The queue")),
    responses((status = 200, body = Queue), (status = "4XX", body = ErrorBody)))]
async fn patch_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((env, queue)): Path<(String, String)>,
    ApiJson(body): ApiJson<PatchQueue>,
) -> Result<Json<Queue>, ApiError> {
    caller.require_env(&env)?;
    let now = current(&state, &env, &queue).await?;
    let settings = QueueSettings {
        limit: body.limit.unwrap_or(now.limit),
        key_total_limit: body.key_total_limit.unwrap_or(now.key_total_limit),
        max_queued: body.max_queued.unwrap_or(now.max_queued),
        paused: now.paused,
    };
    state.engine().set_queue(&env, &queue, settings).await?;
    Ok(Json(current(&state, &env, &queue).await?))
}

/// Pauses a queue: it admits nothing until resumed.
#[utoipa::path(post, path = "/v1/envs/{env}/queues/{queue}/pause", tag = "queues",
    params(("env" = String, Path, description = "The env"),
        ("queue" = String, Path, description = "The queue")),
    responses((status = 200, body = Queue), (status = "4XX", body = ErrorBody)))]
async fn pause_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((env, queue)): Path<(String, String)>,
) -> Result<Json<Queue>, ApiError> {
    caller.require_env(&env)?;
    QueueName::new(&queue)?;
    state.engine().pause_queue(&env, &queue).await?;
    Ok(Json(current(&state, &env, &queue).await?))
}

/// Resumes a queue (admits at once what its limits allow).
#[utoipa::path(post, path = "/v1/envs/{env}/queues/{queue}/resume", tag = "queues",
    params(("env" = String, Path, description = "The env"),
        ("queue" = String, Path, description = "The queue")),
    responses((status = 200, body = Queue), (status = "4XX", body = ErrorBody)))]
async fn resume_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((env, queue)): Path<(String, String)>,
) -> Result<Json<Queue>, ApiError> {
    caller.require_env(&env)?;
    QueueName::new(&queue)?;
    state.engine().resume_queue(&env, &queue).await?;
    Ok(Json(current(&state, &env, &queue).await?))
}
