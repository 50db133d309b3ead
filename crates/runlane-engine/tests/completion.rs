//! Batched completions: with a store that group-commits, attempts that complete while an end
//! is being written are ended together in the next `finish_many`, and every run still ends
//! exactly once, with its own answer.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::{bounded, open_on};
use runlane_core::backend::forward::{Forward, StoreHook, StoreOp};
use runlane_core::RunStatus;
use runlane_engine::{HandlerError, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

/// On a memory store: claims to group commits, records the size of every `finish_many`, and
/// holds the first one until the test lets it go (so the next completions pile up behind it).
struct Gate {
    gate: Arc<Semaphore>,
    calls: Mutex<Vec<usize>>,
    entered: mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl StoreHook for Gate {
    fn group_commits(&self, _inner: bool) -> bool {
        true
    }

    async fn before(&self, op: StoreOp<'_>) {
        let StoreOp::FinishMany { ends } = op else {
            return;
        };
        let first = {
            let mut calls = self.calls.lock().expect("calls");
            calls.push(ends);
            calls.len() == 1
        };
        let _ = self.entered.send(ends);
        if first {
            let _permit = self.gate.acquire().await.expect("gate");
        }
    }
}

#[tokio::test]
async fn completions_waiting_behind_a_write_are_ended_in_one_batch() {
    const RUNS: usize = 8;
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let store = Arc::new(Forward::new(
        Arc::new(MemoryStore::new()),
        Gate {
            gate: gate.clone(),
            calls: Mutex::new(Vec::new()),
            entered: entered_tx,
        },
    ));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, _clock) = open_on(queue, store.clone()).await;
    let (done_tx, mut done) = mpsc::unbounded_channel::<u64>();
    let worker = engine
        .worker()
        .workloops(&format!("manual>*:{RUNS}"))
        .handler("n", move |ctx: RunContext| {
            let done = done_tx.clone();
            async move {
                let n: u64 = ctx.payload()?;
                let _ = done.send(n);
                Ok::<_, HandlerError>(json!(n * 10))
            }
        })
        .start()
        .await
        .expect("worker");

    // The first run's end is held in the store; the others complete meanwhile. (On this
    // single-threaded runtime a handler's end is queued in the same poll that reports it
    // handled, so every other end is queued before the gate opens.)
    let first = engine
        .trigger("n")
        .payload(&json!(0))
        .send()
        .await
        .expect("trigger");
    assert_eq!(
        bounded(entered.recv()).await,
        Some(1),
        "the first end alone"
    );
    // One batch: its runs are stored and enqueued in one step (a store that group-commits
    // does that in a task of its own), so their handlers run and their ends queue up together.
    let batch = (1..RUNS as u64)
        .map(|n| engine.trigger("n").payload(&json!(n)).request())
        .collect::<Result<Vec<_>, _>>()
        .expect("requests");
    let rest: Vec<_> = engine
        .trigger_batch(batch)
        .await
        .expect("trigger")
        .into_iter()
        .map(|t| t.run.id)
        .collect();
    let mut handled = vec![bounded(done.recv()).await.expect("handled")];
    while handled.len() < RUNS {
        handled.push(bounded(done.recv()).await.expect("handled"));
    }
    handled.sort_unstable();
    assert_eq!(handled, (0..RUNS as u64).collect::<Vec<_>>());
    gate.add_permits(1);

    let mut runs = vec![first.run.id];
    runs.extend(rest);
    for (n, run) in runs.iter().enumerate() {
        let outcome = bounded(engine.wait(*run, std::time::Duration::from_secs(3600)))
            .await
            .expect("wait");
        match outcome {
            runlane_engine::WaitOutcome::Finished(record) => {
                assert_eq!(record.status, RunStatus::Completed);
                assert_eq!(
                    record.output.as_deref(),
                    Some(&*(n as u64 * 10).to_string())
                );
                assert_eq!(record.attempts.len(), 1, "ended exactly once");
            }
            other => panic!("run {n} did not finish: {other:?}"),
        }
    }
    let calls = store.hook().calls.lock().expect("calls").clone();
    assert_eq!(calls.iter().sum::<usize>(), RUNS, "every end written once");
    assert!(
        calls == vec![1, RUNS - 1],
        "ends that waited behind the first were batched: {calls:?}"
    );
    worker.stop().await;
}
