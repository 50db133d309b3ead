//! A trigger whose caller goes away (a dropped HTTP request, a timeout around the call) while
//! a group-committing store writes its run: the write stands, so the run must run.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use async_trait::async_trait;
use common::{bounded, finished, open_on, worker_returning};
use runlane_core::backend::forward::{Forward, StoreHook, StoreOp};
use runlane_core::RunStatus;
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use tokio::sync::{mpsc, watch};

/// A store that says it group-commits (its writes go on whatever the caller does, as a writer
/// thread's do) and holds the answer of the first insert, after the write, until `go`.
struct SlowAnswer {
    held_once: AtomicBool,
    holding: mpsc::UnboundedSender<()>,
    go: watch::Sender<bool>,
}

#[async_trait]
impl StoreHook for SlowAnswer {
    async fn after(&self, op: StoreOp<'_>) {
        if matches!(op, StoreOp::Insert { .. }) && !self.held_once.swap(true, SeqCst) {
            let _ = self.holding.send(());
            let _ = self.go.subscribe().wait_for(|go| *go).await;
        }
    }

    fn group_commits(&self, _inner: bool) -> bool {
        true
    }
}

/// The caller goes away while its run's insert is being answered: the run is stored, and it
/// is enqueued and runs all the same (a trigger with the same idempotency key finds it and
/// sees it complete). Before, the enqueue went away with the caller: the run stayed stored
/// and never ran (one process has no reconciler), and the same key returned it for ever.
#[tokio::test]
async fn a_run_stored_for_a_caller_that_went_away_still_runs() {
    let (holding, mut held) = mpsc::unbounded_channel();
    let hook = SlowAnswer {
        held_once: AtomicBool::new(false),
        holding,
        go: watch::Sender::new(false),
    };
    let store = Arc::new(Forward::new(Arc::new(MemoryStore::new()), hook));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, _clock) = open_on(queue, store.clone()).await;
    let _worker = worker_returning(&engine, "ran").await;
    let caller = engine.clone();
    let trigger =
        tokio::spawn(async move { caller.trigger("job").idempotency_key("k").send().await });
    bounded(held.recv())
        .await
        .expect("the insert is being answered");
    trigger.abort();
    assert!(trigger.await.is_err(), "the caller went away");
    store.hook().go.send_replace(true);

    let again = engine
        .trigger("job")
        .idempotency_key("k")
        .send()
        .await
        .expect("trigger");
    assert!(again.idempotent_hit, "the first caller's run was stored");
    let done = finished(&engine, again.run.id).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.output.as_deref(), Some("\"ran\""));
}
