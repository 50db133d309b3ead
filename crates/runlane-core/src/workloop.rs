//! Workloop specs: a worker's capacity split into slot groups, e.g. `fast_lane:1 manual>*:4`.

use std::fmt;

use crate::chain::ClaimChain;
use crate::error::InvalidInput;

/// One slot group: a claim chain and how many runs it may hold at once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workloop {
    /// Which lanes it claims from, in which order.
    pub chain: ClaimChain,
    /// How many runs it may hold at once (≥ 1).
    pub slots: u32,
}

/// A parsed workloop spec: one or more workloops separated by whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloopSpec(pub Vec<Workloop>);

impl WorkloopSpec {
    /// Parses `chain:count chain:count …`; errors name the `workloops` field.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let _ = text;
        todo!("workloop parser")
    }

    /// One workloop on the default chain with `slots` slots.
    pub fn single(slots: u32) -> Self {
        WorkloopSpec(vec![Workloop {
            chain: ClaimChain::default_chain(),
            slots,
        }])
    }

    /// Total slots across workloops.
    pub fn total_slots(&self) -> u32 {
        self.0.iter().map(|w| w.slots).sum()
    }
}

impl fmt::Display for WorkloopSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("workloop display")
    }
}
