//! A [`QueueBackend`] that forwards every method to another one, with hooks around each call:
//! the queue backends' counterpart of [`Forward`](super::Forward).
//!
//! Tests use it to hold or watch a real queue (a lease check that does not answer, as a queue
//! backend reconnecting may hold calls; a tick whose lapses the test waits for) without writing
//! out the whole trait: a hook implements only the [`QueueHook`] methods it needs. A method
//! added to [`QueueBackend`] is forwarded here once (its default too, so the wrapped backend's
//! own answer is kept; `finish_then_claim` keeps the trait's default, `finish` then `claim`
//! through their hooks, and `end_fenced` its default `None`, so that the engine takes the lease
//! check, the ack and the claim one by one: a hook sees, holds or refuses each step of a run's
//! end and of a slot's turn as separate calls), and every wrapper built on [`ForwardQueue`]
//! gets it.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    LaneInfo, LeaseState, Leased, LiveRun, OfferSteps, ParkedOffer, QueueBackend, QueueInfo, Tick,
};
use crate::chain::ClaimChain;
use crate::error::QueueError;
use crate::id::{FencingToken, RunId};
use crate::lane::LaneName;
use crate::name::{EnvName, QueueName};
use crate::settings::{EnvSettings, QueueSettings};
use crate::time::Timestamp;

