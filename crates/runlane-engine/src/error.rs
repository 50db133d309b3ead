//! The engine's error type: variants callers (and the HTTP layer) act on.

use std::time::Duration;

use runlane_core::{admission::Scope, InvalidInput, QueueError, RunId, RunStatus, StoreError};

/// Why an engine call failed. A refused call changed nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// Bad input, naming the field.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// One item of a batch was invalid; nothing of the batch was stored.
    #[error("batch item {index}: {source}")]
    BatchItem {
        /// Position in the batch.
        index: usize,
        /// What was wrong with it.
        source: Box<EngineError>,
    },
    /// No such run.
    #[error("run {0} not found")]
    RunNotFound(RunId),
    /// No such env.
    #[error("env {0:?} not found")]
    EnvNotFound(String),
    /// `create_env` found the env already there; nothing changed.
    #[error("env {0:?} exists")]
    EnvExists(String),
    /// A strict env refused a task no version defines.
    #[error("unknown task {task:?} in env {env:?}")]
    UnknownTask {
        /// The env.
        env: String,
        /// The task.
        task: String,
    },
    /// `lock_to_version` named a version that does not exist or does not define the task.
    #[error("unknown version {version} for task {task:?}")]
    UnknownVersion {
        /// The version.
        version: u32,
        /// The task.
        task: String,
    },
    /// The run already finished; nothing changed.
    #[error("run {run} already finished as {status}")]
    AlreadyFinished {
        /// The run.
        run: RunId,
        /// Its terminal status.
        status: RunStatus,
    },
    /// The run is not in a state that allows this (e.g. rescheduling an executing run).
    #[error("run {run} is {status}; cannot {operation}")]
    WrongState {
        /// The run.
        run: RunId,
        /// Its status.
        status: RunStatus,
        /// What was attempted.
        operation: &'static str,
    },
    /// The fencing token is stale: the caller lost this run's lease.
    #[error("stale fencing token for run {0}")]
    StaleToken(RunId),
    /// The queue key holds `max_queued` waiting runs.
    #[error("queue {queue} is full ({max_queued} waiting runs)")]
    QueueFull {
        /// The queue.
        queue: String,
        /// Its cap.
        max_queued: u32,
    },
    /// A sync trigger found the fast lane full.
    #[error("fast lane is full; retry after {retry_after:?}")]
    FastLaneFull {
        /// When to retry.
        retry_after: Duration,
    },
    /// Waiting from inside a handler for a run that needs the slots the handler holds.
    #[error("waiting would deadlock: the run needs the {scope:?} slot this handler holds")]
    WaitDeadlock {
        /// The shared scope whose limit the waiting handler exhausts.
        scope: Scope,
    },
    /// A backend is unreachable or too slow; nothing acknowledged was lost.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The engine is shutting down.
    #[error("engine is shut down")]
    ShutDown,
}

impl From<QueueError> for EngineError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(run) => EngineError::RunNotFound(run),
            QueueError::StaleToken(run) => EngineError::StaleToken(run),
            QueueError::QueueFull {
                queue, max_queued, ..
            } => EngineError::QueueFull { queue, max_queued },
            QueueError::FastLaneFull { retry_after, .. } => {
                EngineError::FastLaneFull { retry_after }
            }
            QueueError::WrongState {
                run,
                status,
                operation,
            } => EngineError::WrongState {
                run,
                status,
                operation,
            },
            QueueError::CancelRequested(run) => EngineError::WrongState {
                run,
                status: RunStatus::Executing,
                operation: "release a run whose cancel was requested",
            },
            QueueError::Invalid(i) => EngineError::Invalid(i),
            QueueError::Unavailable(s) => EngineError::Unavailable(s),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(run) => EngineError::RunNotFound(run),
            StoreError::AlreadyFinished { run, status } => {
                EngineError::AlreadyFinished { run, status }
            }
            StoreError::StaleAttempt { run, .. } => EngineError::StaleToken(run),
            StoreError::UnknownVersion { version, .. } => EngineError::UnknownVersion {
                version,
                task: String::new(),
            },
            StoreError::Unavailable(s) => EngineError::Unavailable(s),
        }
    }
}
