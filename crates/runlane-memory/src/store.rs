//! The in-memory run store.

/// Run records, idempotency keys, envs and versions in memory (implements
/// `runlane_core::backend::RunStore`).
pub struct MemoryStore {
    _private: (),
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        todo!()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}
