//! The in-memory queue backend.

use std::time::Duration;

/// Settings of the in-memory queue backend.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// A ready run whose lane has had no consumer this long returns to its queue (default 5 min).
    pub ready_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { ready_timeout: Duration::from_secs(300) }
    }
}

/// The in-memory queue backend (implements `runlane_core::backend::QueueBackend`).
pub struct MemoryQueue {
    _private: (),
}

impl MemoryQueue {
    /// An empty backend with the built-in lanes.
    pub fn new(config: MemoryConfig) -> Self {
        let _ = config;
        todo!()
    }
}
