//! In-process workers: handlers, workloops, heartbeats, cancellation, drain.
//!
//! A worker owns one task per workloop, one heartbeat task and one task per executing run
//! (a handler runs in its run's task, so a panic fails only its attempt and an abort drops
//! it). Workloops claim only for their free slots and, when nothing is ready, wait on their
//! lanes' doorbells: no polling. A run task whose slot is still held once its run's end is
//! written (a store that does not group-commit) claims the workloop's next run itself and runs
//! it in the same task ([`run_slot`]). `stop` drains (SPEC §5); `crash` abandons everything so
//! tests can watch lapsed leases being recovered.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runlane_core::admission::{env_cap, key_cap};
use runlane_core::backend::{
    AttemptEnd, ClaimRequest, ConsumerId, LeaseState, Leased, OfferSteps, ParkedOffer,
    QueueBackend, ServedEnv, ToStart,
};
use runlane_core::{
    CancelReason, ClaimChain, EnvName, FencingToken, InvalidInput, LaneName, QueueError, QueueName,
    RunId, RunStatus, Scope, StoreError, TaskName, Timestamp, TriggerSource, WorkerId,
    WorkloopSpec,
};
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::doorbell::any_of;
use crate::engine::{attempt_record, Engine, Inner, Released};
use crate::error::EngineError;
use crate::handover::Handed;
use crate::local::{AbortKind, Latch, LocalRun};
use crate::offer::{Offer, Taken};
use crate::trigger::{TriggerRequest, WaitOutcome};
use runlane_core::idhash::IdBuild;

/// The backoff after a failing claim, first and largest.
const CLAIM_BACKOFF_MIN: Duration = Duration::from_millis(100);
const CLAIM_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Backoff between writes of an attempt's end while the store is unavailable.
const END_RETRY_MIN: Duration = Duration::from_millis(50);
const END_RETRY_MAX: Duration = Duration::from_secs(2);

/// Attempts whose handler returned that may wait for their end to be written, per slot of a
/// workloop (see [`Slot`]): deep enough that a durable store commits many ends per fsync. The
/// completer keeps two batches in flight, so a batch holds up to about half of
/// `slots × ENDING_PER_SLOT` ends (512 with 16 slots; with 16 per slot it was 128, and an
/// embedded drain paid one commit per ~100 runs).
const ENDING_PER_SLOT: usize = 64;

/// A handler's failure: the attempt fails with this message and the retry policy applies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    /// A failure with a message.
    pub fn new(msg: impl Into<String>) -> Self {
        HandlerError(msg.into())
    }
}

/// Fires once with a reason; handlers await it or poll it.
#[derive(Clone, Debug)]
pub struct CancelToken {
    latch: Arc<Latch<CancelReason>>,
}

impl CancelToken {
    pub(crate) fn from_latch(latch: Arc<Latch<CancelReason>>) -> Self {
        CancelToken { latch }
    }

    /// The reason, once fired.
    pub fn reason(&self) -> Option<CancelReason> {
        self.latch.get()
    }

    /// Whether the token fired.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }

    /// Completes when fired, with the reason.
    pub async fn cancelled(&self) -> CancelReason {
        self.latch.wait().await
    }
}

struct ContextInner {
    engine: Engine,
    run_id: RunId,
    task: TaskName,
    attempt: u32,
    payload: Arc<str>,
    cancel: CancelToken,
    env: EnvName,
    queue: QueueName,
    key: Arc<str>,
    lane: LaneName,
}

/// What a handler receives.
#[derive(Clone)]
pub struct RunContext {
    inner: Arc<ContextInner>,
}

impl RunContext {
    /// The run.
    pub fn run_id(&self) -> RunId {
        self.inner.run_id
    }

    /// The task.
    pub fn task(&self) -> &TaskName {
        &self.inner.task
    }

    /// The env.
    pub fn env(&self) -> &EnvName {
        &self.inner.env
    }

    /// The attempt, 1-based.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The payload as JSON text.
    pub fn payload_text(&self) -> &str {
        &self.inner.payload
    }

    /// The payload deserialized.
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(&self.inner.payload)
            .map_err(|e| HandlerError::new(format!("payload does not match: {e}")))
    }

    /// The cancellation token.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.inner.cancel
    }

    /// Reports progress (kept in memory, published as a run event).
    pub fn progress<T: serde::Serialize>(&self, value: &T) {
        match serde_json::to_string(value) {
            Ok(text) => {
                let engine = &self.inner.engine.inner;
                engine.events.progress(
                    self.inner.run_id,
                    &self.inner.env,
                    engine.now(),
                    Arc::from(text),
                );
            }
            Err(e) => {
                tracing::warn!(run = %self.inner.run_id, error = %e, "progress not serializable")
            }
        }
    }

    /// The engine, to trigger other runs.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Triggers and waits from inside this handler; refused with `WaitDeadlock` when the child
    /// needs a slot this handler holds in a scope whose limit is 1.
    pub async fn trigger_and_wait(
        &self,
        request: TriggerRequest,
        timeout: Duration,
    ) -> Result<WaitOutcome, EngineError> {
        let engine = &self.inner.engine;
        engine.inner.check_open()?;
        let request = TriggerRequest {
            source: TriggerSource::Sync,
            ..request
        };
        let now = engine.now();
        let prepared = engine.prepare(&request, now, None).await?;
        if let Some(scope) = self.shared_exhausted_scope(&prepared.record).await? {
            return Err(EngineError::WaitDeadlock { scope });
        }
        let triggered = engine.commit(prepared, now).await?;
        engine.wait(triggered.run.id, timeout).await
    }

    /// The scope the child would share with this run whose limit leaves no room for both.
    async fn shared_exhausted_scope(
        &self,
        child: &runlane_core::backend::RunRecord,
    ) -> Result<Option<Scope>, EngineError> {
        let me = &self.inner;
        if child.env != me.env {
            return Ok(None);
        }
        let engine = &me.engine.inner;
        let settings = engine.env_settings(&me.env).await?;
        let (mine_fast, child_fast) = (me.lane.is_fast_lane(), child.lane.is_fast_lane());
        if !mine_fast && !child_fast && env_cap(settings.limit, settings.burst) <= 1 {
            return Ok(Some(Scope::Env));
        }
        if mine_fast && child_fast && settings.fast_lane_cap() <= 1 {
            return Ok(Some(Scope::FastLane));
        }
        if child.queue == me.queue {
            let queue = engine.queue.queue_settings(&me.env, &me.queue).await?;
            if child.key == me.key && key_cap(queue.limit, settings.limit) <= 1 {
                return Ok(Some(Scope::QueueKey));
            }
            if queue.key_total_limit.is_some_and(|l| l <= 1) {
                return Ok(Some(Scope::QueueTotal));
            }
        }
        Ok(None)
    }
}

/// The boxed handler future.
pub type HandlerFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<serde_json::Value, HandlerError>> + Send>>;

/// A registered handler.
pub type Handler = Arc<dyn Fn(RunContext) -> HandlerFuture + Send + Sync>;

/// Builds a worker: envs, handlers, workloops.
pub struct WorkerBuilder {
    engine: Engine,
    envs: Vec<(String, Option<u32>)>,
    envs_given: bool,
    handlers: BTreeMap<TaskName, Handler>,
    error: Option<InvalidInput>,
    workloops: Option<String>,
    lease: Option<Duration>,
    stop_timeout: Option<Duration>,
}

impl WorkerBuilder {
    /// A builder on `engine` serving env `default` with one workloop of 1 slot on `manual>*`.
    pub fn new(engine: Engine) -> Self {
        WorkerBuilder {
            engine,
            envs: vec![("default".to_owned(), None)],
            envs_given: false,
            handlers: BTreeMap::new(),
            error: None,
            workloops: None,
            lease: None,
            stop_timeout: None,
        }
    }

    fn add_env(mut self, env: &str, version: Option<u32>) -> Self {
        if !self.envs_given {
            self.envs.clear();
            self.envs_given = true;
        }
        self.envs.push((env.to_owned(), version));
        self
    }

