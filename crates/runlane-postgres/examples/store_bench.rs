//! Run-store throughput: `callers` tasks each insert a run, note its start and write its
//! terminal state (the success path of one run: two row writes), until `runs` runs are done.
//! Prints one JSON line with the settings and the result.
//!
//! ```text
//! cargo run --release -p runlane-postgres --example store_bench -- <callers> <runs> <strict|relaxed> [writers]
//! ```
//!
//! The server is `RUNLANE_DATABASE_URL` (default the local one); a fresh schema is made and
//! dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runlane_core::backend::{RunRecord, RunStore};
use runlane_core::{
    EnvName, LaneName, QueueName, RetryPolicy, RunId, RunStatus, TaskName, Timestamp, TriggerSource,
};
use runlane_postgres::{admin, Durability, PostgresConfig, PostgresStore};

fn record(n: u64, now: Timestamp) -> RunRecord {
    RunRecord {
        id: RunId((u128::from(now.0) << 80) | u128::from(n)),
        env: EnvName::new("bench").expect("env"),
        task: TaskName::new("noop").expect("task"),
        version: 0,
        locked: false,
        payload: Arc::from(r#"{"n":1}"#),
        queue: QueueName::new("noop").expect("queue"),
        key: Arc::from(""),
        lane: LaneName::default_lane(),
        priority: Duration::ZERO,
        run_after: now,
        ttl: None,
        ttl_deadline: None,
        idempotency_key: None,
        retry: RetryPolicy::default(),
        max_duration: None,
        attempt: 1,
        status: RunStatus::Queued,
        output: None,
        error: None,
        attempts: Vec::new(),
        created_at: now,
        finished_at: None,
        started_at: None,
        source: TriggerSource::Standard,
        retry_of: None,
    }
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: store_bench <callers> <runs> <strict|relaxed> [writers]";
    let callers: u64 = args.first().ok_or(usage)?.parse()?;
    let runs: u64 = args.get(1).ok_or(usage)?.parse()?;
    let durability = match args.get(2).map(String::as_str) {
        Some("strict") => Durability::Strict,
        Some("relaxed") => Durability::Relaxed,
        _ => return Err(usage.into()),
    };
    let url = std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut config = PostgresConfig::new(url.clone());
    config.schema = format!("rlb_store_bench_{}", std::process::id());
    config.durability = durability;
    if let Some(writers) = args.get(3) {
        config.writers = writers.parse()?;
        config.pool_size = config.pool_size.max(config.writers as u32 + 2);
    }
    let store = Arc::new(PostgresStore::open(config.clone()).await?);

    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let store = store.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= runs {
                    return Ok::<(), runlane_core::StoreError>(());
                }
                let at = now();
                let r = record(n, at);
                let id = r.id;
                store.insert(vec![(r, None)], at).await?;
                store.note_start(id, 1, at);
                store
                    .finish(
                        id,
                        RunStatus::Completed,
                        Some(Arc::from("null")),
                        None,
                        now(),
                    )
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let stats = store.stats();
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let line = serde_json::json!({
        "bench": "store",
        "backend": "postgres",
        "durability": format!("{durability:?}").to_lowercase(),
        "synchronous_commit": durability.synchronous_commit(),
        "callers": callers,
        "runs": runs,
        "writers": config.writers,
        "pool_size": config.pool_size,
        "batch_max": config.batch_max,
        "elapsed_ms": elapsed.as_millis() as u64,
        "runs_per_s": (runs as f64 / elapsed.as_secs_f64()).round(),
        "commits": stats.commits,
        "calls_per_commit": if stats.commits > 0 { (stats.calls_committed as f64 / stats.commits as f64 * 10.0).round() / 10.0 } else { 0.0 },
        "largest_batch": stats.largest_batch,
        "rows_inserted": stats.rows_inserted,
        "rows_finished": stats.rows_finished,
        "starts_flushed": stats.starts_flushed,
        "git_revision": revision,
    });
    println!("{line}");
    drop(store);
    admin::drop_schema(&url, &config.schema).await?;
    Ok(())
}
