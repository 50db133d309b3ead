//! The worker protocol (docs/API.md, "Worker protocol"): register, claim (long-poll),
//! heartbeat, complete, fail, progress, delete. Each registered worker is a
//! [`runlane::RemoteWorker`] kept in the state's [`WorkerRegistry`]; a worker that neither
//! claims nor heartbeats for three leases is dropped as if it had called `DELETE` (its held
//! runs go back to their queues).
//!
//! Worker keys (and admin keys) only: a key may register a worker for the envs it names, and
//! use a worker only when it names every env the worker serves (403 otherwise). Every run call
//! carries the lease's fencing token; a stale one answers 409 `stale_token` and changes
//! nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use runlane::core::{FencingToken, RunId, RunStatus, Timestamp, WorkloopSpec};
use runlane::{ClaimedRun, LeaseState, RemoteWorker, RemoteWorkerSpec, RetryChoice};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::state::AppState;
use crate::util::JsonText;

/// The longest claim long-poll, in ms.
pub const WAIT_MS_MAX: u64 = 60_000;

/// A worker is dropped after this many leases without a claim or a heartbeat.
pub const IDLE_LEASES: u32 = 3;

/// One registered worker.
struct Entry {
    worker: RemoteWorker,
    /// The envs it serves, for the key check.
    envs: Vec<String>,
    /// Its last claim or heartbeat.
    seen: Mutex<Instant>,
    /// Claims in progress (a long-poll counts as activity for as long as it waits).
    claims: AtomicUsize,
    /// Its idle watchdog.
    watchdog: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Entry {
    fn touch(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn seen(&self) -> Instant {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The remote workers this server registered, by worker id. Cheap to clone.
#[derive(Clone, Default)]
pub struct WorkerRegistry {
    inner: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
}

impl WorkerRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many workers are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("worker {id} not found")))
    }

    fn insert(&self, id: String, entry: Arc<Entry>) {
        let watchdog = tokio::spawn(watchdog(
            Arc::downgrade(&self.inner),
            id.clone(),
            Arc::downgrade(&entry),
        ));
        *entry.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some(watchdog.abort_handle());
        self.lock().insert(id, entry);
    }

    /// Removes a worker and closes it (its held runs go back to their queues).
    async fn remove(&self, id: &str) -> bool {
        let entry = self.lock().remove(id);
        match entry {
            Some(entry) => {
                if let Some(w) = entry
                    .watchdog
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    w.abort();
                }
                entry.worker.close().await;
                true
            }
            None => false,
        }
    }

    /// Closes every worker (server shutdown): their held runs go back to their queues.
    pub async fn close_all(&self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.remove(&id).await;
        }
    }
}

/// Drops the worker once it has neither claimed nor heartbeaten for [`IDLE_LEASES`] leases.
/// Holds nothing strongly: a registry or entry that is gone ends it.
async fn watchdog(
    registry: Weak<Mutex<HashMap<String, Arc<Entry>>>>,
    id: String,
    entry: Weak<Entry>,
) {
    loop {
        let (due, limit) = {
            let Some(entry) = entry.upgrade() else { return };
            let limit = entry.worker.lease().saturating_mul(IDLE_LEASES);
            let due = if entry.claims.load(Ordering::SeqCst) > 0 {
                // A long-poll is activity for as long as it waits: look again a limit later.
                Instant::now() + limit
            } else {
                entry.seen() + limit
            };
            (due, limit)
        };
        tokio::time::sleep_until(due).await;
        let Some(e) = entry.upgrade() else { return };
        if e.claims.load(Ordering::SeqCst) > 0 || e.seen() + limit > Instant::now() {
            continue; // Active meanwhile: a claim ends with a touch.
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let removed = {
            let mut map = registry.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&id) {
                Some(current) if Arc::ptr_eq(current, &e) => map.remove(&id),
                _ => None,
            }
        };
        drop(registry);
        if removed.is_some() {
            tracing::info!(worker = %id, "worker idle for {IDLE_LEASES} leases; dropped");
            e.worker.close().await;
        }
        return;
    }
}

// ---- bodies --------------------------------------------------------------------------------

/// An env a worker serves.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServedEnvBody {
    /// The env.
    pub env: String,
    /// The version it runs (default: the env's current version).
    pub version: Option<u32>,
}

/// A worker's registration.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The envs it serves.
    pub envs: Vec<ServedEnvBody>,
    /// Its workloops, e.g. `fast_lane:1 manual>*:4`.
    pub workloops: String,
    /// Its lease (default: the server's).
    pub lease_ms: Option<u64>,
    /// Tasks declared to every env it serves (a strict env then accepts them); claims are not
    /// filtered by them.
    pub tasks: Option<Vec<String>>,
}

