//! The distributed shape across OS processes under failure. Worker processes are children of
//! this test binary (re-run with `RUNLANE_TEST_ROLE` set, entering `child_process_entry`); the
//! test process triggers, waits (run events cross processes) and checks:
//!
//! - `twenty_thousand_runs_three_processes_limits_hold`: 20,000 runs over two envs, four
//!   queues and five keys, two worker processes; every run one terminal state, executed once;
//!   the handlers count, in Redis, how many runs execute at once per env, queue and key
//!   (exact cross-process maxima, not samples) and no count ever exceeds its admission row;
//! - `sigkilled_worker_runs_recovered_within_lease_plus_one_second`: the worker process that
//!   owns the timers is SIGKILLed mid-run; its runs are claimed again by the other worker within
//!   lease + 1 s of the kill (measured per run), another process (the surviving worker or the
//!   test process) took the timers over, every run completed once in PostgreSQL, and only runs
//!   the dead process had started ran twice;
//! - `flushall_under_load_across_processes`: a private `redis-server` is flushed while runs are
//!   triggered and two worker processes hold leases; nothing is lost, every run one terminal
//!   state, only runs started before the flush ran twice;
//! - `redis_outage_across_processes_nothing_lost`: every process reaches Redis through a
//!   cuttable proxy; it is cut while two worker processes hold leases and the test process
//!   triggers more: those triggers are accepted at once (committed `pending_enqueue`), health
//!   names Redis, and once the proxy is restored every run completes and executed exactly
//!   once (the reconciler enqueues the deferred runs, the workers resume by themselves, ends
//!   written during the outage are never run again);
//! - `postgres_outage_across_processes_nothing_lost`: every process reaches PostgreSQL through
//!   a cuttable proxy; it is cut while two worker processes run handlers: a trigger fails fast
//!   with `Unavailable`, health names PostgreSQL, ends of handlers that returned during the
//!   outage are written again and again (the runs keep their leases) until it answers, and
//!   every run completes, executed exactly once;
//! - `crash_mid_rebuild_next_process_completes_it`: a child with `RUNLANE_FAILPOINT=mid_rebuild`
//!   aborts halfway through rebuilding a flushed key space; the next process completes the
//!   rebuild: no run lost, none executed twice, the completed ones never again.
//!
//! Redis (`RUNLANE_REDIS_URL`), PostgreSQL (`RUNLANE_DATABASE_URL`) and `redis-server` are
//! required. The tests of this file run one at a time (their timing bounds need the cores).

mod distributed_support;
mod redis_support;
mod run_counter;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use distributed_support::{split_url, Proxy};
use redis_support::PrivateRedis;
use run_counter::{counting_worker, Executions};
use runlane::core::backend::QueueBackend;
use runlane::core::retry::RetryPolicy;
use runlane::core::{EnvSettings, QueueSettings, RunId, RunStatus};
use runlane::{
    DistributedConfig, EngineBuilder, EngineError, HandlerError, RunContext, WaitOutcome,
};
use serde_json::{json, Value};

const ROLE: &str = "RUNLANE_TEST_ROLE";
const ENTRY: &str = "child_process_entry";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn config(redis_url: &str, prefix: &str, schema: &str) -> DistributedConfig {
    let mut config = DistributedConfig::new(redis_url, database_url());
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config.timer_lease = Duration::from_secs(1);
    config
}

// ---- the child process ----------------------------------------------------------------

/// A thread that reports on stderr each time the child's runtime took over half a second to
/// run a task it was handed (heartbeats run on that runtime: a stall that long lets a 2 s
/// lease lapse in a CI run; the child's stderr is the test's, shown when it fails).
fn watch_runtime(handle: tokio::runtime::Handle) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let asked = std::time::Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(());
        });
        if rx.recv().is_err() {
            return;
        }
        let waited = asked.elapsed();
        if waited > Duration::from_millis(500) {
            eprintln!(
                "child {}: its runtime ran a task {waited:?} after it was spawned",
                std::process::id()
            );
        }
    });
}

/// Counts, in Redis, the runs executing at once per env, queue and key (KEYS[1..3]) and
/// records each count above its limit (ARGV[1..3], 0 = none) in KEYS[4] and each maximum in
/// the hash KEYS[5].
const ENTER: &str = r"
for i = 1, 3 do
  local v = redis.call('INCR', KEYS[i])
  local lim = tonumber(ARGV[i])
  if lim > 0 and v > lim then redis.call('RPUSH', KEYS[4], KEYS[i] .. '=' .. v) end
  local m = tonumber(redis.call('HGET', KEYS[5], KEYS[i]) or '0')
  if v > m then redis.call('HSET', KEYS[5], KEYS[i], v) end
end
return 1";

