//! The store-first protocol when Redis fails after the commit (SPEC §7): triggers made while
//! Redis is unreachable (a cuttable TCP proxy in front of the Redis server) are still accepted,
//! stay `pending_enqueue` in PostgreSQL, and the reconciler enqueues them once Redis answers
//! again. Nothing is lost and nothing runs twice. Redis (`RUNLANE_REDIS_URL`) and PostgreSQL
//! (`RUNLANE_DATABASE_URL`) are required: a missing server fails the test.

mod distributed_support;
mod redis_support;
mod run_counter;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use distributed_support::Proxy;
use run_counter::{counting_worker, Executions};
use runlane::core::{RunId, RunStatus};
use runlane::{DistributedConfig, EngineBuilder, ReconcileConfig};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Runs triggered while Redis is cut.
const DURING: usize = 20;

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `host:port` of the Redis URL (`redis://host:port[/db]`).
fn redis_address() -> String {
    let url = redis_support::url();
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A throwaway deployment whose Redis is reached through a cuttable proxy, with a quick
/// reconciler (300 ms grace, pages of 2).
async fn behind_proxy(tag: &str) -> (runlane::Distributed, Proxy) {
    let proxy = Proxy::start(redis_address()).await;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut config = DistributedConfig::new(
        format!("redis://127.0.0.1:{}", proxy.port()),
        database_url(),
    );
    config.redis.prefix = redis_support::fresh_prefix(tag);
    config.redis.response_timeout = Duration::from_millis(500);
    config.postgres.schema = format!("rlt_{tag}_{}_{n}", std::process::id());
    config.postgres.pool_size = 4;
    config.reconcile = ReconcileConfig {
        grace: Duration::from_millis(300),
        batch: 2,
        retry_after: Duration::from_millis(100),
        ..ReconcileConfig::default()
    };
    config.throwaway = true;
    let engine = match runlane::distributed_with(EngineBuilder::new(), config).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    };
    assert!(engine.health().await.ok(), "both sides answer at start");
    (engine, proxy)
}

