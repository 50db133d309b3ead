//! The two seams every shape plugs into: a [`QueueBackend`] (dispatch state: queues, lanes,
//! slots, leases, deadlines) and a [`RunStore`] (durable run records, attempts, idempotency
//! keys, envs and versions).
//!
//! The engine orders calls store first, queue second (SPEC §7). Each queue-backend method is one
//! atomic step: a release admits the next due runs from every queue key blocked on a scope it
//! freed, in the same step; a claim takes runs out of their lane and grants leases in the same
//! step. Methods return [`Effects`] so the engine can ring lane doorbells, publish run events and
//! re-arm its timer without polling.

pub mod forward;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::chain::ClaimChain;
use crate::error::{QueueError, StoreError};
use crate::id::{FencingToken, RunId, WorkerId};
use crate::lane::LaneName;
use crate::name::{EnvName, QueueName, TaskName};
use crate::retry::RetryPolicy;
use crate::run::{RunStatus, TriggerSource};
use crate::settings::{EnvSettings, QueueSettings, VersionDef};
use crate::time::Timestamp;

/// The dispatch facts of one run: everything a queue backend needs, no payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The run.
    pub run_id: RunId,
    /// Its env.
    pub env: EnvName,
    /// Its queue.
    pub queue: QueueName,
    /// Its concurrency key (empty when none was given).
    pub key: Arc<str>,
    /// The lane it becomes ready in.
    pub lane: LaneName,
    /// Makes it look this much older within its queue key.
    pub priority: Duration,
    /// When it becomes due.
    pub run_after: Timestamp,
    /// When it expires if it never held a lease.
    pub ttl_deadline: Option<Timestamp>,
    /// The attempt it is waiting for (1-based).
    pub attempt: u32,
    /// The version it is locked to, when locked.
    pub locked_version: Option<u32>,
    /// Whether it ever held a lease (it then never expires).
    pub ever_leased: bool,
    /// Attempts running longer are aborted.
    pub max_duration: Option<Duration>,
}

impl Dispatch {
    /// The first attempt of a run due at `run_after`, with no key, priority, TTL, version lock
    /// or duration limit: what a backend's tests (and a plain trigger) enqueue. Set the other
    /// fields on the result when they matter.
    pub fn first_attempt(
        run_id: RunId,
        env: EnvName,
        queue: QueueName,
        lane: LaneName,
        run_after: Timestamp,
    ) -> Dispatch {
        Dispatch {
            run_id,
            env,
            queue,
            key: Arc::from(""),
            lane,
            priority: Duration::ZERO,
            run_after,
            ttl_deadline: None,
            attempt: 1,
            locked_version: None,
            ever_leased: false,
            max_duration: None,
        }
    }
}

/// Why a run is enqueued, which decides what the queue backend may refuse. Each caller of
/// [`QueueBackend::enqueue`] says it: the cap on waiting runs (`max_queued`) limits the new work
/// a trigger offers, never runs already accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnqueueAs {
    /// New work a trigger offers: refused with [`QueueError::QueueFull`] when it would wait and
    /// its queue key already holds `max_queued` waiting runs (nothing changes then).
    Trigger,
    /// A sync trigger: as [`Trigger`](Self::Trigger), and a due fast-lane run that does not fit
    /// is refused with [`QueueError::FastLaneFull`] instead of queued.
    SyncTrigger,
    /// A run already accepted (stored, its id answered or recorded) returning to the queue:
    /// recovery at open, a reconciler's enqueue of a committed run, a rebuild of a lost queue.
    /// `max_queued` is not applied (as for a retry) and nothing is refused for the fast lane:
    /// a refusal would leave an accepted run in the store, never run.
    Accepted,
}

impl EnqueueAs {
    /// The trigger kind of a call with a `sync` flag.
    pub fn trigger(sync: bool) -> EnqueueAs {
        if sync {
            EnqueueAs::SyncTrigger
        } else {
            EnqueueAs::Trigger
        }
    }

    /// Whether the queue key's `max_queued` applies (new work only).
    pub fn capped(self) -> bool {
        !matches!(self, EnqueueAs::Accepted)
    }

    /// Whether a due fast-lane run that does not fit is refused (`FastLaneFull`).
    pub fn sync(self) -> bool {
        matches!(self, EnqueueAs::SyncTrigger)
    }
}

/// What a mutating call changed, for the engine to act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Runs that moved, with their new status, in order.
    pub moved: Vec<(RunId, RunStatus)>,
    /// Lanes that received ready runs: their idle consumers must be woken.
    pub ready_lanes: Vec<LaneName>,
    /// The earliest deadline the backend holds after the call (re-arm the timer if earlier).
    pub deadline: Option<Timestamp>,
}

impl Effects {
    /// Appends `other`, keeping the earliest deadline.
    pub fn merge(&mut self, other: Effects) {
        self.moved.extend(other.moved);
        for lane in other.ready_lanes {
            if !self.ready_lanes.contains(&lane) {
                self.ready_lanes.push(lane);
            }
        }
        self.deadline = match (self.deadline, other.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Splits the effects of one call that served many callers, one part per `(run, lane)` of
    /// `runs` (in order): each part holds its run's moves, its lane when that lane was made
    /// ready, and the deadline; the first part also holds the moves of runs outside `runs` and
    /// every ready lane. Nothing is lost or repeated: the parts' moves are the whole's.
    pub fn split(self, runs: &[(RunId, &LaneName)]) -> Vec<Effects> {
        let mut parts: Vec<Effects> = runs
            .iter()
            .map(|(_, lane)| Effects {
                moved: Vec::new(),
                ready_lanes: if self.ready_lanes.contains(lane) {
                    vec![(*lane).clone()]
                } else {
                    Vec::new()
                },
                deadline: self.deadline,
            })
            .collect();
        let Some(first) = parts.first_mut() else {
            return parts;
        };
        first.ready_lanes = self.ready_lanes;
        let index: HashMap<RunId, usize> = runs
            .iter()
            .enumerate()
            .rev()
            .map(|(i, (run, _))| (*run, i))
            .collect();
        for (run, status) in self.moved {
            let i = index.get(&run).copied().unwrap_or(0);
            parts[i].moved.push((run, status));
        }
        parts
    }
}

/// Where an enqueued run landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Waiting for `run_after`.
    Delayed,
    /// Waiting in its queue for admission.
    Queued,
    /// Admitted straight into its lane (the fast path, or a queue that was empty and open).
    Ready,
}

/// The answer to an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// Where the run landed.
    pub placement: Placement,
    /// Other changes (none for a plain enqueue; the ready lane for a fast-pathed run).
    pub effects: Effects,
}