/// Counter keys of the concurrency check, under the deployment's hash tag (removed with it).
fn counter_keys(prefix: &str, env: &str, queue: &str, key: &str) -> [String; 5] {
    [
        format!("{{{prefix}}}:t:e:{env}"),
        format!("{{{prefix}}}:t:q:{env}:{queue}"),
        format!("{{{prefix}}}:t:k:{env}:{queue}:{key}"),
        format!("{{{prefix}}}:t:violations"),
        format!("{{{prefix}}}:t:max"),
    ]
}

/// A worker process: opens the shared engine and runs a worker whose `job` handler writes
/// `start <run> <ms>` and `done <run> <ms>` lines to its file, works `ms` milliseconds (from
/// the payload) and, when the payload carries limits, counts concurrency in Redis. With
/// `RUNLANE_TEST_STDIN_REBUILD` it instead waits for a line on stdin and then reads the
/// queue (which finds a flushed key space and rebuilds it).
async fn child_process() {
    // `RUNLANE_TEST_LOG=1`: the engine's warnings (failed heartbeats, claims, ends) go to the
    // child's stderr, which the test process inherits.
    if std::env::var("RUNLANE_TEST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let (redis_url, prefix, schema, out) = (
        var("RUNLANE_TEST_REDIS"),
        var("RUNLANE_TEST_PREFIX"),
        var("RUNLANE_TEST_SCHEMA"),
        var("RUNLANE_TEST_OUT"),
    );
    let lease = Duration::from_millis(var("RUNLANE_TEST_LEASE_MS").parse().expect("lease"));
    let engine =
        runlane::distributed_with(EngineBuilder::new(), config(&redis_url, &prefix, &schema))
            .await
            .expect("child opens the shared engine");
    if std::env::var("RUNLANE_TEST_STDIN_REBUILD").is_ok() {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
        let _ = engine.queue().snapshot().await;
        panic!("the mid_rebuild failpoint did not abort the rebuild");
    }
    if std::env::var("RUNLANE_TEST_ENV_B").is_ok() {
        engine
            .set_env(
                "b",
                EnvSettings {
                    limit: 8,
                    ..EnvSettings::default()
                },
            )
            .await
            .expect("env b");
    }
    let file = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .expect("open the output file"),
    ));
    let client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let enter = redis::Script::new(ENTER);
    watch_runtime(tokio::runtime::Handle::current());
    // The line is written before the handler goes on (a SIGKILL right after still leaves it
    // in the file), off the runtime's worker threads: a write held up by a busy disk must not
    // hold up this process's heartbeats.
    let line = |file: &std::sync::Mutex<std::fs::File>, what: &str, run: RunId| {
        tokio::task::block_in_place(|| {
            let mut f = file.lock().map_err(|_| HandlerError::new("poisoned"))?;
            writeln!(f, "{what} {run} {}", wall_ms()).map_err(|e| HandlerError::new(e.to_string()))
        })
    };
    let _worker = engine
        .worker()
        .env("default")
        .env("b")
        .workloops(&format!(
            "*:{}",
            std::env::var("RUNLANE_TEST_SLOTS").unwrap_or_else(|_| "16".to_owned())
        ))
        .lease(lease)
        .handler("job", move |ctx: RunContext| {
            let (file, mut conn, enter, prefix) =
                (file.clone(), conn.clone(), enter.clone(), prefix.clone());
            async move {
                let run = ctx.run_id();
                line(&file, "start", run)?;
                let p: Value = ctx.payload()?;
                let counted = match (p["q"].as_str(), p["k"].as_str()) {
                    (Some(q), Some(k)) => {
                        let keys = counter_keys(&prefix, ctx.env().as_str(), q, k);
                        let mut inv = enter.prepare_invoke();
                        for key in &keys {
                            inv.key(key);
                        }
                        for lim in ["le", "lq", "lk"] {
                            inv.arg(p[lim].as_u64().unwrap_or(0));
                        }
                        let _: i64 = inv
                            .invoke_async(&mut conn)
                            .await
                            .map_err(|e| HandlerError::new(e.to_string()))?;
                        Some(keys)
                    }
                    _ => None,
                };
                if let Some(ms) = p["ms"].as_u64().filter(|ms| *ms > 0) {
                    // The handler's work.
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(keys) = counted {
                    let mut pipe = redis::pipe();
                    for key in &keys[..3] {
                        pipe.decr(key, 1).ignore();
                    }
                    let _: () = pipe
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| HandlerError::new(e.to_string()))?;
                }
                line(&file, "done", run)?;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("child worker");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_entry() {
    if std::env::var(ROLE).is_ok() {
        child_process().await;
    }
}

// ---- the test process ---------------------------------------------------------------------

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The scratch directory of one test.
fn scratch(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("distributed-kill")
        .join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Two worker processes beside `engine` (env `b` at limit 8, which `trigger_many` uses; lease
/// 2 s; `redis_url` and `extra` environment for them; `outs` their outputs), answered once all
/// three processes listen on the events channel (counted on `watch_url`, a direct line to the
/// server).
async fn two_workers(
    engine: &runlane::Distributed,
    redis_url: &str,
    watch_url: &str,
    prefix: &str,
    schema: &str,
    outs: &[PathBuf],
    extra: &[(&str, &str)],
) -> Children {
    engine
        .set_env(
            "b",
            EnvSettings {
                limit: 8,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("env b");
    let children = Children(
        outs.iter()
            .map(|o| spawn_child(redis_url, prefix, schema, o, Duration::from_secs(2), extra))
            .collect(),
    );
    let channel = format!("{{{prefix}}}:events");
    until("the worker processes", Duration::from_secs(60), || {
        subscribers(watch_url, &channel) >= 3
    })
    .await;
    children
}

/// Starts a child process of the given kind.
fn spawn_child(
    redis_url: &str,
    prefix: &str,
    schema: &str,
    out: &Path,
    lease: Duration,
    extra: &[(&str, &str)],
) -> Child {
    let exe = std::env::current_exe().expect("this test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads", "1"])
        .env(ROLE, "worker")
        .env("RUNLANE_TEST_REDIS", redis_url)
        .env("RUNLANE_TEST_PREFIX", prefix)
        .env("RUNLANE_TEST_SCHEMA", schema)
        .env("RUNLANE_TEST_OUT", out)
        .env("RUNLANE_TEST_LEASE_MS", lease.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn a child process")
}

fn redis_conn(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis connection")
}

/// Subscribers of a channel.
fn subscribers(url: &str, channel: &str) -> i64 {
    let mut conn = redis_conn(url);
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut conn)
        .unwrap_or_default();
    counts.first().map_or(0, |(_, n)| *n)
}

/// Waits until `cond` holds, checking every 20 ms, at most `limit`.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One line of a child's output.
#[derive(Debug)]
struct Line {
    done: bool,
    run: String,
    at: u64,
}

/// A child's output (a last line cut by a kill is skipped).
fn read_lines(out: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let done = match parts.next()? {
                "start" => false,
                "done" => true,
                _ => return None,
            };
            let run = parts.next()?.to_string();
            let at = parts.next()?.parse().ok()?;
            Some(Line { done, run, at })
        })
        .collect()
}

/// Starts per run, over every output.
fn starts(outs: &[PathBuf]) -> HashMap<String, u32> {
    let mut n = HashMap::new();
    for out in outs {
        for line in read_lines(out).into_iter().filter(|l| !l.done) {
            *n.entry(line.run).or_insert(0) += 1;
        }
    }
    n
}

/// Checks that every run in `runs` started exactly once over every output.
fn started_once_each(outs: &[PathBuf], runs: &[RunId]) {
    let executions = starts(outs);
    for run in runs {
        let n = executions.get(&run.to_string()).copied().unwrap_or(0);
        assert_eq!(n, 1, "run {run} executed {n} times");
    }
}

/// Waits for every run's end through `wait` (events cross processes; eight waits at a time)
/// and checks it is `completed`.
async fn all_completed(engine: &runlane::Engine, runs: &[RunId], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut waits = tokio::task::JoinSet::new();
    for w in 0..8 {
        let engine = engine.clone();
        let slice: Vec<RunId> = runs.iter().skip(w).step_by(8).copied().collect();
        waits.spawn(async move {
            for run in slice {
                let left = deadline.saturating_duration_since(Instant::now());
                match engine.wait(run, left).await.expect("wait") {
                    WaitOutcome::Finished(record) => {
                        assert_eq!(record.status, RunStatus::Completed, "run {run}");
                    }
                    WaitOutcome::Pending { status, .. } => {
                        panic!("run {run} still {status:?} at the deadline")
                    }
                }
            }
        });
    }
    while let Some(done) = waits.join_next().await {
        done.expect("waits");
    }
}

/// Triggers `n` runs of `job` from eight producers in batches of 25, over two envs, four
/// queues and five keys, with `payload(i)`.
async fn trigger_many(
    engine: &runlane::Engine,
    n: usize,
    retry: Option<RetryPolicy>,
    payload: impl Fn(usize, &str, &str, &str) -> Value + Send + Sync + 'static,
) -> Vec<RunId> {
    let payload = Arc::new(payload);
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..8 {
        let engine = engine.clone();
        let payload = payload.clone();
        producers.spawn(async move {
            let mut ids = Vec::new();
            let mut batch = Vec::new();
            let mine: Vec<usize> = (p..n).step_by(8).collect();
            for (j, i) in mine.iter().copied().enumerate() {
                let env = if i % 3 == 0 { "b" } else { "default" };
                let queue = format!("q{}", i % 4);
                let key = format!("k{}", i % 5);
                let mut t = engine
                    .trigger("job")
                    .env(env)
                    .queue(&queue)
                    .key(&key)
                    .payload(&payload(i, env, &queue, &key));
                if let Some(r) = &retry {
                    t = t.retry(*r);
                }
                batch.push(t.request().expect("request"));
                // Batches of 25 (one store transaction each).
                if batch.len() == 25 || j + 1 == mine.len() {
                    let sent = engine
                        .trigger_batch(std::mem::take(&mut batch))
                        .await
                        .expect("trigger a batch");
                    ids.extend(sent.into_iter().map(|t| t.run.id));
                }
            }
            ids
        });
    }
    let mut all = Vec::new();
    while let Some(ids) = producers.join_next().await {
        all.extend(ids.expect("producer"));
    }
    all
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 10,
        factor: 1.0,
        min: Duration::from_millis(10),
        max: Duration::from_millis(10),
        jitter: 0.0,
    }
}

// ---- 20,000 runs, limits ------------------------------------------------------------------

const SCALE_RUNS: usize = 20_000;
const ENV_LIMIT: [(&str, u64); 2] = [("default", 12), ("b", 6)];

/// (queue, per-key limit, key total limit) — 0: none.
const QUEUE_LIMITS: [(&str, u64, u64); 4] =
    [("q0", 2, 0), ("q1", 0, 3), ("q2", 1, 4), ("q3", 0, 0)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_runs_three_processes_limits_hold() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let url = redis_support::url();
    let prefix = redis_support::fresh_prefix("scale");
    let schema = format!("rlt_scale_{}", std::process::id());
    let mut parent = config(&url, &prefix, &schema);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .unwrap_or_else(|e| panic!("redis and postgresql are required: {e}"));
    for (env, limit) in ENV_LIMIT {
        engine
            .set_env(
                env,
                EnvSettings {
                    limit: u32::try_from(limit).expect("limit"),
                    ..EnvSettings::default()
                },
            )
            .await
            .expect("env");
        for (queue, key_limit, total) in QUEUE_LIMITS {
            let settings = QueueSettings {
                limit: (key_limit > 0).then(|| u32::try_from(key_limit).expect("limit")),
                key_total_limit: (total > 0).then(|| u32::try_from(total).expect("limit")),
                ..QueueSettings::default()
            };
            engine.set_queue(env, queue, settings).await.expect("queue");
        }
    }
    let dir = scratch("scale");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("w{i}.txt"))).collect();
    let children = Children(
        outs.iter()
            .map(|o| spawn_child(&url, &prefix, &schema, o, Duration::from_secs(10), &[]))
            .collect(),
    );
    let channel = format!("{{{prefix}}}:events");
    until("the worker processes", Duration::from_secs(60), || {
        subscribers(&url, &channel) >= 3
    })
    .await;

    let started = Instant::now();
    let runs = trigger_many(&engine, SCALE_RUNS, None, |i, env, queue, key| {
        let le = ENV_LIMIT.iter().find(|(e, _)| *e == env).map_or(0, |x| x.1);
        let (_, lk, lq) = QUEUE_LIMITS
            .iter()
            .find(|(q, _, _)| *q == queue)
            .copied()
            .unwrap_or(("", 0, 0));
        // A key's limit is the queue's per-key limit, else the env's.
        let lk = if lk > 0 { lk } else { le };
        json!({ "q": queue, "k": key, "le": le, "lq": lq, "lk": lk, "ms": (i % 3) as u64 })
    })
    .await;
    assert_eq!(runs.len(), SCALE_RUNS);
    let triggered = started.elapsed();
    all_completed(&engine, &runs, Duration::from_secs(240)).await;
    let elapsed = started.elapsed();
    drop(children);

    let executions = starts(&outs);
    for run in &runs {
        assert_eq!(
            executions.get(&run.to_string()),
            Some(&1),
            "run {run} executed exactly once"
        );
    }
    assert_eq!(executions.len(), SCALE_RUNS, "no other run executed");
    let per_process: Vec<usize> = outs
        .iter()
        .map(|out| read_lines(out).into_iter().filter(|l| !l.done).count())
        .collect();
    assert!(
        per_process.iter().all(|n| *n > 0),
        "every worker process ran some: {per_process:?}"
    );
    let mut conn = redis_conn(&url);
    let keys = counter_keys(&prefix, "x", "x", "x");
    let violations: Vec<String> = redis::cmd("LRANGE")
        .arg(&keys[3])
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("violations");
    let maxima: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(&keys[4])
        .query(&mut conn)
        .expect("maxima");
    eprintln!(
        "scale: {SCALE_RUNS} runs triggered in {triggered:?}, all completed after {elapsed:?}; highest concurrency seen: {:?}",
        {
            let mut m: Vec<_> = maxima
                .iter()
                .filter(|(k, _)| !k.contains(":t:k:"))
                .collect();
            m.sort();
            m
        }
    );
    assert!(
        violations.is_empty(),
        "admission limits exceeded: {violations:?}"
    );
    // The check had something to check: some limit was reached.
    let env_b = maxima
        .get(&format!("{{{prefix}}}:t:e:b"))
        .copied()
        .unwrap_or(0);
    assert!(env_b >= 2, "env b ran at most {env_b} at once");
    // Every run ended: no queue key keeps state in Redis (40 keys whose runs waited behind
    // their limits). The acks trail the terminal writes a moment.
    let key_state = || -> Vec<String> {
        let mut conn = redis_conn(&url);
        let mut left = Vec::new();
        for kind in ["k:", "kl:", "kt:", "kq:", "kn"] {
            let found: Vec<String> = redis::Commands::scan_match::<_, String>(
                &mut conn,
                format!("{{{prefix}}}:{kind}*"),
            )
            .expect("scan")
            .collect();
            left.extend(found);
        }
        left
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = key_state();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue key state left after every run ended: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}

// ---- SIGKILL of a worker process ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_runs_recovered_within_lease_plus_one_second() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // The surviving process has a slot for every run, each working long enough to be cut:
    // nothing queues behind a recovered run, so its next start measures the recovery itself.
    const RUNS: usize = 16;
    let lease = Duration::from_secs(2);
    let url = redis_support::url();
    let prefix = redis_support::fresh_prefix("kill");
    let schema = format!("rlt_kill_{}", std::process::id());
    let dir = scratch("kill");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("w{i}.txt"))).collect();

    // The first worker process opens first and so owns the timers. It has half the runs'
    // slots and takes runs alone, so it holds exactly half of them; the second process, with
    // a slot for every run, then starts the other half and has room for all the victim's.
    // Both log their warnings: a lease the survivor loses shows why (see the last assertion).
    let env_b = [("RUNLANE_TEST_ENV_B", "1"), ("RUNLANE_TEST_LOG", "1")];
    let victim_slots = RUNS / 2;
    let victim_env = [
        ("RUNLANE_TEST_ENV_B", "1"),
        ("RUNLANE_TEST_SLOTS", &*victim_slots.to_string()),
        ("RUNLANE_TEST_LOG", "1"),
    ];
    let mut children = Children(vec![spawn_child(
        &url,
        &prefix,
        &schema,
        &outs[0],
        lease,
        &victim_env,
    )]);
    let timer_key = format!("{{{prefix}}}:timer");
    let owner = || -> Option<String> {
        redis::cmd("GET")
            .arg(&timer_key)
            .query::<Option<String>>(&mut redis_conn(&url))
            .ok()
            .flatten()
    };
    until("a timer owner", Duration::from_secs(60), || {
        owner().is_some()
    })
    .await;
    let victim_pid = children.0[0].id();
    assert!(
        owner().is_some_and(|o| o.starts_with(&format!("{victim_pid}-"))),
        "the first worker process owns the timers"
    );
    let mut parent = config(&url, &prefix, &schema);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .unwrap_or_else(|e| panic!("redis and postgresql are required: {e}"));
    let channel = format!("{{{prefix}}}:events");
    until("the first worker process", Duration::from_secs(60), || {
        subscribers(&url, &channel) >= 2
    })
    .await;

    // Long enough that the victim's runs are still executing when the second process has
    // started the rest and the victim is killed.
    let runs = trigger_many(
        &engine,
        RUNS,
        Some(fast_retry()),
        |_, _, _, _| json!({ "ms": 8_000 }),
    )
    .await;
    until(
        "the victim to fill its slots",
        Duration::from_secs(60),
        || starts(&outs).len() == victim_slots,
    )
    .await;
    // The survivor's own leases are longer: a stall of its runtime while it takes the victim's
    // work over (timers, recovered runs) must not lapse a run it holds, which would then run
    // twice; the bound below is the victim's lease's.
    children.0.push(spawn_child(
        &url,
        &prefix,
        &schema,
        &outs[1],
        lease * 2,
        &env_b,
    ));
    // SIGKILL the timer owner once every run started, half of them in it.
    until("every run to start", Duration::from_secs(60), || {
        starts(&outs).len() == RUNS
    })
    .await;
    let victim_runs = read_lines(&outs[0]).iter().filter(|l| !l.done).count();
    assert!(victim_runs >= 2, "the victim runs {victim_runs} of {RUNS}");
    children.0[0].kill().expect("SIGKILL the victim");
    let killed_at = wall_ms();
    let _ = children.0[0].wait();

    all_completed(&engine, &runs, Duration::from_secs(120)).await;
    let took_over = owner();
    let survivor_pid = children.0[1].id();
    drop(children);

    let victim = read_lines(&outs[0]);
    let survivor = read_lines(&outs[1]);
    let victim_done: HashSet<&str> = victim
        .iter()
        .filter(|l| l.done)
        .map(|l| l.run.as_str())
        .collect();
    let victim_started: HashSet<&str> = victim
        .iter()
        .filter(|l| !l.done)
        .map(|l| l.run.as_str())
        .collect();
    let in_flight: HashSet<&str> = victim_started.difference(&victim_done).copied().collect();
    assert!(!in_flight.is_empty(), "the victim was killed mid-run");
    // Each run the victim held is claimed again by the survivor within lease + 1 s.
    let bound = lease + Duration::from_secs(1);
    let mut worst = Duration::ZERO;
    for run in &in_flight {
        let again = survivor
            .iter()
            .find(|l| !l.done && l.run == *run && l.at >= killed_at)
            .unwrap_or_else(|| panic!("run {run} held by the killed process never ran again"));
        let after = Duration::from_millis(again.at - killed_at);
        worst = worst.max(after);
        assert!(
            after <= bound,
            "run {run} recovered {after:?} after the kill (bound {bound:?})"
        );
    }
    eprintln!(
        "kill: {} runs in flight at the SIGKILL, recovered at most {worst:?} after it (lease {lease:?})",
        in_flight.len()
    );
    // Another process (the surviving worker or this one) owns the timers now.
    assert!(
        took_over
            .as_deref()
            .is_some_and(|o| !o.starts_with(&format!("{victim_pid}-"))),
        "another process took the timers over: {took_over:?} (survivor {survivor_pid})"
    );
    // Every run executed once, except runs the victim had started, which may have run twice.
    // A failure shows when each process started the run, in ms after the kill.
    let executions = starts(&outs);
    let timeline = |id: &str| -> String {
        let at = |lines: &[Line], who: &str| -> Vec<String> {
            lines
                .iter()
                .filter(|l| l.run == id)
                .map(|l| {
                    let what = if l.done { "done" } else { "start" };
                    format!("{who} {what} {:+}", l.at as i64 - killed_at as i64)
                })
                .collect()
        };
        [at(&victim, "victim"), at(&survivor, "survivor")]
            .concat()
            .join(", ")
    };
    for run in &runs {
        let id = run.to_string();
        let n = executions.get(&id).copied().unwrap_or(0);
        if victim_started.contains(id.as_str()) {
            assert!(
                (1..=2).contains(&n),
                "run {run} executed {n} times: {}",
                timeline(&id)
            );
        } else {
            assert_eq!(n, 1, "run {run} executed exactly once: {}", timeline(&id));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}

// ---- FLUSHALL under load --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_under_load_across_processes() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const RUNS: usize = 2_000;
    let server = PrivateRedis::start("xproc-flush");
    let url = server.url();
    let prefix = redis_support::fresh_prefix("flush");
    let schema = format!("rlt_xflush_{}", std::process::id());
    let dir = scratch("flush");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("w{i}.txt"))).collect();
    let mut parent = config(&url, &prefix, &schema);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .unwrap_or_else(|e| panic!("postgresql is required: {e}"));
    let children = two_workers(&engine, &url, &url, &prefix, &schema, &outs, &[]).await;

    // Producers trigger while the workers run; the server is flushed once a quarter of the
    // runs started, with leases outstanding.
    let producing = {
        let engine = engine.engine().clone();
        tokio::spawn(async move {
            trigger_many(
                &engine,
                RUNS,
                Some(fast_retry()),
                |i, _, _, _| json!({ "ms": (i % 4) as u64 * 5 }),
            )
            .await
        })
    };
    until(
        "a quarter of the runs to start",
        Duration::from_secs(60),
        || starts(&outs).len() >= RUNS / 4,
    )
    .await;
    let flushed_at = wall_ms();
    server.flushall();
    let runs = producing.await.expect("producers");
    assert_eq!(runs.len(), RUNS);
    all_completed(&engine, &runs, Duration::from_secs(120)).await;
    drop(children);

    let mut started_before: HashSet<String> = HashSet::new();
    for out in &outs {
        for line in read_lines(out) {
            // A run claimed before the flush writes its start line a moment later. (A wider
            // window would make the check below vacuous: producers still trigger during the
            // flush, and on a quick machine every run starts within a second or two of it.)
            if !line.done && line.at <= flushed_at + 500 {
                started_before.insert(line.run);
            }
        }
    }
    let executions = starts(&outs);
    let mut twice = 0;
    for run in &runs {
        let id = run.to_string();
        let n = executions.get(&id).copied().unwrap_or(0);
        if n != 1 {
            assert!(
                n == 2 && started_before.contains(&id),
                "run {run} executed {n} times"
            );
            twice += 1;
        }
    }
    eprintln!(
        "flushall: {RUNS} runs, lost 0, {} started before the flush, {twice} ran twice",
        started_before.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}

