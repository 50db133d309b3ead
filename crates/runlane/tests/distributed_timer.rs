//! Timers and run events across processes, with two engines of the distributed shape on one
//! key prefix and schema (each engine has its own connections, tasks and origin id, as two
//! processes would; `distributed_kill.rs` does the same with OS processes):
//!
//! - one engine owns the timers; a delayed run triggered through the other one is promoted on
//!   time (its deadline is announced to the owner);
//! - the owner is dropped without giving the ownership up (as when its process dies): the other
//!   engine takes over within one timer lease and promotes a delayed run on time;
//! - a run completed by one engine's worker answers the other engine's `wait` at once (the
//!   terminal status crosses processes on `{prefix}:events`);
//! - an engine opening while another one runs an attempt (its start mark in PostgreSQL) leaves
//!   the attempt alone: the store is shared, so the lease, not the open, decides a crash;
//! - `announce` (the Redis side of announcements) answers only deadlines earlier than the one the
//!   owner last armed.
//!
//! Redis (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use runlane::core::{RunId, RunStatus, Timestamp};
use runlane::{DistributedConfig, EngineBuilder, HandlerError, RunContext, WaitOutcome};
use serde_json::Value;
use tokio::sync::mpsc;

static NEXT: AtomicU64 = AtomicU64::new(0);

const TIMER_LEASE: Duration = Duration::from_secs(1);
/// How late a promotion may be: one tick, a publish and a claim on a shared 2-core machine
/// running the rest of the suite beside. Generous: the exact instant is ORD-02's (manual
/// clock); this checks that the deadline crosses processes (unannounced, the run would wait
/// for some later wake-up, or for ever on an idle owner).
const ON_TIME: Duration = Duration::from_millis(1_500);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn config(prefix: &str, schema: &str, throwaway: bool) -> DistributedConfig {
    let mut config = DistributedConfig::new(redis_support::url(), database_url());
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config.timer_lease = TIMER_LEASE;
    config.throwaway = throwaway;
    config
}

async fn open(prefix: &str, schema: &str, throwaway: bool) -> runlane::Distributed {
    match runlane::distributed_with(EngineBuilder::new(), config(prefix, schema, throwaway)).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    }
}

