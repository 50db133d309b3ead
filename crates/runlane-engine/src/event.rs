//! Run events: status changes and progress, per run and per env. Progress is kept in memory
//! (the latest value per run, for late subscribers) and never written to the store mid-run.

use std::sync::Arc;

use runlane_core::{EnvName, RunId, RunStatus, Timestamp};

/// One event about a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    /// Increasing per engine; SSE uses it as the event id.
    pub seq: u64,
    /// The run.
    pub run: RunId,
    /// Its env.
    pub env: EnvName,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: RunEventKind,
}

/// What happened to a run.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEventKind {
    /// It moved to a new status (attempt is the attempt in force).
    Status {
        /// The new status.
        status: RunStatus,
        /// The attempt.
        attempt: u32,
    },
    /// Its handler reported progress (JSON text).
    Progress(Arc<str>),
}

/// A subscription to one run's events. A new subscriber first gets the latest progress.
pub struct RunEvents {
    _private: (),
}

impl RunEvents {
    /// The next event; `None` once the run is terminal and every event was delivered.
    pub async fn next(&mut self) -> Option<RunEvent> {
        todo!()
    }
}

/// A subscription to every run event of one env.
pub struct EnvEvents {
    _private: (),
}

impl EnvEvents {
    /// The next event; `None` when the engine shuts down.
    pub async fn next(&mut self) -> Option<RunEvent> {
        todo!()
    }
}
