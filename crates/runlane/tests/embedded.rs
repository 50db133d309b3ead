//! The embedded shape across restarts: what a reopen recovers (order, deadlines, crashed
//! attempts), retention driven by the one timer, and refusals of bad data paths. Time is a
//! `ManualClock`; waits are on events and bounded only to fail instead of hanging.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::Retention;
use runlane::core::{
    EnvSettings, QueueSettings, RetryPolicy, RunId, RunStatus, TaskDef, TaskName, Timestamp,
    VersionDef,
};
use runlane::{
    Engine, EngineBuilder, EngineConfig, EngineError, HandlerError, ManualClock, OpenError,
    RunContext, SqliteConfig, WaitOutcome,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const EPOCH: Timestamp = Timestamp(1_700_000_000_000);
const BOUND: Duration = Duration::from_secs(10);

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty data path for one test.
fn data_path() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("embedded")
        .join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("runs.db")
}

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Opens the embedded engine; like a restarting process, it waits until the previous engine
/// on the path (whose aborted tasks may still be unwinding) has released the data path's lock.
async fn open(path: &PathBuf, clock: &Arc<ManualClock>, config: EngineConfig) -> Engine {
    bounded("the data path's lock", async {
        loop {
            let builder = EngineBuilder::new()
                .clock(clock.clone())
                .config(EngineConfig {
                    seed: Some(7),
                    ..config.clone()
                });
            match runlane::embedded_with(builder, path, SqliteConfig::default()).await {
                Ok(engine) => return engine,
                Err(OpenError::Store(runlane::SqliteError::InUse { .. })) => {
                    tokio::task::yield_now().await
                }
                Err(e) => panic!("open the embedded engine: {e}"),
            }
        }
    })
    .await
}

/// Shuts an engine down and drops it, so the data path's lock is free for a reopen.
async fn close(engine: Engine) {
    engine.shutdown().await;
    drop(engine);
}

/// A worker whose handler reports each start and never returns (the process "dies" with it).
async fn stuck_worker(engine: &Engine) -> (runlane::Worker, mpsc::UnboundedReceiver<(RunId, u32)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((ctx.run_id(), ctx.attempt()));
                std::future::pending::<()>().await;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

/// A worker whose handler reports each start and completes at once.
async fn quick_worker(
    engine: &Engine,
    slots: u32,
) -> (runlane::Worker, mpsc::UnboundedReceiver<(RunId, u32)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .workloops(&format!("manual>*:{slots}"))
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((ctx.run_id(), ctx.attempt()));
                Ok::<Value, HandlerError>(json!({ "attempt": ctx.attempt() }))
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

async fn finished(engine: &Engine, run: RunId) -> runlane::core::backend::RunRecord {
    match bounded(
        "a terminal state",
        engine.wait(run, Duration::from_secs(3600)),
    )
    .await
    {
        Ok(WaitOutcome::Finished(record)) => record,
        other => panic!("run {run} did not finish: {other:?}"),
    }
}

/// Starts a [`stuck_worker`], triggers one `job` run with `retry` and waits until its first
/// attempt runs: the worker (to crash) and the run.
async fn run_stuck_in_its_first_attempt(
    engine: &Engine,
    retry: RetryPolicy,
) -> (runlane::Worker, RunId) {
    let (worker, mut started) = stuck_worker(engine).await;
    let run = engine
        .trigger("job")
        .retry(retry)
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    assert_eq!(
        bounded("the handler to start", started.recv()).await,
        Some((run, 1))
    );
    (worker, run)
}

/// `attempts_max` attempts, 5 s apart (no jitter).
fn backoff_5s(attempts_max: u32) -> RetryPolicy {
    RetryPolicy {
        attempts_max,
        min: Duration::from_secs(5),
        max: Duration::from_secs(5),
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_executing_at_the_crash_counts_a_crashed_attempt_and_retries() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    let (worker, run) = run_stuck_in_its_first_attempt(&engine, backoff_5s(2)).await;
    worker.crash();
    close(engine).await; // The process "dies" here: nothing finished, the start mark is written.

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let record = engine.get(run).await.expect("recovered");
    assert_eq!(record.attempt, 2, "the crashed attempt counts");
    assert_eq!(record.status, RunStatus::Delayed, "waiting for its backoff");
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].outcome, "crashed");
    assert_eq!(
        record.run_after,
        EPOCH.saturating_add(Duration::from_secs(5))
    );
    let (worker, mut started) = quick_worker(&engine, 1).await;
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        bounded("the retry to start", started.recv()).await,
        Some((run, 2))
    );
    let done = finished(&engine, run).await;
    assert_eq!(done.status, RunStatus::Completed);
    worker.stop().await;
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_the_last_attempt_ends_the_run_failed() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    let (worker, run) = run_stuck_in_its_first_attempt(&engine, RetryPolicy::none()).await;
    worker.crash();
    close(engine).await;

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let record = engine.get(run).await.expect("recovered");
    assert_eq!(record.status, RunStatus::Failed);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].outcome, "crashed");
    close(engine).await;
}

