//! The conformance suite on Redis + the SQLite run store (the distributed shape's queue beside
//! the durable store): the same scenarios, unchanged, one key prefix per scenario.

mod redis_support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use runlane::core::backend::{QueueBackend, RunStore};
use runlane::{RedisQueue, SqliteConfig};

/// A fresh key prefix and a fresh database file per scenario.
struct RedisSqlite;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh_path() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("conformance-redis-sqlite")
        .join(format!("{}-{n}", std::process::id()))
        .join("runs.db")
}

#[async_trait::async_trait]
impl runlane_conformance::Backends for RedisSqlite {
    fn name(&self) -> &'static str {
        "redis+sqlite"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        let path = fresh_path();
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let store: Arc<dyn RunStore> = runlane::open_sqlite(path, SqliteConfig::default())
            .await
            .expect("open the sqlite run store");
        let queue = RedisQueue::open(redis_support::fresh_config("sql"))
            .await
            .expect("redis must be reachable (set RUNLANE_REDIS_URL)")
            .delete_keys_on_drop();
        queue.attach_store(store.clone());
        (Arc::new(queue), store)
    }
}

runlane_conformance::conformance_suite!(RedisSqlite);
