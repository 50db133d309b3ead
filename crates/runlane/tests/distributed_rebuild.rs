//! A Redis that lost its data (FLUSHALL on a private server) is rebuilt from PostgreSQL
//! (SPEC §7): the runs unfinished there come back, and a run that is terminal in
//! PostgreSQL never does, so nothing is lost and nothing completed runs again. PostgreSQL
//! (`RUNLANE_DATABASE_URL`) and `redis-server` are required: a missing one fails the test.

mod redis_support;
mod run_counter;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis_support::PrivateRedis;
use run_counter::{counting_worker, Executions};
use runlane::core::backend::QueueBackend;
use runlane::core::{EnvName, QueueName, QueueSettings, RunId, RunStatus};

async fn assert_completed(engine: &runlane::Engine, run: RunId) {
    let record = redis_support::finished(engine, run).await;
    assert_eq!(record.status, RunStatus::Completed, "run {run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redis_is_rebuilt_from_postgres_terminal_runs_never_return() {
    let server = PrivateRedis::start("dist-rebuild");
    let config = redis_support::distributed_config(server.url(), "rebuild");
    let engine = redis_support::open_distributed(config).await;
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

/// Workers never poll: an idle workloop waits on its lane's doorbell. A rebuild re-enqueues
/// runs outside any caller's answer, so it must ring their lanes itself, in every process:
/// here process A's idle workloop takes back a run whose key space process B rebuilt, with
/// nothing else calling. Leases are long, so no heartbeat or expiry wakes A in the meantime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_in_one_process_wakes_idle_workers_of_another() {
    use runlane::{HandlerError, RunContext};
    use serde_json::Value;
    use tokio::sync::{mpsc, Semaphore};

    const LEASE: Duration = Duration::from_secs(600);
    const BOUND: Duration = Duration::from_secs(20);
    let (a, b) = redis_support::two_processes("rebuild_wake").await;

    // A: two slots; the first start holds its slot until the gate opens.
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let gate = gate.clone();
        a.worker()
            .workloops("manual>*:2")
            .lease(LEASE)
            .handler("job", move |ctx: RunContext| {
                let (started_tx, gate) = (started_tx.clone(), gate.clone());
                let first = !held.swap(true, Ordering::SeqCst);
                async move {
                    let _ = started_tx.send(ctx.run_id());
                    if first {
                        let _permit = gate
                            .acquire()
                            .await
                            .map_err(|_| HandlerError::new("gate closed"))?;
                    }
                    Ok::<Value, HandlerError>(Value::Null)
                }
            })
            .start()
            .await
            .expect("worker")
    };
    let run = b.trigger("job").send().await.expect("trigger").run.id;
    let first = tokio::time::timeout(BOUND, started.recv())
        .await
        .expect("the first start");
    assert_eq!(first, Some(run));

    // The key space is lost; B's next call rebuilds it: the run comes back waiting.
    lose_and_rebuild_in(&b).await;

    // A's idle second slot is rung by B's rebuild and runs it again (its lease was lost).
    let again = tokio::time::timeout(BOUND, started.recv())
        .await
        .expect("an idle worker of another process takes the rebuilt run back");
    assert_eq!(again, Some(run), "the same run, its lost lease taken again");
    assert_completed(&a, run).await;
    gate.add_permits(1);
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A rebuild brings back every unfinished run, past its queue's `max_queued`: the cap limits
/// the new work a trigger offers, not runs already accepted. Five runs wait in a paused queue
/// that was capped at two afterwards; the key space is lost and rebuilt: all five are back and
/// complete, while a new trigger is still refused. Before, the rebuild's enqueue of the third
/// to fifth was refused (`queue_full`, only logged): they stayed unfinished in PostgreSQL and
/// never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_brings_back_runs_past_their_queues_cap() {
    const CAP: u32 = 2;
    let config = redis_support::distributed_config(redis_support::url(), "rebuild_cap");
    let engine = redis_support::open_distributed(config).await;
    // Paused, so the runs wait (queued) instead of taking the fast path.
    engine.pause_queue("default", "job").await.expect("pause");
    let mut accepted = Vec::new();
    for i in 0..CAP + 3 {
        let run = engine.trigger("job").send().await;
        accepted.push(run.unwrap_or_else(|e| panic!("trigger {i}: {e}")).run.id);
    }
    redis_support::cap_job_queue_paused(&engine, CAP).await;

    lose_and_rebuild_in(&engine).await;
    let mut back: Vec<RunId> = engine
        .queue()
        .snapshot()
        .await
        .expect("snapshot")
        .iter()
        .map(|l| l.dispatch.run_id)
        .collect();
    back.sort();
    let mut expected = accepted.clone();
    expected.sort();
    assert_eq!(back, expected, "every accepted run is rebuilt");
    let settings = engine
        .queue()
        .queue_settings(
            &EnvName::new("default").expect("env"),
            &QueueName::new("job").expect("queue"),
        )
        .await
        .expect("settings");
    assert_eq!(settings.max_queued, Some(CAP), "the cap is in force");
    match engine.trigger("job").send().await {
        Err(runlane::EngineError::QueueFull { max_queued, .. }) => assert_eq!(max_queued, CAP),
        other => panic!("a trigger over the cap is refused: {other:?}"),
    }

    engine.resume_queue("default", "job").await.expect("resume");
    let runs: Executions = Arc::default();
    let worker = counting_worker(engine.worker(), &runs).await;
    for run in &accepted {
        assert_completed(&engine, *run).await;
    }
    worker.stop().await;
    engine.shutdown().await;
}

