//! Queue and store calls that fail on the way: the step is finished on the next try (never
//! dropped as a zombie's, never forgotten because the queue reports it once), and a failing
//! step is tried again after a pause, not in a loop.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::{
    at, bounded, completed_second, finished, one_slot_worker_returning, open_on, stuck_worker,
    two_attempts, worker_returning,
};
use runlane_core::backend::forward::{
    Forward, ForwardQueue, QueueHook, QueueOp, StoreHook, StoreOp,
};
use runlane_core::backend::QueueBackend;
use runlane_core::{QueueError, RunStatus, StoreError};
use runlane_engine::{HandlerError, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;

/// Fails the first `retry` call as an unreachable server would.
struct FailFirstRetry {
    failed: AtomicBool,
}

impl QueueHook for FailFirstRetry {
    fn refuse(&self, op: QueueOp<'_>) -> Option<QueueError> {
        let first = matches!(op, QueueOp::Retry(_)) && !self.failed.swap(true, SeqCst);
        first.then(|| QueueError::Unavailable("the queue server is unreachable".to_owned()))
    }
}

/// A queue whose first `retry` fails.
fn failing_first_retry() -> Arc<ForwardQueue<FailFirstRetry>> {
    Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        FailFirstRetry {
            failed: AtomicBool::new(false),
        },
    ))
}

/// A failed attempt's retry is recorded in the store, then the queue's `retry` fails: the
/// worker writes the end again, the store says the retry is already recorded, and the queue's
/// half is done now: attempt 2 runs. Before, the second try was taken for a zombie's (the store
/// is a step ahead) and dropped: the run waited in the store for an attempt the queue never
/// got, its lease held and never released.
#[tokio::test]
async fn a_retry_whose_queue_call_failed_is_completed_on_the_next_try() {
    let queue = failing_first_retry();
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let _worker = engine
        .worker()
        .handler("job", |ctx: RunContext| async move {
            if ctx.attempt() == 1 {
                return Err(HandlerError::new("first attempt failed"));
            }
            Ok(json!("second"))
        })
        .start()
        .await
        .expect("worker");
    let trigger = engine.trigger("job").retry(two_attempts());
    let run = trigger.send().await.expect("trigger").run.id;
    // The worker waits its first backoff (50 ms) before writing the end again.
    let again = at(Duration::from_millis(50));
    bounded(clock.wait_sleeper_at(again)).await;
    assert!(queue.hook().failed.load(SeqCst), "the retry call failed");
    clock.set(again);
    completed_second(&engine, run, "failed", "\"second\"").await;
}

/// A lapsed lease whose recovery fails half-way (the store records the retry, the queue's
/// `retry` fails) is recovered again by the timer after a pause: attempt 2 runs. Before, the
/// failure was only logged; the queue reports a lapse once, so the run waited for ever.
#[tokio::test]
async fn a_lapse_whose_recovery_failed_is_recovered_again() {
    let queue = failing_first_retry();
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let (crashing, mut started) = stuck_worker(&engine, Duration::from_secs(1)).await;
    let trigger = engine.trigger("job").retry(two_attempts());
    let run = trigger.send().await.expect("trigger").run.id;
    bounded(started.recv()).await.expect("attempt 1 started");
    crashing.crash();

    let lease_end = at(engine.config().lease);
    bounded(clock.wait_sleeper_at(lease_end)).await;
    clock.set(lease_end);
    // The recovery's queue call failed; the timer tries it again after its first pause.
    let again = lease_end.saturating_add(Duration::from_millis(100));
    bounded(clock.wait_sleeper_at(again)).await;
    assert!(
        queue.hook().failed.load(SeqCst),
        "the recovery's retry call failed"
    );
    let _worker = worker_returning(&engine, "second").await;
    clock.set(again);
    completed_second(&engine, run, "crashed", "\"second\"").await;
}

/// A store whose retention purge always fails, counting the tries.
struct PurgeFails {
    tries: AtomicUsize,
}

impl StoreHook for PurgeFails {
    fn refuse(&self, op: StoreOp<'_>) -> Option<StoreError> {
        if !matches!(op, StoreOp::PurgeFinished) {
            return None;
        }
        self.tries.fetch_add(1, SeqCst);
        Some(StoreError::Unavailable("disk full".to_owned()))
    }
}

