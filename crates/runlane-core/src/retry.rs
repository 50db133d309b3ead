//! Retry policies and backoff: exponential with a factor, bounded by min and max, with jitter
//! drawn from an injected rng (so tests replay exactly).

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::error::InvalidInput;
use crate::time::Timestamp;

/// The largest accepted `attempts_max`.
pub const MAX_ATTEMPTS: u32 = 1000;

/// The largest accepted backoff, `max`: 30 days.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// How a failed attempt is retried.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total attempts allowed, the first included (≥ 1; 1 means no retry).
    pub attempts_max: u32,
    /// Growth factor between consecutive backoffs (≥ 1).
    pub factor: f64,
    /// Backoff of the first retry.
    #[serde(with = "crate::settings::duration_ms")]
    pub min: Duration,
    /// The largest backoff.
    #[serde(with = "crate::settings::duration_ms")]
    pub max: Duration,
    /// Fraction of the backoff randomised, 0 to 1 (0.1 = ±10 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 3,
            factor: 2.0,
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            attempts_max: 1,
            ..RetryPolicy::default()
        }
    }

    /// Checks the policy; errors name `retry.<field>`.
    ///
    /// `attempts_max` is 1 to [`MAX_ATTEMPTS`]; `factor` is finite and at least 1; `min` is at
    /// most `max`; `max` is at most [`MAX_BACKOFF`]; `jitter` is 0 to 1.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if !(1..=MAX_ATTEMPTS).contains(&self.attempts_max) {
            return Err(InvalidInput::new(
                "retry.attempts_max",
                format!(
                    "must be between 1 and {MAX_ATTEMPTS}, got {}",
                    self.attempts_max
                ),
            ));
        }
        if !self.factor.is_finite() {
            return Err(InvalidInput::new(
                "retry.factor",
                format!("must be a finite number, got {}", self.factor),
            ));
        }
        if self.factor < 1.0 {
            return Err(InvalidInput::new(
                "retry.factor",
                format!("must be at least 1, got {}", self.factor),
            ));
        }
        if self.min > self.max {
            return Err(InvalidInput::new(
                "retry.min",
                format!(
                    "must not exceed retry.max ({:?} > {:?})",
                    self.min, self.max
                ),
            ));
        }
        if self.max > MAX_BACKOFF {
            return Err(InvalidInput::new(
                "retry.max",
                format!("must be at most 30 days, got {:?}", self.max),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidInput::new(
                "retry.jitter",
                format!("must be between 0 and 1, got {}", self.jitter),
            ));
        }
        Ok(())
    }

    /// The backoff before attempt `attempt + 1`, after attempt `attempt` (1-based) failed.
    ///
    /// `min × factor^(attempt − 1)`, capped at `max`, then multiplied by `1 + jitter × u` with
    /// `u` uniform in `[−1, 1]`, and clamped to `[0, max]`. Each call draws exactly one value
    /// from `rng`, whatever the jitter, so a seeded rng replays a sequence exactly. Attempt 0 is
    /// treated as 1. The math is done in `f64` and saturates: no overflow or panic for any
    /// attempt, and none for an unvalidated policy either (a non-finite or negative result
    /// becomes `max` or zero).
    pub fn backoff(&self, attempt: u32, rng: &mut dyn RngCore) -> Duration {
        let u: f64 = rng.gen_range(-1.0..=1.0);
        let max_ns = self.max.as_nanos() as f64;
        let min_ns = self.min.as_nanos() as f64;
        let exponent = f64::from(attempt.saturating_sub(1));
        let base = if min_ns == 0.0 {
            0.0
        } else {
            let growth = self.factor.powf(exponent);
            if growth.is_finite() {
                (min_ns * growth).min(max_ns)
            } else {
                max_ns
            }
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jittered = base * (1.0 + jitter * u);
        // `max` or `clamp` would pass a NaN through; the cast below maps NaN to 0.
        let ns = jittered.clamp(0.0, max_ns).round();
        // Float-to-int casts saturate; nanoseconds as u64 cover 584 years.
        Duration::from_nanos(ns as u64).min(self.max)
    }

    /// When the next attempt runs after attempt `attempt` failed at `now`, or `None` when the
    /// attempts are exhausted (`attempt >= attempts_max`). Saturates at [`Timestamp::MAX`].
    pub fn next_attempt_at(
        &self,
        attempt: u32,
        now: Timestamp,
        rng: &mut dyn RngCore,
    ) -> Option<Timestamp> {
        if attempt >= self.attempts_max {
            return None;
        }
        Some(now.saturating_add(self.backoff(attempt, rng)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy(
        attempts_max: u32,
        factor: f64,
        min_ms: u64,
        max_ms: u64,
        jitter: f64,
    ) -> RetryPolicy {
        RetryPolicy {
            attempts_max,
            factor,
            min: Duration::from_millis(min_ms),
            max: Duration::from_millis(max_ms),
            jitter,
        }
    }

    const DAY_MS: u64 = 24 * 60 * 60 * 1000;

    #[test]
    fn accepted_policies_validate() {
        let cases = [
            RetryPolicy::default(),
            RetryPolicy::none(),
            policy(1, 1.0, 0, 0, 0.0),
            policy(1000, 1.0, 5, 5, 1.0),
            policy(10, 1e300, 1, 30 * DAY_MS, 0.5),
            policy(2, 2.0, 30 * DAY_MS, 30 * DAY_MS, 0.0),
        ];
        for p in cases {
            assert_eq!(p.validate(), Ok(()), "{p:?}");
        }
    }

    #[test]
    fn refused_policies_name_the_field_and_the_reason() {
        let cases = [
            (
                policy(0, 2.0, 1, 2, 0.1),
                "retry.attempts_max",
                "between 1 and 1000, got 0",
            ),
            (
                policy(1001, 2.0, 1, 2, 0.1),
                "retry.attempts_max",
                "between 1 and 1000, got 1001",
            ),
            (
                policy(3, f64::NAN, 1, 2, 0.1),
                "retry.factor",
                "must be a finite number",
            ),
            (
                policy(3, f64::INFINITY, 1, 2, 0.1),
                "retry.factor",
                "must be a finite number",
            ),
            (
                policy(3, 0.99, 1, 2, 0.1),
                "retry.factor",
                "must be at least 1",
            ),
            (
                policy(3, -2.0, 1, 2, 0.1),
                "retry.factor",
                "must be at least 1",
            ),
            (
                policy(3, 2.0, 3, 2, 0.1),
                "retry.min",
                "must not exceed retry.max",
            ),
            (
                policy(3, 2.0, 1, 30 * DAY_MS + 1, 0.1),
                "retry.max",
                "at most 30 days",
            ),
            (
                policy(3, 2.0, 1, 2, -0.01),
                "retry.jitter",
                "between 0 and 1",
            ),
            (
                policy(3, 2.0, 1, 2, 1.01),
                "retry.jitter",
                "between 0 and 1",
            ),
            (
                policy(3, 2.0, 1, 2, f64::NAN),
                "retry.jitter",
                "between 0 and 1",
            ),
        ];
        for (p, field, fragment) in cases {
            let err = p.validate().expect_err(field);
            assert_eq!(err.field, field, "{p:?}");
            assert!(
                err.reason.contains(fragment),
                "{p:?}: {:?} lacks {fragment:?}",
                err.reason
            );
            assert!(!err.reason.ends_with('.'), "{p:?}");
        }
    }

    #[test]
    fn backoff_grows_by_the_factor_and_caps_at_max() {
        let p = policy(10, 2.0, 1000, 60_000, 0.0);
        let mut rng = StdRng::seed_from_u64(1);
        let got: Vec<u64> = (1..=8)
            .map(|a| p.backoff(a, &mut rng).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        // Attempt 0 is treated as attempt 1.
        assert_eq!(p.backoff(0, &mut rng), Duration::from_secs(1));
        // A factor of 1 is a constant backoff.
        let flat = policy(10, 1.0, 250, 60_000, 0.0);
        assert_eq!(flat.backoff(7, &mut rng), Duration::from_millis(250));
    }

    #[test]
    fn backoff_saturates_for_huge_attempts_and_factors() {
        let mut rng = StdRng::seed_from_u64(2);
        let max = Duration::from_millis(30 * DAY_MS);
        for p in [
            policy(1000, 2.0, 1, 30 * DAY_MS, 0.0),
            policy(1000, 1e300, 1, 30 * DAY_MS, 0.0),
            policy(1000, f64::MAX, 1, 30 * DAY_MS, 0.0),
        ] {
            assert_eq!(p.backoff(u32::MAX, &mut rng), max, "{p:?}");
            assert_eq!(p.backoff(1, &mut rng), Duration::from_millis(1), "{p:?}");
        }
        // min 0 stays 0 even when factor^n is infinite (0 × ∞ is not a NaN here).
        let zero = policy(1000, 1e300, 0, 1000, 0.0);
        assert_eq!(zero.backoff(u32::MAX, &mut rng), Duration::ZERO);
    }

    #[test]
    fn backoff_never_panics_on_unvalidated_policies() {
        let mut rng = StdRng::seed_from_u64(3);
        let huge = RetryPolicy {
            attempts_max: u32::MAX,
            factor: f64::INFINITY,
            min: Duration::MAX,
            max: Duration::MAX,
            jitter: 5.0,
        };
        let cases = [
            huge,
            RetryPolicy {
                factor: f64::NAN,
                ..huge
            },
            RetryPolicy {
                factor: -3.0,
                jitter: f64::NAN,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                min: Duration::from_secs(10),
                max: Duration::from_secs(1),
                ..RetryPolicy::default()
            },
        ];
        for p in cases {
            for attempt in [0, 1, 2, 3, 1000, u32::MAX] {
                assert!(
                    p.backoff(attempt, &mut rng) <= p.max,
                    "{p:?} attempt {attempt}"
                );
            }
        }
    }

    #[test]
    fn jitter_stays_within_its_band_and_replays_with_the_seed() {
        let p = policy(10, 2.0, 10_000, 60_000, 0.1);
        let mut rng = StdRng::seed_from_u64(4);
        let draws: Vec<Duration> = (0..1000).map(|_| p.backoff(2, &mut rng)).collect();
        let (lo, hi) = (Duration::from_millis(18_000), Duration::from_millis(22_000));
        assert!(draws.iter().all(|d| (lo..=hi).contains(d)));
        // Jitter really varies the result, on both sides of the base.
        assert!(draws.iter().any(|d| *d < Duration::from_millis(19_000)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(21_000)));
        let mut again = StdRng::seed_from_u64(4);
        let replay: Vec<Duration> = (0..1000).map(|_| p.backoff(2, &mut again)).collect();
        assert_eq!(draws, replay);
        // At the cap, jitter can only pull the backoff down.
        let capped: Vec<Duration> = (0..200).map(|_| p.backoff(10, &mut rng)).collect();
        assert!(capped
            .iter()
            .all(|d| *d <= p.max && *d >= Duration::from_millis(54_000)));
        // Full jitter spans [0, 2 × base].
        let full = policy(10, 2.0, 10_000, 60_000, 1.0);
        assert!((0..200).all(|_| full.backoff(1, &mut rng) <= Duration::from_millis(20_000)));
    }

    #[test]
    fn next_attempt_at_stops_when_attempts_are_exhausted() {
        let p = policy(3, 2.0, 1000, 60_000, 0.0);
        let mut rng = StdRng::seed_from_u64(5);
        let now = Timestamp::from_millis(1_000_000);
        assert_eq!(
            p.next_attempt_at(1, now, &mut rng),
            Some(Timestamp(1_001_000))
        );
        assert_eq!(
            p.next_attempt_at(2, now, &mut rng),
            Some(Timestamp(1_002_000))
        );
        assert_eq!(p.next_attempt_at(3, now, &mut rng), None);
        assert_eq!(p.next_attempt_at(4, now, &mut rng), None);
        assert_eq!(RetryPolicy::none().next_attempt_at(1, now, &mut rng), None);
        assert_eq!(
            p.next_attempt_at(1, Timestamp::MAX, &mut rng),
            Some(Timestamp::MAX),
            "saturates"
        );
    }

    #[test]
    fn policy_serde_uses_milliseconds_and_defaults() {
        let p: RetryPolicy =
            serde_json::from_str(r#"{"attempts_max":5,"min":250}"#).expect("valid json");
        assert_eq!(p.attempts_max, 5);
        assert_eq!(p.min, Duration::from_millis(250));
        assert_eq!(p.max, RetryPolicy::default().max);
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"attempts":5}"#).is_err());
    }

    fn valid_policy() -> impl Strategy<Value = RetryPolicy> {
        (
            1..=MAX_ATTEMPTS,
            prop_oneof![Just(1.0), 1.0..4.0f64, 1.0..1e300f64],
            0..=30 * DAY_MS,
            0..=30 * DAY_MS,
            prop_oneof![Just(0.0), 0.0..=1.0f64],
        )
            .prop_map(|(attempts_max, factor, a, b, jitter)| {
                policy(attempts_max, factor, a.min(b), a.max(b), jitter)
            })
    }

    proptest! {
        #[test]
        fn generated_policies_validate(p in valid_policy()) {
            prop_assert_eq!(p.validate(), Ok(()));
        }

        #[test]
        fn backoff_is_bounded_by_max(
            p in valid_policy(),
            attempt in any::<u32>(),
            seed in any::<u64>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            prop_assert!(p.backoff(attempt, &mut rng) <= p.max);
        }

        #[test]
        fn backoff_without_jitter_is_monotone(
            p in valid_policy(),
            attempt in 0..2000u32,
            seed in any::<u64>(),
        ) {
            let p = RetryPolicy { jitter: 0.0, ..p };
            let mut rng = StdRng::seed_from_u64(seed);
            let this = p.backoff(attempt, &mut rng);
            let next = p.backoff(attempt + 1, &mut rng);
            prop_assert!(this <= next, "{:?} > {:?}", this, next);
            prop_assert!(this >= p.min.min(p.max));
        }

        #[test]
        fn next_attempt_at_is_none_exactly_when_exhausted(
            p in valid_policy(),
            attempt in 0..=1100u32,
            now in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let now = Timestamp(now);
            let next = p.next_attempt_at(attempt, now, &mut rng);
            prop_assert_eq!(next.is_none(), attempt >= p.attempts_max);
            if let Some(at) = next {
                prop_assert!(at >= now);
                prop_assert!(at <= now.saturating_add(p.max));
            }
        }
    }
}
