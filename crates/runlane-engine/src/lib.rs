//! runlane's engine: everything between the public API and the two backend seams.
//!
//! It validates triggers and resolves task defaults, writes the run store first and the queue
//! backend second, runs the one timer service (armed by the earliest deadline, woken early by
//! `Notify`), runs in-process workers (workloops woken directly by lane doorbells, one heartbeat
//! per worker per `lease / 3`, drain on stop) and publishes run events. It holds no dispatch rule
//! of its own: admission, fairness and leases live in the queue backend.
//!
//! # Decisions SPEC leaves open
//!
//! - **Who ends an attempt.** In one process the worker (its handler returned) and the timer
//!   service (timeout, lapsed lease, cancel grace over) may both try; each takes the run's
//!   settle lock and the first one writes. Across processes the queue's fencing tokens and the
//!   store's first-terminal-write-wins decide.
//! - **A handler returning an error after its token fired** counts as: `Cancel` → the run ends
//!   `canceled` (canceled runs never retry); `Shutdown` → released without an attempt (drain);
//!   `Timeout`/`LeaseLost` → the timer service ends the attempt.
//! - **A completion after `Timeout` fired but before the timer service ended the attempt** wins
//!   (the lease is still valid).
//! - **Drain** fires `Shutdown` and drops the handler at once; a handler is not given extra time
//!   after `stop_timeout` to react to its token.
//! - **A refused batch** (`QueueFull` / `FastLaneFull` on item *i*) is taken back: later items are
//!   removed from the store, earlier ones are cancelled in the queue and removed from the store;
//!   an earlier item a worker already claimed in between is cancelled (it ends `canceled`).
//! - **A refused enqueue** of any kind (including `Unavailable`) removes the stored run and
//!   returns the error; there is no reconciler for runs stored but not enqueued other than the
//!   recovery at open.
//! - **Manual retry** keeps env, task, payload, queue, key, priority, retry policy, max duration
//!   and version lock; it does not keep the TTL.
//! - **A remote worker's `fail` with `RetryChoice::At(t)`** replaces the policy's backoff, not
//!   its attempt cap (no attempt left: the run fails); `t` in the past or more than a year ahead
//!   is refused (`retry_at`). A remote call about a run the worker does not hold under that
//!   token is `StaleToken` (`Lost` in a heartbeat), even when the token is another worker's live
//!   lease.
//! - **Cron schedules** fire in every process (one run per tick by the tick's idempotency key,
//!   one cursor advance by compare-and-set; no leader); missed ticks fire once, for the latest;
//!   a refused scheduled trigger (a full queue) skips its tick; a schedule with no cursor counts
//!   from when this process first planned it (see [`scheduler`]).
//! - **Status events** for runs moved by a queue call (admissions, promotions) cost one
//!   `QueueBackend::live` lookup each, and are only looked up while somebody subscribes.

pub mod clock;
mod completer;
pub mod config;
mod doorbell;
pub mod engine;
pub mod error;
pub mod event;
mod external;
mod handover;
mod local;
pub mod meta;
pub mod metrics;
mod offer;
pub mod remote;
pub mod scheduler;
pub mod trigger;
pub mod worker;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::EngineConfig;
pub use engine::{Engine, EngineBuilder, TimerStats, META_MAX_AGE};
pub use error::EngineError;
pub use event::{EnvEvents, RunEvent, RunEventKind, RunEvents, StatusTap};
pub use external::WeakEngine;
pub use meta::MetaWatch;
pub use metrics::{EngineMetrics, START_LATENCY_BUCKETS_MS};
pub use remote::{
    ClaimedRun, FailOutcome, RemoteWorker, RemoteWorkerSpec, RetryChoice, WorkloopInfo,
    RETRY_AT_MAX_AHEAD,
};
pub use runlane_core::backend::LeaseState;
pub use scheduler::{ScheduleInfo, SCHEDULE_KEY_TTL};
pub use trigger::{TriggerBuilder, TriggerRequest, Triggered, WaitOutcome};
pub use worker::{CancelToken, DrainReport, HandlerError, RunContext, Worker, WorkerBuilder};
