//! Model-based property test (STYLE.md, "Tests"): random operation sequences are applied to the
//! reference model (`runlane_conformance::model::ModelQueue`) and to the real in-memory backend
//! (`runlane_memory::MemoryQueue`; the Redis backend too, below), and after **every** step the
//! two must agree on the
//! operation's answer, `snapshot()`, `next_deadline()` and every env's `env_usage`. The
//! invariants of STYLE.md are checked on the backend at every step as well: no run lost, at most
//! one live lease per run with strictly increasing tokens, nothing ready or leased before its
//! `run_after`, attempts only grow, removed runs never reappear, no admission over a limit, and
//! priority-then-FIFO admission within a queue key; and so are the memory backend's own
//! (`MemoryQueue::check_invariants`: its indexes and counters agree with its runs, no idle key
//! state is kept).
//!
//! The universe is small on purpose so that collisions happen: 2–3 envs of different weights,
//! three queues, two keys, the built-in lanes plus one custom lane, versions 0–2, three workers.
//! Time starts at a fixed epoch and only moves with `Advance` (each followed by a `tick`).
//!
//! `RUNLANE_PROPTEST_CASES` overrides the number of cases (default 1000) and
//! `RUNLANE_PROPTEST_SEED` fixes the seed; a failure prints the seed and the minimal failing
//! operation sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use runlane_conformance::model::ModelQueue;
use runlane_core::admission::{env_cap, key_cap};
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    LaneInfo, LeaseState, Leased, LiveRun, Placement, QueueBackend, QueueInfo, ServedEnv, Tick,
};
use runlane_core::chain::ClaimChain;
use runlane_core::error::{InvalidInput, QueueError};
use runlane_core::id::{FencingToken, RunId, WorkerId};
use runlane_core::lane::LaneName;
use runlane_core::name::{EnvName, QueueName};
use runlane_core::run::RunStatus;
use runlane_core::score::score;
use runlane_core::settings::{EnvSettings, QueueSettings};
use runlane_core::time::Timestamp;
use runlane_core::ttl;
use runlane_memory::{MemoryConfig, MemoryQueue};

/// Where time starts in every case.
const EPOCH: Timestamp = Timestamp(1_700_000_000_000);
/// Short enough that orphan-lane returns happen within a case.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Env names; the fourth is never created (unknown-env refusals).
const ENVS: [&str; 4] = ["e1", "e2", "e3", "ghost"];
const QUEUES: [&str; 3] = ["qa", "qb", "qc"];
const KEYS: [&str; 2] = ["", "k"];
/// Lanes; the fifth is never added (unknown-lane refusals).
const LANES: [&str; 5] = ["default", "fast_lane", "manual", "custom", "ghost"];
const PRIORITIES_S: [u64; 3] = [0, 5, 60];
const BURSTS: [f64; 3] = [1.0, 1.5, 2.0];

fn env_name(i: usize) -> EnvName {
    EnvName::new(ENVS[i]).expect("valid env name")
}

fn queue_name(i: usize) -> QueueName {
    QueueName::new(QUEUES[i]).expect("valid queue name")
}

fn lane_name(name: &str) -> LaneName {
    LaneName::new(name).expect("valid lane name")
}

/// The claim chains workers and consumers use (constructed directly, not parsed).
fn chain(i: u8) -> ClaimChain {
    let l = lane_name;
    match i % 6 {
        0 => ClaimChain::default_chain(),
        1 => ClaimChain::Preference(vec![]),
        2 => ClaimChain::Filter(vec![l("fast_lane")]),
        3 => ClaimChain::Filter(vec![l("custom"), l("default")]),
        4 => ClaimChain::Preference(vec![l("fast_lane"), l("custom")]),
        _ => ClaimChain::Filter(vec![l("manual")]),
    }
}

// ---------------------------------------------------------------------------------------------
// Generated input
// ---------------------------------------------------------------------------------------------

/// An env's settings as generated.
#[derive(Clone, Debug)]
struct EnvGen {
    limit: u32,
    burst: u8,
    fast_lane_limit: Option<u32>,
    weight: u32,
    fast_path: bool,
}

impl EnvGen {
    fn settings(&self) -> EnvSettings {
        EnvSettings {
            limit: self.limit,
            burst: BURSTS[usize::from(self.burst) % BURSTS.len()],
            fast_lane_limit: self.fast_lane_limit,
            weight: self.weight,
            strict_tasks: false,
            fast_path: self.fast_path,
        }
    }
}

/// One operation. Indices (`pick`, `env`, …) are resolved against the driver's state at the
/// time of the step, modulo the number of candidates, so any subsequence is still valid (and
/// proptest can shrink by removing operations).
#[derive(Clone, Debug)]
enum Op {
    /// Enqueue a fresh run.
    Trigger {
        env: u8,
        queue: u8,
        key: u8,
        lane: u8,
        priority: u8,
        /// `run_after - now` in ms (negative: due in the past).
        delay_ms: i32,
        ttl_s: Option<u8>,
        lock: Option<u32>,
        sync: bool,
        max_duration_s: Option<u8>,
        /// Re-enqueued by recovery: attempt 2, `ever_leased` (it never expires), enqueued as
        /// already accepted (`max_queued` does not apply).
        recovered: bool,
    },
    /// Enqueue again the original dispatch of a run still held (idempotent by run id).
    Duplicate { pick: u16 },
    /// A trigger that carries an idle workloop's claim (`Trigger`, then `Claim`, in one step:
    /// `enqueue_claiming` where the backend claims on enqueue, else the two calls).
    TriggerClaiming(Box<Op>, Box<Op>),
    /// A workloop claims.
    Claim {
        worker: u8,
        chain: u8,
        max: u32,
        envs: u8,
        versions: [u32; 3],
        lease_s: u8,
    },
    /// A worker heartbeats a subset of its leases, perhaps with a stale token.
    Heartbeat {
        worker: u8,
        mask: u16,
        stale: Option<u16>,
    },
    /// A handler completes (`finish`); `stale` uses some other token ever granted.
    Complete { pick: u16, stale: Option<u16> },
    /// A slot's turn: a handler completes and its slot claims the next run (`Complete`, then
    /// `Claim`, in one step: `finish_then_claim`; the model takes the two calls).
    CompleteClaiming(Box<Op>, Box<Op>),
    /// A run's whole end in one step (`end_fenced`: the lease check, the store's write, which
    /// fails when `written` is false, then the ack and the slot's next claim, if any); the
    /// model takes `check_lease`, then `finish_then_claim` or `finish`.
    CompleteFenced {
        complete: Box<Op>,
        claim: Option<Box<Op>>,
        written: bool,
    },
    /// A handler fails: `retry` at `now + ms`, or final (`finish`).
    Fail { pick: u16, retry_in_ms: Option<u32> },
    /// Drain on stop: `release`.
    Release { pick: u16 },
    /// Cancel any run ever enqueued (finished ones included).
    Cancel { pick: u16, grace_s: u8 },
    /// Reschedule any run ever enqueued.
    Reschedule {
        pick: u16,
        delay_ms: u32,
        ttl_s: Option<u8>,
    },
    /// `check_lease` of a lease the engine holds, or a stale one.
    CheckLease { pick: u16, stale: Option<u16> },
    /// The clock moves, then `tick(now)`.
    Advance { ms: u32 },
    /// The worker dies: the engine forgets its leases (they lapse and come back through tick).
    Crash { worker: u8 },
    /// New env settings.
    PutEnv { env: u8, settings: EnvGen },
    /// New queue settings.
    PutQueue {
        env: u8,
        queue: u8,
        limit: Option<u32>,
        key_total_limit: Option<u32>,
        max_queued: Option<u32>,
        paused: bool,
    },
    /// Pause or resume a queue, keeping its other settings.
    Pause { env: u8, queue: u8, paused: bool },
    /// A workloop registers as a consumer.
    Register { chain: u8 },
    /// A consumer goes away.
    Unregister { pick: u16 },
    /// Read-only views: `queues`, `lanes`, `queue_settings`, `has_lane`.
    Inspect { env: u8, queue: u8 },
}