/// A run a worker's stop hands back (its handler past the stop timeout) was not running when
/// the process went away: the reopen queues it again with no attempt counted, and it runs.
/// Before, its start mark stayed written, and the reopen counted a `crashed` attempt: with no
/// attempt left the run ended `failed` without ever failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_handed_back_by_a_stop_is_not_counted_crashed_at_reopen() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .stop_timeout(Duration::ZERO)
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.run_id());
                std::future::pending::<()>().await;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    let trigger = engine.trigger("job").retry(RetryPolicy::none());
    let run = trigger.send().await.expect("trigger").run.id;
    assert_eq!(
        bounded("the handler to start", started.recv()).await,
        Some(run)
    );
    // Another write goes through the writer after the start mark: the mark is on disk.
    engine.trigger("other").send().await.expect("trigger");
    let report = worker.stop().await;
    assert_eq!(report.released, 1, "the stop handed the run back");
    close(engine).await;

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let record = engine.get(run).await.expect("recovered");
    assert_eq!(
        (
            record.status.is_terminal(),
            record.attempts.len(),
            record.started_at
        ),
        (false, 0, None),
        "waiting again, no attempt counted: {record:?}"
    );
    let (worker, mut started) = quick_worker(&engine, 1).await;
    assert_eq!(
        bounded("the run to start again", started.recv()).await,
        Some((run, 1))
    );
    worker.stop().await;
    close(engine).await;
}