/// B rebuilds the lost key space (its next call finds it gone).
async fn lose_and_rebuild_in(b: &runlane::Distributed) {
    let deleted = b.queue().redis().delete_keys().await.expect("delete");
    assert!(deleted > 0, "the prefix had keys");
    b.queue().snapshot().await.expect("snapshot (rebuilds)");
    assert_eq!(b.health().await.redis_backend.rebuilds, 1);
}

async fn lane_names(engine: &runlane::Distributed) -> Vec<String> {
    let lanes = engine.lanes().await.expect("lanes");
    lanes.into_iter().map(|l| l.name.to_string()).collect()
}

/// A lane only another process added is not in the rebuilder's memory; a run waiting in it
/// comes back all the same (the rebuild adds the lanes its runs name) and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_brings_back_runs_of_a_lane_another_process_added() {
    let (a, b) = redis_support::two_processes("rebuild_lane").await;
    a.add_lane("y").await.expect("lane y, added by A only");
    let run = b
        .trigger("job")
        .lane("y")
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    lose_and_rebuild_in(&b).await;
    let back = b.queue().snapshot().await.expect("snapshot");
    assert!(
        back.iter().any(|r| r.dispatch.run_id == run),
        "the run of lane y is back in the queue: {back:?}"
    );
    assert!(lane_names(&b).await.contains(&"y".to_string()));
    let executed = Executions::default();
    let worker = counting_worker(b.worker().workloops("y:1"), &executed).await;
    assert_completed(&b, run).await;
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// After another process rebuilt the key space, a process puts its own lanes and consumers
/// back at its next call: a lane only it added is known again (triggers into it are
/// accepted) and the lane its workers claim is covered (not left to look orphaned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_puts_its_lanes_and_consumers_back_in_a_key_space_another_rebuilt() {
    let (a, b) = redis_support::two_processes("rebuild_replay").await;
    a.add_lane("z").await.expect("lane z, added by A only");
    let executed = Executions::default();
    let worker = counting_worker(a.worker().workloops("z:1"), &executed).await;
    let cons = format!("{}:cons", a.queue().redis().key_base());
    let client = redis::Client::open(redis_support::url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let chains = |conn: &mut redis::aio::MultiplexedConnection| {
        let cmd = redis::cmd("HVALS").arg(&cons).clone();
        let mut conn = conn.clone();
        async move {
            cmd.query_async::<Vec<String>>(&mut conn)
                .await
                .expect("hvals")
        }
    };
    assert_eq!(chains(&mut conn).await, vec!["F>z".to_string()]);

    // B's rebuild knows neither lane z nor A's consumer.
    lose_and_rebuild_in(&b).await;

    // A's next call (if none of its tasks made one already) finds the new generation and
    // puts its lane and consumer back.
    a.queue().snapshot().await.expect("a call of A");
    assert_eq!(chains(&mut conn).await, vec!["F>z".to_string()]);
    assert!(lane_names(&b).await.contains(&"z".to_string()));
    let run = b
        .trigger("job")
        .lane("z")
        .send()
        .await
        .expect("a trigger into lane z is accepted again")
        .run
        .id;
    assert_completed(&b, run).await;
    worker.stop().await;
    assert_eq!(executed.lock().expect("lock").get(&run), Some(&1));
    b.shutdown().await;
    a.shutdown().await;
}

/// A queue paused (with an admin limit) through one process is kept in PostgreSQL: another
/// process that rebuilds the lost key space puts the pause and the limit back, though its own
/// memory never saw them, so a run triggered after the rebuild stays queued (issue 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_a_pause_set_through_another_process() {
    let (a, b) = redis_support::two_processes("rebuild_pause").await;
    a.set_queue(
        "default",
        "job",
        QueueSettings {
            limit: Some(3),
            ..QueueSettings::default()
        },
    )
    .await
    .expect("A sets the queue's limit");
    a.pause_queue("default", "job").await.expect("A pauses");

    lose_and_rebuild_in(&b).await;

    let env = EnvName::new("default").expect("env");
    let queue = QueueName::new("job").expect("queue");
    let settings = b
        .queue()
        .queue_settings(&env, &queue)
        .await
        .expect("settings");
    assert!(settings.paused, "the pause is back after B's rebuild");
    assert_eq!(settings.limit, Some(3), "so is A's limit");
    let run = b.trigger("job").send().await.expect("trigger").run.id;
    assert_eq!(
        b.get(run).await.expect("run").status,
        RunStatus::Queued,
        "a paused queue admits nothing"
    );
    b.resume_queue("default", "job").await.expect("resume");
    let executed = Executions::default();
    let worker = counting_worker(b.worker(), &executed).await;
    assert_completed(&b, run).await;
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}
