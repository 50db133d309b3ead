//! [`DistributedQueue`]: the Redis queue backend with the queue side of the store-first
//! protocol (SPEC §7). Every call goes to [`RedisQueue`] unchanged except `enqueue`:
//!
//! - a run Redis accepted is marked `in_queue` in PostgreSQL lazily: its id joins a buffer
//!   that a marker task writes with one `UPDATE … WHERE id = ANY(…)` per batch, off the
//!   trigger's path;
//! - a run Redis could not take because Redis is unavailable is already committed (the engine
//!   inserts before it enqueues), so it is answered as placed and left `pending_enqueue` for
//!   the reconciler. Refusals (queue full, unknown env or lane) still reach the engine, which
//!   removes the run again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    LaneInfo, LeaseState, Leased, LiveRun, OfferSteps, ParkedOffer, Placement, QueueBackend,
    QueueInfo, RunRecord, Tick,
};
use runlane_core::chain::ClaimChain;
use runlane_core::{
    EnvName, EnvSettings, FencingToken, LaneName, QueueError, QueueName, QueueSettings, RunId,
    Timestamp,
};
use runlane_postgres::PostgresStore;
use runlane_redis::RedisQueue;
use tokio::sync::Notify;

use crate::bells::Bells;
use crate::wake::Wake;

/// The environment variable naming a crash point (tests of the store-first protocol).
pub const FAILPOINT_VAR: &str = "RUNLANE_FAILPOINT";

/// The crash point between the PostgreSQL commit of a trigger and its Redis enqueue: with
/// `RUNLANE_FAILPOINT=after_commit_before_enqueue` the process aborts there.
pub const AFTER_COMMIT_BEFORE_ENQUEUE: &str = "after_commit_before_enqueue";

/// The crash point between a run's terminal write in PostgreSQL and its ack in Redis: with
/// `RUNLANE_FAILPOINT=after_terminal_write_before_ack` the process aborts there.
pub const AFTER_TERMINAL_WRITE_BEFORE_ACK: &str = "after_terminal_write_before_ack";

/// The most ids one `in_queue` update carries.
const MARK_BATCH_MAX: usize = 5_000;

/// Ids waiting to be marked `in_queue`.
#[derive(Default)]
struct Marks {
    ids: Mutex<Vec<RunId>>,
    wake: Notify,
    closed: AtomicBool,
    marked: AtomicU64,
    deferred: AtomicU64,
}

impl Marks {
    fn lock(&self) -> MutexGuard<'_, Vec<RunId>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the marker to write what is buffered at once (no linger) and then end.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn push(&self, run: RunId) {
        let first = {
            let mut ids = self.lock();
            ids.push(run);
            ids.len() == 1
        };
        if first {
            self.wake.notify_one();
        }
    }
}

/// The queue backend of the distributed shape (see the module docs).
pub struct DistributedQueue {
    redis: Arc<RedisQueue>,
    marks: Arc<Marks>,
    /// The marker task, taken by [`DistributedQueue::flush_marks`].
    marker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    wake: Option<Arc<Wake>>,
    bells: Option<Arc<Bells>>,
    /// Read once at construction: `RUNLANE_FAILPOINT`.
    failpoint: Option<String>,
}

impl Drop for DistributedQueue {
    fn drop(&mut self) {
        self.marks.close();
        if let Some(wake) = &self.wake {
            wake.close();
        }
    }
}

impl DistributedQueue {
    /// Wraps `redis` and starts the marker task that marks accepted runs `in_queue` in
    /// `store`, waiting `linger` after the first id of a batch so that more can join it. Must
    /// be called inside a tokio runtime.
    pub fn new(redis: Arc<RedisQueue>, store: Arc<PostgresStore>, linger: Duration) -> Self {
        let marks = Arc::new(Marks::default());
        let task = tokio::spawn(marker(marks.clone(), store, linger));
        DistributedQueue {
            redis,
            marks,
            marker: Mutex::new(Some(task)),
            wake: None,
            bells: None,
            failpoint: std::env::var(FAILPOINT_VAR).ok(),
        }
    }

