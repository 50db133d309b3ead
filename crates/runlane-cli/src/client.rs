//! A typed HTTP client of the runlane server's `/v1` API (docs/API.md).
//!
//! Every call returns a [`Reply`]: the typed value the commands render as a table, and the
//! server's JSON as it came, which `--json` prints unchanged. Errors carry the server's
//! `{error: {code, message, field}}`.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// The default server address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

/// How long an ordinary call may take before it fails (a hung server must not hang a worker's
/// heartbeat or a script).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a long-poll may take beyond the wait it asked for.
const LONG_POLL_SLACK: Duration = Duration::from_secs(30);

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with its error shape (or a status without one).
    #[error("{0}")]
    Api(ApiError),
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the server at {server}: {reason}")]
    Transport {
        /// The server's base address.
        server: String,
        /// The innermost cause (`Connection refused (os error 111)`, ...).
        reason: String,
    },
    /// The server's answer was not the JSON this client expects.
    #[error("unexpected answer from the server ({what}): {reason}")]
    Decode {
        /// Which call.
        what: String,
        /// Why it did not decode.
        reason: String,
    },
    /// The server address does not parse.
    #[error("server: {0}")]
    BadServer(String),
}

/// The server's error answer: `{error: {code, message, field}}` and the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The machine-readable code (`invalid_input`, `not_found`, ...).
    pub code: String,
    /// The human message.
    pub message: String,
    /// The field at fault, when the server names one.
    pub field: Option<String>,
    /// `Retry-After` in seconds, when the server sent one.
    pub retry_after_s: Option<u64>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)?;
        if let Some(field) = &self.field {
            // The message usually starts with the field already; name it anyway for scripts.
            write!(f, " [field: {field}]")?;
        }
        if let Some(s) = self.retry_after_s {
            write!(f, " (retry after {s}s)")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

/// A typed answer and the server's JSON it came from.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// The answer, typed.
    pub value: T,
    /// The server's JSON, unchanged (`Value::Null` for an empty answer).
    pub raw: Value,
    /// The HTTP status.
    pub status: u16,
}

/// An env's settings (`Env`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Env {
    /// Name.
    pub name: String,
    /// Concurrency limit.
    pub limit: Option<u64>,
    /// Burst factor.
    pub burst: Option<f64>,
    /// Fast-lane cap.
    pub fast_lane_limit: Option<u64>,
    /// Fairness weight.
    pub weight: Option<u64>,
    /// Refuse unknown tasks.
    pub strict_tasks: Option<bool>,
    /// Fast path on.
    pub fast_path: Option<bool>,
}

/// `{envs: [Env]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EnvList {
    /// The envs.
    pub envs: Vec<Env>,
}

/// An API key as listed (the secret only on create and rotate).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Key {
    /// Key id.
    pub id: String,
    /// The secret, shown once.
    pub key: Option<String>,
    /// `admin`, `env` or `worker`.
    pub role: String,
    /// The envs it names.
    pub envs: Vec<String>,
    /// Free text.
    pub label: Option<String>,
    /// When it was made.
    pub created_at_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_at_ms: Option<u64>,
}

/// `{keys: [Key]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct KeyList {
    /// The keys.
    pub keys: Vec<Key>,
}

/// A lane with its depth.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Lane {
    /// Name.
    pub name: String,
    /// Runs ready in it.
    pub ready: Option<u64>,
    /// Workloops consuming it.
    pub consumers: Option<u64>,
    /// Since when nobody consumes it.
    pub orphan_since_at_ms: Option<u64>,
}

/// `{lanes: [Lane]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LaneList {
    /// The lanes.
    pub lanes: Vec<Lane>,
}

/// A queue with its depth and limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Queue {
    /// Name.
    pub name: String,
    /// Delayed runs.
    pub delayed: Option<u64>,
    /// Queued runs.
    pub queued: Option<u64>,
    /// Running runs.
    pub running: Option<u64>,
    /// Per-key limit.
    pub limit: Option<u64>,
    /// Limit across keys.
    pub key_total_limit: Option<u64>,
    /// Cap on waiting runs per key.
    pub max_queued: Option<u64>,
    /// Paused.
    pub paused: Option<bool>,
}

/// A cron schedule of a task with its next and last ticks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Schedule {
    /// The task it triggers.
    pub task: String,
    /// Its position in the task's schedules.
    pub index: Option<u32>,
    /// The cron pattern.
    pub cron: String,
    /// The time zone.
    pub timezone: String,
    /// The next tick (ms since the epoch).
    pub next_tick_ms: Option<u64>,
    /// The last tick fired (ms since the epoch).
    pub last_tick_ms: Option<u64>,
}