/// One workloop of a registered worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkloopBody {
    /// Its index (the `workloop` of a claim).
    pub index: usize,
    /// Its claim chain.
    pub chain: String,
    /// Its slots.
    pub slots: u32,
}

/// A registered worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    /// Its id, for every later call.
    pub worker_id: String,
    /// Its lease: heartbeat well within it.
    pub lease_ms: u64,
    /// Its workloops.
    pub workloops: Vec<WorkloopBody>,
}

/// A claim.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    /// The workloop's index.
    pub workloop: usize,
    /// At most this many runs (never more than the workloop's free slots).
    pub max: u32,
    /// Wait up to this long when nothing is ready (default 0, at most 60 000).
    #[serde(default)]
    pub wait_ms: u64,
}

/// A claimed run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Claimed {
    /// The run.
    pub run_id: String,
    /// The lease's fencing token, for every later call about this run.
    pub token: u64,
    /// Its env.
    pub env: String,
    /// Its task.
    pub task: String,
    /// Its payload, exactly as triggered.
    pub payload: JsonText,
    /// The attempt (1-based).
    pub attempt: u32,
    /// Its queue.
    pub queue: String,
    /// Its concurrency key.
    pub key: String,
    /// The lane it was claimed from.
    pub lane: String,
    /// The engine ends the attempt when it runs longer.
    pub max_duration_ms: Option<u64>,
}

impl From<ClaimedRun> for Claimed {
    fn from(c: ClaimedRun) -> Self {
        Claimed {
            run_id: c.run_id.to_string(),
            token: c.token.0,
            env: c.env.to_string(),
            task: c.task.to_string(),
            payload: JsonText::from_text(&c.payload),
            attempt: c.attempt,
            queue: c.queue.to_string(),
            key: c.key.to_string(),
            lane: c.lane.to_string(),
            max_duration_ms: c
                .max_duration
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// The claimed runs (none when the wait ended empty).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimList {
    /// The runs.
    pub runs: Vec<Claimed>,
}

/// One lease in a heartbeat.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    /// The run.
    pub run_id: String,
    /// Its lease's token.
    pub token: u64,
}

/// A heartbeat for all of a worker's runs.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// The runs it holds.
    pub runs: Vec<LeaseBody>,
}

/// What a heartbeat learned: runs not listed are alive and extended.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// Runs that were cancelled: stop them (they end `canceled` after the grace period unless
    /// completed first).
    pub cancelled: Vec<String>,
    /// Runs whose lease is gone: stop working on them.
    pub lost: Vec<String>,
}

/// A completion.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    /// The lease's token.
    pub token: u64,
    /// The output (default null).
    #[serde(default)]
    pub output: serde_json::Value,
}

/// A failed attempt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    /// The lease's token.
    pub token: u64,
    /// What went wrong.
    pub error: String,
    /// `"policy"` (default: the run's retry policy), `"none"` (no further attempt) or
    /// `{"at_ms": n}` (the next attempt at that instant, within the policy's attempt cap).
    #[schema(value_type = Object)]
    pub retry: Option<serde_json::Value>,
}

/// Where a failed run went.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailReply {
    /// Its status now (`delayed`, `queued`, `failed`, or `canceled` after a cancel request).
    pub status: String,
    /// When its next attempt is due, if it has one.
    pub retry_at_ms: Option<u64>,
}

/// A progress report.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressBody {
    /// The lease's token.
    pub token: u64,
    /// Any JSON.
    pub progress: serde_json::Value,
}

// ---- helpers -------------------------------------------------------------------------------

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(claim))
        .routes(routes!(heartbeat))
        .routes(routes!(complete))
        .routes(routes!(fail))
        .routes(routes!(progress))
        .routes(routes!(delete_worker))
}

/// The worker, if the caller may use it (a key naming every env it serves, or admin).
fn worker_for(state: &AppState, caller: &Caller, id: &str) -> Result<Arc<Entry>, ApiError> {
    let entry = state.workers().get(id)?;
    for env in &entry.envs {
        caller.require_worker(env)?;
    }
    Ok(entry)
}

/// A run id in a path or body; one that cannot exist is a stale lease (nothing is held
/// under it).
fn parse_run(id: &str, field: &str) -> Result<RunId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::invalid(field, format!("{id:?} is not a run id")))
}