    /// Serve this env at its current version (replaces the default env on first call).
    pub fn env(self, env: &str) -> Self {
        self.add_env(env, None)
    }

    /// Serve this env at this version.
    pub fn env_version(self, env: &str, version: u32) -> Self {
        self.add_env(env, Some(version))
    }

    /// Registers a plain `async fn` handler for `task`.
    pub fn handler<F, Fut>(mut self, task: &str, f: F) -> Self
    where
        F: Fn(RunContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'static,
    {
        match TaskName::new(task) {
            Ok(name) => {
                let handler: Handler = Arc::new(move |ctx| Box::pin(f(ctx)));
                self.handlers.insert(name, handler);
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// The workloops spec, e.g. `fast_lane:1 manual>*:4`.
    pub fn workloops(mut self, spec: &str) -> Self {
        self.workloops = Some(spec.to_owned());
        self
    }

    /// Overrides the lease duration.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Overrides the drain timeout.
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = Some(d);
        self
    }

    /// Starts the worker.
    pub async fn start(self) -> Result<Worker, EngineError> {
        let engine = self.engine;
        let inner = &engine.inner;
        inner.check_open()?;
        if let Some(e) = self.error {
            return Err(e.into());
        }
        let spec = match &self.workloops {
            Some(text) => WorkloopSpec::parse(text)?,
            None => WorkloopSpec::single(1),
        };
        let Prepared {
            envs,
            lease,
            consumers,
        } = prepare(inner, &self.envs, &spec, self.lease).await?;

        let (stop_tx, _) = watch::channel(false);
        let shared = Arc::new(WorkerShared {
            id: inner.next_worker_id(),
            engine: engine.clone(),
            envs,
            handlers: self.handlers,
            lease,
            stop_timeout: self.stop_timeout.unwrap_or(inner.config.stop_timeout),
            in_flight: Mutex::new(HashMap::default()),
            changed: Notify::new(),
            stop: stop_tx,
            runs: Mutex::new(JoinSet::new()),
            released: AtomicU32::new(0),
        });
        let loops = spec
            .0
            .iter()
            .zip(consumers)
            .map(|(w, consumer)| {
                tokio::spawn(workloop(shared.clone(), w.chain.clone(), w.slots, consumer))
            })
            .collect();
        let heartbeat = tokio::spawn(heartbeat(shared.clone()));
        // Registering consumers may have admitted runs into lanes nobody was told about.
        inner.bells.ring_all();
        Ok(Worker {
            shared,
            loops,
            heartbeat: Some(heartbeat),
        })
    }
}

/// What a worker (in-process or remote) registers before it claims.
pub(crate) struct Prepared {
    /// The envs served, at their versions.
    pub(crate) envs: Vec<ServedEnv>,
    /// The lease duration.
    pub(crate) lease: Duration,
    /// One consumer per workloop, in order.
    pub(crate) consumers: Vec<ConsumerId>,
}

/// Checks a worker's settings (slots, lease, envs and versions) and registers one consumer per
/// workloop; nothing is registered when a check fails.
pub(crate) async fn prepare(
    inner: &Inner,
    served: &[(String, Option<u32>)],
    spec: &WorkloopSpec,
    lease: Option<Duration>,
) -> Result<Prepared, EngineError> {
    if spec.0.iter().any(|w| w.slots == 0) {
        return Err(InvalidInput::new("workloops", "every workloop needs at least 1 slot").into());
    }
    let lease = lease.unwrap_or(inner.config.lease);
    if lease.is_zero() {
        return Err(InvalidInput::new("lease", "must be greater than zero").into());
    }
    let mut envs: Vec<ServedEnv> = Vec::new();
    for (name, version) in served {
        let env = EnvName::new(name)?;
        inner.env_settings(&env).await?;
        let version = match version {
            Some(v) => {
                if inner
                    .meta
                    .version(inner.store.as_ref(), &env, *v)
                    .await?
                    .is_none()
                {
                    return Err(EngineError::UnknownVersion {
                        version: *v,
                        task: String::new(),
                    });
                }
                *v
            }
            None => inner.meta.current(inner.store.as_ref(), &env).await?.0,
        };
        if !envs.iter().any(|s| s.env == env) {
            envs.push(ServedEnv { env, version });
        }
    }

    let now = inner.now();
    let mut consumers: Vec<ConsumerId> = Vec::new();
    for workloop in &spec.0 {
        match inner.queue.register_consumer(&workloop.chain, now).await {
            Ok(id) => consumers.push(id),
            Err(e) => {
                for id in consumers {
                    let _ = inner.queue.unregister_consumer(id, now).await;
                }
                return Err(e.into());
            }
        }
    }
    Ok(Prepared {
        envs,
        lease,
        consumers,
    })
}

/// Unregisters a workloop's consumer and applies what that changed (orphaned lanes).
pub(crate) async fn unregister(engine: &Inner, worker: WorkerId, consumer: ConsumerId) {
    match engine
        .queue
        .unregister_consumer(consumer, engine.now())
        .await
    {
        Ok(effects) => engine.apply(effects, None).await,
        Err(e) => {
            tracing::warn!(worker = %worker, error = %e, "unregistering a consumer failed")
        }
    }
}

/// What the worker's tasks share.
struct WorkerShared {
    id: WorkerId,
    engine: Engine,
    envs: Vec<ServedEnv>,
    handlers: BTreeMap<TaskName, Handler>,
    lease: Duration,
    stop_timeout: Duration,
    in_flight: Mutex<HashMap<RunId, Arc<LocalRun>, IdBuild>>,
    /// Rung when the first run starts (a heartbeat waiting with no timer arms one) and when
    /// the last one ends (drain waiting): not per run.
    changed: Notify,
    stop: watch::Sender<bool>,
    runs: Mutex<JoinSet<()>>,
    released: AtomicU32,
}

impl WorkerShared {
    fn in_flight(&self) -> MutexGuard<'_, HashMap<RunId, Arc<LocalRun>, IdBuild>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn runs(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a claimed run as executing here (the engine's registry and this worker's), as
    /// soon as it has a slot and before its task first runs, so a drain that begins meanwhile
    /// counts it; the guard takes it out again, even if the task never ran (aborted). Whether
    /// it was the first in flight is answered too: its task then arms the heartbeat when it
    /// runs (woken here, the heartbeat task would run before the run's task: ~30 µs more of
    /// an idle memory run's start, measured).
    fn register(self: &Arc<Self>, leased: &Leased) -> Registered<'static> {
        self.register_as(leased, SharedRef::Owned(self.clone()))
    }

    /// [`WorkerShared::register`] for a run its slot's task goes on to: the guard borrows the
    /// task's reference (no count bumped per run on a line both worker threads write).
    fn register_in(&self, leased: &Leased) -> Registered<'_> {
        self.register_as(leased, SharedRef::Borrowed(self))
    }

    fn register_as<'a>(&self, leased: &Leased, shared: SharedRef<'a>) -> Registered<'a> {
        let run = leased.dispatch.run_id;
        let local = Arc::new(LocalRun::new(run, leased.token));
        self.engine.inner.local.insert(local.clone());
        // Loaded already: nothing read ahead for this run may serve a later attempt. After the
        // registration: a read ahead marked before this is dropped here, one marked after it
        // sees the run executing (`Engine::read_ahead`).
        self.engine.inner.handover.drop_read_ahead(run);
        let first = {
            let mut in_flight = self.in_flight();
            let was_empty = in_flight.is_empty();
            in_flight.insert(run, local.clone());
            was_empty
        };
        let guard = InFlightGuard {
            shared,
            run,
            token: leased.token,
        };
        Registered {
            local,
            _guard: guard,
            first,
        }
    }

    fn spawn_run(
        self: &Arc<Self>,
        lp: &Arc<LoopShared>,
        leased: Leased,
        permit: OwnedSemaphorePermit,
        loaded: Loaded,
    ) {
        let registered = self.register(&leased);
        let mut runs = self.runs();
        // Reap finished runs so the set stays as large as what is in flight.
        while runs.try_join_next().is_some() {}
        let first = (leased, registered, permit, loaded);
        // Boxed: the task's cell holds a pointer, not the ~4 KiB future (tokio moves the future
        // into the cell at the spawn and writes its stage over when the task ends).
        runs.spawn(Box::pin(run_slot(self.clone(), lp.clone(), first)));
    }
}

