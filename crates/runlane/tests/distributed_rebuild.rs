//! A Redis that lost its data (FLUSHALL on a private server) is rebuilt from PostgreSQL
//! (SPEC §7): the runs unfinished there come back, and a run that is terminal in
//! PostgreSQL never does, so nothing is lost and nothing completed runs again. PostgreSQL
//! (`RUNLANE_DATABASE_URL`) and `redis-server` are required: a missing one fails the test.

mod redis_support;
mod run_counter;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_support::PrivateRedis;
use run_counter::{counting_worker, Executions};
use runlane::core::backend::QueueBackend;
use runlane::core::{RunId, RunStatus};
use runlane::{DistributedConfig, EngineBuilder, WaitOutcome};

static NEXT: AtomicU64 = AtomicU64::new(0);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn assert_completed(engine: &runlane::Engine, run: RunId) {
    match engine
        .wait(run, Duration::from_secs(60))
        .await
        .expect("wait")
    {
        WaitOutcome::Finished(record) => {
            assert_eq!(record.status, RunStatus::Completed, "run {run}");
        }
        WaitOutcome::Pending { status, .. } => panic!("run {run} still {status:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redis_is_rebuilt_from_postgres_terminal_runs_never_return() {
    let server = PrivateRedis::start("dist-rebuild");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut config = DistributedConfig::new(server.url(), database_url());
    config.redis.prefix = redis_support::fresh_prefix("rebuild");
    config.postgres.schema = format!("rlt_rebuild_{}_{n}", std::process::id());
    config.postgres.pool_size = 4;
    config.throwaway = true;
    let engine = match runlane::distributed_with(EngineBuilder::new(), config).await {
        Ok(engine) => engine,
        Err(e) => panic!("postgresql is required: {e}"),
    };
    let runs: Executions = Arc::default();

    // Twenty runs complete.
    let worker = counting_worker(engine.worker(), &runs).await;
    let mut done = Vec::new();
    for _ in 0..20 {
        done.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    for run in &done {
        assert_completed(&engine, *run).await;
    }
    worker.stop().await;

    // Twenty more wait in Redis (no worker), then Redis loses everything.
    let mut waiting = Vec::new();
    for i in 0..20 {
        let run = engine
            .trigger("job")
            .queue(&format!("q{}", i % 3))
            .send()
            .await
            .expect("trigger");
        waiting.push(run.run.id);
    }
    server.flushall();

    // The next call finds the key space lost and rebuilds it from PostgreSQL. `snapshot` carries
    // no instant of its own: the rebuild re-enqueues at the latest instant the queue has seen
    // (the triggers'), so due runs come back due, not delayed.
    let snapshot = engine.queue().snapshot().await.expect("snapshot");
    let mut held: Vec<RunId> = snapshot.iter().map(|l| l.dispatch.run_id).collect();
    held.sort();
    let mut expected = waiting.clone();
    expected.sort();
    assert_eq!(held, expected, "exactly the unfinished runs are rebuilt");
    assert!(
        snapshot.iter().all(|l| l.status != RunStatus::Delayed),
        "rebuilt runs are due: {:?}",
        snapshot.iter().map(|l| l.status).collect::<Vec<_>>()
    );
    assert_eq!(engine.health().await.redis_backend.rebuilds, 1);

    let worker = counting_worker(engine.worker(), &runs).await;
    for run in &waiting {
        assert_completed(&engine, *run).await;
    }
    worker.stop().await;
    let executed = runs.lock().expect("lock").clone();
    for run in done.iter().chain(&waiting) {
        assert_eq!(
            executed.get(run),
            Some(&1),
            "run {run} executed exactly once"
        );
    }
    assert_eq!(executed.len(), 40);
    engine.shutdown().await;
}