/// An env a worker serves and the version it serves there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServedEnv {
    /// The env.
    pub env: EnvName,
    /// The version the worker runs; only runs locked to it, or unlocked, are claimed.
    pub version: u32,
}

/// A claim for up to `max` runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Who claims.
    pub worker: WorkerId,
    /// Which lanes, in which order.
    pub chain: ClaimChain,
    /// At most this many runs (the workloop's free slots).
    pub max: u32,
    /// The envs served, fairness among them weighted by env weight.
    pub envs: Vec<ServedEnv>,
    /// How long the lease lasts without a heartbeat.
    pub lease: Duration,
}

/// A run granted to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leased {
    /// The run's dispatch facts (`attempt` is the attempt now running).
    pub dispatch: Dispatch,
    /// The fencing token every later call about this run must carry.
    pub token: FencingToken,
    /// The lease lapses at this instant unless extended.
    pub lease_deadline: Timestamp,
    /// The attempt is aborted at this instant (max duration), when set.
    pub attempt_deadline: Option<Timestamp>,
}

/// What a heartbeat learned about one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Extended.
    Alive,
    /// Extended, but the run was cancelled: fire the handler's token.
    CancelRequested,
    /// The token is stale or the lease lapsed: stop working on it.
    Lost,
}

/// The answer to a cancel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The run was waiting and is gone from every structure (slots released).
    Removed {
        /// Its status before the cancel.
        was: RunStatus,
        /// Admissions caused by the released slots.
        effects: Effects,
    },
    /// The run is executing: its handler must stop; it ends `canceled` at `grace_deadline`
    /// unless it completes first.
    Requested {
        /// The lease whose handler must be told.
        token: FencingToken,
        /// When the run ends `canceled`.
        grace_deadline: Timestamp,
        /// Whether this call made the request (false when it was already requested).
        first: bool,
    },
    /// The backend does not hold the run.
    NotFound,
}

/// A lease that lapsed: its slots are released and the run waits, held, for the engine to
/// apply the retry policy with [`QueueBackend::retry`] or end it with [`QueueBackend::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapsed {
    /// The run's dispatch facts.
    pub dispatch: Dispatch,
    /// The lapsed lease's token (still accepted by `retry`/`finish`, refused by everything else).
    pub token: FencingToken,
}

/// Everything a timer wake-up did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Promotions and admissions (delayed runs that came due, runs re-admitted after releases).
    pub effects: Effects,
    /// Runs that expired, removed from every structure with their slots released.
    pub expired: Vec<Dispatch>,
    /// Leases that lapsed. A lease stays reported until the engine ends it: each report moves
    /// its deadline one lease duration on, and a lapsed lease still held then is reported
    /// again (the process that heard the report may have died before acting on it). The
    /// same holds for `timed_out` and `cancel_elapsed`.
    pub lapsed: Vec<Lapsed>,
    /// Leases whose attempt passed its max duration (still leased; the engine aborts them).
    /// Reported again one lease duration later while the lease is live.
    pub timed_out: Vec<(RunId, FencingToken)>,
    /// Cancelled executing runs whose grace period ended (still leased; the engine ends them).
    /// Reported again one lease duration later while the lease is live.
    pub cancel_elapsed: Vec<(RunId, FencingToken)>,
    /// Ready runs returned to their queue because their lane had no consumer (`ready_timeout`).
    pub ready_returned: Vec<RunId>,
}

/// A run as the queue backend sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRun {
    /// The run's dispatch facts.
    pub dispatch: Dispatch,
    /// Delayed, queued, ready or executing.
    pub status: RunStatus,
    /// The current lease, when executing.
    pub lease: Option<LeaseInfo>,
}

/// A lease as the backend holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The token.
    pub token: FencingToken,
    /// The holder.
    pub worker: WorkerId,
    /// When it lapses.
    pub deadline: Timestamp,
    /// When a cancel was requested, if it was.
    pub cancel_requested_at: Option<Timestamp>,
    /// Whether it already lapsed (held for recovery).
    pub lapsed: bool,
}

/// A lane and its depth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneInfo {
    /// The lane.
    pub name: LaneName,
    /// Ready runs waiting in it.
    pub ready: u64,
    /// Registered consumers whose chain covers it.
    pub consumers: u32,
    /// When it lost its last consumer while holding ready runs (an orphan lane).
    pub orphan_since: Option<Timestamp>,
}

/// A queue with its depth, running count and settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    /// The env.
    pub env: EnvName,
    /// The queue.
    pub name: QueueName,
    /// Delayed runs.
    pub delayed: u64,
    /// Queued runs.
    pub queued: u64,
    /// Runs holding slots (ready + executing).
    pub running: u64,
    /// Its settings.
    pub settings: QueueSettings,
}

/// Slot counters of one env, for invariant checks and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvUsage {
    /// Ordinary runs holding slots.
    pub running: u32,
    /// Fast-lane runs holding slots.
    pub fast_lane_running: u32,
}