/// What a workloop shares with the run tasks it spawns: its semaphores and the claim a run
/// task repeats for its slot.
struct LoopShared {
    /// The workloop's slots.
    slots: Arc<Semaphore>,
    /// The attempts whose handler returned, waiting for their end (see [`Slot`]).
    ending: Arc<Semaphore>,
    /// The workloop's claim for one run.
    one: ClaimRequest,
}

/// One run task: runs the attempt it was spawned with, then, while its slot is still held
/// (the store ends attempts without batching, so the slot stays with the run until its end is
/// written), claims the workloop's next run itself and runs it in the same task. Under load a
/// slot goes from run to run without a task spawned or a workloop woken per run; when the
/// claim finds nothing, the slot goes back to the workloop, which waits on the doorbells.
async fn run_slot(shared: Arc<WorkerShared>, lp: Arc<LoopShared>, first: ToRun<'static>) {
    let mut next = Some(first);
    let mut continued = false;
    while let Some((leased, registered, permit, loaded)) = next.take() {
        let slot = Slot {
            permit,
            ending: &lp.ending,
        };
        let turn = Turn {
            slot,
            next: &lp.one,
        };
        let Some((permit, claimed)) =
            execute(&shared, leased, registered, turn, loaded, continued).await
        else {
            break;
        };
        next = claim_next(&shared, &lp, permit, claimed)
            .await
            .map(|(leased, permit, loaded)| {
                let registered = shared.register_in(&leased);
                (leased, registered, permit, loaded)
            });
        continued = true;
    }
}

/// A run with its slot, registered, and what was loaded of it.
type ToRun<'a> = (Leased, Registered<'a>, OwnedSemaphorePermit, Loaded);

/// A run registered in flight ([`WorkerShared::register`]).
struct Registered<'a> {
    local: Arc<LocalRun>,
    /// Takes the run out of the registries when dropped.
    _guard: InFlightGuard<'a>,
    /// It was the first in flight: the heartbeat is armed when its task runs.
    first: bool,
}

/// A run task's claim for the slot it holds: one run, unless the worker is stopping. The
/// leases of a claim made with the last run's ack (`claimed`) are taken as this claim's (a
/// drain that began after that claim hands its run back, unstarted: see [`execute`]).
async fn claim_next(
    shared: &WorkerShared,
    lp: &LoopShared,
    permit: OwnedSemaphorePermit,
    claimed: Option<Vec<Leased>>,
) -> Option<(Leased, OwnedSemaphorePermit, Loaded)> {
    let engine = &shared.engine.inner;
    let claimed = match claimed {
        // Made by an in-process queue in the ack's step, which answered at once: its leases
        // start from the instant the end was written, so none can be late (no renewal check).
        Some(leases) => Ok(leases),
        None if *shared.stop.borrow() => return None,
        None => claim(engine, &lp.one).await,
    };
    let mut leases = match claimed {
        Ok(leases) => leases,
        Err(e) => {
            // The workloop claims again with its backoff once the slot is back.
            tracing::debug!(worker = %shared.id, error = %e, "claim for a freed slot failed");
            return None;
        }
    };
    if leases.is_empty() {
        return None;
    }
    engine.claimed(&leases);
    for extra in leases.drain(1..) {
        // Boxed: a broken claim contract is rare, and its future would grow every claim's.
        Box::pin(hand_back_excess(engine, &extra)).await;
    }
    let leased = leases.pop()?;
    // A run triggered here is handed over; only another is read back (one lease, no vectors).
    let loaded = match engine.handover.take(leased.dispatch.run_id) {
        Some(handed) => Loaded::Handed(handed),
        None => load_claimed(engine, std::slice::from_ref(&leased))
            .await
            .pop()?,
    };
    Some((leased, permit, loaded))
}

/// A lease beyond the free slots (the backend broke the claim contract): handed back rather
/// than run past the workloop's capacity.
async fn hand_back_excess(engine: &Inner, leased: &Leased) {
    tracing::error!(run = %leased.dispatch.run_id, "claim returned more runs than free slots");
    release_unstarted(engine, leased).await;
}

/// A lease this worker will not run goes back to its queue (same attempt), as a drain does.
async fn release_unstarted(engine: &Inner, leased: &Leased) {
    let d = &leased.dispatch;
    if let Err(e) = engine
        .release_leased(d.run_id, leased.token, &d.env, d.attempt)
        .await
    {
        tracing::warn!(run = %d.run_id, error = %e, "release failed; the lease will lapse");
    }
}

/// A workloop slot held by one run: the permit of its handler, and the semaphore its attempt's
/// end waits on once the handler is done.
///
/// A slot bounds the handlers a workloop runs at once. With a store that group-commits, when a
/// handler returns, its run takes a permit of the workloop's *ending* semaphore (as many as
/// slots) and gives its slot back, so the next run starts while this one's end is written (an
/// fsync): at most `slots` handlers and `slots × ENDING_PER_SLOT` ends per workloop, and the
/// run keeps its lease and its queue slots until its end is written. With any other store the
/// end is written at once and the slot stays with the run until then, then goes to the next
/// run its task claims ([`run_slot`]).
struct Slot<'a> {
    permit: OwnedSemaphorePermit,
    /// Borrowed from the workloop's shared state: taken only with a store that group-commits
    /// (no reference count bumped per run on a line both worker threads write).
    ending: &'a Arc<Semaphore>,
}

/// A run's turn in its slot: the slot, and the claim the slot makes for its next run once this
/// one has ended (with the ack, in one queue step, when the end is written at once).
struct Turn<'a> {
    slot: Slot<'a>,
    next: &'a ClaimRequest,
}

/// The worker's shared state as a run's guard holds it: a reference count of its own for a
/// run spawned with a task of its own, borrowed from that task for the runs it goes on to.
enum SharedRef<'a> {
    Owned(Arc<WorkerShared>),
    Borrowed(&'a WorkerShared),
}

impl std::ops::Deref for SharedRef<'_> {
    type Target = WorkerShared;

    fn deref(&self) -> &WorkerShared {
        match self {
            SharedRef::Owned(shared) => shared,
            SharedRef::Borrowed(shared) => shared,
        }
    }
}

/// Unregisters a run from the worker and the engine when its task ends, however it ends.
struct InFlightGuard<'a> {
    shared: SharedRef<'a>,
    run: RunId,
    token: FencingToken,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.shared.engine.inner.local.remove(self.run, self.token);
        let now_empty = {
            let mut in_flight = self.shared.in_flight();
            if in_flight
                .get(&self.run)
                .is_some_and(|r| r.token == self.token)
            {
                in_flight.remove(&self.run);
            }
            in_flight.is_empty()
        };
        if now_empty {
            // The drain waits for the last run; the heartbeat needs no wake-up per run.
            self.shared.changed.notify_waiters();
        }
    }
}

/// Polls a handler's future, turning a panic while polling into `Err(())`. The future is not
/// polled again after a panic.
async fn catch_panic(
    mut fut: HandlerFuture,
) -> Result<Result<serde_json::Value, HandlerError>, ()> {
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    })
    .await
}

/// How a handler's attempt ended.
enum Outcome {
    Completed(serde_json::Value),
    Failed {
        outcome: &'static str,
        error: String,
    },
    Aborted(AbortKind),
}

