//! Batched completions: with a store that group-commits, attempts that complete while an end
//! is being written are ended together in the next `finish_many`, and every run still ends
//! exactly once, with its own answer.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::{bounded, T0};
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, Retention, RunFilter, RunRecord,
    RunStore, VersionInfo,
};
use runlane_core::{EnvName, EnvSettings, RunId, RunStatus, StoreError, Timestamp, VersionDef};
use runlane_engine::{EngineBuilder, EngineConfig, HandlerError, ManualClock, RunContext};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

/// A memory store that claims to group commits, records the size of every `finish_many`, and
/// holds the first one until the test lets it go (so the next completions pile up behind it).
struct GatedStore {
    inner: MemoryStore,
    gate: Arc<Semaphore>,
    calls: Mutex<Vec<usize>>,
    entered: mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl RunStore for GatedStore {
    fn group_commits(&self) -> bool {
        true
    }

    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let first = {
            let mut calls = self.calls.lock().expect("calls");
            calls.push(ends.len());
            calls.len() == 1
        };
        let _ = self.entered.send(ends.len());
        if first {
            let _permit = self.gate.acquire().await.expect("gate");
        }
        self.inner.finish_many(ends, now).await
    }

    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.inner.insert(runs, now).await
    }
    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        self.inner.remove(run).await
    }
    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.inner.get(run).await
    }
    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        self.inner.list(filter).await
    }
    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.record_retry(run, attempt, next_run_after).await
    }
    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        self.inner.request_cancel(run, at).await
    }
    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        self.inner.note_start(run, attempt, at)
    }
    fn forget_start(&self, run: RunId, attempt: u32) {
        self.inner.forget_start(run, attempt)
    }
    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        self.inner.finish(run, status, output, attempt, now).await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        self.inner.reschedule(run, run_after, ttl_deadline).await
    }
    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.inner.unfinished().await
    }
    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.inner.purge_finished(retention, now).await
    }
    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        self.inner.next_purge_at(retention).await
    }
    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        self.inner.put_env(env, settings).await
    }
    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        self.inner.envs().await
    }
    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        self.inner.add_version(env, def, now).await
    }
    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        self.inner.version(env, version).await
    }
    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        self.inner.promote(env, version).await
    }
    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        self.inner.current_version(env).await
    }
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        self.inner.versions(env).await
    }
    async fn schedule_cursors(
        &self,
        env: &EnvName,
    ) -> Result<Vec<runlane_core::backend::ScheduleCursor>, StoreError> {
        self.inner.schedule_cursors(env).await
    }
    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &runlane_core::TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        self.inner
            .advance_schedule_cursor(env, task, index, from, to)
            .await
    }
}

#[tokio::test]
async fn completions_waiting_behind_a_write_are_ended_in_one_batch() {
    const RUNS: usize = 8;
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        gate: gate.clone(),
        calls: Mutex::new(Vec::new()),
        entered: entered_tx,
    });
    let engine = EngineBuilder::new()
        .clock(Arc::new(ManualClock::new(T0)))
        .config(EngineConfig {
            seed: Some(7),
            ..EngineConfig::default()
        })
        .open(
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            store.clone(),
        )
        .await
        .expect("open");
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
    let mut rest = Vec::new();
    for n in 1..RUNS as u64 {
        let t = engine
            .trigger("n")
            .payload(&json!(n))
            .send()
            .await
            .expect("trigger");
        rest.push(t.run.id);
    }
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
    let calls = store.calls.lock().expect("calls").clone();
    assert_eq!(calls.iter().sum::<usize>(), RUNS, "every end written once");
    assert!(
        calls == vec![1, RUNS - 1],
        "ends that waited behind the first were batched: {calls:?}"
    );
    worker.stop().await;
}