/// An id of a registered consumer (an idle or claiming workloop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// An idle workloop's offer parked in the queue ([`QueueBackend::parks_offers`]): the
/// workloop's consumer id and the offer's sequence number (new for each offer it parks).
pub type ParkedOffer = (ConsumerId, u64);

/// What a workloop's claim does with its parked offers ([`QueueBackend::claim_parking`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferSteps {
    /// The workloop.
    pub consumer: ConsumerId,
    /// The offer it parked last, to take back first, and whether that offer's delivery was
    /// heard (its leases are then not answered again).
    pub withdraw: Option<(u64, bool)>,
    /// An offer to park (its seq, and the instant it stops being taken) when the claim leases
    /// nothing.
    pub park: Option<(u64, Timestamp)>,
}

/// The dispatch state: queues, lanes, slots, leases and deadlines. Every method is one atomic
/// step; `now` always comes from the engine's clock.
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Creates or updates an env. Raising a limit admits as many waiting runs as now fit.
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// Sets a queue's settings (creating it). Raising a limit or resuming admits at once.
    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// A queue's settings (defaults for a queue never seen).
    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError>;
    /// Adds a lane (idempotent).
    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError>;
    /// Whether a lane exists.
    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError>;
    /// Lanes with their depth and consumers.
    async fn lanes(&self, now: Timestamp) -> Result<Vec<LaneInfo>, QueueError>;
    /// Queues of an env with depth and running counts.
    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError>;
    /// Slot counters of an env.
    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError>;

    /// Stores a run's dispatch facts, deciding the fast path in the same step. Idempotent by
    /// run id. `why` says what may be refused (see [`EnqueueAs`]): a trigger over its queue
    /// key's `max_queued` gets `QueueFull`, a sync trigger whose fast-lane run does not fit
    /// gets `FastLaneFull`; a run already accepted is never refused for either.
    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError>;
    /// Takes up to `max` runs out of the chain's lanes and leases them, in one step.
    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError>;
    /// Extends the given leases to `now` + their lease duration; answers per lease. A lease is
    /// never shortened: a heartbeat that ran late (a client that held the call through a
    /// reconnect runs it with the `now` it was issued at) leaves a later deadline as it is.
    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError>;
    /// `Ok` when `token` is the run's live (not lapsed) lease.
    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError>;
    /// Ends a leased run: releases its slots and admits what they unblock.
    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// A failed attempt with attempts left: releases slots and re-enqueues attempt + 1 at
    /// `run_after`, in one step.
    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// Drain on stop: back to its queue with the same attempt, slots released. A run whose
    /// cancel was requested is refused with [`QueueError::CancelRequested`] and nothing changes
    /// (the engine then ends it `canceled`): a cancel survives a release.
    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// Cancels a run: a waiting run is removed at once; an executing run is marked.
    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError>;
    /// Moves a delayed or queued run to a new `run_after` and TTL deadline.
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;
    /// Does everything due at `now`: promotions, expiries, lapsed leases, timeouts, grace ends,
    /// ready timeouts.
    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError>;
    /// The earliest instant `tick` has work.
    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError>;
    /// The run as the backend holds it.
    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError>;
    /// Every run the backend holds (tests, rebuild checks).
    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError>;
    /// Registers a consumer of the chain's lanes (for `ready_timeout` and health).
    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError>;
    /// Removes a consumer; lanes it leaves without consumers start their orphan clock.
    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError>;

    /// Enqueues a run and, in the same step, makes `claim` for an idle worker of this process:
    /// the leases are exactly those `claim` called right after the enqueue would have taken
    /// (the run just placed, or older ready runs before it), and are answered with the
    /// enqueue's outcome. Saves a shared backend the round trip of the claim the enqueue's
    /// doorbell would cause. The default enqueues only (no leases); a backend that may claim
    /// here says so with [`claims_on_enqueue`](Self::claims_on_enqueue).
    async fn enqueue_claiming(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        claim: &ClaimRequest,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let _ = claim;
        Ok((self.enqueue(dispatch, why, now).await?, Vec::new()))
    }
    /// [`enqueue`](Self::enqueue), or [`enqueue_claiming`](Self::enqueue_claiming) with
    /// `carried`'s claim, for a backend that also lets workloops of other processes lease in
    /// the enqueue's step ([`parks_offers`](Self::parks_offers)): `carried`'s offer, when
    /// parked too, is taken with the claim (or the claim is not made if another process's
    /// enqueue took it first). With `handed`, parked offers lease what the enqueue leaves
    /// ready, and `handed` (what a worker needs of the run, opaque here; empty when not sent)
    /// goes with a lease of the run, so its worker need not read it; without, none is taken.
    /// The default ignores both.
    async fn enqueue_handing(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        carried: Option<(&ClaimRequest, Option<ParkedOffer>)>,
        handed: Option<&[u8]>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let _ = handed;
        match carried {
            Some((claim, _)) => self.enqueue_claiming(dispatch, why, now, claim).await,
            None => Ok((self.enqueue(dispatch, why, now).await?, Vec::new())),
        }
    }
    /// Whether an idle workloop's offer can be parked in the queue for other processes'
    /// enqueues ([`claim_parking`](Self::claim_parking)); their leases reach the workloop
    /// through the backend's cross-process doorbells. `false`, the default.
    fn parks_offers(&self) -> bool {
        false
    }
    /// Whether what other processes' enqueues lease for this process's parked offers is
    /// heard now (its doorbell readers still run). A workloop parks only while it is, asking
    /// before every claim: once it is not, the next claim takes the last offer back, and the
    /// idle workloop, deaf to other processes, claims again at each offer refresh as well as
    /// when its own process's bells ring. `true`, the default.
    fn hears_deliveries(&self) -> bool {
        true
    }
    /// [`claim`](Self::claim) with `steps` on the workloop's parked offer: the offer parked
    /// for it is taken back first, whatever its seq (the leases an enqueue made for it that the
    /// workloop did not hear of, still held and not lapsed, come first in the answer, even past
    /// `max`: they used slots the workloop held for the offer; `max` then bounds the rest), and
    /// when nothing is leased an offer of `request` is parked until the given instant. The
    /// default only claims.
    async fn claim_parking(
        &self,
        request: &ClaimRequest,
        steps: &OfferSteps,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let _ = steps;
        self.claim(request, now).await
    }
    /// Whether [`enqueue_claiming`](Self::enqueue_claiming) may claim (the engine offers
    /// its idle workloops' free slots to triggers only then). `false`, the default.
    fn claims_on_enqueue(&self) -> bool {
        false
    }
    /// Whether an [`enqueue_claiming`](Self::enqueue_claiming) started now would claim (a
    /// hint, read just before the call): a backend that batches concurrent enqueues answers
    /// `false` while others are in flight, so an idle worker's slots are not held by a trigger
    /// waiting for its batch. Defaults to [`claims_on_enqueue`](Self::claims_on_enqueue).
    fn claims_on_enqueue_now(&self) -> bool {
        self.claims_on_enqueue()
    }
    /// Whether concurrent [`enqueue`](Self::enqueue) calls share work (one round trip for
    /// many, taken in the order the calls were made): then a batch trigger's runs are enqueued
    /// together instead of one after another. Defaults to `false` (an in-memory queue gains
    /// nothing from it).
    fn combines_enqueues(&self) -> bool {
        false
    }

    /// Whether every lease of this backend is taken in this process (an in-memory queue).
    /// The engine then keeps the payloads of the runs it triggers until their first claim and
    /// hands them to its workers with the lease, instead of reading each run back from the
    /// store. A shared backend (other processes claim) answers `false`, the default.
    fn claims_in_process(&self) -> bool {
        false
    }

    /// Checks many leases, as [`QueueBackend::check_lease`] does one by one, answering per
    /// lease in order. A backend may do it in one step (one round trip); the default calls
    /// `check_lease` for each. `Err` means the whole call failed (as if each check had).
    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let mut answers = Vec::with_capacity(leases.len());
        for &(run, token) in leases {
            answers.push(self.check_lease(run, token).await);
        }
        Ok(answers)
    }

    /// Whether the engine keeps the task and payload of the runs it triggers for its own
    /// workers' first claims (instead of reading each claimed run back from the store). The
    /// default is [`QueueBackend::claims_in_process`]; a shared backend may answer `true` when
    /// its processes mostly work the runs they trigger: entries of runs another process
    /// claimed are then dropped whenever the engine's hand-over is full.
    fn hands_over(&self) -> bool {
        self.claims_in_process()
    }

    /// [`QueueBackend::live`] of a run whose dispatch facts the caller holds (the engine reads
    /// them from the run's store record). A backend may use the facts to find a waiting run
    /// without an index by run id: Redis (key-space format 3) keeps a due run enqueued in order
    /// only as its queue key's list entry, found from its env, queue, key and score. The facts
    /// must be those the run was enqueued (or last rescheduled) with. The default calls `live`.
    async fn live_of(&self, dispatch: &Dispatch) -> Result<Option<LiveRun>, QueueError> {
        self.live(dispatch.run_id).await
    }

    /// [`QueueBackend::live`] for a caller that only needs a run some structure holds by id: a
    /// run that moved in the last call's effects (other than a fresh enqueue's own run) or holds
    /// a lease. A backend may answer `None` for a waiting run it could only find from its
    /// dispatch facts or by reading every queue (Redis: a list-resident run). The default calls
    /// `live`.
    async fn live_indexed(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.live(run).await
    }

    /// [`QueueBackend::cancel`] of a run whose dispatch facts the caller holds (see
    /// [`QueueBackend::live_of`]). The default calls `cancel`.
    async fn cancel_of(
        &self,
        dispatch: &Dispatch,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        self.cancel(dispatch.run_id, grace, now).await
    }

    /// [`QueueBackend::reschedule`] of a run whose dispatch facts the caller holds (see
    /// [`QueueBackend::live_of`]). The default calls `reschedule`.
    async fn reschedule_of(
        &self,
        dispatch: &Dispatch,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.reschedule(dispatch.run_id, run_after, ttl_deadline, now)
            .await
    }

    /// Ends a leased run as [`finish`](Self::finish) does, then claims for `next` as
    /// [`claim`](Self::claim) does at the same `now`: a worker slot's turn from one run to the
    /// next. The outer error is the finish's, and then nothing was claimed; the inner result
    /// is the claim's (the finish stands either way). A backend may take both in one step (the
    /// memory queue: one lock instead of two); the default calls `finish`, then `claim`.
    async fn finish_then_claim(
        &self,
        run: RunId,
        token: FencingToken,
        next: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Effects, Result<Vec<Leased>, QueueError>), QueueError> {
        let effects = self.finish(run, token, now).await?;
        Ok((effects, self.claim(next, now).await))
    }

    /// A run's whole end in one step, for a queue that leases in process: checks `token` as
    /// [`check_lease`](Self::check_lease) does (a refusal is the `Err`, and `write` is not
    /// called), then calls `write` (the caller's terminal write to its store, which answers at
    /// once) while nothing can lapse, end or recover the lease, then, when `write` answers
    /// `true`, ends the run as [`finish`](Self::finish) does and claims for `next`, if given,
    /// as [`finish_then_claim`](Self::finish_then_claim) does. The store first, the queue
    /// second, as each of those steps alone (SPEC §7), with no gap between the check and the
    /// write. `None` (the default): the backend cannot (its steps take a round trip each);
    /// `write` was not called and the caller takes the steps one by one. An `Err` means the
    /// same: `write` was not called (a caller may take `Unavailable` as "the lease could not
    /// be checked" and fall back to the steps). `write` runs under the backend's own
    /// exclusion: it must not block or call the backend again.
    fn end_fenced(
        &self,
        run: RunId,
        token: FencingToken,
        next: Option<&ClaimRequest>,
        now: Timestamp,
        write: &mut dyn FnMut() -> bool,
    ) -> Option<Result<FencedEnd, QueueError>> {
        let _ = (run, token, next, now, write);
        None
    }

    /// Ends many leased runs, as [`QueueBackend::finish`] does one by one, answering per run.
    /// A backend may do it in one step (one lock, one round trip); the default calls `finish`
    /// for each, in order. The effects of all of them are merged into the returned `Effects`.
    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        let mut answers = Vec::with_capacity(runs.len());
        let mut effects = Effects::default();
        for &(run, token) in runs {
            match self.finish(run, token, now).await {
                Ok(fx) => {
                    effects.merge(fx);
                    answers.push(Ok(()));
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        Ok((answers, effects))
    }
}

/// An ack's effects, and the leases of the claim made with it (`None` when no claim was asked
/// for).
pub type AckClaim = (Effects, Option<Vec<Leased>>);

/// What [`QueueBackend::end_fenced`] did once the lease check passed.
#[derive(Debug)]
pub struct FencedEnd {
    /// The ack, when the write asked for one. `Err`: the finish failed, nothing was claimed.
    pub acked: Option<Result<AckClaim, QueueError>>,
}

/// One attempt of a run, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based.
    pub number: u32,
    /// How it ended: `completed`, `failed`, `crashed`, `timed_out`, `canceled`, `no_handler`.
    pub outcome: String,
    /// The error text, when it failed.
    pub error: Option<String>,
    /// When it ended.
    pub ended_at: Timestamp,
}