/// One workloop: claim for free slots, spawn runs, wait on doorbells when nothing is ready.
async fn workloop(shared: Arc<WorkerShared>, chain: ClaimChain, slots: u32, consumer: ConsumerId) {
    let engine = shared.engine.inner.clone();
    let slots_sem = Arc::new(Semaphore::new(slots as usize));
    let ending = Arc::new(Semaphore::new(
        (slots as usize).saturating_mul(ENDING_PER_SLOT),
    ));
    let mut request = ClaimRequest {
        worker: shared.id,
        chain,
        max: 1,
        envs: shared.envs.clone(),
        lease: shared.lease,
    };
    let lp = Arc::new(LoopShared {
        slots: slots_sem.clone(),
        ending,
        one: request.clone(),
    });
    let mut stop = shared.stop.subscribe();
    let bells = engine.bells.bells_for(&request.chain);
    let mut backoff = CLAIM_BACKOFF_MIN;
    let remote_claims = !engine.queue.claims_in_process();
    // Whether offers are parked in the queue too (for other processes' enqueues).
    let parks = engine.offers.enabled() && engine.queue.parks_offers();
    // The seq of the last offer this workloop's claim may have parked, and whether that
    // offer's delivery was heard.
    let mut parked: Option<(u64, bool)> = None;
    let mut seq = 0u64;
    // The read of the runs of the last claim, when it goes on beside the next claim: the
    // workloop waits for it before it starts another, and before it ends (its runs must be
    // in the worker's run set before a drain takes that set).
    let mut loading: Option<oneshot::Receiver<()>> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let first = tokio::select! {
            permit = slots_sem.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // Never closed; treat as stop.
            },
            _ = stop.changed() => break,
        };
        let free = 1 + slots_sem.available_permits();
        // Doorbells first, claim second: a ring in between is kept by these futures.
        let mut rings: Vec<_> = bells.iter().map(|b| Box::pin(b.notified())).collect();
        for ring in &mut rings {
            ring.as_mut().enable();
        }
        request.max = u32::try_from(free).unwrap_or(u32::MAX);
        // Asked at every claim: once this process no longer hears deliveries (its doorbell
        // readers ended while this worker runs on), the claim takes the last offer back and
        // parks none, so other processes' enqueues stop leasing runs for a deaf workloop.
        let park = parks && engine.queue.hears_deliveries();
        let claimed = if park || parked.is_some() {
            seq += 1;
            let now = engine.now();
            let steps = OfferSteps {
                consumer,
                withdraw: parked,
                park: park.then(|| (seq, now.saturating_add(parked_for(request.lease)))),
            };
            let answer = claim_parking(&engine, &request, &steps, now).await;
            let leased = answer.as_ref().ok().map(|l| !l.is_empty());
            parked = parked_after(leased, parked, park.then_some(seq));
            answer
        } else {
            claim(&engine, &request).await
        };
        match claimed {
            Ok(leases) if !leases.is_empty() => {
                backoff = CLAIM_BACKOFF_MIN;
                debug_assert!(leases.len() <= free, "a claim never exceeds its free slots");
                let full = leases.len() == free;
                engine.claimed(&leases);
                // The slots are taken now, before the next claim counts what is free.
                let mut permit = Some(first);
                let held = take_slots(&engine, leases, || {
                    permit
                        .take()
                        .or_else(|| lp.slots.clone().try_acquire_owned().ok())
                })
                .await;
                if remote_claims {
                    // The runs' read goes on beside the workloop's next claim (one read at a
                    // time: the previous one ends first), so a loop of claims under load
                    // costs a claim's round trip per turn, not a claim's and a read's.
                    if let Some(previous) = loading.take() {
                        let _ = previous.await;
                    }
                    let (done, finished) = oneshot::channel::<()>();
                    let (shared2, lp2) = (shared.clone(), lp.clone());
                    shared.runs().spawn(async move {
                        start_loaded(&shared2, &lp2, held).await;
                        drop(done);
                    });
                    loading = Some(finished);
                } else {
                    start_loaded(&shared, &lp, held).await;
                }
                if full && remote_claims {
                    // More may be ready: let the runs just started (and others) run first, so
                    // handlers that end at once free their slots into one larger next claim
                    // instead of many claims of one or two (each claim's fixed cost is a
                    // round trip, and tens of µs of script time on Redis; an in-process claim
                    // costs too little to wait for).
                    tokio::task::yield_now().await;
                }
            }
            Ok(_) if engine.offers.enabled() => {
                backoff = CLAIM_BACKOFF_MIN;
                let twin = parked.map(|(s, _)| (consumer, s));
                // Deaf to other processes' runs (no bell reaches it): it claims again at each
                // refresh, as a parked offer's workloop does.
                let deaf = parks && !park;
                let wait = OfferWait {
                    twin,
                    refresh: twin.is_some() || deaf,
                };
                let (stopping, delivered) =
                    offer_and_wait(&shared, &lp, &request, wait, first, &mut rings, &mut stop)
                        .await;
                if delivered {
                    parked = parked.map(|(s, _)| (s, true));
                }
                if stopping {
                    break;
                }
            }
            Ok(_) => {
                backoff = CLAIM_BACKOFF_MIN;
                drop(first);
                tokio::select! {
                    () = any_of(&mut rings) => {}
                    _ = stop.changed() => break,
                }
            }
            Err(e) => {
                drop(first);
                tracing::warn!(worker = %shared.id, error = %e, "claim failed");
                let retry_at = engine.now().saturating_add(backoff);
                backoff = (backoff * 2).min(CLAIM_BACKOFF_MAX);
                tokio::select! {
                    () = engine.clock.sleep_until(retry_at) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    if let Some(previous) = loading.take() {
        let _ = previous.await;
    }
    if let Some(last) = parked {
        withdraw_parked(&engine, &request, consumer, last).await;
    }
    unregister(&engine, shared.id, consumer).await;
}

/// Pairs each lease with a slot from `slot` while it gives one; a lease past the free slots
/// goes back ([`hand_back_excess`]).
async fn take_slots(
    engine: &Inner,
    leases: Vec<Leased>,
    mut slot: impl FnMut() -> Option<OwnedSemaphorePermit>,
) -> Vec<(Leased, OwnedSemaphorePermit)> {
    let mut held = Vec::with_capacity(leases.len());
    for leased in leases {
        match slot() {
            Some(p) => held.push((leased, p)),
            None => hand_back_excess(engine, &leased).await,
        }
    }
    held
}

/// Reads what the claimed runs need (hand-over, reads ahead, the store) and starts each on the
/// slot taken for it.
async fn start_loaded(
    shared: &Arc<WorkerShared>,
    lp: &Arc<LoopShared>,
    held: Vec<(Leased, OwnedSemaphorePermit)>,
) {
    let (leases, permits): (Vec<Leased>, Vec<OwnedSemaphorePermit>) = held.into_iter().unzip();
    let loaded = load_claimed(&shared.engine.inner, &leases).await;
    for ((leased, permit), loaded) in leases.into_iter().zip(permits).zip(loaded) {
        shared.spawn_run(lp, leased, permit, loaded);
    }
}

/// A stopping workloop takes its parked offer back: leases an enqueue made for it that the
/// workloop did not start go back to their queues, as a drained run does (not left to lapse
/// and count as a crashed attempt).
async fn withdraw_parked(
    engine: &Inner,
    request: &ClaimRequest,
    consumer: ConsumerId,
    last: (u64, bool),
) {
    let none = ClaimRequest {
        max: 0,
        ..request.clone()
    };
    let steps = OfferSteps {
        consumer,
        withdraw: Some(last),
        park: None,
    };
    match engine
        .queue
        .claim_parking(&none, &steps, engine.now())
        .await
    {
        Ok(leases) => {
            for l in &leases {
                release_unstarted(engine, l).await;
            }
        }
        Err(e) => {
            tracing::warn!(consumer = consumer.0, error = %e, "taking the parked offer back failed; leases made for it will lapse");
        }
    }
}

/// How an idle workloop's offer waits ([`offer_and_wait`]).
#[derive(Clone, Copy)]
struct OfferWait {
    /// The offer its claim parked in the queue, if any.
    twin: Option<ParkedOffer>,
    /// Whether the wait ends half-way through a parked offer's time, for another claim.
    refresh: bool,
}

/// An idle workloop's wait when the queue claims on enqueue: its free slots (`first` and
/// whatever else is free) are offered to this process's triggers until a doorbell rings or the
/// worker stops (see [`crate::offer`]). Runs a trigger's enqueue claimed for the offer start
/// here, as a claim's would. Answers whether the worker is stopping.
///
/// With a `twin` (the offer its claim parked in the queue for other processes' enqueues),
/// leases another process's enqueue made for the twin start here as soon as the doorbells
/// deliver them; with `refresh` (a twin, or a workloop deaf to other processes), the wait also
/// ends half-way through a parked offer's time, so the next claim parks a fresh one or takes
/// what other processes left ready. Answers also whether a delivery was heard.
async fn offer_and_wait<F: Future<Output = ()> + Unpin>(
    shared: &Arc<WorkerShared>,
    lp: &Arc<LoopShared>,
    request: &ClaimRequest,
    wait: OfferWait,
    first: OwnedSemaphorePermit,
    rings: &mut [F],
    stop: &mut watch::Receiver<bool>,
) -> (bool, bool) {
    let engine = &shared.engine.inner;
    let mut permit = first;
    let more = lp.slots.available_permits();
    if more > 0 {
        if let Ok(p) = lp.slots.clone().try_acquire_many_owned(more as u32) {
            permit.merge(p);
        }
    }
    let (offer, mut taken) = Offer::new(request.clone(), wait.twin, permit);
    let id = engine.offers.post(offer);
    let mut stopping = false;
    let refresh = async {
        if wait.refresh {
            let at = engine.now().saturating_add(parked_for(request.lease) / 2);
            engine.clock.sleep_until(at).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let answered = tokio::select! {
        () = any_of(rings) => None,
        answer = &mut taken => Some(answer.ok()),
        () = refresh => None,
        _ = stop.changed() => {
            stopping = true;
            None
        }
    };
    let answer = match answered {
        Some(answer) => answer,
        // Nobody took it: dropping it frees the slots.
        None => match engine.offers.withdraw(id) {
            Some(untaken) => {
                drop(untaken);
                None
            }
            // A trigger holds it: its claim may have leased runs for these slots.
            None => taken.await.ok(),
        },
    };
    let delivered = matches!(
        answer,
        Some(Taken {
            delivered: true,
            ..
        })
    );
    if let Some(Taken {
        mut permit, leases, ..
    }) = answer
    {
        if !leases.is_empty() {
            let held = take_slots(engine, leases, || permit.split(1)).await;
            start_loaded(shared, lp, held).await;
        }
    }
    (stopping, delivered)
}

/// How long an idle workloop's offer stays parked in the queue: a quarter of its lease, from
/// 200 ms to 5 s. The workloop parks a fresh one half-way; the offer of a process that died
/// (or lost the queue) is not taken after that, and a lease made for it before is recovered
/// as any lapsed lease.
fn parked_for(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// What a workloop knows is parked for it after a claim that took back `before` and, with
/// `parks` (its seq), parked an offer when it leased nothing (`leased`: whether it answered
/// leases, `None` when the call failed). A claim that leased, or that only took back (its
/// process no longer hears deliveries), left nothing parked. A failed call may or may not have
/// run: the next claim takes back whatever is parked (any seq), and must still know which
/// delivery was heard, or it would start a heard lease again.
fn parked_after(
    leased: Option<bool>,
    before: Option<(u64, bool)>,
    parks: Option<u64>,
) -> Option<(u64, bool)> {
    match (leased, before, parks) {
        (None, Some(before), _) => Some(before),
        (Some(true), _, _) | (_, _, None) => None,
        (_, _, Some(seq)) => Some((seq, false)),
    }
}

/// [`claim`] with steps on the workloop's parked offer.
async fn claim_parking(
    engine: &Inner,
    request: &ClaimRequest,
    steps: &OfferSteps,
    now: Timestamp,
) -> Result<Vec<Leased>, QueueError> {
    let leases = engine.queue.claim_parking(request, steps, now).await?;
    Ok(renew_late(engine.queue.as_ref(), leases, request.lease, engine.now()).await)
}

/// One heartbeat per `lease / 3` for all the worker's leases, only while it has any.
///
/// The beat's timer is armed when the first run starts and then left alone: runs starting and
/// ending do not touch it (a sparse load, one run at a time, would otherwise arm and cancel a
/// timer per run, each arming waking the runtime's timer thread). When it fires with no run
/// left, the heartbeat waits for the next first run, with no timer.
async fn heartbeat(shared: Arc<WorkerShared>) {
    let engine = shared.engine.inner.clone();
    let interval = (shared.lease / 3).max(Duration::from_millis(1));
    let mut next_beat: Option<Timestamp> = None;
    loop {
        let Some(at) = next_beat else {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if shared.in_flight().is_empty() {
                changed.await;
            } else {
                next_beat = Some(engine.now().saturating_add(interval));
            }
            continue;
        };
        engine.clock.sleep_until(at).await;
        let leases: Vec<(RunId, FencingToken, Arc<LocalRun>)> = shared
            .in_flight()
            .values()
            .map(|l| (l.run, l.token, l.clone()))
            .collect();
        let now = engine.now();
        if leases.is_empty() {
            next_beat = None;
            continue;
        }
        next_beat = Some(now.saturating_add(interval));
        let ids: Vec<(RunId, FencingToken)> = leases.iter().map(|(r, t, _)| (*r, *t)).collect();
        match engine.queue.heartbeat(&ids, now).await {
            Ok(states) => {
                for ((_, _, local), state) in leases.iter().zip(states) {
                    match state {
                        LeaseState::Alive => {}
                        LeaseState::CancelRequested => {
                            local.cancel.fire(CancelReason::Cancel);
                        }
                        LeaseState::Lost => local.stop(CancelReason::LeaseLost, AbortKind::Engine),
                    }
                }
            }
            Err(e) => tracing::warn!(worker = %shared.id, error = %e, "heartbeat failed"),
        }
    }
}

/// What a workloop has of a claimed run before it starts it.
pub(crate) enum Loaded {
    /// Handed over by this process's trigger.
    Handed(Handed),
    /// Read back from the store (`None`: not there).
    Record(Option<ToStart>),
    /// The read failed.
    Failed(StoreError),
}

/// Claims for `request` at the engine's `now`, with the leases renewed when the claim came back
/// late (see [`renew_late`]).
pub(crate) async fn claim(
    engine: &Inner,
    request: &ClaimRequest,
) -> Result<Vec<Leased>, QueueError> {
    let leases = engine.queue.claim(request, engine.now()).await?;
    Ok(renew_late(engine.queue.as_ref(), leases, request.lease, engine.now()).await)
}

/// The leases of a claim that answered at `now`, renewed first when the claim ran with an old
/// instant. A claim carries the `now` it was asked at, and the queue starts its leases from it;
/// a claim that waited before it ran (its connection being re-established after an outage, a
/// stalled server) thus comes back with leases that have little time left, or none: they lapse
/// while their handlers run, the ends are refused as a lost lease's, and the runs run again.
/// A lease with less than three quarters of its duration left is extended at once with one
/// heartbeat from `now` (no call otherwise); one the heartbeat reports lost (its lapse was
/// already seen) is dropped, not run: it is recovered like any lapsed lease. A heartbeat that
/// fails leaves the leases as they came.
pub(crate) async fn renew_late(
    queue: &dyn QueueBackend,
    mut leases: Vec<Leased>,
    lease: Duration,
    now: Timestamp,
) -> Vec<Leased> {
    let enough = lease.saturating_sub(lease / 4);
    if leases.iter().all(|l| l.lease_deadline.since(now) >= enough) {
        return leases;
    }
    let ids: Vec<(RunId, FencingToken)> = leases
        .iter()
        .map(|l| (l.dispatch.run_id, l.token))
        .collect();
    let states = match queue.heartbeat(&ids, now).await {
        Ok(states) if states.len() == leases.len() => states,
        Ok(_) | Err(_) => {
            tracing::debug!(
                leases = leases.len(),
                "late claim: its leases could not be renewed"
            );
            return leases;
        }
    };
    let deadline = now.saturating_add(lease);
    let mut states = states.into_iter();
    leases.retain_mut(|l| match states.next() {
        Some(LeaseState::Lost) | None => {
            tracing::debug!(run = %l.dispatch.run_id, "late claim: lease already lost; left to its recovery");
            false
        }
        Some(LeaseState::Alive | LeaseState::CancelRequested) => {
            l.lease_deadline = l.lease_deadline.max(deadline);
            true
        }
    });
    leases
}

/// The task and payload of each claimed run, in claim order: handed over when this process
/// triggered it, else read back from the store, one read for all of the claim's runs.
pub(crate) async fn load_claimed(engine: &Inner, leases: &[Leased]) -> Vec<Loaded> {
    let mut out: Vec<Option<Loaded>> = leases
        .iter()
        .map(|l| engine.handover.take(l.dispatch.run_id).map(Loaded::Handed))
        .collect();
    if engine.handover.has_pending() {
        // Runs read ahead (another process's doorbell named them): their read is on the way,
        // bounded as the read itself is.
        let deadline = tokio::time::Instant::now() + crate::external::READ_AHEAD_WAIT;
        for (l, o) in leases.iter().zip(out.iter_mut()) {
            if o.is_none() {
                *o = engine
                    .handover
                    .take_awaited(l.dispatch.run_id, deadline)
                    .await
                    .map(Loaded::Handed);
            }
        }
    }
    let missing: Vec<RunId> = leases
        .iter()
        .zip(&out)
        .filter(|(_, o)| o.is_none())
        .map(|(l, _)| l.dispatch.run_id)
        .collect();
    if !missing.is_empty() {
        let read: Vec<Loaded> = match engine.store.get_to_start(&missing).await {
            Ok(records) if records.len() == missing.len() => {
                records.into_iter().map(Loaded::Record).collect()
            }
            Ok(_) => {
                let e = StoreError::Unavailable("the store answered a different count".into());
                missing.iter().map(|_| Loaded::Failed(e.clone())).collect()
            }
            Err(e) => missing.iter().map(|_| Loaded::Failed(e.clone())).collect(),
        };
        let mut read = read.into_iter();
        for slot in out.iter_mut().filter(|o| o.is_none()) {
            *slot = read.next();
        }
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Loaded::Failed(StoreError::Unavailable("run not loaded".into())))
        })
        .collect()
}

/// What a claimed run turned out to be once loaded.
pub(crate) enum Resolved {
    /// Ready to run: its task, payload and retry policy.
    Ready(Handed),
    /// It ended in the store while it waited, or is not there: its lease was let go.
    Gone,
    /// It could not be read: the caller hands it back without an attempt.
    Unloadable(StoreError),
}

/// What a claimed run needs to start, when it can start at once (handed over, or read back
/// not ended and with no cancel requested); otherwise what was loaded, for [`resolve`].
fn ready(loaded: Loaded) -> Result<Handed, Loaded> {
    match loaded {
        Loaded::Handed(handed) => Ok(handed),
        Loaded::Record(Some(record))
            if !record.status.is_terminal() && !record.cancel_requested =>
        {
            Ok(Handed {
                task: record.task,
                payload: record.payload,
                retry: record.retry,
            })
        }
        other => Err(other),
    }
}

/// Turns what [`load_claimed`] found into a runnable run. (A run handed over cannot have ended
/// in the store: every terminal write outside a lease first takes the run out of the queue;
/// and a cancel request drops the hand-over entry, so such a run is read back.)
///
/// A run whose cancel is kept in the store (the request outlived the queue backend's state:
/// a rebuilt Redis, a requester that died before the queue heard of it) ends `canceled` here,
/// its `attempt` recorded as canceled, without running its handler.
pub(crate) async fn resolve(
    engine: &Inner,
    run: RunId,
    token: FencingToken,
    attempt: u32,
    loaded: Loaded,
) -> Resolved {
    let loaded = match ready(loaded) {
        Ok(handed) => return Resolved::Ready(handed),
        Err(loaded) => loaded,
    };
    match loaded {
        Loaded::Handed(handed) => Resolved::Ready(handed), // `ready` takes these.
        Loaded::Record(Some(record)) if record.status.is_terminal() => {
            // Cancelled (or ended) in the store while it waited in the queue.
            engine.queue_finish_quietly(run, token).await;
            Resolved::Gone
        }
        // Not ended, and not ready: its cancel was requested.
        Loaded::Record(Some(_)) => {
            let ended = attempt_record(attempt, "canceled", None, engine.now());
            if let Err(e) = engine
                .finish_leased(run, token, RunStatus::Canceled, None, Some(ended))
                .await
            {
                // The store could not answer: the lease lapses and its recovery, which
                // honours the request too, ends the run.
                tracing::warn!(%run, error = %e, "a claimed run whose cancel was requested was not ended");
            }
            Resolved::Gone
        }
        Loaded::Record(None) => {
            tracing::warn!(%run, "claimed run is not in the store; dropping it");
            engine.queue_finish_quietly(run, token).await;
            Resolved::Gone
        }
        Loaded::Failed(e) => Resolved::Unloadable(e),
    }
}

/// Runs one leased attempt to its end. Returns the slot's permit when it was held until the
/// attempt's end was written (a store that does not batch ends), so the caller can claim the
/// workloop's next run with it, and the leases of the turn's claim when it was made with the
/// ack (`None`: it was not); `continued` says the run was claimed that way, and is handed back
/// at once when the worker started to stop meanwhile.
// Not an `async fn`: one moves its arguments into its body, so its future would hold the
// lease and what was loaded twice (copied whole at each await of its caller, once per run).
#[allow(clippy::manual_async_fn)] // See the comment above.
fn execute<'a>(
    shared: &'a Arc<WorkerShared>,
    leased: Leased,
    registered: Registered<'a>,
    turn: Turn<'a>,
    loaded: Loaded,
    continued: bool,
) -> impl Future<Output = Option<(OwnedSemaphorePermit, Option<Vec<Leased>>)>> + Send + 'a {
    async move {
        let Turn { slot, next } = turn;
        let run = leased.dispatch.run_id;
        let token = leased.token;
        let Registered {
            local,
            _guard,
            first,
        } = registered;
        if first {
            // Only the first run arms the heartbeat; later ones change nothing it waits for.
            shared.changed.notify_waiters();
        }
        let engine: &Inner = &shared.engine.inner;
        let d = &leased.dispatch;
        let aborted = local.abort.get();
        if aborted == Some(AbortKind::Engine) {
            return None; // The engine ended this attempt before it started (its lease lapsed).
        }
        if aborted == Some(AbortKind::Drain) || (continued && *shared.stop.borrow()) {
            // Claimed by a run task as the drain began, or stopped by the drain before its task
            // first ran: it goes back like any run the drain stops, its handler never started.
            let mut settle = local.settle.lock().await;
            if !*settle && Box::pin(release(shared, run, token, &d.env, d.attempt)).await {
                *settle = true;
            }
            return None;
        }
        engine.publish(run, &d.env, RunStatus::Executing, d.attempt);

        // A run triggered in this process comes with its payload; any other is read back.
        let handed = match ready(loaded) {
            Ok(handed) => handed,
            Err(loaded) => match Box::pin(resolve(engine, run, token, d.attempt, loaded)).await {
                Resolved::Ready(handed) => handed,
                Resolved::Gone => return None,
                Resolved::Unloadable(e) => {
                    // Without the payload nothing can run: hand the run back without an attempt.
                    tracing::warn!(%run, error = %e, "claimed run could not be loaded; releasing it");
                    let _ = Box::pin(release(shared, run, token, &d.env, d.attempt)).await;
                    return None;
                }
            },
        };

        let outcome = match shared.handlers.get(&handed.task) {
            None => Outcome::Failed {
                outcome: "no_handler",
                error: format!(
                    "no handler for task {} on worker {}",
                    handed.task, shared.id
                ),
            },
            Some(handler) => {
                let ctx = RunContext {
                    inner: Arc::new(ContextInner {
                        engine: shared.engine.clone(),
                        run_id: run,
                        task: handed.task.clone(),
                        attempt: d.attempt,
                        payload: handed.payload.clone(),
                        cancel: CancelToken::from_latch(local.cancel.clone()),
                        env: d.env.clone(),
                        queue: d.queue.clone(),
                        key: d.key.clone(),
                        lane: d.lane.clone(),
                    }),
                };
                // An advisory, non-blocking start mark: if the process dies while the handler runs,
                // recovery at the next open counts this attempt as `crashed`.
                engine.store.note_start(run, d.attempt, engine.now());
                // The handler runs inside this run's task (no second spawn per run); a panic in
                // it is caught at its poll and fails the attempt, and dropping the future when the
                // engine aborts the attempt stops it, as aborting a task would.
                tokio::select! {
                    finished = catch_panic(handler(ctx)) => match finished {
                        Ok(Ok(value)) => Outcome::Completed(value),
                        Ok(Err(e)) => Outcome::Failed { outcome: "failed", error: e.0 },
                        Err(()) => Outcome::Failed {
                            outcome: "failed",
                            error: "handler panicked".to_owned(),
                        },
                    },
                    kind = local.abort.wait() => Outcome::Aborted(kind),
                }
            }
        };

        if !matches!(outcome, Outcome::Aborted(_)) {
            // The handler returned and its end follows: a start mark not written yet is moot (a
            // crash before the end is written costs what a lost mark costs, one uncounted re-run).
            engine.store.forget_start(run, d.attempt);
        }

        // The handler is done. With a store that batches ends (a commit each), its slot goes to
        // the next run while this attempt's end is written; otherwise the end is written at once
        // and the slot is kept for the next claim.
        let Slot { permit, ending } = slot;
        let (_ending, permit) = if engine.store.group_commits() {
            let waiting = ending.clone().acquire_owned().await;
            drop(permit);
            (waiting.ok(), None)
        } else {
            (None, Some(permit))
        };

        let mut settle = local.settle.lock().await;
        if *settle {
            return None; // The engine ended this attempt first (timeout, lapse, cancel grace).
        }
        // What the slot's next claim made with the ack leased (`None`: no such claim was made).
        let mut claimed = None;
        let result = match outcome {
            Outcome::Aborted(AbortKind::Engine) => return None,
            Outcome::Aborted(AbortKind::Drain) => {
                if !Box::pin(release(shared, run, token, &d.env, d.attempt)).await {
                    return None;
                }
                Ok(())
            }
            Outcome::Completed(value) => {
                let (output, ended_at) = (output_text(value), engine.now());
                // The slot goes on to its next run: its claim rides on the ack, unless the slot is
                // already given back (batched ends) or the worker is stopping when the end is
                // written (no claim: read at each try, a drain may begin while a write is retried).
                let keeps_slot = permit.is_some();
                until_written(engine, &local, || {
                    let end = completed_end(run, d.attempt, output.clone(), ended_at);
                    let next = (keeps_slot && !*shared.stop.borrow()).then_some(next);
                    engine.finish_attempt(&d.env, token, end, next)
                })
                .await
                .map(|leases| claimed = leases)
            }
            Outcome::Failed { outcome, error } => match local.cancel.get() {
                // The engine owns these endings; it takes the settle lock after us.
                Some(CancelReason::Timeout | CancelReason::LeaseLost) => return None,
                Some(CancelReason::Shutdown) => {
                    if !Box::pin(release(shared, run, token, &d.env, d.attempt)).await {
                        return None;
                    }
                    Ok(())
                }
                Some(CancelReason::Cancel) => {
                    let attempt = attempt_record(d.attempt, "canceled", Some(error), engine.now());
                    Box::pin(engine.finish_leased(
                        run,
                        token,
                        RunStatus::Canceled,
                        None,
                        Some(attempt),
                    ))
                    .await
                    .map(|_| ())
                }
                // Boxed, as every rarer ending here: the future of the path every run takes
                // (copied whole at each await of its caller) holds none of theirs.
                None => {
                    Box::pin(until_written(engine, &local, || {
                        engine.fail_attempt(
                            &d.env,
                            &handed.retry,
                            run,
                            token,
                            d.attempt,
                            outcome,
                            error.clone(),
                            RunStatus::Failed,
                        )
                    }))
                    .await
                }
            },
        };
        match result {
            Ok(()) => {
                *settle = true;
                permit.map(|p| (p, claimed))
            }
            // The lease was lost before the end could be written (a zombie's end is dropped): the
            // attempt stays unsettled, so the lapse's recovery, here or elsewhere, applies the
            // retry policy.
            Err(EngineError::StaleToken(_)) => {
                tracing::debug!(%run, "the attempt's lease was lost before its end; left to its recovery");
                None
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "ending the attempt failed; the lease will lapse");
                None
            }
        }
    }
}

