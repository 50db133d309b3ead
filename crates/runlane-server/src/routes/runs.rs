//! Runs: trigger and get (the rest of the run routes build on these types).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::backend::RunRecord;
use runlane::core::{EnvName, LaneName, QueueName, RetryPolicy, RunId, Timestamp};
use runlane::TriggerRequest;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;

/// A retry policy in a trigger.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// Total attempts, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff of the first retry (default 1000).
    pub min_delay_ms: Option<u64>,
    /// Largest backoff (default 60 000).
    pub max_delay_ms: Option<u64>,
    /// Growth factor (default 2).
    pub factor: Option<f64>,
}

/// A trigger: one run of `task`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The task.
    pub task: String,
    /// Any JSON (default null).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Overrides the task's queue.
    pub queue: Option<String>,
    /// Concurrency key.
    pub key: Option<String>,
    /// An existing lane.
    pub lane: Option<String>,
    /// Makes the run look this much older.
    pub priority_ms: Option<u64>,
    /// Run no earlier than now + this.
    pub delay_ms: Option<u64>,
    /// Run no earlier than this instant (wins over `delay_ms`).
    pub run_at_ms: Option<u64>,
    /// Expire if not started within this (> 0).
    pub ttl_ms: Option<u64>,
    /// Deduplicates triggers with the same (env, task, key).
    pub idempotency_key: Option<String>,
    /// Lifetime of the idempotency key.
    pub idempotency_ttl_ms: Option<u64>,
    /// Attempts running longer are aborted.
    pub max_duration_ms: Option<u64>,
    /// Lock the run to this version.
    pub version: Option<u32>,
    /// Overrides the task's retry policy.
    pub retry: Option<RetryBody>,
}

impl Trigger {
    /// The engine request for env `env`; errors name the API field.
    pub fn request(self, env: &str) -> Result<TriggerRequest, ApiError> {
        let mut r = TriggerRequest::new(&self.task)?;
        r.env = EnvName::new(env)?;
        r.payload = match self.payload {
            Some(v) => Arc::from(v.to_string()),
            None => Arc::from("null"),
        };
        r.queue = self.queue.as_deref().map(QueueName::new).transpose()?;
        r.key = self.key;
        r.lane = self.lane.as_deref().map(LaneName::new).transpose()?;
        r.priority = Duration::from_millis(self.priority_ms.unwrap_or(0));
        r.delay = self.delay_ms.map(Duration::from_millis);
        r.run_after = self.run_at_ms.map(Timestamp::from_millis);
        r.ttl = self.ttl_ms.map(Duration::from_millis);
        r.idempotency_key = self.idempotency_key;
        r.idempotency_ttl = self.idempotency_ttl_ms.map(Duration::from_millis);
        r.max_duration = self.max_duration_ms.map(Duration::from_millis);
        r.lock_to_version = self.version;
        if let Some(retry) = self.retry {
            let d = RetryPolicy::default();
            r.retry = Some(RetryPolicy {
                attempts_max: retry.max_attempts,
                min: retry
                    .min_delay_ms
                    .map(Duration::from_millis)
                    .unwrap_or(d.min),
                max: retry
                    .max_delay_ms
                    .map(Duration::from_millis)
                    .unwrap_or(d.max),
                factor: retry.factor.unwrap_or(d.factor),
                jitter: d.jitter,
            });
        }
        Ok(r)
    }
}

/// A triggered run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Triggered {
    /// The run (an existing one on an idempotency hit).
    pub run_id: String,
    /// Its status.
    pub status: String,
    /// Whether an idempotency key returned an existing run.
    pub idempotent_hit: bool,
}

impl From<runlane::Triggered> for Triggered {
    fn from(t: runlane::Triggered) -> Self {
        Triggered {
            run_id: t.run.id.to_string(),
            status: t.run.status.as_str().to_string(),
            idempotent_hit: t.idempotent_hit,
        }
    }
}

/// A run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Run {
    /// Its id.
    pub id: String,
    /// Its env.
    pub env: String,
    /// Its task.
    pub task: String,
    /// Its live status.
    pub status: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Its output when completed.
    pub output: Option<serde_json::Value>,
    /// The last error.
    pub error: Option<String>,
    /// Its queue.
    pub queue: String,
    /// Its concurrency key.
    pub key: String,
    /// Its lane.
    pub lane: String,
    /// What made it (`standard`, `scheduled`, `manual`, `sync`).
    pub source: String,
    /// The version it took.
    pub version: u32,
    /// The current (or last) attempt.
    pub attempt: u32,
    /// Its priority.
    pub priority_ms: u64,
    /// When it was triggered.
    pub created_at_ms: u64,
    /// When it becomes (became) due.
    pub run_at_ms: u64,
    /// Its TTL.
    pub ttl_ms: Option<u64>,
    /// When its current attempt started, if known.
    pub started_at_ms: Option<u64>,
    /// When it finished.
    pub finished_at_ms: Option<u64>,
    /// The run this one retries.
    pub retry_of: Option<String>,
}

fn json_text(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<RunRecord> for Run {
    fn from(r: RunRecord) -> Self {
        Run {
            id: r.id.to_string(),
            env: r.env.to_string(),
            task: r.task.to_string(),
            status: r.status.as_str().to_string(),
            payload: json_text(&r.payload),
            output: r.output.as_deref().map(json_text),
            error: r.error,
            queue: r.queue.to_string(),
            key: r.key.to_string(),
            lane: r.lane.to_string(),
            source: r.source.as_str().to_string(),
            version: r.version,
            attempt: r.attempt,
            priority_ms: ms(r.priority),
            created_at_ms: r.created_at.as_millis(),
            run_at_ms: r.run_after.as_millis(),
            ttl_ms: r.ttl.map(ms),
            started_at_ms: r.started_at.map(Timestamp::as_millis),
            finished_at_ms: r.finished_at.map(Timestamp::as_millis),
            retry_of: r.retry_of.map(|id| id.to_string()),
        }
    }
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trigger))
        .routes(routes!(get_run))
}

/// Parses a run id from a path (404 for one that cannot exist).
pub fn run_id(id: &str) -> Result<RunId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("run {id} not found")))
}

/// Reads a run and checks the caller may see it (404 across envs).
pub async fn visible_run(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<RunRecord, ApiError> {
    caller.require_not_worker()?;
    let run = state.engine().get(run_id(id)?).await?;
    caller.require_run_env(run.env.as_str(), id)?;
    Ok(run)
}

/// Triggers one run (admin, or an env key of `env`).
#[utoipa::path(post, path = "/v1/envs/{env}/runs", tag = "runs", request_body = Trigger,
    params(("env" = String, Path, description = "The env")),
    responses((status = 201, body = Triggered), (status = "4XX", body = ErrorBody)))]
async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    ApiJson(body): ApiJson<Trigger>,
) -> Result<(StatusCode, Json<Triggered>), ApiError> {
    caller.require_env(&env)?;
    let request = body.request(&env)?;
    let triggered = state.engine().trigger_request(request).await?;
    Ok((StatusCode::CREATED, Json(triggered.into())))
}

/// One run with its live status.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses((status = 200, body = Run), (status = "4XX", body = ErrorBody)))]
async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    Ok(Json(visible_run(&state, &caller, &id).await?.into()))
}
