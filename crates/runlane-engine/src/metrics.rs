//! Counters the engine keeps for `/metrics`: triggers (and how many took the fast path),
//! idempotency hits, claims with the due → claimed latency, retries, expirations, lease
//! losses and timeouts. Plain atomics, bumped on paths that already did the work, in one of a
//! few copies picked per thread (summed when read); reading them costs nothing on the hot path.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use runlane_core::backend::Leased;
use runlane_core::{LaneName, Timestamp};

/// Upper bounds (ms) of the due → claimed latency histogram's buckets (`+Inf` is implied).
pub const START_LATENCY_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 60_000,
];

/// A snapshot of the engine's counters (all since open, this process only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineMetrics {
    /// Runs triggered (new runs; idempotency hits not counted).
    pub triggered: u64,
    /// Of those, runs admitted straight into their lane at trigger (the fast path or an open,
    /// empty queue key).
    pub triggered_ready: u64,
    /// Triggers answered with an existing run (idempotency key).
    pub idempotent_hits: u64,
    /// Leases granted to this process's workers, in-process and remote.
    pub claimed: u64,
    /// Of those, leases granted inside a trigger's enqueue to an idle workloop of this
    /// process (claim on enqueue: no claim call of their own).
    pub claimed_on_enqueue: u64,
    /// Of those, leases another process's enqueue made for an idle workloop's offer parked in
    /// the queue, delivered here by the doorbells (no claim call, no read after it when the
    /// trigger sent what the worker needs).
    pub claimed_delivered: u64,
    /// Runs whose read ahead of their claim was sent, named by another process's doorbell
    /// while a workloop here waited idle (the read overlaps the claim it causes).
    pub read_ahead: u64,
    /// Claimed runs this process started from such a read, or from what another process's
    /// trigger sent with a delivered lease (no read after the claim).
    pub read_ahead_used: u64,
    /// Claims per latency bucket (cumulative counts are built by the exporter):
    /// `start_latency_counts[i]` counts latencies ≤ `START_LATENCY_BUCKETS_MS[i]` and above the
    /// previous bound; the last entry counts those above every bound.
    pub start_latency_counts: Vec<u64>,
    /// Sum of the claim latencies, in ms.
    pub start_latency_sum_ms: u64,
    /// Retries scheduled (a failed or crashed attempt with attempts left).
    pub retries: u64,
    /// Runs that expired (TTL) before any lease.
    pub expired: u64,
    /// Leases that lapsed (the worker died or stopped heartbeating).
    pub lease_losses: u64,
    /// Attempts that ran past their max duration.
    pub timed_out: u64,
    /// Schedule ticks this process fired (each made a new `scheduled` run; a tick another
    /// process fired first is not counted).
    pub schedule_ticks_fired: u64,
    /// Schedule ticks skipped because their trigger was refused (e.g. a full queue).
    pub schedule_ticks_refused: u64,
}

/// How many copies of the counters are kept, cache lines apart. Threads get them in turn at
/// their first bump (the eighth thread after one shares its copy), so the runtime's worker
/// threads write lines of their own: with one shared copy, the counters' lines moved between
/// the cores at every claim and trigger. A snapshot sums the copies; a lane's last claim is
/// the latest any copy holds.
const STRIPES: usize = 8;

