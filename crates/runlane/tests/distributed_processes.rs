//! Three OS processes share one Redis and one PostgreSQL: this test process triggers, two
//! child processes (this same test binary, re-run with a role in the environment) run
//! workers. Runs spread over two envs, four queues and five keys; every run ends `completed`,
//! exactly once in the store, and was executed by exactly one child exactly once. Wake-ups
//! cross processes through the `{prefix}:wake` channel; this test reads the store (every
//! 100 ms) until every run is completed (`distributed_kill.rs` waits on run events instead,
//! which cross processes on `{prefix}:events`). Redis
//! (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required.

mod redis_support;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::RunFilter;
use runlane::core::{EnvSettings, RunId, RunStatus};
use runlane::{DistributedConfig, EngineBuilder, HandlerError, RunContext};
use serde_json::Value;

const TEST: &str = "three_processes_every_run_completes_exactly_once";
const ROLE: &str = "RUNLANE_TEST_ROLE";
const RUNS: usize = 5_000;

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn config(prefix: &str, schema: &str) -> DistributedConfig {
    let mut config = DistributedConfig::new(redis_support::url(), database_url());
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config
}

/// A child: opens the shared engine, runs a worker that appends each run id it executes to
/// its file, and waits to be killed.
async fn worker_process() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let (prefix, schema, out) = (
        var("RUNLANE_TEST_PREFIX"),
        var("RUNLANE_TEST_SCHEMA"),
        var("RUNLANE_TEST_OUT"),
    );
    let engine = runlane::distributed_with(EngineBuilder::new(), config(&prefix, &schema))
        .await
        .expect("child opens the shared engine");
    let file = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .expect("open the output file"),
    ));
    let _worker = engine
        .worker()
        .env("default")
        .env("b")
        .handler("job", move |ctx: RunContext| {
            let file = file.clone();
            async move {
                let mut f = file.lock().map_err(|_| HandlerError::new("poisoned"))?;
                writeln!(f, "{}", ctx.run_id()).map_err(|e| HandlerError::new(e.to_string()))?;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("child worker");
    std::future::pending::<()>().await;
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Subscribers of the deployment's wake channel (each child's engine has one).
fn subscribers(channel: &str) -> i64 {
    let Ok(client) = redis::Client::open(redis_support::url()) else {
        return 0;
    };
    let Ok(mut conn) = client.get_connection() else {
        return 0;
    };
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut conn)
        .unwrap_or_default();
    counts.first().map_or(0, |(_, n)| *n)
}

/// Runs `completed` in the store, over both envs.
async fn completed(engine: &runlane::Distributed) -> usize {
    let mut completed = 0usize;
    for env in ["default", "b"] {
        let mut filter = RunFilter {
            env: Some(runlane::core::EnvName::new(env).expect("env")),
            status: Some(RunStatus::Completed),
            limit: Some(1000),
            ..RunFilter::default()
        };
        loop {
            let page = engine.list(&filter).await.expect("list");
            completed += page.len();
            match page.last() {
                Some(last) if page.len() == 1000 => filter.after = Some(last.id),
                _ => break,
            }
        }
    }
    completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_every_run_completes_exactly_once() {
    if std::env::var(ROLE).is_ok() {
        return worker_process().await;
    }
    let prefix = redis_support::fresh_prefix("procs");
    let schema = format!("rlt_procs_{}", std::process::id());
    let mut parent_config = config(&prefix, &schema);
    parent_config.throwaway = true;
    let engine = match runlane::distributed_with(EngineBuilder::new(), parent_config).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    };
    engine
        .set_env(
            "b",
            EnvSettings {
                limit: 8,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("env b");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("distributed-processes")
        .join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("output directory");
    let exe = std::env::current_exe().expect("this test binary");
    let mut children = Children(Vec::new());
    let mut outs = Vec::new();
    for i in 0..2 {
        let out = dir.join(format!("worker-{i}.txt"));
        let child = Command::new(&exe)
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env(ROLE, "worker")
            .env("RUNLANE_TEST_PREFIX", &prefix)
            .env("RUNLANE_TEST_SCHEMA", &schema)
            .env("RUNLANE_TEST_OUT", &out)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn a worker process");
        children.0.push(child);
        outs.push(out);
    }
    // Both children are listening once both subscribed to the wake channel.
    let channel = format!("{{{prefix}}}:wake");
    let listening = async {
        while subscribers(&channel) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), listening)
        .await
        .is_err()
    {
        let states: Vec<_> = children.0.iter_mut().map(|c| c.try_wait()).collect();
        panic!("the worker processes never subscribed: {states:?}");
    }

    // Eight producers trigger RUNS runs over two envs, four queues and five keys.
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..8 {
        let engine = engine.engine().clone();
        producers.spawn(async move {
            let mut ids = Vec::new();
            for i in (p..RUNS).step_by(8) {
                let env = if i % 3 == 0 { "b" } else { "default" };
                let run = engine
                    .trigger("job")
                    .env(env)
                    .queue(&format!("q{}", i % 4))
                    .key(&format!("k{}", i % 5))
                    .send()
                    .await
                    .expect("trigger");
                ids.push(run.run.id);
            }
            ids
        });
    }
    let mut triggered: Vec<RunId> = Vec::new();
    while let Some(ids) = producers.join_next().await {
        triggered.extend(ids.expect("producer"));
    }
    assert_eq!(triggered.len(), RUNS);
    // The store is read until every run is completed.
    let all_done = async {
        loop {
            let n = completed(&engine).await;
            if n >= RUNS {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(120), all_done).await;
    drop(children);
    let finished = match done {
        Ok(n) => n,
        Err(_) => panic!("only {} of {RUNS} runs completed", completed(&engine).await),
    };
    assert_eq!(finished, RUNS, "one completed row per run");

    // Each run executed once, by one of the two worker processes, and both took part.
    let mut executions: HashMap<String, u32> = HashMap::new();
    let mut per_process = Vec::new();
    for out in &outs {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        per_process.push(text.lines().count());
        for line in text.lines() {
            *executions.entry(line.to_string()).or_insert(0) += 1;
        }
    }
    for run in &triggered {
        assert_eq!(
            executions.get(&run.to_string()),
            Some(&1),
            "run {run} executed exactly once"
        );
    }
    assert_eq!(executions.len(), RUNS, "no other run executed");
    assert!(
        per_process.iter().all(|n| *n > 0),
        "both worker processes ran some: {per_process:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown().await;
}
