//! Helpers shared by the engine's integration tests: an engine over the in-memory backends
//! on a manual clock, and waits on events bounded by a generous safety net (a hang fails the
//! test instead of blocking CI; no assertion depends on wall time).

#![allow(dead_code)] // Each test binary uses a different subset.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{QueueBackend, RunStore};
use runlane_core::{RetryPolicy, RunId, RunStatus, Timestamp};
use runlane_engine::{
    Engine, EngineBuilder, EngineConfig, ManualClock, RunEvent, RunEvents, WaitOutcome,
};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};

/// The instant every test starts at.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);

/// An engine over fresh in-memory backends on a manual clock at [`T0`].
pub struct Harness {
    pub engine: Engine,
    pub clock: Arc<ManualClock>,
    pub queue: Arc<MemoryQueue>,
}

impl Harness {
    pub async fn new() -> Self {
        Self::with_config(EngineConfig::default()).await
    }

    pub async fn with_config(config: EngineConfig) -> Self {
        let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
        let (engine, clock) = open_with(config, queue.clone(), Arc::new(MemoryStore::new())).await;
        Harness {
            engine,
            clock,
            queue,
        }
    }

    /// The queue backend's own invariants (slots, indexes) hold.
    pub fn check_invariants(&self) {
        self.queue.check_invariants().expect("queue invariants");
    }
}

/// An engine over `queue` and `store` on a manual clock at [`T0`] (seeded), and its clock.
pub async fn open_on(
    queue: Arc<dyn QueueBackend>,
    store: Arc<dyn RunStore>,
) -> (Engine, Arc<ManualClock>) {
    open_with(EngineConfig::default(), queue, store).await
}

/// [`open_on`] with `config` (its seed replaced).
pub async fn open_with(
    config: EngineConfig,
    queue: Arc<dyn QueueBackend>,
    store: Arc<dyn RunStore>,
) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let engine = EngineBuilder::new()
        .clock(clock.clone())
        .config(EngineConfig {
            seed: Some(7),
            ..config
        })
        .open(queue, store)
        .await
        .expect("open");
    (engine, clock)
}

/// Bounds a wait on an event so that a bug fails the test instead of hanging it.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the awaited event never came")
}

/// A wait timeout no test reaches (the manual clock never ends a wait by itself).
pub const FOREVER: Duration = Duration::from_secs(24 * 3600);

/// The run's record once it finished (its terminal event), bounded like every wait.
pub async fn finished(
    engine: &Engine,
    run: runlane_core::RunId,
) -> runlane_core::backend::RunRecord {
    match bounded(engine.wait(run, FOREVER)).await.expect("wait") {
        WaitOutcome::Finished(record) => record,
        other => panic!("run {run} did not finish: {other:?}"),
    }
}

/// The next status event with `status` on a run subscription.
pub async fn until_status(events: &mut RunEvents, status: RunStatus) -> RunEvent {
    bounded(async {
        loop {
            let event = events
                .next()
                .await
                .expect("the run ended before the status");
            if event.status() == Some(status) {
                return event;
            }
        }
    })
    .await
}

/// Milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `T0 + d`.
pub fn at(d: Duration) -> Timestamp {
    T0.saturating_add(d)
}

/// Waits until the subscribed run is in `status`: the subscription exists before the current
/// status is read, so a change in between is not lost.
pub async fn reached(engine: &Engine, events: &mut RunEvents, status: RunStatus) {
    let now = engine.get(events.run()).await.expect("get").status;
    if now != status {
        until_status(events, status).await;
    }
}

/// Two attempts, the second at once.
pub fn two_attempts() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 2,
        factor: 1.0,
        min: Duration::ZERO,
        max: Duration::ZERO,
        jitter: 0.0,
    }
}

/// A worker of task `job` whose handler completes at once with `output`.
pub async fn worker_returning(engine: &Engine, output: &'static str) -> runlane_engine::Worker {
    returning(engine.worker(), output).await
}

/// [`worker_returning`] with one workloop of one slot (`*:1`): runs go one at a time, in order.
pub async fn one_slot_worker_returning(
    engine: &Engine,
    output: &'static str,
) -> runlane_engine::Worker {
    returning(engine.worker().workloops("*:1"), output).await
}

async fn returning(
    builder: runlane_engine::WorkerBuilder,
    output: &'static str,
) -> runlane_engine::Worker {
    builder
        .handler("job", move |_ctx: runlane_engine::RunContext| async move {
            Ok(serde_json::json!(output))
        })
        .start()
        .await
        .expect("worker")
}

/// A worker of task `job` whose handler reports each start and never returns; its stop waits
/// `stop_timeout` for it.
pub async fn stuck_worker(
    engine: &Engine,
    stop_timeout: Duration,
) -> (
    runlane_engine::Worker,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .stop_timeout(stop_timeout)
        .handler("job", move |_ctx: runlane_engine::RunContext| {
            let started = started_tx.clone();
            async move {
                let _ = started.send(());
                std::future::pending::<Result<serde_json::Value, runlane_engine::HandlerError>>()
                    .await
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, started)
}

/// The run completed on its second attempt with `output` (JSON text), the first attempt
/// ended `first`.
pub async fn completed_second(engine: &Engine, run: RunId, first: &str, output: &str) {
    let done = finished(engine, run).await;
    let outcomes: Vec<&str> = done.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        (done.status, outcomes),
        (RunStatus::Completed, vec![first, "completed"]),
        "the first attempt ended {first}, the second completed the run"
    );
    assert_eq!(done.output.as_deref(), Some(output));
}