    /// Writes the `in_queue` marks still buffered (without waiting out the linger) and ends
    /// the marker, waiting at most `bound`: a planned stop leaves no accepted run
    /// `pending_enqueue` for the reconciler. Marks of runs enqueued afterwards are not written
    /// (the reconciler takes them). Called once the engine no longer enqueues.
    pub async fn flush_marks(&self, bound: Duration) {
        self.marks.close();
        let task = self.marker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(bound, task).await.is_err() {
                tracing::warn!(
                    ?bound,
                    "the in_queue marks were not all written before the stop"
                );
            }
        }
    }

    /// Also announces the deadlines each call leaves to the timer owner.
    pub(crate) fn with_wake(mut self, wake: Arc<Wake>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Also reads the Redis doorbells of every chain a consumer registers, for this process's
    /// workloops (see `bells.rs`).
    pub(crate) fn with_bells(mut self, bells: Arc<Bells>) -> Self {
        self.bells = Some(bells);
        self
    }

    /// Passes a cancel's outcome on, noting its deadlines for the timer owner.
    fn noted(
        &self,
        outcome: Result<CancelOutcome, QueueError>,
    ) -> Result<CancelOutcome, QueueError> {
        match (&self.wake, &outcome) {
            (Some(wake), Ok(CancelOutcome::Removed { effects, .. })) => wake.note(effects),
            (Some(wake), Ok(CancelOutcome::Requested { grace_deadline, .. })) => {
                wake.note_deadline(Some(*grace_deadline));
            }
            _ => {}
        }
        outcome
    }

    /// Passes a call's effects on, noting its deadline for the timer owner.
    fn rang(&self, effects: Result<Effects, QueueError>) -> Result<Effects, QueueError> {
        if let (Some(wake), Ok(fx)) = (&self.wake, &effects) {
            wake.note(fx);
        }
        effects
    }

    /// Arms the lease timer for the deadlines of the leases a claim answered.
    fn note_leases(&self, leased: &Result<Vec<Leased>, QueueError>) {
        if let (Some(wake), Ok(runs)) = (&self.wake, leased) {
            let earliest = runs
                .iter()
                .flat_map(|l| std::iter::once(l.lease_deadline).chain(l.attempt_deadline))
                .min();
            wake.note_deadline(earliest);
        }
    }

    /// The crash point before a committed run's enqueue; answers the run and when it is due
    /// (what [`Self::enqueued`] needs once the call answered).
    fn before_enqueue(&self, dispatch: &Dispatch) -> (RunId, Timestamp) {
        let run = dispatch.run_id;
        // The engine committed the run; the process dies before Redis hears of it.
        self.failpoint(
            AFTER_COMMIT_BEFORE_ENQUEUE,
            format_args!("before run {run} is enqueued"),
        );
        (run, dispatch.run_after)
    }

    /// A Redis enqueue's answer for the engine: an accepted run joins the `in_queue` marks;
    /// one Redis could not take (unavailable) is already committed, so it is answered as
    /// placed and left `pending_enqueue` for the reconciler.
    fn enqueued(
        &self,
        run: RunId,
        due: Timestamp,
        now: Timestamp,
        answer: Result<(Enqueued, Vec<Leased>), QueueError>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        match answer {
            Ok(answer) => {
                self.marks.push(run);
                if let Some(wake) = &self.wake {
                    wake.note(&answer.0.effects);
                }
                Ok(answer)
            }
            Err(QueueError::Unavailable(e)) => {
                // The reconciler, armed by the oldest pending row, enqueues the run once Redis
                // answers again.
                tracing::warn!(%run, error = %e, "redis enqueue failed after the commit; the reconciler will enqueue the run");
                self.marks.deferred.fetch_add(1, Ordering::Relaxed);
                let placement = if due > now {
                    Placement::Delayed
                } else {
                    Placement::Queued
                };
                let enqueued = Enqueued {
                    placement,
                    effects: Effects::default(),
                };
                Ok((enqueued, Vec::new()))
            }
            Err(e) => Err(e),
        }
    }

    /// Aborts the process when the failpoint `name` is armed.
    fn failpoint(&self, name: &str, what: std::fmt::Arguments<'_>) {
        if self.failpoint.as_deref() == Some(name) {
            eprintln!("failpoint {name}: aborting {what}");
            std::process::abort();
        }
    }

    /// Whether this process owns the deployment's timers now (always false for a queue
    /// opened without the shape's background tasks, whose timer reads every deadline).
    pub fn owns_timers(&self) -> bool {
        self.wake.as_ref().is_some_and(|w| w.owns_timers())
    }

    /// The Redis queue backend.
    pub fn redis(&self) -> &Arc<RedisQueue> {
        &self.redis
    }

    /// Runs marked `in_queue` by the marker task since open.
    pub fn marked(&self) -> u64 {
        self.marks.marked.load(Ordering::Relaxed)
    }

    /// Enqueues accepted after Redis failed: committed, left `pending_enqueue` for the
    /// reconciler.
    pub fn deferred(&self) -> u64 {
        self.marks.deferred.load(Ordering::Relaxed)
    }

    /// The reconciler's enqueue: every run of `records` into Redis (idempotent by run id).
    /// Answers the ids Redis now holds (the reconciler marks them `in_queue`) with the merged
    /// effects, or Redis's error when it is unavailable (the rest waits for the next pass).
    /// Each run is enqueued as already accepted ([`EnqueueAs::Accepted`]): it is committed, and
    /// its trigger answered it as placed or its process died after the commit, so its queue
    /// key's `max_queued` does not apply (a refusal would leave it pending for as long as the
    /// key stays full). A run Redis still refuses (an unknown env) stays pending and is tried
    /// again later.
    pub async fn reconcile(
        &self,
        records: Vec<RunRecord>,
        now: Timestamp,
    ) -> (Result<Vec<RunId>, String>, Effects) {
        let mut ids = Vec::with_capacity(records.len());
        let mut effects = Effects::default();
        for record in records {
            let run = record.id;
            if !LaneName::BUILT_IN.contains(&record.lane.as_str()) {
                if let Err(e) = self.redis.add_lane(&record.lane).await {
                    return (Err(e.to_string()), effects);
                }
            }
            match self
                .redis
                .enqueue(record.dispatch(), EnqueueAs::Accepted, now)
                .await
            {
                Ok(enqueued) => {
                    if let Some(wake) = &self.wake {
                        wake.note(&enqueued.effects);
                    }
                    effects.merge(enqueued.effects);
                    ids.push(run);
                }
                Err(QueueError::Unavailable(e)) => {
                    if ids.is_empty() {
                        return (Err(e), effects);
                    }
                    break;
                }
                Err(e) => tracing::warn!(%run, error = %e, "reconciler enqueue refused"),
            }
        }
        (Ok(ids), effects)
    }
}

