//! A queue backend that holds calls instead of failing them (as Redis's connection manager does
//! while it reconnects): completions must not wait on it past their leases, and a completion
//! whose lease lapsed while its check was held leaves the run to the lapse's recovery.

mod common;

use std::future::Future;
use std::sync::atomic::Ordering::{self, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{
    bounded, completed_second, finished, open_on, stuck_worker, two_attempts, worker_returning,
    FOREVER,
};
use runlane_core::backend::forward::{Forward, ForwardQueue, QueueHook, QueueOp, StoreHook};
use runlane_core::backend::RunStore;
use runlane_core::{FencingToken, RunId, RunStatus, Timestamp};
use runlane_engine::{
    Engine, EngineError, ManualClock, RemoteWorker, RemoteWorkerSpec, RunContext,
};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// Holds the memory queue's lease checks and acks while `held` is set: they never answer.
struct Holding {
    held: AtomicBool,
}

#[async_trait]
impl QueueHook for Holding {
    async fn before(&self, op: QueueOp<'_>) {
        if matches!(op, QueueOp::CheckLeases(_) | QueueOp::Finish(_))
            && self.held.load(Ordering::SeqCst)
        {
            std::future::pending::<()>().await;
        }
    }
}

/// A memory store that says it group-commits, so ends go through the completer's batches.
struct Grouping;

impl StoreHook for Grouping {
    fn group_commits(&self, _inner: bool) -> bool {
        true
    }
}

/// Runs whose lease checks and acks the queue holds still end: their ends are written (the
/// store fences them by attempt) once a check goes unanswered for the completer's bound, and a
/// held ack does not keep later ends waiting. Without the bound the first check waits for ever
/// and no run ends.
#[tokio::test]
async fn held_lease_checks_and_acks_do_not_keep_ends_from_being_written() {
    let queue = Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        Holding {
            held: AtomicBool::new(true),
        },
    ));
    let store = Arc::new(Forward::new(Arc::new(MemoryStore::new()), Grouping));
    let (engine, _clock) = open_on(queue.clone(), store).await;
    let worker = engine
        .worker()
        .handler(
            "job",
            |ctx: RunContext| async move { Ok(json!(ctx.attempt())) },
        )
        .start()
        .await
        .expect("worker");
    // More runs than the completer keeps batches in flight (2), each batch's check and ack held.
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    for run in runs {
        // Its end is written although the queue never answers its lease check or ack.
        let done = finished(&engine, run).await;
        assert_eq!(done.status, RunStatus::Completed);
        assert_eq!(done.attempts.len(), 1, "one attempt: the run ran once");
    }
    queue.hook().held.store(false, Ordering::SeqCst);
    drop(worker);
}