/// Which [`QueueBackend`] method a [`ForwardQueue`] is calling, with the arguments a hook may
/// want to look at.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum QueueOp<'a> {
    /// [`QueueBackend::put_env`].
    PutEnv(&'a EnvName),
    /// [`QueueBackend::put_queue`].
    PutQueue(&'a EnvName, &'a QueueName),
    /// [`QueueBackend::queue_settings`].
    QueueSettings(&'a EnvName, &'a QueueName),
    /// [`QueueBackend::add_lane`].
    AddLane(&'a LaneName),
    /// [`QueueBackend::has_lane`].
    HasLane(&'a LaneName),
    /// [`QueueBackend::lanes`].
    Lanes,
    /// [`QueueBackend::queues`].
    Queues(&'a EnvName),
    /// [`QueueBackend::env_usage`].
    EnvUsage(&'a EnvName),
    /// [`QueueBackend::enqueue`] or [`QueueBackend::enqueue_claiming`] of a run.
    Enqueue(RunId),
    /// [`QueueBackend::claim`] at `now`.
    Claim(Timestamp),
    /// [`QueueBackend::heartbeat`] of these leases.
    Heartbeat(&'a [(RunId, FencingToken)]),
    /// [`QueueBackend::check_lease`] or [`QueueBackend::check_leases`] of these leases.
    CheckLeases(&'a [(RunId, FencingToken)]),
    /// [`QueueBackend::finish`] or [`QueueBackend::finish_many`] of these leases.
    Finish(&'a [(RunId, FencingToken)]),
    /// [`QueueBackend::retry`].
    Retry(RunId),
    /// [`QueueBackend::release`].
    Release(RunId),
    /// [`QueueBackend::cancel`] or [`QueueBackend::cancel_of`].
    Cancel(RunId),
    /// [`QueueBackend::reschedule`] or [`QueueBackend::reschedule_of`].
    Reschedule(RunId),
    /// [`QueueBackend::tick`] at `now`.
    Tick(Timestamp),
    /// [`QueueBackend::next_deadline`].
    NextDeadline,
    /// [`QueueBackend::live`], [`QueueBackend::live_of`] or [`QueueBackend::live_indexed`].
    Live(RunId),
    /// [`QueueBackend::snapshot`].
    Snapshot,
    /// [`QueueBackend::register_consumer`].
    RegisterConsumer(&'a ClaimChain),
    /// [`QueueBackend::unregister_consumer`].
    UnregisterConsumer(ConsumerId),
}

/// What a [`ForwardQueue`] does around the calls it forwards. Every method has a no-op default.
#[async_trait]
pub trait QueueHook: Send + Sync + 'static {
    /// Called before a method is forwarded; it may wait (hold the call, as a backend that
    /// keeps calls while it reconnects does).
    async fn before(&self, op: QueueOp<'_>) {
        let _ = op;
    }
    /// Called after [`QueueHook::before`]: an error here is the call's answer and the call is
    /// not forwarded (a backend that fails a call, as an unreachable server does).
    fn refuse(&self, op: QueueOp<'_>) -> Option<QueueError> {
        let _ = op;
        None
    }
    /// Called after a method was forwarded, before its answer is returned; it may wait. It does
    /// not see the answer.
    async fn after(&self, op: QueueOp<'_>) {
        let _ = op;
    }
    /// The answer to [`QueueBackend::claims_in_process`], given the inner queue's (a test may
    /// make an in-memory queue look shared, as Redis is).
    fn claims_in_process(&self, inner: bool) -> bool {
        inner
    }
    /// The answer to [`QueueBackend::hands_over`], given the inner queue's.
    fn hands_over(&self, inner: bool) -> bool {
        inner
    }
}

/// Forwards nothing extra: `ForwardQueue<()>` is the inner queue, unchanged.
impl QueueHook for () {}

/// A [`QueueBackend`] that forwards every method to `inner`, calling `hook` around each.
pub struct ForwardQueue<H> {
    inner: Arc<dyn QueueBackend>,
    hook: H,
}

impl<H: QueueHook> ForwardQueue<H> {
    /// Wraps `inner` with `hook`.
    pub fn new(inner: Arc<dyn QueueBackend>, hook: H) -> Self {
        ForwardQueue { inner, hook }
    }

    /// The hook (to read what it recorded, or to change what it does).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The queue calls are forwarded to.
    pub fn inner(&self) -> &Arc<dyn QueueBackend> {
        &self.inner
    }

    /// Runs `call` on the inner queue between the `before` and `after` hooks, unless the hook
    /// refuses it.
    async fn around<T>(
        &self,
        op: QueueOp<'_>,
        call: impl std::future::Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        self.hook.before(op).await;
        if let Some(e) = self.hook.refuse(op) {
            return Err(e);
        }
        let answer = call.await;
        self.hook.after(op).await;
        answer
    }
}

#[async_trait]
impl<H: QueueHook> QueueBackend for ForwardQueue<H> {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.put_env(env, settings, now);
        self.around(QueueOp::PutEnv(env), call).await
    }
    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.put_queue(env, queue, settings, now);
        self.around(QueueOp::PutQueue(env, queue), call).await
    }
    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        let call = self.inner.queue_settings(env, queue);
        self.around(QueueOp::QueueSettings(env, queue), call).await
    }
    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        self.around(QueueOp::AddLane(lane), self.inner.add_lane(lane))
            .await
    }
    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        self.around(QueueOp::HasLane(lane), self.inner.has_lane(lane))
            .await
    }
    async fn lanes(&self, now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        self.around(QueueOp::Lanes, self.inner.lanes(now)).await
    }
    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        self.around(QueueOp::Queues(env), self.inner.queues(env))
            .await
    }
    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        self.around(QueueOp::EnvUsage(env), self.inner.env_usage(env))
            .await
    }
    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        let op = QueueOp::Enqueue(dispatch.run_id);
        self.around(op, self.inner.enqueue(dispatch, why, now))
            .await
    }
    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        self.around(QueueOp::Claim(now), self.inner.claim(request, now))
            .await
    }
    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        let call = self.inner.heartbeat(leases, now);
        self.around(QueueOp::Heartbeat(leases), call).await
    }
    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        let leases = [(run, token)];
        let call = self.inner.check_lease(run, token);
        self.around(QueueOp::CheckLeases(&leases), call).await
    }
    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let leases = [(run, token)];
        let call = self.inner.finish(run, token, now);
        self.around(QueueOp::Finish(&leases), call).await
    }
    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.retry(run, token, run_after, now);
        self.around(QueueOp::Retry(run), call).await
    }
    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.release(run, token, now);
        self.around(QueueOp::Release(run), call).await
    }
    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let call = self.inner.cancel(run, grace, now);
        self.around(QueueOp::Cancel(run), call).await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.reschedule(run, run_after, ttl_deadline, now);
        self.around(QueueOp::Reschedule(run), call).await
    }
    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        self.around(QueueOp::Tick(now), self.inner.tick(now)).await
    }
    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        self.around(QueueOp::NextDeadline, self.inner.next_deadline())
            .await
    }
    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.around(QueueOp::Live(run), self.inner.live(run)).await
    }
    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        self.around(QueueOp::Snapshot, self.inner.snapshot()).await
    }
    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        let call = self.inner.register_consumer(chain, now);
        self.around(QueueOp::RegisterConsumer(chain), call).await
    }
    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self.inner.unregister_consumer(id, now);
        self.around(QueueOp::UnregisterConsumer(id), call).await
    }
    async fn enqueue_claiming(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        claim: &ClaimRequest,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let op = QueueOp::Enqueue(dispatch.run_id);
        let call = self.inner.enqueue_claiming(dispatch, why, now, claim);
        self.around(op, call).await
    }
    fn claims_on_enqueue(&self) -> bool {
        self.inner.claims_on_enqueue()
    }
    fn claims_on_enqueue_now(&self) -> bool {
        self.inner.claims_on_enqueue_now()
    }
    fn hears_deliveries(&self) -> bool {
        self.inner.hears_deliveries()
    }
    async fn enqueue_handing(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
        carried: Option<(&ClaimRequest, Option<ParkedOffer>)>,
        handed: Option<&[u8]>,
    ) -> Result<(Enqueued, Vec<Leased>), QueueError> {
        let op = QueueOp::Enqueue(dispatch.run_id);
        let call = self
            .inner
            .enqueue_handing(dispatch, why, now, carried, handed);
        self.around(op, call).await
    }
    fn parks_offers(&self) -> bool {
        self.inner.parks_offers()
    }
    async fn claim_parking(
        &self,
        request: &ClaimRequest,
        steps: &OfferSteps,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        let call = self.inner.claim_parking(request, steps, now);
        self.around(QueueOp::Claim(now), call).await
    }
    fn combines_enqueues(&self) -> bool {
        self.inner.combines_enqueues()
    }
    fn claims_in_process(&self) -> bool {
        self.hook.claims_in_process(self.inner.claims_in_process())
    }
    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let call = self.inner.check_leases(leases);
        self.around(QueueOp::CheckLeases(leases), call).await
    }
    fn hands_over(&self) -> bool {
        self.hook.hands_over(self.inner.hands_over())
    }
    async fn live_of(&self, dispatch: &Dispatch) -> Result<Option<LiveRun>, QueueError> {
        let call = self.inner.live_of(dispatch);
        self.around(QueueOp::Live(dispatch.run_id), call).await
    }
    async fn live_indexed(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        self.around(QueueOp::Live(run), self.inner.live_indexed(run))
            .await
    }
    async fn cancel_of(
        &self,
        dispatch: &Dispatch,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let call = self.inner.cancel_of(dispatch, grace, now);
        self.around(QueueOp::Cancel(dispatch.run_id), call).await
    }
    async fn reschedule_of(
        &self,
        dispatch: &Dispatch,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let call = self
            .inner
            .reschedule_of(dispatch, run_after, ttl_deadline, now);
        self.around(QueueOp::Reschedule(dispatch.run_id), call)
            .await
    }
    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        let call = self.inner.finish_many(runs, now);
        self.around(QueueOp::Finish(runs), call).await
    }
}
