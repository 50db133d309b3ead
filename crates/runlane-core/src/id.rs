//! Identifiers: run ids (16 bytes, time-ordered), fencing tokens, worker ids.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::InvalidInput;
use crate::time::Timestamp;

/// A run's id: 48 bits of milliseconds since the epoch, then 80 bits that keep ids from one
/// generator strictly increasing (a counter seeded randomly). Ordering ids orders runs by
/// trigger time, which is the tie-break of equal scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(pub u128);

impl RunId {
    /// The 16 bytes of the id, big-endian so that byte order is time order.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Rebuilds an id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        RunId(u128::from_be_bytes(bytes))
    }

    /// The instant the id was minted.
    pub fn timestamp(self) -> Timestamp {
        Timestamp((self.0 >> 80) as u64)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "run_{:032x}", self.0)
    }
}

impl FromStr for RunId {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("run_").unwrap_or(s);
        if hex.len() != 32 {
            return Err(InvalidInput::new(
                "run_id",
                "must be run_ followed by 32 hex digits",
            ));
        }
        u128::from_str_radix(hex, 16)
            .map(RunId)
            .map_err(|_| InvalidInput::new("run_id", "must be run_ followed by 32 hex digits"))
    }
}

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Mints strictly increasing, time-ordered run ids. The caller passes `now`.
#[derive(Debug)]
pub struct RunIdGenerator {
    last: u128,
}

impl RunIdGenerator {
    /// A generator whose low bits start at `seed` (random in production, fixed in tests).
    pub fn new(seed: u64) -> Self {
        RunIdGenerator {
            last: u128::from(seed & 0xFFFF_FFFF) << 16,
        }
    }

    /// The next id at `now`: never smaller than or equal to a previous one.
    pub fn next(&mut self, now: Timestamp) -> RunId {
        let time_part = u128::from(now.0 & 0xFFFF_FFFF_FFFF) << 80;
        let candidate = time_part | (self.last & ((1u128 << 80) - 1));
        let id = if candidate > self.last {
            candidate + 1
        } else {
            self.last + 1
        };
        self.last = id;
        RunId(id)
    }
}

/// The fencing token of one lease. Tokens only grow; a call carrying an older token than the
/// run's current lease is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A worker's id, unique per engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker_{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered_and_strictly_increasing() {
        let mut g = RunIdGenerator::new(42);
        let a = g.next(Timestamp(1_000));
        let b = g.next(Timestamp(1_000));
        let c = g.next(Timestamp(999)); // clock went back: still increasing
        let d = g.next(Timestamp(2_000));
        assert!(a < b && b < c && c < d);
        assert_eq!(a.timestamp(), Timestamp(1_000));
        assert_eq!(d.timestamp(), Timestamp(2_000));
    }

    #[test]
    fn display_round_trips() {
        let mut g = RunIdGenerator::new(7);
        let id = g.next(Timestamp(1_700_000_000_000));
        let text = id.to_string();
        assert!(text.starts_with("run_"));
        assert_eq!(text.parse::<RunId>(), Ok(id));
        assert_eq!(RunId::from_bytes(id.to_bytes()), id);
    }

    #[test]
    fn bad_ids_name_the_field() {
        for bad in [
            "",
            "run_",
            "run_xyz",
            "run_0123",
            &format!("run_{}", "g".repeat(32)),
        ] {
            let err = bad.parse::<RunId>().expect_err(bad);
            assert_eq!(err.field, "run_id");
        }
    }
}
