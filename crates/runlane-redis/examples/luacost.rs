//! Where the Redis time of the drain path goes, per call kind: fills `RUNS` due runs on a
//! private Redis server, then drains them as the engine does (claim up to `BATCH`, check the
//! batch's leases, finish the batch), reading `INFO commandstats` around every call, and
//! prints one JSON line: `fcall` microseconds per run of `claim`, `check_leases` and
//! `finish_many`, and the commands the calls ran inside, per run.
//!
//! ```text
//! redis-server --port 6393 --save "" --appendonly no --daemonize yes
//! cargo run --release -p runlane-redis --example luacost -- redis://127.0.0.1:6393 20000 50 1000000
//! ```
//!
//! With `LUACOST_LIBRARY=<path to a dispatch.lua variant>` the loaded library's code is
//! replaced by the variant's after the fill (same names), so an idea is measured without a
//! rebuild; with `LUACOST_EARLY=1` as well, before the fill, so the enqueues run it too. The
//! fill's `fcall` microseconds per run (one `enqueue` call each) go to stderr.
//!
//! Arguments: server URL (a private server: its statistics are reset), runs, claim batch, env
//! limit (a limit below the runs leaves a backlog the finishes admit from, as the footprint
//! bench's claim pass does), then optionally `ttl` (every other run gets a TTL deadline) and
//! `single` (each run ends with its own `finish` call instead of a `finish_many` per batch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{ClaimRequest, Dispatch, EnqueueAs, Leased, QueueBackend, ServedEnv};
use runlane_core::chain::ClaimChain;
use runlane_core::{
    EnvName, EnvSettings, FencingToken, LaneName, QueueName, RunId, Timestamp, WorkerId,
};
use runlane_redis::{RedisConfig, RedisQueue};

const T0: Timestamp = Timestamp(1_700_000_000_000);

type Stats = BTreeMap<String, (u64, u64)>;

/// `cmdstat_<name>` → (calls, usec) since the last reset.
async fn stats(conn: &mut redis::aio::MultiplexedConnection) -> Stats {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    let mut out = Stats::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let field = |k: &str| -> u64 {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_string(), (field("calls="), field("usec=")));
    }
    out
}

/// Zeroes the server's command statistics.
async fn reset_stats(conn: &mut redis::aio::MultiplexedConnection) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await
        .expect("resetstat");
}

fn diff(into: &mut Stats, before: &Stats, after: &Stats) {
    for (name, (calls, usec)) in after {
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
        let e = into.entry(name.clone()).or_insert((0, 0));
        e.0 += calls - c0;
        e.1 += usec - u0;
    }
}

/// Replaces the loaded dispatch library's code with the source at `path` (same library and
/// function names), to measure a variant of `dispatch.lua` without rebuilding (the key space
/// was filled by the built-in library: the variant must read format 3).
async fn swap_library(conn: &mut redis::aio::MultiplexedConnection, path: &str) {
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(conn)
        .await
        .expect("FUNCTION LIST");
    let text = format!("{list:?}");
    let start = text.find("runlane_").expect("a runlane library is loaded");
    let name: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let name = name.trim_end_matches("_dispatch").to_string();
    let source = std::fs::read_to_string(path)
        .expect("library source")
        .replace("__RUNLANE_LIBRARY__", &name)
        .replace("__RUNLANE_FUNCTION__", &format!("{name}_dispatch"));
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(source)
        .query_async::<String>(conn)
        .await
        .expect("FUNCTION LOAD of the variant");
}