thread_local! {
    /// This thread's copy of the counters, picked at its first bump.
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

/// The live counters.
pub(crate) struct Counters {
    stripes: [Stripe; STRIPES],
}

/// One copy of the counters (see [`STRIPES`]).
#[repr(align(128))]
struct Stripe {
    triggered: AtomicU64,
    triggered_ready: AtomicU64,
    idempotent_hits: AtomicU64,
    claimed: AtomicU64,
    latency: [AtomicU64; START_LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_ms: AtomicU64,
    retries: AtomicU64,
    expired: AtomicU64,
    lease_losses: AtomicU64,
    timed_out: AtomicU64,
    schedule_fired: AtomicU64,
    schedule_refused: AtomicU64,
    claimed_on_enqueue: AtomicU64,
    claimed_delivered: AtomicU64,
    read_ahead: AtomicU64,
    /// By name in a B-tree: a claim updates it per lease (a few lanes: no hashing).
    last_claim: Mutex<BTreeMap<LaneName, Timestamp>>,
}

impl Stripe {
    fn new() -> Self {
        Stripe {
            triggered: AtomicU64::new(0),
            triggered_ready: AtomicU64::new(0),
            idempotent_hits: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ms: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            lease_losses: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            schedule_fired: AtomicU64::new(0),
            schedule_refused: AtomicU64::new(0),
            claimed_on_enqueue: AtomicU64::new(0),
            claimed_delivered: AtomicU64::new(0),
            read_ahead: AtomicU64::new(0),
            last_claim: Mutex::new(BTreeMap::new()),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            stripes: std::array::from_fn(|_| Stripe::new()),
        }
    }

    /// The calling thread's copy.
    fn mine(&self) -> &Stripe {
        &self.stripes[STRIPE.with(|i| *i)]
    }

    /// A counter summed over the copies.
    fn sum(&self, c: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|s| c(s).load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn triggered(&self, ready: bool) {
        bump(&self.mine().triggered, 1);
        if ready {
            bump(&self.mine().triggered_ready, 1);
        }
    }

    pub(crate) fn idempotent_hit(&self) {
        bump(&self.mine().idempotent_hits, 1);
    }

    /// A schedule tick fired by this process (a new run).
    pub(crate) fn schedule_fired(&self) {
        bump(&self.mine().schedule_fired, 1);
    }

    /// Leases granted inside a trigger's enqueue (claim on enqueue).
    pub(crate) fn claimed_on_enqueue(&self, leases: usize) {
        bump(&self.mine().claimed_on_enqueue, leases as u64);
    }

    /// Leases delivered for a parked offer.
    pub(crate) fn claimed_delivered(&self, leases: usize) {
        bump(&self.mine().claimed_delivered, leases as u64);
    }

    /// Runs read ahead of their claim (a doorbell's hint).
    pub(crate) fn read_ahead(&self, runs: usize) {
        bump(&self.mine().read_ahead, runs as u64);
    }

    /// A schedule tick whose trigger was refused.
    pub(crate) fn schedule_refused(&self) {
        bump(&self.mine().schedule_refused, 1);
    }

    /// Leases granted at `now`: each first attempt's latency from when it was due.
    pub(crate) fn claimed(&self, leases: &[Leased], now: Timestamp) {
        let mine = self.mine();
        bump(&mine.claimed, leases.len() as u64);
        if !leases.is_empty() {
            let mut last = mine.last_claim.lock().unwrap_or_else(|p| p.into_inner());
            for lease in leases {
                // The lane is almost always known already: update in place, no name clone. The
                // latest instant, not the last write: threads sharing a copy may write late.
                match last.get_mut(&lease.dispatch.lane) {
                    Some(at) => *at = (*at).max(now),
                    None => {
                        last.insert(lease.dispatch.lane.clone(), now);
                    }
                }
            }
        }
        for lease in leases.iter().filter(|l| l.dispatch.attempt == 1) {
            let ms = now
                .as_millis()
                .saturating_sub(lease.dispatch.run_after.as_millis());
            let bucket = START_LATENCY_BUCKETS_MS
                .iter()
                .position(|b| ms <= *b)
                .unwrap_or(START_LATENCY_BUCKETS_MS.len());
            bump(&mine.latency[bucket], 1);
            bump(&mine.latency_sum_ms, ms);
        }
    }

    pub(crate) fn retried(&self) {
        bump(&self.mine().retries, 1);
    }

    pub(crate) fn expired(&self) {
        bump(&self.mine().expired, 1);
    }

    pub(crate) fn lease_lost(&self) {
        bump(&self.mine().lease_losses, 1);
    }

    pub(crate) fn timed_out(&self) {
        bump(&self.mine().timed_out, 1);
    }

    /// When each lane last had a run claimed (this process).
    pub(crate) fn last_claims(&self) -> HashMap<LaneName, Timestamp> {
        let mut out = HashMap::new();
        for stripe in &self.stripes {
            let last = stripe.last_claim.lock().unwrap_or_else(|p| p.into_inner());
            for (lane, at) in last.iter() {
                let latest = out.entry(lane.clone()).or_insert(*at);
                *latest = (*latest).max(*at);
            }
        }
        out
    }

    pub(crate) fn snapshot(&self) -> EngineMetrics {
        EngineMetrics {
            triggered: self.sum(|s| &s.triggered),
            triggered_ready: self.sum(|s| &s.triggered_ready),
            idempotent_hits: self.sum(|s| &s.idempotent_hits),
            claimed: self.sum(|s| &s.claimed),
            claimed_on_enqueue: self.sum(|s| &s.claimed_on_enqueue),
            claimed_delivered: self.sum(|s| &s.claimed_delivered),
            read_ahead: self.sum(|s| &s.read_ahead),
            // Counted by the hand-over (see `Engine::metrics`).
            read_ahead_used: 0,
            start_latency_counts: (0..=START_LATENCY_BUCKETS_MS.len())
                .map(|i| self.sum(|s| &s.latency[i]))
                .collect(),
            start_latency_sum_ms: self.sum(|s| &s.latency_sum_ms),
            retries: self.sum(|s| &s.retries),
            expired: self.sum(|s| &s.expired),
            lease_losses: self.sum(|s| &s.lease_losses),
            timed_out: self.sum(|s| &s.timed_out),
            schedule_ticks_fired: self.sum(|s| &s.schedule_fired),
            schedule_ticks_refused: self.sum(|s| &s.schedule_refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::backend::Dispatch;
    use runlane_core::{EnvName, FencingToken, QueueName, RunId};

    fn leased(lane: &str, due: Timestamp) -> Leased {
        let lane = LaneName::new(lane).expect("lane");
        let env = EnvName::new("e").expect("env");
        let queue = QueueName::new("q").expect("queue");
        Leased {
            dispatch: Dispatch::first_attempt(RunId(1), env, queue, lane, due),
            token: FencingToken(1),
            lease_deadline: due,
            attempt_deadline: None,
        }
    }

    #[test]
    fn counts_bumped_on_many_threads_are_read_as_one_sum() {
        let counters = Counters::new();
        let t0 = Timestamp(1_000_000);
        std::thread::scope(|s| {
            for i in 0..12u64 {
                let counters = &counters;
                s.spawn(move || {
                    for _ in 0..1_000 {
                        counters.triggered(i % 2 == 0);
                    }
                    // Each thread claims on lane "a" at its own instant, 3 ms after the run
                    // was due; lane "b" only on thread 5.
                    let at = t0.saturating_add(std::time::Duration::from_millis(i + 3));
                    counters.claimed(
                        &[leased(
                            "a",
                            at.saturating_sub(std::time::Duration::from_millis(3)),
                        )],
                        at,
                    );
                    if i == 5 {
                        counters.claimed(&[leased("b", t0)], t0);
                    }
                });
            }
        });
        let m = counters.snapshot();
        assert_eq!(m.triggered, 12_000);
        assert_eq!(m.triggered_ready, 6_000);
        assert_eq!(m.claimed, 13);
        assert_eq!(m.start_latency_sum_ms, 12 * 3);
        // 3 ms is in the third bucket (≤ 5 ms); the lane "b" claim in the first (0 ms).
        assert_eq!(m.start_latency_counts[2], 12);
        assert_eq!(m.start_latency_counts[0], 1);
        assert_eq!(m.start_latency_counts.iter().sum::<u64>(), 13);
        let last = counters.last_claims();
        assert_eq!(
            last.get(&LaneName::new("a").expect("lane")),
            Some(&t0.saturating_add(std::time::Duration::from_millis(14))),
            "the latest claim of a lane, whichever thread made it"
        );
        assert_eq!(last.get(&LaneName::new("b").expect("lane")), Some(&t0));
    }
}
