//! [`RedisQueue`]: the [`QueueBackend`] over one Redis deployment. Every method is one call of
//! the dispatch function (`dispatch.lua`, a Redis function library), so each step is atomic
//! exactly like the memory backend's mutex-held steps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rmpv::Value;
use runlane_core::admission::env_cap;
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    LaneInfo, Lapsed, LeaseState, Leased, LiveRun, OfferSteps, ParkedOffer, Placement,
    QueueBackend, QueueInfo, RunStore, Tick,
};
use runlane_core::{
    ClaimChain, EnvName, EnvSettings, FencingToken, LaneName, QueueError, QueueName, QueueSettings,
    RunId, Timestamp,
};

use crate::combine::{Combine, Joined, Leading, Turn, Waiter};
use crate::record::{self, malformed, run_id, unpack, ValueExt};

/// The key-space format this build writes (stored in `{prefix}:cfg`, field `fmt`).
///
/// Format 3 keeps a due run enqueued in order only as its queue key's list entry (its compact
/// message, no per-run record); format 2 kept a record per run and ids in the lists; format 1
/// also kept TTL deadlines in one zset member per run instead of per-second buckets. A key space
/// of format 1 or 2 is migrated in one script when this build opens it, or when a call finds it
/// (written by an older process after a rebuild). Any other format is refused.
pub const KEYSPACE_FORMAT: u32 = 3;

/// The older formats this build reads (by migrating them to [`KEYSPACE_FORMAT`]).
const PREVIOUS_FORMATS: [&str; 2] = ["1", "2"];

/// The environment variable naming a crash point (tests); the distributed shape reads the
/// same variable for its own crash points.
pub const FAILPOINT_VAR: &str = "RUNLANE_FAILPOINT";

/// The crash point in the middle of a rebuild: with `RUNLANE_FAILPOINT=mid_rebuild` the process
/// aborts after re-enqueuing half of the unfinished runs, leaving the key space marked as being
/// rebuilt (the next caller, in any process, rebuilds again).
pub const MID_REBUILD: &str = "mid_rebuild";

/// The `Retry-After` hint of a refused sync trigger.
const FAST_LANE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings of the Redis queue backend.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `redis+unix:///path/to/socket`.
    pub url: String,
    /// The key prefix of this deployment; every key is `{prefix}:…` (one hash tag).
    pub prefix: String,
    /// A ready run whose lane has had no consumer this long returns to its queue (default 5 min).
    pub ready_timeout: Duration,
    /// A command without an answer after this long fails with `Unavailable` (default 2 s).
    pub response_timeout: Duration,
}

impl RedisConfig {
    /// Defaults for `url` with prefix `runlane`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "runlane".to_string(),
            ready_timeout: Duration::from_secs(300),
            response_timeout: Duration::from_secs(2),
        }
    }

    /// The same settings with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// Why the backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisOpenError {
    /// The server could not be reached (or answered with an error) at start.
    #[error("redis at {address} is unreachable: {reason}")]
    Unreachable {
        /// The address that was tried.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The key space was written by another format version of runlane.
    #[error("redis key space {prefix:?} has format version {found}, this build reads and writes version {expected}")]
    Format {
        /// The prefix.
        prefix: String,
        /// The version found in `{prefix}:cfg`.
        found: String,
        /// The version this build writes.
        expected: u32,
    },
    /// The prefix is empty or holds a character that would break the hash tag.
    #[error("invalid redis key prefix {0:?}: must be non-empty without '{{', '}}' or whitespace")]
    Prefix(String),
}

/// What the backend knows about its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisHealth {
    /// Whether the last call reached the server.
    pub connected: bool,
    /// The last connection error, when not connected.
    pub last_error: Option<String>,
    /// How many times the key space was found lost (FLUSHALL, restart without persistence) and
    /// rebuilt from the run store.
    pub rebuilds: u64,
}

/// Settings remembered to rebuild a lost key space.
#[derive(Default)]
struct Replay {
    envs: BTreeMap<EnvName, EnvSettings>,
    queues: BTreeMap<(EnvName, QueueName), QueueSettings>,
    lanes: Vec<LaneName>,
    consumers: BTreeMap<u64, String>,
}

/// The settings a rebuild puts back for a queue: the stored ones (the store is written first,
/// so they are the latest admin word), with a limit they leave unset taken from the ones this
/// process held (a version's limit, applied where the queue held none).
fn merge_queue_settings(stored: &QueueSettings, held: &QueueSettings) -> QueueSettings {
    QueueSettings {
        limit: stored.limit.or(held.limit),
        key_total_limit: stored.key_total_limit.or(held.key_total_limit),
        ..*stored
    }
}

/// Told the effects of a rebuild's re-enqueues.
type RebuildListener = Arc<dyn Fn(Effects) + Send + Sync>;

/// How long the probe waits between two pings of an unreachable Redis.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The connection's state as calls saw it. A call that fails with a connection error (after
/// the connection manager's own reconnect attempts) marks the link down; while it is down every
/// call fails at once with `Unavailable`, and one background task pings Redis every
/// [`PROBE_INTERVAL`] over the same (reconnecting) connection until it answers, then marks the
/// link up: processing resumes by itself, without a caller paying the reconnect attempts.
#[derive(Debug)]
struct Link {
    up: AtomicBool,
    probing: AtomicBool,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
        }
    }
}

impl Link {
    fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    /// Starts the probe unless one runs (or no runtime is there to run it).
    fn probe(self: &Arc<Self>, conn: &ConnectionManager) {
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::SeqCst);
            return;
        };
        let link = Arc::downgrade(self);
        let mut conn = conn.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                // The queue is gone: nobody waits for the answer.
                let Some(alive) = link.upgrade() else { return };
                drop(alive);
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                let Some(link) = link.upgrade() else { return };
                if pong.is_ok() {
                    link.up.store(true, Ordering::SeqCst);
                    link.probing.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
    }
}

/// Leases an enqueue made for a workloop's parked offer, as the doorbells deliver them
/// ([`RedisQueue::deliveries`]).
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The workloop.
    pub consumer: ConsumerId,
    /// The offer's seq.
    pub seq: u64,
    /// Each run leased, with what its trigger handed (when it was sent).
    pub runs: Vec<(Leased, Option<Vec<u8>>)>,
}

/// The Redis queue backend (implements [`QueueBackend`]).
pub struct RedisQueue {
    conn: ConnectionManager,
    library: Library,
    base: String,
    ready_timeout_ms: String,
    address: String,
    generation: Mutex<String>,
    replay: Mutex<Replay>,
    store: Mutex<Option<Arc<dyn RunStore>>>,
    rebuild_lock: tokio::sync::Mutex<()>,
    /// Told what a rebuild's re-enqueues made ready (see [`RedisQueue::on_rebuilt`]).
    rebuilt: Mutex<Option<RebuildListener>>,
    /// Whether Redis answered; while it does not, calls fail fast (see [`Link`]).
    link: Arc<Link>,
    last_error: Mutex<Option<String>>,
    rebuilds: AtomicU64,
    /// The latest engine instant any call carried: a rebuild started by a call that carries
    /// none (`live`, `snapshot`, ...) re-enqueues at this instant, not at zero (which would
    /// bring every due run back as delayed).
    latest_now: AtomicU64,
    url: String,
    delete_on_drop: bool,
    /// Concurrent enqueues sharing script calls (see [`crate::combine`]).
    enqueues: Combine,
    /// Script calls made for enqueues (one per run alone, one per batch) and their time.
    enqueue_calls: Timed,
    /// Claim calls and their time.
    claim_calls: Timed,
}