/// A retention purge that fails is tried again after a pause (the timer parks until then),
/// once per pause. Before, the purge instant stayed past and the timer woke for it again at
/// once, in a loop: it never parked.
// Two runtime threads: a timer looping on its runtime thread (the bug) leaves the other one
// to the test, whose bounded wait then fails instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_purge_is_tried_again_after_a_pause_not_in_a_loop() {
    let store = Arc::new(Forward::new(
        Arc::new(MemoryStore::new()),
        PurgeFails {
            tries: AtomicUsize::new(0),
        },
    ));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, clock) = open_on(queue, store.clone()).await;
    let _worker = worker_returning(&engine, "done").await;
    let run = engine.trigger("job").send().await.expect("trigger").run.id;
    let done = finished(&engine, run).await;
    let retention = engine
        .config()
        .retention
        .completed
        .expect("a completed retention");
    let purge_at = done
        .finished_at
        .expect("finished")
        .saturating_add(retention);
    // The timer sleeps until its earliest deadline (the queue's or this purge's): moving the
    // clock to the purge instant wakes it.
    clock.set(purge_at);
    let pause = Duration::from_secs(5);
    bounded(clock.wait_sleeper_at(purge_at.saturating_add(pause))).await;
    assert_eq!(store.hook().tries.load(SeqCst), 1, "one try, then a pause");
    clock.set(purge_at.saturating_add(pause));
    bounded(clock.wait_sleeper_at(purge_at.saturating_add(pause * 2))).await;
    assert_eq!(store.hook().tries.load(SeqCst), 2, "one more try per pause");
}

/// A queue whose ticks never answer: this process's timer recovers nothing (the timer of
/// another process would).
struct NoTicks;

#[async_trait::async_trait]
impl QueueHook for NoTicks {
    async fn before(&self, op: QueueOp<'_>) {
        if matches!(op, QueueOp::Tick(_)) {
            std::future::pending::<()>().await;
        }
    }
}

/// A store whose terminal writes fail.
struct EndsFail;

impl StoreHook for EndsFail {
    fn refuse(&self, op: StoreOp<'_>) -> Option<StoreError> {
        matches!(op, StoreOp::FinishMany { .. } | StoreOp::Finish { .. })
            .then(|| StoreError::Unavailable("the store is down".to_owned()))
    }
}

/// A remote worker's `complete` fails (the store is down) and the worker gives up on the run
/// (no more heartbeats for it). Once its lease deadline passes the worker's slot is free
/// again, even where no lapse recovery runs to say so (the timer is another process's). Before,
/// the run stayed held and the one-slot worker claimed nothing until it was closed.
#[tokio::test]
async fn a_remote_run_given_up_after_a_failed_complete_frees_its_slot_at_its_lease_deadline() {
    let queue = Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        NoTicks,
    ));
    let store = Arc::new(Forward::new(Arc::new(MemoryStore::new()), EndsFail));
    let (engine, clock) = open_on(queue, store).await;
    let spec = runlane_engine::RemoteWorkerSpec {
        envs: vec![("default".to_owned(), None)],
        workloops: "*:1".to_owned(),
        lease: None,
    };
    let worker = engine.remote_worker(spec).await.expect("remote worker");
    let first = engine.trigger("job").send().await.expect("trigger").run.id;
    let claimed = worker.claim(0, 1, Duration::ZERO).await.expect("claim");
    let token = claimed.first().expect("claimed the first run").token;
    let failed = worker.complete(first, token, json!("done")).await;
    assert!(
        matches!(failed, Err(runlane_engine::EngineError::Unavailable(_))),
        "the store refused the end: {failed:?}"
    );
    let second = engine.trigger("job").send().await.expect("trigger").run.id;
    let none = worker.claim(0, 1, Duration::ZERO).await.expect("claim");
    assert!(none.is_empty(), "the slot is still the first run's");
    clock.set(at(engine.config().lease).saturating_add(Duration::from_millis(1)));
    let claimed = worker.claim(0, 1, Duration::ZERO).await.expect("claim");
    let ids: Vec<_> = claimed.iter().map(|c| c.run_id).collect();
    assert_eq!(
        ids,
        [second],
        "the lapsed lease's slot went to the next run"
    );
}

