//! A run's end in one step of the in-process queue (`QueueBackend::end_fenced`, with a store
//! that writes without waiting: `RunStore::finish_now`): what the engine does with each answer
//! of the store's write made inside that step. The store here is the memory store behind a
//! hook that opts in to the one-step end and refuses chosen writes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{at, bounded, finished, one_slot_worker_returning, open_on};
use runlane_core::backend::forward::{Forward, StoreHook, StoreOp};
use runlane_core::backend::QueueBackend;
use runlane_core::{RunId, RunStatus, StoreError};
use runlane_engine::{Engine, Worker};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use tokio::sync::mpsc;

/// Opts in to the one-step end; counts the writes made in it, refuses the first `refused`
/// of them with the error `refusal` makes, and reports each write's run.
struct OneStep {
    writes: AtomicUsize,
    refused: usize,
    refusal: fn(RunId) -> StoreError,
    seen: Mutex<Option<mpsc::UnboundedSender<RunId>>>,
}

impl StoreHook for OneStep {
    fn finishes_now(&self, inner: bool) -> bool {
        inner
    }

    fn before_sync(&self, op: StoreOp<'_>) {
        if let StoreOp::FinishNow(run) = op {
            if let Some(seen) = self.seen.lock().expect("seen").as_ref() {
                let _ = seen.send(run);
            }
        }
    }

    fn refuse(&self, op: StoreOp<'_>) -> Option<StoreError> {
        let StoreOp::FinishNow(run) = op else {
            return None;
        };
        let n = self.writes.fetch_add(1, SeqCst);
        (n < self.refused).then(|| (self.refusal)(run))
    }
}

struct Setup {
    engine: Engine,
    clock: Arc<runlane_engine::ManualClock>,
    queue: Arc<MemoryQueue>,
    store: Arc<Forward<OneStep>>,
    seen: mpsc::UnboundedReceiver<RunId>,
    _worker: Worker,
}

impl Setup {
    /// A run of the worker's task, triggered.
    async fn trigger(&self) -> RunId {
        let triggered = self.engine.trigger("job").send().await.expect("trigger");
        triggered.run.id
    }
}

/// An engine on the memory queue and the hooked memory store, with a worker of one slot whose
/// handler completes at once.
async fn setup(refused: usize, refusal: fn(RunId) -> StoreError) -> Setup {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let store = Arc::new(Forward::new(
        Arc::new(MemoryStore::new()),
        OneStep {
            writes: AtomicUsize::new(0),
            refused,
            refusal,
            seen: Mutex::new(Some(seen_tx)),
        },
    ));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, clock) = open_on(queue.clone(), store.clone()).await;
    let worker = one_slot_worker_returning(&engine, "done").await;
    Setup {
        engine,
        clock,
        queue,
        store,
        seen,
        _worker: worker,
    }
}

/// A write the store cannot make now (down): the worker writes the end again after its backoff,
/// in one step again, and the run ends once, `completed`, its lease gone.
#[tokio::test]
async fn a_one_step_end_the_store_refuses_is_written_again_and_ends_once() {
    let mut s = setup(1, |_| {
        StoreError::Unavailable("the store is down".to_owned())
    })
    .await;
    let run = s.trigger().await;
    assert_eq!(bounded(s.seen.recv()).await, Some(run), "the first write");
    let again = at(Duration::from_millis(50));
    bounded(s.clock.wait_sleeper_at(again)).await;
    let live = s.queue.live(run).await.expect("live").expect("still held");
    assert!(
        live.lease.is_some(),
        "a refused write leaves the lease held"
    );
    s.clock.set(again);
    assert_eq!(bounded(s.seen.recv()).await, Some(run), "the write again");
    let record = finished(&s.engine, run).await;
    assert_eq!(record.status, RunStatus::Completed);
    assert_eq!(record.attempts.len(), 1, "{record:?}");
    assert_eq!(s.store.hook().writes.load(SeqCst), 2);
    assert_eq!(s.queue.live(run).await.expect("live"), None, "acked");
    s.queue.check_invariants().expect("invariants");
}

/// A write the store answers "already finished" (someone ended the run first): the queue lets
/// the run go and the slot goes on to the next run; no second end is published.
#[tokio::test]
async fn a_one_step_end_the_store_already_has_is_acked_and_the_slot_goes_on() {
    let mut s = setup(1, |run| StoreError::AlreadyFinished {
        run,
        status: RunStatus::Canceled,
    })
    .await;
    let first = s.trigger().await;
    assert_eq!(bounded(s.seen.recv()).await, Some(first));
    let second = s.trigger().await;
    assert_eq!(
        finished(&s.engine, second).await.status,
        RunStatus::Completed,
        "the slot went on"
    );
    assert_eq!(s.queue.live(first).await.expect("live"), None, "acked");
    let kept = s.engine.get(first).await.expect("get");
    assert!(
        !kept.status.is_terminal(),
        "nothing was written for the first: {kept:?}"
    );
    assert_eq!(s.store.hook().writes.load(SeqCst), 2);
}

/// A write of an attempt the store has moved past: not acked (the lease stays until it lapses,
/// and its recovery, not this end, decides), and the slot is not taken on with it.
#[tokio::test]
async fn a_one_step_end_of_a_stale_attempt_is_not_acked() {
    let mut s = setup(1, |run| StoreError::StaleAttempt {
        run,
        attempt: 1,
        current: 2,
    })
    .await;
    let run = s.trigger().await;
    assert_eq!(bounded(s.seen.recv()).await, Some(run));
    let live = s.queue.live(run).await.expect("live").expect("still held");
    assert!(live.lease.is_some(), "not acked: {live:?}");
    let kept = s.engine.get(run).await.expect("get");
    assert!(!kept.status.is_terminal(), "{kept:?}");
    assert_eq!(s.store.hook().writes.load(SeqCst), 1, "not written again");
}
