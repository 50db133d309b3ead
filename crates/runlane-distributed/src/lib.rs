//! runlane-distributed: the distributed shape (SPEC §7). Queue state lives in Redis
//! ([`runlane_redis::RedisQueue`]), runs in PostgreSQL ([`runlane_postgres::PostgresStore`]),
//! and the two are kept consistent by the store-first protocol:
//!
//! 1. A trigger commits its run in PostgreSQL as `pending_enqueue` (the engine inserts before it
//!    enqueues; an uncommitted insert is the only `Unavailable`).
//! 2. It enqueues the run in Redis (idempotent by run id). If Redis fails there, the trigger
//!    still answers the run as accepted ([`DistributedQueue`] reports it placed) and the
//!    reconciler enqueues it later.
//! 3. Runs Redis accepted are marked `in_queue` lazily, in batches, off the trigger's path
//!    ([`DistributedQueue`]'s marker task): no extra synchronous write per run.
//! 4. The reconciler ([`runlane_postgres::reconcile`]) runs at start-up, then whenever the
//!    oldest `pending_enqueue` row passes its grace period, and enqueues what missed Redis;
//!    each pass also enqueues again the waiting runs whose TTL passed a grace period ago, so
//!    an expiry heard by a process that died before recording it is reported again, and
//!    applies again the cancels requested a grace period ago of runs still unfinished.
//! 5. Terminal writes go to PostgreSQL first (the engine's completer: lease check, store,
//!    then the Redis ack); lease recovery and Redis rebuilds read PostgreSQL first, so a run
//!    terminal there is cleaned out of Redis, never retried.
//!
//! [`open`] wires it all and returns a [`Distributed`] engine handle with its [`Health`].

mod bells;
mod queue;
mod shape;
mod store;
mod timer;
mod wake;

pub use bells::BellReader;
pub use queue::{
    DistributedQueue, AFTER_COMMIT_BEFORE_ENQUEUE, AFTER_TERMINAL_WRITE_BEFORE_ACK, FAILPOINT_VAR,
};
pub use shape::{open, Distributed, DistributedConfig, DistributedError, Health, MARK_FLUSH_BOUND};
pub use store::DistributedStore;
