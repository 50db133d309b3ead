//! The admission predicate (SPEC §3), the one place the limits are written.
//!
//! A run holds slots while `ready` or `executing`. An ordinary run is admitted when all rows
//! hold:
//!
//! | scope | condition |
//! | --- | --- |
//! | env | `env_running < floor(env_limit × burst)` |
//! | queue key | `key_running < min(queue.limit, env_limit)` |
//! | queue total | `queue_running < queue.key_total_limit` (when set) |
//! | queue | not paused |
//!
//! A `fast_lane` run skips the env row only; it is bounded instead by
//! `fast_lane_running < fast_lane_limit` and still obeys the queue rows. Fast-lane runs count in
//! `fast_lane_running`, not in `env_running`.

use serde::{Deserialize, Serialize};

/// The counters and limits admission looks at, for one run's env, queue and key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionInput {
    /// Whether the run is in `fast_lane`.
    pub fast_lane: bool,
    /// The env's concurrency limit.
    pub env_limit: u32,
    /// The env's burst factor (≥ 1).
    pub burst: f64,
    /// The env's fast-lane limit (defaults to the env limit).
    pub fast_lane_limit: u32,
    /// Ordinary runs of the env holding slots.
    pub env_running: u32,
    /// Fast-lane runs of the env holding slots.
    pub fast_lane_running: u32,
    /// The queue's per-key limit, when set.
    pub queue_limit: Option<u32>,
    /// Runs of this queue key holding slots.
    pub key_running: u32,
    /// The queue's cap across keys, when set.
    pub key_total_limit: Option<u32>,
    /// Runs of this queue (all keys) holding slots.
    pub queue_running: u32,
    /// Whether the queue is paused.
    pub paused: bool,
}

/// A row of the admission table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `env_running < floor(env_limit × burst)`.
    Env,
    /// `fast_lane_running < fast_lane_limit`.
    FastLane,
    /// `key_running < min(queue.limit, env_limit)`.
    QueueKey,
    /// `queue_running < key_total_limit`.
    QueueTotal,
    /// The queue is paused.
    Paused,
}

/// Why a run was not admitted: the first row that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked(pub Scope);

/// `floor(env_limit × burst)`.
pub fn env_cap(env_limit: u32, burst: f64) -> u32 {
    let cap = (f64::from(env_limit) * burst).floor();
    if cap >= f64::from(u32::MAX) {
        u32::MAX
    } else if cap <= 0.0 {
        0
    } else {
        cap as u32
    }
}

/// `min(queue.limit, env_limit)`.
pub fn key_cap(queue_limit: Option<u32>, env_limit: u32) -> u32 {
    queue_limit.map_or(env_limit, |q| q.min(env_limit))
}

/// The predicate. Queue rows are checked before env rows so that a key at its cap reports
/// `QueueKey` (and never blocks other keys), while a full env reports `Env`.
pub fn admit(input: &AdmissionInput) -> Result<(), Blocked> {
    if input.paused {
        return Err(Blocked(Scope::Paused));
    }
    if input.key_running >= key_cap(input.queue_limit, input.env_limit) {
        return Err(Blocked(Scope::QueueKey));
    }
    if let Some(total) = input.key_total_limit {
        if input.queue_running >= total {
            return Err(Blocked(Scope::QueueTotal));
        }
    }
    if input.fast_lane {
        if input.fast_lane_running >= input.fast_lane_limit {
            return Err(Blocked(Scope::FastLane));
        }
    } else if input.env_running >= env_cap(input.env_limit, input.burst) {
        return Err(Blocked(Scope::Env));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AdmissionInput {
        AdmissionInput {
            fast_lane: false,
            env_limit: 10,
            burst: 1.0,
            fast_lane_limit: 10,
            env_running: 0,
            fast_lane_running: 0,
            queue_limit: None,
            key_running: 0,
            key_total_limit: None,
            queue_running: 0,
            paused: false,
        }
    }

    #[test]
    fn each_row_of_the_table() {
        type Case = (&'static str, fn(&mut AdmissionInput), Result<(), Blocked>);
        let cases: Vec<Case> = vec![
            ("open", |_| {}, Ok(())),
            ("env full", |i| i.env_running = 10, Err(Blocked(Scope::Env))),
            ("env below", |i| i.env_running = 9, Ok(())),
            (
                "burst raises env cap",
                |i| {
                    i.env_running = 14;
                    i.burst = 1.5
                },
                Ok(()),
            ),
            (
                "burst floor",
                |i| {
                    i.env_running = 15;
                    i.burst = 1.59
                },
                Err(Blocked(Scope::Env)),
            ),
            (
                "key at queue limit",
                |i| {
                    i.queue_limit = Some(2);
                    i.key_running = 2
                },
                Err(Blocked(Scope::QueueKey)),
            ),
            (
                "queue limit above env limit is capped",
                |i| {
                    i.queue_limit = Some(50);
                    i.key_running = 10
                },
                Err(Blocked(Scope::QueueKey)),
            ),
            (
                "key total",
                |i| {
                    i.key_total_limit = Some(3);
                    i.queue_running = 3
                },
                Err(Blocked(Scope::QueueTotal)),
            ),
            ("paused", |i| i.paused = true, Err(Blocked(Scope::Paused))),
            (
                "fast lane skips env row",
                |i| {
                    i.fast_lane = true;
                    i.env_running = 10
                },
                Ok(()),
            ),
            (
                "fast lane bounded by its limit",
                |i| {
                    i.fast_lane = true;
                    i.fast_lane_running = 10
                },
                Err(Blocked(Scope::FastLane)),
            ),
            (
                "fast lane obeys queue rows",
                |i| {
                    i.fast_lane = true;
                    i.queue_limit = Some(1);
                    i.key_running = 1
                },
                Err(Blocked(Scope::QueueKey)),
            ),
            (
                "fast lane obeys pause",
                |i| {
                    i.fast_lane = true;
                    i.paused = true
                },
                Err(Blocked(Scope::Paused)),
            ),
            (
                "env limit zero admits nothing",
                |i| i.env_limit = 0,
                Err(Blocked(Scope::QueueKey)),
            ),
        ];
        for (name, tweak, want) in cases {
            let mut input = base();
            tweak(&mut input);
            assert_eq!(admit(&input), want, "{name}");
        }
    }

    #[test]
    fn caps() {
        assert_eq!(env_cap(10, 1.0), 10);
        assert_eq!(env_cap(10, 1.25), 12);
        assert_eq!(env_cap(3, 1.5), 4);
        assert_eq!(key_cap(None, 7), 7);
        assert_eq!(key_cap(Some(3), 7), 3);
        assert_eq!(key_cap(Some(9), 7), 7);
    }
}