/// The server's process id (`INFO server`).
async fn server_pid(conn: &mut redis::aio::MultiplexedConnection) -> Option<u32> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// User + system CPU time of a local process, in ms (`/proc`, ticks of 10 ms).
fn cpu_ms(pid: Option<u32>) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) * 10)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6393".into());
    let arg = |i: usize, d: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let runs = arg(2, 20_000);
    let batch = arg(3, 50) as u32;
    let limit = arg(4, 1_000_000) as u32;
    let ttl = args[5.min(args.len())..].iter().any(|a| a == "ttl");
    // `single`: each run ends with its own `finish` call (as the footprint bench's claim pass
    // does) instead of one `finish_many` per claimed batch.
    let single = args[5.min(args.len())..].iter().any(|a| a == "single");

    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let prefix = format!("luacost:{}", std::process::id());
    let q = RedisQueue::open(RedisConfig::new(url.clone()).with_prefix(prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    let env = EnvName::new("bench").expect("env");
    let lane = LaneName::new("default").expect("lane");
    q.put_env(
        &env,
        EnvSettings {
            limit,
            ..EnvSettings::default()
        },
        T0,
    )
    .await
    .expect("env");
    q.add_lane(&lane).await.expect("lane");
    // A worker's consumer, as the engine registers one per worker (default chain).
    q.register_consumer(&ClaimChain::default_chain(), T0)
        .await
        .expect("consumer");
    // `LUACOST_EARLY=1`: the variant is loaded before the fill, so the enqueues run it too.
    let early = std::env::var("LUACOST_EARLY").is_ok();
    if let (true, Ok(path)) = (early, std::env::var("LUACOST_LIBRARY")) {
        swap_library(&mut conn, &path).await;
    }
    reset_stats(&mut conn).await;
    let queue = QueueName::new("q").expect("queue");
    for i in 0..runs {
        let d = Dispatch {
            run_id: RunId(u128::from(i) + 1),
            env: env.clone(),
            queue: queue.clone(),
            key: Arc::from(""),
            lane: lane.clone(),
            priority: Duration::ZERO,
            run_after: Timestamp(T0.0 + i),
            ttl_deadline: (ttl && i % 2 == 0).then_some(Timestamp(T0.0 + 3_600_000 + i)),
            attempt: 1,
            locked_version: None,
            ever_leased: false,
            max_duration: None,
        };
        q.enqueue(d, EnqueueAs::Trigger, Timestamp(T0.0 + runs))
            .await
            .expect("enqueue");
    }
    let filled = stats(&mut conn).await;
    let enqueue_us = filled.get("fcall").map(|x| x.1).unwrap_or(0) as f64 / runs.max(1) as f64;
    eprintln!("enqueue: fcall us per run {:.2}", enqueue_us);
    let now = Timestamp(T0.0 + runs + 1);
    let request = ClaimRequest {
        worker: WorkerId(1),
        chain: ClaimChain::default_chain(),
        max: batch,
        envs: vec![ServedEnv {
            env: env.clone(),
            version: 0,
        }],
        lease: Duration::from_secs(600),
    };
    if let (false, Ok(path)) = (early, std::env::var("LUACOST_LIBRARY")) {
        swap_library(&mut conn, &path).await;
    }
    reset_stats(&mut conn).await;
    let (mut s_claim, mut s_check, mut s_finish) = (Stats::new(), Stats::new(), Stats::new());
    let mut done = 0u64;
    // `LUACOST_TOTAL=1`: no statistics read between the calls (they cost the server CPU time
    // too); only the totals and the server's CPU time over the drain.
    let split = std::env::var("LUACOST_TOTAL").is_err();
    let pid = server_pid(&mut conn).await;
    let cpu0 = cpu_ms(pid);
    let t0 = std::time::Instant::now();
    if !split {
        loop {
            let leased = q.claim(&request, now).await.expect("claim");
            if leased.is_empty() {
                let cpu = cpu_ms(pid).map(|c| c - cpu0.unwrap_or(0));
                let all = stats(&mut conn).await;
                let inner: serde_json::Map<String, serde_json::Value> = all
                    .iter()
                    .filter(|(n, _)| !matches!(n.as_str(), "fcall" | "info" | "config|resetstat"))
                    .map(|(n, (c, u))| {
                        (
                            n.clone(),
                            serde_json::json!([
                                (*c as f64 / done as f64 * 100.0).round() / 100.0,
                                (*u as f64 / done as f64 * 100.0).round() / 100.0
                            ]),
                        )
                    })
                    .collect();
                let fcall = all.get("fcall").map(|x| x.1).unwrap_or(0) as f64 / done as f64;
                println!(
                    "{}",
                    serde_json::json!({
                        "runs": runs, "batch": batch, "limit": limit, "ttl": ttl,
                        "fcall_us_per_run": (fcall * 100.0).round() / 100.0,
                        "redis_cpu_us_per_run": cpu.map(|c| c as f64 * 1000.0 / done as f64),
                        "runs_per_s": (done as f64 / t0.elapsed().as_secs_f64()).round(),
                        "inner_calls_us_per_run": inner,
                    })
                );
                return;
            }
            let pairs = checked_pairs(&q, &leased).await;
            let answers = end_runs(&q, &pairs, single, now).await;
            assert!(answers.iter().all(Result::is_ok), "every finish holds");
            done += pairs.len() as u64;
        }
    }
    loop {
        let a = stats(&mut conn).await;
        let leased = q.claim(&request, now).await.expect("claim");
        let b = stats(&mut conn).await;
        diff(&mut s_claim, &a, &b);
        if leased.is_empty() {
            break;
        }
        let pairs = checked_pairs(&q, &leased).await;
        let c = stats(&mut conn).await;
        diff(&mut s_check, &b, &c);
        let answers = end_runs(&q, &pairs, single, now).await;
        assert!(answers.iter().all(Result::is_ok), "every finish holds");
        let d = stats(&mut conn).await;
        diff(&mut s_finish, &c, &d);
        done += pairs.len() as u64;
    }
    assert_eq!(done, runs, "every run drained");
    let per_run = |s: &Stats| {
        let mut inner = serde_json::Map::new();
        let mut fcall = 0.0;
        let mut calls = 0;
        for (name, (c, u)) in s {
            if name == "fcall" {
                fcall = *u as f64 / done as f64;
                calls = *c;
            } else if name != "info" {
                inner.insert(
                    name.clone(),
                    serde_json::json!([
                        (*c as f64 / done as f64 * 100.0).round() / 100.0,
                        (*u as f64 / done as f64 * 100.0).round() / 100.0
                    ]),
                );
            }
        }
        serde_json::json!({
            "fcall_us_per_run": (fcall * 100.0).round() / 100.0,
            "fcalls": calls,
            "inner_calls_us_per_run": inner,
        })
    };
    let total = [&s_claim, &s_check, &s_finish]
        .iter()
        .map(|s| s.get("fcall").map(|x| x.1).unwrap_or(0))
        .sum::<u64>() as f64
        / done as f64;
    println!(
        "{}",
        serde_json::json!({
            "runs": runs, "batch": batch, "limit": limit, "ttl": ttl,
            "fcall_us_per_run": (total * 100.0).round() / 100.0,
            "claim": per_run(&s_claim),
            "check_leases": per_run(&s_check),
            "finish_many": per_run(&s_finish),
        })
    );
}

/// Ends the leased `pairs`: one `finish` per run when `single` (as the footprint bench's pass
/// does), else one `finish_many` (as the engine's completer does).
async fn end_runs(
    q: &RedisQueue,
    pairs: &[(RunId, FencingToken)],
    single: bool,
    now: Timestamp,
) -> Vec<Result<(), runlane_core::QueueError>> {
    if single {
        let mut answers = Vec::new();
        for (run, token) in pairs {
            answers.push(q.finish(*run, *token, now).await.map(|_| ()));
        }
        answers
    } else {
        q.finish_many(pairs, now).await.expect("finish_many").0
    }
}

/// The leased runs' (id, token) pairs, after one `check_leases` that every lease holds (as the
/// engine's completer checks before it ends runs).
async fn checked_pairs(q: &RedisQueue, leased: &[Leased]) -> Vec<(RunId, FencingToken)> {
    let pairs: Vec<(RunId, FencingToken)> = leased
        .iter()
        .map(|l| (l.dispatch.run_id, l.token))
        .collect();
    let checks = q.check_leases(&pairs).await.expect("check_leases");
    assert!(checks.iter().all(Result::is_ok), "every lease holds");
    pairs
}
