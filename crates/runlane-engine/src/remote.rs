//! Remote workers: a worker that lives in another process and drives its runs through calls
//! (the HTTP worker protocol), with the same guarantees as an in-process [`Worker`].
//!
//! A [`RemoteWorker`] registers one queue consumer per workloop, as an in-process worker does,
//! and claims, loads (hand-over or store), heartbeats, completes, fails and releases with the
//! same engine steps. What differs is who runs the handler: each claimed run is registered in
//! the engine's registry of this process's runs (so the timer service's timeout, lease-lapse and
//! cancel-grace endings reach it and take its settle lock, exactly as for a local handler) and
//! held against its workloop's slots until the caller completes, fails or releases it, or the
//! engine ends it.
//!
//! Every run call carries the lease's fencing token. A call with a token this worker does not
//! hold, or for an attempt the engine already ended (timeout, cancel grace, lapsed lease), is
//! refused with [`EngineError::StaleToken`] and changes nothing.
//!
//! [`Worker`]: crate::worker::Worker

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runlane_core::backend::{AttemptEnd, ClaimRequest, ConsumerId, LeaseState, ServedEnv};
use runlane_core::{
    CancelReason, ClaimChain, EnvName, FencingToken, InvalidInput, LaneName, QueueError, QueueName,
    RetryPolicy, RunId, RunStatus, TaskDef, TaskName, Timestamp, WorkerId, WorkloopSpec,
};
use tokio::sync::Notify;

use crate::doorbell::any_of;
use crate::engine::{attempt_record, Engine, Inner};
use crate::error::EngineError;
use crate::local::LocalRun;
use crate::worker::{load_claimed, prepare, resolve, unregister, Prepared, Resolved};

/// How far ahead a worker may ask for its run's next attempt (`RetryChoice::At`).
pub const RETRY_AT_MAX_AHEAD: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a remote worker registers with: the envs it serves, its workloops and its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteWorkerSpec {
    /// Envs served, each at a version (`None`: the env's current version).
    pub envs: Vec<(String, Option<u32>)>,
    /// The workloops, e.g. `fast_lane:1 manual>*:4`.
    pub workloops: String,
    /// The lease duration (`None`: the engine's default).
    pub lease: Option<Duration>,
}

/// One workloop of a remote worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloopInfo {
    /// Its index, as claims name it.
    pub index: usize,
    /// Its claim chain, as text.
    pub chain: String,
    /// How many runs it may hold at once.
    pub slots: u32,
}

/// A run a remote worker claimed: everything it needs to run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedRun {
    /// The run.
    pub run_id: RunId,
    /// The lease's fencing token, for every later call about this run.
    pub token: FencingToken,
    /// Its env.
    pub env: EnvName,
    /// Its task.
    pub task: TaskName,
    /// Its payload, as JSON text.
    pub payload: Arc<str>,
    /// The attempt now running (1-based).
    pub attempt: u32,
    /// Its queue.
    pub queue: QueueName,
    /// Its concurrency key (empty when none was given).
    pub key: Arc<str>,
    /// The lane it was claimed from.
    pub lane: LaneName,
    /// The attempt is ended by the engine when it runs longer.
    pub max_duration: Option<Duration>,
    /// The lease lapses at this instant unless a heartbeat extends it.
    pub lease_deadline: Timestamp,
}

/// What happens after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryChoice {
    /// The run's retry policy decides (its backoff, its attempt cap).
    Policy,
    /// No further attempt: the run ends `failed`.
    NoRetry,
    /// The next attempt becomes due at this instant (not in the past, at most
    /// [`RETRY_AT_MAX_AHEAD`] ahead), if the policy's attempt cap leaves one.
    At(Timestamp),
}

/// Where a failed run went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailOutcome {
    /// Its status now: `delayed` or `queued` (another attempt), `failed`, or `canceled` (a
    /// cancel was requested before the failure).
    pub status: RunStatus,
    /// When its next attempt is due, if it has one.
    pub retry_at: Option<Timestamp>,
}

