//! A requested cancel is kept in the run store (`RunRecord::cancel_requested_at`), so it holds
//! when the queue backend never heard of it or lost it: here a requester that "died" between
//! its store write and its queue call is played by writing the request to the store directly.
//! In-memory backends on a manual clock; waits are on events, bounded only to fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bounded, finished, open_on, T0};
use runlane_core::backend::{QueueBackend, RunStore};
use runlane_core::{RetryPolicy, RunStatus};
use runlane_engine::{Engine, HandlerError, ManualClock, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::Value;
use tokio::sync::mpsc;

struct Backends {
    engine: Engine,
    clock: Arc<ManualClock>,
    queue: Arc<MemoryQueue>,
    store: Arc<MemoryStore>,
}

async fn open() -> Backends {
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let store = Arc::new(MemoryStore::new());
    let (engine, clock) = open_on(queue.clone(), store.clone()).await;
    Backends {
        engine,
        clock,
        queue,
        store,
    }
}

/// A worker whose `job` handler reports each start and never returns by itself (it ignores
/// its token).
async fn stuck_worker(
    engine: &Engine,
    stop_timeout: Duration,
) -> (runlane_engine::Worker, mpsc::UnboundedReceiver<u32>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .stop_timeout(stop_timeout)
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.attempt());
                std::future::pending::<()>().await;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

/// Triggers one `job` run, with three attempts at 1 s intervals: its id.
async fn trigger_job(engine: &Engine) -> runlane_core::RunId {
    engine
        .trigger("job")
        .retry(retry_three())
        .send()
        .await
        .expect("trigger")
        .run
        .id
}

fn retry_three() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 3,
        min: Duration::from_secs(1),
        max: Duration::from_secs(1),
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

fn outcomes(record: &runlane_core::backend::RunRecord) -> Vec<&str> {
    record.attempts.iter().map(|a| a.outcome.as_str()).collect()
}

#[tokio::test]
async fn a_cancel_of_a_queued_run_ends_it_at_once_and_is_kept_in_the_store() {
    let b = open().await;
    // No worker: the run waits (ready in its lane).
    let run = trigger_job(&b.engine).await;
    let canceled = b.engine.cancel(run).await.expect("cancel");
    assert_eq!(canceled.status, RunStatus::Canceled, "canceled at once");
    assert_eq!(canceled.finished_at, Some(T0));
    assert_eq!(
        canceled.cancel_requested_at,
        Some(T0),
        "the request is kept"
    );
    assert!(canceled.attempts.is_empty(), "no attempt ran");
    assert_eq!(
        b.queue.live(run).await.expect("live"),
        None,
        "out of the queue"
    );
    let stored = b.store.get(run).await.expect("get").expect("stored");
    assert_eq!(stored, canceled);
}

#[tokio::test]
async fn a_lease_that_lapses_after_a_cancel_the_queue_never_heard_of_ends_canceled() {
    let b = open().await;
    let (worker, mut started) = stuck_worker(&b.engine, Duration::ZERO).await;
    let run = trigger_job(&b.engine).await;
    assert_eq!(bounded(started.recv()).await, Some(1));
    // The requester wrote the store and died before its queue call; then the worker dies.
    let at = b.store.request_cancel(run, T0).await.expect("request");
    assert_eq!(at, T0);
    worker.crash();

    let lease_end = common::at(b.engine.config().lease);
    bounded(b.clock.wait_sleeper_at(lease_end)).await;
    b.clock.set(lease_end);
    let record = finished(&b.engine, run).await;
    assert_eq!(record.status, RunStatus::Canceled, "canceled, not retried");
    assert_eq!(record.attempt, 1);
    assert_eq!(outcomes(&record), vec!["canceled"]);
    assert_eq!(b.queue.live(run).await.expect("live"), None);
    assert_eq!(
        b.queue.next_deadline().await.expect("deadline"),
        None,
        "no retry armed"
    );
    b.queue.check_invariants().expect("queue invariants");
}

#[tokio::test]
async fn a_claimed_run_whose_cancel_is_kept_in_the_store_ends_canceled_without_running() {
    let b = open().await;
    // The first worker's drain hands the run back to its queue (no attempt counted), so the
    // next claim reads it back from the store.
    let (worker, mut started) = stuck_worker(&b.engine, Duration::ZERO).await;
    let run = trigger_job(&b.engine).await;
    assert_eq!(bounded(started.recv()).await, Some(1));
    let report = bounded(worker.stop()).await;
    assert_eq!(report.released, 1);
    assert!(b.engine.get(run).await.expect("get").status.is_waiting());

    // The requester wrote the store and died before its queue call.
    b.store.request_cancel(run, T0).await.expect("request");
    let (worker, mut started) = stuck_worker(&b.engine, Duration::ZERO).await;
    let record = finished(&b.engine, run).await;
    assert_eq!(record.status, RunStatus::Canceled);
    assert_eq!(outcomes(&record), vec!["canceled"]);
    assert!(
        started.try_recv().is_err(),
        "the handler never ran for the claim"
    );
    assert_eq!(worker.in_flight(), 0);
    b.queue.check_invariants().expect("queue invariants");
    bounded(worker.stop()).await;
}

#[tokio::test]
async fn a_second_cancel_keeps_the_first_request_instant() {
    let b = open().await;
    let (worker, mut started) = stuck_worker(&b.engine, Duration::ZERO).await;
    let run = trigger_job(&b.engine).await;
    assert_eq!(bounded(started.recv()).await, Some(1));
    let first = b.engine.cancel(run).await.expect("cancel");
    assert_eq!(
        first.status,
        RunStatus::Executing,
        "within its grace period"
    );
    assert_eq!(first.cancel_requested_at, Some(T0));
    b.clock.advance(Duration::from_secs(3));
    let again = b.engine.cancel(run).await.expect("second cancel");
    assert_eq!(
        again.cancel_requested_at,
        Some(T0),
        "the first instant stays"
    );
    worker.crash();
}
