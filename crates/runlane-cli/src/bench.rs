//! `runlane bench`: reproducible measurements, one JSON line per result (SPEC §9).
//!
//! Every line carries its settings (scenario, backend, durability, topology, gap, phase, slots,
//! runs, payload size, depth, git revision; `null` where a setting does not apply) so anyone can
//! rerun it. Figures are measured in this process with monotonic clocks; nothing is estimated.
//!
//! Backends: `memory` (nothing durable) and `embedded` (queue state in memory, runs in a fresh
//! SQLite file in a temporary directory, removed afterwards; `synchronous=FULL` unless
//! `--synchronous normal`). Embedded lines also carry the store's size once the measured runs
//! are done (`bytes_per_run`, see [`finish`]).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runlane::core::{EnvSettings, QueueSettings};
use runlane::{
    Engine, EngineBuilder, HandlerError, RunContext, SqliteConfig, SqliteStore, Synchronous,
    TriggerRequest,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::progress::Progress;

/// Settings shared by every scenario.
#[derive(Clone, Debug)]
pub struct Common {
    /// Backend name (`memory` for now).
    pub backend: String,
    /// Runs measured.
    pub runs: u32,
    /// Worker slots.
    pub slots: u32,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Embedded: how hard SQLite syncs on commit (`Full`: durable on return).
    pub synchronous: Synchronous,
    /// Tasks triggering at once in `trigger_only` and `concurrent` (many request handlers of
    /// an application; a durable store group-commits what they send together).
    pub producers: u32,
    /// Distributed: the Redis server (a fresh key prefix per bench run, deleted afterwards).
    pub redis_url: String,
    /// Distributed: the PostgreSQL server (a fresh schema per bench run, dropped afterwards).
    pub database_url: String,
    /// Distributed: the durability of the runs' writes (`Relaxed`: `synchronous_commit off`).
    pub durability: runlane::Durability,
}

/// An engine under measurement, with what its backend needs to be measured and cleaned up.
/// Derefs to the [`Engine`]. Fields drop in order: the engine, then the store, then the data
/// directory is removed.
pub struct Opened {
    engine: Engine,
    /// Embedded: the run store, for its size.
    store: Option<Arc<SqliteStore>>,
    /// Embedded: the fresh data directory (held for its removal on drop).
    _dir: Option<DataDir>,
    /// `none` (memory) or the SQLite `synchronous` setting.
    durability: &'static str,
    /// Distributed: the shape's handle (its reconciler is stopped once the line is done).
    distributed: Option<runlane::Distributed>,
}

impl Deref for Opened {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// A fresh temporary directory, removed (with everything in it) when dropped.
pub(crate) struct DataDir(PathBuf);

impl DataDir {
    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn fresh() -> anyhow::Result<DataDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("runlane-bench-{}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid would not be a fresh file.
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the data directory {}", path.display()))?;
        Ok(DataDir(path))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

fn durability_name(s: Synchronous) -> &'static str {
    match s {
        Synchronous::Off => "off",
        Synchronous::Normal => "normal",
        Synchronous::Full => "full",
        Synchronous::Extra => "extra",
    }
}

async fn open_embedded(common: &Common) -> anyhow::Result<Opened> {
    let dir = DataDir::fresh()?;
    let config = SqliteConfig {
        synchronous: common.synchronous,
        ..SqliteConfig::default()
    };
    let store = runlane::open_sqlite(dir.0.join("bench.db"), config).await?;
    let engine = runlane::embedded_on(EngineBuilder::new(), store.clone()).await?;
    Ok(Opened {
        engine,
        store: Some(store),
        _dir: Some(dir),
        durability: durability_name(common.synchronous),
        distributed: None,
    })
}

/// The distributed shape on the given servers, under a fresh key prefix and schema, both
/// removed when the engine is dropped.
async fn open_distributed(common: &Common) -> anyhow::Result<Opened> {
    let (prefix, schema) = fresh_distributed_names();
    open_distributed_at(common, &prefix, &schema).await
}

/// A key prefix and schema no other bench run uses.
pub(crate) fn fresh_distributed_names() -> (String, String) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}_{n}", std::process::id());
    (format!("rl:bench:{tag}"), format!("rl_bench_{tag}"))
}

/// The distributed shape under the given key prefix and schema, both removed when the engine
/// is dropped.
pub(crate) async fn open_distributed_at(
    common: &Common,
    prefix: &str,
    schema: &str,
) -> anyhow::Result<Opened> {
    let mut config = runlane::DistributedConfig::new(&common.redis_url, &common.database_url);
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.durability = common.durability;
    config.throwaway = true;
    let distributed = runlane::distributed_with(EngineBuilder::new(), config).await?;
    Ok(Opened {
        engine: distributed.engine().clone(),
        store: None,
        _dir: None,
        durability: match common.durability {
            runlane::Durability::Strict => "strict",
            runlane::Durability::Relaxed => "relaxed",
        },
        distributed: Some(distributed),
    })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Completes a result line and closes the engine: fills in every setting the scenario did not
/// set (`null` where it does not apply) and the durability in force; for `embedded`, adds the
/// run store's size now that the measured runs are done:
/// - `bytes_per_run` = `SqliteStore::size()`'s `(page_count − freelist_count) × page_size`
///   (the database as committed, WAL frames included: no checkpoint needed) divided by the
///   runs stored (warm-up and backlog runs included: they are in the file too);
/// - `db_file_bytes` / `wal_file_bytes`: the files on disk at that moment, for reference.
pub async fn finish(opened: Opened, mut line: Value) -> anyhow::Result<Value> {
    if let Some(fields) = line.as_object_mut() {
        fields.insert("durability".into(), json!(opened.durability));
        // Whether this process could get transparent huge pages (`RUNLANE_THP`).
        fields.insert("huge_pages".into(), json!(crate::thp::enabled()));
        for key in ["topology", "gap_ms", "phase", "depth"] {
            fields.entry(key).or_insert(Value::Null);
        }
        // One run per trigger call unless the scenario batches.
        fields.entry("batch").or_insert(json!(1));
        if let Some(store) = &opened.store {
            let size = store.size().await?;
            let used = size.bytes.saturating_sub(size.free_bytes);
            let per_run = if size.runs > 0 {
                json!((used as f64 / size.runs as f64).round() as u64)
            } else {
                Value::Null
            };
            let db = store.path().to_path_buf();
            let wal = PathBuf::from(format!("{}-wal", db.display()));
            fields.insert("store_runs".into(), json!(size.runs));
            fields.insert("store_finished_runs".into(), json!(size.finished_runs));
            fields.insert("store_bytes".into(), json!(used));
            fields.insert("bytes_per_run".into(), per_run);
            fields.insert(
                "bytes_per_run_source".into(),
                json!("SqliteStore::size: (page_count - freelist_count) * page_size / runs stored"),
            );
            // How the writer grouped the writes: commits (one fsync each with `full`), calls
            // committed and the largest group of calls in one commit.
            let stats = store.stats();
            fields.insert("store_commits".into(), json!(stats.commits));
            fields.insert("store_calls".into(), json!(stats.calls_committed));
            fields.insert("store_largest_batch".into(), json!(stats.largest_batch));
            fields.insert("db_file_bytes".into(), json!(file_len(&db)));
            fields.insert("wal_file_bytes".into(), json!(file_len(&wal)));
        }
    }
    if let (Some(d), Some(fields)) = (&opened.distributed, line.as_object_mut()) {
        let store = d.store();
        let sc = store
            .synchronous_commit(store.durability(&runlane::core::EnvName::new("default")?))
            .await?;
        let stats = store.stats();
        fields.insert("synchronous_commit".into(), json!(sc));
        fields.insert(
            "topology_servers".into(),
            json!("redis+postgresql on loopback"),
        );
        fields.insert("store_commits".into(), json!(stats.commits));
        fields.insert("store_calls".into(), json!(stats.calls_committed));
        fields.insert("store_largest_batch".into(), json!(stats.largest_batch));
        fields.insert("store_rows_inserted".into(), json!(stats.rows_inserted));
        fields.insert("marked_in_queue".into(), json!(d.queue().marked()));
        fields.insert("enqueues_deferred".into(), json!(d.queue().deferred()));
        let redis = d.queue().redis();
        fields.insert("redis_enqueue_calls".into(), json!(redis.enqueue_calls()));
        // Mean times per call, from sending to the answer (waits in Redis or for a writer's
        // connection included), so a line tells where a run's time went.
        let mean = |micros: u64, calls: u64| (calls > 0).then(|| micros / calls);
        fields.insert(
            "store_commit_us_mean".into(),
            json!(mean(stats.commit_micros, stats.commits)),
        );
        fields.insert(
            "redis_enqueue_us_mean".into(),
            json!(mean(redis.enqueue_micros(), redis.enqueue_calls())),
        );
        fields.insert("redis_claim_calls".into(), json!(redis.claim_calls()));
        fields.insert(
            "redis_claim_us_mean".into(),
            json!(mean(redis.claim_micros(), redis.claim_calls())),
        );
        fields.insert(
            "claimed_on_enqueue".into(),
            json!(opened.engine.metrics().claimed_on_enqueue),
        );
        d.shutdown().await;
    }
    opened.engine.shutdown().await;
    drop(opened);
    Ok(line)
}

async fn open(common: &Common) -> anyhow::Result<Opened> {
    let engine = match common.backend.as_str() {
        "memory" => Opened {
            engine: runlane::memory().await?,
            store: None,
            _dir: None,
            durability: "none",
            distributed: None,
        },
        "embedded" => open_embedded(common).await?,
        "distributed" => open_distributed(common).await?,
        other => bail!("unknown backend {other:?} (available: memory, embedded, distributed)"),
    };
    open_wide(&engine).await?;
    Ok(engine)
}

/// The bench measures the engine, not a limit: opens the default env wide.
pub(crate) async fn open_wide(engine: &Engine) -> anyhow::Result<()> {
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 1_000_000,
                ..EnvSettings::default()
            },
        )
        .await?;
    Ok(())
}