/// One generated case: the initial envs, whether a consumer of every lane exists at the start,
/// and the operations. Every operation is generated active (`Some`); shrinking may deactivate
/// it (`None`): the sequence keeps its 200–260 entries, and a minimal failing sequence is its
/// active ones.
#[derive(Clone, Debug)]
struct Case {
    envs: Vec<EnvGen>,
    consumer_at_start: bool,
    ops: Vec<Option<Op>>,
}

/// Generates `Some(value)` only; shrinks first to `None` (the operation is dropped), and only
/// when the operation is needed, into the operation itself. A deactivated operation is not
/// shrunk further, so shrinking a 200-step case spends its iterations on the steps that matter.
#[derive(Debug)]
struct Droppable<S>(S);

#[derive(Clone, Copy, Debug, PartialEq)]
enum DropState {
    /// Active, not yet tried without.
    Untried,
    /// Dropped, waiting to learn whether the failure remains.
    Trying,
    /// Dropped for good.
    Dropped,
    /// Needed: shrinking goes into the operation.
    Needed,
}

struct DroppableTree<T> {
    inner: T,
    state: DropState,
}

impl<S: Strategy> Strategy for Droppable<S> {
    type Tree = DroppableTree<S::Tree>;
    type Value = Option<S::Value>;

    fn new_tree(&self, runner: &mut TestRunner) -> proptest::strategy::NewTree<Self> {
        Ok(DroppableTree {
            inner: self.0.new_tree(runner)?,
            state: DropState::Untried,
        })
    }
}

impl<T: proptest::strategy::ValueTree> proptest::strategy::ValueTree for DroppableTree<T> {
    type Value = Option<T::Value>;

    fn current(&self) -> Self::Value {
        match self.state {
            DropState::Trying | DropState::Dropped => None,
            DropState::Untried | DropState::Needed => Some(self.inner.current()),
        }
    }

    fn simplify(&mut self) -> bool {
        match self.state {
            DropState::Untried => {
                self.state = DropState::Trying;
                true
            }
            // Still failing without it: it stays dropped.
            DropState::Trying | DropState::Dropped => {
                self.state = DropState::Dropped;
                false
            }
            DropState::Needed => self.inner.simplify(),
        }
    }

    fn complicate(&mut self) -> bool {
        match self.state {
            DropState::Trying => {
                self.state = DropState::Needed;
                true
            }
            DropState::Needed => self.inner.complicate(),
            DropState::Untried | DropState::Dropped => false,
        }
    }
}

