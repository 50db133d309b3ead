//! Runs: trigger and get (the rest of the run routes build on these types).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::backend::RunFilter;
use runlane::core::backend::RunRecord;
use runlane::core::{
    EnvName, LaneName, QueueName, RetryPolicy, RunId, RunStatus, TaskName, Timestamp, TriggerSource,
};
use runlane::{TriggerRequest, WaitOutcome};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;
use crate::util::JsonText;

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

/// Defines a trigger body: the common fields plus the route's own.
macro_rules! trigger_body {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The task.
            pub task: String,
            /// Any JSON (default null), kept exactly as sent.
            #[serde(default)]
            pub payload: Option<JsonText>,
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
            $($(#[$fmeta])* pub $field: $ty,)*
        }
    };
}

trigger_body! {
    /// A trigger: one run of `task`.
    Trigger {}
}

trigger_body! {
    /// `POST /v1/envs/{env}/runs/wait`: a trigger plus `timeout_ms`.
    WaitTrigger {
        /// How long to wait (default 30 000, at most 300 000).
        timeout_ms: Option<u64>,
    }
}

impl WaitTrigger {
    /// The trigger and the timeout.
    fn split(self) -> (Trigger, Option<u64>) {
        let WaitTrigger {
            task,
            payload,
            queue,
            key,
            lane,
            priority_ms,
            delay_ms,
            run_at_ms,
            ttl_ms,
            idempotency_key,
            idempotency_ttl_ms,
            max_duration_ms,
            version,
            retry,
            timeout_ms,
        } = self;
        let trigger = Trigger {
            task,
            payload,
            queue,
            key,
            lane,
            priority_ms,
            delay_ms,
            run_at_ms,
            ttl_ms,
            idempotency_key,
            idempotency_ttl_ms,
            max_duration_ms,
            version,
            retry,
        };
        (trigger, timeout_ms)
    }
}

impl Trigger {
    /// The engine request for env `env`; errors name the API field.
    pub fn request(self, env: &str) -> Result<TriggerRequest, ApiError> {
        let mut r = TriggerRequest::new(&self.task)?;
        r.env = EnvName::new(env)?;
        r.payload = match &self.payload {
            Some(v) => Arc::from(v.as_str()),
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
    /// Its payload, as sent.
    pub payload: JsonText,
    /// Its output when completed.
    pub output: Option<JsonText>,
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
    /// Whether it is locked to that version (its trigger named it): it is only ever claimed
    /// by workers serving that version.
    pub locked: bool,
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
    /// When its cancel was first requested (kept durably: the run ends `canceled`).
    pub cancel_requested_at_ms: Option<u64>,
    /// The run this one retries.
    pub retry_of: Option<String>,
}

fn json_text(text: &str) -> JsonText {
    JsonText::from_text(text)
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
            locked: r.locked,
            attempt: r.attempt,
            priority_ms: ms(r.priority),
            created_at_ms: r.created_at.as_millis(),
            run_at_ms: r.run_after.as_millis(),
            ttl_ms: r.ttl.map(ms),
            started_at_ms: r.started_at.map(Timestamp::as_millis),
            finished_at_ms: r.finished_at.map(Timestamp::as_millis),
            cancel_requested_at_ms: r.cancel_requested_at.map(Timestamp::as_millis),
            retry_of: r.retry_of.map(|id| id.to_string()),
        }
    }
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trigger, list_runs))
        .routes(routes!(trigger_batch))
        .routes(routes!(trigger_wait))
        .routes(routes!(get_run))
        .routes(routes!(cancel_run))
        .routes(routes!(reschedule_run))
        .routes(routes!(retry_run))
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

/// `POST /v1/envs/{env}/runs/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The triggers (at most the server's `max_batch`).
    pub runs: Vec<Trigger>,
}

/// The answer of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchTriggered {
    /// One answer per trigger, in order.
    pub runs: Vec<Triggered>,
}

/// Triggers a batch: all or nothing (admin, or an env key of `env`).
#[utoipa::path(post, path = "/v1/envs/{env}/runs/batch", tag = "runs", request_body = Batch,
    params(("env" = String, Path, description = "The env")),
    responses((status = 201, body = BatchTriggered), (status = "4XX", body = ErrorBody)))]