/// `{schedules: [Schedule]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ScheduleList {
    /// The schedules.
    pub schedules: Vec<Schedule>,
}

/// `{queues: [Queue]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QueueList {
    /// The queues.
    pub queues: Vec<Queue>,
}

/// A run (`Run`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Run {
    /// Run id.
    pub id: String,
    /// Env.
    pub env: String,
    /// Task.
    pub task: String,
    /// Status.
    pub status: String,
    /// Payload.
    pub payload: Value,
    /// Output.
    pub output: Value,
    /// Error.
    pub error: Value,
    /// Queue.
    pub queue: Option<String>,
    /// Queue key.
    pub key: Option<String>,
    /// Lane.
    pub lane: Option<String>,
    /// How it was triggered.
    pub source: Option<String>,
    /// The version it took.
    pub version: Option<u64>,
    /// Whether it is locked to that version.
    pub locked: Option<bool>,
    /// The run a manual retry retries.
    pub retry_of: Option<String>,
    /// Attempt number.
    pub attempt: Option<u64>,
    /// Priority.
    pub priority_ms: Option<u64>,
    /// Created.
    pub created_at_ms: Option<u64>,
    /// Due.
    pub run_at_ms: Option<u64>,
    /// TTL.
    pub ttl_ms: Option<u64>,
    /// Started.
    pub started_at_ms: Option<u64>,
    /// Finished.
    pub finished_at_ms: Option<u64>,
    /// When its cancel was first requested.
    pub cancel_requested_at_ms: Option<u64>,
}

/// `{runs: [Run], next_cursor}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RunPage {
    /// The runs.
    pub runs: Vec<Run>,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// `Triggered`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Triggered {
    /// The run.
    pub run_id: String,
    /// Its status.
    pub status: String,
    /// An idempotency hit returned an existing run.
    pub idempotent_hit: bool,
}

/// Trigger-and-wait's answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Waited {
    /// The run.
    pub run_id: String,
    /// Its status.
    pub status: String,
    /// Output when completed.
    pub output: Option<Value>,
    /// Error when failed.
    pub error: Option<Value>,
}

/// A worker's registration answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Registered {
    /// Worker id.
    pub worker_id: String,
    /// Lease length.
    pub lease_ms: u64,
    /// The workloops.
    pub workloops: Vec<Workloop>,
}

/// One workloop of a registered worker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Workloop {
    /// Its index (the `workloop` of a claim).
    pub index: u64,
    /// Its claim chain, as text.
    pub chain: Value,
    /// Its slots.
    pub slots: u64,
}

/// A claimed run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Claimed {
    /// Run id.
    pub run_id: String,
    /// The lease's fencing token.
    pub token: Value,
    /// Env.
    pub env: String,
    /// Task.
    pub task: String,
    /// Payload.
    pub payload: Value,
    /// Attempt.
    pub attempt: u64,
    /// Max duration of the attempt.
    pub max_duration_ms: Option<u64>,
}

/// `{runs: [Claimed]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ClaimList {
    /// The runs.
    pub runs: Vec<Claimed>,
}

/// The heartbeat's answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HeartbeatReply {
    /// Runs cancelled since.
    pub cancelled: Vec<String>,
    /// Runs whose lease is lost.
    pub lost: Vec<String>,
}

/// A registered version's answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct VersionRegistered {
    /// Its number.
    pub version: u64,
    /// Whether it was made current.
    pub promoted: bool,
}

/// A version with its task definitions (`Version`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Version {
    /// Its number.
    pub version: u64,
    /// When it was registered.
    pub created_at_ms: Option<u64>,
    /// Whether it is current.
    pub current: bool,
    /// Its task definitions, as the server wrote them.
    pub tasks: Vec<Value>,
}

/// `{current, versions: [Version]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct VersionList {
    /// The current version.
    pub current: u64,
    /// The versions.
    pub versions: Vec<Version>,
}

/// A promotion's answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Promoted {
    /// The current version now.
    pub current: u64,
}

