//! The conformance kit: scenarios with stable ids written once, generic over a backend factory,
//! and the reference model used by the model-based property test.
//!
//! A backend proves it keeps runlane's semantics (SPEC §2, §3, §7) by implementing
//! [`Backends`] and expanding [`conformance_suite!`] in one test file:
//!
//! ```text
//! struct Memory;
//! #[async_trait::async_trait]
//! impl runlane_conformance::Backends for Memory { /* name, open */ }
//! runlane_conformance::conformance_suite!(Memory);
//! ```
//!
//! Each scenario opens its own engine on fresh backends with a [`ManualClock`] at [`EPOCH`]
//! and a fixed rng seed, drives it through the public engine API, and asserts in virtual time.
//! Families: FP (fast path), ORD (order and timing), LIM (admission limits), LANE (lanes and
//! claim chains), TTL (expiry), LIFE (lifecycle), IDEM (idempotency), WAIT (trigger-and-wait),
//! CAP and DRAIN (queue caps, drain on stop), FAIR (fairness), BAD (bad input), VER
//! (versions), SCHED (cron schedules).
//!
//! [`ManualClock`]: runlane_engine::ManualClock

pub mod model;

pub mod capacity;
pub mod fairness;
pub mod fast_path;
pub mod idempotency;
pub mod invalid;
pub mod kit;
pub mod lane;
pub mod lifecycle;
pub mod limit;
pub mod order;
pub mod schedule;
mod suite;
pub mod ttl;
pub mod version;
pub mod wait;

pub use kit::{Backends, Harness, Probe, Started, EPOCH, WAIT};

#[doc(hidden)]
pub use tokio as __tokio;

/// Every scenario as `(id, one-line description)`, in suite order. Ids are stable.
pub const SCENARIOS: &[(&str, &str)] = __with_scenarios!(__emit_list!());

/// Runs the scenario with `id` on backends from `b`; false when no scenario has that id.
pub async fn run_scenario(b: &dyn Backends, id: &str) -> bool {
    __with_scenarios!(__emit_dispatch!(b, id))
}

#[cfg(test)]
mod tests {
    use super::SCENARIOS;
    use std::collections::HashSet;

    #[test]
    fn scenario_ids_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for (id, description) in SCENARIOS {
            assert!(seen.insert(*id), "duplicate scenario id {id}");
            let (family, number) = id.split_once('-').expect("FAMILY-NN");
            assert!(family.chars().all(|c| c.is_ascii_uppercase()), "{id}");
            assert!(
                number.len() == 2 && number.chars().all(|c| c.is_ascii_digit()),
                "{id}"
            );
            assert!(!description.is_empty(), "{id} has no description");
        }
        for family in [
            "FP", "ORD", "LIM", "LANE", "TTL", "LIFE", "IDEM", "WAIT", "CAP", "DRAIN", "FAIR",
            "BAD", "VER",
        ] {
            assert!(
                SCENARIOS
                    .iter()
                    .any(|(id, _)| id.starts_with(&format!("{family}-"))),
                "{family}"
            );
        }
        assert_eq!(
            SCENARIOS
                .iter()
                .filter(|(id, _)| id.starts_with("FP-"))
                .count(),
            8,
            "seed 000's eight cases"
        );
    }
}