/// Calls of one kind and the time they took, from sending to the parsed answer (benchmarks
/// read them: `runlane bench` reports the mean).
#[derive(Default)]
struct Timed {
    calls: AtomicU64,
    micros: AtomicU64,
}

impl Timed {
    /// Counts a call that began at `started`.
    fn add(&self, started: Instant) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn micros(&self) -> u64 {
        self.micros.load(Ordering::Relaxed)
    }
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        if self.delete_on_drop {
            // Best effort: a test or benchmark key space that outlives its process is only
            // garbage under a unique prefix.
            let _ = delete_keys_blocking(&self.url, &self.base);
        }
    }
}

/// One page of a SCAN walk: `SCAN cursor MATCH pattern COUNT count`.
fn scan_page(cursor: u64, pattern: &str, count: u32) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count);
    cmd
}

/// Deletes every key under `base` (SCAN + DEL, never FLUSH) over a short-lived connection.
fn delete_keys_blocking(url: &str, base: &str) -> redis::RedisResult<u64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let pattern = format!("{}:*", glob_escape(base));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) =
            scan_page(cursor, &pattern, 1000).query(&mut conn)?;
        if !keys.is_empty() {
            deleted += redis::cmd("DEL").arg(&keys).query::<u64>(&mut conn)?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Escapes glob metacharacters of a SCAN pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The dispatch library's source: a Redis function library (`FUNCTION LOAD`) whose name and
/// function name are filled in by [`Library::new`].
const SCRIPT: &str = include_str!("dispatch.lua");

/// The dispatch library as loaded: named after a hash of its source, so processes of different
/// versions sharing one server never replace each other's library (each keeps its own, like
/// the script cache kept each version's script).
struct Library {
    /// `<library name>_dispatch`.
    function: String,
    source: String,
}

impl Library {
    fn new() -> Self {
        // FNV-1a (64 bits) of the source: a name per version, not a security measure.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in SCRIPT.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let name = format!("runlane_{hash:016x}");
        let function = format!("{name}_dispatch");
        let source = SCRIPT
            .replace("__RUNLANE_LIBRARY__", &name)
            .replace("__RUNLANE_FUNCTION__", &function);
        Library { function, source }
    }

    /// Loads (or reloads) the library on the server.
    async fn load(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.source)
            .query_async::<String>(conn)
            .await
            .map(|_| ())
    }
}

/// Whether a call failed because the server does not know the function (it restarted without
/// persistence, or its functions were flushed): the library is loaded again.
pub(crate) fn function_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Locks `m`; a holder that panicked left nothing half-written here, so a poisoned lock is taken
/// as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn chain_text(chain: &ClaimChain) -> String {
    let mut s = String::from(if chain.is_wildcard() { "P" } else { "F" });
    for lane in chain.named() {
        s.push('>');
        s.push_str(lane.as_str());
    }
    s
}

/// An argument of a script call.
pub(crate) enum Arg {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(s.to_string())
    }
}
impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(s)
    }
}
impl From<u64> for Arg {
    fn from(n: u64) -> Self {
        Arg::Text(n.to_string())
    }
}
impl From<RunId> for Arg {
    fn from(id: RunId) -> Self {
        Arg::Bytes(id.to_bytes().to_vec())
    }
}
impl From<Vec<u8>> for Arg {
    fn from(b: Vec<u8>) -> Self {
        Arg::Bytes(b)
    }
}

/// At most this many runs go in one script call of a batched operation, so one call never
/// holds Redis for long.
const BATCH_CHUNK: usize = 256;

/// `(run, token)` pairs as script arguments.
fn pair_args(pairs: &[(RunId, FencingToken)]) -> Vec<Arg> {
    let mut args = Vec::with_capacity(pairs.len() * 2);
    for &(run, token) in pairs {
        args.push(Arg::from(run));
        args.push(Arg::from(token.0));
    }
    args
}

/// Why a run is enqueued, as a script argument: `'0'` a trigger, `'1'` a sync trigger, `'a'`
/// a run already accepted (the script applies no `max_queued` to it).
fn why_arg(why: EnqueueAs) -> Arg {
    match why {
        EnqueueAs::Trigger => "0",
        EnqueueAs::SyncTrigger => "1",
        EnqueueAs::Accepted => "a",
    }
    .into()
}

/// A run's enqueue outcome from the library's code and value (`ok` with the placement, or a
/// refusal).
fn placement(code: &str, value: Option<&Value>, d: &Dispatch) -> Result<Placement, QueueError> {
    match code {
        "ok" => {}
        "unknown_env" => return Err(QueueError::unknown_env(&d.env)),
        "unknown_lane" => return Err(QueueError::unknown_lane(&d.lane)),
        "queue_full" => {
            let max = value.ok_or_else(|| malformed("missing value"))?.int()?;
            return Err(QueueError::QueueFull {
                queue: d.queue.to_string(),
                key: d.key.to_string(),
                max_queued: u32::try_from(max).unwrap_or(0),
            });
        }
        "fast_lane_full" => {
            return Err(QueueError::FastLaneFull {
                env: d.env.to_string(),
                retry_after: FAST_LANE_RETRY_AFTER,
            })
        }
        other => return Err(malformed(other)),
    }
    Ok(
        match value.ok_or_else(|| malformed("missing value"))?.text()? {
            "delayed" => Placement::Delayed,
            "queued" => Placement::Queued,
            _ => Placement::Ready,
        },
    )
}

/// Where a waiting run is, from its dispatch facts, for the dispatch library's lookups of a run
/// without a record (format 3: a list-resident run): env, queue, key and score
/// (`run_after − priority`, ms). Nothing when the caller has no facts (the library then reads
/// every key's list).
fn at_args(d: Option<&Dispatch>) -> Vec<Arg> {
    match d {
        None => Vec::new(),
        Some(d) => {
            let score = i128::from(d.run_after.as_millis()) - i128::from(ms(d.priority));
            vec![
                d.env.as_str().into(),
                d.queue.as_str().into(),
                (&*d.key).into(),
                score.to_string().into(),
            ]
        }
    }
}

fn opt_arg(v: Option<u32>) -> Arg {
    v.map_or(Arg::Text(String::new()), |n| Arg::from(u64::from(n)))
}

/// A decoded answer: code, effects, extra values.
struct Answer {
    code: String,
    effects: Effects,
    extra: Vec<Value>,
}

impl Answer {
    fn extra(&self, i: usize) -> Result<&Value, QueueError> {
        self.extra.get(i).ok_or_else(|| malformed("missing value"))
    }
}

fn parse_answer(bytes: &[u8]) -> Result<Answer, QueueError> {
    let v = record::decode(bytes)?;
    let mut items = match v {
        Value::Array(a) => a,
        _ => return Err(malformed("answer is not an array")),
    };
    if items.len() < 4 {
        return Err(malformed("short answer"));
    }
    let extra = items.split_off(4);
    let code = items[0].text()?.to_string();
    let mut effects = Effects::default();
    let moved = items[1].list()?;
    for pair in moved.chunks(2) {
        if let [id, status] = pair {
            effects.moved.push((run_id(id)?, record::status(status)?));
        }
    }
    for lane in items[2].list()? {
        let lane = LaneName::new(lane.text()?).map_err(|_| malformed("lane name"))?;
        if !effects.ready_lanes.contains(&lane) {
            effects.ready_lanes.push(lane);
        }
    }
    let deadline = items[3].int()?;
    effects.deadline = u64::try_from(deadline).ok().map(Timestamp);
    Ok(Answer {
        code,
        effects,
        extra,
    })
}