/// Marks buffered ids `in_queue`, a batch at a time, until the queue is dropped. A failed
/// update leaves its rows `pending_enqueue`: the reconciler enqueues them again, which Redis
/// answers idempotently, and marks them then.
async fn marker(marks: Arc<Marks>, store: Arc<PostgresStore>, linger: Duration) {
    loop {
        if marks.lock().is_empty() {
            if marks.closed.load(Ordering::SeqCst) {
                return;
            }
            marks.wake.notified().await;
            if !linger.is_zero() && !marks.closed.load(Ordering::SeqCst) {
                // Ids joining the batch do not wake the marker (the buffer is not empty);
                // dropping the queue does: it writes the batch at once.
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {}
                    _ = marks.wake.notified() => {}
                }
            }
        }
        let batch: Vec<RunId> = {
            let mut ids = marks.lock();
            let n = ids.len().min(MARK_BATCH_MAX);
            ids.drain(..n).collect()
        };
        if batch.is_empty() {
            continue;
        }
        match store.mark_in_queue(&batch).await {
            Ok(n) => {
                marks.marked.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(runs = batch.len(), error = %e, "marking runs in_queue failed; the reconciler will");
            }
        }
    }
}

#[async_trait]
impl QueueBackend for DistributedQueue {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(self.redis.put_env(env, settings, now).await)
    }
    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(self.redis.put_queue(env, queue, settings, now).await)
    }
    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        self.redis.queue_settings(env, queue).await
    }
    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        self.redis.add_lane(lane).await
    }
    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        self.redis.has_lane(lane).await
    }
    async fn lanes(&self, now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        self.redis.lanes(now).await
    }
    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        self.redis.queues(env).await
    }
    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        self.redis.env_usage(env).await
    }
    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        let (run, due) = self.before_enqueue(&dispatch);
        let answer = self.redis.enqueue(dispatch, why, now).await;
        self.enqueued(run, due, now, answer.map(|e| (e, Vec::new())))
            .map(|(e, _)| e)
    }
    async fn enqueue_claiming(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        claim: &ClaimRequest,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let (run, due) = self.before_enqueue(&dispatch);
        let answer = self.redis.enqueue_claiming(dispatch, why, now, claim).await;
        self.enqueued(run, due, now, answer)
    }
    async fn enqueue_handing(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        carried: Option<(&ClaimRequest, Option<ParkedOffer>)>,
        handed: Option<&[u8]>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let (run, due) = self.before_enqueue(&dispatch);
        let answer = self
            .redis
            .enqueue_handing(dispatch, why, now, carried, handed)
            .await;
        self.enqueued(run, due, now, answer)
    }
    /// Only with the shape's bell readers (the distributed shape wires them), which deliver
    /// what enqueues lease for parked offers: a queue used without them (as the conformance
    /// suite does) parks none, since a lease made for a parked offer would then wait for its
    /// workloop's next claim (the offer's refresh).
    fn parks_offers(&self) -> bool {
        self.bells.is_some()
    }
    /// Until shutdown or dropping the shape's handle ends the readers (a worker may run on,
    /// holding the engine).
    fn hears_deliveries(&self) -> bool {
        self.bells.as_ref().is_some_and(|bells| bells.reading())
    }
    async fn claim_parking(
        &self,
        request: &ClaimRequest,
        steps: &OfferSteps,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let leased = self.redis.claim_parking(request, steps, now).await;
        self.note_leases(&leased);
        leased
    }
    fn claims_on_enqueue(&self) -> bool {
        self.redis.claims_on_enqueue()
    }
    fn claims_on_enqueue_now(&self) -> bool {
        self.redis.claims_on_enqueue_now()
    }
    fn combines_enqueues(&self) -> bool {
        self.redis.combines_enqueues()
    }
    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let leased = self.redis.claim(request, now).await;
        self.note_leases(&leased);
        leased
    }
    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        self.redis.heartbeat(leases, now).await
    }
    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        self.redis.check_lease(run, token).await
    }
    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        self.redis.check_leases(leases).await
    }
    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        // The engine wrote the terminal state; the process dies before Redis lets go.
        self.failpoint(
            AFTER_TERMINAL_WRITE_BEFORE_ACK,
            format_args!("before run {run} is acked"),
        );
        self.rang(self.redis.finish(run, token, now).await)
    }
    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(self.redis.retry(run, token, run_after, now).await)
    }
    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(self.redis.release(run, token, now).await)
    }
    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let outcome = self.redis.cancel(run, grace, now).await;
        self.noted(outcome)
    }
    async fn cancel_of(
        &self,
        dispatch: &Dispatch,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let outcome = self.redis.cancel_of(dispatch, grace, now).await;
        self.noted(outcome)
    }
    async fn reschedule_of(
        &self,
        dispatch: &Dispatch,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(
            self.redis
                .reschedule_of(dispatch, run_after, ttl_deadline, now)
                .await,
        )
    }
    async fn live_of(&self, dispatch: &Dispatch) -> Result<Option<LiveRun>, QueueError> {
        self.redis.live_of(dispatch).await
    }
    async fn live_indexed(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.redis.live_indexed(run).await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.rang(
            self.redis
                .reschedule(run, run_after, ttl_deadline, now)
                .await,
        )
    }
    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        let tick = self.redis.tick(now).await;
        if let (Some(wake), Ok(t)) = (&self.wake, &tick) {
            wake.note(&t.effects);
        }
        tick
    }
    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        match &self.wake {
            // One process owns the timers (`timer.rs`): only its timer sees Redis's deadlines,
            // and its read records what it sleeps until, for other processes' announcements.
            Some(wake) if wake.owns_timers() => self.redis.next_deadline_armed().await,
            Some(_) => Ok(None),
            None => self.redis.next_deadline().await,
        }
    }
    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.redis.live(run).await
    }
    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        self.redis.snapshot().await
    }
    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        let id = self.redis.register_consumer(chain, now).await?;
        if let Some(bells) = &self.bells {
            // The chain's reader has read its bells' last ids before the workloop's first
            // claim: every ring after that claim reaches it.
            bells.join(id, chain).await;
        }
        Ok(id)
    }
    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        if let Some(bells) = &self.bells {
            bells.leave(id).await;
        }
        self.rang(self.redis.unregister_consumer(id, now).await)
    }
    fn claims_in_process(&self) -> bool {
        self.redis.claims_in_process()
    }
    /// Runs this process triggers are mostly claimed by its own workers: they get the payload
    /// without a read back (entries of runs other processes claim are dropped when full).
    fn hands_over(&self) -> bool {
        true
    }
    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        self.failpoint(
            AFTER_TERMINAL_WRITE_BEFORE_ACK,
            format_args!("before {} runs are acked", runs.len()),
        );
        let done = self.redis.finish_many(runs, now).await;
        if let (Some(wake), Ok((_, fx))) = (&self.wake, &done) {
            wake.note(fx);
        }
        done
    }
}
