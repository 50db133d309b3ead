//! runlane: a run engine for background jobs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runlane::EngineError> {
//! let engine = runlane::memory().await?;
//! let run = engine.trigger("send-email").payload(&serde_json::json!({"to": "a@b.c"})).send().await?;
//! # let _ = run; Ok(()) }
//! ```

pub use runlane_core as core;
pub use runlane_engine::*;

use std::sync::Arc;

/// Opens an engine with queue state and runs in memory (no durability; tests and demos).
pub async fn memory() -> Result<Engine, EngineError> {
    memory_with(EngineBuilder::new()).await
}

/// Opens an in-memory engine from a configured builder (clock, config).
pub async fn memory_with(builder: EngineBuilder) -> Result<Engine, EngineError> {
    builder
        .open(
            Arc::new(runlane_memory::MemoryQueue::new(
                runlane_memory::MemoryConfig::default(),
            )),
            Arc::new(runlane_memory::MemoryStore::new()),
        )
        .await
}