/// One workloop: its chain, slots and consumer.
struct Loop {
    chain: ClaimChain,
    slots: u32,
    consumer: ConsumerId,
    /// Held while a claim counts free slots and takes runs, so two claims never overfill.
    claiming: tokio::sync::Mutex<()>,
}

/// A run the worker holds.
#[derive(Clone)]
struct Held {
    local: Arc<LocalRun>,
    workloop: usize,
    env: EnvName,
    attempt: u32,
    retry: RetryPolicy,
    /// When the lease lapses unless a heartbeat extends it (ms; shared by the clones).
    lapses_at: Arc<AtomicU64>,
}

struct Shared {
    id: WorkerId,
    engine: Engine,
    envs: Vec<ServedEnv>,
    lease: Duration,
    loops: Vec<Loop>,
    held: Mutex<HashMap<RunId, Held>>,
    /// Rung when a held run lets go of its slot, and at close.
    changed: Notify,
    closed: AtomicBool,
}

/// A worker in another process, driven by calls. Cheap to clone; every clone is the same
/// worker. Dropping it without [`RemoteWorker::close`] leaves its runs to their leases.
#[derive(Clone)]
pub struct RemoteWorker {
    shared: Arc<Shared>,
}

impl Engine {
    /// Registers a remote worker: checks its envs (and versions), workloops and lease, and
    /// registers one consumer per workloop. Nothing is registered when a check fails.
    pub async fn remote_worker(&self, spec: RemoteWorkerSpec) -> Result<RemoteWorker, EngineError> {
        let inner = &self.inner;
        inner.check_open()?;
        if spec.envs.is_empty() {
            return Err(InvalidInput::new("envs", "must name at least one env").into());
        }
        let workloops = WorkloopSpec::parse(&spec.workloops)?;
        let Prepared {
            envs,
            lease,
            consumers,
        } = prepare(inner, &spec.envs, &workloops, spec.lease).await?;
        let loops = workloops
            .0
            .into_iter()
            .zip(consumers)
            .map(|(w, consumer)| Loop {
                chain: w.chain,
                slots: w.slots,
                consumer,
                claiming: tokio::sync::Mutex::new(()),
            })
            .collect();
        // Registering consumers may have admitted runs into lanes nobody was told about.
        inner.bells.ring_all();
        Ok(RemoteWorker {
            shared: Arc::new(Shared {
                id: inner.next_worker_id(),
                engine: self.clone(),
                envs,
                lease,
                loops,
                held: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                closed: AtomicBool::new(false),
            }),
        })
    }
}

impl Engine {
    /// Declares tasks to an env, so a strict env accepts triggers of them (a remote worker's
    /// `tasks`): when the env's current version lacks any of them, registers a version with
    /// the current definitions plus a default definition for each missing task and makes it
    /// current. Answers the version made current, `None` when every task was defined already.
    /// Serialised within this process; two processes declaring at once may each promote a
    /// version without the other's tasks (declare again).
    pub async fn declare_tasks(
        &self,
        env: &str,
        tasks: &[String],
    ) -> Result<Option<u32>, EngineError> {
        let inner = &self.inner;
        inner.check_open()?;
        let env_name = EnvName::new(env)?;
        inner.env_settings(&env_name).await?;
        let mut names: Vec<TaskName> = Vec::with_capacity(tasks.len());
        for task in tasks {
            let name = TaskName::new(task)
                .map_err(|e| InvalidInput::new("tasks", format!("{task:?}: {}", e.reason)))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let _declaring = inner.declaring.lock().await;
        let (_, current) = inner.meta.current(inner.store.as_ref(), &env_name).await?;
        let missing: Vec<TaskName> = names
            .into_iter()
            .filter(|n| current.task(n).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        let mut def = (*current).clone();
        def.tasks.extend(missing.into_iter().map(TaskDef::new));
        let version = self.register_version(env, def).await?;
        self.promote(env, version).await?;
        Ok(Some(version))
    }
}

/// Whether a queue error only says the lease is gone.
fn lease_gone(e: &QueueError) -> bool {
    matches!(e, QueueError::NotFound(_) | QueueError::StaleToken(_))
}

impl Shared {
    fn inner(&self) -> &Inner {
        &self.engine.inner
    }

    fn held(&self) -> MutexGuard<'_, HashMap<RunId, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> Result<(), EngineError> {
        self.inner().check_open()?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(
                InvalidInput::new("worker", format!("worker {} is closed", self.id)).into(),
            );
        }
        Ok(())
    }

