//! The conformance suite on Redis + the memory run store: the same scenarios as every backend,
//! unchanged, against the real server, one key prefix per scenario (deleted at the end).

mod redis_support;

use std::sync::Arc;

use runlane::core::backend::{QueueBackend, RunStore};
use runlane::RedisQueue;
use runlane_memory::MemoryStore;

/// A fresh key prefix on the shared Redis and a fresh memory store per scenario.
struct RedisMemory;

#[async_trait::async_trait]
impl runlane_conformance::Backends for RedisMemory {
    fn name(&self) -> &'static str {
        "redis+memory"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        let store: Arc<dyn RunStore> = Arc::new(MemoryStore::new());
        let queue = RedisQueue::open(redis_support::fresh_config("mem"))
            .await
            .expect("redis must be reachable (set RUNLANE_REDIS_URL)")
            .delete_keys_on_drop();
        queue.attach_store(store.clone());
        (Arc::new(queue), store)
    }
}

runlane_conformance::conformance_suite!(RedisMemory);