/// A handler's output as JSON text.
fn output_text(value: serde_json::Value) -> Arc<str> {
    match value {
        // The output of a handler with nothing to say: one shared text, no allocation.
        serde_json::Value::Null => {
            static NULL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
            NULL.get_or_init(|| Arc::from("null")).clone()
        }
        value => Arc::from(value.to_string()),
    }
}

/// A completed attempt's end (the completer checks the lease, writes the store — first write
/// wins — then the queue).
fn completed_end(run: RunId, attempt: u32, output: Arc<str>, ended_at: Timestamp) -> AttemptEnd {
    AttemptEnd {
        run,
        status: RunStatus::Completed,
        output: Some(output),
        attempt: attempt_record(attempt, "completed", None, ended_at),
    }
}

/// Writes an attempt's end, again and again while the store is unavailable (an outage), with
/// a backoff: the run stays in flight meanwhile, so its lease is kept by the heartbeat and the
/// handler's result is not lost to a lapse and a second execution. Ends once the end is
/// written or refused, the lease is found lost (the completer drops the end), the engine shuts
/// down, or the run is stopped (a drain past its `stop_timeout`, or the engine taking the
/// attempt over): the last error is then answered and the lease left to lapse, as without the
/// retries. Every write is the same end: the store's first write wins, a repeat of one that
/// landed unseen gets `AlreadyFinished`.
async fn until_written<F, Fut, T>(
    engine: &Inner,
    local: &LocalRun,
    mut write: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    let mut backoff = END_RETRY_MIN;
    loop {
        match write().await {
            Err(EngineError::Unavailable(e)) if !engine.is_shut_down() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "writing an attempt's end failed; retrying while its lease is held");
                tokio::select! {
                    () = engine.clock.sleep_until(engine.now().saturating_add(backoff)) => {}
                    _ = local.abort.wait() => return Err(EngineError::Unavailable(e)),
                }
                backoff = (backoff * 2).min(END_RETRY_MAX);
            }
            other => return other,
        }
    }
}