/// A cancel requested while the handler runs is kept in the store: the process "dies" within
/// the grace period (nothing ended the run), and the reopen ends it `canceled`, its attempt
/// recorded as canceled — not a crashed attempt and a retry — and it never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_before_the_crash_ends_the_run_canceled_at_reopen() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    let (worker, run) = run_stuck_in_its_first_attempt(&engine, backoff_5s(3)).await;
    let requested = engine.cancel(run).await.expect("cancel");
    assert_eq!(
        requested.status,
        RunStatus::Executing,
        "the handler ignores its token: the grace period runs"
    );
    assert_eq!(requested.cancel_requested_at, Some(EPOCH));
    worker.crash();
    close(engine).await; // The process "dies" within the grace period.

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let record = engine.get(run).await.expect("recovered");
    assert_eq!(
        record.status,
        RunStatus::Canceled,
        "the cancel outlived the crash"
    );
    assert_eq!(record.attempt, 1, "no retry");
    assert_eq!(
        record
            .attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        vec!["canceled"],
        "the attempt that ran is recorded as canceled"
    );
    assert_eq!(record.cancel_requested_at, Some(EPOCH));
    assert_eq!(record.finished_at, Some(EPOCH));

    // Never again: past any backoff, a worker of the reopened engine starts only a new run.
    let (worker, mut started) = quick_worker(&engine, 1).await;
    clock.advance(Duration::from_secs(60));
    let marker = engine.trigger("job").send().await.expect("marker").run.id;
    assert_eq!(
        bounded("the marker to start", started.recv()).await,
        Some((marker, 1))
    );
    assert_eq!(finished(&engine, marker).await.status, RunStatus::Completed);
    assert!(started.try_recv().is_err(), "nothing else started");
    assert_eq!(
        engine.get(run).await.expect("get").status,
        RunStatus::Canceled
    );
    worker.stop().await;
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_come_back_in_order_with_their_deadlines() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    // Limit 0: everything waits in its queue.
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 0,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("env");
    let plain_a = engine.trigger("job").send().await.expect("a").run.id;
    let urgent = engine
        .trigger("job")
        .priority(Duration::from_secs(60))
        .send()
        .await
        .expect("urgent")
        .run
        .id;
    let plain_b = engine.trigger("job").send().await.expect("b").run.id;
    let doomed = engine
        .trigger("job")
        .queue("other")
        .ttl(Duration::from_secs(30))
        .send()
        .await
        .expect("doomed")
        .run
        .id;
    let later = engine
        .trigger("job")
        .delay(Duration::from_secs(20))
        .send()
        .await
        .expect("later")
        .run
        .id;
    close(engine).await;

    let engine = open(&path, &clock, EngineConfig::default()).await;
    assert_eq!(
        engine.get(later).await.expect("later").status,
        RunStatus::Delayed
    );
    assert_eq!(
        engine.get(plain_a).await.expect("a").status,
        RunStatus::Queued
    );
    // The TTL fires at its original instant, with one timer wake-up.
    clock.advance(Duration::from_secs(30));
    let expired = finished(&engine, doomed).await;
    assert_eq!(expired.status, RunStatus::Expired);
    assert!(engine
        .timer_stats()
        .wakeups
        .contains(&EPOCH.saturating_add(Duration::from_secs(30))));
    // One slot: the order of starts is priority, then trigger order, then the delayed run.
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 1,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("env");
    let (worker, mut started) = quick_worker(&engine, 1).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        let (run, _) = bounded("a start", started.recv()).await.expect("start");
        order.push(run);
    }
    assert_eq!(order, vec![urgent, plain_a, plain_b, later]);
    worker.stop().await;
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_deleted_when_their_retention_ends() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let config = EngineConfig {
        retention: Retention {
            completed: Some(Duration::from_secs(60)),
            ..Retention::default()
        },
        ..EngineConfig::default()
    };
    let engine = open(&path, &clock, config.clone()).await;
    let (worker, _started) = quick_worker(&engine, 1).await;
    let run = engine.trigger("job").send().await.expect("trigger").run.id;
    assert_eq!(finished(&engine, run).await.status, RunStatus::Completed);
    worker.stop().await;
    let purge_at = EPOCH.saturating_add(Duration::from_secs(60));
    clock.advance(Duration::from_secs(59));
    // The lease deadline armed at claim may still wake the timer once on the way (a stale
    // deadline, not a poll); the purge itself must take exactly one wake-up, at its instant.
    bounded("the timer to re-arm", clock.wait_sleeper_at(purge_at)).await;
    let before = engine.timer_stats().wakeups.len();
    assert!(
        engine.get(run).await.is_ok(),
        "kept until its retention ends"
    );
    clock.advance(Duration::from_secs(1));
    bounded("the purge", async {
        loop {
            if matches!(engine.get(run).await, Err(EngineError::RunNotFound(_))) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let wakeups = engine.timer_stats().wakeups;
    assert_eq!(
        wakeups[before..],
        [purge_at],
        "one wake-up, at the purge instant, and no poll"
    );
    close(engine).await;

    // The purge is durable, and a reopen arms nothing for it any more.
    let engine = open(&path, &clock, config).await;
    assert!(matches!(
        engine.get(run).await,
        Err(EngineError::RunNotFound(_))
    ));
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_file_is_refused_and_left_unchanged() {
    let path = data_path();
    std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
    let bytes = b"these are somebody else's notes, not a database\n".repeat(100);
    std::fs::write(&path, &bytes).expect("write");
    match runlane::embedded(&path).await {
        Err(OpenError::Store(e)) => assert!(!e.to_string().is_empty()),
        Err(other) => panic!("expected a store error, got {other}"),
        Ok(_) => panic!("a foreign file must be refused"),
    }
    assert_eq!(
        std::fs::read(&path).expect("read"),
        bytes,
        "never overwritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_on_the_same_path_is_refused() {
    let path = data_path();
    let first = runlane::embedded(&path).await.expect("first");
    match runlane::embedded(&path).await {
        Err(OpenError::Store(e)) => {
            assert!(e.to_string().contains("in use"), "clear message, got: {e}")
        }
        Err(other) => panic!("expected a store error, got {other}"),
        Ok(_) => panic!("two engines on one data path"),
    }
    close(first).await;
    let again = runlane::embedded(&path)
        .await
        .expect("the lock is released with the engine");
    close(again).await;
}

/// Waits until a sleeper is parked on `clock` until exactly `at` (a timer armed for it).
async fn armed(clock: &ManualClock, at: Timestamp) {
    bounded(&format!("a sleeper at {at}"), clock.wait_sleeper_at(at)).await;
}

async fn scheduled_runs(engine: &Engine) -> Vec<runlane::core::backend::RunRecord> {
    let filter = runlane::core::backend::RunFilter {
        source: Some(runlane::core::TriggerSource::Scheduled),
        ..Default::default()
    };
    engine.list(&filter).await.expect("list")
}

/// Ticks missed while the process was down fire once on reopen, for the latest missed tick:
/// every 30 s, the tick at EPOCH + 10 s fires; closed, the clock moves to EPOCH + 165 s (ticks
/// at 40, 70, 100, 130 and 160 s missed); the reopened engine fires one run for 160 s and
/// arms 190 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_schedule_ticks_fire_once_on_reopen() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let at = |s: u64| EPOCH.saturating_add(Duration::from_secs(s));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    let def: runlane::core::VersionDef = serde_json::from_value(json!({"tasks": [
        {"name": "report", "schedules": [{"cron": "*/30 * * * * *"}]}
    ]}))
    .expect("definition");
    let v = engine
        .register_version("default", def)
        .await
        .expect("register");
    engine.promote("default", v).await.expect("promote");
    armed(&clock, at(10)).await;
    clock.set(at(10));
    // Armed for the next tick once the tick fired and its cursor moved.
    armed(&clock, at(40)).await;
    let first = scheduled_runs(&engine).await;
    assert_eq!(first.len(), 1);
    close(engine).await;

    clock.set(at(165));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    armed(&clock, at(190)).await;
    let runs = scheduled_runs(&engine).await;
    let keys: Vec<Option<&str>> = runs.iter().map(|r| r.idempotency_key.as_deref()).collect();
    let key = |s: u64| format!("schedule:report:0:{}", at(s).as_millis());
    assert_eq!(
        keys,
        vec![Some(key(10).as_str()), Some(key(160).as_str())],
        "five missed ticks fire one run, for the latest"
    );
    let info = engine.schedules("default").await.expect("schedules");
    assert_eq!(info[0].last_tick, Some(at(160)));
    assert_eq!(info[0].next_tick, Some(at(190)));
    close(engine).await;
}