    /// The held run under this lease, or `StaleToken`.
    fn lookup(&self, run: RunId, token: FencingToken) -> Result<Held, EngineError> {
        self.held()
            .get(&run)
            .filter(|h| h.local.token == token)
            .cloned()
            .ok_or(EngineError::StaleToken(run))
    }

    /// Lets go of a held run (its slot frees) if it is still held under this lease.
    fn forget(&self, run: RunId, token: FencingToken) {
        let removed = {
            let mut held = self.held();
            if held.get(&run).is_some_and(|h| h.local.token == token) {
                held.remove(&run);
                true
            } else {
                false
            }
        };
        if removed {
            self.inner().local.remove(run, token);
            self.changed.notify_waiters();
        }
    }

    /// Lets go of every run the engine is ending or ended (timeout, lapse, cancel grace), and
    /// of every run whose lease deadline passed without a heartbeat: its lapse is recovered
    /// wherever the timer runs (maybe another process, whose recovery signals nothing here),
    /// and a worker that stopped heartbeating it (it gave up on a call that failed) must not
    /// keep its slot for ever.
    fn purge(&self) {
        let now = self.inner().now().as_millis();
        let gone: Vec<(RunId, FencingToken)> = {
            let mut held = self.held();
            let gone: Vec<(RunId, FencingToken)> = held
                .values()
                .filter(|h| {
                    h.local.abort.get().is_some() || h.lapses_at.load(Ordering::Relaxed) < now
                })
                .map(|h| (h.local.run, h.local.token))
                .collect();
            for (run, _) in &gone {
                held.remove(run);
            }
            gone
        };
        if !gone.is_empty() {
            for (run, token) in gone {
                self.inner().local.remove(run, token);
            }
            self.changed.notify_waiters();
        }
    }