/// Drain: back to the queue without counting an attempt, or `canceled` when a cancel was
/// requested (see [`Inner::release_leased`]). `false` when the queue did not take the run
/// back (its lease lapsed, or the call failed): the attempt is then not settled, and the
/// lease's lapse is recovered like any other (here too, when this process's tick saw it while
/// the release was on its way), applying the retry policy.
async fn release(
    shared: &WorkerShared,
    run: RunId,
    token: FencingToken,
    env: &EnvName,
    attempt: u32,
) -> bool {
    let engine = &shared.engine.inner;
    match engine.release_leased(run, token, env, attempt).await {
        Ok(Released::Queued) => {
            shared.released.fetch_add(1, Ordering::Relaxed);
            true
        }
        Ok(Released::Canceled) => true,
        Err(e) => {
            tracing::warn!(%run, error = %e, "release failed; the lease will lapse");
            false
        }
    }
}

/// A running worker.
pub struct Worker {
    shared: Arc<WorkerShared>,
    loops: Vec<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

/// What a drain did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Runs that finished during the drain.
    pub finished: u32,
    /// Runs released back to their queues (cancelled with `Shutdown`).
    pub released: u32,
}

impl Worker {
    /// Its id.
    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    /// Runs currently executing on it.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight().len()
    }

    /// The runs currently executing on it.
    pub fn in_flight_runs(&self) -> Vec<RunId> {
        let mut runs: Vec<RunId> = self.shared.in_flight().keys().copied().collect();
        runs.sort();
        runs
    }

    /// Stops claiming, waits up to the stop timeout, then cancels the rest with `Shutdown` and
    /// releases them to their queues without counting an attempt (a run whose cancel was
    /// requested ends `canceled` instead and is not counted as released).
    pub async fn stop(mut self) -> DrainReport {
        let shared = self.shared.clone();
        let engine = shared.engine.inner.clone();
        shared.stop.send_replace(true);
        for handle in std::mem::take(&mut self.loops) {
            if let Err(e) = handle.await {
                tracing::warn!(worker = %shared.id, error = %e, "workloop ended abnormally");
            }
        }
        let at_start = u32::try_from(shared.in_flight().len()).unwrap_or(u32::MAX);
        let deadline = engine.now().saturating_add(shared.stop_timeout);
        let timeout = engine.clock.sleep_until(deadline);
        tokio::pin!(timeout);
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if shared.in_flight().is_empty() {
                break;
            }
            tokio::select! {
                () = &mut changed => {}
                () = &mut timeout => break,
            }
        }
        let rest: Vec<Arc<LocalRun>> = shared.in_flight().values().cloned().collect();
        for local in &rest {
            local.stop(CancelReason::Shutdown, AbortKind::Drain);
        }
        let mut runs = std::mem::take(&mut *shared.runs());
        while let Some(joined) = runs.join_next().await {
            if let Err(e) = joined {
                tracing::warn!(worker = %shared.id, error = %e, "run task ended abnormally");
            }
        }
        if let Some(hb) = self.heartbeat.take() {
            hb.abort();
            let _ = hb.await;
        }
        let released = shared.released.load(Ordering::Relaxed);
        DrainReport {
            finished: at_start.saturating_sub(released),
            released,
        }
    }

    /// Simulates a crash: stops heartbeating and claiming at once, abandoning its runs (their
    /// leases lapse and are recovered). For tests.
    pub fn crash(mut self) {
        self.abort_all();
    }

    fn abort_all(&mut self) {
        for handle in self.loops.drain(..) {
            handle.abort();
        }
        if let Some(hb) = self.heartbeat.take() {
            hb.abort();
        }
        self.shared.runs().abort_all();
    }
}