/// What a worker reads of a claimed run before it starts it ([`RunStore::get_to_start`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ToStart {
    /// Its status (terminal: it ended while it waited in the queue).
    pub status: RunStatus,
    /// Whether a cancel was requested (the run then ends `canceled` without running).
    pub cancel_requested: bool,
    /// Its task.
    pub task: TaskName,
    /// Its payload.
    pub payload: Arc<str>,
    /// Its retry policy.
    pub retry: RetryPolicy,
}

impl From<&RunRecord> for ToStart {
    fn from(r: &RunRecord) -> Self {
        ToStart {
            status: r.status,
            cancel_requested: r.cancel_requested_at.is_some(),
            task: r.task.clone(),
            payload: r.payload.clone(),
            retry: r.retry,
        }
    }
}

/// A run's durable record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run.
    pub id: RunId,
    /// Its env.
    pub env: EnvName,
    /// Its task.
    pub task: TaskName,
    /// The version whose definition it took (0 = the implicit empty version).
    pub version: u32,
    /// Whether it is locked to that version.
    pub locked: bool,
    /// JSON text.
    pub payload: Arc<str>,
    /// Its queue.
    pub queue: QueueName,
    /// Its concurrency key.
    pub key: Arc<str>,
    /// Its lane.
    pub lane: LaneName,
    /// Its priority.
    #[serde(with = "crate::settings::duration_ms")]
    pub priority: Duration,
    /// When it becomes (or became) due.
    pub run_after: Timestamp,
    /// Its TTL.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub ttl: Option<Duration>,
    /// Its fixed TTL deadline.
    pub ttl_deadline: Option<Timestamp>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Its retry policy.
    pub retry: RetryPolicy,
    /// Its max duration per attempt.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub max_duration: Option<Duration>,
    /// The current (or last) attempt, 1-based.
    pub attempt: u32,
    /// The last durable status (waiting statuses are refined by the queue backend).
    pub status: RunStatus,
    /// Output JSON text when completed.
    pub output: Option<Arc<str>>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts that ended.
    pub attempts: Vec<AttemptRecord>,
    /// When it was triggered.
    pub created_at: Timestamp,
    /// When it reached its terminal state.
    pub finished_at: Option<Timestamp>,
    /// When the current attempt started, if a start was noted ([`RunStore::note_start`]).
    /// Recovery counts a `crashed` attempt for an unfinished run that has one.
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    /// When a cancel of the run was first requested ([`RunStore::request_cancel`]). Kept in the
    /// store so that a request outlives the process and the queue backend's state: recovery
    /// and every later claim end a run that carries it `canceled` instead of running it again.
    #[serde(default)]
    pub cancel_requested_at: Option<Timestamp>,
    /// What made it.
    pub source: TriggerSource,
    /// The run this one retries (manual retry).
    pub retry_of: Option<RunId>,
}