    fn held_by(&self, workloop: usize) -> u32 {
        let n = self
            .held()
            .values()
            .filter(|h| h.workloop == workloop)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Claims up to `max` runs for `workloop` now, loads them and holds them.
    async fn claim_now(
        &self,
        workloop: usize,
        lp: &Loop,
        max: u32,
    ) -> Result<Vec<ClaimedRun>, EngineError> {
        let engine = self.inner();
        let request = ClaimRequest {
            worker: self.id,
            chain: lp.chain.clone(),
            max,
            envs: self.envs.clone(),
            lease: self.lease,
        };
        let leases = crate::worker::claim(engine, &request).await?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        engine.claimed(&leases);
        let loaded = load_claimed(engine, &leases).await;
        let mut out = Vec::with_capacity(leases.len());
        for (leased, loaded) in leases.into_iter().zip(loaded) {
            let run = leased.dispatch.run_id;
            let token = leased.token;
            let lapses_at = Arc::new(AtomicU64::new(leased.lease_deadline.as_millis()));
            let d = leased.dispatch;
            let handed = match resolve(engine, run, token, d.attempt, loaded).await {
                Resolved::Ready(handed) => handed,
                Resolved::Gone => continue,
                Resolved::Unloadable(e) => {
                    // Without the payload nothing can run: hand it back without an attempt.
                    tracing::warn!(%run, error = %e, "claimed run could not be loaded; releasing it");
                    let _ = release_lease(engine, run, token, &d.env, d.attempt).await;
                    continue;
                }
            };
            // Registered like a local handler's run: the timer service's endings reach it (a
            // signal that came since the claim is applied now).
            let local = Arc::new(LocalRun::new(run, token));
            engine.local.insert(local.clone());
            self.held().insert(
                run,
                Held {
                    local,
                    workloop,
                    env: d.env.clone(),
                    attempt: d.attempt,
                    retry: handed.retry,
                    lapses_at,
                },
            );
            engine.publish(run, &d.env, RunStatus::Executing, d.attempt);
            // Advisory start mark, as for a local handler: recovery at open counts a crash.
            engine.store.note_start(run, d.attempt, engine.now());
            out.push(ClaimedRun {
                run_id: run,
                token,
                env: d.env,
                task: handed.task,
                payload: handed.payload,
                attempt: d.attempt,
                queue: d.queue,
                key: d.key,
                lane: d.lane,
                max_duration: d.max_duration,
                lease_deadline: leased.lease_deadline,
            });
        }
        Ok(out)
    }

    /// What every ending call checks with the run's settle lock held (`settled`): the engine
    /// has not ended the attempt and the lease is live. `StaleToken` (the run let go)
    /// otherwise.
    async fn check_live(&self, held: &Held, settled: bool) -> Result<(), EngineError> {
        let (run, token) = (held.local.run, held.local.token);
        if settled || held.local.abort.get().is_some() {
            // The engine ended (or is ending) this attempt.
            self.forget(run, token);
            return Err(EngineError::StaleToken(run));
        }
        match self.inner().queue.check_lease(run, token).await {
            Ok(()) => Ok(()),
            Err(e) if lease_gone(&e) => {
                self.forget(run, token);
                Err(EngineError::StaleToken(run))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Hands a leased run back to its queue without counting an attempt; a run whose cancel was
/// requested ends `canceled` instead (see [`Inner::release_leased`]).
async fn release_lease(
    engine: &Inner,
    run: RunId,
    token: FencingToken,
    env: &EnvName,
    attempt: u32,
) -> Result<(), EngineError> {
    match engine.release_leased(run, token, env, attempt).await {
        Ok(_) => Ok(()),
        Err(EngineError::StaleToken(_) | EngineError::RunNotFound(_)) => {
            Err(EngineError::StaleToken(run))
        }
        Err(e) => {
            tracing::warn!(%run, error = %e, "release failed; the lease will lapse");
            Err(e)
        }
    }
}

impl RemoteWorker {
    /// Its id.
    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    /// Its workloops, in order.
    pub fn workloops(&self) -> Vec<WorkloopInfo> {
        self.shared
            .loops
            .iter()
            .enumerate()
            .map(|(index, l)| WorkloopInfo {
                index,
                chain: l.chain.to_string(),
                slots: l.slots,
            })
            .collect()
    }

    /// Its envs, each with the version it serves.
    pub fn envs(&self) -> Vec<(EnvName, u32)> {
        self.shared
            .envs
            .iter()
            .map(|s| (s.env.clone(), s.version))
            .collect()
    }

    /// Its lease duration: a run's lease lapses unless a heartbeat comes within it.
    pub fn lease(&self) -> Duration {
        self.shared.lease
    }

    /// The runs it holds, sorted.
    pub fn held_runs(&self) -> Vec<RunId> {
        self.shared.purge();
        let mut runs: Vec<RunId> = self.shared.held().keys().copied().collect();
        runs.sort();
        runs
    }

    /// Whether [`RemoteWorker::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Claims up to `max` runs for workloop `workloop`, never more than its free slots. When
    /// nothing is ready (or no slot is free) it waits up to `wait` (engine clock) on the
    /// workloop's lane doorbells and on its slots freeing (by a call, or by the engine ending
    /// a held run), without polling; `[]` when the wait ends empty or the worker is closed
    /// meanwhile.
    pub async fn claim(
        &self,
        workloop: usize,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<ClaimedRun>, EngineError> {
        let s = &self.shared;
        s.check_open()?;
        let lp = s.loops.get(workloop).ok_or_else(|| {
            InvalidInput::new(
                "workloop",
                format!(
                    "no workloop {workloop}: this worker has {} (0 to {})",
                    s.loops.len(),
                    s.loops.len().saturating_sub(1)
                ),
            )
        })?;
        if max == 0 {
            return Err(InvalidInput::new("max", "must be at least 1").into());
        }
        let engine = s.inner();
        let bells = engine.bells.bells_for(&lp.chain);
        let deadline = engine.now().saturating_add(wait);
        loop {
            // Doorbells and the slot bell first, claim second: a ring in between is kept.
            let mut rings: Vec<_> = bells.iter().map(|b| Box::pin(b.notified())).collect();
            for ring in &mut rings {
                ring.as_mut().enable();
            }
            let changed = s.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let free = {
                let _claiming = lp.claiming.lock().await;
                engine.check_open()?;
                if s.closed.load(Ordering::SeqCst) {
                    return Ok(Vec::new()); // Closed while it waited: the poll ends empty.
                }
                s.purge();
                let free = lp.slots.saturating_sub(s.held_by(workloop));
                if free > 0 {
                    let runs = s.claim_now(workloop, lp, max.min(free)).await?;
                    if !runs.is_empty() {
                        return Ok(runs);
                    }
                }
                free
            };
            if engine.now() >= deadline {
                return Ok(Vec::new());
            }
            let sleep = engine.clock.sleep_until(deadline);
            if free > 0 {
                tokio::select! {
                    () = any_of(&mut rings) => {}
                    () = &mut changed => {}
                    () = sleep => {}
                }
            } else {
                // No free slot: wait for one to free, by a call or by the engine ending one of
                // the workloop's runs (timeout, lapse, cancel grace).
                let mut ended: Vec<_> = s
                    .held()
                    .values()
                    .filter(|h| h.workloop == workloop)
                    .map(|h| {
                        let local = h.local.clone();
                        Box::pin(async move {
                            local.abort.wait().await;
                        })
                    })
                    .collect();
                tokio::select! {
                    () = &mut changed => {}
                    () = any_of(&mut ended) => {}
                    () = sleep => {}
                }
            }
        }
    }

    /// Extends the leases of the given runs in one call; answers per run, in order: `Alive`,
    /// `CancelRequested` (the run was cancelled: stop it; it ends `canceled` at the end of the
    /// grace period unless completed first) or `Lost` (a token this worker does not hold, or
    /// an attempt the engine ended: stop working on it).
    pub async fn heartbeat(
        &self,
        runs: &[(RunId, FencingToken)],
    ) -> Result<Vec<LeaseState>, EngineError> {
        let s = &self.shared;
        s.check_open()?;
        s.purge();
        let mut out = vec![LeaseState::Lost; runs.len()];
        type Asked = (usize, RunId, FencingToken, Arc<LocalRun>, Arc<AtomicU64>);
        let mut asked: Vec<Asked> = Vec::new();
        {
            let held = s.held();
            for (i, &(run, token)) in runs.iter().enumerate() {
                if let Some(h) = held.get(&run).filter(|h| h.local.token == token) {
                    asked.push((i, run, token, h.local.clone(), h.lapses_at.clone()));
                }
            }
        }
        if asked.is_empty() {
            return Ok(out);
        }
        let engine = s.inner();
        let leases: Vec<(RunId, FencingToken)> =
            asked.iter().map(|(_, r, t, _, _)| (*r, *t)).collect();
        let now = engine.now();
        let states = engine.queue.heartbeat(&leases, now).await?;
        if states.len() != leases.len() {
            return Err(EngineError::Unavailable(
                "the queue answered a different count".into(),
            ));
        }
        // A live lease now lapses a lease's length after this heartbeat (never sooner).
        let extended = now.saturating_add(s.lease).as_millis();
        for ((i, run, token, local, lapses_at), state) in asked.into_iter().zip(states) {
            if state != LeaseState::Lost {
                lapses_at.fetch_max(extended, Ordering::Relaxed);
            }
            out[i] = match state {
                LeaseState::Alive if local.cancel.get() == Some(CancelReason::Cancel) => {
                    LeaseState::CancelRequested
                }
                LeaseState::Alive => LeaseState::Alive,
                LeaseState::CancelRequested => {
                    local.cancel.fire(CancelReason::Cancel);
                    LeaseState::CancelRequested
                }
                LeaseState::Lost => {
                    s.forget(run, token);
                    LeaseState::Lost
                }
            };
        }
        Ok(out)
    }

    /// Completes a held run with `output`: the run ends `completed` (first terminal write
    /// wins) and its slot frees.
    pub async fn complete(
        &self,
        run: RunId,
        token: FencingToken,
        output: serde_json::Value,
    ) -> Result<(), EngineError> {
        let s = &self.shared;
        s.check_open()?;
        let engine = s.inner();
        let output = output.to_string();
        if output.len() > engine.config.payload_max_bytes {
            return Err(InvalidInput::new(
                "output",
                format!(
                    "must be at most {} bytes, got {}",
                    engine.config.payload_max_bytes,
                    output.len()
                ),
            )
            .into());
        }
        let held = s.lookup(run, token)?;
        let mut settle = held.local.settle.lock().await;
        s.check_live(&held, *settle).await?;
        let end = AttemptEnd {
            run,
            status: RunStatus::Completed,
            output: Some(Arc::from(output)),
            attempt: attempt_record(held.attempt, "completed", None, engine.now()),
        };
        if let Err(e) = engine.finish_attempt(&held.env, token, end, None).await {
            if matches!(e, EngineError::StaleToken(_)) {
                // The lease lapsed meanwhile: the attempt is its recovery's, the slot frees.
                drop(settle);
                s.forget(run, token);
            }
            return Err(e);
        }
        *settle = true;
        drop(settle);
        s.forget(run, token);
        Ok(())
    }

    /// Fails a held run's attempt with `error`; `retry` decides what comes next. A run whose
    /// cancel was requested ends `canceled` instead (canceled runs never retry).
    pub async fn fail(
        &self,
        run: RunId,
        token: FencingToken,
        error: String,
        retry: RetryChoice,
    ) -> Result<FailOutcome, EngineError> {
        let s = &self.shared;
        s.check_open()?;
        let engine = s.inner();
        if let RetryChoice::At(at) = retry {
            let now = engine.now();
            if at < now {
                return Err(InvalidInput::new(
                    "retry_at",
                    format!(
                        "{} ms is in the past (now {} ms)",
                        at.as_millis(),
                        now.as_millis()
                    ),
                )
                .into());
            }
            if at > now.saturating_add(RETRY_AT_MAX_AHEAD) {
                return Err(InvalidInput::new(
                    "retry_at",
                    format!(
                        "must be at most {} days ahead",
                        RETRY_AT_MAX_AHEAD.as_secs() / 86_400
                    ),
                )
                .into());
            }
        }
        let held = s.lookup(run, token)?;
        let mut settle = held.local.settle.lock().await;
        s.check_live(&held, *settle).await?;
        let now = engine.now();
        let outcome = if held.local.cancel.get() == Some(CancelReason::Cancel) {
            let attempt = attempt_record(held.attempt, "canceled", Some(error), now);
            engine
                .finish_leased(run, token, RunStatus::Canceled, None, Some(attempt))
                .await?;
            FailOutcome {
                status: RunStatus::Canceled,
                retry_at: None,
            }
        } else {
            let next = engine.next_attempt_at(&held.retry, held.attempt, now);
            let at = match retry {
                RetryChoice::Policy => next,
                RetryChoice::NoRetry => None,
                RetryChoice::At(at) => next.map(|_| at),
            };
            engine
                .fail_attempt_at(
                    &held.env,
                    run,
                    token,
                    held.attempt,
                    "failed",
                    error,
                    RunStatus::Failed,
                    at,
                )
                .await?;
            let status = match at {
                None => RunStatus::Failed,
                Some(at) if at > now => RunStatus::Delayed,
                Some(_) => RunStatus::Queued,
            };
            FailOutcome {
                status,
                retry_at: at,
            }
        };
        *settle = true;
        drop(settle);
        s.forget(run, token);
        Ok(outcome)
    }

    /// Hands a held run back to its queue without counting an attempt (the worker could not
    /// run it); its slot frees. A run whose cancel was requested ends `canceled` instead (its
    /// attempt recorded as canceled): a cancel survives a release.
    pub async fn release(&self, run: RunId, token: FencingToken) -> Result<(), EngineError> {
        let s = &self.shared;
        s.check_open()?;
        let held = s.lookup(run, token)?;
        let mut settle = held.local.settle.lock().await;
        s.check_live(&held, *settle).await?;
        let result = release_lease(s.inner(), run, token, &held.env, held.attempt).await;
        match result {
            Ok(()) => *settle = true,
            // The lease lapsed meanwhile: the attempt is its recovery's (left unsettled, so a
            // recovery already waiting for it applies the retry policy), the slot is freed.
            Err(EngineError::StaleToken(_)) => {}
            Err(_) => return result,
        }
        drop(settle);
        s.forget(run, token);
        result
    }

    /// Publishes a held run's progress as a run event, as `RunContext::progress` does.
    pub fn progress(
        &self,
        run: RunId,
        token: FencingToken,
        value: &serde_json::Value,
    ) -> Result<(), EngineError> {
        let s = &self.shared;
        s.check_open()?;
        let held = s.lookup(run, token)?;
        if held.local.abort.get().is_some() {
            return Err(EngineError::StaleToken(run));
        }
        let engine = s.inner();
        let text = value.to_string();
        if text.len() > engine.config.payload_max_bytes {
            return Err(InvalidInput::new(
                "progress",
                format!(
                    "must be at most {} bytes, got {}",
                    engine.config.payload_max_bytes,
                    text.len()
                ),
            )
            .into());
        }
        engine
            .events
            .progress(run, &held.env, engine.now(), Arc::from(text));
        Ok(())
    }

    /// Closes the worker: its held runs go back to their queues without counting an attempt
    /// (those whose cancel was requested end `canceled`, as with [`RemoteWorker::release`])
    /// and its consumers are unregistered. Later calls are refused (`worker`); closing twice
    /// does nothing.
    pub async fn close(&self) {
        let s = &self.shared;
        if s.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        s.changed.notify_waiters();
        // No claim is between counting its slots and holding its runs past this point.
        for lp in &s.loops {
            drop(lp.claiming.lock().await);
        }
        let held: Vec<Held> = s.held().drain().map(|(_, h)| h).collect();
        let engine = s.inner();
        for h in held {
            let (run, token) = (h.local.run, h.local.token);
            let mut settle = h.local.settle.lock().await;
            if !*settle && h.local.abort.get().is_none() {
                // Unless released, the attempt is left unsettled: a lapsed lease (or one that
                // will lapse) is recovered by the timer, which applies the retry policy.
                if release_lease(engine, run, token, &h.env, h.attempt)
                    .await
                    .is_ok()
                {
                    *settle = true;
                }
            }
            drop(settle);
            engine.local.remove(run, token);
        }
        for lp in &s.loops {
            unregister(engine, s.id, lp.consumer).await;
        }
        s.changed.notify_waiters();
    }
}
