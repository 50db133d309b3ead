//! Typed errors shared by every layer.
//!
//! [`InvalidInput`] names the field at fault so that the HTTP layer can answer
//! `{ "error": { "code", "message", "field" } }` without guessing. [`QueueError`] and
//! [`StoreError`] are what the two backend seams return; callers act on their variants.

use crate::id::RunId;
use crate::run::RunStatus;
use std::time::Duration;

/// Bad input: which field, and why. A call refused with this changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidInput {
    /// The field at fault, as callers name it (`task`, `ttl`, `workloops`, ...).
    pub field: &'static str,
    /// Why the value was refused, lowercase, no trailing period.
    pub reason: String,
}

impl InvalidInput {
    /// Builds an error for `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}

/// Errors of a queue backend (the dispatch state: queues, lanes, slots, leases).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The run is not known to the queue backend (finished, or never enqueued).
    #[error("run {0} is not in the queue backend")]
    NotFound(RunId),
    /// The fencing token does not match the run's current lease (a zombie, or a lost lease).
    #[error("stale fencing token for run {0}")]
    StaleToken(RunId),
    /// The queue key already holds `max_queued` waiting runs.
    #[error("queue {queue} key {key:?} is full ({max_queued} waiting runs)")]
    QueueFull {
        /// The queue at its cap.
        queue: String,
        /// The concurrency key at its cap.
        key: String,
        /// The configured cap.
        max_queued: u32,
    },
    /// A sync trigger found the fast lane full; retry after the given time.
    #[error("fast lane of env {env} is full")]
    FastLaneFull {
        /// The env whose fast lane is full.
        env: String,
        /// A hint for the caller's `Retry-After`.
        retry_after: Duration,
    },
    /// The run is not in a state that allows the operation (e.g. rescheduling a ready run).
    #[error("run {run} is {status}, which does not allow {operation}")]
    WrongState {
        /// The run.
        run: RunId,
        /// Its current status.
        status: RunStatus,
        /// What was attempted.
        operation: &'static str,
    },
    /// A release of a run whose cancel was requested: it is not handed back to its queue (it
    /// must end `canceled`); nothing changed.
    #[error("run {0} has a cancel requested; it cannot go back to its queue")]
    CancelRequested(RunId),
    /// Bad input to the backend (unknown lane, unknown env).
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The backend cannot be reached; nothing was changed.
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
}

impl QueueError {
    /// An env the backend does not know (field `env`).
    pub fn unknown_env(env: &crate::EnvName) -> Self {
        QueueError::Invalid(InvalidInput::new(
            "env",
            format!("unknown env {:?}", env.as_str()),
        ))
    }

    /// A lane the backend does not know (field `lane`).
    pub fn unknown_lane(lane: &crate::LaneName) -> Self {
        QueueError::Invalid(InvalidInput::new(
            "lane",
            format!("unknown lane {:?}", lane.as_str()),
        ))
    }
}

/// Errors of a run store (runs, attempts, idempotency keys, envs, versions).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No run with this id.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// The run already reached a terminal state; nothing changed.
    #[error("run {run} already finished as {status}")]
    AlreadyFinished {
        /// The run.
        run: RunId,
        /// Its terminal status.
        status: RunStatus,
    },
    /// A terminal write for an attempt that is no longer the run's current one (its lease
    /// lapsed and the run moved on to a later attempt); nothing changed. Stores that fence
    /// terminal writes by attempt (PostgreSQL, SQLite, memory) answer it; the engine treats it as a
    /// lost lease.
    #[error("run {run} is at attempt {current}; the end of attempt {attempt} is stale")]
    StaleAttempt {
        /// The run.
        run: RunId,
        /// The attempt the write was for.
        attempt: u32,
        /// The run's current attempt.
        current: u32,
    },
    /// No such version of the env.
    #[error("env {env} has no version {version}")]
    UnknownVersion {
        /// The env.
        env: String,
        /// The version asked for.
        version: u32,
    },
    /// The store cannot be reached or did not commit in time; nothing acknowledged was lost.
    #[error("run store unavailable: {0}")]
    Unavailable(String),
}
