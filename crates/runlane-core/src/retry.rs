//! Retry policies and backoff: exponential with a factor, bounded by min and max, with jitter
//! drawn from an injected rng (so tests replay exactly).

use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::error::InvalidInput;
use crate::time::Timestamp;

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
    pub fn validate(&self) -> Result<(), InvalidInput> {
        todo!("retry validate")
    }

    /// The backoff before attempt `attempt + 1`, after attempt `attempt` (1-based) failed.
    pub fn backoff(&self, attempt: u32, rng: &mut dyn RngCore) -> Duration {
        let _ = (attempt, rng);
        todo!("retry backoff")
    }

    /// When the next attempt runs after attempt `attempt` failed at `now`, or `None` when the
    /// attempts are exhausted.
    pub fn next_attempt_at(
        &self,
        attempt: u32,
        now: Timestamp,
        rng: &mut dyn RngCore,
    ) -> Option<Timestamp> {
        let _ = (attempt, now, rng);
        todo!("retry next")
    }
}
