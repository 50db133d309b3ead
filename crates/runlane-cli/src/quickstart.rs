//! `runlane quickstart`: a guided tour of the engine in one process.
//!
//! It opens an in-memory engine, configures two envs, three queues and a custom lane, starts two
//! workers with different workloops, triggers a few hundred runs across queues, lanes,
//! priorities, delays and concurrency keys (some failing once to show retries, one sync
//! trigger-and-wait), prints progress as runs finish, and ends with a summary table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use runlane::core::backend::RunFilter;
use runlane::core::{EnvSettings, QueueSettings, RetryPolicy, RunStatus};
use runlane::{Engine, HandlerError, RunContext, RunEventKind, WaitOutcome};
use serde_json::json;

/// The tour's settings.
pub struct Options {
    /// Runs per env.
    pub runs: u32,
    /// Run on the in-memory backends instead of the embedded (SQLite) default.
    pub memory: bool,
    /// The data directory of the embedded engine.
    pub data: std::path::PathBuf,
}

const ENVS: [&str; 2] = ["default", "acme"];

/// Runs the tour and prints the summary.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let engine = if opts.memory {
        println!("runlane quickstart on the in-memory backends (nothing durable)");
        runlane::memory().await?
    } else {
        // A fresh tour every time: only the quickstart's own file is replaced.
        let path = opts.data.join("quickstart.db");
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            }
        }
        println!(
            "runlane quickstart on the embedded engine: runs durable in {}",
            path.display()
        );
        runlane::embedded(&path).await?
    };
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 8,
                ..EnvSettings::default()
            },
        )
        .await?;
    engine
        .set_env(
            "acme",
            EnvSettings {
                limit: 4,
                weight: 2,
                ..EnvSettings::default()
            },
        )
        .await?;
    engine.add_lane("reports").await?;
    for env in ENVS {
        engine
            .set_queue(
                env,
                "emails",
                QueueSettings {
                    limit: Some(1),
                    ..QueueSettings::default()
                },
            )
            .await?;
        engine
            .set_queue(
                env,
                "reports",
                QueueSettings {
                    key_total_limit: Some(2),
                    ..QueueSettings::default()
                },
            )
            .await?;
    }
    println!("runlane quickstart: 2 envs (default limit 8, acme limit 4 weight 2), lanes default/fast_lane/manual/reports");

    let started = Arc::new(AtomicU64::new(0));
    let general = engine
        .worker()
        .env("default")
        .env("acme")
        .workloops("fast_lane:1 manual>default:6")
        .handler("send-email", {
            let started = started.clone();
            move |ctx| work(ctx, started.clone(), 2)
        })
        .handler("deliver-webhook", {
            let started = started.clone();
            move |ctx| flaky(ctx, started.clone())
        })
        .handler("resize-image", {
            let started = started.clone();
            move |ctx| work(ctx, started.clone(), 1)
        })
        .start()
        .await?;
    let reports = engine
        .worker()
        .env("default")
        .env("acme")
        .workloops("reports:2")
        .handler("build-report", {
            let started = started.clone();
            move |ctx| work(ctx, started.clone(), 5)
        })
        .start()
        .await?;
    println!("workers: general `fast_lane:1 manual>default:6` (filter mode: never claims `reports`), reports `reports:2`\n");

    let mut events: Vec<_> = ENVS
        .iter()
        .map(|env| engine.subscribe_env(env))
        .collect::<Result<_, _>>()?;
    let begin = Instant::now();
    let mut total = 0u64;
    for env in ENVS {
        total += trigger_mix(&engine, env, opts.runs).await?;
    }

    // A sync trigger rides fast_lane and waits for its result.
    let sync = engine
        .trigger("resize-image")
        .payload(&json!({ "image": "hero.png" }))
        .wait(Duration::from_secs(30))
        .await?;
    total += 1;
    if let WaitOutcome::Finished(run) = &sync {
        println!(
            "sync trigger-and-wait: {} finished {} in lane {}",
            run.id, run.status, run.lane
        );
    }

    // Progress: count terminal events until every run is done, one line per tenth.
    let mut finished = 1u64; // the sync run
    let step = (total / 10).max(1);
    let mut next_report = step;
    while finished < total {
        for sub in events.iter_mut() {
            if let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(5), sub.next()).await
            {
                if let RunEventKind::Status { status, .. } = event.kind {
                    if status.is_terminal() {
                        finished += 1;
                    }
                }
            }
        }
        if finished >= next_report || finished == total {
            println!(
                "  {:>6.2}s  finished {finished:>4}/{total}  handler starts {:>4}",
                begin.elapsed().as_secs_f64(),
                started.load(Ordering::Relaxed)
            );
            next_report = finished + step;
        }
    }
    let elapsed = begin.elapsed();
    general.stop().await;
    reports.stop().await;

    print_summary(&engine, elapsed).await
}

