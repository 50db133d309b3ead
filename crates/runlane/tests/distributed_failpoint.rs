//! A process that dies between the PostgreSQL commit of a trigger and its Redis enqueue (the
//! failpoint `RUNLANE_FAILPOINT=after_commit_before_enqueue` aborts it there): the run is not
//! lost. The next engine on the same servers enqueues it (its open re-enqueues PostgreSQL's
//! unfinished runs, idempotently; its reconciler would too) and it runs exactly once. The dying process
//! is a child: this same test binary, re-run with a role in the environment. Redis
//! (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required.

mod redis_support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runlane::core::backend::RunFilter;
use runlane::core::{RunId, RunStatus};
use runlane::{
    DistributedConfig, EngineBuilder, HandlerError, ReconcileConfig, RunContext, WaitOutcome,
};
use serde_json::Value;

const TEST: &str = "crash_after_commit_before_enqueue_loses_nothing";
const ROLE: &str = "RUNLANE_TEST_ROLE";

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_enqueue_loses_nothing() {
    if std::env::var(ROLE).is_ok() {
        return dying_trigger().await;
    }
    let prefix = redis_support::fresh_prefix("failpoint");
    let schema = format!("rlt_failpoint_{}", std::process::id());
    let status = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
        .env(ROLE, "trigger")
        .env(runlane::FAILPOINT_VAR, runlane::AFTER_COMMIT_BEFORE_ENQUEUE)
        .env("RUNLANE_TEST_PREFIX", &prefix)
        .env("RUNLANE_TEST_SCHEMA", &schema)
        .stdout(Stdio::null())
        .status()
        .expect("run the child");
    assert!(
        !status.success(),
        "the child died at the failpoint: {status:?}"
    );

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

    let executed: Arc<Mutex<HashMap<RunId, u32>>> = Arc::default();
    let worker = {
        let executed = executed.clone();
        engine
            .worker()
            .handler("job", move |ctx: RunContext| {
                let executed = executed.clone();
                async move {
                    *executed
                        .lock()
                        .map_err(|_| HandlerError::new("poisoned"))?
                        .entry(ctx.run_id())
                        .or_insert(0) += 1;
                    Ok::<Value, HandlerError>(Value::Null)
                }
            })
            .start()
            .await
            .expect("worker")
    };
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
    engine.shutdown().await;
}
