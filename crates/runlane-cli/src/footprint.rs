//! `runlane bench footprint --backend redis`: what a pending run costs in Redis (SPEC §6, §9).
//!
//! Each mix loads `runs` pending runs into a fresh key prefix on a PRIVATE `redis-server`
//! (unix socket in a temporary directory, no persistence), so `used_memory` is not polluted by
//! anyone else, and reports one JSON line: `redis_bytes_per_run` (the `used_memory` delta over
//! the runs), `message_bytes` (the mean stored value per pending run: its record, or in key-space
//! format 3 its key's list entry), the mix, the runs, Redis's
//! `zset-max-listpack-entries`, and the Redis time of claim + complete per run (the
//! `fcall` microseconds of `INFO commandstats`, plus `evalsha` for builds that ran the dispatch
//! as a script, over a separate claim/finish pass, divided by the runs it finished).
//!
//! Mixes: `reference` (due, default priority, 10 queues, half with a TTL), `delayed_prioritized`
//! (half delayed up to an hour, half due with a priority up to an hour, 10 queues) and
//! `10k_queues` (like `reference` over 10,000 queues).

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use redis::AsyncCommands;
use runlane::core::backend::{ClaimRequest, Dispatch, EnqueueAs, QueueBackend, ServedEnv};
use runlane::core::{
    ClaimChain, EnvName, EnvSettings, LaneName, QueueName, RunId, Timestamp, WorkerId,
};
use runlane::{RedisConfig, RedisQueue};
use serde_json::{json, Value};

/// The engine clock of the bench (any fixed instant: the backend never reads a clock).
const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Runs measured by the claim + complete pass.
const CLAIM_RUNS: u32 = 10_000;

/// A load mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// 100,000 due, default-priority runs in 10 queues, half with a TTL (SPEC §6).
    Reference,
    /// Half delayed, half due with a priority.
    DelayedPrioritized,
    /// Due runs over 10,000 queues, half with a TTL.
    TenKQueues,
}

impl Mix {
    /// The name in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Mix::Reference => "reference",
            Mix::DelayedPrioritized => "delayed_prioritized",
            Mix::TenKQueues => "10k_queues",
        }
    }

    fn queues(self) -> u64 {
        match self {
            Mix::TenKQueues => 10_000,
            _ => 10,
        }
    }
}

/// A private redis-server, killed (and its directory removed) on drop.
struct PrivateRedis {
    child: std::process::Child,
    dir: PathBuf,
}

impl PrivateRedis {
    fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("runlane-footprint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(dir.join("redis.sock"))
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start redis-server (is it installed?)")?;
        let stdout = child.stdout.take().context("redis-server stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.to_ascii_lowercase().contains("ready to accept") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    bail!("redis-server exited before it was ready");
                }
            }
        }
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(PrivateRedis { child, dir })
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> anyhow::Result<String> {
    let text: String = redis::cmd("INFO").arg(section).query_async(conn).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|s| s.trim().to_string())
        .with_context(|| format!("INFO {section} has no {field}"))
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<i64> {
    Ok(info_field(conn, "memory", "used_memory").await?.parse()?)
}

fn name<T>(r: Result<T, runlane::core::InvalidInput>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!(e))
}

/// The dispatch facts of run `i` of a mix.
fn dispatch(mix: Mix, i: u64, env: &EnvName, queues: &[QueueName]) -> Dispatch {
    // Ids as the engine mints them: the trigger instant in the top 48 bits, a counter below.
    let run_id = RunId((u128::from(T0.as_millis()) << 80) | u128::from(i));
    let queue = queues[(i % queues.len() as u64) as usize].clone();
    let spread = |n: u64| (i.wrapping_mul(2_654_435_761) % n) + 1;
    let (run_after, priority, ttl) = match mix {
        Mix::Reference | Mix::TenKQueues => (
            T0,
            Duration::ZERO,
            (i & 1 == 0).then(|| T0.saturating_add(Duration::from_secs(3600))),
        ),
        Mix::DelayedPrioritized => {
            if i & 1 == 0 {
                (
                    T0.saturating_add(Duration::from_millis(spread(3_600_000))),
                    Duration::ZERO,
                    None,
                )
            } else {
                (T0, Duration::from_secs(spread(3600)), None)
            }
        }
    };
    Dispatch {
        run_id,
        env: env.clone(),
        queue,
        key: Arc::from(""),
        lane: LaneName::default_lane(),
        priority,
        run_after,
        ttl_deadline: ttl,
        attempt: 1,
        locked_version: None,
        ever_leased: false,
        max_duration: None,
    }
}