/// A client of one server with one key.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// A client of `server` (e.g. `http://127.0.0.1:7878`; `http://` is assumed when no scheme
    /// is given) using `key` as the bearer key.
    pub fn new(server: &str, key: Option<String>) -> Result<Client, ClientError> {
        let server = server.trim();
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| ClientError::BadServer(format!("{base:?} is not a URL: {e}")))?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(ClientError::BadServer(format!(
                "{base:?}: the scheme must be http or https"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| transport(&base, &e))?;
        Ok(Client { http, base, key })
    }

    /// One call: `method path` with an optional JSON body and query, decoding the answer as
    /// `T` (an empty answer decodes from `null`); it fails if the answer takes over
    /// [`CALL_TIMEOUT`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Reply<T>, ClientError> {
        self.call_within(CALL_TIMEOUT, method, path, query, body)
            .await
    }

    /// [`Client::call`] with its own bound on the answer's time (long-polls wait longer).
    pub async fn call_within<T: DeserializeOwned>(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Reply<T>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url).timeout(timeout);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| transport(&self.base, &e))?;
        let status = resp.status();
        let retry_after_s = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = resp.bytes().await.map_err(|e| transport(&self.base, &e))?;
        if !status.is_success() {
            return Err(ClientError::Api(api_error(status, &bytes, retry_after_s)));
        }
        let raw: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                what: format!("{method} {path}"),
                reason: e.to_string(),
            })?
        };
        let value = T::deserialize(&raw).map_err(|e| ClientError::Decode {
            what: format!("{method} {path}"),
            reason: e.to_string(),
        })?;
        Ok(Reply {
            value,
            raw,
            status: status.as_u16(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Reply<T>, ClientError> {
        self.call(Method::GET, path, &[], None).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply<T>, ClientError> {
        self.call(Method::POST, path, &[], body).await
    }

    async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<Reply<T>, ClientError> {
        self.call(Method::PATCH, path, &[], Some(body)).await
    }

    // --- envs and keys ---

    /// `POST /v1/envs`: `settings` is `{name, limit?, ...}`.
    pub async fn create_env(&self, settings: &Value) -> Result<Reply<Env>, ClientError> {
        self.post("/v1/envs", Some(settings)).await
    }

    /// `GET /v1/envs`.
    pub async fn list_envs(&self) -> Result<Reply<EnvList>, ClientError> {
        self.get("/v1/envs").await
    }

    /// `GET /v1/envs/{env}`.
    pub async fn get_env(&self, env: &str) -> Result<Reply<Env>, ClientError> {
        self.get(&format!("/v1/envs/{}", seg(env))).await
    }

    /// `PATCH /v1/envs/{env}`.
    pub async fn set_env(&self, env: &str, settings: &Value) -> Result<Reply<Env>, ClientError> {
        self.patch(&format!("/v1/envs/{}", seg(env)), settings)
            .await
    }

    /// `POST /v1/keys`.
    pub async fn create_key(&self, body: &Value) -> Result<Reply<Key>, ClientError> {
        self.post("/v1/keys", Some(body)).await
    }

    /// `GET /v1/keys`.
    pub async fn list_keys(&self) -> Result<Reply<KeyList>, ClientError> {
        self.get("/v1/keys").await
    }

    /// `POST /v1/keys/{id}/rotate`.
    pub async fn rotate_key(&self, id: &str) -> Result<Reply<Key>, ClientError> {
        self.post(&format!("/v1/keys/{}/rotate", seg(id)), None)
            .await
    }

    /// `POST /v1/keys/{id}/revoke`.
    pub async fn revoke_key(&self, id: &str) -> Result<Reply<Key>, ClientError> {
        self.post(&format!("/v1/keys/{}/revoke", seg(id)), None)
            .await
    }

    // --- lanes and queues ---

    /// `GET /v1/lanes`.
    pub async fn list_lanes(&self) -> Result<Reply<LaneList>, ClientError> {
        self.get("/v1/lanes").await
    }

    /// `POST /v1/lanes`.
    pub async fn add_lane(&self, name: &str) -> Result<Reply<Value>, ClientError> {
        self.post("/v1/lanes", Some(&serde_json::json!({ "name": name })))
            .await
    }

    /// `GET /v1/envs/{env}/queues`.
    pub async fn list_queues(&self, env: &str) -> Result<Reply<QueueList>, ClientError> {
        self.get(&format!("/v1/envs/{}/queues", seg(env))).await
    }

    /// `GET /v1/envs/{env}/schedules`.
    pub async fn list_schedules(&self, env: &str) -> Result<Reply<ScheduleList>, ClientError> {
        self.get(&format!("/v1/envs/{}/schedules", seg(env))).await
    }

    /// `PATCH /v1/envs/{env}/queues/{queue}`.
    pub async fn set_queue(
        &self,
        env: &str,
        queue: &str,
        body: &Value,
    ) -> Result<Reply<Queue>, ClientError> {
        self.patch(
            &format!("/v1/envs/{}/queues/{}", seg(env), seg(queue)),
            body,
        )
        .await
    }

    /// `POST /v1/envs/{env}/queues/{queue}/pause` (or `resume`).
    pub async fn pause_queue(
        &self,
        env: &str,
        queue: &str,
        pause: bool,
    ) -> Result<Reply<Queue>, ClientError> {
        let verb = if pause { "pause" } else { "resume" };
        self.post(
            &format!("/v1/envs/{}/queues/{}/{verb}", seg(env), seg(queue)),
            None,
        )
        .await
    }

    // --- versions ---

    /// `POST /v1/envs/{env}/versions`: `body` is `{tasks: [...], promote?}`.
    pub async fn register_version(
        &self,
        env: &str,
        body: &Value,
    ) -> Result<Reply<VersionRegistered>, ClientError> {
        self.post(&format!("/v1/envs/{}/versions", seg(env)), Some(body))
            .await
    }

    /// `GET /v1/envs/{env}/versions`.
    pub async fn list_versions(&self, env: &str) -> Result<Reply<VersionList>, ClientError> {
        self.get(&format!("/v1/envs/{}/versions", seg(env))).await
    }

    /// `GET /v1/envs/{env}/versions/{version}`.
    pub async fn get_version(
        &self,
        env: &str,
        version: u32,
    ) -> Result<Reply<Version>, ClientError> {
        self.get(&format!("/v1/envs/{}/versions/{version}", seg(env)))
            .await
    }

    /// `POST /v1/envs/{env}/versions/{version}/promote`.
    pub async fn promote_version(
        &self,
        env: &str,
        version: u32,
    ) -> Result<Reply<Promoted>, ClientError> {
        self.post(
            &format!("/v1/envs/{}/versions/{version}/promote", seg(env)),
            None,
        )
        .await
    }

    // --- runs ---

    /// `POST /v1/envs/{env}/runs`.
    pub async fn trigger(
        &self,
        env: &str,
        trigger: &Value,
    ) -> Result<Reply<Triggered>, ClientError> {
        self.post(&format!("/v1/envs/{}/runs", seg(env)), Some(trigger))
            .await
    }

    /// `POST /v1/envs/{env}/runs/wait`; `wait` is the body's `timeout_ms`.
    pub async fn trigger_and_wait(
        &self,
        env: &str,
        trigger: &Value,
        wait: Duration,
    ) -> Result<Reply<Waited>, ClientError> {
        self.call_within(
            wait + LONG_POLL_SLACK,
            Method::POST,
            &format!("/v1/envs/{}/runs/wait", seg(env)),
            &[],
            Some(trigger),
        )
        .await
    }

    /// `GET /v1/envs/{env}/runs` with filters.
    pub async fn list_runs(
        &self,
        env: &str,
        query: &[(&str, String)],
    ) -> Result<Reply<RunPage>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/envs/{}/runs", seg(env)),
            query,
            None,
        )
        .await
    }

    /// `GET /v1/runs/{id}`.
    pub async fn get_run(&self, id: &str) -> Result<Reply<Run>, ClientError> {
        self.get(&format!("/v1/runs/{}", seg(id))).await
    }

    /// `POST /v1/runs/{id}/cancel`.
    pub async fn cancel_run(&self, id: &str) -> Result<Reply<Run>, ClientError> {
        self.post(&format!("/v1/runs/{}/cancel", seg(id)), None)
            .await
    }

    /// `POST /v1/runs/{id}/retry`.
    pub async fn retry_run(&self, id: &str) -> Result<Reply<Triggered>, ClientError> {
        self.post(&format!("/v1/runs/{}/retry", seg(id)), None)
            .await
    }

    /// `POST /v1/runs/{id}/reschedule` with `{delay_ms}`.
    pub async fn reschedule_run(
        &self,
        id: &str,
        delay: Duration,
    ) -> Result<Reply<Run>, ClientError> {
        let body = serde_json::json!({ "delay_ms": millis(delay) });
        self.post(&format!("/v1/runs/{}/reschedule", seg(id)), Some(&body))
            .await
    }

    // --- worker protocol ---

    /// `POST /v1/workers`.
    pub async fn register_worker(&self, body: &Value) -> Result<Reply<Registered>, ClientError> {
        self.post("/v1/workers", Some(body)).await
    }

    /// `POST /v1/workers/{id}/claim`.
    pub async fn claim(
        &self,
        worker: &str,
        workloop: u64,
        max: u64,
        wait: Duration,
    ) -> Result<Reply<ClaimList>, ClientError> {
        let body = serde_json::json!({ "workloop": workloop, "max": max, "wait_ms": millis(wait) });
        self.call_within(
            wait + LONG_POLL_SLACK,
            Method::POST,
            &format!("/v1/workers/{}/claim", seg(worker)),
            &[],
            Some(&body),
        )
        .await
    }

    /// `POST /v1/workers/{id}/heartbeat` with `[{run_id, token}]`.
    pub async fn heartbeat(
        &self,
        worker: &str,
        runs: &[(String, Value)],
    ) -> Result<Reply<HeartbeatReply>, ClientError> {
        let runs: Vec<Value> = runs
            .iter()
            .map(|(run_id, token)| serde_json::json!({ "run_id": run_id, "token": token }))
            .collect();
        let body = serde_json::json!({ "runs": runs });
        self.post(
            &format!("/v1/workers/{}/heartbeat", seg(worker)),
            Some(&body),
        )
        .await
    }

    /// `POST /v1/workers/{id}/runs/{run}/complete`.
    pub async fn complete(
        &self,
        worker: &str,
        run: &str,
        token: &Value,
        output: &Value,
    ) -> Result<Reply<Value>, ClientError> {
        let body = serde_json::json!({ "token": token, "output": output });
        self.post(
            &format!("/v1/workers/{}/runs/{}/complete", seg(worker), seg(run)),
            Some(&body),
        )
        .await
    }

    /// `POST /v1/workers/{id}/runs/{run}/fail`; `retry` is `"policy"` or `"none"`.
    pub async fn fail(
        &self,
        worker: &str,
        run: &str,
        token: &Value,
        error: &str,
        retry: &str,
    ) -> Result<Reply<Value>, ClientError> {
        let body = serde_json::json!({ "token": token, "error": error, "retry": retry });
        self.post(
            &format!("/v1/workers/{}/runs/{}/fail", seg(worker), seg(run)),
            Some(&body),
        )
        .await
    }

    /// `DELETE /v1/workers/{id}`.
    pub async fn deregister_worker(&self, worker: &str) -> Result<Reply<Value>, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/workers/{}", seg(worker)),
            &[],
            None,
        )
        .await
    }
}