impl RunRecord {
    /// A plain run waiting in the queue named after its task: first attempt, default lane, no
    /// key, priority, delay, TTL, idempotency key or time limit, default retry policy, created
    /// and due at `now`. Stores' tests and benches build on it with struct update syntax.
    pub fn queued(id: RunId, env: EnvName, task: TaskName, payload: &str, now: Timestamp) -> Self {
        RunRecord {
            id,
            env,
            queue: QueueName::from(&task),
            task,
            version: 0,
            locked: false,
            payload: Arc::from(payload),
            key: Arc::from(""),
            lane: LaneName::default_lane(),
            priority: Duration::ZERO,
            run_after: now,
            ttl: None,
            ttl_deadline: None,
            idempotency_key: None,
            retry: RetryPolicy::default(),
            max_duration: None,
            attempt: 1,
            status: RunStatus::Queued,
            output: None,
            error: None,
            attempts: Vec::new(),
            created_at: now,
            finished_at: None,
            started_at: None,
            cancel_requested_at: None,
            source: TriggerSource::Standard,
            retry_of: None,
        }
    }

    /// The dispatch facts of its current attempt.
    pub fn dispatch(&self) -> Dispatch {
        Dispatch {
            run_id: self.id,
            env: self.env.clone(),
            queue: self.queue.clone(),
            key: self.key.clone(),
            lane: self.lane.clone(),
            priority: self.priority,
            run_after: self.run_after,
            ttl_deadline: self.ttl_deadline,
            attempt: self.attempt,
            locked_version: self.locked.then_some(self.version),
            ever_leased: !self.attempts.is_empty(),
            max_duration: self.max_duration,
        }
    }
}

