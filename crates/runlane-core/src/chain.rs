//! Claim chains: the ordered lane preferences of a workload (SPEC §3, seed 001).
//!
//! `fast_lane` or `a>b` is **filter mode** (only the named lanes, in that order); `manual>*` is
//! **preference mode** (the named lanes first, then every other lane, including lanes added
//! later). Names match `[A-Za-z0-9_]+`; `*` appears at most once and only last.

use std::fmt;

use crate::error::InvalidInput;
use crate::lane::LaneName;

/// A parsed claim chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClaimChain {
    /// Only these lanes, in this order.
    Filter(Vec<LaneName>),
    /// These lanes first, in this order, then every other lane (`*`).
    Preference(Vec<LaneName>),
}

impl ClaimChain {
    /// Parses `a>b>*`; errors name `field`.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, InvalidInput> {
        let _ = (field, text);
        todo!("chain parser")
    }

    /// The default chain, `manual>*`.
    pub fn default_chain() -> Self {
        ClaimChain::Preference(vec![LaneName::manual()])
    }

    /// The named lanes, in order.
    pub fn named(&self) -> &[LaneName] {
        match self {
            ClaimChain::Filter(l) | ClaimChain::Preference(l) => l,
        }
    }

    /// Whether the chain ends in `*`.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, ClaimChain::Preference(_))
    }

    /// Whether a claim with this chain may take runs from `lane`.
    pub fn covers(&self, lane: &LaneName) -> bool {
        self.is_wildcard() || self.named().contains(lane)
    }
}

impl fmt::Display for ClaimChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("chain display")
    }
}