/// A transport error naming its innermost cause (reqwest's own message is generic).
fn transport(server: &str, e: &reqwest::Error) -> ClientError {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let reason = if e.is_timeout() {
        "timed out".to_string()
    } else {
        cause.to_string()
    };
    ClientError::Transport {
        server: server.to_string(),
        reason,
    }
}

/// Whole milliseconds of `d`, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One path segment, percent-encoded so a name cannot change the route.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The server's error shape from a failed answer, or a stand-in naming the status.
fn api_error(status: StatusCode, body: &[u8], retry_after_s: Option<u64>) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ApiError {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            field: error.field,
            retry_after_s,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            ApiError {
                status: status.as_u16(),
                code: status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_lowercase()
                    .replace(' ', "_"),
                message: if text.is_empty() {
                    format!("the server answered {status}")
                } else {
                    text.chars().take(500).collect()
                },
                field: None,
                retry_after_s,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_is_read_with_its_field() {
        let body = br#"{"error":{"code":"invalid_input","message":"ttl: must be greater than zero","field":"ttl_ms"}}"#;
        let e = api_error(StatusCode::BAD_REQUEST, body, None);
        assert_eq!(e.code, "invalid_input");
        assert_eq!(e.field.as_deref(), Some("ttl_ms"));
        assert_eq!(
            e.to_string(),
            "invalid_input (400): ttl: must be greater than zero [field: ttl_ms]"
        );
    }

    #[test]
    fn an_error_without_the_shape_names_the_status() {
        let e = api_error(StatusCode::BAD_GATEWAY, b"", Some(3));
        assert_eq!(e.code, "bad_gateway");
        assert_eq!(e.field, None);
        assert!(e.to_string().contains("502"), "{e}");
        assert!(e.to_string().contains("retry after 3s"), "{e}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("run_01-a.b~"), "run_01-a.b~");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn a_server_must_be_an_http_url() {
        assert!(Client::new("http://127.0.0.1:7878/", None).is_ok());
        let c = Client::new("127.0.0.1:7878", None).expect("http assumed");
        assert_eq!(c.base, "http://127.0.0.1:7878");
        assert!(matches!(
            Client::new("http://", None),
            Err(ClientError::BadServer(_))
        ));
        assert!(matches!(
            Client::new("ftp://x", None),
            Err(ClientError::BadServer(_))
        ));
    }
}