impl RedisQueue {
    /// Connects, checks (or creates) the key space and its format version.
    pub async fn open(config: RedisConfig) -> Result<Self, RedisOpenError> {
        let prefix = config.prefix.clone();
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace())
        {
            return Err(RedisOpenError::Prefix(prefix));
        }
        let address = display_address(&config.url);
        let unreachable = |e: redis::RedisError| RedisOpenError::Unreachable {
            address: address.clone(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(config.url.as_str()).map_err(unreachable)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(config.response_timeout)
            .set_response_timeout(config.response_timeout)
            .set_number_of_retries(2)
            .set_factor(50)
            .set_max_delay(1000);
        let mut conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(unreachable)?;
        let library = Library::new();
        library.load(&mut conn).await.map_err(unreachable)?;
        let queue = RedisQueue {
            conn,
            library,
            base: format!("{{{prefix}}}"),
            ready_timeout_ms: ms(config.ready_timeout).to_string(),
            address: address.clone(),
            generation: Mutex::new(String::new()),
            replay: Mutex::new(Replay::default()),
            store: Mutex::new(None),
            rebuild_lock: tokio::sync::Mutex::new(()),
            rebuilt: Mutex::new(None),
            link: Arc::new(Link::default()),
            last_error: Mutex::new(None),
            rebuilds: AtomicU64::new(0),
            latest_now: AtomicU64::new(0),
            url: config.url.clone(),
            delete_on_drop: false,
            enqueues: Combine::default(),
            enqueue_calls: Timed::default(),
            claim_calls: Timed::default(),
        };
        match queue.init(false).await {
            Ok(_) => Ok(queue),
            Err(InitError::Format(found)) => Err(RedisOpenError::Format {
                prefix,
                found,
                expected: KEYSPACE_FORMAT,
            }),
            Err(InitError::Queue(e)) => Err(RedisOpenError::Unreachable {
                address,
                reason: e.to_string(),
            }),
        }
    }

    /// Script calls made for enqueues since open: one per run enqueued alone, one per batch
    /// of concurrent enqueues (see [`crate::combine`]).
    pub fn enqueue_calls(&self) -> u64 {
        self.enqueue_calls.calls()
    }

    /// The time the enqueue script calls took since open, summed, in µs (from sending to the
    /// parsed answer, so a call waiting behind other clients' calls in Redis counts that wait).
    pub fn enqueue_micros(&self) -> u64 {
        self.enqueue_calls.micros()
    }

    /// `claim` calls made since open (claims riding on an enqueue are not among them).
    pub fn claim_calls(&self) -> u64 {
        self.claim_calls.calls()
    }

    /// The time the `claim` calls took since open, summed, in µs (as [`Self::enqueue_micros`]).
    pub fn claim_micros(&self) -> u64 {
        self.claim_calls.micros()
    }

    /// The leases of a claim's answer (`{ id, record }` per leased run).
    fn leases(value: &Value) -> Result<Vec<Leased>, QueueError> {
        Self::records(value.list()?)?
            .into_iter()
            .map(Self::lease_of)
            .collect()
    }

    /// The lease a claimed run's record holds.
    fn lease_of(rec: record::Record) -> Result<Leased, QueueError> {
        let (Some(token), Some(lease_deadline)) = (rec.token, rec.lease_deadline) else {
            return Err(malformed("claimed run without lease"));
        };
        Ok(Leased {
            dispatch: rec.dispatch,
            token: FencingToken(token),
            lease_deadline,
            attempt_deadline: rec.attempt_deadline,
        })
    }

    /// The leases a doorbell entry delivers (its `o` field): made by an enqueue for workloops'
    /// parked offers ([`QueueBackend::parks_offers`]), each with what the run's trigger handed.
    pub fn deliveries(bytes: &[u8]) -> Result<Vec<Delivery>, QueueError> {
        let value = record::decode(bytes)?;
        let mut out = Vec::new();
        for offer in value.list()? {
            let [consumer, seq, runs] = offer.list()? else {
                return Err(malformed("delivery"));
            };
            let mut leased = Vec::new();
            for run in runs.list()? {
                let [id, raw, handed] = run.list()? else {
                    return Err(malformed("delivered run"));
                };
                let lease = Self::lease_of(unpack(run_id(id)?, raw.bytes()?)?)?;
                let handed = if handed.truthy() {
                    Some(handed.bytes()?.to_vec())
                } else {
                    None
                };
                leased.push((lease, handed));
            }
            let int = |v: &Value| u64::try_from(v.int()?).map_err(|_| malformed("negative id"));
            out.push(Delivery {
                consumer: ConsumerId(int(consumer)?),
                seq: int(seq)?,
                runs: leased,
            });
        }
        Ok(out)
    }

    /// One `claim` script call: `steps` on the workloop's parked offer (`''`: none), then the
    /// claim (timed in [`Self::claim_micros`]).
    async fn claim_call(
        &self,
        request: &ClaimRequest,
        steps: String,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let started = Instant::now();
        let answer = self
            .call("claim", now, || {
                let mut args = vec![Arg::from(steps.as_str())];
                Self::claim_args(request, &mut args);
                args
            })
            .await;
        self.claim_calls.add(started);
        Self::leases(answer?.extra(0)?)
    }

    /// A claim's arguments after the op: worker, chain, max, lease, then env and version pairs.
    fn claim_args(request: &ClaimRequest, args: &mut Vec<Arg>) {
        args.push(request.worker.0.to_string().into());
        args.push(chain_text(&request.chain).into());
        args.push(u64::from(request.max).into());
        args.push(ms(request.lease).into());
        for served in &request.envs {
            args.push(served.env.as_str().into());
            args.push(u64::from(served.version).into());
        }
    }
    /// An enqueue that joins concurrent ones ([`crate::combine`]); alone, in its own call
    /// with `handed`.
    async fn enqueue_sending(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        handed: Option<&[u8]>,
    ) -> Result<Enqueued, QueueError> {
        let rest = match self.enqueues.join(&dispatch, why, now) {
            Joined::Lead => Vec::new(),
            Joined::Wait(turn) => match turn.await {
                Ok(Turn::Done(answer)) => return answer,
                Ok(Turn::Lead(rest)) => rest,
                // The call that held this run went away unanswered; enqueue is idempotent by
                // run id, so a run it did place is answered as placed.
                Err(_) => return self.enqueue_alone(&dispatch, why, now, None).await,
            },
        };
        let _leading = Leading(&self.enqueues);
        if rest.is_empty() {
            return self.enqueue_alone(&dispatch, why, now, handed).await;
        }
        self.enqueue_with(dispatch, why, now, rest).await
    }

    /// One run's enqueue in its own script call (`handed` goes with a lease a parked offer
    /// takes).
    async fn enqueue_alone(
        &self,
        dispatch: &Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        handed: Option<&[u8]>,
    ) -> Result<Enqueued, QueueError> {
        Ok(self.enqueue_call(dispatch, why, now, None, handed).await?.0)
    }

    /// One run's enqueue in its own script call, with the claim of `claim` made in the same
    /// step once the run is placed (its leases are answered beside the enqueue's outcome;
    /// its in-process offer's parked twin, if any, is taken with it). Parked offers of other
    /// workloops then take what stays ready.
    async fn enqueue_call(
        &self,
        dispatch: &Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        claim: Option<(&ClaimRequest, Option<ParkedOffer>)>,
        handed: Option<&[u8]>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let packed = record::pack_new(dispatch);
        let started = Instant::now();
        let answer = self
            .call("enqueue", now, || {
                let mut args = vec![
                    dispatch.run_id.into(),
                    packed.clone().into(),
                    why_arg(why),
                    // '' = parked offers take nothing; '!' = they do, nothing sent.
                    Arg::from(match handed {
                        None => Vec::new(),
                        Some([]) => b"!".to_vec(),
                        Some(h) => h.to_vec(),
                    }),
                ];
                if let Some((request, parked)) = claim {
                    args.push(Arg::from(
                        parked.map_or_else(String::new, |(c, seq)| format!("{} {seq}", c.0)),
                    ));
                    Self::claim_args(request, &mut args);
                }
                args
            })
            .await;
        self.enqueue_calls.add(started);
        let answer = answer?;
        let placement = placement(&answer.code, answer.extra.first(), dispatch)?;
        let leases = match claim {
            Some(_) => Self::leases(answer.extra(1)?)?,
            None => Vec::new(),
        };
        Ok((
            Enqueued {
                placement,
                effects: answer.effects,
            },
            leases,
        ))
    }

    /// The leading caller's run and the waiting ones, in one batch: each caller gets its run's
    /// outcome and its part of the effects ([`Effects::split`]). The batch's instant is the
    /// latest of its callers'.
    async fn enqueue_with(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        rest: Vec<Waiter>,
    ) -> Result<Enqueued, QueueError> {
        let now = rest.iter().map(|w| w.now).fold(now, Timestamp::max);
        let mut items = Vec::with_capacity(rest.len() + 1);
        items.push((dispatch, why));
        items.extend(rest.iter().map(|w| (w.dispatch.clone(), w.why)));
        let mut answers: Vec<Result<Enqueued, QueueError>> =
            match self.enqueue_many(&items, now).await {
                Ok((placements, effects)) => {
                    let placed: Vec<(RunId, &LaneName)> = items
                        .iter()
                        .zip(&placements)
                        .filter(|(_, p)| p.is_ok())
                        .map(|((d, _), _)| (d.run_id, &d.lane))
                        .collect();
                    let mut parts = effects.split(&placed).into_iter();
                    placements
                        .into_iter()
                        .map(|p| {
                            p.map(|placement| Enqueued {
                                placement,
                                effects: parts.next().unwrap_or_default(),
                            })
                        })
                        .collect()
                }
                Err(e) => vec![Err(e); items.len()],
            };
        let others = answers.split_off(1);
        for (waiter, answer) in rest.into_iter().zip(others) {
            waiter.answer(answer);
        }
        answers
            .pop()
            .unwrap_or_else(|| Err(malformed("batch answer count")))
    }

    /// Enqueues many runs, each as [`QueueBackend::enqueue`] and in order, with one script
    /// call per [`BATCH_CHUNK`] runs: each run's placement or refusal, and the calls' effects.
    /// A call that fails fails its runs and the later ones (earlier calls stand), or the whole
    /// when it is the first.
    pub async fn enqueue_many(
        &self,
        items: &[(Dispatch, EnqueueAs)],
        now: Timestamp,
    ) -> Result<(Vec<Result<Placement, QueueError>>, Effects), QueueError> {
        let mut out = Vec::with_capacity(items.len());
        let mut effects = Effects::default();
        for chunk in items.chunks(BATCH_CHUNK) {
            let packed: Vec<Vec<u8>> = chunk.iter().map(|(d, _)| record::pack_new(d)).collect();
            let started = Instant::now();
            let done = self
                .call("enqueue_many", now, || {
                    let mut args: Vec<Arg> = Vec::with_capacity(chunk.len() * 3);
                    for ((d, why), p) in chunk.iter().zip(&packed) {
                        args.push(d.run_id.into());
                        args.push(p.clone().into());
                        args.push(why_arg(*why));
                    }
                    args
                })
                .await;
            self.enqueue_calls.add(started);
            let parsed = done.and_then(|answer| {
                if answer.code != "ok" {
                    return Err(malformed(&answer.code));
                }
                let codes = answer.extra(0)?.list()?;
                if codes.len() != chunk.len() {
                    return Err(malformed("batch answer count"));
                }
                let mut placed = Vec::with_capacity(chunk.len());
                for (code, (d, _)) in codes.iter().zip(chunk) {
                    let pair = code.list()?;
                    let code = pair.first().ok_or_else(|| malformed("batch answer"))?;
                    placed.push(placement(code.text()?, pair.get(1), d));
                }
                Ok((placed, answer.effects))
            });
            match parsed {
                Ok((placed, answer_effects)) => {
                    out.extend(placed);
                    effects.merge(answer_effects);
                }
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    out.resize(items.len(), Err(e));
                    break;
                }
            }
        }
        Ok((out, effects))
    }