/// Holds the first enqueue until `go`, then refuses it as a full queue does.
struct RefuseFirstEnqueue {
    held: AtomicBool,
    refused: AtomicBool,
    holding: tokio::sync::mpsc::UnboundedSender<()>,
    go: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl QueueHook for RefuseFirstEnqueue {
    async fn before(&self, op: QueueOp<'_>) {
        if matches!(op, QueueOp::Enqueue(_)) && !self.held.swap(true, SeqCst) {
            let _ = self.holding.send(());
            let _ = self.go.subscribe().wait_for(|go| *go).await;
        }
    }
    fn refuse(&self, op: QueueOp<'_>) -> Option<QueueError> {
        let first = matches!(op, QueueOp::Enqueue(_)) && !self.refused.swap(true, SeqCst);
        first.then(|| QueueError::QueueFull {
            queue: "job".to_owned(),
            key: String::new(),
            max_queued: 1,
        })
    }
}

/// An engine on a memory queue whose first enqueue is held (`held` hears of it) until the
/// hook's `go`, then refused with `QueueFull`.
async fn refusing_first_enqueue() -> (
    runlane_engine::Engine,
    Arc<ForwardQueue<RefuseFirstEnqueue>>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (holding, held) = tokio::sync::mpsc::unbounded_channel();
    let hook = RefuseFirstEnqueue {
        held: AtomicBool::new(false),
        refused: AtomicBool::new(false),
        holding,
        go: tokio::sync::watch::Sender::new(false),
    };
    let inner = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let queue = Arc::new(ForwardQueue::new(inner, hook));
    let (engine, _clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    (engine, queue, held)
}

/// `first` (a trigger or a batch with idempotency key `k`, its run stored, its enqueue held,
/// then refused) and a trigger with that key which comes while the enqueue is held: that one
/// is not handed the first's run (which the refusal removes); it waits for the first to end,
/// then stores a run of its own, which runs. `refusal` says what the first must answer.
async fn a_keyed_trigger_after_a_refused<T, Fut>(
    first: impl FnOnce(runlane_engine::Engine) -> Fut,
    refusal: fn(&runlane_engine::EngineError) -> bool,
) where
    T: std::fmt::Debug + Send + 'static,
    Fut: std::future::Future<Output = Result<T, runlane_engine::EngineError>> + Send + 'static,
{
    let (engine, queue, mut held) = refusing_first_enqueue().await;
    let first = tokio::spawn(first(engine.clone()));
    bounded(held.recv()).await.expect("the first enqueue, held");
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { engine.trigger("job").idempotency_key("k").send().await }
    });
    // This test's one runtime thread runs the second trigger as far as it goes.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !second.is_finished(),
        "the second trigger waits for the first one's outcome"
    );

    queue.hook().go.send_replace(true);
    let refused = bounded(first).await.expect("first");
    assert!(refused.as_ref().is_err_and(refusal), "{refused:?}");
    let second = bounded(second)
        .await
        .expect("second")
        .expect("the second trigger stores a run of its own");
    assert!(!second.idempotent_hit);
    let worker = worker_returning(&engine, "ran").await;
    let done = finished(&engine, second.run.id).await;
    assert_eq!(done.status, runlane_core::RunStatus::Completed);
    worker.stop().await;
}

/// Two triggers with one idempotency key at once, the first refused by a full queue after its
/// run was stored (and removed again). Before, the second got the first's run as an
/// idempotency hit, and that run was then removed: reading it answered "not found".
#[tokio::test]
async fn a_trigger_sharing_a_key_with_a_refused_one_gets_a_run_that_exists() {
    a_keyed_trigger_after_a_refused(
        |engine| async move { engine.trigger("job").idempotency_key("k").send().await },
        |e| matches!(e, runlane_engine::EngineError::QueueFull { .. }),
    )
    .await;
}

/// The same with a batch first (its rollback removes the run). Before, the single trigger
/// was handed the batch's run, then removed.
#[tokio::test]
async fn a_trigger_sharing_a_key_with_a_refused_batch_gets_a_run_that_exists() {
    a_keyed_trigger_after_a_refused(
        |engine| async move {
            let mut keyed = runlane_engine::TriggerRequest::new("job")?;
            keyed.idempotency_key = Some("k".into());
            engine.trigger_batch(vec![keyed]).await
        },
        |e| matches!(e, runlane_engine::EngineError::BatchItem { .. }),
    )
    .await;
}