/// Waits until `cond` holds, checking every 10 ms, for at most `limit`; answers how long it
/// took, or `None`.
async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A worker on `engine` that reports each run it starts, with the engine instant it started.
async fn reporting_worker(
    engine: &runlane::Distributed,
) -> (runlane::Worker, mpsc::UnboundedReceiver<(RunId, Timestamp)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let clock = engine.engine().clone();
    let worker = engine
        .worker()
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            let now = clock.now();
            async move {
                let _ = tx.send((ctx.run_id(), now));
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

/// Triggers a run delayed by `delay` through `engine` and checks that the worker behind `rx`
/// starts it no earlier than due and at most [`ON_TIME`] late.
async fn delayed_run_on_time(
    engine: &runlane::Distributed,
    rx: &mut mpsc::UnboundedReceiver<(RunId, Timestamp)>,
    delay: Duration,
) {
    let triggered = engine
        .trigger("job")
        .delay(delay)
        .send()
        .await
        .expect("trigger a delayed run");
    let run = triggered.run.id;
    let due = triggered.run.run_after;
    let started = tokio::time::timeout(delay + Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Some((r, at)) if r == run => return at,
                Some(_) => continue,
                None => panic!("the worker stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("delayed run {run} never started"));
    assert!(started >= due, "run {run} started before it was due");
    let late = started.since(due);
    assert!(
        late <= ON_TIME,
        "run {run} started {late:?} after it was due (bound {ON_TIME:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_timer_owner_is_replaced_within_one_lease_and_deadlines_stay_on_time() {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = redis_support::fresh_prefix("timer");
    let schema = format!("rlt_timer_{}_{n}", std::process::id());
    let first = open(&prefix, &schema, false).await;
    assert!(
        until(TIMER_LEASE * 3, || first.owns_timers())
            .await
            .is_some(),
        "the only engine takes the timer ownership"
    );
    let second = open(&prefix, &schema, true).await;
    let (_worker, mut rx) = reporting_worker(&second).await;

    // The second engine does not own the timers: its delayed run's deadline is announced to
    // the owner, whose tick promotes it; the wake crosses back to the second engine's worker.
    assert!(!second.owns_timers());
    delayed_run_on_time(&second, &mut rx, Duration::from_millis(800)).await;
    assert!(!second.owns_timers(), "the owner kept the ownership");

    // The owner is gone without giving the ownership up; a run is delayed meanwhile.
    let dropped = Instant::now();
    drop(first);
    let deadline_run = tokio::spawn({
        let engine = second.engine().clone();
        async move {
            engine
                .trigger("job")
                .delay(Duration::from_millis(1_500))
                .send()
                .await
                .expect("trigger")
        }
    });
    let took = until(TIMER_LEASE * 3, || second.owns_timers())
        .await
        .expect("the second engine takes the timer ownership over");
    let since_drop = dropped.elapsed();
    // The leader key outlives its owner by at most one lease (a renewal in flight at the drop
    // still lands), then the watcher takes it over.
    assert!(
        since_drop <= TIMER_LEASE * 2,
        "taken over {since_drop:?} after the owner died ({took:?} of watching), lease {TIMER_LEASE:?}"
    );
    assert_eq!(second.timer_takeovers(), 1);

    // The run delayed while nobody owned the timers is promoted on time by the new owner.
    let triggered = deadline_run.await.expect("trigger task");
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Some((r, at)) if r == triggered.run.id => return at,
                Some(_) => continue,
                None => panic!("the worker stopped"),
            }
        }
    })
    .await
    .expect("the run delayed across the takeover starts");
    let late = started.since(triggered.run.run_after);
    assert!(
        started >= triggered.run.run_after && late <= ON_TIME,
        "started {late:?} after it was due"
    );

    // And the new owner keeps deadlines on time.
    delayed_run_on_time(&second, &mut rx, Duration::from_millis(600)).await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_answers_when_another_process_completes_the_run() {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = redis_support::fresh_prefix("events");
    let schema = format!("rlt_events_{}_{n}", std::process::id());
    // A triggers and waits; B, with the only worker, completes.
    let a = open(&prefix, &schema, true).await;
    let b = open(&prefix, &schema, false).await;
    let (_worker, _rx) = reporting_worker(&b).await;
    let timeout = Duration::from_secs(20);
    for _ in 0..5 {
        let run = a.trigger("job").send().await.expect("trigger").run.id;
        let start = Instant::now();
        let outcome = a.wait(run, timeout).await.expect("wait");
        let took = start.elapsed();
        match outcome {
            WaitOutcome::Finished(record) => assert_eq!(record.status, RunStatus::Completed),
            WaitOutcome::Pending { status, .. } => {
                panic!("wait answered {status:?} after {took:?}")
            }
        }
        assert!(
            took < Duration::from_secs(5),
            "the wait answered after {took:?}, its timeout is {timeout:?}"
        );
    }
    // A subscription in A sees B's terminal event too.
    let run = a.trigger("job").send().await.expect("trigger").run.id;
    let mut events = a.subscribe(run).await.expect("subscribe");
    let last = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last = None;
        while let Some(event) = events.next().await {
            last = event.status();
        }
        last
    })
    .await
    .expect("the run's events end");
    assert_eq!(last, Some(RunStatus::Completed));
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_opening_beside_a_running_attempt_does_not_count_it_crashed() {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = redis_support::fresh_prefix("marks");
    let schema = format!("rlt_marks_{}_{n}", std::process::id());
    let a = open(&prefix, &schema, false).await;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let worker = a
        .worker()
        .handler("job", move |ctx: RunContext| {
            let started_tx = started_tx.clone();
            let gate = gate.clone();
            async move {
                let _ = started_tx.send(ctx.attempt());
                gate.notified().await;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    let run = a.trigger("job").send().await.expect("trigger").run.id;
    let first = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("the run starts")
        .expect("the worker runs");
    assert_eq!(first, 1);
    // The start mark reaches PostgreSQL in the background (after `start_flush_after`): wait
    // until the row has it, so the second engine's open finds the run executing with a mark.
    let mut conn = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&database_url())
            .await
            .expect("postgresql")
    };
    let marked = format!("SELECT started_at IS NOT NULL FROM \"{schema}\".runs WHERE id = $1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (has_mark,): (bool,) = sqlx::query_as(&marked)
            .bind(run.to_bytes().to_vec())
            .fetch_one(&mut conn)
            .await
            .expect("read the row");
        if has_mark {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no start mark in PostgreSQL after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = open(&prefix, &schema, true).await;
    // B's open did not end the attempt as crashed nor schedule another one.
    let record = b.get(run).await.expect("get");
    assert_eq!(record.attempt, 1, "the open counted an attempt: {record:?}");
    assert_eq!(record.status, RunStatus::Executing);
    release.notify_one();
    match a.wait(run, Duration::from_secs(10)).await.expect("wait") {
        WaitOutcome::Finished(record) => {
            assert_eq!(record.status, RunStatus::Completed);
            assert_eq!(record.attempt, 1);
        }
        WaitOutcome::Pending { status, .. } => panic!("the run is still {status:?}"),
    }
    assert!(
        started_rx.try_recv().is_err(),
        "the run was started a second time"
    );
    drop(worker);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_answers_only_deadlines_earlier_than_the_owner_sleeps_until() {
    let queue = runlane::RedisQueue::open(redis_support::fresh_config("announce"))
        .await
        .unwrap_or_else(|e| panic!("redis is required: {e}"))
        .delete_keys_on_drop();
    let at = Timestamp::from_millis;
    // No owner has read yet: the first deadline is announced and recorded.
    assert!(queue.announce(at(1_000)).await.expect("announce"));
    // Later ones are not; an earlier one is.
    assert!(!queue.announce(at(2_000)).await.expect("announce"));
    assert!(!queue.announce(at(1_000)).await.expect("announce"));
    assert!(queue.announce(at(500)).await.expect("announce"));
    assert!(!queue.announce(at(700)).await.expect("announce"));
    // The owner re-reads: nothing is due in this key space, so it sleeps until nothing and any
    // new deadline must be announced.
    assert_eq!(queue.next_deadline_armed().await.expect("read"), None);
    assert!(queue.announce(at(9_000)).await.expect("announce"));
    assert!(!queue.announce(at(9_500)).await.expect("announce"));
}