    /// Starts, in a task of its own, the once-per-key-space tidy of queue key hashes that a
    /// library of this key-space format left behind before a key's state went with its runs (a
    /// served key's stamp, a drained list's bookkeeping and key id, zero counters, kept for
    /// good): it walks `{base}:k:*` with SCAN in pages and has the script drop, from each hash
    /// whose key has no queued run, what such a key no longer keeps (the hash goes with its last
    /// field). A key space created by this build, or already tidied, is marked (`{base}:cfg`
    /// field `tidy`) and not walked. The walk ends with the queue (a later open walks again);
    /// a failure is logged and leaves the mark unset.
    pub fn tidy_key_state(queue: &Arc<RedisQueue>) {
        let queue = Arc::downgrade(queue);
        tokio::spawn(async move {
            match Self::tidy(queue).await {
                Ok(Some(n)) => tracing::info!(hashes = n, "queue key state tidied"),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "queue key state not tidied (next open tries again)")
                }
            }
        });
    }

    /// The walk of [`Self::tidy_key_state`]: `None` when there was nothing to walk (marked, or
    /// the queue dropped), else how many hashes the script tidied.
    async fn tidy(queue: std::sync::Weak<RedisQueue>) -> Result<Option<u64>, QueueError> {
        let (mut conn, cfg, pattern) = match queue.upgrade() {
            Some(q) => (
                q.conn.clone(),
                format!("{}:cfg", q.base),
                format!("{}:k:*", glob_escape(&q.base)),
            ),
            None => return Ok(None),
        };
        let unavailable = |e: redis::RedisError| QueueError::Unavailable(e.to_string());
        let marked: Option<String> = redis::cmd("HGET")
            .arg(&cfg)
            .arg("tidy")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if marked.is_some() {
            return Ok(None);
        }
        let mut tidied = 0u64;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = scan_page(cursor, &pattern, 500)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                let Some(q) = queue.upgrade() else {
                    return Ok(None);
                };
                let answer = q
                    .call("tidy_keys", Timestamp::ZERO, || {
                        keys.iter().map(|k| Arg::Bytes(k.clone())).collect()
                    })
                    .await?;
                tidied += u64::try_from(answer.extra(0)?.int()?).unwrap_or(0);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        redis::cmd("HSET")
            .arg(&cfg)
            .arg("tidy")
            .arg(1)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Some(tidied))
    }

    /// Deletes every key of this deployment (SCAN + DEL under `{prefix}:`) when the backend is
    /// dropped. For tests and benchmarks that use a throwaway prefix.
    pub fn delete_keys_on_drop(mut self) -> Self {
        self.delete_on_drop = true;
        self
    }

    /// Deletes every key of this deployment now (SCAN + DEL under `{prefix}:`, never FLUSH);
    /// returns how many keys were deleted.
    pub async fn delete_keys(&self) -> Result<u64, QueueError> {
        let (url, base) = (self.url.clone(), self.base.clone());
        tokio::task::spawn_blocking(move || delete_keys_blocking(&url, &base))
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    /// Attaches the run store the key space is rebuilt from when it is found lost.
    pub fn attach_store(&self, store: Arc<dyn RunStore>) {
        *lock(&self.store) = Some(store);
    }

    /// Sets who is told, after each rebuild, the effects of its re-enqueues: the lanes that
    /// received ready runs and the earliest deadline. The call that found the key space lost
    /// answers only for itself, so without this nobody would ring those lanes' doorbells or
    /// re-arm the timer for the re-enqueued delayed runs, and idle workers (which never poll)
    /// would leave them waiting.
    pub fn on_rebuilt(&self, listener: impl Fn(Effects) + Send + Sync + 'static) {
        *lock(&self.rebuilt) = Some(Arc::new(listener));
    }

    /// The earliest deadline, read by the deployment's timer owner for its timer: the script
    /// records it (`{p}:cfg.tarm`) so that [`RedisQueue::announce`] can tell other processes
    /// whether a deadline they created is earlier than what the owner sleeps until.
    pub async fn next_deadline_armed(&self) -> Result<Option<Timestamp>, QueueError> {
        let answer = self
            .call("next_deadline", Timestamp::ZERO, || vec!["arm".into()])
            .await?;
        Ok(answer.effects.deadline)
    }

    /// Whether the timer owner must hear of `deadline` (a deadline a call of this process
    /// created): true when it is earlier than the deadline the owner last armed (or none is
    /// recorded), in which case it is recorded as the owner's next wake-up; the caller then
    /// announces it.
    pub async fn announce(&self, deadline: Timestamp) -> Result<bool, QueueError> {
        let answer = self
            .call("announce", Timestamp::ZERO, || {
                vec![deadline.as_millis().to_string().into()]
            })
            .await?;
        Ok(answer.extra(0)?.int()? == 1)
    }

    /// The name of the dispatch library this build loads (tests).
    #[cfg(test)]
    pub(crate) fn library_name(&self) -> &str {
        self.library
            .function
            .strip_suffix("_dispatch")
            .unwrap_or(&self.library.function)
    }

    /// The key base, `{prefix}`: every key of this deployment starts with it.
    pub fn key_base(&self) -> &str {
        &self.base
    }

    /// A handle on this backend's one multiplexed connection (clones share it and its
    /// reconnection), for the process's other non-blocking Redis traffic: one connection
    /// carries it all. Never use it for blocking commands or subscriptions.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The connection state.
    pub fn health(&self) -> RedisHealth {
        RedisHealth {
            connected: self.link.up(),
            last_error: lock(&self.last_error).clone(),
            rebuilds: self.rebuilds.load(Ordering::Relaxed),
        }
    }

    /// Creates the configuration hash when missing (marked as being rebuilt when `rebuild`);
    /// returns whether it did, and whether the key space is marked as being rebuilt.
    async fn init(&self, rebuild: bool) -> Result<(bool, bool), InitError> {
        let fresh_gen = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut args: Vec<Arg> = vec![fresh_gen.into(), (if rebuild { "1" } else { "0" }).into()];
        for lane in LaneName::BUILT_IN {
            args.push(lane.into());
        }
        let answer = self.raw("init", Timestamp::ZERO, "", args).await?;
        match answer.code.as_str() {
            "ok" => {
                let generation = answer.extra(0)?.text()?.to_string();
                let created = answer.extra(1)?.int()? == 1;
                let rebuilding = answer.extra(2)?.int()? == 1;
                *lock(&self.generation) = generation;
                Ok((created, rebuilding))
            }
            "format" => Err(InitError::Format(
                answer
                    .extra(0)
                    .and_then(|v| v.text().map(str::to_string))
                    .unwrap_or_default(),
            )),
            other => Err(InitError::Queue(malformed(other))),
        }
    }

    async fn raw(
        &self,
        op: &str,
        now: Timestamp,
        generation: &str,
        args: Vec<Arg>,
    ) -> Result<Answer, QueueError> {
        if !self.link.up() {
            // Known down: fail at once instead of waiting out the connection's own retries
            // (seconds per call), so a distributed trigger costs only its PostgreSQL commit
            // during an outage. The probe finds out when Redis answers again.
            self.link.probe(&self.conn);
            let last = lock(&self.last_error).clone().unwrap_or_default();
            return Err(QueueError::Unavailable(format!(
                "redis at {} is unreachable; calls fail fast until it answers again ({last})",
                self.address
            )));
        }
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg(&self.library.function)
            .arg(1)
            .arg(&self.base)
            .arg(op)
            .arg(now.as_millis())
            .arg(&self.ready_timeout_ms)
            .arg(KEYSPACE_FORMAT)
            .arg(generation);
        for a in &args {
            match a {
                Arg::Text(s) => fcall.arg(s.as_str()),
                Arg::Bytes(b) => fcall.arg(b.as_slice()),
            };
        }
        let mut conn = self.conn.clone();
        let mut result = fcall.query_async::<Vec<u8>>(&mut conn).await;
        if matches!(&result, Err(e) if function_missing(e)) {
            result = match self.library.load(&mut conn).await {
                Ok(()) => fcall.query_async::<Vec<u8>>(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(bytes) => parse_answer(&bytes),
            Err(e) => {
                let text = format!("redis at {}: {e}", self.address);
                let io = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error();
                *lock(&self.last_error) = Some(text.clone());
                if io {
                    self.link.down();
                    self.link.probe(&self.conn);
                }
                Err(QueueError::Unavailable(text))
            }
        }
    }

    /// Runs `op`, rebuilding the key space first when it was lost.
    async fn call(
        &self,
        op: &str,
        now: Timestamp,
        args: impl Fn() -> Vec<Arg>,
    ) -> Result<Answer, QueueError> {
        let latest = self
            .latest_now
            .fetch_max(now.0, Ordering::Relaxed)
            .max(now.0);
        for _ in 0..3 {
            let generation = lock(&self.generation).clone();
            let answer = self.raw(op, now, &generation, args()).await?;
            match answer.code.as_str() {
                "lost" => self.rebuild(Timestamp(latest)).await?,
                "generation" => {
                    let generation = answer.extra(0)?.text()?.to_string();
                    *lock(&self.generation) = generation.clone();
                    // Another process rebuilt the key space: it restored its own lanes and
                    // consumers, not this process's. Put them back before going on, or runs of
                    // a lane only this process added are refused, and a lane only its workers
                    // claim looks orphaned.
                    self.replay_membership(Timestamp(latest), &generation)
                        .await?;
                }
                "format"
                    if answer
                        .extra(0)
                        .and_then(|v| v.text())
                        .is_ok_and(|f| PREVIOUS_FORMATS.contains(&f)) =>
                {
                    // Written by an older process (e.g. its rebuild): `init` migrates it.
                    match self.init(false).await {
                        Ok(_) | Err(InitError::Format(_)) => {}
                        Err(InitError::Queue(e)) => return Err(e),
                    }
                }
                "format" => {
                    return Err(QueueError::Unavailable(format!(
                        "redis key space {} has format version {}, this build reads and writes version {KEYSPACE_FORMAT}",
                        self.base,
                        answer.extra(0).and_then(|v| v.text()).unwrap_or("?")
                    )))
                }
                _ => return Ok(answer),
            }
        }
        Err(QueueError::Unavailable(
            "redis key space keeps changing generation".to_string(),
        ))
    }

    /// Adds this process's lanes and restores its consumers (both idempotent), in a key space
    /// another process rebuilt.
    async fn replay_membership(&self, now: Timestamp, generation: &str) -> Result<(), QueueError> {
        let (lanes, consumers) = {
            let r = lock(&self.replay);
            (r.lanes.clone(), r.consumers.clone())
        };
        for lane in &lanes {
            self.raw("add_lane", now, generation, vec![lane.as_str().into()])
                .await?;
        }
        for (id, chain) in &consumers {
            let args = vec![Arg::from(*id), chain.clone().into()];
            self.raw("restore_consumer", now, generation, args).await?;
        }
        Ok(())
    }

    /// Rebuilds a lost key space: configuration, envs, queues, lanes, consumers, then every
    /// unfinished run of the attached store, re-enqueued with its original order (scores).
    async fn rebuild(&self, now: Timestamp) -> Result<(), QueueError> {
        let _guard = self.rebuild_lock.lock().await;
        let (created, rebuilding) = match self.init(true).await {
            Ok(answer) => answer,
            Err(InitError::Queue(e)) => return Err(e),
            Err(InitError::Format(found)) => {
                return Err(QueueError::Unavailable(format!(
                    "redis key space format {found} is not {KEYSPACE_FORMAT}"
                )))
            }
        };
        // Another caller finished the rebuild while this one waited: nothing to do. A key space
        // still marked as being rebuilt (its rebuilder died, or another process is at it) is
        // rebuilt again: every step is idempotent.
        if !created && !rebuilding {
            return Ok(());
        }
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(base = %self.base, "redis key space lost; rebuilding from the run store");
        let store = lock(&self.store).clone();
        let (mut envs, mut queues, lanes, consumers) = {
            let r = lock(&self.replay);
            (
                r.envs.clone(),
                r.queues.clone(),
                r.lanes.clone(),
                r.consumers.clone(),
            )
        };
        if let Some(store) = &store {
            let stored = store
                .envs()
                .await
                .map_err(|e| QueueError::Unavailable(format!("rebuild: {e}")))?;
            for (env, settings) in stored {
                envs.entry(env).or_insert(settings);
            }
            // Queue settings another process set (a pause, an admin limit) are in the store,
            // not in this process's replay: the stored ones win, and a limit they leave unset
            // keeps the one this process had put (a version's limit applied at open).
            let stored = store
                .queue_settings_all()
                .await
                .map_err(|e| QueueError::Unavailable(format!("rebuild: {e}")))?;
            for (env, queue, settings) in stored {
                let merged = match queues.get(&(env.clone(), queue.clone())) {
                    Some(held) => merge_queue_settings(&settings, held),
                    None => settings,
                };
                queues.insert((env, queue), merged);
            }
        }
        for (env, settings) in &envs {
            self.raw_checked("put_env", now, put_env_args(env, settings))
                .await?;
        }
        for ((env, queue), settings) in &queues {
            self.raw_checked("put_queue", now, put_queue_args(env, queue, settings))
                .await?;
        }
        for lane in &lanes {
            self.raw_checked("add_lane", now, vec![lane.as_str().into()])
                .await?;
        }
        for (id, chain) in &consumers {
            self.raw_checked(
                "restore_consumer",
                now,
                vec![Arg::from(*id), chain.clone().into()],
            )
            .await?;
        }
        let mut effects = Effects::default();
        if let Some(store) = store {
            let mut runs = store
                .unfinished()
                .await
                .map_err(|e| QueueError::Unavailable(format!("rebuild: {e}")))?;
            runs.sort_by_key(|r| r.id);
            // Every lane a stored run names existed when it was triggered, though perhaps only
            // another process added it: without it the run's enqueue would be refused and the
            // run would wait in the store for ever.
            let known: BTreeSet<&LaneName> = lanes.iter().collect();
            let missing: BTreeSet<LaneName> = runs
                .iter()
                .map(|r| r.lane.clone())
                .filter(|l| !known.contains(l))
                .collect();
            for lane in &missing {
                self.raw_checked("add_lane", now, vec![lane.as_str().into()])
                    .await?;
            }
            // Crash point: with `RUNLANE_FAILPOINT=mid_rebuild` the process aborts after
            // re-enqueuing half of the runs (tests that the next process completes it).
            let abort_at = (std::env::var(FAILPOINT_VAR).ok().as_deref() == Some(MID_REBUILD))
                .then_some(runs.len() / 2);
            for (i, run) in runs.into_iter().enumerate() {
                if abort_at == Some(i) {
                    eprintln!("failpoint {MID_REBUILD}: aborting after {i} re-enqueued runs");
                    std::process::abort();
                }
                let d = run.dispatch();
                let id = d.run_id;
                let answer = self
                    .raw_checked(
                        "enqueue",
                        now,
                        vec![
                            id.into(),
                            record::pack_new(&d).into(),
                            why_arg(EnqueueAs::Accepted),
                        ],
                    )
                    .await?;
                if answer.code != "ok" {
                    tracing::warn!(run = %id, code = %answer.code, "rebuild enqueue refused");
                }
                effects.merge(answer.effects);
            }
        }
        self.raw_checked("rebuilt", now, Vec::new()).await?;
        let listener = lock(&self.rebuilt).clone();
        if let Some(listener) = listener {
            listener(effects);
        }
        Ok(())
    }

    /// A call of the rebuild itself: passes the "being rebuilt" mark.
    async fn raw_checked(
        &self,
        op: &str,
        now: Timestamp,
        args: Vec<Arg>,
    ) -> Result<Answer, QueueError> {
        self.raw(op, now, "rebuild", args).await
    }

    async fn call_put_env(
        &self,
        env: &EnvName,
        settings: &EnvSettings,
        now: Timestamp,
    ) -> Result<Answer, QueueError> {
        self.call("put_env", now, || put_env_args(env, settings))
            .await
    }

    async fn call_put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
        now: Timestamp,
    ) -> Result<Answer, QueueError> {
        let answer = self
            .call("put_queue", now, || put_queue_args(env, queue, settings))
            .await?;
        if answer.code == "unknown_env" {
            return Err(QueueError::unknown_env(env));
        }
        Ok(answer)
    }

    /// `cancel` with the run's location when the caller knows it (see [`at_args`]).
    async fn cancel_at(
        &self,
        run: RunId,
        at: Option<&Dispatch>,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let answer = self
            .call("cancel", now, || {
                let mut args = vec![run.into(), ms(grace).into()];
                args.extend(at_args(at));
                args
            })
            .await?;
        match answer.code.as_str() {
            "not_found" => Ok(CancelOutcome::NotFound),
            "requested" => Ok(CancelOutcome::Requested {
                token: FencingToken(u64::try_from(answer.extra(0)?.int()?).unwrap_or(0)),
                grace_deadline: Timestamp(u64::try_from(answer.extra(1)?.int()?).unwrap_or(0)),
                first: answer.extra(2)?.int()? == 1,
            }),
            "removed" => Ok(CancelOutcome::Removed {
                was: record::status(answer.extra(0)?)?,
                effects: answer.effects,
            }),
            other => Err(malformed(other)),
        }
    }

    /// `reschedule` with the run's location when the caller knows it (see [`at_args`]).
    async fn reschedule_at(
        &self,
        run: RunId,
        at: Option<&Dispatch>,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let answer = self
            .call("reschedule", now, || {
                let mut args = vec![
                    run.into(),
                    run_after.as_millis().into(),
                    ttl_deadline.map_or(Arg::Text(String::new()), |t| t.as_millis().into()),
                ];
                args.extend(at_args(at));
                args
            })
            .await?;
        match answer.code.as_str() {
            "ok" => Ok(answer.effects),
            "not_found" => Err(QueueError::NotFound(run)),
            "wrong_state" => Err(QueueError::WrongState {
                run,
                status: record::status(answer.extra(0)?)?,
                operation: "reschedule",
            }),
            other => Err(malformed(other)),
        }
    }

    /// `live`: `at` = `None` reads the run's record only; `Some(None)` also reads every key's
    /// list for a list-resident run; `Some(Some(d))` looks in `d`'s key list only.
    async fn live_at(
        &self,
        run: RunId,
        at: Option<Option<&Dispatch>>,
    ) -> Result<Option<LiveRun>, QueueError> {
        let answer = self
            .call("live", Timestamp::ZERO, || {
                let mut args = vec![run.into()];
                match at {
                    None => args.push("-".into()),
                    Some(d) => args.extend(at_args(d)),
                }
                args
            })
            .await?;
        let pair = answer.extra(0)?.list()?;
        match pair {
            [_, raw] => Ok(Some(unpack(run, raw.bytes()?)?.live())),
            _ => Ok(None),
        }
    }

    fn leased_error(code: &str, run: RunId) -> Result<(), QueueError> {
        match code {
            "ok" => Ok(()),
            "not_found" => Err(QueueError::NotFound(run)),
            "stale" => Err(QueueError::StaleToken(run)),
            other => Err(malformed(other)),
        }
    }

    /// The per-run codes of a batched call (`finish_many`, `check_leases`), appended to `out`.
    fn leased_errors(
        answer: &Answer,
        runs: &[(RunId, FencingToken)],
        out: &mut Vec<Result<(), QueueError>>,
    ) -> Result<(), QueueError> {
        if answer.code != "ok" {
            return Err(malformed(&answer.code));
        }
        let codes = answer.extra(0)?.list()?;
        if codes.len() != runs.len() {
            return Err(malformed("batch answer count"));
        }
        for (code, (run, _)) in codes.iter().zip(runs) {
            out.push(Self::leased_error(code.text()?, *run));
        }
        Ok(())
    }

    fn records(list: &[Value]) -> Result<Vec<record::Record>, QueueError> {
        let mut out = Vec::with_capacity(list.len());
        for item in list {
            let pair = item.list()?;
            let [id, raw] = pair else {
                return Err(malformed("record pair"));
            };
            out.push(unpack(run_id(id)?, raw.bytes()?)?);
        }
        Ok(out)
    }
}

pub(crate) fn put_env_args(env: &EnvName, settings: &EnvSettings) -> Vec<Arg> {
    vec![
        Arg::from(env.as_str()),
        Arg::from(u64::from(settings.limit)),
        Arg::from(u64::from(env_cap(settings.limit, settings.burst))),
        Arg::from(u64::from(settings.fast_lane_cap())),
        Arg::from(u64::from(settings.weight)),
        Arg::from(if settings.fast_path { "1" } else { "0" }),
    ]
}

fn put_queue_args(env: &EnvName, queue: &QueueName, settings: &QueueSettings) -> Vec<Arg> {
    vec![
        Arg::from(env.as_str()),
        Arg::from(queue.as_str()),
        opt_arg(settings.limit),
        opt_arg(settings.key_total_limit),
        opt_arg(settings.max_queued),
        Arg::from(if settings.paused { "1" } else { "0" }),
    ]
}

enum InitError {
    Format(String),
    Queue(QueueError),
}

impl From<QueueError> for InitError {
    fn from(e: QueueError) -> Self {
        InitError::Queue(e)
    }
}

/// The address part of a URL, without credentials, for messages.
fn display_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.to_string()
}