// ---- a Redis outage across processes ------------------------------------------------------

/// `host:port` of the shared Redis URL (`redis://host:port[/db]`).
fn redis_address() -> String {
    let url = redis_support::url();
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_across_processes_nothing_lost() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const BEFORE: usize = 400;
    const DURING: usize = 200;
    const OUTAGE: Duration = Duration::from_millis(1500);
    // Every process (the test's and both workers) reaches the shared server through the proxy;
    // the cut keeps Redis's data, as a network outage does.
    let proxy = Proxy::start(redis_address()).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let prefix = redis_support::fresh_prefix("outage");
    let schema = format!("rlt_xoutage_{}", std::process::id());
    let dir = scratch("outage");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("w{i}.txt"))).collect();
    let mut parent = config(&url, &prefix, &schema);
    parent.redis.response_timeout = Duration::from_millis(500);
    parent.reconcile.grace = Duration::from_millis(300);
    parent.reconcile.retry_after = Duration::from_millis(200);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .unwrap_or_else(|e| panic!("redis and postgresql are required: {e}"));
    let direct = redis_support::url();
    let children = two_workers(&engine, &url, &direct, &prefix, &schema, &outs, &[]).await;

    let work = |i: usize, _: &str, _: &str, _: &str| json!({ "ms": (i % 4) as u64 * 5 });
    let before = trigger_many(engine.engine(), BEFORE, None, work).await;
    until(
        "a quarter of the runs to start",
        Duration::from_secs(60),
        || starts(&outs).len() >= BEFORE / 4,
    )
    .await;

    // The outage: leases are outstanding in both workers.
    proxy.cut().await;
    let cut = Instant::now();
    let during = trigger_many(engine.engine(), DURING, None, work).await;
    let spent = cut.elapsed();
    assert!(
        spent < Duration::from_secs(20),
        "triggers during the outage are accepted without waiting for redis each time: {spent:?}"
    );
    assert!(
        engine.queue().deferred() >= 1,
        "enqueues were deferred to the reconciler"
    );
    let health = engine.health().await;
    assert!(
        !health.redis && health.postgres,
        "health names redis: {health:?}"
    );
    // The outage lasts past the subscribers' reconnect delay and most of a lease, so every
    // process loses messages and heartbeats (the duration is the scenario, not a wait).
    tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await;
    let outage = cut.elapsed();
    proxy.restore();

    let runs: Vec<RunId> = before.iter().chain(&during).copied().collect();
    all_completed(&engine, &runs, Duration::from_secs(120)).await;
    drop(children);
    assert!(engine.health().await.ok(), "both sides answer again");

    // Exactly once each. A handler (at most 15 ms) that ended during the outage had its end
    // written to PostgreSQL though its lease could not be checked (the store fences by
    // attempt); when that lease lapsed, PostgreSQL was read first and the run was only cleaned
    // out of Redis, never run again.
    started_once_each(&outs, &runs);
    eprintln!(
        "redis outage: {} runs ({DURING} triggered during the cut, {} deferred), lost 0, \
         none ran twice, redis cut for {outage:?} (triggers during it took {spent:?})",
        runs.len(),
        engine.queue().deferred()
    );
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}

