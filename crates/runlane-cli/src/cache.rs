//! `runlane bench cache`: what touching a fixed working set costs right after another touch and
//! after each idle pause of `--gaps-us`.
//!
//! The probe walks `--kib` of memory one cache line at a time in a random cycle (each line holds
//! the index of the next, so every load waits for the one before and prefetching cannot help).
//! Back to back, the set stays in the CPU's caches; after a pause it is as cold as whatever
//! else ran on the machine in the meantime made it. On a shared virtual machine a few
//! milliseconds are enough to evict it entirely: the engine's idle-then-trigger latency
//! (`bench latency --gap-ms 5`) pays that for every line of code and data its path touches,
//! and this line beside it says how much of a figure is the machine's.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench::{git_revision, percentile};
use crate::fsync::{gap_samples, idle_probe};

/// Bytes of one cache line on the CPUs this runs on.
const LINE: usize = 64;
/// Words of one line.
const WORDS: usize = LINE / std::mem::size_of::<usize>();
/// The largest working set accepted, KiB (1 GiB).
const MAX_KIB: usize = 1 << 20;

/// A working set of `lines` cache lines linked in one random cycle.
struct Chase {
    words: Vec<usize>,
    lines: usize,
}

impl Chase {
    /// Links the lines in an order shuffled by `seed` (a Fisher–Yates shuffle over xorshift).
    fn new(kib: usize, mut seed: u64) -> Chase {
        let lines = (kib * 1024 / LINE).max(1);
        let mut order: Vec<usize> = (0..lines).collect();
        for i in (1..lines).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let j = usize::try_from(seed % (i as u64 + 1)).unwrap_or(0);
            order.swap(i, j);
        }
        let mut words = vec![0usize; lines * WORDS];
        for (k, &line) in order.iter().enumerate() {
            words[line * WORDS] = order[(k + 1) % lines];
        }
        Chase { words, lines }
    }

    /// Follows the cycle once around; returns where it ended (the first line again).
    fn walk(&self) -> usize {
        let mut at = 0;
        for _ in 0..self.lines {
            at = self.words[at * WORDS];
        }
        at
    }
}

/// Runs `walks` measured walks (after a tenth as many unmeasured ones) for each gap, on a
/// blocking thread: one JSON line per gap.
pub async fn cache(kib: usize, walks: u32, gaps_us: Vec<u64>) -> anyhow::Result<Vec<Value>> {
    if !(1..=MAX_KIB).contains(&kib) {
        anyhow::bail!("--kib must be from 1 to {MAX_KIB} (1 GiB)");
    }
    idle_probe(
        "cache",
        "--walks",
        walks,
        gaps_us,
        move |gaps, warmup, progress| {
            let chase = Chase::new(kib, 0x9e37_79b9_7f4a_7c15);
            let per_gap = gap_samples(walks, warmup, gaps, progress, || {
                let started = Instant::now();
                std::hint::black_box(std::hint::black_box(&chase).walk());
                anyhow::Ok(started.elapsed())
            })?;
            Ok(per_gap
                .into_iter()
                .map(|(gap, samples)| line(kib, chase.lines, walks, gap, &samples))
                .collect())
        },
    )
    .await
}

fn line(kib: usize, lines: usize, walks: u32, gap: u64, samples: &[Duration]) -> Value {
    let nanos: Vec<u64> = samples
        .iter()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .collect();
    let p50 = percentile(&nanos, 0.50);
    json!({
        "scenario": "cache",
        "gap_us": gap,
        "kib": kib,
        "lines": lines,
        "walks": walks,
        "p50_ns": p50,
        "p99_ns": percentile(&nanos, 0.99),
        "ns_per_line_p50": (p50 as f64 / lines as f64 * 10.0).round() / 10.0,
        "git_revision": git_revision(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_visits_every_line_once_and_returns_to_the_start() {
        let chase = Chase::new(16, 7);
        assert_eq!(chase.lines, 256);
        let mut seen = vec![false; chase.lines];
        let mut at = 0;
        for _ in 0..chase.lines {
            assert!(!seen[at], "line {at} visited twice");
            seen[at] = true;
            at = chase.words[at * WORDS];
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(chase.walk(), 0);
    }
}