/// The `job` queue of env `default`, as the engine reports it.
async fn job_queue(engine: &Engine) -> runlane::core::backend::QueueInfo {
    let queues = engine.queues("default").await.expect("queues");
    queues
        .into_iter()
        .find(|q| q.name.as_str() == "job")
        .expect("the job queue")
}

/// Admin queue settings are kept in the run store (issue 4): a queue paused with an admin
/// limit stays paused across a restart (its recovered runs stay queued), the limit holds once
/// it is resumed, and the resume itself outlives the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_and_its_admin_limit_survive_a_restart() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    engine
        .set_queue(
            "default",
            "job",
            QueueSettings {
                limit: Some(1),
                ..QueueSettings::default()
            },
        )
        .await
        .expect("set the queue");
    engine.pause_queue("default", "job").await.expect("pause");
    let first = engine.trigger("job").send().await.expect("first").run.id;
    let second = engine.trigger("job").send().await.expect("second").run.id;
    close(engine).await;
    // Later, so that the reopened engine (same seed) hands out new run ids.
    clock.advance(Duration::from_secs(1));

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let queue = job_queue(&engine).await;
    assert!(queue.settings.paused, "the pause outlives the restart");
    assert_eq!(queue.settings.limit, Some(1), "so does the admin limit");
    assert_eq!((queue.queued, queue.running), (2, 0), "nothing admitted");
    for run in [first, second] {
        assert_eq!(
            engine.get(run).await.expect("run").status,
            RunStatus::Queued
        );
    }
    // A run triggered after the restart waits too.
    let third = engine.trigger("job").send().await.expect("third").run.id;
    assert_eq!(
        engine.get(third).await.expect("third").status,
        RunStatus::Queued
    );

    engine.resume_queue("default", "job").await.expect("resume");
    let queue = job_queue(&engine).await;
    assert!(!queue.settings.paused);
    assert_eq!(queue.settings.limit, Some(1));
    assert_eq!((queue.queued, queue.running), (2, 1), "the limit holds");
    close(engine).await;

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let queue = job_queue(&engine).await;
    assert!(!queue.settings.paused, "the resume outlives the restart");
    assert_eq!(queue.settings.limit, Some(1));
    close(engine).await;
}

