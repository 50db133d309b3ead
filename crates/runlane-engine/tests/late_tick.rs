//! A tick whose answer reaches the engine late (the timer's call held, as a queue backend's
//! connection may hold it): what it reports about a lease is about that lease only. An attempt
//! it reports timed out that meanwhile ended on its own (failed and went on to a retry) leaves
//! the run's next attempt alone. A tick whose answer never reaches any engine (the process that
//! called it died) is made again: the queue reports the lease once more a lease duration later.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{
    at, bounded, completed_second, finished, open_on, two_attempts, until_status, worker_returning,
};
use runlane_core::backend::forward::{ForwardQueue, QueueHook, QueueOp};
use runlane_core::backend::{ClaimRequest, QueueBackend, ServedEnv};
use runlane_core::chain::ClaimChain;
use runlane_core::{EnvName, RetryPolicy, RunStatus, Timestamp, WorkerId};
use runlane_engine::{HandlerError, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};

/// Holds the answer of the first tick at or after `at` (the tick itself has run in the queue)
/// until `go` is set, and says when it holds it.
struct HoldTick {
    at: Mutex<Option<Timestamp>>,
    once: AtomicBool,
    holding: mpsc::UnboundedSender<()>,
    go: watch::Sender<bool>,
}

#[async_trait]
impl QueueHook for HoldTick {
    async fn after(&self, op: QueueOp<'_>) {
        let at = *self.at.lock().expect("at");
        if let (QueueOp::Tick(now), Some(at)) = (op, at) {
            if now >= at && !self.once.swap(true, SeqCst) {
                let _ = self.holding.send(());
                let _ = self.go.subscribe().wait_for(|go| *go).await;
            }
        }
    }
}

/// The timer's tick reports an attempt past its max duration, but its answer is held; the
/// handler meanwhile fails and the run goes on to its retry (attempt 2, a minute later). The
/// late report ends nothing: attempt 2 runs and completes the run. Before, the engine ended the
/// store's *current* attempt (2, never run) `timed_out`, and with no attempt left the run.
#[tokio::test]
async fn a_late_timeout_of_an_attempt_that_already_failed_leaves_the_retry_alone() {
    let (holding, mut held) = mpsc::unbounded_channel();
    let hook = HoldTick {
        at: Mutex::new(None),
        once: AtomicBool::new(false),
        holding,
        go: watch::Sender::new(false),
    };
    let inner = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let queue = Arc::new(ForwardQueue::new(inner, hook));
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let fail_now = Arc::new(Notify::new());
    let release = fail_now.clone();
    let worker = engine
        .worker()
        .handler("job", move |ctx: RunContext| {
            let (started, fail_now) = (started_tx.clone(), fail_now.clone());
            async move {
                if ctx.attempt() > 1 {
                    return Ok(json!("second"));
                }
                let _ = started.send(());
                // Not aborted by the (held) timeout: the handler fails by itself.
                fail_now.notified().await;
                Err(HandlerError::new("first attempt failed"))
            }
        })
        .start()
        .await
        .expect("worker");
    let minute = Duration::from_secs(60);
    let policy = RetryPolicy {
        attempts_max: 2,
        factor: 1.0,
        min: minute,
        max: minute,
        jitter: 0.0,
    };
    let run = engine
        .trigger("job")
        .max_duration(Duration::from_secs(5))
        .retry(policy)
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    let mut events = engine.subscribe(run).await.expect("subscribe");
    bounded(started.recv()).await.expect("attempt 1 started");

    // The attempt's deadline passes; the tick that finds it is held before its answer.
    let deadline = at(Duration::from_secs(5));
    *queue.hook().at.lock().expect("at") = Some(deadline);
    bounded(clock.wait_sleeper_at(deadline)).await;
    clock.set(deadline);
    bounded(held.recv())
        .await
        .expect("the tick reporting the timeout");

    // Meanwhile the handler fails: attempt 2 is due a minute later.
    release.notify_one();
    until_status(&mut events, RunStatus::Delayed).await;
    bounded(async {
        while worker.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    // The late report arrives, then attempt 2 becomes due.
    queue.hook().go.send_replace(true);
    let due = deadline.saturating_add(minute);
    bounded(clock.wait_sleeper_at(due)).await;
    clock.set(due);
    let done = finished(&engine, run).await;
    let outcomes: Vec<&str> = done.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        (done.status, outcomes),
        (RunStatus::Completed, vec!["failed", "completed"]),
        "the late timeout ended nothing: attempt 2 ran"
    );
    assert_eq!(done.output.as_deref(), Some("\"second\""));
}

/// A worker elsewhere claimed R and died; the timer that heard R's lapse was in a process that
/// died too, before it acted on the report (here: the tick is called on the queue directly and
/// its answer dropped). The queue reports the lapse again a lease duration later, and this
/// engine's timer recovers R: its first attempt counts `crashed`, the second completes it.
/// Before, a lapse was reported once: R stayed executing, held by a dead lease, for ever.
#[tokio::test]
async fn a_lapse_reported_to_a_process_that_died_is_reported_again_and_recovered() {
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let (engine, clock) = open_on(queue.clone(), Arc::new(MemoryStore::new())).await;
    let run = engine
        .trigger("job")
        .retry(two_attempts())
        .send()
        .await
        .expect("trigger")
        .run
        .id;

    // Elsewhere: a worker claims R and dies; a timer hears the lapse and dies.
    let lease = Duration::from_secs(2);
    let request = ClaimRequest {
        worker: WorkerId(99),
        chain: ClaimChain::default_chain(),
        max: 1,
        envs: vec![ServedEnv {
            env: EnvName::new("default").expect("env"),
            version: 0,
        }],
        lease,
    };
    assert_eq!(
        queue
            .claim(&request, at(Duration::ZERO))
            .await
            .expect("claim")
            .len(),
        1
    );
    let unheard = queue.tick(at(lease)).await.expect("tick");
    assert_eq!(unheard.lapsed.len(), 1, "the lapse, reported to nobody");

    // Here: a worker, and a marker trigger whose effects arm the timer.
    let worker = worker_returning(&engine, "here").await;
    let marker = engine.trigger("job").send().await.expect("marker").run.id;
    assert_eq!(finished(&engine, marker).await.status, RunStatus::Completed);
    let again = at(lease * 2);
    bounded(clock.wait_sleeper_at(again)).await;
    clock.set(again);
    completed_second(&engine, run, "crashed", "\"here\"").await;
    worker.stop().await;
}