/// Lets `pass` calls that `holds` picks through, then holds the next one until a tick at or
/// after `lapse_at` has run (the run's lease lapsed in the queue meanwhile); holds every
/// heartbeat (so nothing renews that lease).
struct LapseWhileChecking {
    holds: fn(&QueueOp<'_>) -> bool,
    pass: AtomicUsize,
    checking: mpsc::UnboundedSender<()>,
    lapse_at: Mutex<Option<Timestamp>>,
    lapsed: watch::Sender<bool>,
}

type Lapsing = ForwardQueue<LapseWhileChecking>;

/// A memory queue whose call picked by `holds` after the first `pass` is held until the
/// lease lapses, and the receiver told when that call arrives.
fn lapsing(
    holds: fn(&QueueOp<'_>) -> bool,
    pass: usize,
) -> (Arc<Lapsing>, mpsc::UnboundedReceiver<()>) {
    let (checking, arrived) = mpsc::unbounded_channel();
    let hook = LapseWhileChecking {
        holds,
        pass: AtomicUsize::new(pass),
        checking,
        lapse_at: Mutex::new(None),
        lapsed: watch::Sender::new(false),
    };
    let inner = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    (Arc::new(ForwardQueue::new(inner, hook)), arrived)
}

fn lease_check(op: &QueueOp<'_>) -> bool {
    matches!(op, QueueOp::CheckLeases(_))
}

fn release(op: &QueueOp<'_>) -> bool {
    matches!(op, QueueOp::Release(_))
}

/// Moves the clock just past `run`'s lease deadline: the engine's tick lapses the lease, and
/// then the held check goes on (and finds the lease lost).
async fn lapse(queue: &Lapsing, clock: &ManualClock, run: RunId) {
    let live = queue.inner().live(run).await.expect("live");
    let deadline = live.and_then(|l| l.lease).expect("leased").deadline;
    *queue.hook().lapse_at.lock().expect("lapse_at") = Some(deadline);
    clock.set(deadline.saturating_add(Duration::from_millis(1)));
}

#[async_trait]
impl QueueHook for LapseWhileChecking {
    async fn before(&self, op: QueueOp<'_>) {
        match op {
            QueueOp::Heartbeat(_) => std::future::pending::<()>().await,
            op if (self.holds)(&op) && !*self.lapsed.borrow() => {
                let passed = self.pass.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
                if passed.is_ok() {
                    return;
                }
                let mut lapsed = self.lapsed.subscribe();
                let _ = self.checking.send(());
                let _ = lapsed.wait_for(|lapsed| *lapsed).await;
            }
            _ => {}
        }
    }

    async fn after(&self, op: QueueOp<'_>) {
        let lapse_at = *self.lapse_at.lock().expect("lapse_at");
        if let (QueueOp::Tick(now), Some(at)) = (op, lapse_at) {
            if now >= at {
                self.lapsed.send_replace(true);
            }
        }
    }
}

/// A handler returned, but its run's lease lapsed (and this process's tick saw it) before the
/// end's lease check was answered: the check says the lease is lost, the end is dropped (a
/// zombie never changes a run it lost), and the lapse's recovery in the same process counts
/// the attempt `crashed` and retries the run. Before, the dropped end answered the worker as
/// if written, the worker marked the attempt settled, and the recovery only cleaned the queue:
/// the run stayed `executing` in the store with nothing left to run it.
async fn lapse_while_the_end_is_checked(group_commits: bool) {
    let (queue, mut checking) = lapsing(lease_check, 0);
    let store: Arc<dyn RunStore> = if group_commits {
        Arc::new(Forward::new(Arc::new(MemoryStore::new()), Grouping))
    } else {
        Arc::new(MemoryStore::new())
    };
    let (engine, clock) = open_on(queue.clone(), store).await;
    let _worker = engine
        .worker()
        .handler("job", |ctx: RunContext| async move {
            Ok(json!(format!("attempt {}", ctx.attempt())))
        })
        .start()
        .await
        .expect("worker");
    let trigger = engine.trigger("job").retry(two_attempts());
    let run = trigger.send().await.expect("trigger").run.id;

    // The first attempt's handler returned; its end's lease check is held.
    bounded(checking.recv()).await.expect("a lease check");
    lapse(&queue, &clock, run).await;
    completed_second(&engine, run, "crashed", "\"attempt 2\"").await;
}

#[tokio::test]
async fn a_lapse_while_an_end_is_checked_retries_the_run() {
    lapse_while_the_end_is_checked(false).await;
}

#[tokio::test]
async fn a_lapse_while_a_batched_end_is_checked_retries_the_run() {
    lapse_while_the_end_is_checked(true).await;
}

/// The same through the worker protocol: a remote worker's `complete` whose lease lapses while
/// the end's lease check is held is answered `StaleToken` (before: `Ok`, and the run never
/// ended), its slot is freed, and the retried run is claimed and completed again.
#[tokio::test]
async fn a_lapse_while_a_remote_end_is_checked_answers_stale_and_retries_the_run() {
    // `complete` checks the lease once before it ends the attempt: hold the end's check.
    remote_call_across_a_lapse(lease_check, 1, |worker, run, token| async move {
        worker.complete(run, token, json!("first")).await
    })
    .await;
}

/// A remote worker's call on the run it claimed, the `holds` call after `pass` held until the
/// run's lease lapses: the call is answered `StaleToken`, the slot frees, and the retried run
/// is claimed as attempt 2 and completed.
async fn remote_call_across_a_lapse<F, Fut>(holds: fn(&QueueOp<'_>) -> bool, pass: usize, call: F)
where
    F: FnOnce(RemoteWorker, RunId, FencingToken) -> Fut,
    Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
{
    let (queue, mut held) = lapsing(holds, pass);
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let worker = remote_worker(&engine).await;
    let trigger = engine.trigger("job").retry(two_attempts());
    let run = trigger.send().await.expect("trigger").run.id;
    let claimed = worker.claim(0, 1, Duration::ZERO).await.expect("claim");
    let token = claimed.first().expect("claimed the run").token;
    let calling = tokio::spawn(call(worker.clone(), run, token));
    bounded(held.recv()).await.expect("the held call");
    lapse(&queue, &clock, run).await;
    assert_eq!(
        bounded(calling).await.expect("the call"),
        Err(EngineError::StaleToken(run)),
        "a call the lapse overtook is not answered as done"
    );
    let again = bounded(worker.claim(0, 1, FOREVER)).await.expect("claim");
    let again = again.first().expect("the retried run");
    assert_eq!((again.run_id, again.attempt), (run, 2));
    worker
        .complete(run, again.token, json!("second"))
        .await
        .expect("complete");
    completed_second(&engine, run, "crashed", "\"second\"").await;
}

/// A drain whose release finds the lease lapsed (this process's tick saw the lapse while the
/// release was held) leaves the attempt to the lapse's recovery: counted `crashed` and retried.
/// Before, the worker marked the attempt settled whatever the release answered, the recovery
/// only cleaned the queue, and the run stayed `executing` in the store with nothing to run it.
#[tokio::test]
async fn a_lapse_while_a_drained_run_is_released_retries_the_run() {
    let (queue, mut releasing) = lapsing(release, 0);
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let (stuck, mut started) = stuck_worker(&engine, Duration::ZERO).await;
    let trigger = engine.trigger("job").retry(two_attempts());
    let run = trigger.send().await.expect("trigger").run.id;
    bounded(started.recv()).await.expect("the handler started");

    // The drain aborts the handler and releases the run; the release is held.
    let stopping = tokio::spawn(stuck.stop());
    bounded(releasing.recv()).await.expect("the release");
    lapse(&queue, &clock, run).await;
    let report = bounded(stopping).await.expect("stop");
    assert_eq!(report.released, 0, "the release found the lease lapsed");

    let _worker = worker_returning(&engine, "done").await;
    completed_second(&engine, run, "crashed", "\"done\"").await;
}

/// The same through the worker protocol's `release`: answered `StaleToken`, its slot freed,
/// and the run retried (before, the attempt was marked settled and the run never ended).
#[tokio::test]
async fn a_lapse_while_a_remote_release_is_held_retries_the_run() {
    remote_call_across_a_lapse(release, 0, |worker, run, token| async move {
        worker.release(run, token).await
    })
    .await;
}

/// A remote worker serving `default` with one slot, on the engine's lease.
async fn remote_worker(engine: &Engine) -> RemoteWorker {
    let spec = RemoteWorkerSpec {
        envs: vec![("default".to_owned(), None)],
        workloops: "*:1".to_owned(),
        lease: None,
    };
    engine.remote_worker(spec).await.expect("remote worker")
}
