//! A queue backend that holds calls instead of failing them (as Redis's connection manager does
//! while it reconnects): completions must not wait on it past their leases.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{finished, T0};
use runlane_core::backend::forward::{Forward, StoreHook};
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, Enqueued, EnvUsage, LaneInfo,
    LeaseState, Leased, LiveRun, QueueBackend, QueueInfo, Tick,
};
use runlane_core::{
    ClaimChain, EnvName, EnvSettings, FencingToken, LaneName, QueueError, QueueName, QueueSettings,
    RunId, RunStatus, Timestamp,
};
use runlane_engine::{EngineBuilder, EngineConfig, ManualClock, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;

/// The memory queue, except that while `held` is set its lease checks and acks never answer.
struct Holding {
    inner: MemoryQueue,
    held: AtomicBool,
}

impl Holding {
    async fn hold_if_set(&self) {
        if self.held.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl QueueBackend for Holding {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner.put_env(env, settings, now).await
    }
    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner.put_queue(env, queue, settings, now).await
    }
    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        self.inner.queue_settings(env, queue).await
    }
    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        self.inner.add_lane(lane).await
    }
    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        self.inner.has_lane(lane).await
    }
    async fn lanes(&self, now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        self.inner.lanes(now).await
    }
    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        self.inner.queues(env).await
    }
    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        self.inner.env_usage(env).await
    }
    async fn enqueue(
        &self,
        dispatch: Dispatch,
        sync: bool,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        self.inner.enqueue(dispatch, sync, now).await
    }
    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        self.inner.claim(request, now).await
    }
    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        self.inner.heartbeat(leases, now).await
    }
    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        self.hold_if_set().await;
        self.inner.check_lease(run, token).await
    }
    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        self.hold_if_set().await;
        self.inner.check_leases(leases).await
    }
    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.hold_if_set().await;
        self.inner.finish(run, token, now).await
    }
    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        self.hold_if_set().await;
        self.inner.finish_many(runs, now).await
    }
    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner.retry(run, token, run_after, now).await
    }
    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner.release(run, token, now).await
    }
    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        self.inner.cancel(run, grace, now).await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner
            .reschedule(run, run_after, ttl_deadline, now)
            .await
    }
    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        self.inner.tick(now).await
    }
    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        self.inner.next_deadline().await
    }
    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.inner.live(run).await
    }
    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        self.inner.snapshot().await
    }
    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        self.inner.register_consumer(chain, now).await
    }
    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.inner.unregister_consumer(id, now).await
    }
    fn claims_in_process(&self) -> bool {
        self.inner.claims_in_process()
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
    let queue = Arc::new(Holding {
        inner: MemoryQueue::new(MemoryConfig::default()),
        held: AtomicBool::new(true),
    });
    let store = Arc::new(Forward::new(Arc::new(MemoryStore::new()), Grouping));
    let clock = Arc::new(ManualClock::new(T0));
    let engine = EngineBuilder::new()
        .clock(clock)
        .config(EngineConfig {
            seed: Some(7),
            ..EngineConfig::default()
        })
        .open(queue.clone(), store)
        .await
        .expect("open");
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
    queue.held.store(false, Ordering::SeqCst);
    drop(worker);
}