/// Triggers the mix for one env; returns how many runs it made.
async fn trigger_mix(engine: &Engine, env: &str, runs: u32) -> anyhow::Result<u64> {
    let mut made = 0u64;
    for i in 0..runs {
        let builder = match i % 4 {
            0 => engine
                .trigger("send-email")
                .queue("emails")
                .key(&format!("customer-{}", i % 5))
                .payload(&json!({ "to": format!("user{i}@example.com") })),
            1 => engine
                .trigger("build-report")
                .queue("reports")
                .lane("reports")
                .key(&format!("team-{}", i % 3))
                .priority(Duration::from_secs(u64::from(i % 3) * 30))
                .payload(&json!({ "report": i })),
            2 => engine
                .trigger("deliver-webhook")
                .retry(RetryPolicy {
                    attempts_max: 3,
                    min: Duration::from_millis(20),
                    max: Duration::from_millis(100),
                    ..RetryPolicy::default()
                })
                .payload(&json!({ "hook": i })),
            _ => engine
                .trigger("resize-image")
                .delay(Duration::from_millis(u64::from(i % 7) * 40))
                .payload(&json!({ "image": format!("img{i}.png") })),
        };
        builder
            .env(env)
            .send()
            .await
            .with_context(|| format!("trigger {i} in {env}"))?;
        made += 1;
    }
    Ok(made)
}

/// A handler that reports progress and takes a few milliseconds.
async fn work(
    ctx: RunContext,
    started: Arc<AtomicU64>,
    ms: u64,
) -> Result<serde_json::Value, HandlerError> {
    started.fetch_add(1, Ordering::Relaxed);
    ctx.progress(&json!({ "step": "working" }));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({ "ok": true, "attempt": ctx.attempt() }))
}

/// Fails its first attempt, to show retries.
async fn flaky(
    ctx: RunContext,
    started: Arc<AtomicU64>,
) -> Result<serde_json::Value, HandlerError> {
    started.fetch_add(1, Ordering::Relaxed);
    if ctx.attempt() == 1 {
        return Err(HandlerError::new("endpoint returned 503"));
    }
    Ok(json!({ "delivered": true }))
}

async fn print_summary(engine: &Engine, elapsed: Duration) -> anyhow::Result<()> {
    #[derive(Default)]
    struct Row {
        runs: u64,
        completed: u64,
        failed: u64,
        other: u64,
        retried: u64,
        wait_ms: u64,
    }
    let mut rows: BTreeMap<(String, String, String), Row> = BTreeMap::new();
    for env in ENVS {
        let mut after = None;
        loop {
            let filter = RunFilter {
                env: Some(env.parse()?),
                after,
                limit: Some(1000),
                ..RunFilter::default()
            };
            let page = engine.list(&filter).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for run in &page {
                let row = rows
                    .entry((env.to_string(), run.queue.to_string(), run.lane.to_string()))
                    .or_default();
                row.runs += 1;
                match run.status {
                    RunStatus::Completed => row.completed += 1,
                    RunStatus::Failed => row.failed += 1,
                    _ => row.other += 1,
                }
                if run.attempts.len() > 1 {
                    row.retried += 1;
                }
                if let Some(end) = run.finished_at {
                    row.wait_ms += end.since(run.run_after).as_millis() as u64;
                }
            }
        }
    }
    println!(
        "\n{:<8} {:<15} {:<10} {:>5} {:>9} {:>6} {:>6} {:>7} {:>12}",
        "env", "queue", "lane", "runs", "completed", "failed", "other", "retried", "avg_done_ms"
    );
    let mut totals = Row::default();
    for ((env, queue, lane), r) in &rows {
        println!(
            "{env:<8} {queue:<15} {lane:<10} {:>5} {:>9} {:>6} {:>6} {:>7} {:>12.1}",
            r.runs,
            r.completed,
            r.failed,
            r.other,
            r.retried,
            r.wait_ms as f64 / r.runs.max(1) as f64
        );
        totals.runs += r.runs;
        totals.completed += r.completed;
        totals.failed += r.failed;
        totals.other += r.other;
        totals.retried += r.retried;
    }
    println!(
        "{:<8} {:<15} {:<10} {:>5} {:>9} {:>6} {:>6} {:>7}",
        "total", "", "", totals.runs, totals.completed, totals.failed, totals.other, totals.retried
    );
    println!(
        "\nall {} runs finished in {:.2}s",
        totals.runs,
        elapsed.as_secs_f64()
    );
    Ok(())
}
