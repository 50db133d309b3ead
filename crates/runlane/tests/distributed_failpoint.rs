//! Processes that die at the windows of the store-first protocol (`RUNLANE_FAILPOINT` aborts
//! them there). The dying process is a child: this same test binary, re-run with a role in the
//! environment. Redis (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are
//! required.
//!
//! - `after_commit_before_enqueue`: the run is not lost. The next engine on the same servers
//!   enqueues it (its open re-enqueues PostgreSQL's unfinished runs, idempotently; its
//!   reconciler would too) and it runs exactly once.
//! - the same window while another engine is already open and idle: its reconciler finds the
//!   row by its idle check (the insert signalled nothing in that process) and the run executes
//!   exactly once, with no trigger or restart there.
//! - `after_terminal_write_before_ack`: the run stays `completed`. Its lease lapses in Redis;
//!   the next engine's timer (armed by Redis's earliest deadline) reads PostgreSQL first, finds
//!   the run terminal and only cleans it out of Redis: it never runs again.

mod redis_support;
mod run_counter;

use run_counter::{counting_worker, Executions};

use std::process::{Command, Stdio};
use std::time::Duration;

use runlane::core::backend::{QueueBackend, RunFilter};
use runlane::core::{RunId, RunStatus};
use runlane::{
    DistributedConfig, EngineBuilder, HandlerError, ReconcileConfig, RunContext, WaitOutcome,
    Worker,
};
use serde_json::Value;

const TEST: &str = "crash_after_commit_before_enqueue_loses_nothing";
const TEST_RUNNING: &str = "a_running_engine_picks_up_a_run_another_process_left_pending";
const TEST_ACK: &str = "crash_after_terminal_write_before_ack_never_runs_again";
const ROLE: &str = "RUNLANE_TEST_ROLE";

/// Waits for `run` to complete, stops `worker`, and checks it executed `run` exactly once and
/// nothing else.
async fn completed_once_alone(
    engine: &runlane::Engine,
    worker: Worker,
    executed: &Executions,
    run: RunId,
) {
    match engine
        .wait(run, Duration::from_secs(60))
        .await
        .expect("wait")
    {
        WaitOutcome::Finished(r) => assert_eq!(r.status, RunStatus::Completed),
        WaitOutcome::Pending { status, .. } => panic!("run still {status:?}"),
    }
    worker.stop().await;
    let executed = executed.lock().expect("lock").clone();
    assert_eq!(executed.get(&run), Some(&1), "executed exactly once");
    assert_eq!(executed.len(), 1, "nothing else ran");
}

fn config(prefix: &str, schema: &str) -> DistributedConfig {
    let database = std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut config = DistributedConfig::new(redis_support::url(), database);
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config
}

/// The child: triggers one run with the failpoint armed, so it aborts after the commit.
async fn dying_trigger() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let engine = runlane::distributed_with(
        EngineBuilder::new(),
        config(&var("RUNLANE_TEST_PREFIX"), &var("RUNLANE_TEST_SCHEMA")),
    )
    .await
    .expect("child opens the engine");
    let _ = engine.trigger("job").send().await;
    panic!("the failpoint should have aborted the process before the trigger returned");
}

/// Runs this binary's test `test` as a child in `role` with `failpoint` armed (and
/// `RUNLANE_TEST_OUT` when given), and checks it died there.
fn dying_child(
    (test, role, failpoint): (&str, &str, &str),
    prefix: &str,
    schema: &str,
    out: Option<&std::path::Path>,
) {
    let mut child = Command::new(std::env::current_exe().expect("this test binary"));
    child
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(ROLE, role)
        .env(runlane::FAILPOINT_VAR, failpoint)
        .env("RUNLANE_TEST_PREFIX", prefix)
        .env("RUNLANE_TEST_SCHEMA", schema)
        .stdout(Stdio::null());
    if let Some(out) = out {
        child.env("RUNLANE_TEST_OUT", out);
    }
    let status = child.status().expect("run the child");
    assert!(
        !status.success(),
        "the child died at the failpoint: {status:?}"
    );
}

