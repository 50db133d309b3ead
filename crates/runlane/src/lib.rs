//! runlane: a run engine for background jobs.
//!
//! Open an engine in one of its shapes, then trigger runs and start workers:
//!
//! ```no_run
//! # async fn demo() -> Result<(), runlane::OpenError> {
//! // Embedded (the default shape): queue state in memory, runs durable in SQLite.
//! let engine = runlane::embedded("./runlane-data/runs.db").await?;
//! let run = engine
//!     .trigger("send-email")
//!     .payload(&serde_json::json!({ "to": "a@example.com" }))
//!     .send()
//!     .await?;
//! # let _ = run; Ok(()) }
//! ```

pub use runlane_core as core;
pub use runlane_distributed::{
    BellReader, Distributed, DistributedConfig, DistributedError, DistributedQueue,
    DistributedStore, Health, AFTER_COMMIT_BEFORE_ENQUEUE, AFTER_TERMINAL_WRITE_BEFORE_ACK,
    FAILPOINT_VAR,
};
pub use runlane_engine::*;
pub use runlane_postgres::reconcile::ReconcileConfig;
pub use runlane_postgres::DispatchState;
pub use runlane_postgres::{
    Durability, PostgresConfig, PostgresError, PostgresStats, PostgresStore,
};
pub use runlane_redis::{
    RedisConfig, RedisHealth, RedisMetaCache, RedisMetaConfig, RedisOpenError, RedisQueue,
    STAMP_FIELD,
};
pub use runlane_sqlite::{
    SqliteConfig, SqliteError, SqliteStats, SqliteStore, StoreSize, Synchronous,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};

/// Why an engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The run store at the data path could not be opened (foreign or corrupt file, newer
    /// schema, already in use by another process, I/O).
    #[error(transparent)]
    Store(#[from] SqliteError),
    /// The PostgreSQL run store could not be opened (unreachable server, newer schema, bad
    /// settings).
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The engine refused to start (recovery failed, bad settings).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The Redis queue backend could not be opened (unreachable address, foreign key-space
    /// format, bad prefix).
    #[error(transparent)]
    Redis(#[from] RedisOpenError),
}

impl From<DistributedError> for OpenError {
    fn from(e: DistributedError) -> Self {
        match e {
            DistributedError::Postgres(e) => OpenError::Postgres(e),
            DistributedError::Redis(e) => OpenError::Redis(e),
            DistributedError::Engine(e) => OpenError::Engine(e),
        }
    }
}

/// Opens the distributed shape (SPEC §7): queue state in Redis at `redis_url` (key prefix
/// `runlane`), runs durable in PostgreSQL at `postgres_url` (schema `runlane`), kept
/// consistent store first, queue second, with the reconciler running. Several processes may
/// open the same pair.
pub async fn distributed(redis_url: &str, postgres_url: &str) -> Result<Distributed, OpenError> {
    distributed_with(
        EngineBuilder::new(),
        DistributedConfig::new(redis_url, postgres_url),
    )
    .await
}

/// Opens the distributed shape from a configured builder and its settings (prefix, schema,
/// durability, reconciler).
pub async fn distributed_with(
    builder: EngineBuilder,
    config: DistributedConfig,
) -> Result<Distributed, OpenError> {
    Ok(runlane_distributed::open(builder, config).await?)
}

/// Opens an engine with queue state and runs in memory (no durability; tests and demos).
pub async fn memory() -> Result<Engine, EngineError> {
    memory_with(EngineBuilder::new()).await
}

/// Opens an in-memory engine from a configured builder (clock, config).
pub async fn memory_with(builder: EngineBuilder) -> Result<Engine, EngineError> {
    builder
        .open(
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            Arc::new(MemoryStore::new()),
        )
        .await
}

/// Opens the embedded engine: queue state in memory, runs durable in the SQLite file at
/// `path` (created with its parent directory if missing). Every unfinished run is recovered.
pub async fn embedded(path: impl AsRef<Path>) -> Result<Engine, OpenError> {
    embedded_with(EngineBuilder::new(), path, SqliteConfig::default()).await
}

/// Opens the embedded engine from a configured builder and SQLite settings.
pub async fn embedded_with(
    builder: EngineBuilder,
    path: impl AsRef<Path>,
    sqlite: SqliteConfig,
) -> Result<Engine, OpenError> {
    let store = open_sqlite(path.as_ref().to_path_buf(), sqlite).await?;
    Ok(embedded_on(builder, store).await?)
}

/// Opens the embedded engine over a run store opened with [`open_sqlite`]. The caller keeps a
/// handle on the store for what only it answers (its size, its writer's counters): `runlane
/// bench` reports SQLite bytes per run this way.
pub async fn embedded_on(
    builder: EngineBuilder,
    store: Arc<SqliteStore>,
) -> Result<Engine, EngineError> {
    builder
        .open(Arc::new(MemoryQueue::new(MemoryConfig::default())), store)
        .await
}

/// Opens the Redis queue backend (SPEC §3, §6) and attaches `store` to it, so a key space found
/// lost (FLUSHALL, a restart without persistence) is rebuilt from the store's unfinished runs.
pub async fn redis_queue(
    config: RedisConfig,
    store: Arc<dyn runlane_core::backend::RunStore>,
) -> Result<Arc<RedisQueue>, RedisOpenError> {
    let queue = RedisQueue::open(config).await?;
    queue.attach_store(store);
    let queue = Arc::new(queue);
    RedisQueue::tidy_key_state(&queue);
    Ok(queue)
}

/// Opens the distributed shape on one process: queue state in Redis, runs durable in the SQLite
/// file at `path`.
pub async fn redis_with(
    builder: EngineBuilder,
    redis: RedisConfig,
    path: impl AsRef<Path>,
    sqlite: SqliteConfig,
) -> Result<Engine, OpenError> {
    let store = open_sqlite(path.as_ref().to_path_buf(), sqlite).await?;
    let queue = redis_queue(redis, store.clone()).await?;
    Ok(builder.open(queue, store).await?)
}

/// Opens the SQLite run store off the async threads (opening reads and may migrate the file).
pub async fn open_sqlite(
    path: PathBuf,
    config: SqliteConfig,
) -> Result<Arc<SqliteStore>, SqliteError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SqliteError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let opened = tokio::task::spawn_blocking(move || SqliteStore::open(path, config)).await;
    match opened {
        Ok(store) => Ok(Arc::new(store?)),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(SqliteError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other("the open task was cancelled"),
        }),
    }
}

/// Opens the PostgreSQL run store (connects, migrates the schema under an advisory lock, starts
/// the group-commit writers). `config` is a URL (schema `runlane`, default settings) or a full
/// [`PostgresConfig`]. An unreachable server is an error naming its address.
pub async fn open_postgres(
    config: impl Into<PostgresConfig>,
) -> Result<Arc<PostgresStore>, PostgresError> {
    Ok(Arc::new(PostgresStore::open(config.into()).await?))
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
