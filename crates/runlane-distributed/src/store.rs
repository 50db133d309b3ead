//! [`DistributedStore`]: the PostgreSQL run store as the engine of the distributed shape sees
//! it. Every call goes to [`PostgresStore`] unchanged; the store says it is shared between
//! processes, so the engine's recovery at open does not count a start mark (`started_at`) as a
//! `crashed` attempt: in this shape a run with a start mark may be executing right now in
//! another process. A worker that died is found by its Redis lease lapsing instead, which
//! counts the attempt once.

use std::sync::Arc;

use async_trait::async_trait;
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, Retention, RunFilter, RunRecord,
    RunStore, ScheduleCursor, ToStart, VersionInfo,
};
use runlane_core::{
    EnvName, EnvSettings, QueueName, QueueSettings, RunId, RunStatus, StoreError, TaskName,
    Timestamp, VersionDef,
};
use runlane_postgres::PostgresStore;

/// The run store of the distributed shape (see the module docs).
#[derive(Debug)]
pub struct DistributedStore {
    inner: Arc<PostgresStore>,
    /// The server URL whose schema is dropped with this store (throwaway schemas only).
    drop_schema: Option<String>,
}

impl Drop for DistributedStore {
    fn drop(&mut self) {
        let Some(url) = self.drop_schema.take() else {
            return;
        };
        let schema = self.inner.schema().to_string();
        // Drop may run while a runtime shuts down: the schema is dropped from a thread with
        // its own small runtime.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Err(e) = rt.block_on(runlane_postgres::admin::drop_schema(&url, &schema)) {
                tracing::warn!(%schema, error = %e, "throwaway schema not dropped");
            }
        });
        let _ = dropper.join();
    }
}

impl DistributedStore {
    /// Wraps the PostgreSQL run store.
    pub fn new(inner: Arc<PostgresStore>) -> Self {
        DistributedStore {
            inner,
            drop_schema: None,
        }
    }

    /// Drops the store's schema (on the server at `url`) when this store is dropped. For tests
    /// and benchmarks that use a throwaway schema.
    pub fn drop_schema_on_drop(mut self, url: impl Into<String>) -> Self {
        self.drop_schema = Some(url.into());
        self
    }

    /// The PostgreSQL run store.
    pub fn postgres(&self) -> &Arc<PostgresStore> {
        &self.inner
    }
}

#[async_trait]
impl RunStore for DistributedStore {
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
    async fn remove_refused(&self, run: RunId) -> Result<bool, StoreError> {
        self.inner.remove_refused(run).await
    }
    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.inner.get(run).await
    }
    async fn get_many(&self, runs: &[RunId]) -> Result<Vec<Option<RunRecord>>, StoreError> {
        self.inner.get_many(runs).await
    }
    async fn get_to_start(&self, runs: &[RunId]) -> Result<Vec<Option<ToStart>>, StoreError> {
        self.inner.get_to_start(runs).await
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
    async fn clear_start(&self, run: RunId, attempt: u32) -> Result<(), StoreError> {
        self.inner.clear_start(run, attempt).await
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
    fn shared_between_processes(&self) -> bool {
        true
    }
    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        RunStore::purge_finished(self.inner.as_ref(), retention, now).await
    }
    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        RunStore::next_purge_at(self.inner.as_ref(), retention).await
    }
    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        self.inner.put_env(env, settings).await
    }
    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        self.inner.envs().await
    }
    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        self.inner.put_queue_settings(env, queue, settings).await
    }
    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        self.inner.queue_settings_all().await
    }
    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        self.inner.create_env(env, settings).await
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
    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        self.inner.schedule_cursors(env).await
    }
    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        self.inner
            .advance_schedule_cursor(env, task, index, from, to)
            .await
    }
    async fn current_definition(&self, env: &EnvName) -> Result<(u32, VersionDef), StoreError> {
        self.inner.current_definition(env).await
    }
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        self.inner.versions(env).await
    }
    fn group_commits(&self) -> bool {
        self.inner.group_commits()
    }
    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.inner.finish_many(ends, now).await
    }
}
