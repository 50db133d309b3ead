//! `runlane bench`: reproducible measurements, one JSON line per result (SPEC §9).
//!
//! Every line carries its settings (scenario, backend, topology, gap, phase, slots, runs,
//! payload size, git revision) so anyone can rerun it. Figures are measured in this process with
//! monotonic clocks; nothing is estimated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runlane::core::EnvSettings;
use runlane::{Engine, HandlerError, RunContext};
use serde_json::{json, Value};
use tokio::sync::mpsc;

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
}

async fn open(common: &Common) -> anyhow::Result<Engine> {
    let engine = match common.backend.as_str() {
        "memory" => runlane::memory().await?,
        other => bail!("unknown backend {other:?} (available: memory)"),
    };
    // The bench measures the engine, not a limit: open the env wide.
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 1_000_000,
                ..EnvSettings::default()
            },
        )
        .await?;
    Ok(engine)
}

fn payload(bytes: usize) -> Value {
    json!({ "data": "x".repeat(bytes.saturating_sub(12)) })
}

fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
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
    let mut samples = Vec::with_capacity(common.runs as usize);
    let warmup = (common.runs / 10).clamp(10, 1000);
    for i in 0..(common.runs + warmup) {
        let t0 = Instant::now();
        let run = engine.trigger("bench").payload(&body).send().await?;
        let started = rx.recv().await.context("handler channel closed")?;
        if i >= warmup {
            samples.push(started.duration_since(t0).as_micros() as u64);
        }
        engine.wait(run.run.id, Duration::from_secs(10)).await?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    worker.stop().await;
    samples.sort_unstable();
    Ok(json!({
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
    }))
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
    fn name(self) -> &'static str {
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

/// Waits until every run has been handled and nothing holds a slot.
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
        tokio::task::yield_now().await;
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
            let t0 = Instant::now();
            for _ in 0..runs {
                engine.trigger("bench").payload(&body).send().await?;
            }
            t0.elapsed()
        }
        Phase::DrainOnly => {
            for _ in 0..runs {
                engine.trigger("bench").payload(&body).send().await?;
            }
            let t0 = Instant::now();
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            worker.stop().await;
            e
        }
        Phase::Concurrent => {
            let worker = start_noop_worker(&engine, common.slots, done.clone()).await?;
            let t0 = Instant::now();
            for _ in 0..runs {
                engine.trigger("bench").payload(&body).send().await?;
            }
            drained(&engine, &done, runs).await?;
            let e = t0.elapsed();
            worker.stop().await;
            e
        }
    };
    Ok(json!({
        "scenario": "throughput",
        "backend": common.backend,
        "durability": "none",
        "phase": phase.name(),
        "slots": common.slots,
        "runs": common.runs,
        "payload_bytes": common.payload_bytes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "runs_per_s": (runs as f64 / elapsed.as_secs_f64()).round() as u64,
        "git_revision": git_revision(),
    }))
}
