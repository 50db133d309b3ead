//! The order of runs within a queue key: `score = available_at_ms − priority_ms`.
//!
//! A priority of *p* seconds makes a run look *p* seconds older. Ties break by trigger order,
//! which run ids encode (they are minted strictly increasing).

use std::time::Duration;

use crate::error::InvalidInput;
use crate::id::RunId;
use crate::time::Timestamp;

/// The largest priority: 30 days.
pub const PRIORITY_MAX: Duration = Duration::from_secs(2_592_000);

/// A run's position within its queue key; smaller goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score {
    /// `available_at_ms − priority_ms` (may be negative near the epoch).
    pub value: i64,
    /// Trigger order, the tie-break.
    pub run_id: RunId,
}

/// The score of a run that became available at `available_at` with `priority`.
pub fn score(available_at: Timestamp, priority: Duration, run_id: RunId) -> Score {
    let avail = i64::try_from(available_at.as_millis()).unwrap_or(i64::MAX);
    let prio = i64::try_from(priority.as_millis()).unwrap_or(i64::MAX);
    Score {
        value: avail.saturating_sub(prio),
        run_id,
    }
}

/// Checks a priority is within 0..=2,592,000 s.
pub fn check_priority(priority: Duration) -> Result<(), InvalidInput> {
    if priority > PRIORITY_MAX {
        return Err(InvalidInput::new(
            "priority",
            format!("must be between 0 and {} seconds", PRIORITY_MAX.as_secs()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_makes_a_run_look_older_and_ties_break_by_trigger_order() {
        let (a, b, c) = (RunId(1), RunId(2), RunId(3));
        let early = score(Timestamp(10_000), Duration::ZERO, b);
        let late_prio = score(Timestamp(12_000), Duration::from_secs(5), c);
        let tie = score(Timestamp(10_000), Duration::ZERO, a);
        assert!(late_prio < early, "5 s of priority beats 2 s of age");
        assert!(tie < early, "same score: trigger order");
    }

    #[test]
    fn priority_bounds() {
        assert!(check_priority(PRIORITY_MAX).is_ok());
        let err = check_priority(PRIORITY_MAX + Duration::from_secs(1)).expect_err("too big");
        assert_eq!(err.field, "priority");
    }
}