impl Drop for Worker {
    /// A worker dropped without `stop` is abandoned like a crash: its tasks end, its leases
    /// lapse and are recovered by the timer service.
    fn drop(&mut self) {
        self.abort_all();
    }
}

#[cfg(test)]
mod late_claim_tests {
    use runlane_core::backend::{Dispatch, EnqueueAs, QueueBackend, ServedEnv};
    use runlane_core::{EnvSettings, WorkerId};
    use runlane_memory::{MemoryConfig, MemoryQueue};

    use super::*;

    const T0: Timestamp = Timestamp(1_700_000_000_000);
    const LEASE: Duration = Duration::from_secs(30);

    fn dispatch(id: u128) -> Dispatch {
        Dispatch::first_attempt(
            RunId(id),
            EnvName::new("e").expect("env"),
            QueueName::new("q").expect("queue"),
            LaneName::default_lane(),
            T0,
        )
    }

    /// A queue holding run 1, leased by a claim made at `T0` (the `now` it carried).
    async fn claimed_at_t0() -> (MemoryQueue, Vec<Leased>) {
        let q = MemoryQueue::new(MemoryConfig::default());
        let e = EnvName::new("e").expect("env");
        q.put_env(&e, EnvSettings::default(), T0)
            .await
            .expect("env");
        q.enqueue(dispatch(1), EnqueueAs::Trigger, T0)
            .await
            .expect("enqueue");
        let request = ClaimRequest {
            worker: WorkerId(1),
            chain: ClaimChain::default_chain(),
            max: 1,
            envs: vec![ServedEnv { env: e, version: 0 }],
            lease: LEASE,
        };
        let leases = q.claim(&request, T0).await.expect("claim");
        assert_eq!(leases.len(), 1);
        (q, leases)
    }