/// Shuts an engine of [`behind_proxy`] down and deletes its key space now: it is reached
/// through the proxy, which goes before the engine's own cleanup at drop could reach it.
async fn shut_down_behind_proxy(engine: &runlane::Distributed) {
    engine.shutdown().await;
    engine
        .queue()
        .redis()
        .delete_keys()
        .await
        .expect("delete the test's keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_after_commit_is_reconciled_nothing_lost_nothing_twice() {
    let (engine, proxy) = behind_proxy("recon").await;

    let runs = Executions::default();
    let worker = counting_worker(engine.worker(), &runs).await;

    // With Redis up: the ordinary path.
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    for run in &before {
        assert_completed(&engine, *run).await;
    }

    // Redis unreachable: the commit succeeds, the enqueue fails, the trigger still accepts.
    proxy.cut().await;
    let mut during = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..DURING {
        let triggered = engine
            .trigger("job")
            .send()
            .await
            .expect("a committed run is accepted though redis failed");
        during.push(triggered.run.id);
    }
    // Only the first call to find Redis gone waits out the connection's reconnect attempts;
    // the link is then known down and later calls fail fast, so each later trigger costs its
    // commit alone (waiting them out every time took ≈1.2 s per trigger with this timeout).
    let spent = started.elapsed();
    assert!(
        spent < Duration::from_secs(10),
        "triggers during the outage do not wait for redis each time: {spent:?}"
    );
    assert_eq!(
        engine.queue().deferred(),
        DURING as u64,
        "every enqueue was deferred"
    );
    for run in &during {
        assert_eq!(
            engine.store().dispatch_state(*run).await.expect("read"),
            Some(runlane::DispatchState::PendingEnqueue),
            "a deferred run stays pending_enqueue"
        );
    }
    let health = engine.health().await;
    assert!(
        !health.redis && health.postgres,
        "health names redis: {health:?}"
    );

    // Redis back: the reconciler (armed by the oldest pending row) enqueues them.
    proxy.restore();
    for run in &during {
        assert_completed(&engine, *run).await;
    }
    for run in &during {
        assert_eq!(
            engine.store().dispatch_state(*run).await.expect("read"),
            Some(runlane::DispatchState::InQueue),
        );
    }
    let executed = runs.lock().expect("lock").clone();
    for run in before.iter().chain(&during) {
        assert_eq!(
            executed.get(run),
            Some(&1),
            "run {run} executed exactly once"
        );
    }
    assert_eq!(executed.len(), 3 + DURING, "no other run executed");
    assert!(engine.health().await.ok(), "both sides answer again");
    worker.stop().await;
    shut_down_behind_proxy(&engine).await;
}

async fn assert_completed(engine: &runlane::Distributed, run: RunId) {
    let record = redis_support::finished(engine, run).await;
    assert_eq!(record.status, RunStatus::Completed, "run {run}");
    assert_eq!(record.attempts.len(), 1, "run {run} had one attempt");
}

/// A quick run in the distributed shape costs exactly one insert and one update of its row:
/// it finishes before the marker's batch lands (the marker lingers), its terminal write sets
/// `in_queue` itself, and the batch writes only rows still `pending_enqueue` and unfinished. A
/// run still executing when the batch lands is marked (its second update comes at its end).
/// A row trigger (test only) counts every insert and update of `runs` on the server side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_run_costs_one_insert_and_one_update_of_its_row() {
    use sqlx::Connection;

    let mut config = lingering_config("rows");
    let schema = config.postgres.schema.clone();
    // The held run's start stays in memory (else it is written after 1 s: a long run's write).
    config.postgres.start_flush_after = Duration::from_secs(3600);
    let engine = redis_support::open_distributed(config).await;
    let mut conn = sqlx::PgConnection::connect(&database_url())
        .await
        .expect("connect");
    let ddl = format!(
        "CREATE TABLE \"{schema}\".row_writes (op text NOT NULL, id bytea NOT NULL); \
         CREATE FUNCTION \"{schema}\".count_row_write() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO \"{schema}\".row_writes VALUES (TG_OP, NEW.id); RETURN NEW; END $$; \
         CREATE TRIGGER count_row_writes AFTER INSERT OR UPDATE ON \"{schema}\".runs \
         FOR EACH ROW EXECUTE FUNCTION \"{schema}\".count_row_write();"
    );
    sqlx::Executor::execute(&mut conn, ddl.as_str())
        .await
        .expect("install the counting trigger");

    let runs = Executions::default();
    let (release, released) = tokio::sync::watch::channel(false);
    let worker = counting_worker(
        engine
            .worker()
            .handler("hold", move |_ctx: runlane::RunContext| {
                let mut released = released.clone();
                async move {
                    released
                        .wait_for(|go| *go)
                        .await
                        .map_err(|_| runlane::HandlerError::new("released dropped"))?;
                    Ok::<serde_json::Value, runlane::HandlerError>(serde_json::Value::Null)
                }
            }),
        &runs,
    )
    .await;

    let mut quick = Vec::new();
    for _ in 0..10 {
        quick.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    // Accepted after the quick runs: marked in their batch or a later one.
    let held = engine.trigger("hold").send().await.expect("trigger").run.id;
    for run in &quick {
        assert_completed(&engine, *run).await;
    }
    // The batch has landed once the held run (still executing) is marked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while engine.store().dispatch_state(held).await.expect("read")
        != Some(runlane::DispatchState::InQueue)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the marker never marked the held run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counting = format!(
        "SELECT count(*) FILTER (WHERE op = 'INSERT'), count(*) FILTER (WHERE op = 'UPDATE') \
         FROM \"{schema}\".row_writes WHERE id = $1"
    );
    let count =
        |run: RunId| sqlx::query_as::<_, (i64, i64)>(&counting).bind(run.to_bytes().to_vec());
    for run in &quick {
        assert_eq!(
            count(*run).fetch_one(&mut conn).await.expect("count"),
            (1, 1),
            "quick run {run}: one insert, one update"
        );
    }
    assert_eq!(
        count(held).fetch_one(&mut conn).await.expect("count"),
        (1, 1),
        "the held run: its insert and its mark"
    );
    release.send_replace(true);
    assert_completed(&engine, held).await;
    assert_eq!(
        count(held).fetch_one(&mut conn).await.expect("count"),
        (1, 2),
        "the held run: insert, mark, terminal write"
    );
    assert_eq!(engine.queue().marked(), 1, "only the held run was marked");
    let _ = conn.close().await;
    worker.stop().await;
    engine.shutdown().await;
}

/// A planned stop writes the buffered `in_queue` marks: nothing it accepted is left
/// `pending_enqueue` for a later reconciler (the marker lingers 10 s here, far past the stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_the_buffered_marks() {
    let engine = redis_support::open_distributed(lingering_config("stopmarks")).await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    for run in &runs {
        assert_eq!(
            engine.store().dispatch_state(*run).await.expect("read"),
            Some(runlane::DispatchState::PendingEnqueue),
            "the mark is still buffered (no worker, 10 s linger)"
        );
    }
    engine.shutdown().await;
    for run in &runs {
        assert_eq!(
            engine.store().dispatch_state(*run).await.expect("read"),
            Some(runlane::DispatchState::InQueue),
            "written by the stop"
        );
    }
}