pub(crate) fn payload(bytes: usize) -> Value {
    json!({ "data": "x".repeat(bytes.saturating_sub(12)) })
}

/// The commit HEAD named when this binary was built (recorded by `build.rs`; uncommitted
/// changes are not flagged).
pub(crate) fn git_revision() -> String {
    option_env!("RUNLANE_GIT_REVISION")
        .unwrap_or("unknown")
        .to_string()
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The sequential loop of every latency topology: a warm-up (a tenth of the runs, 10 to
/// 1,000) that is not counted, then `runs` measured samples, `gap` apart, with a progress bar.
pub(crate) struct LatencySampler {
    runs: u32,
    warmup: u32,
    done: u32,
    gap: Duration,
    samples: Vec<u64>,
    progress: Progress,
}

impl LatencySampler {
    pub(crate) fn start(runs: u32, gap: Duration) -> Self {
        let warmup = (runs / 10).clamp(10, 1000);
        LatencySampler {
            runs,
            warmup,
            done: 0,
            gap,
            samples: Vec::with_capacity(runs as usize),
            progress: Progress::start("latency", u64::from(runs + warmup)),
        }
    }

    /// Whether another run is due.
    pub(crate) fn more(&self) -> bool {
        self.done < self.runs + self.warmup
    }

    /// Records one run's trigger start → handler start (µs; warm-up runs are dropped), then
    /// waits the gap.
    pub(crate) async fn record(&mut self, micros: u64) {
        self.progress.inc(1);
        if self.done >= self.warmup {
            self.samples.push(micros);
        }
        self.done += 1;
        if !self.gap.is_zero() {
            tokio::time::sleep(self.gap).await;
        }
    }

    /// The measured samples, sorted.
    pub(crate) async fn finish(self) -> Vec<u64> {
        self.progress.finish().await;
        let mut samples = self.samples;
        samples.sort_unstable();
        samples
    }
}

/// Waits up to 30 s for a child process the bench asked to stop, killing it after that; an
/// exit other than success is an error naming `what`.
pub(crate) async fn wait_stopped(
    child: &mut tokio::process::Child,
    what: &str,
) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                bail!("{what} exited with {status}");
            }
            Ok(())
        }
        Err(_) => {
            child.kill().await?;
            bail!("{what} did not stop within 30 s");
        }
    }
}