/// A queue's `max_queued` limits the new work a trigger offers, never runs already accepted:
/// five runs accepted while their queue was paused and uncapped, then a cap of two set on it,
/// all come back at the reopen (the recovery enqueues them past the cap) and complete. The cap
/// still refuses a new trigger, which changes nothing. Before, the recovery's enqueue of the
/// third to fifth was refused with `QueueFull` and only logged: they stayed unfinished in the
/// store and never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_accepted_past_a_queues_cap_are_all_recovered_at_reopen_and_complete() {
    const CAP: u32 = 2;
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    // Paused, so the runs wait (queued) instead of taking the fast path.
    engine.pause_queue("default", "job").await.expect("pause");
    let mut accepted = Vec::new();
    for i in 0..CAP + 3 {
        let run = engine.trigger("job").send().await;
        accepted.push(run.unwrap_or_else(|e| panic!("trigger {i}: {e}")).run.id);
    }
    engine
        .set_queue(
            "default",
            "job",
            QueueSettings {
                max_queued: Some(CAP),
                paused: true,
                ..QueueSettings::default()
            },
        )
        .await
        .expect("cap the queue");
    close(engine).await;
    // Later, so that the reopened engine (same seed) hands out new run ids.
    clock.advance(Duration::from_secs(1));

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let queue = job_queue(&engine).await;
    assert_eq!(queue.settings.max_queued, Some(CAP), "the cap is in force");
    assert_eq!(
        queue.queued,
        accepted.len() as u64,
        "every accepted run is back in its queue"
    );
    // The cap still refuses new work, and the refused trigger changes nothing.
    match engine.trigger("job").send().await {
        Err(EngineError::QueueFull { max_queued, .. }) => assert_eq!(max_queued, CAP),
        other => panic!("a trigger over the cap is refused: {other:?}"),
    }
    assert_eq!(job_queue(&engine).await.queued, accepted.len() as u64);

    engine.resume_queue("default", "job").await.expect("resume");
    let (worker, _started) = quick_worker(&engine, 2).await;
    for run in &accepted {
        assert_eq!(finished(&engine, *run).await.status, RunStatus::Completed);
    }
    worker.stop().await;
    close(engine).await;
}

/// A promotion that sets a queue's limit replaces an admin limit (the precedence rule), and
/// the stored copy follows it: after a restart the promoted limit holds, not the older admin
/// one, while the admin's pause, which no version sets, is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_limit_replaces_a_stored_admin_limit_across_a_restart() {
    let path = data_path();
    let clock = Arc::new(ManualClock::new(EPOCH));
    let engine = open(&path, &clock, EngineConfig::default()).await;
    engine
        .set_queue(
            "default",
            "job",
            QueueSettings {
                limit: Some(5),
                paused: true,
                ..QueueSettings::default()
            },
        )
        .await
        .expect("admin settings");
    let mut job = TaskDef::new(TaskName::new("job").expect("task"));
    job.queue_limit = Some(2);
    let version = engine
        .register_version("default", VersionDef { tasks: vec![job] })
        .await
        .expect("register");
    engine.promote("default", version).await.expect("promote");
    assert_eq!(job_queue(&engine).await.settings.limit, Some(2));
    close(engine).await;

    let engine = open(&path, &clock, EngineConfig::default()).await;
    let settings = job_queue(&engine).await.settings;
    assert_eq!(
        settings.limit,
        Some(2),
        "the promoted limit, not the older admin one"
    );
    assert!(settings.paused, "the admin's pause holds");
    close(engine).await;
}