/// A throwaway deployment whose marker lingers 10 s after a batch's first accepted run, long
/// enough for quick runs to end first on a loaded machine (the reconciler's grace is 30 s, so
/// it never steps in).
fn lingering_config(tag: &str) -> DistributedConfig {
    let mut config = redis_support::distributed_config(redis_support::url(), tag);
    config.mark_linger = Duration::from_secs(10);
    config.reconcile.grace = Duration::from_secs(30);
    config
}

/// The reconciler enqueues committed runs past their queue's `max_queued`: the cap limits new
/// work, and these runs were accepted (their triggers answered while Redis was cut). Ten runs
/// are accepted during a cut into a paused queue capped at four; once Redis is back all ten are
/// marked `in_queue`, then the queue resumes and all complete, once each. Before, the reconciler's
/// enqueue was refused past the cap (`queue_full`): six stayed `pending_enqueue` for as long as
/// the key was full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_enqueues_accepted_runs_past_their_queues_cap() {
    const CAP: u32 = 4;
    let (engine, proxy) = behind_proxy("recon_cap").await;
    redis_support::cap_job_queue_paused(&engine, CAP).await;

    proxy.cut().await;
    let mut accepted = Vec::new();
    for _ in 0..10 {
        let triggered = engine.trigger("job").send().await;
        accepted.push(triggered.expect("accepted while redis is cut").run.id);
    }
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for run in &accepted {
        while engine.store().dispatch_state(*run).await.expect("read")
            != Some(runlane::DispatchState::InQueue)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} was never enqueued past the cap"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    engine.resume_queue("default", "job").await.expect("resume");
    let runs = Executions::default();
    let worker = counting_worker(engine.worker(), &runs).await;
    for run in &accepted {
        assert_completed(&engine, *run).await;
    }
    let executed = runs.lock().expect("lock").clone();
    for run in &accepted {
        assert_eq!(executed.get(run), Some(&1), "run {run} executed once");
    }
    worker.stop().await;
    shut_down_behind_proxy(&engine).await;
}