fn settings_from(v: &[Value]) -> Result<QueueSettings, QueueError> {
    let opt = |v: &Value| -> Result<Option<u32>, QueueError> {
        let t = v.text()?;
        if t.is_empty() {
            Ok(None)
        } else {
            t.parse::<u32>()
                .map(Some)
                .map_err(|_| malformed("queue setting"))
        }
    };
    if v.len() < 4 {
        return Err(malformed("queue settings"));
    }
    Ok(QueueSettings {
        limit: opt(&v[0])?,
        key_total_limit: opt(&v[1])?,
        max_queued: opt(&v[2])?,
        paused: v[3].text()? == "1",
    })
}

#[async_trait]
impl QueueBackend for RedisQueue {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        settings.validate()?;
        let answer = self.call_put_env(env, &settings, now).await?;
        lock(&self.replay).envs.insert(env.clone(), settings);
        Ok(answer.effects)
    }

    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        settings.validate()?;
        let answer = self.call_put_queue(env, queue, &settings, now).await?;
        lock(&self.replay)
            .queues
            .insert((env.clone(), queue.clone()), settings);
        Ok(answer.effects)
    }

    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        let answer = self
            .call("queue_settings", Timestamp::ZERO, || {
                vec![env.as_str().into(), queue.as_str().into()]
            })
            .await?;
        if answer.code == "unknown_env" {
            return Err(QueueError::unknown_env(env));
        }
        settings_from(&answer.extra)
    }

    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        self.call("add_lane", Timestamp::ZERO, || vec![lane.as_str().into()])
            .await?;
        let mut r = lock(&self.replay);
        if !r.lanes.contains(lane) {
            r.lanes.push(lane.clone());
        }
        Ok(())
    }

    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        let answer = self
            .call("has_lane", Timestamp::ZERO, || vec![lane.as_str().into()])
            .await?;
        Ok(answer.extra(0)?.int()? == 1)
    }

    async fn lanes(&self, now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        let answer = self.call("lanes", now, Vec::new).await?;
        let mut out = Vec::new();
        for item in answer.extra(0)?.list()? {
            let f = item.list()?;
            if f.len() < 4 {
                return Err(malformed("lane info"));
            }
            let orphan = f[3].int()?;
            out.push(LaneInfo {
                name: LaneName::new(f[0].text()?).map_err(|_| malformed("lane name"))?,
                ready: u64::try_from(f[1].int()?).unwrap_or(0),
                consumers: u32::try_from(f[2].int()?).unwrap_or(0),
                orphan_since: u64::try_from(orphan).ok().map(Timestamp),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        let answer = self
            .call("queues", Timestamp::ZERO, || vec![env.as_str().into()])
            .await?;
        if answer.code == "unknown_env" {
            return Err(QueueError::unknown_env(env));
        }
        let mut out = Vec::new();
        for item in answer.extra(0)?.list()? {
            let f = item.list()?;
            if f.len() < 8 {
                return Err(malformed("queue info"));
            }
            out.push(QueueInfo {
                env: env.clone(),
                name: QueueName::new(f[0].text()?).map_err(|_| malformed("queue name"))?,
                settings: settings_from(&f[1..5])?,
                delayed: u64::try_from(f[5].int()?).unwrap_or(0),
                queued: u64::try_from(f[6].int()?).unwrap_or(0),
                running: u64::try_from(f[7].int()?).unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        let answer = self
            .call("env_usage", Timestamp::ZERO, || vec![env.as_str().into()])
            .await?;
        if answer.code == "unknown_env" {
            return Err(QueueError::unknown_env(env));
        }
        Ok(EnvUsage {
            running: u32::try_from(answer.extra(0)?.int()?).unwrap_or(0),
            fast_lane_running: u32::try_from(answer.extra(1)?.int()?).unwrap_or(0),
        })
    }

    /// Concurrent calls share script calls (see [`crate::combine`]); a lone call makes its own
    /// at once.
    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        self.enqueue_sending(dispatch, why, now, None).await
    }

    /// Parked offers work here, but their leases are delivered on the doorbell streams, which
    /// only the distributed shape reads: it says `parks_offers` (alone, this queue does not,
    /// and a process's own triggers take its in-process offers).
    async fn enqueue_handing(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        carried: Option<(&ClaimRequest, Option<ParkedOffer>)>,
        handed: Option<&[u8]>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        match carried {
            Some((claim, parked)) => {
                if claim.max == 0 || !self.enqueues.lead_alone() {
                    return Ok((
                        self.enqueue_sending(dispatch, why, now, handed).await?,
                        Vec::new(),
                    ));
                }
                let _leading = Leading(&self.enqueues);
                self.enqueue_call(&dispatch, why, now, Some((claim, parked)), handed)
                    .await
            }
            None => Ok((
                self.enqueue_sending(dispatch, why, now, handed).await?,
                Vec::new(),
            )),
        }
    }

    async fn claim_parking(
        &self,
        request: &ClaimRequest,
        steps: &OfferSteps,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let seq = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let steps = format!(
            "{} {} {} {} {}",
            steps.consumer.0,
            seq(steps.withdraw.map(|(s, _)| s)),
            if matches!(steps.withdraw, Some((_, true))) {
                1
            } else {
                0
            },
            seq(steps.park.map(|(s, _)| s)),
            steps.park.map_or(0, |(_, until)| until.as_millis()),
        );
        self.claim_call(request, steps, now).await
    }

    /// Alone (no other enqueue of this process in flight), the claim rides on the enqueue's
    /// script call; otherwise the run joins the combined enqueue and nothing is claimed.
    async fn enqueue_claiming(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        claim: &ClaimRequest,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        self.enqueue_handing(dispatch, why, now, Some((claim, None)), None)
            .await
    }

    fn claims_on_enqueue(&self) -> bool {
        true
    }

    /// Concurrent enqueues share script calls ([`crate::combine`]).
    fn combines_enqueues(&self) -> bool {
        true
    }
    fn claims_on_enqueue_now(&self) -> bool {
        !self.enqueues.busy()
    }

    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        if request.max == 0 {
            return Ok(Vec::new());
        }
        self.claim_call(request, String::new(), now).await
    }

    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let answer = self
            .call("heartbeat", now, || {
                let mut args = Vec::new();
                for (run, token) in leases {
                    args.push(Arg::from(*run));
                    args.push(Arg::from(token.0));
                }
                args
            })
            .await?;
        answer
            .extra(0)?
            .list()?
            .iter()
            .map(|v| {
                Ok(match v.text()? {
                    "alive" => LeaseState::Alive,
                    "cancel" => LeaseState::CancelRequested,
                    _ => LeaseState::Lost,
                })
            })
            .collect()
    }

    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        let answer = self
            .call("check_lease", Timestamp::ZERO, || {
                vec![run.into(), token.0.into()]
            })
            .await?;
        Self::leased_error(&answer.code, run)
    }

    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let answer = self
            .call("finish", now, || vec![run.into(), token.0.into()])
            .await?;
        Self::leased_error(&answer.code, run)?;
        Ok(answer.effects)
    }

    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let mut answers = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(BATCH_CHUNK) {
            let checked = match self
                .call("check_leases", Timestamp::ZERO, || pair_args(chunk))
                .await
            {
                Ok(answer) => Self::leased_errors(&answer, chunk, &mut answers),
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                // Earlier chunks keep their answers; the rest fail with the call.
                answers.resize(leases.len(), Err(e));
                break;
            }
        }
        Ok(answers)
    }

    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        let mut answers = Vec::with_capacity(runs.len());
        let mut effects = Effects::default();
        for chunk in runs.chunks(BATCH_CHUNK) {
            let done = self.call("finish_many", now, || pair_args(chunk)).await;
            let parsed = match done {
                Ok(answer) => Self::leased_errors(&answer, chunk, &mut answers)
                    .map(|()| effects.merge(answer.effects)),
                Err(e) => Err(e),
            };
            if let Err(e) = parsed {
                if answers.is_empty() {
                    return Err(e);
                }
                // Earlier chunks are done (their effects stand); the rest fail with the call.
                answers.resize(runs.len(), Err(e));
                break;
            }
        }
        Ok((answers, effects))
    }

    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let answer = self
            .call("retry", now, || {
                vec![run.into(), token.0.into(), run_after.as_millis().into()]
            })
            .await?;
        Self::leased_error(&answer.code, run)?;
        Ok(answer.effects)
    }

    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let answer = self
            .call("release", now, || vec![run.into(), token.0.into()])
            .await?;
        if answer.code == "cancel_requested" {
            return Err(QueueError::CancelRequested(run));
        }
        Self::leased_error(&answer.code, run)?;
        Ok(answer.effects)
    }

    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        self.cancel_at(run, None, grace, now).await
    }

    async fn cancel_of(
        &self,
        dispatch: &Dispatch,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        self.cancel_at(dispatch.run_id, Some(dispatch), grace, now)
            .await
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.reschedule_at(run, None, run_after, ttl_deadline, now)
            .await
    }

    async fn reschedule_of(
        &self,
        dispatch: &Dispatch,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.reschedule_at(
            dispatch.run_id,
            Some(dispatch),
            run_after,
            ttl_deadline,
            now,
        )
        .await
    }

    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        let answer = self.call("tick", now, Vec::new).await?;
        let mut tick = Tick::default();
        for rec in Self::records(answer.extra(0)?.list()?)? {
            tick.expired.push(rec.dispatch);
        }
        for rec in Self::records(answer.extra(1)?.list()?)? {
            let token = FencingToken(rec.token.unwrap_or(0));
            tick.lapsed.push(Lapsed {
                dispatch: rec.dispatch,
                token,
            });
        }
        let pairs = |v: &Value| -> Result<Vec<(RunId, FencingToken)>, QueueError> {
            let mut out = Vec::new();
            for item in v.list()? {
                let p = item.list()?;
                let [id, token] = p else {
                    return Err(malformed("run and token"));
                };
                out.push((
                    run_id(id)?,
                    FencingToken(u64::try_from(token.int()?).unwrap_or(0)),
                ));
            }
            Ok(out)
        };
        tick.timed_out = pairs(answer.extra(2)?)?;
        tick.cancel_elapsed = pairs(answer.extra(3)?)?;
        for id in answer.extra(4)?.list()? {
            tick.ready_returned.push(run_id(id)?);
        }
        tick.expired.sort_by_key(|d| d.run_id);
        tick.lapsed.sort_by_key(|l| l.dispatch.run_id);
        tick.timed_out.sort();
        tick.cancel_elapsed.sort();
        tick.ready_returned.sort();
        tick.effects = answer.effects;
        Ok(tick)
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        let answer = self
            .call("next_deadline", Timestamp::ZERO, Vec::new)
            .await?;
        Ok(answer.effects.deadline)
    }

    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.live_at(run, Some(None)).await
    }

    async fn live_of(&self, dispatch: &Dispatch) -> Result<Option<LiveRun>, QueueError> {
        self.live_at(dispatch.run_id, Some(Some(dispatch))).await
    }

    async fn live_indexed(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.live_at(run, None).await
    }

    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        let answer = self.call("snapshot", Timestamp::ZERO, Vec::new).await?;
        let flat = answer.extra(0)?.list()?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            if let [id, raw] = pair {
                out.push(unpack(run_id(id)?, raw.bytes()?)?.live());
            }
        }
        out.sort_by_key(|r| r.dispatch.run_id);
        Ok(out)
    }

    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        let text = chain_text(chain);
        let answer = self
            .call("register_consumer", now, || vec![text.clone().into()])
            .await?;
        let id = u64::try_from(answer.extra(0)?.int()?).unwrap_or(0);
        lock(&self.replay).consumers.insert(id, text);
        Ok(ConsumerId(id))
    }

    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let answer = self
            .call("unregister_consumer", now, || vec![id.0.into()])
            .await?;
        lock(&self.replay).consumers.remove(&id.0);
        Ok(answer.effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_drop_scheme_and_credentials() {
        assert_eq!(
            display_address("redis://u:secret@127.0.0.1:6379/0"),
            "127.0.0.1:6379/0"
        );
        assert_eq!(display_address("redis+unix:///tmp/r.sock"), "/tmp/r.sock");
    }

    #[test]
    fn chains_encode_mode_and_lanes() {
        assert_eq!(chain_text(&ClaimChain::default_chain()), "P>manual");
        let filter = ClaimChain::Filter(vec![LaneName::fast_lane()]);
        assert_eq!(chain_text(&filter), "F>fast_lane");
    }
}
