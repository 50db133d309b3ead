//! Queue calls that fail after the store already took the step they follow: the step is
//! finished on the next try, never dropped as a zombie's.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::{at, bounded, finished, open_on};
use runlane_core::backend::forward::{ForwardQueue, QueueHook, QueueOp};
use runlane_core::{QueueError, RetryPolicy, RunStatus};
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

/// A failed attempt's retry is recorded in the store, then the queue's `retry` fails: the
/// worker writes the end again, the store says the retry is already recorded, and the queue's
/// half is done now: attempt 2 runs. Before, the second try was taken for a zombie's (the store
/// is a step ahead) and dropped: the run waited in the store for an attempt the queue never
/// got, its lease held and never released.
#[tokio::test]
async fn a_retry_whose_queue_call_failed_is_completed_on_the_next_try() {
    let queue = Arc::new(ForwardQueue::new(
        Arc::new(MemoryQueue::new(MemoryConfig::default())),
        FailFirstRetry {
            failed: AtomicBool::new(false),
        },
    ));
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
    let policy = RetryPolicy {
        attempts_max: 2,
        factor: 1.0,
        min: Duration::ZERO,
        max: Duration::ZERO,
        jitter: 0.0,
    };
    let run = engine.trigger("job").retry(policy).send().await.expect("trigger").run.id;
    // The worker waits its first backoff (50 ms) before writing the end again.
    let again = at(Duration::from_millis(50));
    bounded(clock.wait_sleeper_at(again)).await;
    assert!(queue.hook().failed.load(SeqCst), "the retry call failed");
    clock.set(again);
    let done = finished(&engine, run).await;
    let outcomes: Vec<&str> = done.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        (done.status, outcomes),
        (RunStatus::Completed, vec!["failed", "completed"])
    );
    assert_eq!(done.output.as_deref(), Some("\"second\""));
}