async fn trigger_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    ApiJson(body): ApiJson<Batch>,
) -> Result<(StatusCode, Json<BatchTriggered>), ApiError> {
    caller.require_env(&env)?;
    let max = state.config().max_batch;
    if body.runs.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("runs: {} triggers, at most {max}", body.runs.len()),
        )
        .field("runs"));
    }
    if body.runs.is_empty() {
        return Err(ApiError::invalid("runs", "must hold at least one trigger"));
    }
    let mut requests = Vec::with_capacity(body.runs.len());
    for (i, t) in body.runs.into_iter().enumerate() {
        let request = t.request(&env).map_err(|e| e.in_batch(i))?;
        requests.push(request);
    }
    let triggered = state.engine().trigger_batch(requests).await?;
    Ok((
        StatusCode::CREATED,
        Json(BatchTriggered {
            runs: triggered.into_iter().map(Triggered::from).collect(),
        }),
    ))
}

/// The longest trigger-and-wait, in milliseconds.
pub const WAIT_MAX_MS: u64 = 300_000;
/// The default trigger-and-wait timeout, in milliseconds.
pub const WAIT_DEFAULT_MS: u64 = 30_000;

/// The answer of a trigger-and-wait.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WaitAnswer {
    /// The run.
    pub run_id: String,
    /// Its status (terminal with 200, the current one with 202).
    pub status: String,
    /// Its output when completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<JsonText>,
    /// Its error when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Triggers a run on `fast_lane` and waits for its end: 200 when terminal, 202 on timeout,
/// 429 `fast_lane_full` with `Retry-After`.
#[utoipa::path(post, path = "/v1/envs/{env}/runs/wait", tag = "runs", request_body = WaitTrigger,
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = WaitAnswer), (status = 202, body = WaitAnswer),
        (status = "4XX", body = ErrorBody)))]
async fn trigger_wait(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    ApiJson(body): ApiJson<WaitTrigger>,
) -> Result<(StatusCode, Json<WaitAnswer>), ApiError> {
    caller.require_env(&env)?;
    let (trigger, timeout) = body.split();
    let timeout_ms = match timeout {
        None => WAIT_DEFAULT_MS,
        Some(ms) if (1..=WAIT_MAX_MS).contains(&ms) => ms,
        Some(_) => {
            return Err(ApiError::invalid(
                "timeout_ms",
                format!("must be an integer from 1 to {WAIT_MAX_MS}"),
            ))
        }
    };
    let mut request = trigger.request(&env)?;
    request.source = TriggerSource::Sync;
    let engine = state.engine();
    let triggered = engine.trigger_request(request).await?;
    let run_id = triggered.run.id;
    let outcome = tokio::select! {
        outcome = engine.wait(run_id, Duration::from_millis(timeout_ms)) => outcome?,
        () = state.closed() => WaitOutcome::Pending {
            run_id,
            status: engine.get(run_id).await?.status,
        },
    };
    Ok(match outcome {
        WaitOutcome::Finished(r) => (
            StatusCode::OK,
            Json(WaitAnswer {
                run_id: r.id.to_string(),
                status: r.status.as_str().to_string(),
                output: r.output.as_deref().map(json_text),
                error: r.error,
            }),
        ),
        WaitOutcome::Pending { run_id, status } => (
            StatusCode::ACCEPTED,
            Json(WaitAnswer {
                run_id: run_id.to_string(),
                status: status.as_str().to_string(),
                output: None,
                error: None,
            }),
        ),
    })
}

/// The filters of `GET /v1/envs/{env}/runs`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<String>,
    /// Only this task.
    pub task: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this lane.
    pub lane: Option<String>,
    /// Only this source (`standard`, `scheduled`, `manual`, `sync`).
    pub source: Option<String>,
    /// Only this version.
    pub version: Option<u32>,
    /// Created at or after (ms since the epoch).
    pub from_ms: Option<u64>,
    /// Created before (ms since the epoch).
    pub to_ms: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// A page of runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    /// Runs in id (creation) order.
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn parse_source(s: &str) -> Result<TriggerSource, ApiError> {
    [
        TriggerSource::Standard,
        TriggerSource::Scheduled,
        TriggerSource::Manual,
        TriggerSource::Sync,
    ]
    .into_iter()
    .find(|src| src.as_str() == s)
    .ok_or_else(|| ApiError::invalid("source", format!("unknown source {s:?}")))
}