/// Engine errors of the worker protocol: its fields keep their API names.
fn worker_error(e: runlane::EngineError) -> ApiError {
    match e {
        runlane::EngineError::Invalid(i) => {
            let field = match i.field {
                "lease" => "lease_ms",
                "retry_at" => "retry.at_ms",
                other => other,
            };
            ApiError::invalid(field, i.reason)
        }
        other => other.into(),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn retry_choice(retry: Option<serde_json::Value>) -> Result<RetryChoice, ApiError> {
    let bad = || {
        ApiError::invalid(
            "retry",
            "must be \"policy\", \"none\" or {\"at_ms\": <ms since the epoch>}",
        )
    };
    match retry {
        None | Some(serde_json::Value::Null) => Ok(RetryChoice::Policy),
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "policy" => Ok(RetryChoice::Policy),
            "none" => Ok(RetryChoice::NoRetry),
            _ => Err(bad()),
        },
        Some(serde_json::Value::Object(map)) => {
            if let Some(other) = map.keys().find(|k| k.as_str() != "at_ms") {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_field",
                    format!("unknown field {:?}", format!("retry.{other}")),
                )
                .field(format!("retry.{other}")));
            }
            let at = map
                .get("at_ms")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| ApiError::invalid("retry.at_ms", "must be ms since the epoch"))?;
            Ok(RetryChoice::At(Timestamp::from_millis(at)))
        }
        Some(_) => Err(bad()),
    }
}

// ---- handlers ------------------------------------------------------------------------------

/// Registers a worker (a worker key naming every env it serves, or admin).
#[utoipa::path(post, path = "/v1/workers", tag = "workers", request_body = Register,
    responses((status = 201, body = Registered), (status = "4XX", body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Register>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    if body.envs.is_empty() {
        return Err(ApiError::invalid("envs", "must name at least one env"));
    }
    for served in &body.envs {
        caller.require_worker(&served.env)?;
    }
    // Checked before anything is declared, so a bad spec changes nothing.
    WorkloopSpec::parse(&body.workloops)?;
    if body.lease_ms == Some(0) {
        return Err(ApiError::invalid("lease_ms", "must be greater than zero"));
    }
    for task in body.tasks.iter().flatten() {
        if let Err(e) = runlane::core::TaskName::new(task) {
            return Err(ApiError::invalid(
                "tasks",
                format!("{task:?}: {}", e.reason),
            ));
        }
    }
    let engine = state.engine();
    let worker = engine
        .remote_worker(RemoteWorkerSpec {
            envs: body
                .envs
                .iter()
                .map(|s| (s.env.clone(), s.version))
                .collect(),
            workloops: body.workloops.clone(),
            lease: body.lease_ms.map(Duration::from_millis),
        })
        .await
        .map_err(worker_error)?;
    if let Some(tasks) = body.tasks.as_deref().filter(|t| !t.is_empty()) {
        for served in &body.envs {
            if let Err(e) = engine.declare_tasks(&served.env, tasks).await {
                worker.close().await;
                return Err(worker_error(e));
            }
        }
    }
    let id = format!("w_{:016x}", rand::random::<u64>());
    let reply = Registered {
        worker_id: id.clone(),
        lease_ms: ms(worker.lease()),
        workloops: worker
            .workloops()
            .into_iter()
            .map(|w| WorkloopBody {
                index: w.index,
                chain: w.chain,
                slots: w.slots,
            })
            .collect(),
    };
    let entry = Arc::new(Entry {
        worker,
        envs: body.envs.into_iter().map(|s| s.env).collect(),
        seen: Mutex::new(Instant::now()),
        claims: AtomicUsize::new(0),
        watchdog: Mutex::new(None),
    });
    state.workers().insert(id, entry);
    Ok((StatusCode::CREATED, Json(reply)))
}

/// Counts a claim in progress for the idle watchdog; touches the worker at both ends.
struct Claiming(Arc<Entry>);

impl Claiming {
    fn new(entry: Arc<Entry>) -> Self {
        entry.claims.fetch_add(1, Ordering::SeqCst);
        entry.touch();
        Claiming(entry)
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        self.0.touch();
        self.0.claims.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Claims up to `max` runs for a workloop, long-polling up to `wait_ms` when nothing is ready.
#[utoipa::path(post, path = "/v1/workers/{id}/claim", tag = "workers", request_body = ClaimBody,
    params(("id" = String, Path, description = "The worker's id")),
    responses((status = 200, body = ClaimList), (status = "4XX", body = ErrorBody)))]
async fn claim(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ClaimBody>,
) -> Result<Json<ClaimList>, ApiError> {
    let entry = worker_for(&state, &caller, &id)?;
    if body.max == 0 {
        return Err(ApiError::invalid("max", "must be at least 1"));
    }
    if body.wait_ms > WAIT_MS_MAX {
        return Err(ApiError::invalid(
            "wait_ms",
            format!("must be at most {WAIT_MS_MAX}"),
        ));
    }
    let claiming = Claiming::new(entry.clone());
    // The claim runs in a task of its own: a client that leaves mid-poll never cuts it between
    // the queue's grant and the worker's hold, and runs it can no longer hand over go back to
    // their queues at once.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let worker = entry.worker.clone();
    tokio::spawn(async move {
        let claimed = worker
            .claim(body.workloop, body.max, Duration::from_millis(body.wait_ms))
            .await;
        drop(claiming);
        if let Err(Ok(runs)) = tx.send(claimed) {
            for run in runs {
                let _ = worker.release(run.run_id, run.token).await;
            }
        }
    });
    let claimed = rx
        .await
        .map_err(|_| ApiError::unavailable("the claim stopped"))?
        .map_err(worker_error)?;
    Ok(Json(ClaimList {
        runs: claimed.into_iter().map(Claimed::from).collect(),
    }))
}

/// Extends the leases of all the worker's runs; answers which were cancelled or lost.
#[utoipa::path(post, path = "/v1/workers/{id}/heartbeat", tag = "workers",
    request_body = HeartbeatBody,
    params(("id" = String, Path, description = "The worker's id")),
    responses((status = 200, body = HeartbeatReply), (status = "4XX", body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<HeartbeatBody>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let entry = worker_for(&state, &caller, &id)?;
    let mut leases = Vec::with_capacity(body.runs.len());
    for (i, lease) in body.runs.iter().enumerate() {
        let run = parse_run(&lease.run_id, &format!("runs[{i}].run_id"))?;
        leases.push((run, FencingToken(lease.token)));
    }
    entry.touch();
    let states = entry
        .worker
        .heartbeat(&leases)
        .await
        .map_err(worker_error)?;
    let mut reply = HeartbeatReply {
        cancelled: Vec::new(),
        lost: Vec::new(),
    };
    for (lease, state) in body.runs.into_iter().zip(states) {
        match state {
            LeaseState::Alive => {}
            LeaseState::CancelRequested => reply.cancelled.push(lease.run_id),
            LeaseState::Lost => reply.lost.push(lease.run_id),
        }
    }
    Ok(Json(reply))
}

/// Completes a run the worker holds.
#[utoipa::path(post, path = "/v1/workers/{id}/runs/{run}/complete", tag = "workers",
    request_body = CompleteBody,
    params(("id" = String, Path, description = "The worker's id"),
        ("run" = String, Path, description = "The run's id")),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, run)): Path<(String, String)>,
    ApiJson(body): ApiJson<CompleteBody>,
) -> Result<StatusCode, ApiError> {
    let entry = worker_for(&state, &caller, &id)?;
    let run = crate::routes::runs::run_id(&run)?;
    entry
        .worker
        .complete(run, FencingToken(body.token), body.output)
        .await
        .map_err(worker_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Fails the attempt of a run the worker holds; `retry` decides what comes next.
#[utoipa::path(post, path = "/v1/workers/{id}/runs/{run}/fail", tag = "workers",
    request_body = FailBody,
    params(("id" = String, Path, description = "The worker's id"),
        ("run" = String, Path, description = "The run's id")),
    responses((status = 200, body = FailReply), (status = "4XX", body = ErrorBody)))]