// ---- a PostgreSQL outage across processes -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_across_processes_nothing_lost() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const RUNS: usize = 600;
    const OUTAGE: Duration = Duration::from_millis(1500);
    let (user, host, db) = split_url(&database_url());
    let proxy = Proxy::start(host).await;
    let database = format!("postgres://{user}127.0.0.1:{}{db}", proxy.port());
    let url = redis_support::url();
    let prefix = redis_support::fresh_prefix("pgoutage");
    let schema = format!("rlt_xpgoutage_{}", std::process::id());
    let dir = scratch("pgoutage");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("w{i}.txt"))).collect();
    let mut parent = config(&url, &prefix, &schema);
    parent.postgres.url = database.clone();
    parent.postgres.acquire_timeout = Duration::from_secs(1);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .unwrap_or_else(|e| panic!("redis and postgresql are required: {e}"));
    let extra = [("RUNLANE_DATABASE_URL", database.as_str())];
    let children = two_workers(&engine, &url, &url, &prefix, &schema, &outs, &extra).await;

    // Handlers of 0–60 ms, so some are running when the proxy is cut and return during it.
    let work = |i: usize, _: &str, _: &str, _: &str| json!({ "ms": (i % 4) as u64 * 20 });
    let runs = trigger_many(engine.engine(), RUNS, None, work).await;
    until(
        "a quarter of the runs to start",
        Duration::from_secs(60),
        || starts(&outs).len() >= RUNS / 4,
    )
    .await;

    proxy.cut().await;
    let cut = Instant::now();
    let refused = engine.trigger("job").send().await;
    assert!(
        matches!(refused, Err(EngineError::Unavailable(_))),
        "a trigger fails with Unavailable while postgresql is cut: {refused:?}"
    );
    let spent = cut.elapsed();
    assert!(
        spent < Duration::from_secs(10),
        "the trigger failed fast: {spent:?}"
    );
    let health = engine.health().await;
    assert!(
        health.redis && !health.postgres,
        "health names postgresql: {health:?}"
    );
    let started_by_cut = starts(&outs).len();
    // The outage lasts most of a lease (the duration is the scenario, not a wait).
    tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await;
    let outage = cut.elapsed();
    proxy.restore();

    all_completed(&engine, &runs, Duration::from_secs(120)).await;
    drop(children);
    assert!(engine.health().await.ok(), "both sides answer again");
    started_once_each(&outs, &runs);
    eprintln!(
        "postgres outage: {RUNS} runs, {started_by_cut} started by the cut, lost 0, none ran \
         twice, postgresql cut for {outage:?} (a trigger during it failed in {spent:?})"
    );
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}

