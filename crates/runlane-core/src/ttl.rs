//! The TTL deadline rule: `ttl_deadline = max(trigger_time, run_after) + ttl`, fixed at trigger
//! and recomputed by a reschedule. A run that never held a lease and is still waiting at its
//! deadline expires; a run that ever held a lease never does.

use std::time::Duration;

use crate::error::InvalidInput;
use crate::time::Timestamp;

/// The deadline of a run triggered at `triggered_at`, due at `run_after`, with `ttl`.
pub fn deadline(
    triggered_at: Timestamp,
    run_after: Timestamp,
    ttl: Option<Duration>,
) -> Option<Timestamp> {
    ttl.map(|ttl| triggered_at.max(run_after).saturating_add(ttl))
}

/// Checks a TTL is positive (a zero TTL could never be met).
pub fn check_ttl(ttl: Duration) -> Result<(), InvalidInput> {
    if ttl.is_zero() {
        return Err(InvalidInput::new("ttl", "must be greater than zero"));
    }
    Ok(())
}

/// Whether a run with this deadline has expired at `now` (never once leased).
pub fn is_expired(deadline: Option<Timestamp>, ever_leased: bool, now: Timestamp) -> bool {
    !ever_leased && deadline.is_some_and(|d| now >= d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_counts_from_the_later_of_trigger_and_run_after() {
        let ttl = Some(Duration::from_secs(10));
        assert_eq!(
            deadline(Timestamp(1_000), Timestamp(0), ttl),
            Some(Timestamp(11_000))
        );
        assert_eq!(
            deadline(Timestamp(1_000), Timestamp(5_000), ttl),
            Some(Timestamp(15_000))
        );
        assert_eq!(deadline(Timestamp(1_000), Timestamp(5_000), None), None);
    }

    #[test]
    fn expiry_rule() {
        let d = Some(Timestamp(100));
        assert!(!is_expired(d, false, Timestamp(99)));
        assert!(is_expired(d, false, Timestamp(100)));
        assert!(
            !is_expired(d, true, Timestamp(1_000)),
            "ever leased never expires"
        );
        assert!(!is_expired(None, false, Timestamp::MAX));
        assert_eq!(check_ttl(Duration::ZERO).expect_err("zero").field, "ttl");
        assert!(check_ttl(Duration::from_millis(1)).is_ok());
    }
}