/// Trigger call start → the handler's first line, sequential, on an idle engine.
pub async fn latency(common: &Common, gap: Duration) -> anyhow::Result<Value> {
    let engine = open(common).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let worker = engine
        .worker()
        .workloops(&format!("manual>*:{}", common.slots.max(1)))
        .handler("bench", move |_ctx: RunContext| {
            let now = Instant::now();
            let tx = tx.clone();
            async move {
                let _ = tx.send(now);
                Ok::<_, HandlerError>(Value::Null)
            }
        })
        .start()
        .await?;
    let body = payload(common.payload_bytes);
    let mut sampler = LatencySampler::start(common.runs, gap);
    // The caller is a task on the runtime, as a server's request handler or any async caller
    // is, not the thread blocked in `block_on`: a trigger from a runtime thread hands the
    // workloop's wake-up to that thread instead of unparking another through the kernel.
    let caller = engine.clone();
    let samples = tokio::spawn(async move {
        while sampler.more() {
            let t0 = Instant::now();
            let run = caller.trigger("bench").payload(&body).send().await?;
            let started = rx.recv().await.context("handler channel closed")?;
            caller.wait(run.run.id, Duration::from_secs(10)).await?;
            sampler
                .record(started.duration_since(t0).as_micros() as u64)
                .await;
        }
        anyhow::Ok(sampler.finish().await)
    })
    .await
    .context("latency sampler task")??;
    worker.stop().await;
    let line = json!({
        "scenario": "latency",
        "backend": common.backend,
        "durability": "none",
        "topology": "same-process",
        "gap_ms": gap.as_millis() as u64,
        "slots": common.slots,
        "runs": common.runs,
        "payload_bytes": common.payload_bytes,
        "p50_us": percentile(&samples, 0.50),
        "p95_us": percentile(&samples, 0.95),
        "p99_us": percentile(&samples, 0.99),
        "git_revision": git_revision(),
    });
    finish(engine, line).await
}

/// The phases of the throughput scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Trigger only, no worker.
    TriggerOnly,
    /// Pre-filled queue, then drain with K slots.
    DrainOnly,
    /// Trigger and drain at the same time.
    Concurrent,
}

impl Phase {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::TriggerOnly => "trigger_only",
            Phase::DrainOnly => "drain_only",
            Phase::Concurrent => "concurrent",
        }
    }
}

