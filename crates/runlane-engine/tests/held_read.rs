//! A workloop of a shared queue (one whose leases other processes may take, so runs are read
//! back from the store) reads a claim's runs beside its next claim. A drain that begins while
//! that read is held still counts those runs: the workloop waits for the read before it ends,
//! so the runs are in the worker's run set when the drain takes it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{bounded, open_on};
use runlane_core::backend::forward::{Forward, ForwardQueue, QueueHook, StoreHook, StoreOp};
use runlane_engine::{DrainReport, HandlerError, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use tokio::sync::{mpsc, watch};

/// The memory queue, answering that other processes may claim (as Redis does): the engine
/// keeps no hand-over, so its workers read what they claim.
struct Shared;

impl QueueHook for Shared {
    fn claims_in_process(&self, _inner: bool) -> bool {
        false
    }
    fn hands_over(&self, _inner: bool) -> bool {
        false
    }
}

/// Holds every read of many runs until `held` turns false; tells `seen` when one is held.
struct HeldReads {
    held: watch::Receiver<bool>,
    seen: mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl StoreHook for HeldReads {
    async fn before(&self, op: StoreOp<'_>) {
        if let StoreOp::GetMany(runs) = op {
            let _ = self.seen.send(runs.len());
            let mut held = self.held.clone();
            let _ = held.wait_for(|h| !*h).await;
        }
    }
}

#[tokio::test]
async fn a_drain_begun_while_a_claims_read_is_held_counts_its_runs() {
    let queue = Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        Shared,
    ));
    let (release, held) = watch::channel(true);
    let (seen, mut reads) = mpsc::unbounded_channel();
    let store = Arc::new(Forward::new(
        Arc::new(MemoryStore::new()),
        HeldReads { held, seen },
    ));
    let (engine, _clock) = open_on(queue, store).await;
    // Both runs wait before the worker starts: its first claim takes them together.
    let mut runs = Vec::new();
    for _ in 0..2 {
        runs.push(engine.trigger("job").send().await.expect("trigger").run.id);
    }
    // Each handler runs until its token fires: only the drain ends it.
    let worker = engine
        .worker()
        .handler("job", |ctx: RunContext| async move {
            let reason = ctx.cancel_token().cancelled().await;
            Err(HandlerError::new(format!("stopped: {reason:?}")))
        })
        .workloops("*:2")
        .stop_timeout(Duration::ZERO)
        .start()
        .await
        .expect("worker");
    assert_eq!(
        bounded(reads.recv()).await,
        Some(2),
        "one read for the claim of both"
    );

    // The drain begins while the read is held; the read then answers.
    let stopping = tokio::spawn(worker.stop());
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    release.send_replace(false);
    let report = bounded(stopping).await.expect("the drain ended");

    // The drain saw both runs (their slots were taken when the read answered) and released
    // them: each waits again, none is left leased to this worker or starts after the drain.
    assert_eq!(
        report,
        DrainReport {
            finished: 0,
            released: 2
        }
    );
    for run in runs {
        let record = engine.get(run).await.expect("stored");
        assert!(
            record.status.is_waiting(),
            "{run} waits again after the drain, not {}",
            record.status
        );
        assert_eq!(record.attempt, 1, "the attempt is not counted");
    }
}