/// Refuses the queue's live read of one run (a queue server gone for that call).
struct FailLiveOf {
    run: std::sync::Mutex<Option<runlane_core::RunId>>,
}

impl QueueHook for FailLiveOf {
    fn refuse(&self, op: QueueOp<'_>) -> Option<QueueError> {
        let run = *self.run.lock().expect("lock");
        matches!(op, QueueOp::Live(r) if Some(r) == run)
            .then(|| QueueError::Unavailable("the queue server is unreachable".to_owned()))
    }
}

/// A batch whose idempotency hit cannot be answered (the queue cannot say how the existing run
/// stands) fails whole: its new runs are neither left queued nor left stored. Before, the runs
/// before the hit stayed enqueued and those after it stayed stored, never enqueued.
#[tokio::test]
async fn a_batch_whose_idempotency_hit_cannot_be_read_leaves_nothing_behind() {
    let queue = Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        FailLiveOf {
            run: std::sync::Mutex::new(None),
        },
    ));
    let (engine, _clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let existing = engine
        .trigger("job")
        .idempotency_key("k")
        .send()
        .await
        .expect("the existing run")
        .run;
    *queue.hook().run.lock().expect("lock") = Some(existing.id);
    let fresh = runlane_engine::TriggerRequest::new("job").expect("request");
    let mut keyed = fresh.clone();
    keyed.idempotency_key = Some("k".into());
    let refused = engine
        .trigger_batch(vec![fresh.clone(), keyed, fresh])
        .await
        .expect_err("the hit cannot be answered");
    assert!(
        matches!(refused, runlane_engine::EngineError::Unavailable(_)),
        "{refused:?}"
    );
    *queue.hook().run.lock().expect("lock") = None;
    let stored = engine
        .list(&runlane_core::backend::RunFilter::default())
        .await
        .expect("list");
    assert_eq!(
        stored.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![existing.id],
        "only the existing run is stored"
    );
    let held = runlane_core::backend::QueueBackend::snapshot(queue.as_ref())
        .await
        .expect("snapshot");
    assert_eq!(held.len(), 1, "only the existing run is queued: {held:?}");
}

/// Fails the first terminal write, as a store that is down would.
struct FailFirstEnd {
    failed: AtomicBool,
}

#[async_trait::async_trait]
impl StoreHook for FailFirstEnd {
    fn refuse(&self, op: StoreOp<'_>) -> Option<StoreError> {
        let first = matches!(op, StoreOp::FinishMany { .. }) && !self.failed.swap(true, SeqCst);
        first.then(|| StoreError::Unavailable("the store is down".to_owned()))
    }
}

/// A drain that begins while a completed run's end is being written again claims nothing
/// more with that end: the slot's next claim rides on the ack only while the worker is not
/// stopping, read at each try of the write. Before, it was read once, before the first try:
/// the run waiting behind was claimed with the ack, then handed back (counted as released; and
/// leased once, it lost its TTL).
#[tokio::test]
async fn a_drain_begun_while_an_end_is_written_again_claims_nothing_with_it() {
    let store = Arc::new(Forward::new(
        Arc::new(MemoryStore::new()),
        FailFirstEnd {
            failed: AtomicBool::new(false),
        },
    ));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, clock) = open_on(queue.clone(), store.clone()).await;
    let worker = one_slot_worker_returning(&engine, "done").await;
    let first = engine.trigger("job").send().await.expect("trigger").run.id;
    let waiting = engine.trigger("job").send().await.expect("trigger").run.id;
    // The first end was refused; the worker writes it again after its first backoff.
    let again = at(Duration::from_millis(50));
    bounded(clock.wait_sleeper_at(again)).await;
    assert!(
        store.hook().failed.load(SeqCst),
        "the first end was refused"
    );
    // The drain begins (its first poll marks the worker stopping), then the write is retried.
    let (report, ()) = tokio::join!(worker.stop(), async { clock.set(again) });
    assert_eq!(report.released, 0, "no run was claimed to be handed back");
    assert_eq!(finished(&engine, first).await.status, RunStatus::Completed);
    let live = queue
        .live(waiting)
        .await
        .expect("live")
        .expect("still queued");
    assert!(
        !live.dispatch.ever_leased,
        "the run waiting behind was never leased"
    );
}