/// A child that triggers one run and dies after its commit, before its enqueue.
fn dying_trigger_child(test: &str, prefix: &str, schema: &str) {
    let failpoint = runlane::AFTER_COMMIT_BEFORE_ENQUEUE;
    dying_child((test, "trigger", failpoint), prefix, schema, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_enqueue_loses_nothing() {
    if std::env::var(ROLE).is_ok() {
        return dying_trigger().await;
    }
    let executed = Executions::default();
    let prefix = redis_support::fresh_prefix("failpoint");
    let schema = format!("rlt_failpoint_{}", std::process::id());
    dying_trigger_child(TEST, &prefix, &schema);

    // A new engine on the same servers: its open (and its reconciler) enqueue the committed run.
    let mut parent = config(&prefix, &schema);
    parent.reconcile = ReconcileConfig {
        grace: Duration::from_millis(200),
        ..ReconcileConfig::default()
    };
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .expect("reopen");
    let stored = engine.list(&RunFilter::default()).await.expect("list");
    assert_eq!(stored.len(), 1, "the committed run is in the store");
    let run = stored[0].id;
    assert!(!stored[0].status.is_terminal(), "it never ran");

    let worker = counting_worker(engine.worker().lease(Duration::from_secs(1)), &executed).await;
    completed_once_alone(&engine, worker, &executed, run).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_engine_picks_up_a_run_another_process_left_pending() {
    if std::env::var(ROLE).is_ok() {
        return dying_trigger().await;
    }
    let prefix = redis_support::fresh_prefix("failpoint-running");
    let schema = format!("rlt_failrun_{}", std::process::id());
    // Open first, with a worker: nothing is pending, so its reconciler goes idle.
    let mut parent = config(&prefix, &schema);
    parent.reconcile = ReconcileConfig {
        grace: Duration::from_millis(200),
        idle_check: Duration::from_millis(200),
        ..ReconcileConfig::default()
    };
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .expect("open");
    let executed = Executions::default();
    let worker = counting_worker(engine.worker().lease(Duration::from_secs(1)), &executed).await;

    dying_trigger_child(TEST_RUNNING, &prefix, &schema);
    let stored = engine.list(&RunFilter::default()).await.expect("list");
    assert_eq!(stored.len(), 1, "the child's run is committed");
    let run = stored[0].id;
    completed_once_alone(&engine, worker, &executed, run).await;
    engine.shutdown().await;
}

/// The child: runs one run with the failpoint armed, so it aborts after the terminal write.
async fn dying_worker() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let engine = runlane::distributed_with(
        EngineBuilder::new(),
        config(&var("RUNLANE_TEST_PREFIX"), &var("RUNLANE_TEST_SCHEMA")),
    )
    .await
    .expect("child opens the engine");
    let out = var("RUNLANE_TEST_OUT");
    let _worker = engine
        .worker()
        .lease(Duration::from_secs(1))
        .handler("job", move |ctx: RunContext| {
            let out = out.clone();
            async move {
                std::fs::write(&out, ctx.run_id().to_string())
                    .map_err(|e| HandlerError::new(e.to_string()))?;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("child worker");
    let run = engine.trigger("job").send().await.expect("trigger").run.id;
    let _ = engine.wait(run, Duration::from_secs(30)).await;
    panic!("the failpoint should have aborted the process before the run was acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_terminal_write_before_ack_never_runs_again() {
    if std::env::var(ROLE).is_ok() {
        return dying_worker().await;
    }
    let prefix = redis_support::fresh_prefix("failpoint-ack");
    let schema = format!("rlt_failack_{}", std::process::id());
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("failpoint-ack-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let failpoint = runlane::AFTER_TERMINAL_WRITE_BEFORE_ACK;
    dying_child(
        (TEST_ACK, "worker", failpoint),
        &prefix,
        &schema,
        Some(&out),
    );
    let ran = std::fs::read_to_string(&out).expect("the child ran the handler");
    let _ = std::fs::remove_file(&out);

    let mut parent = config(&prefix, &schema);
    parent.throwaway = true;
    let engine = runlane::distributed_with(EngineBuilder::new(), parent)
        .await
        .expect("reopen");
    let stored = engine.list(&RunFilter::default()).await.expect("list");
    assert_eq!(stored.len(), 1, "one run in the store");
    let run = stored[0].id;
    assert_eq!(ran, run.to_string(), "the child ran that run");
    assert_eq!(
        stored[0].status,
        RunStatus::Completed,
        "its terminal write landed"
    );

    let executed = Executions::default();
    let worker = counting_worker(engine.worker().lease(Duration::from_secs(1)), &executed).await;
    // The child's lease lapses in Redis (1 s); this engine's timer, armed by Redis's earliest
    // deadline, cleans the run out. Redis is read until it no longer holds the run.
    let cleaned = async {
        while engine.queue().live(run).await.expect("live").is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), cleaned)
        .await
        .expect("the lapsed run is cleaned out of redis");
    let record = engine.get(run).await.expect("get");
    assert_eq!(record.status, RunStatus::Completed);
    assert_eq!(record.attempts.len(), 1, "no attempt was added");
    worker.stop().await;
    assert!(
        executed.lock().expect("lock").is_empty(),
        "the completed run never ran again"
    );
    engine.shutdown().await;
}