    fn lapsed_at(tick: runlane_core::backend::Tick) -> Vec<RunId> {
        tick.lapsed.iter().map(|l| l.dispatch.run_id).collect()
    }

    #[tokio::test]
    async fn a_claim_answered_in_time_is_left_as_it_came() {
        let (q, leases) = claimed_at_t0().await;
        let answered = T0.saturating_add(Duration::from_secs(1));
        let kept = renew_late(&q, leases.clone(), LEASE, answered).await;
        assert_eq!(kept[0].lease_deadline, leases[0].lease_deadline);
        // No heartbeat was made: the lease still lapses at its first deadline.
        let tick = q
            .tick(T0.saturating_add(LEASE + Duration::from_millis(1)))
            .await
            .expect("tick");
        assert_eq!(lapsed_at(tick), vec![RunId(1)]);
    }

    #[tokio::test]
    async fn a_late_claim_is_renewed_from_when_it_answered() {
        let (q, leases) = claimed_at_t0().await;
        // The claim ran with `T0` but answered 25 s later: 5 s of its 30 s lease were left.
        let answered = T0.saturating_add(Duration::from_secs(25));
        let kept = renew_late(&q, leases, LEASE, answered).await;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].lease_deadline, answered.saturating_add(LEASE));
        let past_first = q
            .tick(T0.saturating_add(LEASE + Duration::from_secs(1)))
            .await
            .expect("tick");
        assert!(
            lapsed_at(past_first).is_empty(),
            "the renewed lease outlives the deadline the claim set"
        );
        let past_renewed = q
            .tick(answered.saturating_add(LEASE + Duration::from_millis(1)))
            .await
            .expect("tick");
        assert_eq!(lapsed_at(past_renewed), vec![RunId(1)]);
    }

    #[tokio::test]
    async fn a_late_claim_whose_lease_already_lapsed_runs_nothing() {
        let (q, leases) = claimed_at_t0().await;
        let answered = T0.saturating_add(LEASE + Duration::from_secs(1));
        // The lapse was seen before the claim's answer was used.
        let tick = q.tick(answered).await.expect("tick");
        assert_eq!(lapsed_at(tick), vec![RunId(1)]);
        let kept = renew_late(&q, leases, LEASE, answered).await;
        assert!(
            kept.is_empty(),
            "a lost lease is left to its recovery, not run"
        );
    }
}

#[cfg(test)]
mod parked_after_tests {
    use super::parked_after;

    #[test]
    fn parked_after_keeps_what_a_failed_claim_withdrew() {
        // Empty answer: the offer parked now is the one to take back, not heard yet.
        assert_eq!(
            parked_after(Some(false), Some((3, true)), Some(4)),
            Some((4, false))
        );
        assert_eq!(parked_after(Some(false), None, Some(4)), Some((4, false)));
        // Leases: nothing is parked any more.
        assert_eq!(parked_after(Some(true), Some((3, true)), Some(4)), None);
        // A failed call: the last offer and whether its delivery was heard are kept, so a heard
        // lease is not answered (and started) again; with nothing before, the new one may be
        // parked.
        assert_eq!(
            parked_after(None, Some((3, true)), Some(4)),
            Some((3, true))
        );
        assert_eq!(
            parked_after(None, Some((3, false)), Some(4)),
            Some((3, false))
        );
        assert_eq!(parked_after(None, None, Some(4)), Some((4, false)));
    }

    #[test]
    fn a_claim_that_only_takes_back_leaves_nothing_parked_unless_it_failed() {
        // Taken back (with any leases the offer had that were not heard): nothing is parked.
        assert_eq!(parked_after(Some(false), Some((3, true)), None), None);
        assert_eq!(parked_after(Some(true), Some((3, false)), None), None);
        assert_eq!(parked_after(Some(false), None, None), None);
        // A failed call: what was parked may still be, and is taken back at the next claim.
        assert_eq!(parked_after(None, Some((3, false)), None), Some((3, false)));
        assert_eq!(parked_after(None, None, None), None);
    }
}
