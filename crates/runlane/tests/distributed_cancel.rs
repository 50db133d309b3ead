//! A cancel requested for an executing run survives the loss of the Redis state (SPEC §7
//! store first): the request is kept in PostgreSQL (`cancel_requested_at`), so when the key
//! space is rebuilt from PostgreSQL the run, which comes back waiting, ends `canceled` instead
//! of running again — at its next claim, or at the open of another process.
//!
//! The Redis state is lost by deleting this test's key prefix (SCAN + DEL under the prefix on
//! the shared server, never FLUSHALL). The workers' leases are long (one heartbeat per 20 s)
//! and the cancel grace period an hour, so nothing but the test's own calls touches the key
//! space while it is deleted and rebuilt. Redis (`RUNLANE_REDIS_URL`) and PostgreSQL
//! (`RUNLANE_DATABASE_URL`) are required: a missing one fails the test.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runlane::core::backend::{QueueBackend, RunRecord, RunStore};
use runlane::core::{RunId, RunStatus};
use runlane::{
    DistributedConfig, EngineBuilder, EngineConfig, HandlerError, RunContext, WaitOutcome,
};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};

static NEXT: AtomicU64 = AtomicU64::new(0);

const LEASE: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(3600);
const BOUND: Duration = Duration::from_secs(30);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn names(tag: &str) -> (String, String) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (
        redis_support::fresh_prefix(tag),
        format!("rlt_{tag}_{}_{n}", std::process::id()),
    )
}

async fn open(prefix: &str, schema: &str, throwaway: bool) -> runlane::Distributed {
    let mut config = DistributedConfig::new(redis_support::url(), database_url());
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config.throwaway = throwaway;
    let builder = EngineBuilder::new().config(EngineConfig {
        cancel_grace: GRACE,
        ..EngineConfig::default()
    });
    match runlane::distributed_with(builder, config).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    }
}

/// Starts of each run, counted by [`gated_worker`]'s handler.
type Starts = Arc<Mutex<Vec<RunId>>>;

/// A one-slot worker whose `job` handler records its start, reports it, and then waits for a
/// permit of `gate` (it ignores its cancel token), then completes.
async fn gated_worker(
    engine: &runlane::Distributed,
    starts: &Starts,
    gate: &Arc<Semaphore>,
) -> (runlane::Worker, mpsc::UnboundedReceiver<RunId>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (starts, gate) = (starts.clone(), gate.clone());
    let worker = engine
        .worker()
        .workloops("manual>*:1")
        .lease(LEASE)
        .handler("job", move |ctx: RunContext| {
            let (tx, starts, gate) = (tx.clone(), starts.clone(), gate.clone());
            async move {
                starts
                    .lock()
                    .map_err(|_| HandlerError::new("poisoned"))?
                    .push(ctx.run_id());
                let _ = tx.send(ctx.run_id());
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|_| HandlerError::new("gate closed"))?;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

async fn finished(engine: &runlane::Distributed, run: RunId) -> RunRecord {
    match engine.wait(run, BOUND).await.expect("wait") {
        WaitOutcome::Finished(record) => record,
        WaitOutcome::Pending { status, .. } => panic!("run {run} still {status:?}"),
    }
}

fn outcomes(record: &RunRecord) -> Vec<&str> {
    record.attempts.iter().map(|a| a.outcome.as_str()).collect()
}

/// Triggers one run, waits until the worker runs it, requests its cancel (the handler ignores
/// it, so the run stays executing within its grace period), then deletes the prefix's keys.
async fn executing_then_cancel_then_redis_lost(
    engine: &runlane::Distributed,
    started: &mut mpsc::UnboundedReceiver<RunId>,
) -> RunId {
    let run = engine.trigger("job").send().await.expect("trigger").run.id;
    assert_eq!(
        bounded("the handler to start", started.recv()).await,
        Some(run)
    );
    let requested = engine.cancel(run).await.expect("cancel");
    assert_eq!(
        requested.status,
        RunStatus::Executing,
        "within the grace period"
    );
    let kept = engine.store().get(run).await.expect("get").expect("stored");
    assert!(
        kept.cancel_requested_at.is_some(),
        "the request is in postgresql before the cancel returns"
    );
    let deleted = engine.queue().redis().delete_keys().await.expect("delete");
    assert!(deleted > 0, "the prefix had keys");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_survives_a_lost_redis_and_the_rebuilt_run_ends_canceled_at_its_claim() {
    let (prefix, schema) = names("cxl_claim");
    let engine = open(&prefix, &schema, true).await;
    let starts: Starts = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let (first, mut started) = gated_worker(&engine, &starts, &gate).await;
    let run = executing_then_cancel_then_redis_lost(&engine, &mut started).await;

    // The next call finds the key space lost and rebuilds it from PostgreSQL: the run, still
    // unfinished there, comes back waiting (the lease and the cancel mark were Redis state).
    let snapshot = engine.queue().snapshot().await.expect("snapshot");
    let back: Vec<(RunId, RunStatus)> = snapshot
        .iter()
        .map(|l| (l.dispatch.run_id, l.status))
        .collect();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].0, run);
    assert!(back[0].1.is_waiting(), "{back:?}");
    assert_eq!(engine.health().await.redis_backend.rebuilds, 1);

    // A free worker claims it: the kept request ends it without running the handler again.
    let (second, _second_started) = gated_worker(&engine, &starts, &gate).await;
    let record = finished(&engine, run).await;
    assert_eq!(record.status, RunStatus::Canceled);
    assert_eq!(record.attempt, 1);
    assert_eq!(outcomes(&record), vec!["canceled"]);
    assert_eq!(
        starts.lock().expect("starts").clone(),
        vec![run],
        "the handler ran once"
    );
    assert_eq!(engine.queue().live(run).await.expect("live"), None);

    // The first attempt's handler returns now: its lease is gone, its completion changes
    // nothing.
    gate.add_permits(1);
    bounded("the first worker to stop", first.stop()).await;
    bounded("the second worker to stop", second.stop()).await;
    let after = engine.store().get(run).await.expect("get").expect("stored");
    assert_eq!(after.status, RunStatus::Canceled, "one terminal state");
    assert_eq!(after.output, None);
    assert_eq!(outcomes(&after), vec!["canceled"]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_opening_on_a_lost_redis_ends_a_run_whose_cancel_was_requested() {
    let (prefix, schema) = names("cxl_open");
    let first = open(&prefix, &schema, true).await;
    let starts: Starts = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let (worker, mut started) = gated_worker(&first, &starts, &gate).await;
    let run = executing_then_cancel_then_redis_lost(&first, &mut started).await;

    // Another process opens: it rebuilds the key space and recovers the unfinished runs; the
    // one whose cancel was requested ends `canceled` there, with no worker anywhere.
    let second = open(&prefix, &schema, false).await;
    let record = second.get(run).await.expect("get");
    assert_eq!(record.status, RunStatus::Canceled, "ended at the open");
    assert_eq!(second.queue().live(run).await.expect("live"), None);
    assert_eq!(
        second.queue().snapshot().await.expect("snapshot"),
        Vec::new(),
        "nothing left waiting"
    );
    assert_eq!(starts.lock().expect("starts").clone(), vec![run]);

    gate.add_permits(1);
    bounded("the worker to stop", worker.stop()).await;
    let after = second.get(run).await.expect("get");
    assert_eq!(after.status, RunStatus::Canceled, "one terminal state");
    assert_eq!(after.output, None);
    second.shutdown().await;
    drop(second);
    first.shutdown().await;
}