async fn start_noop_worker(
    engine: &Engine,
    slots: u32,
    done: Arc<AtomicU64>,
) -> anyhow::Result<runlane::Worker> {
    Ok(engine
        .worker()
        .workloops(&format!("manual>*:{}", slots.max(1)))
        .handler("bench", move |_ctx: RunContext| {
            done.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandlerError>(Value::Null) }
        })
        .start()
        .await?)
}

/// Waits until every run has been handled and nothing holds a slot. The harness looks once a
/// millisecond (a spin here took half the machine away from the engine it measures); that adds
/// at most 1 ms to a measurement of seconds.
async fn drained(engine: &Engine, done: &AtomicU64, runs: u64) -> anyhow::Result<()> {
    loop {
        if done.load(Ordering::Relaxed) >= runs {
            let queues = engine.queues("default").await?;
            if queues
                .iter()
                .all(|q| q.running == 0 && q.queued == 0 && q.delayed == 0)
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// No-op runs per second in one phase.
pub async fn throughput(common: &Common, phase: Phase) -> anyhow::Result<Value> {
    let engine = open(common).await?;
    let body = payload(common.payload_bytes);
    let runs = u64::from(common.runs);
    let done = Arc::new(AtomicU64::new(0));
    let elapsed = match phase {
        Phase::TriggerOnly => {
            let sent = Arc::new(AtomicU64::new(0));
            let progress = Progress::with_counter("trigger_only", runs, sent.clone());
            let t0 = Instant::now();
            produce(&engine, &body, runs, common.producers, Some(sent)).await?;
            let e = t0.elapsed();
            progress.finish().await;
            e
        }
        Phase::DrainOnly => {
            // The fill is not measured: batches, so a durable backend fills at group-commit speed.
            prefill(
                &engine,
                "default",
                "bench",
                None,
                &body,
                runs,
                "drain_only fill",
            )
            .await?;
            settle_marks(&engine, runs).await;
            let progress = Progress::with_counter("drain_only", runs, done.clone());
            let t0 = Instant::now();
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            progress.finish().await;
            worker.stop().await;
            e
        }
        Phase::Concurrent => {
            let progress = Progress::with_counter("concurrent", runs, done.clone());
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            let t0 = Instant::now();
            produce(&engine, &body, runs, common.producers, None).await?;
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            progress.finish().await;
            worker.stop().await;
            e
        }
    };
    let line = json!({
        "scenario": "throughput",
        "backend": common.backend,
        "durability": "none",
        "phase": phase.name(),
        "slots": common.slots,
        "runs": common.runs,
        "producers": common.producers,
        "payload_bytes": common.payload_bytes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "runs_per_s": (runs as f64 / elapsed.as_secs_f64()).round() as u64,
        "git_revision": git_revision(),
    });
    finish(engine, line).await
}

/// Distributed: waits until the marker task has marked the prefilled runs `in_queue` (at most
/// 30 s), so the drain is measured as a backlog's drain, without the fill's own marker writes.
async fn settle_marks(engine: &Opened, runs: u64) {
    let Some(d) = &engine.distributed else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(30);
    while d.queue().marked() < runs && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Triggers `runs` single runs from `producers` tasks at once (their share each).
async fn produce(
    engine: &Engine,
    body: &Value,
    runs: u64,
    producers: u32,
    sent: Option<Arc<AtomicU64>>,
) -> anyhow::Result<()> {
    let producers = u64::from(producers.max(1)).min(runs.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..producers {
        let share = runs / producers + u64::from(p < runs % producers);
        let engine = engine.clone();
        let body = body.clone();
        let sent = sent.clone();
        tasks.spawn(async move {
            for _ in 0..share {
                engine.trigger("bench").payload(&body).send().await?;
                if let Some(sent) = &sent {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<(), runlane::EngineError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a producer task failed")??;
    }
    Ok(())
}

/// Triggers `runs` runs of `task` in `env` (and `queue`) in batches of the engine's largest
/// batch: a fill before a measurement, at group-commit speed on a durable backend.
async fn prefill(
    engine: &Engine,
    env: &str,
    task: &str,
    queue: Option<&str>,
    body: &Value,
    runs: u64,
    label: &str,
) -> anyhow::Result<()> {
    let mut request = engine.trigger(task).env(env).payload(body);
    if let Some(queue) = queue {
        request = request.queue(queue);
    }
    let request: TriggerRequest = request.request()?;
    let batch = engine.config().batch_max.max(1) as u64;
    let progress = Progress::start(label, runs);
    let mut left = runs;
    while left > 0 {
        let n = left.min(batch);
        let requests = (0..n).map(|_| request.clone()).collect();
        engine.trigger_batch(requests).await?;
        progress.inc(n);
        left -= n;
    }
    progress.finish().await;
    Ok(())
}

/// The depth the scale scenario compares against.
pub const SCALE_BASELINE_DEPTH: u64 = 1_000;

/// The queue the scale scenario's backlog waits in.
const SCALE_QUEUE: &str = "scale";

/// What one depth of the scale scenario measured.
struct ScaleFigures {
    trigger_us_p50: f64,
    trigger_us_p99: f64,
    trigger_us_mean: f64,
    claim_us_per_run: f64,
    fill_s: f64,
    /// The closed engine's settings and store figures ([`finish`] of an empty line).
    closed: Value,
}

/// Trigger and claim cost with `depth` runs pending (in one queue key, held back by its
/// limit), against the same with [`SCALE_BASELINE_DEPTH`] pending: each depth on a fresh engine.
///
/// - **trigger**: `runs` sequential triggers into the deep queue key (each lands behind the
///   backlog: no fast path); per-call p50/p99/mean.
/// - **claim**: a worker with `slots` slots on the queue (limit = slots) takes `runs` runs off
///   the backlog: each claim follows a finish that admits the next run from the deep key.
///   Reported as wall time until the last of them started, per run.
///
/// The backlog moves between `depth` and `depth + runs` while measured.
pub async fn scale(common: &Common, depth: u64) -> anyhow::Result<Value> {
    let base = scale_at(common, SCALE_BASELINE_DEPTH).await?;
    let deep = scale_at(common, depth).await?;
    let ratio = |d: f64, b: f64| if b > 0.0 { round2(d / b) } else { 0.0 };
    let mut line = deep.closed.clone();
    let fields = line
        .as_object_mut()
        .context("a closed engine's line is an object")?;
    let figures = json!({
        "scenario": "scale",
        "backend": common.backend,
        "slots": common.slots,
        "runs": common.runs,
        "payload_bytes": common.payload_bytes,
        "depth": depth,
        "baseline_depth": SCALE_BASELINE_DEPTH,
        "trigger_us_p50": deep.trigger_us_p50,
        "trigger_us_p99": deep.trigger_us_p99,
        "trigger_us_mean": round2(deep.trigger_us_mean),
        "claim_us_per_run": round2(deep.claim_us_per_run),
        "baseline_trigger_us_p50": base.trigger_us_p50,
        "baseline_trigger_us_p99": base.trigger_us_p99,
        "baseline_trigger_us_mean": round2(base.trigger_us_mean),
        "baseline_claim_us_per_run": round2(base.claim_us_per_run),
        "trigger_ratio_p50": ratio(deep.trigger_us_p50, base.trigger_us_p50),
        "trigger_ratio_mean": ratio(deep.trigger_us_mean, base.trigger_us_mean),
        "claim_ratio": ratio(deep.claim_us_per_run, base.claim_us_per_run),
        "fill_s": round2(deep.fill_s),
        "git_revision": git_revision(),
    });
    if let Value::Object(figures) = figures {
        fields.extend(figures);
    }
    Ok(line)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn scale_at(common: &Common, depth: u64) -> anyhow::Result<ScaleFigures> {
    let engine = open(common).await?;
    let slots = common.slots.max(1);
    engine
        .set_queue(
            "default",
            SCALE_QUEUE,
            QueueSettings {
                limit: Some(slots),
                ..QueueSettings::default()
            },
        )
        .await?;
    let body = payload(common.payload_bytes);
    let t_fill = Instant::now();
    let label = format!("scale fill {depth}");
    prefill(
        &engine,
        "default",
        "bench",
        Some(SCALE_QUEUE),
        &body,
        depth,
        &label,
    )
    .await?;
    let fill_s = t_fill.elapsed().as_secs_f64();

    let runs = u64::from(common.runs.max(1));
    let mut samples = Vec::with_capacity(runs as usize);
    let progress = Progress::start(&format!("scale trigger at {depth}"), runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        engine
            .trigger("bench")
            .queue(SCALE_QUEUE)
            .payload(&body)
            .send()
            .await?;
        samples.push(t0.elapsed().as_nanos() as u64);
        progress.inc(1);
    }
    progress.finish().await;
    let trigger_us_mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1_000.0;
    samples.sort_unstable();
    let trigger_us_p50 = round2(percentile(&samples, 0.50) as f64 / 1_000.0);
    let trigger_us_p99 = round2(percentile(&samples, 0.99) as f64 / 1_000.0);

    let started = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(Notify::new());
    let progress =
        Progress::with_counter(&format!("scale claim at {depth}"), runs, started.clone());
    let (count, all_started) = (started.clone(), reached.clone());
    let t0 = Instant::now();
    let worker = engine
        .worker()
        .workloops(&format!("manual>*:{slots}"))
        .handler("bench", move |_ctx: RunContext| {
            if count.fetch_add(1, Ordering::Relaxed) + 1 == runs {
                all_started.notify_one();
            }
            async { Ok::<_, HandlerError>(Value::Null) }
        })
        .start()
        .await?;
    tokio::time::timeout(Duration::from_secs(600), reached.notified())
        .await
        .context("the claim phase did not finish within 10 minutes")?;
    let claim = t0.elapsed();
    progress.finish().await;
    worker.stop().await;
    let closed = finish(engine, json!({})).await?;
    Ok(ScaleFigures {
        trigger_us_p50,
        trigger_us_p99,
        trigger_us_mean,
        claim_us_per_run: claim.as_secs_f64() * 1e6 / runs as f64,
        fill_s,
        closed,
    })
}

/// How long each run of the flooding env takes in the fairness scenario.
const FLOOD_WORK: Duration = Duration::from_millis(1);
/// The flooding env's backlog, in multiples of the trickle's runs.
const FLOOD_BACKLOG_FACTOR: u64 = 100;

/// Env A at its limit with a backlog of 100× env B's trickle: B's trigger → handler start
/// latency while A floods, against B alone on the same engine and worker.
///
/// Both envs get `slots / 2` as their limit and one worker serves both with `slots` slots, so
/// A at its limit leaves B its share. A's runs each take [`FLOOD_WORK`]; B's are no-ops,
/// triggered one at a time (`gap` between one's end and the next trigger), as in `latency`.
pub async fn fairness(common: &Common, gap: Duration) -> anyhow::Result<Value> {
    let engine = open(common).await?;
    let slots = common.slots.max(2);
    let limit = slots / 2;
    for env in ["a", "b"] {
        engine
            .set_env(
                env,
                EnvSettings {
                    limit,
                    ..EnvSettings::default()
                },
            )
            .await?;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let flood_done = Arc::new(AtomicU64::new(0));
    let flood_count = flood_done.clone();
    let worker = engine
        .worker()
        .env("a")
        .env("b")
        .workloops(&format!("manual>*:{slots}"))
        .handler("flood", move |_ctx: RunContext| {
            let count = flood_count.clone();
            async move {
                tokio::time::sleep(FLOOD_WORK).await;
                count.fetch_add(1, Ordering::Relaxed);
                Ok::<_, HandlerError>(Value::Null)
            }
        })
        .handler("probe", move |_ctx: RunContext| {
            let now = Instant::now();
            let _ = tx.send(now);
            async { Ok::<_, HandlerError>(Value::Null) }
        })
        .start()
        .await?;
    let body = payload(common.payload_bytes);
    let runs = common.runs.max(1);

    let alone = trickle(&engine, &mut rx, &body, runs, gap, "fairness: b alone").await?;

    let backlog = FLOOD_BACKLOG_FACTOR * u64::from(runs);
    prefill(
        &engine,
        "a",
        "flood",
        None,
        &body,
        backlog,
        "fairness: a's backlog",
    )
    .await?;
    let a_pending_before = pending(&engine, "a").await?;
    let a_done_before = flood_done.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let flooding = trickle(
        &engine,
        &mut rx,
        &body,
        runs,
        gap,
        "fairness: b, a flooding",
    )
    .await?;
    let b_phase = t0.elapsed();
    let a_done_during = flood_done.load(Ordering::Relaxed) - a_done_before;
    let a_pending_after = pending(&engine, "a").await?;
    // Stop without draining A's backlog: the worker only waits for what is in flight.
    worker.stop().await;

    let p = |s: &[u64], q: f64| percentile(s, q);
    let ratio = |f: u64, a: u64| {
        if a > 0 {
            round2(f as f64 / a as f64)
        } else {
            0.0
        }
    };
    let line = json!({
        "scenario": "fairness",
        "backend": common.backend,
        "topology": "same-process",
        "gap_ms": gap.as_millis() as u64,
        "slots": slots,
        "runs": runs,
        "payload_bytes": common.payload_bytes,
        "env_limit": limit,
        "a_work_ms": FLOOD_WORK.as_millis() as u64,
        "a_backlog": backlog,
        "a_pending_at_b_start": a_pending_before,
        "a_pending_at_b_end": a_pending_after,
        "a_flooding_throughout": a_pending_after > u64::from(limit),
        "a_runs_per_s_during_b": (a_done_during as f64 / b_phase.as_secs_f64()).round() as u64,
        "b_alone_p50_us": p(&alone, 0.50),
        "b_alone_p99_us": p(&alone, 0.99),
        "b_flooding_p50_us": p(&flooding, 0.50),
        "b_flooding_p99_us": p(&flooding, 0.99),
        "p50_ratio": ratio(p(&flooding, 0.50), p(&alone, 0.50)),
        "p99_ratio": ratio(p(&flooding, 0.99), p(&alone, 0.99)),
        "git_revision": git_revision(),
    });
    finish(engine, line).await
}

/// Runs of an env not yet finished (delayed, queued, ready or executing).
async fn pending(engine: &Engine, env: &str) -> anyhow::Result<u64> {
    Ok(engine
        .queues(env)
        .await?
        .iter()
        .map(|q| q.delayed + q.queued + q.running)
        .sum())
}

/// B's trickle: `runs` probes in env `b`, one at a time; trigger call start → handler start,
/// in µs, sorted (after a tenth as warm-up, at least 10).
async fn trickle(
    engine: &Engine,
    started: &mut mpsc::UnboundedReceiver<Instant>,
    body: &Value,
    runs: u32,
    gap: Duration,
    label: &str,
) -> anyhow::Result<Vec<u64>> {
    let warmup = (runs / 10).max(10);
    let progress = Progress::start(label, u64::from(runs + warmup));
    let mut samples = Vec::with_capacity(runs as usize);
    for i in 0..(runs + warmup) {
        let t0 = Instant::now();
        let run = engine
            .trigger("probe")
            .env("b")
            .payload(body)
            .send()
            .await?;
        let start = started.recv().await.context("probe channel closed")?;
        if i >= warmup {
            samples.push(start.duration_since(t0).as_micros() as u64);
        }
        engine.wait(run.run.id, Duration::from_secs(10)).await?;
        progress.inc(1);
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    progress.finish().await;
    samples.sort_unstable();
    Ok(samples)
}

/// Throughput with triggers sent `batch` runs per `trigger_batch` call (one store write per
/// batch) instead of one `send()` per run: what a caller that batches gets, and how far a
/// durable backend's group commit carries when each call no longer waits for its own commit.
/// The worker side is the same as [`throughput`]'s.
pub async fn throughput_batched(
    common: &Common,
    phase: Phase,
    batch: u32,
) -> anyhow::Result<Value> {
    let engine = open(common).await?;
    let body = payload(common.payload_bytes);
    let runs = u64::from(common.runs);
    let batch = u64::from(batch.clamp(1, engine.config().batch_max as u32));
    let request: TriggerRequest = engine.trigger("bench").payload(&body).request()?;
    let send_all = |progress: Option<Progress>| {
        let engine = &engine;
        let request = &request;
        async move {
            let mut left = runs;
            while left > 0 {
                let n = left.min(batch);
                let requests = (0..n).map(|_| request.clone()).collect();
                engine.trigger_batch(requests).await?;
                if let Some(p) = &progress {
                    p.inc(n);
                }
                left -= n;
            }
            if let Some(p) = progress {
                p.finish().await;
            }
            anyhow::Ok(())
        }
    };
    let done = Arc::new(AtomicU64::new(0));
    let elapsed = match phase {
        Phase::TriggerOnly => {
            let t0 = Instant::now();
            send_all(Some(Progress::start("trigger_only", runs))).await?;
            t0.elapsed()
        }
        Phase::DrainOnly => {
            send_all(Some(Progress::start("drain_only fill", runs))).await?;
            let progress = Progress::with_counter("drain_only", runs, done.clone());
            let t0 = Instant::now();
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            progress.finish().await;
            worker.stop().await;
            e
        }
        Phase::Concurrent => {
            let progress = Progress::with_counter("concurrent", runs, done.clone());
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            let t0 = Instant::now();
            send_all(None).await?;
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            progress.finish().await;
            worker.stop().await;
            e
        }
    };
    let line = json!({
        "scenario": "throughput",
        "backend": common.backend,
        "phase": phase.name(),
        "slots": common.slots,
        "runs": common.runs,
        "batch": batch,
        "payload_bytes": common.payload_bytes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "runs_per_s": (runs as f64 / elapsed.as_secs_f64()).round() as u64,
        "git_revision": git_revision(),
    });
    finish(engine, line).await
}

/// Samples `runs` sequential calls of `call` (after an uncounted warm-up of a tenth, 10 to
/// 1,000), each timed on its own; answers the sorted durations in nanoseconds.
async fn sample_calls<F, Fut, T>(runs: u32, mut call: F) -> anyhow::Result<Vec<u64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let warmup = (runs / 10).clamp(10, 1_000);
    for _ in 0..warmup {
        std::hint::black_box(call().await?);
    }
    let mut samples = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let t0 = Instant::now();
        let answer = call().await?;
        samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        std::hint::black_box(answer);
    }
    samples.sort_unstable();
    Ok(samples)
}

fn micros(ns: u64) -> f64 {
    (ns as f64 / 10.0).round() / 100.0
}

/// One `resolve` line: the warm figures against the store's, their p50 ratio, the settings.
fn resolve_line(
    common: &Common,
    level: &str,
    how: &str,
    tasks: usize,
    warm: &[u64],
    store: &[u64],
    store_how: &str,
) -> Value {
    let p = |s: &[u64], q: f64| micros(percentile(s, q));
    let ratio = percentile(store, 0.5) as f64 / percentile(warm, 0.5).max(1) as f64;
    json!({
        "scenario": "resolve",
        "backend": common.backend,
        "level": level,
        "warm_path": how,
        "store_path": store_how,
        "runs": common.runs,
        "tasks_in_version": tasks,
        "warm_p50_us": p(warm, 0.5),
        "warm_p95_us": p(warm, 0.95),
        "warm_p99_us": p(warm, 0.99),
        "store_p50_us": p(store, 0.5),
        "store_p95_us": p(store, 0.95),
        "store_p99_us": p(store, 0.99),
        "ratio_p50": (ratio * 10.0).round() / 10.0,
        "git_revision": git_revision(),
    })
}

/// A version of `tasks` task definitions, each with a queue, a TTL and a retry policy (what
/// a real deploy carries), and the name of one in the middle.
fn resolve_version(tasks: usize) -> anyhow::Result<(runlane::core::VersionDef, String)> {
    let mut defs = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let mut def =
            runlane::core::TaskDef::new(runlane::core::TaskName::new(&format!("task-{i}"))?);
        def.queue = Some(runlane::core::QueueName::new(&format!("queue-{i}"))?);
        def.ttl = Some(Duration::from_secs(300));
        def.max_duration = Some(Duration::from_secs(60));
        defs.push(def);
    }
    Ok((
        runlane::core::VersionDef { tasks: defs },
        format!("task-{}", tasks / 2),
    ))
}

/// `bench resolve`: task metadata resolution (SPEC §4), warm cache vs the store lookup a miss
/// makes (`RunStore::current_definition`), sequential, `runs` calls each. Embedded: one line
/// (the in-process level). Distributed: two lines, the in-process level and the shared Redis
/// level (an engine whose in-process entries expire at once: one `HGETALL` per resolution).
pub async fn resolve(common: &Common, tasks: usize) -> anyhow::Result<Vec<Value>> {
    use runlane::core::backend::RunStore;
    let (def, task) = resolve_version(tasks)?;
    let env = runlane::core::EnvName::new("default")?;
    match common.backend.as_str() {
        "embedded" => {
            let opened = open_embedded(common).await?;
            let v = opened.register_version("default", def).await?;
            opened.promote("default", v).await?;
            let warm = sample_calls(common.runs, || async {
                Ok(opened.resolve_task("default", &task, None).await?)
            })
            .await?;
            let store = opened.store.clone().context("the embedded store")?;
            let cold = sample_calls(common.runs, || async {
                Ok(store.current_definition(&env).await?)
            })
            .await?;
            let line = resolve_line(
                common,
                "in_process",
                "Engine::resolve_task, in-process level hit",
                tasks,
                &warm,
                &cold,
                "SqliteStore::current_definition (current version and its definition)",
            );
            Ok(vec![finish(opened, line).await?])
        }
        "distributed" => {
            let (prefix, schema) = fresh_distributed_names();
            let opened = open_distributed_at(common, &prefix, &schema).await?;
            let v = opened.register_version("default", def).await?;
            opened.promote("default", v).await?;
            let mut config =
                runlane::DistributedConfig::new(&common.redis_url, &common.database_url);
            config.redis.prefix = prefix.clone();
            config.postgres.schema = schema.clone();
            let shared_only = runlane::distributed_with(
                EngineBuilder::new().meta_max_age(Duration::ZERO),
                config,
            )
            .await?;
            let warm = sample_calls(common.runs, || async {
                Ok(opened.resolve_task("default", &task, None).await?)
            })
            .await?;
            let shared = sample_calls(common.runs, || async {
                Ok(shared_only.resolve_task("default", &task, None).await?)
            })
            .await?;
            let store = opened
                .distributed
                .as_ref()
                .context("the distributed shape")?
                .store()
                .clone();
            let cold = sample_calls(common.runs, || async {
                Ok(store.current_definition(&env).await?)
            })
            .await?;
            shared_only.shutdown().await;
            drop(shared_only);
            let store_how = "PostgresStore::current_definition (one query: current version joined with its definition)";
            let first = resolve_line(
                common,
                "in_process",
                "Engine::resolve_task, in-process level hit",
                tasks,
                &warm,
                &cold,
                store_how,
            );
            let second = resolve_line(
                common,
                "shared",
                "Engine::resolve_task, in-process level expired at once (meta_max_age 0): one Redis HGETALL of env-current + decode",
                tasks,
                &shared,
                &cold,
                store_how,
            );
            let mut first = first;
            if let Some(fields) = first.as_object_mut() {
                for key in ["topology", "gap_ms", "phase", "depth"] {
                    fields.entry(key).or_insert(Value::Null);
                }
                fields.insert("batch".into(), json!(1));
            }
            let second = finish(opened, second).await?;
            if let (Some(f), Some(s)) = (first.as_object_mut(), second.as_object()) {
                for key in ["durability", "synchronous_commit", "topology_servers"] {
                    if let Some(v) = s.get(key) {
                        f.insert(key.into(), v.clone());
                    }
                }
            }
            Ok(vec![first, second])
        }
        other => {
            bail!("bench resolve: unknown backend {other:?} (available: embedded, distributed)")
        }
    }
}
