//! The engine over `MemoryQueue` + `PostgresStore` across a restart: the queue state is
//! rebuilt from PostgreSQL, a run that was executing counts a `crashed` attempt (its start was
//! flushed at the planned stop) and retries, and a completed run never runs again. Time is a
//! `ManualClock`; waits are on events, bounded only to fail instead of hanging.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunStore;
use runlane_core::{RetryPolicy, RunId, RunStatus, Timestamp};
use runlane_engine::{
    Engine, EngineBuilder, EngineConfig, HandlerError, ManualClock, RunContext, WaitOutcome, Worker,
};
use runlane_memory::{MemoryConfig, MemoryQueue};
use runlane_postgres::{PostgresConfig, PostgresStore};
use serde_json::Value;
use tokio::sync::mpsc;

const EPOCH: Timestamp = Timestamp(1_700_000_000_000);

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

async fn engine(store: Arc<PostgresStore>, clock: &Arc<ManualClock>) -> Engine {
    EngineBuilder::new()
        .clock(clock.clone())
        .config(EngineConfig {
            seed: Some(7),
            ..EngineConfig::default()
        })
        .open(Arc::new(MemoryQueue::new(MemoryConfig::default())), store)
        .await
        .expect("open the engine")
}

/// A worker whose handler reports each start; it never returns when `stuck`.
async fn worker(engine: &Engine, stuck: bool) -> (Worker, mpsc::UnboundedReceiver<(RunId, u32)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((ctx.run_id(), ctx.attempt()));
                if stuck {
                    std::future::pending::<()>().await;
                }
                Ok::<Value, HandlerError>(Value::from(ctx.attempt()))
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

async fn reopen(config: &PostgresConfig) -> Arc<PostgresStore> {
    Arc::new(PostgresStore::open(config.clone()).await.expect("reopen"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recovers_from_postgresql_counting_the_crashed_attempt() {
    let config = common::config();
    let store = Arc::new(common::open(config.clone()).await);
    let clock = Arc::new(ManualClock::new(EPOCH));
    let first = engine(store.clone(), &clock).await;
    let (stuck, mut started) = worker(&first, true).await;
    let policy = RetryPolicy {
        attempts_max: 2,
        min: Duration::from_secs(5),
        max: Duration::from_secs(5),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let crashed = first
        .trigger("job")
        .retry(policy)
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    assert_eq!(
        bounded("the start", started.recv()).await,
        Some((crashed, 1))
    );
    stuck.crash();
    first.shutdown().await;
    drop(first);
    // A planned stop writes the kept start, so the restart can count the attempt.
    assert_eq!(store.flush_starts().await.expect("flush"), 1);

    let store2 = reopen(&config).await;
    let second = engine(store2.clone(), &clock).await;
    let record = second.get(crashed).await.expect("recovered");
    assert_eq!(record.attempt, 2, "the crashed attempt counts");
    assert_eq!(record.status, RunStatus::Delayed);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].outcome, "crashed");
    let (quick, mut started) = worker(&second, false).await;
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        bounded("the retry", started.recv()).await,
        Some((crashed, 2))
    );
    match bounded("the end", second.wait(crashed, Duration::from_secs(3600))).await {
        Ok(WaitOutcome::Finished(r)) => assert_eq!(r.status, RunStatus::Completed),
        other => panic!("{other:?}"),
    }
    // Completed in PostgreSQL, with both attempts.
    let stored = store2.get(crashed).await.expect("get").expect("run");
    assert_eq!(stored.status, RunStatus::Completed);
    assert_eq!(stored.output.as_deref(), Some("2"));
    quick.stop().await;
    second.shutdown().await;
    drop(second);

    // A third start finds nothing to run again: the completed run stays completed.
    let store3 = reopen(&config).await;
    assert!(store3.unfinished().await.expect("unfinished").is_empty());
    let third = engine(store3.clone(), &clock).await;
    let (idle, mut started) = worker(&third, false).await;
    let fresh = third.trigger("job").send().await.expect("trigger").run.id;
    assert_eq!(
        bounded("the fresh run", started.recv()).await,
        Some((fresh, 1)),
        "the first run to start after the restart is the new one, not the completed one"
    );
    idle.stop().await;
    third.shutdown().await;
    drop(third);
    drop((store, store2, store3));
    runlane_postgres::admin::drop_schema(&common::url(), &config.schema)
        .await
        .expect("drop the test schema");
}
