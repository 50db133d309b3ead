//! The conformance suite on the in-memory backends (`MemoryQueue` + `MemoryStore`): one test
//! per scenario of `runlane_conformance::SCENARIOS`.

use std::sync::Arc;

use runlane::core::backend::{QueueBackend, RunStore};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};

/// Fresh in-memory backends for every scenario.
struct Memory;

#[async_trait::async_trait]
impl runlane_conformance::Backends for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        (
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            Arc::new(MemoryStore::new()),
        )
    }
}

runlane_conformance::conformance_suite!(Memory);