async fn fail(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, run)): Path<(String, String)>,
    ApiJson(body): ApiJson<FailBody>,
) -> Result<Json<FailReply>, ApiError> {
    let entry = worker_for(&state, &caller, &id)?;
    let run = crate::routes::runs::run_id(&run)?;
    let retry = retry_choice(body.retry)?;
    let outcome = entry
        .worker
        .fail(run, FencingToken(body.token), body.error, retry)
        .await
        .map_err(worker_error)?;
    Ok(Json(FailReply {
        status: status_text(outcome.status),
        retry_at_ms: outcome.retry_at.map(Timestamp::as_millis),
    }))
}

fn status_text(status: RunStatus) -> String {
    status.as_str().to_string()
}

/// Publishes a run's progress (run events; a new subscriber sees the latest first).
#[utoipa::path(post, path = "/v1/workers/{id}/runs/{run}/progress", tag = "workers",
    request_body = ProgressBody,
    params(("id" = String, Path, description = "The worker's id"),
        ("run" = String, Path, description = "The run's id")),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn progress(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, run)): Path<(String, String)>,
    ApiJson(body): ApiJson<ProgressBody>,
) -> Result<StatusCode, ApiError> {
    let entry = worker_for(&state, &caller, &id)?;
    let run = crate::routes::runs::run_id(&run)?;
    entry
        .worker
        .progress(run, FencingToken(body.token), &body.progress)
        .map_err(worker_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deregisters a worker: its held runs go back to their queues without counting an attempt.
#[utoipa::path(delete, path = "/v1/workers/{id}", tag = "workers",
    params(("id" = String, Path, description = "The worker's id")),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_worker(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    worker_for(&state, &caller, &id)?;
    state.workers().remove(&id).await;
    Ok(StatusCode::NO_CONTENT)
}
