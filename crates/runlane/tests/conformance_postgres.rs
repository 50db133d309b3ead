//! The conformance suite on `MemoryQueue` + `PostgresStore` (strict durability): the same
//! scenarios as every backend, unchanged. Each scenario gets its own schema, named with the
//! pid and a counter and dropped when its store is dropped; schemas left by test processes
//! that died are dropped at the next run. PostgreSQL is required (`RUNLANE_DATABASE_URL`,
//! default the local server): a missing server fails the tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use runlane::core::backend::QueueBackend;
use runlane::core::backend::{
    AttemptRecord, IdempotencyClaim, Inserted, Retention, RunFilter, RunRecord, RunStore,
    VersionInfo,
};
use runlane::core::{EnvName, EnvSettings, RunId, RunStatus, StoreError, Timestamp, VersionDef};
use runlane::{PostgresConfig, PostgresStore};
use runlane_memory::{MemoryConfig, MemoryQueue};

const PREFIX: &str = "rlt_conf_";

fn url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

static NEXT: AtomicU64 = AtomicU64::new(0);
static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Drops schemas of test processes that are gone.
async fn sweep_dead() {
    SWEPT
        .get_or_init(|| async {
            let Ok(names) = runlane_postgres::admin::schemas(&url(), PREFIX).await else {
                return;
            };
            for name in names {
                let pid = name[PREFIX.len()..].split('_').next().unwrap_or("");
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = runlane_postgres::admin::drop_schema(&url(), &name).await;
                }
            }
        })
        .await;
}

/// The store of one scenario; dropping it drops its schema.
struct Scoped(PostgresStore);

impl Drop for Scoped {
    fn drop(&mut self) {
        let schema = self.0.schema().to_string();
        // Drop runs outside any runtime context (it may run while a runtime shuts down), so
        // the schema is dropped from a thread with its own small runtime.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = rt.block_on(runlane_postgres::admin::drop_schema(&url(), &schema));
        });
        let _ = dropper.join();
    }
}

#[async_trait]
impl RunStore for Scoped {
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.0.insert(runs, now).await
    }
    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        self.0.remove(run).await
    }
    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.0.get(run).await
    }
    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        self.0.list(filter).await
    }
    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        self.0.record_retry(run, attempt, next_run_after).await
    }
    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        self.0.request_cancel(run, at).await
    }
    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        self.0.note_start(run, attempt, at)
    }
    fn forget_start(&self, run: RunId, attempt: u32) {
        self.0.forget_start(run, attempt)
    }
    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        self.0.finish(run, status, output, attempt, now).await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        self.0.reschedule(run, run_after, ttl_deadline).await
    }
    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.0.unfinished().await
    }
    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        RunStore::purge_finished(&self.0, retention, now).await
    }
    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        RunStore::next_purge_at(&self.0, retention).await
    }
    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        self.0.put_env(env, settings).await
    }
    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        self.0.envs().await
    }
    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        self.0.create_env(env, settings).await
    }
    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        self.0.add_version(env, def, now).await
    }
    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        self.0.version(env, version).await
    }
    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        self.0.promote(env, version).await
    }
    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        self.0.current_version(env).await
    }
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        self.0.versions(env).await
    }
    async fn schedule_cursors(
        &self,
        env: &EnvName,
    ) -> Result<Vec<runlane::core::backend::ScheduleCursor>, StoreError> {
        self.0.schedule_cursors(env).await
    }
    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &runlane::core::TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        self.0
            .advance_schedule_cursor(env, task, index, from, to)
            .await
    }
}

/// A fresh schema per scenario.
struct Postgres;

#[async_trait]
impl runlane_conformance::Backends for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        sweep_dead().await;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut config = PostgresConfig::new(url());
        config.schema = format!("{PREFIX}{}_{n}", std::process::id());
        config.pool_size = 4;
        config.writers = 1;
        let store = match PostgresStore::open(config).await {
            Ok(store) => store,
            Err(e) => panic!("postgresql is required (RUNLANE_DATABASE_URL): {e}"),
        };
        (
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            Arc::new(Scoped(store)),
        )
    }
}

runlane_conformance::conformance_suite!(Postgres);
