//! The PostgreSQL run store of runlane: runs, attempts, idempotency keys, envs and versions in
//! one schema of a PostgreSQL ≥ 14 server, the source of truth of the distributed shape
//! (SPEC §7).
//!
//! - **Durable on return**: hot-path writes (inserts, terminal writes) are group-committed by
//!   the writers (module `writer`): multi-row `UNNEST` statements, one transaction per batch, each
//!   call answered once its own write committed.
//! - **Two row writes per run** on the success path: the insert and the terminal update.
//!   Attempt starts are kept in memory and written only for runs still unfinished after
//!   `start_flush_after`.
//! - **Backpressure**: the writers' queue is bounded; a call that cannot be queued in time
//!   fails with `StoreError::Unavailable`. A lost connection fails calls with `Unavailable`,
//!   and the pool reconnects by itself.
//! - **Per-env durability**: [`Durability::Relaxed`] envs commit with
//!   `synchronous_commit = off`.
//! - **Store first, queue second**: every run is inserted `pending_enqueue`;
//!   [`PostgresStore::pending_enqueue`], [`PostgresStore::oldest_pending_at`] and
//!   [`PostgresStore::mark_in_queue`] serve the reconciler ([`reconcile`]).
//! - **Same answers as the memory store** for every [`runlane_core::backend::RunStore`]
//!   method, checked by a differential property test against `runlane_memory::MemoryStore`.
//!
//! The schema and its encodings are documented in [`schema`].

pub mod admin;
mod config;
mod error;
pub mod reconcile;
mod record;
pub mod schema;
mod start;
mod store;
mod writer;

pub use config::{Durability, PostgresConfig, Retention};
pub use error::PostgresError;
pub use store::{DispatchState, PostgresStats, PostgresStore, Sweep};
