//! The run lifecycle of SPEC §2 as a pure state machine.
//!
//! ```text
//! trigger ─► delayed ──promote──► queued ──admit──► ready ──claim──► executing ──complete──► completed
//!              │                    │                 │ ▲                 │  ├─fail (no attempts left)► failed
//!              │                    │                 │ └─ready_timeout───┘  ├─timeout (none left)──► timed_out
//!              │                    │                 │    (back to queued)  ├─lease lost (none left)► failed
//!              └──cancel / expire───┴──cancel/expire──┘                      ├─fail/timeout/lost (left)► delayed|queued
//!                  ► canceled | expired                                      ├─release (drain)─► queued
//!                                                                            └─cancel + grace elapsed─► canceled
//! ```
//!
//! Every backend validates its moves with [`transition`], and the reference model uses the same
//! function, so an illegal move is a bug caught in one place.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use crate::time::Timestamp;

/// Where a run is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// `run_after` is in the future.
    Delayed,
    /// Waiting in its queue for admission.
    Queued,
    /// Slots held; sitting in its lane for a worker.
    Ready,
    /// A worker holds a lease on it.
    Executing,
    /// Finished successfully (terminal).
    Completed,
    /// Attempts exhausted (terminal).
    Failed,
    /// Cancelled (terminal).
    Canceled,
    /// Waited past its TTL deadline without ever being leased (terminal).
    Expired,
    /// The last attempt ran past the task's max duration (terminal).
    TimedOut,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 9] = [
        RunStatus::Delayed,
        RunStatus::Queued,
        RunStatus::Ready,
        RunStatus::Executing,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Canceled,
        RunStatus::Expired,
        RunStatus::TimedOut,
    ];

    /// Terminal states absorb: no transition leaves them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Canceled
                | RunStatus::Expired
                | RunStatus::TimedOut
        )
    }

    /// Waiting states: the run has not started this attempt.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            RunStatus::Delayed | RunStatus::Queued | RunStatus::Ready
        )
    }

    /// Whether the run holds concurrency slots in this state.
    pub fn holds_slots(self) -> bool {
        matches!(self, RunStatus::Ready | RunStatus::Executing)
    }

    /// The snake_case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Delayed => "delayed",
            RunStatus::Queued => "queued",
            RunStatus::Ready => "ready",
            RunStatus::Executing => "executing",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
            RunStatus::Expired => "expired",
            RunStatus::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = crate::error::InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                crate::error::InvalidInput::new("status", format!("unknown status {s:?}"))
            })
    }
}

/// What made a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// An ordinary trigger.
    #[default]
    Standard,
    /// A schedule tick.
    Scheduled,
    /// A person (dashboard, CLI) or a manual retry.
    Manual,
    /// A trigger whose caller waits for the result.
    Sync,
}

impl TriggerSource {
    /// The snake_case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::Standard => "standard",
            TriggerSource::Scheduled => "scheduled",
            TriggerSource::Manual => "manual",
            TriggerSource::Sync => "sync",
        }
    }
}

/// Why a handler's cancellation token fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// Someone cancelled the run.
    Cancel,
    /// The worker is draining on stop.
    Shutdown,
    /// The attempt ran past the task's max duration.
    Timeout,
    /// The worker lost its lease.
    LeaseLost,
}

/// An event that moves a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `run_after` reached: delayed → queued.
    Promote,
    /// Slots taken: queued → ready.
    Admit,
    /// Leased by a worker: ready → executing.
    Claim,
    /// The handler succeeded.
    Complete,
    /// The handler failed. `retry` is where the next attempt waits, or `None` when exhausted.
    Fail {
        /// Where the next attempt waits, `None` when attempts are exhausted.
        retry: Option<RetryTarget>,
    },
    /// The attempt passed its max duration.
    Timeout {
        /// Where the next attempt waits, `None` when attempts are exhausted.
        retry: Option<RetryTarget>,
    },
    /// The lease lapsed (the worker died): the attempt counts as crashed.
    LeaseLost {
        /// Where the next attempt waits, `None` when attempts are exhausted.
        retry: Option<RetryTarget>,
    },
    /// A cancel request. Waiting runs end at once; executing runs get their token fired and
    /// stay executing until they finish or the grace period ends.
    Cancel,
    /// The grace period of a cancelled executing run ended.
    CancelGraceElapsed,
    /// The TTL deadline passed.
    Expire,
    /// Drain on stop: back to the queue without counting an attempt.
    Release,
    /// The lane had no live consumer for `ready_timeout`: back to the queue.
    ReadyTimeout,
    /// `run_after` changed by a reschedule.
    Reschedule {
        /// Whether the new `run_after` is in the future.
        delayed: bool,
    },
}

/// Where a retried attempt waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryTarget {
    /// Its retry time is in the future.
    Delayed,
    /// Its retry time is now.
    Queued,
}

/// A move the state machine refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not allowed from {from}")]
pub struct IllegalTransition {
    /// The status the run was in.
    pub from: RunStatus,
    /// The refused event.
    pub event: Event,
}