/// The queue reports an expiry once, to the process whose timer ticked, and forgets the run:
/// a process that died before recording it left the run waiting in PostgreSQL with nothing
/// to end it (until some process's next open). The reconciler's TTL sweep enqueues it again
/// once its deadline is a grace period past, and this process's timer records the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_heard_by_a_process_that_died_is_recorded_by_the_sweep() {
    use runlane::core::backend::QueueBackend;

    let (engine, other) = with_another_process("ttl_sweep").await;
    // No worker: the run waits in its queue until its TTL passes.
    let run = engine
        .trigger("job")
        .ttl(Duration::from_secs(3))
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    let deadline = engine
        .get(run)
        .await
        .expect("read")
        .ttl_deadline
        .expect("a ttl deadline");

    // Another process of the deployment: its timer ticks past the deadline (the instant is
    // the caller's argument), hears the expiry, and dies before recording it.
    let tick = other
        .tick(deadline.saturating_add(Duration::from_millis(1)))
        .await
        .expect("tick");
    let heard: Vec<RunId> = tick.expired.iter().map(|d| d.run_id).collect();
    assert_eq!(heard, vec![run], "the other process heard the expiry");
    assert!(
        other.live(run).await.expect("live").is_none(),
        "the run left redis"
    );
    drop(other);

    let record = redis_support::finished(&engine, run).await;
    assert_eq!(record.status, RunStatus::Expired, "run {run}");
    assert!(record.attempts.is_empty(), "an expired run never started");
    engine.shutdown().await;
}

/// A deployment with a quick reconciler (300 ms grace, 200 ms idle check), and the queue of
/// another process of it (a plain Redis queue on its prefix), to act as a process that died
/// half-way through something.
async fn with_another_process(tag: &str) -> (runlane::Distributed, runlane::RedisQueue) {
    let mut config = redis_support::distributed_config(redis_support::url(), tag);
    config.reconcile = ReconcileConfig {
        grace: Duration::from_millis(300),
        retry_after: Duration::from_millis(100),
        idle_check: Duration::from_millis(200),
        ..ReconcileConfig::default()
    };
    let prefix = config.redis.prefix.clone();
    let engine = redis_support::open_distributed(config).await;
    let other = runlane::RedisQueue::open(
        runlane::RedisConfig::new(redis_support::url()).with_prefix(prefix),
    )
    .await
    .expect("open the other process's queue");
    (engine, other)
}

/// A cancel is kept in the store first, then the run leaves the queue, then it is written
/// `canceled`: a process that died between the last two left the run unfinished in
/// PostgreSQL and gone from Redis (until some process's next open). The reconciler's sweep
/// of requested cancels applies the cancel again: the run ends `canceled`, never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_whose_process_died_before_the_terminal_write_is_ended_by_the_sweep() {
    use runlane::core::backend::{CancelOutcome, QueueBackend, RunStore};

    let (engine, other) = with_another_process("cancel_sweep").await;
    // Paused: the run waits, and a worker started later could only run it if it came back.
    engine.pause_queue("default", "job").await.expect("pause");
    let run = engine.trigger("job").send().await.expect("trigger").run.id;
    let record = engine.get(run).await.expect("read");

    // The other process: the request kept, the run removed from Redis, then it dies.
    let at = engine.now();
    engine
        .store()
        .request_cancel(run, at)
        .await
        .expect("request the cancel");
    let removed = other
        .cancel_of(&record.dispatch(), Duration::from_secs(10), at)
        .await
        .expect("cancel in redis");
    assert!(
        matches!(removed, CancelOutcome::Removed { .. }),
        "the waiting run left redis: {removed:?}"
    );
    drop(other);

    let runs = Executions::default();
    let worker = counting_worker(engine.worker(), &runs).await;
    engine.resume_queue("default", "job").await.expect("resume");
    let record = redis_support::finished(&engine, run).await;
    assert_eq!(record.status, RunStatus::Canceled, "run {run}");
    assert!(
        record.attempts.is_empty(),
        "a run cancelled waiting never started"
    );
    assert!(runs.lock().expect("lock").is_empty(), "nothing ran");
    worker.stop().await;
    engine.shutdown().await;
}
