//! Hashers: one for maps keyed by run ids (`HashMap<RunId, _, IdBuild>`), one for maps keyed
//! by names ([`NameBuild`]).
//!
//! Run ids are minted in order (a time part above a counter that steps by one), so the low
//! bits of an id already tell runs apart. The hash keeps the id's low 57 bits, which pick the
//! bucket: runs triggered one after another land in neighbouring buckets, and a queue drained
//! in trigger order walks the table instead of missing the cache on every lookup. The top 7
//! bits (the tag `hashbrown` compares first) are mixed from the whole id. SipHash, the
//! default, spreads neighbours over the whole table and costs more to compute; ids are minted
//! by the engine, never chosen by a caller, so the default's flooding resistance buys nothing.

use std::hash::{BuildHasherDefault, Hasher};

/// The hasher; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher {
    lo: u64,
    hi: u64,
}

/// The `BuildHasher` of [`IdHasher`].
pub type IdBuild = BuildHasherDefault<IdHasher>;

/// The `BuildHasher` of maps keyed by env and lane names, looked up on every trigger and
/// claim: foldhash (seeded at random per map), several times cheaper than SipHash on short
/// strings. Only for names an admin defines (a bounded set): foldhash resists hash flooding
/// only minimally, so maps keyed by what any caller sends (concurrency keys, idempotency
/// keys) keep SipHash.
pub type NameBuild = foldhash::fast::RandomState;

const LOW: u64 = (1 << 57) - 1;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mixed = (self.lo ^ self.hi.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (self.lo & LOW) | (mixed & !LOW)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not the path of a `RunId` (it writes one `u128`); any key still hashes correctly.
        for &b in bytes {
            self.hi = (self.hi.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }

    fn write_u128(&mut self, v: u128) {
        // The low half is the id's counter: it picks the bucket; the time part goes to the tag.
        self.lo ^= v as u64;
        self.hi ^= (v >> 64) as u64;
    }

    fn write_u64(&mut self, v: u64) {
        self.lo ^= v;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::hash::BuildHasher;

    use crate::RunId;

    use super::*;

    fn hash(id: RunId) -> u64 {
        IdBuild::default().hash_one(id)
    }

    #[test]
    fn consecutive_ids_hash_to_neighbouring_buckets() {
        let base = (1_700_000_000_000u128 << 80) | 12_345;
        let a = hash(RunId(base));
        let b = hash(RunId(base + 1));
        assert_eq!((b & LOW).wrapping_sub(a & LOW), 1);
        assert_ne!(
            hash(RunId(base)),
            hash(RunId(base + (1 << 80))),
            "time part counts"
        );
    }

    #[test]
    fn a_map_keyed_by_ids_finds_what_it_holds() {
        let mut map: HashMap<RunId, u32, IdBuild> = HashMap::default();
        for i in 0..10_000u32 {
            map.insert(RunId((u128::from(i) << 80) | u128::from(i)), i);
        }
        for i in 0..10_000u32 {
            assert_eq!(
                map.get(&RunId((u128::from(i) << 80) | u128::from(i))),
                Some(&i)
            );
        }
    }
}