// ---- a crash in the middle of a rebuild -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_rebuild_next_process_completes_it() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let server = PrivateRedis::start("xproc-rebuild");
    let url = server.url();
    let prefix = redis_support::fresh_prefix("midreb");
    let schema = format!("rlt_midreb_{}", std::process::id());
    let executed: Executions = Arc::default();

    // Ten runs complete, thirty wait; this engine is gone before the flush.
    let first = runlane::distributed_with(EngineBuilder::new(), config(&url, &prefix, &schema))
        .await
        .unwrap_or_else(|e| panic!("postgresql is required: {e}"));
    let worker = counting_worker(first.worker(), &executed).await;
    let mut done = Vec::new();
    for _ in 0..10 {
        done.push(first.trigger("job").send().await.expect("trigger").run.id);
    }
    all_completed(&first, &done, Duration::from_secs(60)).await;
    worker.stop().await;
    let mut waiting = Vec::new();
    for i in 0..30 {
        let run = first
            .trigger("job")
            .queue(&format!("q{}", i % 3))
            .send()
            .await
            .expect("trigger");
        waiting.push(run.run.id);
    }
    first.shutdown().await;
    drop(first);

    // A child opens, the key space is lost, and the child dies halfway through its rebuild.
    let dir = scratch("midreb");
    let mut child = spawn_child(
        &url,
        &prefix,
        &schema,
        &dir.join("child.txt"),
        Duration::from_secs(2),
        &[
            ("RUNLANE_FAILPOINT", "mid_rebuild"),
            ("RUNLANE_TEST_STDIN_REBUILD", "1"),
        ],
    );
    // The child owns the timers once it is open (the first engine gave them up).
    let timer_key = format!("{{{prefix}}}:timer");
    let child_pid = child.id();
    until("the child", Duration::from_secs(60), || {
        redis::cmd("GET")
            .arg(&timer_key)
            .query::<Option<String>>(&mut redis_conn(&url))
            .ok()
            .flatten()
            .is_some_and(|o| o.starts_with(&format!("{child_pid}-")))
    })
    .await;
    server.flushall();
    child
        .stdin
        .take()
        .map(|mut stdin| writeln!(stdin, "rebuild"))
        .transpose()
        .expect("tell the child");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("the child ends");
    assert!(
        !status.success(),
        "the child aborted in the rebuild: {status:?}"
    );
    // It left the key space marked as being rebuilt, with only part of the runs.
    let mut conn = redis_conn(&url);
    let marked: Option<String> = redis::cmd("HGET")
        .arg(format!("{{{prefix}}}:cfg"))
        .arg("reb")
        .query(&mut conn)
        .expect("cfg");
    assert_eq!(
        marked.as_deref(),
        Some("1"),
        "the rebuild was left half done"
    );

    // The next process completes the rebuild: every waiting run, and only those, runs once.
    let mut next = config(&url, &prefix, &schema);
    next.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), next)
        .await
        .expect("the next process opens");
    let snapshot = engine.queue().snapshot().await.expect("snapshot");
    let mut held: Vec<RunId> = snapshot.iter().map(|l| l.dispatch.run_id).collect();
    held.sort();
    let mut expected = waiting.clone();
    expected.sort();
    assert_eq!(
        held, expected,
        "the rebuild is complete: exactly the unfinished runs"
    );
    let worker = counting_worker(engine.worker(), &executed).await;
    all_completed(&engine, &waiting, Duration::from_secs(60)).await;
    worker.stop().await;
    let executed = executed.lock().expect("lock").clone();
    for run in done.iter().chain(&waiting) {
        assert_eq!(
            executed.get(run),
            Some(&1),
            "run {run} executed exactly once"
        );
    }
    assert_eq!(executed.len(), 40);
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}