fn env_gen() -> impl Strategy<Value = EnvGen> {
    (
        0u32..=4,
        0u8..3,
        prop::option::weighted(0.3, 0u32..=3),
        1u32..=4,
        prop::bool::weighted(0.8),
    )
        .prop_map(
            |(limit, burst, fast_lane_limit, weight, fast_path)| EnvGen {
                limit,
                burst,
                fast_lane_limit,
                weight,
                fast_path,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let trigger = (
        (0u8..=40, 0u8..3, 0u8..2, 0u8..=20, 0u8..3),
        prop_oneof![4 => Just(0i32), 1 => -5_000i32..0, 2 => 1i32..=30_000],
        prop::option::weighted(0.3, 1u8..=60),
        prop::option::weighted(0.2, 1u32..=2),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.2, 5u8..=60),
        prop::bool::weighted(0.05),
    )
        .prop_map(
            |(
                (env, queue, key, lane, priority),
                delay_ms,
                ttl_s,
                lock,
                sync,
                max_duration_s,
                recovered,
            )| {
                Op::Trigger {
                    // Env 3 and lane 4 (unknown) are rare.
                    env: if env == 40 { 3 } else { env % 3 },
                    queue,
                    key,
                    lane: if lane == 20 { 4 } else { lane % 4 },
                    priority,
                    delay_ms,
                    ttl_s,
                    lock,
                    sync,
                    max_duration_s,
                    recovered,
                }
            },
        );
    let claim = (
        0u8..3,
        0u8..6,
        1u32..=3,
        1u8..8,
        [0u32..=2, 0u32..=2, 0u32..=2],
        5u8..=90,
    )
        .prop_map(|(worker, chain, max, envs, versions, lease_s)| Op::Claim {
            worker,
            chain,
            max,
            envs,
            versions,
            lease_s,
        });
    let heartbeat = (
        0u8..3,
        any::<u16>(),
        prop::option::weighted(0.3, any::<u16>()),
    )
        .prop_map(|(worker, mask, stale)| Op::Heartbeat {
            worker,
            mask,
            stale,
        });
    let complete = (any::<u16>(), prop::option::weighted(0.1, any::<u16>()))
        .prop_map(|(pick, stale)| Op::Complete { pick, stale });
    let fail = (
        any::<u16>(),
        prop::option::weighted(0.7, prop_oneof![Just(0u32), 1u32..=20_000]),
    )
        .prop_map(|(pick, retry_in_ms)| Op::Fail { pick, retry_in_ms });
    let cancel = (any::<u16>(), 0u8..=20).prop_map(|(pick, grace_s)| Op::Cancel { pick, grace_s });
    let reschedule = (
        any::<u16>(),
        prop_oneof![Just(0u32), 1u32..=20_000],
        prop::option::weighted(0.3, 1u8..=60),
    )
        .prop_map(|(pick, delay_ms, ttl_s)| Op::Reschedule {
            pick,
            delay_ms,
            ttl_s,
        });
    let check = (any::<u16>(), prop::option::weighted(0.3, any::<u16>()))
        .prop_map(|(pick, stale)| Op::CheckLease { pick, stale });
    let advance =
        prop_oneof![1 => Just(0u32), 6 => 1u32..=40_000].prop_map(|ms| Op::Advance { ms });
    let put_env = (0u8..3, env_gen()).prop_map(|(env, settings)| Op::PutEnv { env, settings });
    let put_queue = (
        0u8..3,
        0u8..3,
        prop::option::weighted(0.5, 0u32..=3),
        prop::option::weighted(0.3, 1u32..=3),
        prop::option::weighted(0.3, 1u32..=4),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(env, queue, limit, key_total_limit, max_queued, paused)| Op::PutQueue {
                env,
                queue,
                limit,
                key_total_limit,
                max_queued,
                paused,
            },
        );
    let pause = (0u8..3, 0u8..3, any::<bool>()).prop_map(|(env, queue, paused)| Op::Pause {
        env,
        queue,
        paused,
    });
    let trigger_claiming = (trigger.clone(), claim.clone())
        .prop_map(|(t, c)| Op::TriggerClaiming(Box::new(t), Box::new(c)));
    let complete_claiming = (complete.clone(), claim.clone())
        .prop_map(|(f, c)| Op::CompleteClaiming(Box::new(f), Box::new(c)));
    let complete_fenced = (
        complete.clone(),
        proptest::option::of(claim.clone()),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(f, c, written)| Op::CompleteFenced {
            complete: Box::new(f),
            claim: c.map(Box::new),
            written,
        });
    prop_oneof![
        7 => trigger,
        1 => any::<u16>().prop_map(|pick| Op::Duplicate { pick }),
        6 => claim,
        3 => trigger_claiming,
        4 => heartbeat,
        4 => complete,
        2 => complete_claiming,
        2 => complete_fenced,
        3 => fail,
        1 => any::<u16>().prop_map(|pick| Op::Release { pick }),
        2 => cancel,
        1 => reschedule,
        1 => check,
        5 => advance,
        1 => (0u8..3).prop_map(|worker| Op::Crash { worker }),
        1 => put_env,
        1 => put_queue,
        1 => pause,
        1 => (0u8..6).prop_map(|chain| Op::Register { chain }),
        1 => any::<u16>().prop_map(|pick| Op::Unregister { pick }),
        1 => (0u8..3, 0u8..3).prop_map(|(env, queue)| Op::Inspect { env, queue }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(env_gen(), 2..=3),
        any::<bool>(),
        prop::collection::vec(Droppable(op()), 200..=260),
    )
        .prop_map(|(mut envs, consumer_at_start, ops)| {
            // Different weights per env, whatever was drawn.
            for (i, e) in envs.iter_mut().enumerate() {
                e.weight = u32::try_from(i).unwrap_or(0) + 1;
            }
            Case {
                envs,
                consumer_at_start,
                ops,
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Calls: an operation resolved against the driver's state, applied to both backends
// ---------------------------------------------------------------------------------------------

/// A concrete call, identical for the model and the backend.
#[derive(Clone, Debug)]
enum Call {
    Enqueue(Box<Dispatch>, EnqueueAs),
    Claim(ClaimRequest),
    /// An enqueue carrying a claim (see [`Op::TriggerClaiming`]).
    EnqueueClaiming(Box<Dispatch>, EnqueueAs, ClaimRequest),
    Heartbeat(Vec<(RunId, FencingToken)>),
    Finish(RunId, FencingToken),
    /// A finish and the slot's next claim (see [`Op::CompleteClaiming`]).
    FinishClaiming(RunId, FencingToken, ClaimRequest),
    /// A run's whole end in one step (see [`Op::CompleteFenced`]).
    FinishFenced(RunId, FencingToken, Option<ClaimRequest>, bool),
    Retry(RunId, FencingToken, Timestamp),
    Release(RunId, FencingToken),
    Cancel(RunId, Duration),
    Reschedule(RunId, Timestamp, Option<Timestamp>),
    CheckLease(RunId, FencingToken),
    Tick,
    PutEnv(EnvName, EnvSettings),
    PutQueue(EnvName, QueueName, QueueSettings),
    Register(ClaimChain),
    Unregister(ConsumerId),
    Inspect(EnvName, QueueName),
    /// Nothing to do (no candidate for the operation).
    Nothing,
}

/// An error with the free-text parts blanked (reasons and operation names are not part of the
/// contract; the fast-lane `retry_after` is, dispatch.md fixes it at 1 s).
fn normalize(e: QueueError) -> QueueError {
    match e {
        QueueError::Invalid(i) => QueueError::Invalid(InvalidInput::new(i.field, "")),
        QueueError::WrongState { run, status, .. } => QueueError::WrongState {
            run,
            status,
            operation: "",
        },
        QueueError::Unavailable(_) => QueueError::Unavailable(String::new()),
        other => other,
    }
}

type R<T> = Result<T, QueueError>;

/// A one-step end's ack: its effects and, when a claim was asked for, the claim's answer.
type FencedAck = (Effects, Option<R<Vec<Leased>>>);

/// What a call answered, normalized for comparison.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Enqueue(R<Enqueued>),
    Claim(R<Vec<Leased>>),
    /// The placement and the leases (the effects of one call and of two differ by design: a
    /// lane the carried claim emptied does not ring).
    EnqueueClaiming(R<(Placement, Vec<Leased>)>),
    Heartbeat(R<Vec<LeaseState>>),
    Effects(R<Effects>),
    /// The finish's effects and the claim's answer.
    FinishClaiming(R<(Effects, R<Vec<Leased>>)>),
    /// The lease check's refusal, or: nothing acked (the write failed), or the ack's answer
    /// (its effects and the claim's answer, when one was asked for).
    Fenced(R<Option<R<FencedAck>>>),
    Cancel(R<CancelOutcome>),
    Check(R<()>),
    Tick(R<Tick>),
    Consumer(R<ConsumerId>),
    Inspect(
        R<Vec<QueueInfo>>,
        R<Vec<LaneInfo>>,
        R<QueueSettings>,
        R<bool>,
    ),
    Nothing,
}

fn n<T>(r: R<T>) -> R<T> {
    r.map_err(normalize)
}

async fn call<B: QueueBackend>(b: &B, c: &Call, now: Timestamp) -> Outcome {
    match c {
        Call::Enqueue(d, why) => Outcome::Enqueue(n(b.enqueue((**d).clone(), *why, now).await)),
        Call::Claim(req) => Outcome::Claim(n(b.claim(req, now).await)),
        Call::EnqueueClaiming(d, why, req) => Outcome::EnqueueClaiming(if b.claims_on_enqueue() {
            n(b.enqueue_claiming((**d).clone(), *why, now, req).await)
                .map(|(e, leased)| (e.placement, leased))
        } else {
            match n(b.enqueue((**d).clone(), *why, now).await) {
                Ok(e) => n(b.claim(req, now).await).map(|leased| (e.placement, leased)),
                Err(e) => Err(e),
            }
        }),
        Call::Heartbeat(leases) => Outcome::Heartbeat(n(b.heartbeat(leases, now).await)),
        Call::Finish(run, token) => Outcome::Effects(n(b.finish(*run, *token, now).await)),
        Call::FinishClaiming(run, token, req) => Outcome::FinishClaiming(
            n(b.finish_then_claim(*run, *token, req, now).await).map(|(fx, l)| (fx, n(l))),
        ),
        Call::FinishFenced(run, token, req, written) => {
            Outcome::Fenced(fenced(b, *run, *token, req.as_ref(), *written, now).await)
        }
        Call::Retry(run, token, at) => Outcome::Effects(n(b.retry(*run, *token, *at, now).await)),
        Call::Release(run, token) => Outcome::Effects(n(b.release(*run, *token, now).await)),
        Call::Cancel(run, grace) => Outcome::Cancel(n(b.cancel(*run, *grace, now).await)),
        Call::Reschedule(run, at, ttl) => {
            Outcome::Effects(n(b.reschedule(*run, *at, *ttl, now).await))
        }
        Call::CheckLease(run, token) => Outcome::Check(n(b.check_lease(*run, *token).await)),
        Call::Tick => Outcome::Tick(n(b.tick(now).await)),
        Call::PutEnv(env, s) => Outcome::Effects(n(b.put_env(env, *s, now).await)),
        Call::PutQueue(env, q, s) => Outcome::Effects(n(b.put_queue(env, q, *s, now).await)),
        Call::Register(chain) => Outcome::Consumer(n(b.register_consumer(chain, now).await)),
        Call::Unregister(id) => Outcome::Effects(n(b.unregister_consumer(*id, now).await)),
        Call::Inspect(env, q) => Outcome::Inspect(
            n(b.queues(env).await),
            n(b.lanes(now).await),
            n(b.queue_settings(env, q).await),
            n(b.has_lane(&lane_name("custom")).await),
        ),
        Call::Nothing => Outcome::Nothing,
    }
}

/// `end_fenced`, or for a backend without it (the model) its steps one by one: the lease
/// check, then (when the write is made) `finish_then_claim` or `finish`.
async fn fenced<B: QueueBackend>(
    b: &B,
    run: RunId,
    token: FencingToken,
    req: Option<&ClaimRequest>,
    written: bool,
    now: Timestamp,
) -> R<Option<R<FencedAck>>> {
    let mut writes = 0;
    let one_step = b.end_fenced(run, token, req, now, &mut || {
        writes += 1;
        written
    });
    if let Some(answer) = one_step {
        let checked = answer.is_ok();
        assert_eq!(
            writes,
            u32::from(checked),
            "one write after a passed lease check only"
        );
        return n(answer).map(|f| {
            f.acked
                .map(|acked| n(acked).map(|(fx, claimed)| (fx, claimed.map(Ok))))
        });
    }
    n(b.check_lease(run, token).await)?;
    if !written {
        return Ok(None);
    }
    Ok(Some(match req {
        Some(req) => n(b.finish_then_claim(run, token, req, now).await)
            .map(|(fx, claimed)| (fx, Some(n(claimed)))),
        None => n(b.finish(run, token, now).await).map(|fx| (fx, None)),
    }))
}

/// What both backends look like after a step.
#[derive(Debug, PartialEq)]
struct View {
    snapshot: R<Vec<LiveRun>>,
    deadline: R<Option<Timestamp>>,
    usage: Vec<R<EnvUsage>>,
}

async fn view<B: QueueBackend>(b: &B, envs: &[EnvName]) -> View {
    let mut usage = Vec::new();
    for env in envs {
        usage.push(b.env_usage(env).await.map_err(normalize));
    }
    View {
        snapshot: b.snapshot().await.map_err(normalize),
        deadline: b.next_deadline().await.map_err(normalize),
        usage,
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: the engine's side of the conversation, and the invariants
// ---------------------------------------------------------------------------------------------

/// A lease the engine holds (from a claim, or reported lapsed by a tick).
#[derive(Clone, Copy, Debug)]
struct Held {
    run: RunId,
    token: FencingToken,
    worker: WorkerId,
}

/// The engine's knowledge, kept by the test.
struct Driver {
    now: Timestamp,
    env_count: usize,
    /// How many of the case's envs exist yet.
    created: usize,
    next_run: u128,
    /// Every dispatch ever accepted, as first enqueued.
    dispatches: Vec<Dispatch>,
    /// Runs the backend must hold.
    present: BTreeSet<RunId>,
    /// Runs a call reported removed.
    removed: BTreeSet<RunId>,
    held: Vec<Held>,
    /// Every token ever granted, with its run.
    granted: Vec<(RunId, FencingToken)>,
    /// The latest token granted per run.
    latest_token: BTreeMap<RunId, FencingToken>,
    max_token: u64,
    attempts: BTreeMap<RunId, u32>,
    consumers: Vec<ConsumerId>,
    env_settings: Vec<EnvSettings>,
    queue_settings: BTreeMap<(usize, usize), QueueSettings>,
    /// The backend's snapshot before the step.
    before: Vec<LiveRun>,
}

fn pick<T: Copy>(items: &[T], i: u16) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[usize::from(i) % items.len()])
    }
}

impl Driver {
    /// The envs created so far (the setup creates them one by one).
    fn env_names(&self) -> Vec<EnvName> {
        (0..self.created).map(env_name).collect()
    }

    fn env_index(&self, i: u8) -> usize {
        usize::from(i) % self.env_count
    }

    fn run_ids(&self) -> Vec<RunId> {
        self.dispatches.iter().map(|d| d.run_id).collect()
    }

    /// A token for `stale`: some token ever granted (maybe another run's), or one never granted.
    fn stale_token(&self, i: u16) -> FencingToken {
        match pick(&self.granted, i) {
            Some((_, t)) if !i.is_multiple_of(3) => t,
            _ => FencingToken(self.max_token + 1 + u64::from(i % 5)),
        }
    }

    fn resolve(&mut self, op: &Op) -> Call {
        let now = self.now;
        match op {
            Op::Trigger {
                env,
                queue,
                key,
                lane,
                priority,
                delay_ms,
                ttl_s,
                lock,
                sync,
                max_duration_s,
                recovered,
            } => {
                let run_after = if *delay_ms >= 0 {
                    now.saturating_add(Duration::from_millis(u64::from(delay_ms.unsigned_abs())))
                } else {
                    now.saturating_sub(Duration::from_millis(u64::from(delay_ms.unsigned_abs())))
                };
                let id = RunId(self.next_run);
                self.next_run += 1;
                let env = if usize::from(*env) >= 3 {
                    3
                } else {
                    self.env_index(*env)
                };
                let d = Dispatch {
                    run_id: id,
                    env: env_name(env),
                    queue: queue_name(usize::from(*queue) % QUEUES.len()),
                    key: Arc::from(KEYS[usize::from(*key) % KEYS.len()]),
                    lane: lane_name(LANES[usize::from(*lane) % LANES.len()]),
                    priority: Duration::from_secs(
                        PRIORITIES_S[usize::from(*priority) % PRIORITIES_S.len()],
                    ),
                    run_after,
                    ttl_deadline: ttl::deadline(
                        now,
                        run_after,
                        ttl_s.map(|s| Duration::from_secs(u64::from(s))),
                    ),
                    attempt: if *recovered { 2 } else { 1 },
                    locked_version: *lock,
                    ever_leased: *recovered,
                    max_duration: max_duration_s.map(|s| Duration::from_secs(u64::from(s))),
                };
                // Recovery enqueues a run already accepted: the queue's cap does not apply.
                let why = if *recovered {
                    EnqueueAs::Accepted
                } else {
                    EnqueueAs::trigger(*sync)
                };
                Call::Enqueue(Box::new(d), why)
            }
            Op::TriggerClaiming(t, c) => match (self.resolve(t), self.resolve(c)) {
                (Call::Enqueue(d, why), Call::Claim(req)) => Call::EnqueueClaiming(d, why, req),
                _ => Call::Nothing,
            },
            Op::CompleteClaiming(f, c) => match (self.resolve(f), self.resolve(c)) {
                (Call::Finish(run, token), Call::Claim(req)) => {
                    Call::FinishClaiming(run, token, req)
                }
                _ => Call::Nothing,
            },
            Op::CompleteFenced {
                complete,
                claim,
                written,
            } => {
                let finish = self.resolve(complete);
                let req = match claim.as_deref().map(|c| self.resolve(c)) {
                    None => None,
                    Some(Call::Claim(req)) => Some(req),
                    Some(_) => return Call::Nothing,
                };
                match finish {
                    Call::Finish(run, token) => Call::FinishFenced(run, token, req, *written),
                    _ => Call::Nothing,
                }
            }
            // Only runs still held: a removed run enqueued again is a new run to the backend.
            Op::Duplicate { pick: i } => {
                match pick(&self.present.iter().copied().collect::<Vec<_>>(), *i) {
                    Some(run) => {
                        let d = self.dispatches.iter().find(|d| d.run_id == run).cloned();
                        d.map_or(Call::Nothing, |d| {
                            Call::Enqueue(Box::new(d), EnqueueAs::Trigger)
                        })
                    }
                    None => Call::Nothing,
                }
            }
            Op::Claim {
                worker,
                chain: c,
                max,
                envs,
                versions,
                lease_s,
            } => {
                let served = (0..self.env_count)
                    .filter(|i| envs & (1 << i) != 0)
                    .map(|i| ServedEnv {
                        env: env_name(i),
                        version: versions[i],
                    })
                    .collect();
                Call::Claim(ClaimRequest {
                    worker: WorkerId(u64::from(*worker % 3) + 1),
                    chain: chain(*c),
                    max: *max,
                    envs: served,
                    lease: Duration::from_secs(u64::from(*lease_s)),
                })
            }
            Op::Heartbeat {
                worker,
                mask,
                stale,
            } => {
                let w = WorkerId(u64::from(*worker % 3) + 1);
                let mut leases: Vec<(RunId, FencingToken)> = self
                    .held
                    .iter()
                    .filter(|h| h.worker == w)
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 16)) != 0)
                    .map(|(_, h)| (h.run, h.token))
                    .collect();
                if let Some(s) = stale {
                    if let Some(run) = pick(&self.run_ids(), *s) {
                        leases.push((run, self.stale_token(*s)));
                    }
                }
                Call::Heartbeat(leases)
            }
            Op::Complete { pick: i, stale } => match (pick(&self.held, *i), stale) {
                (Some(h), None) => Call::Finish(h.run, h.token),
                (Some(h), Some(s)) => Call::Finish(h.run, self.stale_token(*s)),
                (None, _) => match pick(&self.run_ids(), *i) {
                    Some(run) => Call::Finish(run, self.stale_token(*i)),
                    None => Call::Nothing,
                },
            },
            Op::Fail {
                pick: i,
                retry_in_ms,
            } => match pick(&self.held, *i) {
                Some(h) => match retry_in_ms {
                    Some(ms) => Call::Retry(
                        h.run,
                        h.token,
                        now.saturating_add(Duration::from_millis(u64::from(*ms))),
                    ),
                    None => Call::Finish(h.run, h.token),
                },
                None => Call::Nothing,
            },
            Op::Release { pick: i } => match pick(&self.held, *i) {
                Some(h) => Call::Release(h.run, h.token),
                None => Call::Nothing,
            },
            Op::Cancel { pick: i, grace_s } => match pick(&self.run_ids(), *i) {
                Some(run) => Call::Cancel(run, Duration::from_secs(u64::from(*grace_s))),
                None => Call::Nothing,
            },
            Op::Reschedule {
                pick: i,
                delay_ms,
                ttl_s,
            } => match pick(&self.run_ids(), *i) {
                Some(run) => {
                    let at = now.saturating_add(Duration::from_millis(u64::from(*delay_ms)));
                    let ttl =
                        ttl::deadline(now, at, ttl_s.map(|s| Duration::from_secs(u64::from(s))));
                    Call::Reschedule(run, at, ttl)
                }
                None => Call::Nothing,
            },
            Op::CheckLease { pick: i, stale } => match (pick(&self.held, *i), stale) {
                (Some(h), None) => Call::CheckLease(h.run, h.token),
                (Some(h), Some(s)) => Call::CheckLease(h.run, self.stale_token(*s)),
                (None, _) => match pick(&self.run_ids(), *i) {
                    Some(run) => Call::CheckLease(run, self.stale_token(*i)),
                    None => Call::Nothing,
                },
            },
            Op::Advance { ms } => {
                self.now = now.saturating_add(Duration::from_millis(u64::from(*ms)));
                Call::Tick
            }
            Op::Crash { worker } => {
                let w = WorkerId(u64::from(*worker % 3) + 1);
                self.held.retain(|h| h.worker != w);
                Call::Nothing
            }
            Op::PutEnv { env, settings } => {
                Call::PutEnv(env_name(self.env_index(*env)), settings.settings())
            }
            Op::PutQueue {
                env,
                queue,
                limit,
                key_total_limit,
                max_queued,
                paused,
            } => {
                let (e, q) = (self.env_index(*env), usize::from(*queue) % QUEUES.len());
                let s = QueueSettings {
                    limit: *limit,
                    key_total_limit: *key_total_limit,
                    max_queued: *max_queued,
                    paused: *paused,
                };
                Call::PutQueue(env_name(e), queue_name(q), s)
            }
            Op::Pause { env, queue, paused } => {
                let (e, q) = (self.env_index(*env), usize::from(*queue) % QUEUES.len());
                let s = QueueSettings {
                    paused: *paused,
                    ..self
                        .queue_settings
                        .get(&(e, q))
                        .copied()
                        .unwrap_or_default()
                };
                Call::PutQueue(env_name(e), queue_name(q), s)
            }
            Op::Register { chain: c } => Call::Register(chain(*c)),
            Op::Unregister { pick: i } => match pick(&self.consumers, *i) {
                Some(id) => Call::Unregister(id),
                None => Call::Unregister(ConsumerId(1_000 + u64::from(*i))),
            },
            Op::Inspect { env, queue } => Call::Inspect(
                env_name(self.env_index(*env)),
                queue_name(usize::from(*queue) % QUEUES.len()),
            ),
        }
    }

    /// Learns from the call's answer (the backend's and the model's are equal at this point).
    fn learn(&mut self, c: &Call, out: &Outcome) -> Result<(), String> {
        // An enqueue carrying a claim: what the enqueue and then the claim teach.
        if let (Call::EnqueueClaiming(d, why, req), Outcome::EnqueueClaiming(Ok((p, leased)))) =
            (c, out)
        {
            let enqueued = Enqueued {
                placement: *p,
                effects: Effects::default(),
            };
            self.learn(
                &Call::Enqueue(d.clone(), *why),
                &Outcome::Enqueue(Ok(enqueued)),
            )?;
            return self.learn(
                &Call::Claim(req.clone()),
                &Outcome::Claim(Ok(leased.clone())),
            );
        }
        // A one-step end: what its ack and claim teach, as the two calls would; nothing when
        // refused or not acked.
        if let (Call::FinishFenced(run, token, req, _), Outcome::Fenced(answer)) = (c, out) {
            let Ok(Some(acked)) = answer else {
                return Ok(());
            };
            let claimed = acked.as_ref().ok().and_then(|(_, claimed)| claimed.clone());
            self.learn(
                &Call::Finish(*run, *token),
                &Outcome::Effects(acked.clone().map(|(fx, _)| fx)),
            )?;
            return match (req, claimed) {
                (Some(req), Some(claimed)) => {
                    self.learn(&Call::Claim(req.clone()), &Outcome::Claim(claimed))
                }
                _ => Ok(()),
            };
        }
        // A finish and a claim: what the finish and then the claim teach.
        if let (Call::FinishClaiming(run, token, req), Outcome::FinishClaiming(Ok((fx, claimed)))) =
            (c, out)
        {
            self.learn(
                &Call::Finish(*run, *token),
                &Outcome::Effects(Ok(fx.clone())),
            )?;
            return self.learn(&Call::Claim(req.clone()), &Outcome::Claim(claimed.clone()));
        }
        match (c, out) {
            (Call::Enqueue(d, _), Outcome::Enqueue(Ok(_)))
                if !self.dispatches.iter().any(|x| x.run_id == d.run_id) =>
            {
                self.dispatches.push((**d).clone());
                self.present.insert(d.run_id);
            }
            (Call::Claim(req), Outcome::Claim(Ok(leased))) => {
                if leased.len() > req.max as usize {
                    return Err(format!(
                        "claim of max {} returned {}",
                        req.max,
                        leased.len()
                    ));
                }
                for l in leased {
                    if l.token.0 <= self.max_token {
                        return Err(format!(
                            "token {} not above every earlier token ({})",
                            l.token, self.max_token
                        ));
                    }
                    self.max_token = l.token.0;
                    if l.dispatch.run_after > self.now {
                        return Err(format!(
                            "run {} leased before its run_after",
                            l.dispatch.run_id
                        ));
                    }
                    if !req.envs.iter().any(|s| {
                        s.env == l.dispatch.env
                            && l.dispatch.locked_version.is_none_or(|v| v == s.version)
                    }) {
                        return Err(format!(
                            "run {} claimed by a worker not serving its env/version",
                            l.dispatch.run_id
                        ));
                    }
                    if !req.chain.covers(&l.dispatch.lane) {
                        return Err(format!(
                            "run {} claimed from a lane outside the chain",
                            l.dispatch.run_id
                        ));
                    }
                    self.held.push(Held {
                        run: l.dispatch.run_id,
                        token: l.token,
                        worker: req.worker,
                    });
                    self.granted.push((l.dispatch.run_id, l.token));
                    self.latest_token.insert(l.dispatch.run_id, l.token);
                }
            }
            (Call::Finish(run, token), Outcome::Effects(Ok(_))) => {
                self.forget_lease(*run, *token);
                self.remove(*run);
            }
            (Call::Retry(run, token, _) | Call::Release(run, token), Outcome::Effects(Ok(_))) => {
                self.forget_lease(*run, *token);
            }
            (Call::Cancel(run, _), Outcome::Cancel(Ok(CancelOutcome::Removed { .. }))) => {
                self.remove(*run)
            }
            (Call::Tick, Outcome::Tick(Ok(tick))) => {
                for d in &tick.expired {
                    self.remove(d.run_id);
                }
                // The engine learns of lapsed leases, even those of workers it forgot.
                for l in &tick.lapsed {
                    if !self
                        .held
                        .iter()
                        .any(|h| h.run == l.dispatch.run_id && h.token == l.token)
                    {
                        self.held.push(Held {
                            run: l.dispatch.run_id,
                            token: l.token,
                            worker: WorkerId(0),
                        });
                    }
                }
            }
            (Call::PutEnv(env, s), Outcome::Effects(Ok(_))) => {
                if let Some(i) = ENVS.iter().position(|e| *e == env.as_str()) {
                    self.env_settings[i] = *s;
                    self.created = self.created.max(i + 1).min(self.env_count);
                }
            }
            (Call::PutQueue(env, q, s), Outcome::Effects(Ok(_))) => {
                let e = ENVS.iter().position(|x| *x == env.as_str());
                let qi = QUEUES.iter().position(|x| *x == q.as_str());
                if let (Some(e), Some(qi)) = (e, qi) {
                    self.queue_settings.insert((e, qi), *s);
                }
            }
            (Call::Register(_), Outcome::Consumer(Ok(id))) => self.consumers.push(*id),
            (Call::Unregister(id), Outcome::Effects(Ok(_))) => self.consumers.retain(|c| c != id),
            _ => {}
        }
        Ok(())
    }

    fn forget_lease(&mut self, run: RunId, token: FencingToken) {
        self.held.retain(|h| !(h.run == run && h.token == token));
    }

    fn remove(&mut self, run: RunId) {
        self.present.remove(&run);
        self.removed.insert(run);
        self.held.retain(|h| h.run != run);
    }

    /// STYLE.md's invariants on the backend's snapshot after a step.
    fn check(&mut self, c: &Call, out: &Outcome, snapshot: &[LiveRun]) -> Result<(), String> {
        let now = self.now;
        // A stale token never changes a run: the lease must have been the run's live lease.
        let lease_before = |run: RunId| {
            self.before
                .iter()
                .find(|r| r.dispatch.run_id == run)
                .and_then(|r| r.lease.clone())
        };
        let accepted = match (c, out) {
            (Call::Finish(run, token) | Call::Retry(run, token, _), Outcome::Effects(Ok(_)))
            | (Call::FinishClaiming(run, token, _), Outcome::FinishClaiming(Ok(_))) => {
                Some((*run, *token, true))
            }
            (Call::Release(run, token), Outcome::Effects(Ok(_)))
            | (Call::CheckLease(run, token), Outcome::Check(Ok(())))
            | (Call::FinishFenced(run, token, _, _), Outcome::Fenced(Ok(_))) => {
                Some((*run, *token, false))
            }
            _ => None,
        };
        if let Some((run, token, lapsed_ok)) = accepted {
            if lease_before(run).is_none_or(|l| l.token != token || (l.lapsed && !lapsed_ok)) {
                return Err(format!(
                    "{c:?} accepted a token that was not the run's lease"
                ));
            }
        }
        // A cancel survives a release: a cancelled lease is never handed back to its queue, and
        // only a cancelled live lease is refused for that reason.
        if let Call::Release(run, token) = c {
            let cancelled = lease_before(*run)
                .is_some_and(|l| l.token == *token && !l.lapsed && l.cancel_requested_at.is_some());
            match out {
                Outcome::Effects(Ok(_)) if cancelled => {
                    return Err(format!("{c:?} handed a cancelled run back to its queue"));
                }
                Outcome::Effects(Err(QueueError::CancelRequested(_))) if !cancelled => {
                    return Err(format!("{c:?} refused a lease without a cancel request"));
                }
                _ => {}
            }
        }

        // No run lost, removed runs never reappear, snapshot sorted by run id.
        let ids: Vec<RunId> = snapshot.iter().map(|r| r.dispatch.run_id).collect();
        if !ids.windows(2).all(|w| w[0] < w[1]) {
            return Err("snapshot not sorted by run id (or a run appears twice)".into());
        }
        let held: BTreeSet<RunId> = ids.iter().copied().collect();
        if let Some(back) = held.intersection(&self.removed).next() {
            return Err(format!("removed run {back} reappeared"));
        }
        if held != self.present {
            let lost: Vec<_> = self.present.difference(&held).collect();
            let extra: Vec<_> = held.difference(&self.present).collect();
            return Err(format!(
                "runs lost: {lost:?}, runs never enqueued: {extra:?}"
            ));
        }

        for r in snapshot {
            let id = r.dispatch.run_id;
            // At most one lease, exactly while executing, and it is the latest granted.
            match (&r.lease, r.status) {
                (Some(l), RunStatus::Executing) => {
                    if self.latest_token.get(&id) != Some(&l.token) {
                        return Err(format!(
                            "run {id} holds token {} but the latest granted is {:?}",
                            l.token,
                            self.latest_token.get(&id)
                        ));
                    }
                }
                (None, RunStatus::Delayed | RunStatus::Queued | RunStatus::Ready) => {}
                (lease, status) => {
                    return Err(format!("run {id} is {status} with lease {lease:?}"))
                }
            }
            // Nothing ready or leased before it is due.
            if matches!(
                r.status,
                RunStatus::Queued | RunStatus::Ready | RunStatus::Executing
            ) && r.dispatch.run_after > now
            {
                return Err(format!("run {id} is {} before its run_after", r.status));
            }
            // Attempts only grow.
            let last = self.attempts.entry(id).or_insert(r.dispatch.attempt);
            if r.dispatch.attempt < *last {
                return Err(format!(
                    "run {id} attempt went from {last} to {}",
                    r.dispatch.attempt
                ));
            }
            *last = r.dispatch.attempt;
        }

        // Admissions made in this step: runs ready now that were not ready before (a run that
        // returns to its queue in a tick cannot be re-admitted in the same tick: its lane is
        // orphaned).
        let was_ready = |id: RunId| {
            self.before
                .iter()
                .any(|b| b.dispatch.run_id == id && b.status == RunStatus::Ready)
        };
        let holds = |r: &&LiveRun| {
            r.status == RunStatus::Ready
                || (r.status == RunStatus::Executing && r.lease.as_ref().is_some_and(|l| !l.lapsed))
        };
        for r in snapshot
            .iter()
            .filter(|r| r.status == RunStatus::Ready && !was_ready(r.dispatch.run_id))
        {
            let d = &r.dispatch;
            let e = ENVS
                .iter()
                .position(|x| *x == d.env.as_str())
                .ok_or("unknown env admitted")?;
            let q = QUEUES
                .iter()
                .position(|x| *x == d.queue.as_str())
                .ok_or("unknown queue admitted")?;
            let env = self.env_settings[e];
            let qs = self
                .queue_settings
                .get(&(e, q))
                .copied()
                .unwrap_or_default();
            let in_env = |x: &&LiveRun| x.dispatch.env == d.env;
            let fast = d.lane.is_fast_lane();
            let env_running = snapshot
                .iter()
                .filter(in_env)
                .filter(holds)
                .filter(|x| x.dispatch.lane.is_fast_lane() == fast)
                .count();
            let queue_running = snapshot
                .iter()
                .filter(in_env)
                .filter(|x| x.dispatch.queue == d.queue)
                .filter(holds)
                .count();
            let key_running = snapshot
                .iter()
                .filter(in_env)
                .filter(|x| x.dispatch.queue == d.queue && x.dispatch.key == d.key)
                .filter(holds)
                .count();
            let over = |count: usize, cap: u32| count > cap as usize;
            let why = if qs.paused {
                Some("its queue is paused".to_owned())
            } else if fast && over(env_running, env.fast_lane_cap()) {
                Some(format!(
                    "fast_lane_running {env_running} > fast_lane_limit {}",
                    env.fast_lane_cap()
                ))
            } else if !fast && over(env_running, env_cap(env.limit, env.burst)) {
                Some(format!(
                    "env running {env_running} > cap {}",
                    env_cap(env.limit, env.burst)
                ))
            } else if over(key_running, key_cap(qs.limit, env.limit)) {
                Some(format!(
                    "key running {key_running} > cap {}",
                    key_cap(qs.limit, env.limit)
                ))
            } else if qs.key_total_limit.is_some_and(|t| over(queue_running, t)) {
                Some(format!(
                    "queue running {queue_running} > key_total_limit {:?}",
                    qs.key_total_limit
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("run {} admitted over a limit: {why}", d.run_id));
            }
            // Priority then FIFO within the key: nothing still queued in the key goes before it.
            let mine = score(d.run_after, d.priority, d.run_id);
            if let Some(ahead) = snapshot.iter().find(|x| {
                x.status == RunStatus::Queued
                    && x.dispatch.env == d.env
                    && x.dispatch.queue == d.queue
                    && x.dispatch.key == d.key
                    && score(x.dispatch.run_after, x.dispatch.priority, x.dispatch.run_id) < mine
            }) {
                return Err(format!(
                    "run {} admitted ahead of {} in score order",
                    d.run_id, ahead.dispatch.run_id
                ));
            }
        }
        self.before = snapshot.to_vec();
        Ok(())
    }
}

/// How often each interesting answer was seen, over all cases of a run: the generator must
/// reach every path of dispatch.md, or the comparison proves little.
mod coverage {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The counted events.
    pub const NAMES: [&str; 31] = [
        "enqueue ready",
        "enqueue queued",
        "enqueue delayed",
        "enqueue queue_full",
        "enqueue fast_lane_full",
        "enqueue invalid",
        "claim granted",
        "claim empty",
        "enqueue claiming granted",
        "enqueue claiming empty",
        "finish claiming granted",
        "finish claiming empty",
        "fenced end acked",
        "fenced end not written",
        "heartbeat alive",
        "heartbeat cancel_requested",
        "heartbeat lost",
        "finish ok",
        "stale token refused",
        "retry ok",
        "release ok",
        "release cancel_requested",
        "cancel removed",
        "cancel requested",
        "reschedule ok",
        "reschedule wrong_state",
        "tick expired",
        "tick lapsed",
        "tick timed_out",
        "tick cancel_elapsed",
        "tick ready_returned",
    ];

    /// Counts of one property run (shared by its cases, which proptest runs one by one).
    #[derive(Default)]
    pub struct Coverage([AtomicU64; 31]);

    impl Coverage {
        /// Counts one event by name.
        pub fn hit(&self, name: &str) {
            if let Some(i) = NAMES.iter().position(|n| *n == name) {
                self.0[i].fetch_add(1, Ordering::Relaxed);
            }
        }

        /// The counts so far, by name.
        pub fn counts(&self) -> Vec<(&'static str, u64)> {
            NAMES
                .iter()
                .zip(self.0.iter())
                .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
                .collect()
        }
    }
}

fn count(coverage: &coverage::Coverage, c: &Call, out: &Outcome) {
    let hit = |name: &str| coverage.hit(name);
    match out {
        Outcome::Enqueue(Ok(e)) => hit(match e.placement {
            Placement::Ready => "enqueue ready",
            Placement::Queued => "enqueue queued",
            Placement::Delayed => "enqueue delayed",
        }),
        Outcome::Enqueue(Err(QueueError::QueueFull { .. })) => hit("enqueue queue_full"),
        Outcome::Enqueue(Err(QueueError::FastLaneFull { .. })) => hit("enqueue fast_lane_full"),
        Outcome::Enqueue(Err(QueueError::Invalid(_))) => hit("enqueue invalid"),
        Outcome::Claim(Ok(l)) => hit(if l.is_empty() {
            "claim empty"
        } else {
            "claim granted"
        }),
        Outcome::EnqueueClaiming(Ok((_, l))) => hit(if l.is_empty() {
            "enqueue claiming empty"
        } else {
            "enqueue claiming granted"
        }),
        Outcome::FinishClaiming(Ok((_, Ok(l)))) => hit(if l.is_empty() {
            "finish claiming empty"
        } else {
            "finish claiming granted"
        }),
        Outcome::FinishClaiming(Err(QueueError::StaleToken(_))) => hit("stale token refused"),
        Outcome::Fenced(Ok(Some(Ok(_)))) => hit("fenced end acked"),
        Outcome::Fenced(Ok(None)) => hit("fenced end not written"),
        Outcome::Fenced(Err(QueueError::StaleToken(_))) => hit("stale token refused"),
        Outcome::Heartbeat(Ok(states)) => {
            for s in states {
                hit(match s {
                    LeaseState::Alive => "heartbeat alive",
                    LeaseState::CancelRequested => "heartbeat cancel_requested",
                    LeaseState::Lost => "heartbeat lost",
                });
            }
        }
        Outcome::Effects(Ok(_)) => match c {
            Call::Finish(..) => hit("finish ok"),
            Call::Retry(..) => hit("retry ok"),
            Call::Release(..) => hit("release ok"),
            Call::Reschedule(..) => hit("reschedule ok"),
            _ => {}
        },
        Outcome::Effects(Err(QueueError::CancelRequested(_))) => hit("release cancel_requested"),
        Outcome::Effects(Err(QueueError::StaleToken(_)))
        | Outcome::Check(Err(QueueError::StaleToken(_))) => hit("stale token refused"),
        Outcome::Effects(Err(QueueError::WrongState { .. })) => hit("reschedule wrong_state"),
        Outcome::Cancel(Ok(CancelOutcome::Removed { .. })) => hit("cancel removed"),
        Outcome::Cancel(Ok(CancelOutcome::Requested { .. })) => hit("cancel requested"),
        Outcome::Tick(Ok(t)) => {
            for (name, n) in [
                ("tick expired", t.expired.len()),
                ("tick lapsed", t.lapsed.len()),
                ("tick timed_out", t.timed_out.len()),
                ("tick cancel_elapsed", t.cancel_elapsed.len()),
                ("tick ready_returned", t.ready_returned.len()),
            ] {
                for _ in 0..n {
                    hit(name);
                }
            }
        }
        _ => {}
    }
}

fn placement_of(out: &Outcome) -> Option<Placement> {
    match out {
        Outcome::Enqueue(Ok(e)) => Some(e.placement),
        _ => None,
    }
}

/// Runs one case on the model and on the backend made by `sut`.
/// What a backend checks of its own state beyond what the model compares (the memory backend:
/// its indexes and counters agree with its runs, no idle key state is kept), after every step.
trait OwnInvariants {
    fn own_invariants(&self) -> Result<(), String> {
        Ok(())
    }
}

impl OwnInvariants for MemoryQueue {
    fn own_invariants(&self) -> Result<(), String> {
        self.check_invariants()
    }
}

impl OwnInvariants for runlane_redis::RedisQueue {}

impl OwnInvariants for ModelQueue {}

fn run_case<B: QueueBackend + OwnInvariants>(
    case: &Case,
    sut: impl Fn() -> B,
    coverage: &coverage::Coverage,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(format!("runtime: {e}")))?;
    let model = ModelQueue::new(READY_TIMEOUT);
    let real = sut();
    let env_count = case.envs.len();
    let mut driver = Driver {
        now: EPOCH,
        env_count,
        created: 0,
        next_run: 1,
        dispatches: Vec::new(),
        present: BTreeSet::new(),
        removed: BTreeSet::new(),
        held: Vec::new(),
        granted: Vec::new(),
        latest_token: BTreeMap::new(),
        max_token: 0,
        attempts: BTreeMap::new(),
        consumers: Vec::new(),
        env_settings: vec![EnvSettings::default(); ENVS.len()],
        queue_settings: BTreeMap::new(),
        before: Vec::new(),
    };

    // Setup, applied and compared like any step.
    let mut setup: Vec<Call> = case
        .envs
        .iter()
        .enumerate()
        .map(|(i, e)| Call::PutEnv(env_name(i), e.settings()))
        .collect();
    if case.consumer_at_start {
        setup.push(Call::Register(ClaimChain::Preference(vec![])));
    }
    rt.block_on(async {
        let custom = lane_name("custom");
        let (a, b) = (model.add_lane(&custom).await, real.add_lane(&custom).await);
        if a != b {
            return Err(TestCaseError::fail(format!(
                "add_lane: model {a:?}, backend {b:?}"
            )));
        }
        Ok(())
    })?;

    let setup_len = setup.len();
    let steps = setup
        .into_iter()
        .map(|c| (None, Some(c)))
        .chain(case.ops.iter().flatten().map(|op| (Some(op), None)));
    for (step, (op, pre)) in steps.enumerate() {
        let c = match (op, pre) {
            (Some(op), _) => driver.resolve(op),
            (None, Some(c)) => c,
            (None, None) => Call::Nothing,
        };
        let now = driver.now;
        let envs = driver.env_names();
        let (want, got, want_view, got_view) = rt.block_on(async {
            let want = call(&model, &c, now).await;
            let got = call(&real, &c, now).await;
            (
                want,
                got,
                view(&model, &envs).await,
                view(&real, &envs).await,
            )
        });
        let fail = |what: &str, detail: String| {
            let at = match step.checked_sub(setup_len) {
                Some(i) => format!("operation {i}"),
                None => format!("setup step {step}"),
            };
            TestCaseError::fail(format!(
                "{at} ({op:?}) at {now}: {what}\n  call: {c:?}\n{detail}"
            ))
        };
        if want != got {
            return Err(fail(
                "answers differ",
                format!("  model:   {want:?}\n  backend: {got:?}"),
            ));
        }
        if want_view.snapshot != got_view.snapshot {
            return Err(fail(
                "snapshots differ",
                snapshot_diff(&want_view.snapshot, &got_view.snapshot),
            ));
        }
        if want_view.deadline != got_view.deadline {
            return Err(fail(
                "next_deadline differs",
                format!(
                    "  model:   {:?}\n  backend: {:?}",
                    want_view.deadline, got_view.deadline
                ),
            ));
        }
        if want_view.usage != got_view.usage {
            return Err(fail(
                "env_usage differs",
                format!(
                    "  model:   {:?}\n  backend: {:?}",
                    want_view.usage, got_view.usage
                ),
            ));
        }
        let snapshot = got_view
            .snapshot
            .map_err(|e| fail("snapshot failed", format!("  {e:?}")))?;
        real.own_invariants()
            .map_err(|e| fail("the backend's own invariants", format!("  {e}")))?;
        // A fresh run admitted by the fast path must be ready in the snapshot.
        if let (Call::Enqueue(d, _), Some(Placement::Ready)) = (&c, placement_of(&got)) {
            if !snapshot
                .iter()
                .any(|r| r.dispatch.run_id == d.run_id && r.status.holds_slots())
            {
                return Err(fail(
                    "placement Ready but the run holds no slot",
                    String::new(),
                ));
            }
        }
        count(coverage, &c, &got);
        driver
            .learn(&c, &got)
            .map_err(|e| fail("invariant", format!("  {e}")))?;
        driver
            .check(&c, &got, &snapshot)
            .map_err(|e| fail("invariant", format!("  {e}")))?;
        // Usage agrees with the snapshot.
        for (i, usage) in got_view.usage.iter().enumerate() {
            let usage = usage
                .clone()
                .map_err(|e| fail("env_usage failed", format!("  {e:?}")))?;
            let env = env_name(i);
            let count = |fast: bool| {
                let n = snapshot
                    .iter()
                    .filter(|r| r.dispatch.env == env && r.dispatch.lane.is_fast_lane() == fast)
                    .filter(|r| {
                        r.status == RunStatus::Ready
                            || (r.status == RunStatus::Executing
                                && r.lease.as_ref().is_some_and(|l| !l.lapsed))
                    })
                    .count();
                u32::try_from(n).unwrap_or(u32::MAX)
            };
            let want = EnvUsage {
                running: count(false),
                fast_lane_running: count(true),
            };
            if usage != want {
                return Err(fail(
                    "env_usage disagrees with the snapshot",
                    format!("  {usage:?} vs {want:?}"),
                ));
            }
        }
    }
    Ok(())
}

fn snapshot_diff(a: &R<Vec<LiveRun>>, b: &R<Vec<LiveRun>>) -> String {
    let (Ok(a), Ok(b)) = (a, b) else {
        return format!("  model:   {a:?}\n  backend: {b:?}");
    };
    let mut out = String::new();
    let ids: BTreeSet<RunId> = a.iter().chain(b).map(|r| r.dispatch.run_id).collect();
    for id in ids {
        let x = a.iter().find(|r| r.dispatch.run_id == id);
        let y = b.iter().find(|r| r.dispatch.run_id == id);
        if x != y {
            let _ = writeln!(out, "  run {id}\n    model:   {x:?}\n    backend: {y:?}");
        }
    }
    out
}

fn render(case: &Case) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "envs: {:?}\nconsumer_at_start: {}",
        case.envs, case.consumer_at_start
    );
    let active: Vec<&Op> = case.ops.iter().flatten().collect();
    let _ = writeln!(
        out,
        "{} active operations of {}:",
        active.len(),
        case.ops.len()
    );
    for (i, op) in active.iter().enumerate() {
        let _ = writeln!(out, "  {i:3}: {op:?}");
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs the property with the configured cases and seed; panics with the seed and the minimal
/// failing sequence.
fn check_against<B: QueueBackend + OwnInvariants>(sut: impl Fn() -> B, default_cases: u32) {
    let cases = env_u64("RUNLANE_PROPTEST_CASES")
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(default_cases);
    let seed = env_u64("RUNLANE_PROPTEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let config = Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 20_000,
        max_shrink_time: 300_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let coverage = coverage::Coverage::default();
    match runner.run(&case(), |case| run_case(&case, &sut, &coverage)) {
        Ok(()) => {}
        Err(TestError::Fail(reason, minimal)) => panic!(
            "model-based property failed (RUNLANE_PROPTEST_SEED={seed}, {cases} cases)\n{reason}\nminimal failing sequence:\n{}",
            render(&minimal)
        ),
        Err(TestError::Abort(reason)) => panic!("aborted (RUNLANE_PROPTEST_SEED={seed}): {reason}"),
    }
    let counts = coverage.counts();
    println!("coverage after {cases} cases (seed {seed}): {counts:?}");
    // Rare events are seen tens of times per 1,000 cases; small runs do not assert coverage.
    if cases >= 500 {
        let missed: Vec<&str> = counts
            .iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| *name)
            .collect();
        assert!(
            missed.is_empty(),
            "the generator never reached: {missed:?} (seed {seed})"
        );
    }
}

#[test]
fn model_and_memory_backend_agree_after_every_step() {
    check_against(
        || {
            MemoryQueue::new(MemoryConfig {
                ready_timeout: READY_TIMEOUT,
            })
        },
        1_000,
    );
}

/// The same property against the Redis backend (`runlane-redis`) on the server at
/// `RUNLANE_REDIS_URL` (default `redis://127.0.0.1:6379`), one fresh key prefix per case, deleted
/// when the case ends. 100 cases by default (each step also compares a full snapshot, which costs
/// a round of Redis reads); `RUNLANE_PROPTEST_CASES` overrides it.
#[test]
fn model_and_redis_backend_agree_after_every_step() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    // The connection's driver task lives on this runtime for the whole test, while each case
    // drives the backend from its own runtime.
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("redis driver runtime")
    });
    let url =
        std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    check_against(
        || {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let mut config = runlane_redis::RedisConfig::new(url.clone())
                .with_prefix(format!("rl:test:prop:{}:{n}", std::process::id()));
            config.ready_timeout = READY_TIMEOUT;
            config.response_timeout = Duration::from_secs(5);
            rt.block_on(runlane_redis::RedisQueue::open(config))
                .expect("redis must be reachable (set RUNLANE_REDIS_URL)")
                .delete_keys_on_drop()
        },
        100,
    );
}

/// The model against itself: the comparison is trivial, so this checks that the model keeps
/// every invariant on its own (it stays meaningful whatever state the backend is in).
#[test]
fn model_satisfies_the_invariants() {
    check_against(|| ModelQueue::new(READY_TIMEOUT), 200);
}