/// Filters of a run listing; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunFilter {
    /// Only this env.
    pub env: Option<EnvName>,
    /// Only these durable statuses (terminal ones are exact; waiting ones are refined live).
    pub status: Option<RunStatus>,
    /// Only this task.
    pub task: Option<TaskName>,
    /// Only this queue.
    pub queue: Option<QueueName>,
    /// Only this lane.
    pub lane: Option<LaneName>,
    /// Only this source.
    pub source: Option<TriggerSource>,
    /// Only this version.
    pub version: Option<u32>,
    /// Created at or after.
    pub created_from: Option<Timestamp>,
    /// Created before.
    pub created_to: Option<Timestamp>,
    /// Only ids greater than this (cursor).
    pub after: Option<RunId>,
    /// At most this many (default 100).
    pub limit: Option<u32>,
}

/// An idempotency key to claim with a new run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// The key (scope `(env, task, key)`).
    pub key: String,
    /// When the key stops deduplicating.
    pub expires_at: Timestamp,
}

/// The answer to an insert.
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// The run was stored.
    New,
    /// The idempotency key already named a run; nothing was stored.
    Existing(Box<RunRecord>),
}

/// How long finished runs are kept, per terminal status; `None` keeps them forever.
/// SPEC §7: retention is on by default, 7 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Runs that ended `completed`.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub completed: Option<Duration>,
    /// Runs that ended `failed`.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub failed: Option<Duration>,
    /// Runs that ended `canceled`.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub canceled: Option<Duration>,
    /// Runs that ended `expired`.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub expired: Option<Duration>,
    /// Runs that ended `timed_out`.
    #[serde(with = "crate::settings::opt_duration_ms")]
    pub timed_out: Option<Duration>,
}

impl Retention {
    /// The default keep time of every terminal status.
    pub const DEFAULT_KEEP: Duration = Duration::from_secs(7 * 24 * 60 * 60);

    /// The same keep time for every terminal status.
    pub fn uniform(keep: Duration) -> Self {
        Retention {
            completed: Some(keep),
            failed: Some(keep),
            canceled: Some(keep),
            expired: Some(keep),
            timed_out: Some(keep),
        }
    }

    /// How long runs that ended in `status` are kept (`None` for waiting statuses, which are
    /// never purged, and for statuses kept forever).
    pub fn keep(&self, status: RunStatus) -> Option<Duration> {
        match status {
            RunStatus::Completed => self.completed,
            RunStatus::Failed => self.failed,
            RunStatus::Canceled => self.canceled,
            RunStatus::Expired => self.expired,
            RunStatus::TimedOut => self.timed_out,
            RunStatus::Delayed | RunStatus::Queued | RunStatus::Ready | RunStatus::Executing => {
                None
            }
        }
    }

    /// When a run that finished as `status` at `finished_at` is due for deletion.
    pub fn purge_at(&self, status: RunStatus, finished_at: Timestamp) -> Option<Timestamp> {
        self.keep(status).map(|d| finished_at.saturating_add(d))
    }

    /// The longest keep time of any status (`None` when some status is kept forever).
    pub fn longest(&self) -> Option<Duration> {
        [
            self.completed,
            self.failed,
            self.canceled,
            self.expired,
            self.timed_out,
        ]
        .into_iter()
        .try_fold(Duration::ZERO, |acc, d| d.map(|d| acc.max(d)))
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention::uniform(Self::DEFAULT_KEEP)
    }
}

/// The terminal write of an attempt the engine holds the lease of: it knows the run, its
/// attempt and how it ended, so the store needs to read nothing back.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptEnd {
    /// The run.
    pub run: RunId,
    /// Its terminal status.
    pub status: RunStatus,
    /// Output JSON text when completed.
    pub output: Option<Arc<str>>,
    /// The attempt that ended.
    pub attempt: AttemptRecord,
}

/// A registered version of an env's tasks, as [`RunStore::versions`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionInfo {
    /// Its number (1, 2, …; 0, the implicit empty version, is never listed).
    pub number: u32,
    /// When it was registered; `None` when the store does not know.
    pub created_at: Option<Timestamp>,
    /// Its task definitions, exactly as registered.
    pub def: VersionDef,
}

/// Where one schedule of a task stands: the last tick that fired (a run was triggered for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleCursor {
    /// The task.
    pub task: TaskName,
    /// The schedule's position in the task's `schedules`.
    pub index: u32,
    /// The last tick fired.
    pub last_tick: Timestamp,
}

