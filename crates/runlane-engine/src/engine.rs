//! The engine handle and its builder: opening (env `default`, recovery, the timer service),
//! run operations (get, list, wait, cancel, reschedule), admin, and the one timer service.
//!
//! Order of writes (SPEC §7): the run store first, the queue backend second. Every queue call
//! returns [`Effects`]; [`Inner::apply`] turns them into lane doorbells, status events and an
//! earlier timer deadline, so nothing in the engine polls.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, CancelOutcome, ClaimRequest, Dispatch, Effects, EnqueueAs, LaneInfo,
    Lapsed, Leased, QueueBackend, QueueInfo, RunFilter, RunRecord, RunStore, Tick, VersionInfo,
};
use runlane_core::{
    CancelReason, EnvName, EnvSettings, FencingToken, InvalidInput, LaneName, QueueError,
    QueueName, QueueSettings, RetryPolicy, RunId, RunIdGenerator, RunStatus, StoreError, Timestamp,
    VersionDef, WorkerId,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::completer::{self, Completer};
use crate::config::EngineConfig;
use crate::doorbell::Doorbells;
use crate::error::EngineError;
use crate::event::{EnvEvents, EventHub, RunEvent, RunEventKind, RunEvents};
use crate::handover::Handover;
use crate::local::{AbortKind, LocalRegistry};
use crate::meta::MetaCache;
use crate::offer::Offers;
use crate::scheduler::{ScheduleInfo, Scheduler};
use crate::trigger::{TriggerBuilder, TriggerRequest, Triggered, WaitOutcome};
use crate::worker::WorkerBuilder;
use runlane_core::metacache::SharedMetaCache;

/// The backoff after a failing backend call in a background loop, first and largest.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Opens an engine over a queue backend and a run store.
pub struct EngineBuilder {
    clock: Option<Arc<dyn Clock>>,
    config: EngineConfig,
    shared_meta: Option<Arc<dyn SharedMetaCache>>,
    meta_max_age: Duration,
}

/// How long an env-current entry stays in the in-process task metadata cache when a shared
/// level is plugged in: the staleness bound when a promotion announcement is missed.
pub const META_MAX_AGE: Duration = Duration::from_secs(5);

impl EngineBuilder {
    /// A builder with the default config and the system clock.
    pub fn new() -> Self {
        EngineBuilder {
            clock: None,
            config: EngineConfig::default(),
            shared_meta: None,
            meta_max_age: META_MAX_AGE,
        }
    }

    /// Puts a shared (second-level) task metadata cache behind the in-process one (the
    /// distributed shape plugs Redis in); its promotion announcements are listened to.
    pub fn shared_meta_cache(mut self, cache: Arc<dyn SharedMetaCache>) -> Self {
        self.shared_meta = Some(cache);
        self
    }

    /// With a shared cache: how long an env-current entry stays in the in-process cache
    /// (default [`META_MAX_AGE`]), the staleness bound when an announcement is missed.
    pub fn meta_max_age(mut self, max_age: Duration) -> Self {
        self.meta_max_age = max_age;
        self
    }

    /// Uses this clock (tests pass a `ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Uses this config.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Opens: creates env `default` if missing, recovers every unfinished run from the store
    /// into the queue backend, starts the timer service.
    pub async fn open(
        self,
        queue: Arc<dyn QueueBackend>,
        store: Arc<dyn RunStore>,
    ) -> Result<Engine, EngineError> {
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let config = self.config;
        let meta = MetaCache::new(self.shared_meta, Some(self.meta_max_age));
        if config.lease.is_zero() {
            return Err(InvalidInput::new("lease", "must be greater than zero").into());
        }
        let mut rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let ids = RunIdGenerator::new(rng.next_u64());
        let now = clock.now();

        let mut envs = store.envs().await?;
        let default = EnvName::new("default")?;
        if !envs.iter().any(|(e, _)| e == &default) {
            store.put_env(&default, EnvSettings::default()).await?;
            envs.push((default, EnvSettings::default()));
        }
        let mut effects = Effects::default();
        for (env, settings) in &envs {
            effects.merge(queue.put_env(env, *settings, now).await?);
        }
        // Queue settings kept by the store (admin changes, promoted limits) go back into the
        // queue backend before the current version fills what they leave unset: a restart
        // with empty queue state (embedded) or a lost key space keeps a paused queue paused.
        for (env, queue_name, settings) in store.queue_settings_all().await? {
            if envs.iter().any(|(e, _)| e == &env) {
                effects.merge(queue.put_queue(&env, &queue_name, settings, now).await?);
            }
        }

        let handover = Handover::new(queue.hands_over(), !queue.claims_in_process());
        let offers = Offers::new(queue.claims_on_enqueue());
        let (completer, completions) = Completer::new();
        let inner = Arc::new(Inner {
            queue,
            store,
            handover,
            offers,
            completer,
            clock,
            config,
            rng: Mutex::new(rng),
            ids: Mutex::new(ids),
            bells: Doorbells::default(),
            timer: TimerState::default(),
            events: EventHub::new(),
            meta,
            local: LocalRegistry::default(),
            counters: crate::metrics::Counters::new(),
            shutdown: AtomicBool::new(false),
            worker_seq: AtomicU64::new(0),
            declaring: tokio::sync::Mutex::new(()),
            purge_at: Mutex::new(None),
            redo: Mutex::new(Vec::new()),
            scheduler: Scheduler::default(),
            key_stripes: crate::trigger::KeyStripes::default(),
        });
        inner.meta.set_envs(envs.iter().cloned());
        if let Some(shared) = inner.meta.shared() {
            let weak = Arc::downgrade(&inner);
            shared.listen(Arc::new(move |announcement| match weak.upgrade() {
                Some(inner) => {
                    inner.meta.announced(announcement);
                    true
                }
                None => false,
            }));
        }
        for (env, _) in &envs {
            effects.merge(inner.reapply_queue_limits(env, now).await?);
        }
        effects.merge(inner.recover(now).await?);
        *inner.purge_at() = inner.store.next_purge_at(&inner.config.retention).await?;

        // Ends when the engine is gone (its sender with it); holds no strong reference.
        tokio::spawn(completer::serve(Arc::downgrade(&inner), completions));
        let handle = tokio::spawn(timer_service(
            Arc::downgrade(&inner),
            inner.queue.clone(),
            inner.clock.clone(),
            inner.timer.notify.clone(),
        ));
        *inner.timer.handle() = Some(handle);
        Scheduler::start(&inner).await;
        inner.apply(effects, None).await;
        Ok(Engine { inner })
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// What the timer service did (for tests proving there is no poll).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimerStats {
    /// Instants (clock time) at which the timer woke from a sleep.
    pub wakeups: Vec<Timestamp>,
}

/// The engine. Cheap to clone; every clone is the same engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

/// The timer service's shared state.
struct TimerState {
    /// Rung when a deadline earlier than the armed one appears, and at shutdown.
    notify: Arc<Notify>,
    /// The deadline the service sleeps until (`Timestamp::MAX`: nothing armed, or re-reading).
    armed: Mutex<Timestamp>,
    stats: Mutex<TimerStats>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Default for TimerState {
    fn default() -> Self {
        TimerState {
            notify: Arc::new(Notify::new()),
            armed: Mutex::new(Timestamp::MAX),
            stats: Mutex::new(TimerStats::default()),
            handle: Mutex::new(None),
        }
    }
}

impl TimerState {
    fn armed(&self) -> MutexGuard<'_, Timestamp> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, TimerStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-arms the service when `deadline` is earlier than what it sleeps until.
    fn offer(&self, deadline: Option<Timestamp>) {
        if let Some(d) = deadline {
            if d < *self.armed() {
                // `notify_one` keeps a permit when the service is not waiting yet.
                self.notify.notify_one();
            }
        }
    }
}

/// Everything an engine shares between its clones, workers and background tasks.
pub(crate) struct Inner {
    pub(crate) queue: Arc<dyn QueueBackend>,
    pub(crate) store: Arc<dyn RunStore>,
    /// Payloads of runs triggered here, for their first claim by a worker of this process.
    pub(crate) handover: Handover,
    /// Idle workloops' free slots, claimed for by triggers' enqueues (claim on enqueue).
    pub(crate) offers: Offers,
    /// Ends completed attempts in batches.
    completer: Completer,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    rng: Mutex<StdRng>,
    ids: Mutex<RunIdGenerator>,
    pub(crate) bells: Doorbells,
    timer: TimerState,
    pub(crate) events: EventHub,
    pub(crate) meta: MetaCache,
    pub(crate) local: LocalRegistry,
    /// Counters for metrics.
    pub(crate) counters: crate::metrics::Counters,
    shutdown: AtomicBool,
    worker_seq: AtomicU64,
    /// Serialises [`Engine::declare_tasks`] in this process (read current, register, promote).
    pub(crate) declaring: tokio::sync::Mutex<()>,
    /// The earliest instant a finished run passes its retention (`None`: nothing to purge).
    purge_at: Mutex<Option<Timestamp>>,
    /// Tick reports whose handling failed, handled again by the timer (see [`Redo`]).
    redo: Mutex<Vec<Redo>>,
    /// Fires the cron schedules of the current versions.
    pub(crate) scheduler: Scheduler,
    /// Triggers that carry an idempotency key take the stripe of their key for their store
    /// write and enqueue (see `trigger.rs::store_and_enqueue`).
    pub(crate) key_stripes: crate::trigger::KeyStripes,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The timer service holds only a weak reference: wake it so it sees the engine is gone.
        self.shutdown.store(true, Ordering::SeqCst);
        self.timer.notify.notify_one();
        self.scheduler.wake();
    }
}

/// The status of an attempt's end for the store's attempt record.
pub(crate) fn attempt_record(
    number: u32,
    outcome: &str,
    error: Option<String>,
    ended_at: Timestamp,
) -> AttemptRecord {
    AttemptRecord {
        number,
        outcome: outcome.to_owned(),
        error: error.map(without_nul),
        ended_at,
    }
}

/// `text` with every NUL character replaced by U+FFFD: an attempt's error is free text (a
/// handler's message), and PostgreSQL's `text` and `jsonb` refuse NUL, which would make the
/// attempt's end unwritable there; every store keeps the same text.
pub(crate) fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Whether a queue error only says the run or lease is gone (someone else ended it).
fn is_gone(e: &QueueError) -> bool {
    matches!(e, QueueError::NotFound(_) | QueueError::StaleToken(_))
}

/// How a version's task-defined queue limits meet the limits the queue backend holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LimitWrite {
    /// A promotion: each limit the definition sets replaces the held one.
    Promotion,
    /// At open: a definition's limit is written only where the backend holds none.
    WhereUnset,
}

impl Inner {
    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(crate) fn check_open(&self) -> Result<(), EngineError> {
        if self.shutdown.load(Ordering::SeqCst) {
            return Err(EngineError::ShutDown);
        }
        Ok(())
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub(crate) fn next_run_id(&self, now: Timestamp) -> RunId {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).next(now)
    }

    pub(crate) fn next_worker_id(&self) -> WorkerId {
        WorkerId(self.worker_seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    pub(crate) fn next_attempt_at(
        &self,
        policy: &RetryPolicy,
        attempt: u32,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        policy.next_attempt_at(attempt, now, &mut *rng)
    }

    /// Acts on what a queue call changed: doorbells, status events (except for `skip`, whose
    /// caller publishes its own), and an earlier timer deadline.
    pub(crate) async fn apply(&self, effects: Effects, skip: Option<RunId>) {
        for lane in &effects.ready_lanes {
            self.bells.ring(lane);
        }
        if self.events.has_subscribers() {
            for (run, status) in &effects.moved {
                // Terminal statuses are published by whoever wrote them to the store, and
                // `executing` by the worker that starts the run (one leased inside this call,
                // for an offer parked by a workloop of any process).
                if Some(*run) == skip || status.is_terminal() || *status == RunStatus::Executing {
                    continue;
                }
                // By id only: a run that moved is held by id, except one a call enqueued into
                // its key's list (a backend without an id index for those): its facts are then
                // read from the store.
                match self.queue.live_indexed(*run).await {
                    Ok(Some(live)) => {
                        let d = live.dispatch;
                        self.events
                            .status(*run, &d.env, self.now(), *status, d.attempt);
                    }
                    Ok(None) if *status == RunStatus::Queued => {
                        if let Ok(Some(record)) = self.store.get(*run).await {
                            if !record.status.is_terminal() {
                                self.events.status(
                                    *run,
                                    &record.env,
                                    self.now(),
                                    *status,
                                    record.attempt,
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.timer.offer(effects.deadline);
    }

    /// What a claim leaves to the engine, for in-process and remote workers alike: it counts
    /// the leases (metrics) and arms the timer for their lease and attempt deadlines (a claim
    /// creates deadlines but returns no effects).
    pub(crate) fn claimed(&self, leases: &[runlane_core::backend::Leased]) {
        self.counters.claimed(leases, self.now());
        let earliest = leases
            .iter()
            .flat_map(|l| [Some(l.lease_deadline), l.attempt_deadline])
            .flatten()
            .min();
        self.arm(earliest);
    }

    /// Re-arms the timer service when `deadline` is earlier than the armed one (calls that
    /// create deadlines without returning `Effects`: claims, cancel requests).
    pub(crate) fn arm(&self, deadline: Option<Timestamp>) {
        self.timer.offer(deadline);
    }

    /// Publishes the statuses a queue call moved `run` through (`fallback` when the backend
    /// listed none, e.g. a re-placement it does not report), then applies the other effects.
    /// The caller knows the run's env and attempt, so no lookup is needed. Returns its last
    /// status.
    pub(crate) async fn apply_own(
        &self,
        run: RunId,
        env: &EnvName,
        attempt: u32,
        fallback: RunStatus,
        effects: Effects,
    ) -> RunStatus {
        let mut last = None;
        for (_, status) in effects.moved.iter().filter(|(r, _)| *r == run) {
            // A run leased inside the call is published executing by its worker (see `apply`).
            if *status != RunStatus::Executing {
                self.publish(run, env, *status, attempt);
            }
            last = Some(*status);
        }
        let last = last.unwrap_or_else(|| {
            self.publish(run, env, fallback, attempt);
            fallback
        });
        self.apply(effects, Some(run)).await;
        last
    }

    /// Publishes a run's status change.
    pub(crate) fn publish(&self, run: RunId, env: &EnvName, status: RunStatus, attempt: u32) {
        if self.events.has_subscribers() {
            self.events.status(run, env, self.now(), status, attempt);
        } else if status.is_terminal() {
            self.events.forget_progress(run);
        }
    }

    /// Publishes a record's (terminal) status.
    pub(crate) fn publish_record(&self, record: &RunRecord) {
        // A run that ended without a claim (cancelled, expired) no longer needs its payload.
        self.handover.forget(record.id);
        match record.finished_at {
            Some(at) => {
                self.publish_finished(record.id, &record.env, record.status, record.attempt, at)
            }
            None => self.publish(record.id, &record.env, record.status, record.attempt),
        }
    }

    /// Publishes a terminal status written at `finished_at`, and arms the retention timer
    /// when the run is due for deletion before anything else.
    pub(crate) fn publish_finished(
        &self,
        run: RunId,
        env: &EnvName,
        status: RunStatus,
        attempt: u32,
        finished_at: Timestamp,
    ) {
        self.publish(run, env, status, attempt);
        if let Some(at) = self.config.retention.purge_at(status, finished_at) {
            let mut purge_at = self.purge_at();
            if purge_at.is_none_or(|p| at < p) {
                *purge_at = Some(at);
                drop(purge_at);
                self.timer.offer(Some(at));
            }
        }
    }

    /// Ends a leased run: the store's terminal write first, then the queue. A run the store
    /// already finished is only cleaned out of the queue (`None`).
    pub(crate) async fn finish_leased(
        &self,
        run: RunId,
        token: FencingToken,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
    ) -> Result<Option<RunRecord>, EngineError> {
        let now = self.now();
        let record = match self.store.finish(run, status, output, attempt, now).await {
            Ok(record) => Some(record),
            Err(StoreError::AlreadyFinished { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        self.queue_finish_quietly(run, token).await;
        if let Some(record) = &record {
            self.publish_record(record);
        }
        Ok(record)
    }

    /// Lets go of a leased run without counting an attempt: the one path of an in-process
    /// worker's drain, a remote worker's `release` and `close`, and a claimed run that could
    /// not be loaded. The caller holds the run's settle lock. The backend hands the run back
    /// to its queue (same attempt, slots released) unless its cancel was requested: it then
    /// refuses in the same atomic step and the run ends `canceled` here instead (the store's
    /// terminal write first, the attempt recorded as canceled, then the queue lets go of the
    /// lease and frees its slots, then the event), so a cancel survives a release.
    pub(crate) async fn release_leased(
        &self,
        run: RunId,
        token: FencingToken,
        env: &EnvName,
        attempt: u32,
    ) -> Result<Released, EngineError> {
        // Nothing runs it any more: a crash from here on must not count the attempt at the
        // next open (the mark goes first, so a successor's own mark is never the one cleared).
        if let Err(e) = self.store.clear_start(run, attempt).await {
            tracing::warn!(%run, error = %e, "start mark not cleared; a crash would count the attempt");
        }
        match self.queue.release(run, token, self.now()).await {
            Ok(effects) => {
                self.apply_own(run, env, attempt, RunStatus::Queued, effects)
                    .await;
                Ok(Released::Queued)
            }
            Err(QueueError::CancelRequested(_)) => {
                let ended = attempt_record(attempt, "canceled", None, self.now());
                self.finish_leased(run, token, RunStatus::Canceled, None, Some(ended))
                    .await?;
                Ok(Released::Canceled)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Ends a completed attempt this process holds the lease of, batched with the others
    /// ending now (see [`crate::completer`]): the lease is checked (a zombie's completion is
    /// dropped), the store's terminal write is made without reading the run back, then the
    /// queue lets go. A run the store already finished is only cleaned out of the queue.
    ///
    /// `next`, a worker slot's claim for its next run: with a store that does not batch ends
    /// and a queue that leases in process, it is made in the queue step of the ack and its
    /// leases answered (`None`: no claim was made; the caller claims itself).
    pub(crate) async fn finish_attempt(
        &self,
        env: &EnvName,
        token: FencingToken,
        end: AttemptEnd,
        next: Option<&ClaimRequest>,
    ) -> Result<Option<Vec<Leased>>, EngineError> {
        if self.store.group_commits() {
            self.completer.end(env, token, end).await.map(|()| None)
        } else {
            let next = next.filter(|_| self.queue.claims_in_process());
            Completer::end_now(self, env, token, end, next).await
        }
    }

    /// Logs a failed `queue.finish` unless it only says the run or lease is gone.
    pub(crate) fn warn_queue_finish(&self, run: RunId, e: &QueueError) {
        if !is_gone(e) {
            tracing::warn!(%run, error = %e, "queue finish failed");
        }
    }

    fn purge_at(&self) -> MutexGuard<'_, Option<Timestamp>> {
        self.purge_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes finished runs past their retention when due, then re-reads the next purge
    /// instant from the store (one query per purge, none per tick).
    async fn purge_if_due(&self, now: Timestamp) {
        if !self.purge_at().is_some_and(|at| at <= now) {
            return;
        }
        let retention = self.config.retention;
        // A failed step is tried again after a pause, not at once: its instant stays past, and
        // the timer would otherwise wake for it in a loop (a full disk, a store that is down).
        let retry = || Some(now.saturating_add(ERROR_BACKOFF_MAX));
        match self.store.purge_finished(&retention, now).await {
            Ok(n) => tracing::debug!(purged = n, "retention: finished runs deleted"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?ERROR_BACKOFF_MAX, "retention: purge failed");
                *self.purge_at() = retry();
                return;
            }
        }
        match self.store.next_purge_at(&retention).await {
            Ok(next) => *self.purge_at() = next,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?ERROR_BACKOFF_MAX, "retention: reading the next purge instant failed");
                *self.purge_at() = retry();
            }
        }
    }

    /// `queue.finish`, where "already gone" is fine.
    pub(crate) async fn queue_finish_quietly(&self, run: RunId, token: FencingToken) {
        match self.queue.finish(run, token, self.now()).await {
            Ok(effects) => self.apply(effects, Some(run)).await,
            Err(e) if is_gone(&e) => {}
            Err(e) => tracing::warn!(%run, error = %e, "queue finish failed"),
        }
    }

    /// Ends an attempt that did not complete: another attempt per the retry policy, else the
    /// run ends with `final_status`.
    #[allow(clippy::too_many_arguments)] // One call site per way an attempt can end.
    pub(crate) async fn fail_attempt(
        &self,
        env: &EnvName,
        policy: &RetryPolicy,
        run: RunId,
        token: FencingToken,
        attempt: u32,
        outcome: &str,
        error: String,
        final_status: RunStatus,
    ) -> Result<(), EngineError> {
        let at = self.next_attempt_at(policy, attempt, self.now());
        self.fail_attempt_at(env, run, token, attempt, outcome, error, final_status, at)
            .await
    }

    /// Ends an attempt that did not complete: another attempt at `at`, or (`None`) the run
    /// ends with `final_status`.
    #[allow(clippy::too_many_arguments)] // The attempt's facts and how it ends.
    pub(crate) async fn fail_attempt_at(
        &self,
        env: &EnvName,
        run: RunId,
        token: FencingToken,
        attempt: u32,
        outcome: &str,
        error: String,
        final_status: RunStatus,
        at: Option<Timestamp>,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let record = attempt_record(attempt, outcome, Some(error), now);
        let Some(at) = at else {
            self.finish_leased(run, token, final_status, None, Some(record))
                .await?;
            return Ok(());
        };
        let at = match self.store.record_retry(run, record, at).await {
            Ok(()) => at,
            Err(StoreError::AlreadyFinished { .. }) => {
                self.queue_finish_quietly(run, token).await;
                return Ok(());
            }
            // The store already holds this very retry (its write committed, then the queue's
            // half failed and the caller tries again): the queue's half is still to do, at the
            // instant the store recorded. A lease that moved on answers it as gone.
            Err(StoreError::StaleAttempt { current, .. }) if current == attempt + 1 => {
                match self.store.get(run).await? {
                    Some(record) if !record.status.is_terminal() && record.attempt == current => {
                        record.run_after
                    }
                    _ => return Ok(()),
                }
            }
            // The run moved on to a later attempt (this lease lapsed): a zombie's retry, dropped
            // like a lost lease; the later attempt's holder owns the run and its queue entry.
            Err(StoreError::StaleAttempt { run, attempt, .. }) => {
                tracing::debug!(%run, attempt, "retry of a stale attempt; dropped");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match self.queue.retry(run, token, at, now).await {
            Ok(effects) => {
                self.counters.retried();
                let status = if at > now {
                    RunStatus::Delayed
                } else {
                    RunStatus::Queued
                };
                self.apply_own(run, env, attempt + 1, status, effects).await;
            }
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Recovers every unfinished run of the store into the queue backend (at open).
    ///
    /// A run with a start mark (`started_at`) was executing when the process died: its attempt
    /// counts as `crashed` and its retry policy applies, so a handler that kills the process
    /// cannot run forever. A run without one returns to its queue with its original
    /// `run_after` (hence its original score) and TTL deadline. A start mark is advisory and
    /// written without waiting: one lost in the crash costs a re-run without counting.
    ///
    /// A store shared between processes keeps its start marks out of this rule: the run may be
    /// executing in another process, and a lapsed lease recovers it if that process died.
    ///
    /// Every run comes back as already accepted ([`EnqueueAs::Accepted`]): a queue key over its
    /// `max_queued` takes it all the same (the cap limits new work a trigger offers).
    async fn recover(&self, now: Timestamp) -> Result<Effects, EngineError> {
        let mut effects = Effects::default();
        let marks_count = !self.store.shared_between_processes();
        for record in self.store.unfinished().await? {
            if !LaneName::BUILT_IN.contains(&record.lane.as_str()) {
                self.queue.add_lane(&record.lane).await?;
            }
            if record.cancel_requested_at.is_some() {
                effects.merge(self.recover_cancel(&record, now).await?);
                continue;
            }
            let mut dispatch = record.dispatch();
            if marks_count && record.started_at.is_some() {
                let attempt = attempt_record(
                    record.attempt,
                    "crashed",
                    Some("the process stopped while the attempt ran".to_owned()),
                    now,
                );
                match self.next_attempt_at(&record.retry, record.attempt, now) {
                    Some(at) => {
                        match self.store.record_retry(record.id, attempt, at).await {
                            Ok(()) => {}
                            // Another process moved the run on meanwhile; it owns it now.
                            Err(StoreError::StaleAttempt { .. }) => continue,
                            Err(e) => return Err(e.into()),
                        }
                        dispatch.attempt += 1;
                        dispatch.run_after = at;
                        dispatch.ever_leased = true;
                    }
                    None => {
                        let finished = self
                            .store
                            .finish(record.id, RunStatus::Failed, None, Some(attempt), now)
                            .await?;
                        self.publish_record(&finished);
                        continue;
                    }
                }
            }
            // Accepted before the process stopped: the queue's cap (`max_queued`) limits new
            // work only, so it cannot leave this run in the store never run.
            match self.queue.enqueue(dispatch, EnqueueAs::Accepted, now).await {
                Ok(enqueued) => effects.merge(enqueued.effects),
                Err(e) => tracing::warn!(run = %record.id, error = %e, "recovery enqueue refused"),
            }
        }
        Ok(effects)
    }

    /// Recovers an unfinished run whose cancel was requested (kept in the store): the cancel is
    /// applied again instead of the run coming back. A run the queue backend still holds
    /// executing under a live lease (another process's, or a backend that kept its state)
    /// gets its grace period as any cancel; one it holds waiting is removed and ends
    /// `canceled`; one it does not hold ends `canceled` at once, its attempt recorded as
    /// canceled when a start mark says it was running (only when marks count, as for a
    /// crashed attempt: a store shared between processes keeps its marks out of it). The
    /// terminal write is fenced by that attempt like any other.
    pub(crate) async fn recover_cancel(
        &self,
        record: &RunRecord,
        now: Timestamp,
    ) -> Result<Effects, EngineError> {
        let run = record.id;
        let marks_count = !self.store.shared_between_processes();
        let outcome = match self
            .queue
            .cancel_of(&record.dispatch(), self.config.cancel_grace, now)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                // Left unfinished with its request: its next claim, or the next open, ends it.
                tracing::warn!(%run, error = %e, "recovery of a requested cancel refused");
                return Ok(Effects::default());
            }
        };
        let (attempt, effects) = match outcome {
            CancelOutcome::Requested { grace_deadline, .. } => {
                return Ok(Effects {
                    deadline: Some(grace_deadline),
                    ..Effects::default()
                });
            }
            CancelOutcome::Removed { effects, .. } => (None, effects),
            CancelOutcome::NotFound => {
                let ran = marks_count && record.started_at.is_some();
                let attempt = ran.then(|| attempt_record(record.attempt, "canceled", None, now));
                (attempt, Effects::default())
            }
        };
        match self
            .store
            .finish(run, RunStatus::Canceled, None, attempt, now)
            .await
        {
            Ok(finished) => self.publish_record(&finished),
            // Another process ended it (or moved it on) meanwhile; it owns the outcome.
            Err(StoreError::AlreadyFinished { .. } | StoreError::StaleAttempt { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(effects)
    }

    /// Applies the queue limits the env's current version defines where the queue backend
    /// holds none (it may have started empty); a limit it holds (set at an earlier promotion
    /// or by an admin) is kept, so a restart does not undo a runtime admin change.
    async fn reapply_queue_limits(
        &self,
        env: &EnvName,
        now: Timestamp,
    ) -> Result<Effects, EngineError> {
        let (_, def) = self.meta.current(self.store.as_ref(), env).await?;
        self.put_task_queue_limits(env, &def, LimitWrite::WhereUnset, now)
            .await
    }

    /// Writes the queue settings a version's task definitions set (`queue_limit`,
    /// `key_total_limit`); a setting a definition leaves unset is never touched, so an admin
    /// change to it holds (the precedence rule, docs/API.md).
    async fn put_task_queue_limits(
        &self,
        env: &EnvName,
        def: &VersionDef,
        mode: LimitWrite,
        now: Timestamp,
    ) -> Result<Effects, EngineError> {
        let mut effects = Effects::default();
        for task in &def.tasks {
            if task.queue_limit.is_none() && task.key_total_limit.is_none() {
                continue;
            }
            let queue = task.queue_name();
            let current = self.queue.queue_settings(env, &queue).await?;
            let pick = |defined: Option<u32>, held: Option<u32>| match mode {
                LimitWrite::Promotion => defined.or(held),
                LimitWrite::WhereUnset => held.or(defined),
            };
            let settings = QueueSettings {
                limit: pick(task.queue_limit, current.limit),
                key_total_limit: pick(task.key_total_limit, current.key_total_limit),
                ..current
            };
            if settings == current {
                continue;
            }
            if mode == LimitWrite::Promotion {
                // Kept with the admin settings, so that a restart or a rebuild applies the
                // promoted limit, not an older stored one (store first, SPEC §7).
                self.store
                    .put_queue_settings(env, &queue, &settings)
                    .await?;
            }
            effects.merge(self.queue.put_queue(env, &queue, settings, now).await?);
        }
        Ok(effects)
    }

    /// The record with its live status and attempt from the queue backend.
    pub(crate) async fn overlay(&self, mut record: RunRecord) -> Result<RunRecord, EngineError> {
        if record.status.is_terminal() {
            return Ok(record);
        }
        match self.queue.live_of(&record.dispatch()).await? {
            Some(live) => {
                record.status = live.status;
                record.attempt = live.dispatch.attempt;
            }
            None => {
                // The queue no longer holds it: it most likely ended after the store was read.
                if let Some(fresh) = self.store.get(record.id).await? {
                    record = fresh;
                }
            }
        }
        Ok(record)
    }

    pub(crate) async fn env_settings(&self, env: &EnvName) -> Result<EnvSettings, EngineError> {
        self.meta
            .env(self.store.as_ref(), env)
            .await?
            .ok_or_else(|| EngineError::EnvNotFound(env.to_string()))
    }

    /// Subscribes to a run: the receiver first, then the store, so nothing falls in between.
    pub(crate) async fn subscribe(&self, run: RunId) -> Result<RunEvents, EngineError> {
        let rx = self.events.receiver();
        let record = self
            .store
            .get(run)
            .await?
            .ok_or(EngineError::RunNotFound(run))?;
        let first = if record.status.is_terminal() {
            vec![RunEvent {
                seq: self.events.synthesized_seq(),
                run,
                env: record.env.clone(),
                at: record.finished_at.unwrap_or(record.created_at),
                kind: RunEventKind::Status {
                    status: record.status,
                    attempt: record.attempt,
                },
            }]
        } else {
            self.events.latest_progress(run).into_iter().collect()
        };
        Ok(RunEvents::new(run, rx, first, self.store.clone()))
    }

    // ---- the timer service's work ------------------------------------------------------

    async fn handle_tick(&self, tick: Tick, now: Timestamp) {
        let Tick {
            effects,
            expired,
            lapsed,
            timed_out,
            cancel_elapsed,
            ready_returned,
        } = tick;
        let returned: Vec<RunId> = ready_returned
            .into_iter()
            .filter(|run| !effects.moved.iter().any(|(m, _)| m == run))
            .collect();
        self.apply(effects, None).await;
        if self.events.has_subscribers() {
            for run in returned {
                // Runs returned to their queue keep their record (a key's zset).
                if let Ok(Some(live)) = self.queue.live_indexed(run).await {
                    self.publish(run, &live.dispatch.env, live.status, live.dispatch.attempt);
                }
            }
        }
        // A report about a lease comes again one lease duration later while the lease is not
        // ended (the process that heard it may have died first); one this process already
        // keeps to apply again is left to that.
        let kept: Vec<RunId> = self.redo().iter().map(|r| r.report.run()).collect();
        let reports = (expired.into_iter().map(Report::Expired))
            .chain(lapsed.into_iter().map(Report::Lapsed))
            .chain(timed_out.into_iter().map(|(r, t)| Report::TimedOut(r, t)))
            .chain(
                cancel_elapsed
                    .into_iter()
                    .map(|(r, t)| Report::CancelElapsed(r, t)),
            )
            .filter(|report| !kept.contains(&report.run()));
        for report in reports {
            match report {
                Report::Lapsed(_) => self.counters.lease_lost(),
                Report::TimedOut(..) => self.counters.timed_out(),
                Report::Expired(_) | Report::CancelElapsed(..) => {}
            }
            self.handle_report(report, now, ERROR_BACKOFF_MIN).await;
        }
    }

    /// Applies one tick report; one that fails because a store or queue call failed
    /// (`Unavailable`) is kept for the timer to apply again after `backoff`. An expiry is
    /// reported only once (the run leaves the queue), so nothing else would: the run would stay
    /// unfinished in the store with nothing to end it. (A report about a lease also comes again
    /// from the queue one lease duration later; this retry is sooner.)
    async fn handle_report(&self, report: Report, now: Timestamp, backoff: Duration) {
        let run = report.run();
        let (what, done) = match &report {
            Report::Expired(_) => {
                let done = match self
                    .store
                    .finish(run, RunStatus::Expired, None, None, now)
                    .await
                {
                    Ok(record) => {
                        self.counters.expired();
                        self.publish_record(&record);
                        Ok(())
                    }
                    Err(StoreError::AlreadyFinished { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                ("expiry not recorded", done)
            }
            Report::Lapsed(lapsed) => (
                "lapsed lease not recovered",
                self.recover_lapsed(lapsed.clone()).await,
            ),
            Report::TimedOut(_, token) => (
                "timed out attempt not ended",
                self.time_out(run, *token).await,
            ),
            Report::CancelElapsed(_, token) => (
                "cancelled run not ended",
                self.end_cancelled(run, *token).await,
            ),
        };
        if let Err(e) = done {
            // Only a call that failed on the way is tried again; any other answer is final.
            if self.is_shut_down() || !matches!(e, EngineError::Unavailable(_)) {
                tracing::warn!(%run, error = %e, "{what}");
                return;
            }
            tracing::warn!(%run, error = %e, retry_in = ?backoff, "{what}");
            let at = self.now().saturating_add(backoff);
            self.redo().push(Redo {
                report,
                at,
                backoff,
            });
            self.timer.notify.notify_one();
        }
    }

    fn redo(&self) -> MutexGuard<'_, Vec<Redo>> {
        self.redo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The earliest instant a kept tick report is due again.
    fn redo_at(&self) -> Option<Timestamp> {
        self.redo().iter().map(|r| r.at).min()
    }

    /// Applies the kept tick reports due at `now` again, each failing one kept with its backoff
    /// doubled.
    async fn redo_due(&self, now: Timestamp) {
        let due: Vec<Redo> = {
            let mut redo = self.redo();
            let (due, later) = std::mem::take(&mut *redo)
                .into_iter()
                .partition(|r| r.at <= now);
            *redo = later;
            due
        };
        for Redo {
            report, backoff, ..
        } in due
        {
            let backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
            self.handle_report(report, now, backoff).await;
        }
    }

    /// Whether the backend marked a cancel on the run's lease (canceled runs never retry).
    async fn cancel_requested(&self, run: RunId) -> Result<bool, EngineError> {
        // A leased run is held by id.
        Ok(self
            .queue
            .live_indexed(run)
            .await?
            .and_then(|l| l.lease)
            .is_some_and(|l| l.cancel_requested_at.is_some()))
    }

    /// The attempt number of the run's lease `token` and whether a cancel is marked on it, or
    /// `None` when the queue backend holds no such lease any more.
    async fn leased_attempt(
        &self,
        run: RunId,
        token: FencingToken,
    ) -> Result<Option<(u32, bool)>, EngineError> {
        let live = self.queue.live_indexed(run).await?;
        Ok(live.and_then(|live| {
            let lease = live.lease.filter(|lease| lease.token == token)?;
            Some((live.dispatch.attempt, lease.cancel_requested_at.is_some()))
        }))
    }

    /// A lease lapsed (its worker died or stopped heartbeating): slots are already released;
    /// count a `crashed` attempt and apply the retry policy. A run whose cancel was requested
    /// (marked on the lease, or kept in the store by a requester that died before the queue
    /// backend heard of it) ends `canceled` instead, never retried.
    async fn recover_lapsed(&self, lapsed: Lapsed) -> Result<(), EngineError> {
        let Lapsed { dispatch, token } = lapsed;
        let run = dispatch.run_id;
        let local = self
            .local
            .signal(run, token, CancelReason::LeaseLost, Some(AbortKind::Engine));
        let mut settle = match &local {
            Some(local) => Some(local.settle.lock().await),
            None => None,
        };
        if settle.as_deref() == Some(&true) {
            // The worker ended the attempt first; only clean the queue if it is still there.
            self.queue_finish_quietly(run, token).await;
            return Ok(());
        }
        let Some(record) = self.store.get(run).await? else {
            self.queue_finish_quietly(run, token).await;
            return Ok(());
        };
        if record.status.is_terminal() {
            self.queue_finish_quietly(run, token).await;
        } else if record.cancel_requested_at.is_some() || self.cancel_requested(run).await? {
            let attempt = attempt_record(dispatch.attempt, "canceled", None, self.now());
            self.finish_leased(run, token, RunStatus::Canceled, None, Some(attempt))
                .await?;
        } else {
            self.fail_attempt(
                &record.env,
                &record.retry,
                run,
                token,
                dispatch.attempt,
                "crashed",
                "lease lost: no heartbeat before the lease deadline".to_owned(),
                RunStatus::Failed,
            )
            .await?;
        }
        if let Some(settle) = settle.as_deref_mut() {
            *settle = true;
        }
        Ok(())
    }

    /// An attempt ran past its max duration: abort it and count a failed attempt; the run
    /// ends `timed_out` when no attempt is left.
    async fn time_out(&self, run: RunId, token: FencingToken) -> Result<(), EngineError> {
        let local = self
            .local
            .signal(run, token, CancelReason::Timeout, Some(AbortKind::Engine));
        let mut settle = match &local {
            Some(local) => {
                let settle = local.settle.lock().await;
                if *settle {
                    return Ok(()); // The handler's own outcome landed first.
                }
                Some(settle)
            }
            None => None,
        };
        // The tick's report may come late (its call held by the queue's connection): it is
        // about that one lease. Only an attempt still holding it is ended, by the lease's own
        // attempt number (the store fences the writes by it): one that ended by itself
        // meanwhile leaves the run, and any retry it is waiting for, alone.
        let Some((attempt, cancel_marked)) = self.leased_attempt(run, token).await? else {
            return Ok(());
        };
        let Some(record) = self.store.get(run).await? else {
            self.queue_finish_quietly(run, token).await;
            return Ok(());
        };
        if record.status.is_terminal() {
            self.queue_finish_quietly(run, token).await;
        } else if record.cancel_requested_at.is_some() || cancel_marked {
            let attempt = attempt_record(attempt, "canceled", None, self.now());
            self.finish_leased(run, token, RunStatus::Canceled, None, Some(attempt))
                .await?;
        } else {
            let limit = record
                .max_duration
                .map_or_else(String::new, |d| format!(" of {} ms", d.as_millis()));
            self.fail_attempt(
                &record.env,
                &record.retry,
                run,
                token,
                attempt,
                "timed_out",
                format!("attempt ran past its max duration{limit}"),
                RunStatus::TimedOut,
            )
            .await?;
        }
        if let Some(settle) = settle.as_deref_mut() {
            *settle = true;
        }
        Ok(())
    }

    /// A cancelled executing run's grace period ended without a completion: it ends
    /// `canceled` and a late completion is refused.
    async fn end_cancelled(&self, run: RunId, token: FencingToken) -> Result<(), EngineError> {
        let local = self
            .local
            .signal(run, token, CancelReason::Cancel, Some(AbortKind::Engine));
        let mut settle = match &local {
            Some(local) => {
                let settle = local.settle.lock().await;
                if *settle {
                    return Ok(()); // A completion within the grace period won.
                }
                Some(settle)
            }
            None => None,
        };
        let attempt = match self.store.get(run).await? {
            Some(record) if !record.status.is_terminal() => {
                Some(attempt_record(record.attempt, "canceled", None, self.now()))
            }
            _ => None,
        };
        if attempt.is_some() {
            self.finish_leased(run, token, RunStatus::Canceled, None, attempt)
                .await?;
        } else {
            self.queue_finish_quietly(run, token).await;
        }
        if let Some(settle) = settle.as_deref_mut() {
            *settle = true;
        }
        Ok(())
    }
}

/// How [`Inner::release_leased`] let go of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// Back to its queue with the same attempt.
    Queued,
    /// Its cancel was requested: it ended `canceled` instead of going back to its queue.
    Canceled,
}

/// What a tick reported about one run, for the engine to apply.
enum Report {
    /// A waiting run passed its TTL: it ends `expired`.
    Expired(Dispatch),
    /// A lease lapsed: the attempt counts `crashed`, the retry policy applies.
    Lapsed(Lapsed),
    /// An attempt ran past its max duration.
    TimedOut(RunId, FencingToken),
    /// A cancelled executing run's grace period ended.
    CancelElapsed(RunId, FencingToken),
}

impl Report {
    /// The run the report is about.
    fn run(&self) -> RunId {
        match self {
            Report::Expired(dispatch) => dispatch.run_id,
            Report::Lapsed(lapsed) => lapsed.dispatch.run_id,
            Report::TimedOut(run, _) | Report::CancelElapsed(run, _) => *run,
        }
    }
}

/// A tick report whose handling failed, applied again by the timer at `at`.
struct Redo {
    report: Report,
    at: Timestamp,
    /// The wait before this try; doubled (bounded) for the next.
    backoff: Duration,
}

/// The one timer service: sleeps until the queue backend's earliest deadline, is woken early
/// by `notify` when an earlier one appears, and calls `tick` at each deadline. It holds the
/// engine weakly, so dropping the last engine handle ends it too.
async fn timer_service(
    engine: Weak<Inner>,
    queue: Arc<dyn QueueBackend>,
    clock: Arc<dyn Clock>,
    notify: Arc<Notify>,
) {
    let mut backoff = ERROR_BACKOFF_MIN;
    loop {
        // Enabled before the deadline is read: an earlier deadline announced after the read
        // leaves a permit, so the sleep below is re-armed instead of missing it.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let deadline = {
            let Some(inner) = engine.upgrade() else {
                return;
            };
            if inner.is_shut_down() {
                return;
            }
            *inner.timer.armed() = Timestamp::MAX;
            match queue.next_deadline().await {
                Ok(deadline) => {
                    let purge = *inner.purge_at();
                    let deadline = [deadline, purge, inner.redo_at()]
                        .into_iter()
                        .flatten()
                        .min();
                    *inner.timer.armed() = deadline.unwrap_or(Timestamp::MAX);
                    deadline
                }
                Err(e) => {
                    tracing::warn!(error = %e, "timer: reading the next deadline failed");
                    let retry_at = clock.now().saturating_add(backoff);
                    backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                    drop(inner);
                    tokio::select! {
                        () = clock.sleep_until(retry_at) => {}
                        () = &mut notified => {}
                    }
                    continue;
                }
            }
        };
        let woke = match deadline {
            Some(at) => tokio::select! {
                () = clock.sleep_until(at) => true,
                () = &mut notified => false,
            },
            None => {
                notified.await;
                false
            }
        };
        if !woke {
            continue; // Re-arm: a notification is not a wake-up.
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        if inner.is_shut_down() {
            return;
        }
        let now = clock.now();
        inner.timer.stats().wakeups.push(now);
        inner.purge_if_due(now).await;
        inner.redo_due(now).await;
        match queue.tick(now).await {
            Ok(tick) => {
                backoff = ERROR_BACKOFF_MIN;
                inner.handle_tick(tick, now).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "timer: tick failed");
                let retry_at = now.saturating_add(backoff);
                backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                drop(inner);
                clock.sleep_until(retry_at).await;
            }
        }
    }
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    /// The engine clock's `now`.
    pub fn now(&self) -> Timestamp {
        self.inner.now()
    }

    /// The engine's config.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Starts a trigger.
    pub fn trigger(&self, task: &str) -> TriggerBuilder {
        TriggerBuilder::new(self.clone(), task)
    }

    /// Triggers one validated request.
    // Not an `async fn`: one moves its arguments into its body, so its future would hold the
    // request twice (copied whole at each await of every caller).
    #[allow(clippy::manual_async_fn)] // See the comment above.
    pub fn trigger_request(
        &self,
        request: TriggerRequest,
    ) -> impl std::future::Future<Output = Result<Triggered, EngineError>> + Send + '_ {
        async move {
            self.inner.check_open()?;
            if !self.inner.store.group_commits() {
                let now = self.now();
                let prepared = self.prepare(&request, now, None).await?;
                return self.store_and_enqueue(prepared, now).await;
            }
            // Once polled, the trigger's outcome no longer depends on its caller (see
            // `detached`).
            let engine = self.clone();
            Self::detached(Box::pin(async move {
                let now = engine.now();
                let prepared = engine.prepare(&request, now, None).await?;
                engine.store_and_enqueue(prepared, now).await
            }))
            .await
        }
    }

    /// Triggers a batch: all valid or nothing stored (`BatchItem` names the bad one);
    /// idempotency duplicates inside the batch collapse.
    pub async fn trigger_batch(
        &self,
        requests: Vec<TriggerRequest>,
    ) -> Result<Vec<Triggered>, EngineError> {
        self.inner.check_open()?;
        self.batch(requests).await
    }

    /// Waits up to `timeout` for a run to finish (at once if it already has).
    pub async fn wait(&self, run: RunId, timeout: Duration) -> Result<WaitOutcome, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let mut events = inner.subscribe(run).await?;
        let deadline = inner.now().saturating_add(timeout);
        let sleep = inner.clock.sleep_until(deadline);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) if event.is_terminal() => break,
                    Some(_) => continue,
                    None => break, // Ended (shutdown): answer with what the store says.
                },
                () = &mut sleep => break,
            }
        }
        let record = self.get(run).await?;
        Ok(if record.status.is_terminal() {
            WaitOutcome::Finished(record)
        } else {
            WaitOutcome::Pending {
                run_id: run,
                status: record.status,
            }
        })
    }

    /// Cancels a run (409-style `AlreadyFinished` for a finished one).
    pub async fn cancel(&self, run: RunId) -> Result<RunRecord, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let now = inner.now();
        let record = inner
            .store
            .get(run)
            .await?
            .ok_or(EngineError::RunNotFound(run))?;
        if record.status.is_terminal() {
            return Err(EngineError::AlreadyFinished {
                run,
                status: record.status,
            });
        }
        // Store first: the request is durable before the queue backend hears of it, so a crash
        // or a lost queue state after this point cannot bring the run back to life (recovery,
        // lease-lapse recovery and every later claim end it `canceled`).
        inner.store.request_cancel(run, now).await?;
        // A run triggered here and not claimed yet is read back from the store at its claim
        // (where the request is seen), not handed over.
        inner.handover.forget(run);
        match inner
            .queue
            .cancel_of(&record.dispatch(), inner.config.cancel_grace, now)
            .await?
        {
            CancelOutcome::Removed { effects, .. } => {
                let result = inner
                    .store
                    .finish(run, RunStatus::Canceled, None, None, now)
                    .await;
                inner.apply(effects, Some(run)).await;
                let record = result?;
                inner.publish_record(&record);
                Ok(record)
            }
            CancelOutcome::Requested {
                token,
                grace_deadline,
                ..
            } => {
                inner.arm(Some(grace_deadline));
                // In-process: the handler learns at once (SPEC §5); remote workers learn on
                // their next heartbeat.
                inner.local.signal(run, token, CancelReason::Cancel, None);
                // Read again: a handler that stops at once may already have ended the run.
                let record = inner.store.get(run).await?.unwrap_or(record);
                inner.overlay(record).await
            }
            CancelOutcome::NotFound => {
                let record = inner
                    .store
                    .finish(run, RunStatus::Canceled, None, None, now)
                    .await?;
                inner.publish_record(&record);
                Ok(record)
            }
        }
    }

    /// Moves a delayed or queued run to `run_after` (its TTL deadline is recomputed).
    pub async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
    ) -> Result<RunRecord, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let now = inner.now();
        let record = self.get(run).await?;
        if !matches!(record.status, RunStatus::Delayed | RunStatus::Queued) {
            return Err(EngineError::WrongState {
                run,
                status: record.status,
                operation: "reschedule",
            });
        }
        let ttl_deadline = runlane_core::ttl::deadline(now, run_after, record.ttl);
        let effects = inner
            .queue
            .reschedule_of(&record.dispatch(), run_after, ttl_deadline, now)
            .await?;
        inner.store.reschedule(run, run_after, ttl_deadline).await?;
        let status = if run_after > now {
            RunStatus::Delayed
        } else {
            RunStatus::Queued
        };
        inner
            .apply_own(run, &record.env, record.attempt, status, effects)
            .await;
        self.get(run).await
    }

    /// Manual retry of a finished run: a new run (`retry_of`, source `manual`, lane `manual`).
    pub async fn retry_run(&self, run: RunId) -> Result<Triggered, EngineError> {
        self.inner.check_open()?;
        self.manual_retry(run).await
    }

    /// One run with its live status.
    pub async fn get(&self, run: RunId) -> Result<RunRecord, EngineError> {
        self.inner.check_open()?;
        let record = self
            .inner
            .store
            .get(run)
            .await?
            .ok_or(EngineError::RunNotFound(run))?;
        self.inner.overlay(record).await
    }

    /// Runs matching the filter (statuses are live).
    pub async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let want = filter.limit.unwrap_or(100) as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let live_status = filter.status.filter(|s| !s.is_terminal());
        let Some(status) = live_status else {
            // No filter, or a terminal one the store holds exactly.
            let mut out = Vec::new();
            for record in inner.store.list(filter).await? {
                out.push(inner.overlay(record).await?);
            }
            return Ok(out);
        };
        // Waiting and executing statuses are refined by the queue backend: page through the
        // store's unfinished runs and keep those whose live status matches.
        let mut page_filter = filter.clone();
        page_filter.status = None;
        page_filter.limit = Some(want.clamp(1, 1000) as u32);
        let mut out = Vec::new();
        loop {
            let page = inner.store.list(&page_filter).await?;
            let Some(last) = page.last().map(|r| r.id) else {
                break;
            };
            let full = page.len() >= page_filter.limit.unwrap_or(1) as usize;
            for record in page {
                if record.status.is_terminal() {
                    continue;
                }
                let record = inner.overlay(record).await?;
                if record.status == status {
                    out.push(record);
                    if out.len() >= want {
                        return Ok(out);
                    }
                }
            }
            if !full {
                break;
            }
            page_filter.after = Some(last);
        }
        Ok(out)
    }

    /// Subscribes to a run's events (latest progress first).
    pub async fn subscribe(&self, run: RunId) -> Result<RunEvents, EngineError> {
        self.inner.check_open()?;
        self.inner.subscribe(run).await
    }

    /// Subscribes to an env's run events.
    pub fn subscribe_env(&self, env: &str) -> Result<EnvEvents, EngineError> {
        self.inner.check_open()?;
        let env = EnvName::new(env)?;
        Ok(EnvEvents::new(env, self.inner.events.receiver()))
    }

    /// A worker builder.
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(self.clone())
    }

    /// Creates or updates an env (raising limits admits at once).
    pub async fn set_env(&self, env: &str, settings: EnvSettings) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        settings.validate()?;
        inner.store.put_env(&env, settings).await?;
        let effects = inner.queue.put_env(&env, settings, inner.now()).await?;
        inner.meta.put_env(&env, settings);
        inner.apply(effects, None).await;
        Ok(())
    }

    /// Creates an env; `EnvExists` when it is already there (also when another process
    /// sharing the store created it first), and then nothing changes.
    pub async fn create_env(&self, env: &str, settings: EnvSettings) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let name = EnvName::new(env)?;
        settings.validate()?;
        if !inner.store.create_env(&name, settings).await? {
            return Err(EngineError::EnvExists(env.to_string()));
        }
        let effects = inner.queue.put_env(&name, settings, inner.now()).await?;
        inner.meta.put_env(&name, settings);
        inner.apply(effects, None).await;
        Ok(())
    }

    /// An env's settings.
    pub async fn env_settings(&self, env: &str) -> Result<EnvSettings, EngineError> {
        self.inner.check_open()?;
        self.inner.env_settings(&EnvName::new(env)?).await
    }

    /// Every env with its settings, as the run store holds them.
    pub async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, EngineError> {
        self.inner.check_open()?;
        Ok(self.inner.store.envs().await?)
    }

    /// Sets a queue's settings (raising limits or resuming admits at once).
    pub async fn set_queue(
        &self,
        env: &str,
        queue: &str,
        settings: QueueSettings,
    ) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let (env, queue) = self.queue_names(env, queue).await?;
        settings.validate()?;
        self.put_queue(&env, &queue, settings).await
    }

    /// Pauses a queue.
    pub async fn pause_queue(&self, env: &str, queue: &str) -> Result<(), EngineError> {
        self.set_paused(env, queue, true).await
    }

    /// Resumes a queue.
    pub async fn resume_queue(&self, env: &str, queue: &str) -> Result<(), EngineError> {
        self.set_paused(env, queue, false).await
    }

    async fn set_paused(&self, env: &str, queue: &str, paused: bool) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let (env, queue) = self.queue_names(env, queue).await?;
        let current = self.inner.queue.queue_settings(&env, &queue).await?;
        self.put_queue(&env, &queue, QueueSettings { paused, ..current })
            .await
    }

    async fn queue_names(
        &self,
        env: &str,
        queue: &str,
    ) -> Result<(EnvName, QueueName), EngineError> {
        let env = EnvName::new(env)?;
        let queue = QueueName::new(queue)?;
        self.inner.env_settings(&env).await?;
        Ok((env, queue))
    }

    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        // The store first (SPEC §7): the settings outlive the queue backend's state.
        inner
            .store
            .put_queue_settings(env, queue, &settings)
            .await?;
        let effects = inner
            .queue
            .put_queue(env, queue, settings, inner.now())
            .await?;
        inner.apply(effects, None).await;
        Ok(())
    }

    /// Queues of an env.
    pub async fn queues(&self, env: &str) -> Result<Vec<QueueInfo>, EngineError> {
        self.inner.check_open()?;
        let env = EnvName::new(env)?;
        self.inner.env_settings(&env).await?;
        Ok(self.inner.queue.queues(&env).await?)
    }

    /// Adds a lane.
    pub async fn add_lane(&self, lane: &str) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let lane = LaneName::new(lane)?;
        Ok(self.inner.queue.add_lane(&lane).await?)
    }

    /// Lanes with depth.
    pub async fn lanes(&self) -> Result<Vec<LaneInfo>, EngineError> {
        self.inner.check_open()?;
        Ok(self.inner.queue.lanes(self.now()).await?)
    }

    /// Registers a version of an env's tasks; returns its number.
    pub async fn register_version(&self, env: &str, def: VersionDef) -> Result<u32, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        inner.env_settings(&env).await?;
        def.validate()?;
        Ok(inner.store.add_version(&env, def, inner.now()).await?)
    }

    /// Every registered version of an env, by number (the implicit version 0 is not listed),
    /// as the run store holds them.
    pub async fn versions(&self, env: &str) -> Result<Vec<VersionInfo>, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        inner.env_settings(&env).await?;
        Ok(inner.store.versions(&env).await?)
    }

    /// One version of an env (0 is the implicit empty version, with no creation time);
    /// `UnknownVersion` when the env has no such version.
    pub async fn version(&self, env: &str, version: u32) -> Result<VersionInfo, EngineError> {
        let unknown = || EngineError::UnknownVersion {
            version,
            task: String::new(),
        };
        if version == 0 {
            self.inner.check_open()?;
            let env = EnvName::new(env)?;
            self.inner.env_settings(&env).await?;
            return Ok(VersionInfo {
                number: 0,
                created_at: None,
                def: VersionDef::default(),
            });
        }
        self.versions(env)
            .await?
            .into_iter()
            .find(|v| v.number == version)
            .ok_or_else(unknown)
    }

    /// The env's current version (0 before any promotion), read from the run store.
    pub async fn current_version(&self, env: &str) -> Result<u32, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        inner.env_settings(&env).await?;
        Ok(inner.store.current_version(&env).await?)
    }

    /// Makes a version current and writes the queue limits its task definitions set (only
    /// those: a limit a definition leaves unset keeps its value, admin changes included).
    pub async fn promote(&self, env: &str, version: u32) -> Result<(), EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        inner.env_settings(&env).await?;
        let def = inner
            .meta
            .version(inner.store.as_ref(), &env, version)
            .await?
            .ok_or(EngineError::UnknownVersion {
                version,
                task: String::new(),
            })?;
        inner.store.promote(&env, version).await?;
        let effects = inner
            .put_task_queue_limits(&env, &def, LimitWrite::Promotion, inner.now())
            .await?;
        inner.meta.promoted(&env, version, def).await;
        inner.apply(effects, None).await;
        inner.scheduler.replan();
        Ok(())
    }

    /// The cron schedules of `env`'s current version, each with its next tick (the first
    /// after now) and the last tick fired.
    pub async fn schedules(&self, env: &str) -> Result<Vec<ScheduleInfo>, EngineError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let env = EnvName::new(env)?;
        inner.env_settings(&env).await?;
        inner.schedule_infos(&env, inner.now()).await
    }

    /// What this engine heard about other processes' promotions (task metadata cache
    /// announcements); changes each time one is applied. Always zero without a shared cache.
    pub fn meta_announcements(&self) -> tokio::sync::watch::Receiver<crate::meta::MetaWatch> {
        self.inner.meta.watch()
    }

    /// Workloops of this process idle with their free slots offered to its triggers (claim
    /// on enqueue; always zero with a queue that cannot claim in an enqueue).
    pub fn idle_offers(&self) -> usize {
        self.inner.offers.len()
    }

    /// The engine's counters (this process, since open).
    pub fn metrics(&self) -> crate::metrics::EngineMetrics {
        let mut m = self.inner.counters.snapshot();
        m.read_ahead_used = self.inner.handover.read_ahead_taken();
        m
    }

    /// When each lane last had a run claimed in this process (readiness: a stalled consumer
    /// shows as an old instant beside ready runs).
    pub fn last_claims(&self) -> std::collections::HashMap<LaneName, Timestamp> {
        self.inner.counters.last_claims()
    }

    /// What the timer service did.
    pub fn timer_stats(&self) -> TimerStats {
        self.inner.timer.stats().clone()
    }

    /// Stops the timer service; further calls fail with `ShutDown`.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.shutdown.store(true, Ordering::SeqCst);
        inner.timer.notify.notify_one();
        let handle = inner.timer.handle().take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                tracing::warn!(error = %e, "timer service ended abnormally");
            }
        }
        inner.scheduler.stop().await;
        inner.events.close();
    }
}
