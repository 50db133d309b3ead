//! Counters the engine keeps for `/metrics`: triggers (and how many took the fast path),
//! idempotency hits, claims with the due → claimed latency, retries, expirations, lease
//! losses and timeouts. Plain atomics, bumped on paths that already did the work; reading them
//! costs nothing on the hot path.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The live counters.
pub(crate) struct Counters {
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

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
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

    pub(crate) fn triggered(&self, ready: bool) {
        bump(&self.triggered, 1);
        if ready {
            bump(&self.triggered_ready, 1);
        }
    }

    pub(crate) fn idempotent_hit(&self) {
        bump(&self.idempotent_hits, 1);
    }

    /// A schedule tick fired by this process (a new run).
    pub(crate) fn schedule_fired(&self) {
        bump(&self.schedule_fired, 1);
    }

    /// Leases granted inside a trigger's enqueue (claim on enqueue).
    pub(crate) fn claimed_on_enqueue(&self, leases: usize) {
        bump(&self.claimed_on_enqueue, leases as u64);
    }

    /// Leases delivered for a parked offer.
    pub(crate) fn claimed_delivered(&self, leases: usize) {
        bump(&self.claimed_delivered, leases as u64);
    }

    /// Runs read ahead of their claim (a doorbell's hint).
    pub(crate) fn read_ahead(&self, runs: usize) {
        bump(&self.read_ahead, runs as u64);
    }

    /// A schedule tick whose trigger was refused.
    pub(crate) fn schedule_refused(&self) {
        bump(&self.schedule_refused, 1);
    }

    /// Leases granted at `now`: each first attempt's latency from when it was due.
    pub(crate) fn claimed(&self, leases: &[Leased], now: Timestamp) {
        bump(&self.claimed, leases.len() as u64);
        if !leases.is_empty() {
            let mut last = self.last_claim.lock().unwrap_or_else(|p| p.into_inner());
            for lease in leases {
                // The lane is almost always known already: update in place, no name clone.
                match last.get_mut(&lease.dispatch.lane) {
                    Some(at) => *at = now,
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
            bump(&self.latency[bucket], 1);
            bump(&self.latency_sum_ms, ms);
        }
    }

    pub(crate) fn retried(&self) {
        bump(&self.retries, 1);
    }

    pub(crate) fn expired(&self) {
        bump(&self.expired, 1);
    }

    pub(crate) fn lease_lost(&self) {
        bump(&self.lease_losses, 1);
    }

    pub(crate) fn timed_out(&self) {
        bump(&self.timed_out, 1);
    }

    /// When each lane last had a run claimed (this process).
    pub(crate) fn last_claims(&self) -> HashMap<LaneName, Timestamp> {
        self.last_claim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(lane, at)| (lane.clone(), *at))
            .collect()
    }

    pub(crate) fn snapshot(&self) -> EngineMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineMetrics {
            triggered: get(&self.triggered),
            triggered_ready: get(&self.triggered_ready),
            idempotent_hits: get(&self.idempotent_hits),
            claimed: get(&self.claimed),
            claimed_on_enqueue: get(&self.claimed_on_enqueue),
            claimed_delivered: get(&self.claimed_delivered),
            read_ahead: get(&self.read_ahead),
            // Counted by the hand-over (see `Engine::metrics`).
            read_ahead_used: 0,
            start_latency_counts: self.latency.iter().map(get).collect(),
            start_latency_sum_ms: get(&self.latency_sum_ms),
            retries: get(&self.retries),
            expired: get(&self.expired),
            lease_losses: get(&self.lease_losses),
            timed_out: get(&self.timed_out),
            schedule_ticks_fired: get(&self.schedule_fired),
            schedule_ticks_refused: get(&self.schedule_refused),
        }
    }
}