/// Durable run records. Writes happen at state transitions only.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Stores new runs (one transaction); a live idempotency key returns its run instead.
    /// Duplicates inside one batch collapse onto the first.
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError>;
    /// Deletes a run that was never enqueued (its enqueue was refused), with its key.
    async fn remove(&self, run: RunId) -> Result<(), StoreError>;
    /// Takes back a run whose trigger was refused (its enqueue refused, or its batch failed):
    /// deletes it with its key, unless that key answered another trigger meanwhile (an
    /// idempotency hit, which handed the run's id to that trigger's caller). Answers whether
    /// the run is gone (`true` also when it was not stored); `false` means it stays, and the
    /// engine enqueues it as already accepted.
    ///
    /// The default deletes it ([`RunStore::remove`]) and answers `true`: right for a store
    /// that only one process writes, where the engine holds a key's triggers one at a time.
    /// A store shared by processes counts the hits on a key (PostgreSQL: `key_hits`).
    async fn remove_refused(&self, run: RunId) -> Result<bool, StoreError> {
        self.remove(run).await.map(|()| true)
    }
    /// One run.
    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError>;
    /// Many runs, answered in the order asked (`None` for a run not stored). A store may read
    /// them in one query; the default calls `get` for each.
    async fn get_many(&self, runs: &[RunId]) -> Result<Vec<Option<RunRecord>>, StoreError> {
        let mut out = Vec::with_capacity(runs.len());
        for &run in runs {
            out.push(self.get(run).await?);
        }
        Ok(out)
    }
    /// What workers need of claimed runs to start them, in the order asked (`None` for a run
    /// not stored). The default reads whole records (`get_many`); a store may read less (the
    /// memory store copies five fields instead of a record).
    async fn get_to_start(&self, runs: &[RunId]) -> Result<Vec<Option<ToStart>>, StoreError> {
        Ok(self
            .get_many(runs)
            .await?
            .into_iter()
            .map(|r| r.as_ref().map(ToStart::from))
            .collect())
    }
    /// Runs matching the filter, in id order.
    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError>;
    /// A failed attempt with a retry: records it and the next `run_after`. A store that
    /// fences by attempt (PostgreSQL, memory) applies it only while `attempt.number` is the
    /// run's current attempt, else answers `StaleAttempt` and changes nothing.
    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError>;
    /// Notes, best-effort and without waiting, that `attempt` of `run` started at `at` (sets
    /// `started_at`; a later `record_retry` clears it). It is advisory: recovery uses it to count
    /// a `crashed` attempt for a run that was executing when the process died. A note lost in a
    /// crash costs at most one uncounted attempt.
    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp);
    /// Records, durably, that a cancel of `run` was requested at `at` (sets
    /// `cancel_requested_at`, SPEC §7 store first: the engine calls it before it asks the queue
    /// backend to cancel). A second request keeps the first instant. Answers the instant in
    /// force; `NotFound` for an unknown run, `AlreadyFinished` for a finished one (nothing
    /// changes then).
    ///
    /// The default keeps nothing and only answers (`get`, then `at`): with it a request lives
    /// in the queue backend alone and is lost with it. Every store of this workspace, and every
    /// wrapper that forwards to one, implements it.
    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        match self.get(run).await? {
            None => Err(StoreError::NotFound(run)),
            Some(r) if r.status.is_terminal() => Err(StoreError::AlreadyFinished {
                run,
                status: r.status,
            }),
            Some(r) => Ok(r.cancel_requested_at.unwrap_or(at)),
        }
    }
    /// Withdraws a start note of `attempt` of `run` that is not written yet: its handler
    /// returned and the attempt's end is about to be written, which makes the note moot. Like
    /// the note itself, advisory: a store that writes notes at once (or not at all) ignores it
    /// (the default), and a crash before the end is written costs what a lost note costs.
    fn forget_start(&self, run: RunId, attempt: u32) {
        let _ = (run, attempt);
    }
    /// Removes the start mark of `attempt` of `run`, written or not: the attempt was handed
    /// back without counting (a drain's release), so a crash now must not count it as
    /// `crashed` at the next open. A store whose marks do not count (the default: none kept,
    /// or shared between processes) does nothing.
    async fn clear_start(&self, run: RunId, attempt: u32) -> Result<(), StoreError> {
        let _ = (run, attempt);
        Ok(())
    }
    /// The terminal write; the first one wins, later ones get `AlreadyFinished`. A write that
    /// carries an attempt applies only while that attempt is the run's current one; a store
    /// that fences by attempt (PostgreSQL, memory) answers `StaleAttempt` for an older one and
    /// changes nothing.
    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError>;
    /// A new `run_after` and TTL deadline for a waiting run.
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError>;
    /// Every run not yet terminal (recovery at start).
    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// Whether other processes use this store at the same time (the distributed shape). Then
    /// a start mark found at open may belong to an attempt another process is running now:
    /// its lease, not this open, decides whether the attempt crashed.
    fn shared_between_processes(&self) -> bool {
        false
    }
    /// Deletes finished runs (with their attempts and idempotency keys) whose `finished_at` is
    /// older than `now − retention` for their status; returns how many were deleted.
    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError>;
    /// The earliest instant `purge_finished` would delete something (arms the retention timer).
    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError>;
    /// Stores an env's settings.
    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError>;
    /// Every env with its settings.
    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError>;
    /// Stores a new env's settings unless the env exists; answers whether it was created.
    /// Stores shared by several processes make this one atomic insert, so that two
    /// processes creating the same env cannot both succeed. The default reads then writes
    /// (atomic only within one process that serialises its calls).
    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        if self.envs().await?.iter().any(|(name, _)| name == env) {
            return Ok(false);
        }
        self.put_env(env, settings).await?;
        Ok(true)
    }
    /// Stores a queue's admin settings (set at runtime through the engine), replacing any
    /// stored before for that queue, so that they outlive the queue backend's state (a
    /// restart of the embedded shape, a rebuild of a lost Redis key space). The settings
    /// were checked by [`QueueSettings::validate`]. The default keeps nothing (a store that
    /// does not keep them loses admin settings with the queue backend's state).
    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        let _ = (env, queue, settings);
        Ok(())
    }
    /// Every queue's stored admin settings (see [`RunStore::put_queue_settings`]), in no set
    /// order. The default answers none.
    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        Ok(Vec::new())
    }
    /// Registers a version; returns its number (1, 2, …; 0 is the implicit empty version).
    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError>;
    /// A version's definition (0 is always the empty version).
    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError>;
    /// Makes a version current.
    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError>;
    /// The current version (0 before any promotion).
    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError>;
    /// Every registered version of `env`, by number (1 first; the implicit version 0 is not
    /// listed). A store may answer in one query; the default asks `version` for 1, 2, … until
    /// one is missing and knows no creation times.
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        let mut out = Vec::new();
        for number in 1..=u32::MAX {
            match self.version(env, number).await? {
                Some(def) => out.push(VersionInfo {
                    number,
                    created_at: None,
                    def,
                }),
                None => break,
            }
        }
        Ok(out)
    }
    /// The current version with its definition (the task metadata cache's one store read
    /// after a miss). A store may answer in one query; the default asks `current_version`,
    /// then `version`.
    async fn current_definition(&self, env: &EnvName) -> Result<(u32, VersionDef), StoreError> {
        let number = self.current_version(env).await?;
        let def = self.version(env, number).await?.unwrap_or_default();
        Ok((number, def))
    }

    /// Whether a write costs a commit worth sharing (a sync to disk, a round trip): the engine
    /// then ends completed attempts in batches through [`RunStore::finish_many`], many per
    /// call. An in-memory store answers `false` (the default) and gets one call per attempt.
    fn group_commits(&self) -> bool {
        false
    }

    /// Whether [`RunStore::finish_now`] writes: an in-memory store, whose writes answer at
    /// once. The default is `false`.
    fn finishes_now(&self) -> bool {
        false
    }

    /// One attempt's terminal write as [`RunStore::finish_many`] makes it for one end, made
    /// and answered without waiting (so a caller may make it inside another backend's step:
    /// [`QueueBackend::end_fenced`]): it must not block on I/O or call a queue backend. Only a
    /// store whose [`RunStore::finishes_now`] is `true` writes; the default refuses with
    /// `Unavailable` and writes nothing.
    fn finish_now(&self, end: AttemptEnd, now: Timestamp) -> Result<(), StoreError> {
        let _ = (end, now);
        Err(StoreError::Unavailable(
            "this run store does not write without waiting".into(),
        ))
    }

    /// The schedule cursors of an env's tasks (see [`ScheduleCursor`]), in no set order. The
    /// default answers `Unavailable`: a store must keep cursors for schedules to fire.
    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        let _ = env;
        Err(StoreError::Unavailable(
            "this run store keeps no schedule cursors".into(),
        ))
    }

    /// Moves the cursor of schedule `index` of `task` from `from` (`None`: no tick fired yet)
    /// to `to`, as one compare-and-set: answers `true` when it moved, `false` (nothing
    /// changed) when the cursor was not at `from`, so two processes that fired the same tick
    /// never both advance. The default answers `Unavailable`.
    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        let _ = (env, task, index, from, to);
        Err(StoreError::Unavailable(
            "this run store keeps no schedule cursors".into(),
        ))
    }

    /// Terminal writes of many attempts, each exactly as [`RunStore::finish`] with its attempt
    /// (the first terminal write wins, later ones get `AlreadyFinished`), answered per run
    /// without the records. A store may apply them in one transaction (one commit for all);
    /// each answer is given only once that write is durable. The default calls `finish` for
    /// each, in order. `Err` means the whole call failed and nothing is known to be written.
    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut answers = Vec::with_capacity(ends.len());
        for end in ends {
            let written = self
                .finish(end.run, end.status, end.output, Some(end.attempt), now)
                .await;
            answers.push(written.map(|_| ()));
        }
        Ok(answers)
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    fn lane(name: &str) -> LaneName {
        LaneName::new(name).expect("lane")
    }

    #[test]
    fn each_part_gets_its_runs_moves_and_the_first_the_rest() {
        let (a, b) = (lane("a"), lane("b"));
        let whole = Effects {
            moved: vec![
                (RunId(2), RunStatus::Ready),
                (RunId(9), RunStatus::Ready),
                (RunId(1), RunStatus::Queued),
                (RunId(1), RunStatus::Ready),
            ],
            ready_lanes: vec![a.clone()],
            deadline: Some(Timestamp(7)),
        };
        let parts = whole.split(&[(RunId(1), &b), (RunId(2), &a), (RunId(3), &b)]);
        assert_eq!(parts.len(), 3);
        // The first: its run's moves in order, the outsider's move, every ready lane.
        assert_eq!(
            parts[0].moved,
            vec![
                (RunId(9), RunStatus::Ready),
                (RunId(1), RunStatus::Queued),
                (RunId(1), RunStatus::Ready),
            ]
        );
        assert_eq!(parts[0].ready_lanes, vec![a.clone()]);
        // The second: its move and its lane, made ready.
        assert_eq!(parts[1].moved, vec![(RunId(2), RunStatus::Ready)]);
        assert_eq!(parts[1].ready_lanes, vec![a]);
        // The third: nothing moved, its lane was not made ready.
        assert!(parts[2].moved.is_empty() && parts[2].ready_lanes.is_empty());
        assert!(parts.iter().all(|p| p.deadline == Some(Timestamp(7))));
    }

    #[test]
    fn a_run_named_twice_gets_its_moves_once_in_its_first_part() {
        let a = lane("a");
        let whole = Effects {
            moved: vec![(RunId(5), RunStatus::Ready)],
            ready_lanes: Vec::new(),
            deadline: None,
        };
        let parts = whole.split(&[(RunId(4), &a), (RunId(5), &a), (RunId(5), &a)]);
        assert!(parts[0].moved.is_empty());
        assert_eq!(parts[1].moved, vec![(RunId(5), RunStatus::Ready)]);
        assert!(parts[2].moved.is_empty());
        assert!(Effects::default().split(&[]).is_empty());
    }
}
