//! In-memory backends: [`MemoryQueue`] implements the dispatch rules of `docs/dispatch.md`
//! under one mutex (every method is one atomic step), [`MemoryStore`] keeps run records.

mod queue;
mod store;

pub use queue::{MemoryConfig, MemoryQueue};
pub use store::MemoryStore;