impl ListQuery {
    fn filter(self, env: EnvName) -> Result<RunFilter, ApiError> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("limit", "must be from 1 to 1000"));
        }
        Ok(RunFilter {
            env: Some(env),
            status: self
                .status
                .as_deref()
                .map(str::parse::<RunStatus>)
                .transpose()?,
            task: self.task.as_deref().map(TaskName::new).transpose()?,
            queue: self.queue.as_deref().map(QueueName::new).transpose()?,
            lane: self.lane.as_deref().map(LaneName::new).transpose()?,
            source: self.source.as_deref().map(parse_source).transpose()?,
            version: self.version,
            created_from: self.from_ms.map(Timestamp::from_millis),
            created_to: self.to_ms.map(Timestamp::from_millis),
            after: self
                .cursor
                .as_deref()
                .map(|c| {
                    c.parse::<RunId>()
                        .map_err(|_| ApiError::invalid("cursor", "not a cursor of this API"))
                })
                .transpose()?,
            limit: Some(limit),
        })
    }
}

/// Lists an env's runs with filters, a page at a time (admin, or an env key of `env`).
#[utoipa::path(get, path = "/v1/envs/{env}/runs", tag = "runs",
    params(("env" = String, Path, description = "The env"), ListQuery),
    responses((status = 200, body = RunPage), (status = "4XX", body = ErrorBody)))]
async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<RunPage>, ApiError> {
    caller.require_env(&env)?;
    let query: ListQuery = crate::json::query(raw.as_deref())?;
    let env_name = EnvName::new(&env)?;
    let engine = state.engine();
    engine.env_settings(&env).await?;
    let filter = query.filter(env_name)?;
    let limit = filter.limit.unwrap_or(100) as usize;
    let runs = engine.list(&filter).await?;
    let next_cursor = if runs.len() >= limit {
        runs.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(RunPage {
        runs: runs.into_iter().map(Run::from).collect(),
        next_cursor,
    }))
}

/// Cancels a run (409 `already_finished` for a finished one).
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses((status = 200, body = Run), (status = "4XX", body = ErrorBody)))]
async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let run = visible_run(&state, &caller, &id).await?;
    Ok(Json(state.engine().cancel(run.id).await?.into()))
}

/// `POST /v1/runs/{id}/reschedule`: exactly one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reschedule {
    /// Run no earlier than now + this.
    pub delay_ms: Option<u64>,
    /// Run no earlier than this instant.
    pub run_at_ms: Option<u64>,
}

/// Moves a delayed (or queued) run to a new time.
#[utoipa::path(post, path = "/v1/runs/{id}/reschedule", tag = "runs", request_body = Reschedule,
    params(("id" = String, Path, description = "The run's id")),
    responses((status = 200, body = Run), (status = "4XX", body = ErrorBody)))]
async fn reschedule_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reschedule>,
) -> Result<Json<Run>, ApiError> {
    let at = match (body.delay_ms, body.run_at_ms) {
        (Some(d), None) => state
            .engine()
            .now()
            .saturating_add(Duration::from_millis(d)),
        (None, Some(at)) => Timestamp::from_millis(at),
        _ => {
            return Err(ApiError::invalid(
                "delay_ms",
                "give exactly one of delay_ms and run_at_ms",
            ))
        }
    };
    let run = visible_run(&state, &caller, &id).await?;
    if run.status.is_terminal() {
        return Err(runlane::EngineError::AlreadyFinished {
            run: run.id,
            status: run.status,
        }
        .into());
    }
    Ok(Json(state.engine().reschedule(run.id, at).await?.into()))
}

/// Retries a finished run: a new run with the same task and payload.
#[utoipa::path(post, path = "/v1/runs/{id}/retry", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses((status = 201, body = Triggered), (status = "4XX", body = ErrorBody)))]
async fn retry_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Triggered>), ApiError> {
    let run = visible_run(&state, &caller, &id).await?;
    let triggered = state.engine().retry_run(run.id).await?;
    Ok((StatusCode::CREATED, Json(triggered.into())))
}