/// The status after `event`, or why it is illegal. `ever_leased` matters for expiry: a run that
/// ever held a lease never expires.
pub fn transition(
    from: RunStatus,
    ever_leased: bool,
    event: Event,
) -> Result<RunStatus, IllegalTransition> {
    use RunStatus::*;
    let illegal = Err(IllegalTransition { from, event });
    let retry_status = |retry: Option<RetryTarget>, exhausted: RunStatus| match retry {
        Some(RetryTarget::Delayed) => Delayed,
        Some(RetryTarget::Queued) => Queued,
        None => exhausted,
    };
    match (from, event) {
        (Delayed, Event::Promote) => Ok(Queued),
        (Queued, Event::Admit) => Ok(Ready),
        (Ready, Event::Claim) => Ok(Executing),
        (Ready, Event::ReadyTimeout) => Ok(Queued),
        (Executing, Event::Complete) => Ok(Completed),
        (Executing, Event::Fail { retry }) => Ok(retry_status(retry, Failed)),
        (Executing, Event::Timeout { retry }) => Ok(retry_status(retry, TimedOut)),
        (Executing, Event::LeaseLost { retry }) => Ok(retry_status(retry, Failed)),
        (Executing, Event::Release) => Ok(Queued),
        (Executing, Event::Cancel) => Ok(Executing),
        (Executing, Event::CancelGraceElapsed) => Ok(Canceled),
        (Delayed | Queued | Ready, Event::Cancel) => Ok(Canceled),
        (Delayed | Queued | Ready, Event::Expire) if !ever_leased => Ok(Expired),
        (Delayed | Queued, Event::Reschedule { delayed }) => {
            Ok(if delayed { Delayed } else { Queued })
        }
        _ => illegal,
    }
}

/// Whether a completion arriving at `now` for a run cancelled at `cancel_requested_at` still
/// wins: it must land within the grace period.
pub fn completion_wins(
    cancel_requested_at: Option<Timestamp>,
    grace: Duration,
    now: Timestamp,
) -> bool {
    match cancel_requested_at {
        None => true,
        Some(at) => now < at.saturating_add(grace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStatus::*;

    #[test]
    fn happy_path() {
        let mut s = Delayed;
        for e in [Event::Promote, Event::Admit, Event::Claim, Event::Complete] {
            s = transition(s, false, e).expect("legal");
        }
        assert_eq!(s, Completed);
    }

    #[test]
    fn terminal_states_absorb_every_event() {
        let events = [
            Event::Promote,
            Event::Admit,
            Event::Claim,
            Event::Complete,
            Event::Fail {
                retry: Some(RetryTarget::Queued),
            },
            Event::Timeout { retry: None },
            Event::LeaseLost { retry: None },
            Event::Cancel,
            Event::CancelGraceElapsed,
            Event::Expire,
            Event::Release,
            Event::ReadyTimeout,
            Event::Reschedule { delayed: true },
        ];
        for s in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for e in events {
                assert!(transition(s, false, e).is_err(), "{s} {e:?}");
            }
        }
    }

    #[test]
    fn retries_and_exhaustion() {
        let cases = [
            (
                Event::Fail {
                    retry: Some(RetryTarget::Delayed),
                },
                Delayed,
            ),
            (
                Event::Fail {
                    retry: Some(RetryTarget::Queued),
                },
                Queued,
            ),
            (Event::Fail { retry: None }, Failed),
            (
                Event::Timeout {
                    retry: Some(RetryTarget::Queued),
                },
                Queued,
            ),
            (Event::Timeout { retry: None }, TimedOut),
            (Event::LeaseLost { retry: None }, Failed),
            (
                Event::LeaseLost {
                    retry: Some(RetryTarget::Delayed),
                },
                Delayed,
            ),
            (Event::Release, Queued),
            (Event::Cancel, Executing),
            (Event::CancelGraceElapsed, Canceled),
        ];
        for (e, want) in cases {
            assert_eq!(transition(Executing, true, e), Ok(want), "{e:?}");
        }
    }

    #[test]
    fn expiry_only_for_never_leased_waiting_runs() {
        for s in [Delayed, Queued, Ready] {
            assert_eq!(transition(s, false, Event::Expire), Ok(Expired));
            assert!(transition(s, true, Event::Expire).is_err());
        }
        assert!(transition(Executing, false, Event::Expire).is_err());
    }

    #[test]
    fn cancel_from_every_waiting_state_and_reschedule_rules() {
        for s in [Delayed, Queued, Ready] {
            assert_eq!(transition(s, false, Event::Cancel), Ok(Canceled));
        }
        assert_eq!(
            transition(Queued, false, Event::Reschedule { delayed: true }),
            Ok(Delayed)
        );
        assert!(transition(Ready, false, Event::Reschedule { delayed: true }).is_err());
        assert!(transition(Executing, false, Event::Reschedule { delayed: false }).is_err());
    }

    #[test]
    fn grace_period_boundary() {
        let at = Timestamp(1_000);
        let grace = Duration::from_secs(10);
        assert!(completion_wins(None, grace, Timestamp(99_999)));
        assert!(completion_wins(Some(at), grace, Timestamp(10_999)));
        assert!(!completion_wins(Some(at), grace, Timestamp(11_000)));
    }

    #[test]
    fn status_names_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>(), Ok(s));
        }
        assert_eq!(
            "nope".parse::<RunStatus>().expect_err("bad").field,
            "status"
        );
    }
}
