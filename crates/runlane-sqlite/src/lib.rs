//! The embedded run store of runlane: runs, attempts, idempotency keys, envs and versions in
//! one SQLite file (SPEC §7, "embedded follows the same order with SQLite").
//!
//! - **Durable on return**: every write call is group-committed by one writer thread
//!   ([`writer`]) and returns only after the transaction holding it committed (WAL,
//!   `synchronous=FULL` by default).
//! - **Backpressure**: the writer's queue is bounded; a call that cannot be queued within
//!   `enqueue_timeout` fails with `StoreError::Unavailable`.
//! - **Same answers as the memory store** for every [`runlane_core::backend::RunStore`] method,
//!   checked by `tests/behaviour.rs` against `runlane_memory::MemoryStore`.
//! - **Never touches a file that is not its own**: a foreign or corrupt file, a newer schema, or
//!   a path another store holds is refused at open ([`SqliteError`]).
//! - **Retention**: [`SqliteStore::purge_finished`] deletes finished runs past their
//!   [`Retention`], in bounded batches.
//!
//! The schema and its encodings are documented in [`schema`].

mod config;
mod error;
mod lock;
mod read;
mod record;
pub mod schema;
mod store;
mod write;
mod writer;

pub use config::{Retention, SqliteConfig, Synchronous};
pub use error::SqliteError;
pub use store::{SqliteStats, SqliteStore, StoreSize};