/// Enqueues runs `0..runs` of a mix from 10 tasks at once. Each task owns a set of queues and
/// enqueues its runs in trigger (id) order, as one engine's producers do per queue key; runs
/// that reach a key out of order (concurrent producers racing on one key) go to the key's zset
/// instead of its FIFO list and cost more.
async fn load(queue: &Arc<RedisQueue>, mix: Mix, runs: u64, env: &EnvName) -> anyhow::Result<()> {
    let queues: Arc<Vec<QueueName>> = Arc::new(
        (0..mix.queues())
            .map(|q| name(QueueName::new(&format!("q{q}"))))
            .collect::<anyhow::Result<_>>()?,
    );
    let tasks_n = 10u64;
    let mut tasks = Vec::new();
    for t in 0..tasks_n {
        let (queue, queues, env) = (queue.clone(), queues.clone(), env.clone());
        tasks.push(tokio::spawn(async move {
            let n = queues.len() as u64;
            for i in 0..runs {
                // Run i goes to queue i % n; task t owns the queues q with q % tasks_n == t.
                if (i % n) % tasks_n != t {
                    continue;
                }
                queue
                    .enqueue(dispatch(mix, i, &env, &queues), EnqueueAs::Trigger, T0)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One mix: loads `runs` pending runs under a fresh prefix and measures Redis's memory.
async fn measure_mix(
    server: &PrivateRedis,
    conn: &mut redis::aio::MultiplexedConnection,
    mix: Mix,
    runs: u64,
) -> anyhow::Result<Value> {
    let prefix = format!("fp:{}", mix.name());
    let queue =
        Arc::new(RedisQueue::open(RedisConfig::new(server.url()).with_prefix(&prefix)).await?);
    let env = name(EnvName::new("bench"))?;
    // Limit 0: nothing is admitted, every run stays pending (delayed or queued).
    let settings = EnvSettings {
        limit: 0,
        ..EnvSettings::default()
    };
    queue.put_env(&env, settings, T0).await?;
    let before = used_memory(conn).await?;
    load(&queue, mix, runs, &env).await?;
    let after = used_memory(conn).await?;
    // The mean stored value per pending run: each pending run is stored once, as a record
    // (`{p}:run:<bucket>` hash values) or, in key-space format 3, as its key's list entry
    // (`{p}:kl:…`, tombstones excluded: none here, nothing was removed).
    let base = queue.key_base().to_string();
    let value_bytes = stored_value_bytes(conn, &base).await?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(conn).await?;
    let by_kind = memory_by_kind(conn, &base).await?;
    queue.delete_keys().await?;
    Ok(json!({
        "mix": mix.name(),
        "runs": runs,
        "queues": mix.queues(),
        "redis_bytes_per_run": (after - before) as f64 / runs as f64,
        "used_memory_delta": after - before,
        "message_bytes": value_bytes as f64 / runs as f64,
        "redis_keys": keys,
        "memory_usage_bytes_per_run_by_kind": by_kind
            .into_iter()
            .map(|(k, v)| (k, json!(v as f64 / runs as f64)))
            .collect::<serde_json::Map<String, Value>>(),
    }))
}

/// Every key under `base`, each once (SCAN may return a key more than once while the keyspace
/// rehashes, which would count its bytes twice).
async fn keys_under(
    conn: &mut redis::aio::MultiplexedConnection,
    base: &str,
) -> anyhow::Result<std::collections::BTreeSet<Vec<u8>>> {
    let mut iter = conn.scan_match::<_, Vec<u8>>(format!("{base}:*")).await?;
    let mut keys = std::collections::BTreeSet::new();
    while let Some(key) = iter.next_item().await {
        keys.insert(key);
    }
    Ok(keys)
}

/// The bytes of every stored run value under `base`: record hash values and FIFO list entries.
async fn stored_value_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    base: &str,
) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for key in keys_under(conn, base).await? {
        let rest = &key[base.len().min(key.len())..];
        let values: Vec<Vec<u8>> = if rest.starts_with(b":run:") {
            redis::cmd("HVALS")
                .arg(key.as_slice())
                .query_async(conn)
                .await?
        } else if rest.starts_with(b":kl:") {
            redis::cmd("LRANGE")
                .arg(key.as_slice())
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await?
        } else {
            Vec::new()
        };
        total += values.iter().map(|v| v.len() as u64).sum::<u64>();
    }
    Ok(total)
}

/// `MEMORY USAGE` of every key under `base`, summed per kind (the name part after the base).
async fn memory_by_kind(
    conn: &mut redis::aio::MultiplexedConnection,
    base: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for key in keys_under(conn, base).await? {
        let usage: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key.as_slice())
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await?;
        let rest = &key[base.len().min(key.len())..];
        let kind = rest
            .split(|b| *b == b':')
            .nth(1)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        *out.entry(kind).or_default() += usage.unwrap_or(0);
    }
    Ok(out)
}

async fn measure_claim(
    server: &PrivateRedis,
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<ClaimCost> {
    let queue =
        Arc::new(RedisQueue::open(RedisConfig::new(server.url()).with_prefix("fp:claim")).await?);
    let env = name(EnvName::new("bench"))?;
    let settings = EnvSettings {
        limit: 1000,
        ..EnvSettings::default()
    };
    queue.put_env(&env, settings, T0).await?;
    load(&queue, Mix::Reference, u64::from(CLAIM_RUNS), &env).await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;
    let request = ClaimRequest {
        worker: WorkerId(1),
        chain: ClaimChain::default_chain(),
        max: 100,
        envs: vec![ServedEnv {
            env: env.clone(),
            version: 0,
        }],
        lease: Duration::from_secs(60),
    };
    let mut done = 0u64;
    let (mut claim_usec, mut finish_usec) = (0.0, 0.0);
    let mut last = script_usec(conn).await?;
    loop {
        let leased = queue.claim(&request, T0).await?;
        let after_claim = script_usec(conn).await?;
        claim_usec += after_claim - last;
        if leased.is_empty() {
            break;
        }
        for l in leased {
            queue.finish(l.dispatch.run_id, l.token, T0).await?;
            done += 1;
        }
        last = script_usec(conn).await?;
        finish_usec += last - after_claim;
    }
    let usec = claim_usec + finish_usec;
    queue.delete_keys().await?;
    if done == 0 {
        bail!("the claim pass finished no run");
    }
    Ok(ClaimCost {
        total_us_per_run: usec / done as f64,
        claim_us_per_run: claim_usec / done as f64,
        complete_us_per_run: finish_usec / done as f64,
        runs: done,
    })
}

/// Redis script time of the claim + complete pass.
struct ClaimCost {
    total_us_per_run: f64,
    claim_us_per_run: f64,
    complete_us_per_run: f64,
    runs: u64,
}

/// The microseconds of dispatch calls (`fcall`, and `evalsha` of builds that ran the dispatch
/// as a script) Redis has counted since the last `CONFIG RESETSTAT`.
async fn script_usec(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let mut usec = 0.0;
    for field in ["cmdstat_fcall", "cmdstat_evalsha"] {
        let Ok(stat) = info_field(conn, "commandstats", field).await else {
            continue;
        };
        let value: f64 = stat
            .split(',')
            .find_map(|kv| kv.strip_prefix("usec="))
            .with_context(|| format!("{field} has no usec"))?
            .parse()?;
        usec += value;
    }
    Ok(usec)
}

/// Runs the footprint bench for `mixes`; one JSON line per mix.
pub async fn footprint(backend: &str, mixes: &[Mix], runs: u64) -> anyhow::Result<Vec<Value>> {
    let revision = crate::bench::git_revision();
    if backend != "redis" {
        bail!("footprint is measured for --backend redis only (got {backend:?})");
    }
    let server = PrivateRedis::start()?;
    let client = redis::Client::open(server.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let listpack: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("zset-max-listpack-entries")
        .query_async(&mut conn)
        .await?;
    let listpack: u64 = listpack.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let version = info_field(&mut conn, "server", "redis_version").await?;
    let claim = measure_claim(&server, &mut conn).await?;
    let mut lines = Vec::new();
    for &mix in mixes {
        let mut line = measure_mix(&server, &mut conn, mix, runs).await?;
        if let Some(obj) = line.as_object_mut() {
            obj.insert("scenario".into(), json!("footprint"));
            obj.insert("backend".into(), json!("redis"));
            obj.insert("redis_version".into(), json!(version));
            obj.insert("zset_max_listpack_entries".into(), json!(listpack));
            obj.insert(
                "claim_complete_redis_us_per_run".into(),
                json!(claim.total_us_per_run),
            );
            obj.insert(
                "claim_redis_us_per_run".into(),
                json!(claim.claim_us_per_run),
            );
            obj.insert(
                "complete_redis_us_per_run".into(),
                json!(claim.complete_us_per_run),
            );
            obj.insert("claim_complete_runs".into(), json!(claim.runs));
            obj.insert("git_revision".into(), json!(revision));
        }
        lines.push(line);
    }
    Ok(lines)
}
