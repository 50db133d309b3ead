//! Trigger requests, the builder users chain, and the answers; and the trigger path itself:
//! validate, resolve the task's defaults, store first, enqueue second.
//!
//! A refused trigger changes nothing: validation happens before any write, and a run whose
//! enqueue the queue backend refuses (`QueueFull`, `FastLaneFull`) is removed from the store
//! again before the error is returned.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{
    Dispatch, EnqueueAs, Enqueued, IdempotencyClaim, Inserted, Placement, RunRecord,
};
use runlane_core::{
    assign_lane, EnvName, InvalidInput, LaneName, QueueError, QueueName, RetryPolicy, RunId,
    RunStatus, TaskDef, TaskName, Timestamp, TriggerSource,
};

use crate::config::EngineConfig;
use crate::engine::{Engine, Inner};
use crate::error::EngineError;
use crate::handover::Handed;
use crate::offer::Offer;
use crate::worker::renew_late;

/// The longest accepted idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 256;

/// A validated trigger request. Unset fields take the task's (or env's) defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerRequest {
    /// The env (default `default`).
    pub env: EnvName,
    /// The task.
    pub task: TaskName,
    /// JSON text (default `null`).
    pub payload: Arc<str>,
    /// Overrides the task's queue.
    pub queue: Option<QueueName>,
    /// Concurrency key (empty when unset).
    pub key: Option<String>,
    /// An explicit lane (must exist).
    pub lane: Option<LaneName>,
    /// Makes the run look this much older (0..=30 days).
    pub priority: Duration,
    /// Run no earlier than `now + delay`.
    pub delay: Option<Duration>,
    /// Run no earlier than this instant (wins over `delay`).
    pub run_after: Option<Timestamp>,
    /// Overrides the task's TTL (> 0).
    pub ttl: Option<Duration>,
    /// Deduplicates triggers with the same `(env, task, key)`.
    pub idempotency_key: Option<String>,
    /// Overrides the idempotency key's lifetime.
    pub idempotency_ttl: Option<Duration>,
    /// Overrides the task's retry policy.
    pub retry: Option<RetryPolicy>,
    /// Overrides the task's max duration.
    pub max_duration: Option<Duration>,
    /// Lock the run to this version (must exist and define the task).
    pub lock_to_version: Option<u32>,
    /// What made the run (default `standard`; trigger-and-wait sets `sync`).
    pub source: TriggerSource,
}

impl TriggerRequest {
    /// A request for `task` in env `default` with every default.
    pub fn new(task: &str) -> Result<Self, InvalidInput> {
        Ok(TriggerRequest {
            env: EnvName::new("default")?,
            task: TaskName::new(task)?,
            payload: Arc::from("null"),
            queue: None,
            key: None,
            lane: None,
            priority: Duration::ZERO,
            delay: None,
            run_after: None,
            ttl: None,
            idempotency_key: None,
            idempotency_ttl: None,
            retry: None,
            max_duration: None,
            lock_to_version: None,
            source: TriggerSource::Standard,
        })
    }

    /// Checks every field that needs no lookup; errors name the field.
    pub fn validate(&self, config: &EngineConfig) -> Result<(), InvalidInput> {
        if self.payload.len() > config.payload_max_bytes {
            return Err(InvalidInput::new(
                "payload",
                format!(
                    "must be at most {} bytes, got {}",
                    config.payload_max_bytes,
                    self.payload.len()
                ),
            ));
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&self.payload) {
            return Err(InvalidInput::new(
                "payload",
                format!("must be valid JSON: {e}"),
            ));
        }
        if let Some(ttl) = self.ttl {
            runlane_core::ttl::check_ttl(ttl)?;
        }
        runlane_core::score::check_priority(self.priority)?;
        if let Some(key) = &self.key {
            runlane_core::name::check_concurrency_key(key)?;
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX_LEN {
                return Err(InvalidInput::new(
                    "idempotency_key",
                    format!("must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} bytes"),
                ));
            }
            runlane_core::name::check_no_nul("idempotency_key", key)?;
        }
        if self.idempotency_ttl.is_some_and(|d| d.is_zero()) {
            return Err(InvalidInput::new(
                "idempotency_ttl",
                "must be greater than zero",
            ));
        }
        if let Some(retry) = &self.retry {
            retry.validate()?;
        }
        if self.max_duration.is_some_and(|d| d.is_zero()) {
            return Err(InvalidInput::new(
                "max_duration",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Chains trigger options; the first invalid value is reported by `send`/`wait`/`request`.
pub struct TriggerBuilder {
    engine: Engine,
    request: Result<TriggerRequest, InvalidInput>,
}

impl TriggerBuilder {
    /// Starts a trigger of `task` on `engine`.
    pub fn new(engine: Engine, task: &str) -> Self {
        TriggerBuilder {
            engine,
            request: TriggerRequest::new(task),
        }
    }

    /// Applies `f` unless an earlier option was already invalid.
    fn with(mut self, f: impl FnOnce(&mut TriggerRequest) -> Result<(), InvalidInput>) -> Self {
        if let Ok(request) = &mut self.request {
            if let Err(e) = f(request) {
                self.request = Err(e);
            }
        }
        self
    }

    /// The env.
    pub fn env(self, env: &str) -> Self {
        self.with(|r| {
            r.env = EnvName::new(env)?;
            Ok(())
        })
    }

    /// The payload, serialized to JSON.
    pub fn payload<T: serde::Serialize>(self, payload: &T) -> Self {
        let text = serde_json::to_string(payload)
            .map_err(|e| InvalidInput::new("payload", format!("cannot be serialized: {e}")));
        self.with(|r| {
            r.payload = Arc::from(text?);
            Ok(())
        })
    }

    /// The queue.
    pub fn queue(self, queue: &str) -> Self {
        self.with(|r| {
            r.queue = Some(QueueName::new(queue)?);
            Ok(())
        })
    }

    /// The concurrency key.
    pub fn key(self, key: &str) -> Self {
        self.with(|r| {
            runlane_core::name::check_concurrency_key(key)?;
            r.key = Some(key.to_owned());
            Ok(())
        })
    }

    /// An explicit lane.
    pub fn lane(self, lane: &str) -> Self {
        self.with(|r| {
            r.lane = Some(LaneName::new(lane)?);
            Ok(())
        })
    }

    /// The priority.
    pub fn priority(self, priority: Duration) -> Self {
        self.with(|r| {
            r.priority = priority;
            Ok(())
        })
    }

    /// A delay from now.
    pub fn delay(self, delay: Duration) -> Self {
        self.with(|r| {
            r.delay = Some(delay);
            Ok(())
        })
    }

    /// An absolute `run_after`.
    pub fn run_after(self, at: Timestamp) -> Self {
        self.with(|r| {
            r.run_after = Some(at);
            Ok(())
        })
    }

    /// The TTL.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|r| {
            r.ttl = Some(ttl);
            Ok(())
        })
    }

    /// The idempotency key.
    pub fn idempotency_key(self, key: &str) -> Self {
        self.with(|r| {
            r.idempotency_key = Some(key.to_owned());
            Ok(())
        })
    }

    /// The idempotency key's lifetime.
    pub fn idempotency_ttl(self, ttl: Duration) -> Self {
        self.with(|r| {
            r.idempotency_ttl = Some(ttl);
            Ok(())
        })
    }

    /// The retry policy.
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.with(|r| {
            r.retry = Some(policy);
            Ok(())
        })
    }

    /// The max duration per attempt.
    pub fn max_duration(self, d: Duration) -> Self {
        self.with(|r| {
            r.max_duration = Some(d);
            Ok(())
        })
    }

    /// Lock to a version.
    pub fn lock_to_version(self, version: u32) -> Self {
        self.with(|r| {
            r.lock_to_version = Some(version);
            Ok(())
        })
    }

    /// The trigger source.
    pub fn source(self, source: TriggerSource) -> Self {
        self.with(|r| {
            r.source = source;
            Ok(())
        })
    }

    /// The validated request, without sending it.
    pub fn request(self) -> Result<TriggerRequest, EngineError> {
        let request = self.request?;
        request.validate(&self.engine.inner.config)?;
        Ok(request)
    }

    /// Triggers the run.
    // Not an `async fn`: one would hold the builder twice (see `Engine::trigger_request`).
    pub fn send(self) -> impl Future<Output = Result<Triggered, EngineError>> + Send {
        let TriggerBuilder { engine, request } = self;
        // `trigger_request` validates the request (once: `request()` would check it twice).
        async move { engine.trigger_request(request?).await }
    }

    /// Triggers with source `sync` (lane `fast_lane` unless a lane is given) and waits up to
    /// `timeout` for a terminal state.
    pub async fn wait(self, timeout: Duration) -> Result<WaitOutcome, EngineError> {
        let engine = self.engine.clone();
        let request = self.source(TriggerSource::Sync).request?;
        let triggered = engine.trigger_request(request).await?;
        engine.wait(triggered.run.id, timeout).await
    }
}

/// A triggered run.
#[derive(Clone, Debug, PartialEq)]
pub struct Triggered {
    /// The run (an existing one on an idempotency hit).
    pub run: RunRecord,
    /// Whether an idempotency key returned an existing run.
    pub idempotent_hit: bool,
}

/// The answer of a wait.
// The record is the answer callers want; boxing it would change the public contract.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum WaitOutcome {
    /// Terminal: the run with its status and output or error.
    Finished(RunRecord),
    /// Timed out waiting; the run goes on.
    Pending {
        /// The run.
        run_id: RunId,
        /// Its status when the wait ended.
        status: RunStatus,
    },
}

/// How many stripes the idempotency keys of one process share.
const KEY_STRIPES: usize = 64;

/// Locks that keep the triggers of one idempotency key (scope env, task, key) one at a time in
/// this process, from the store write to the enqueue's answer; keys share a fixed set of
/// stripes, so two keys may wait on each other, never on more.
pub(crate) struct KeyStripes {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl Default for KeyStripes {
    fn default() -> Self {
        KeyStripes {
            stripes: (0..KEY_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }
}

impl KeyStripes {
    /// The stripe of `record`'s `(env, task, key)`.
    fn stripe(record: &RunRecord, key: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (record.env.as_str(), record.task.as_str(), key).hash(&mut hasher);
        usize::try_from(hasher.finish() % KEY_STRIPES as u64).unwrap_or(0)
    }

    /// Takes the stripe of `record`'s `(env, task, key)`.
    async fn lock(&self, record: &RunRecord, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.stripes[Self::stripe(record, key)].lock().await
    }

    /// Takes the stripes of every keyed run of a batch, in stripe order (so two batches never
    /// wait on each other in a cycle; a single trigger holds one stripe only).
    async fn lock_all(&self, prepared: &[Prepared]) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = prepared
            .iter()
            .filter_map(|p| p.claim.as_ref().map(|c| Self::stripe(&p.record, &c.key)))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            held.push(self.stripes[stripe].lock().await);
        }
        held
    }
}

/// A run ready to be stored: its record and idempotency claim.
pub(crate) struct Prepared {
    pub(crate) record: RunRecord,
    claim: Option<IdempotencyClaim>,
}

impl Prepared {
    fn sync(&self) -> bool {
        self.record.source == TriggerSource::Sync
    }
}

impl Engine {
    /// Validates a request and resolves everything its run needs, without writing anything.
    pub(crate) async fn prepare(
        &self,
        request: &TriggerRequest,
        now: Timestamp,
        retry_of: Option<RunId>,
    ) -> Result<Prepared, EngineError> {
        let inner = &self.inner;
        request.validate(&inner.config)?;
        let env = &request.env;
        let settings = inner.env_settings(env).await?;
        if let Some(lane) = &request.lane {
            if !inner.queue.has_lane(lane).await? {
                return Err(
                    InvalidInput::new("lane", format!("lane {lane} does not exist")).into(),
                );
            }
        }
        let task = &request.task;
        let unknown_version = |version| EngineError::UnknownVersion {
            version,
            task: task.to_string(),
        };
        let (version, locked, def) = match request.lock_to_version {
            Some(v) => {
                let def = inner
                    .meta
                    .version(inner.store.as_ref(), env, v)
                    .await?
                    .and_then(|d| d.task(task).cloned())
                    .ok_or_else(|| unknown_version(v))?;
                (v, true, def)
            }
            None => {
                let (current, defs) = inner.meta.current(inner.store.as_ref(), env).await?;
                let def = match defs.task(task) {
                    Some(def) => def.clone(),
                    None if settings.strict_tasks => {
                        return Err(EngineError::UnknownTask {
                            env: env.to_string(),
                            task: task.to_string(),
                        })
                    }
                    None => TaskDef::new(task.clone()),
                };
                (current, false, def)
            }
        };
        let queue = request.queue.clone().unwrap_or_else(|| def.queue_name());
        let lane = assign_lane(request.lane.as_ref(), request.source, def.lane.as_ref());
        let ttl = request.ttl.or(def.ttl);
        let run_after = request
            .run_after
            .or_else(|| request.delay.map(|d| now.saturating_add(d)))
            .unwrap_or(now);
        let status = if run_after > now {
            RunStatus::Delayed
        } else {
            RunStatus::Queued
        };
        let record = RunRecord {
            id: inner.next_run_id(now),
            env: env.clone(),
            task: task.clone(),
            version,
            locked,
            payload: request.payload.clone(),
            queue,
            key: Arc::from(request.key.as_deref().unwrap_or("")),
            lane,
            priority: request.priority,
            run_after,
            ttl,
            ttl_deadline: runlane_core::ttl::deadline(now, run_after, ttl),
            idempotency_key: request.idempotency_key.clone(),
            retry: request.retry.unwrap_or(def.retry),
            max_duration: request.max_duration.or(def.max_duration),
            attempt: 1,
            status,
            output: None,
            error: None,
            attempts: Vec::new(),
            created_at: now,
            finished_at: None,
            started_at: None,
            cancel_requested_at: None,
            source: request.source,
            retry_of,
        };
        let claim = request
            .idempotency_key
            .as_ref()
            .map(|key| IdempotencyClaim {
                key: key.clone(),
                expires_at: now.saturating_add(
                    request
                        .idempotency_ttl
                        .unwrap_or(inner.config.idempotency_ttl)
                        // SPEC §7: a key never outlives the retention of the runs it names.
                        .min(inner.config.retention.longest().unwrap_or(Duration::MAX)),
                ),
            });
        Ok(Prepared { record, claim })
    }

    /// Stores a prepared run, then enqueues it. With a store that commits in a writer, in a
    /// task of its own (see [`Engine::detached`]).
    pub(crate) async fn commit(
        &self,
        prepared: Prepared,
        now: Timestamp,
    ) -> Result<Triggered, EngineError> {
        if !self.inner.store.group_commits() {
            return self.store_and_enqueue(prepared, now).await;
        }
        let engine = self.clone();
        Self::detached(Box::pin(async move {
            engine.store_and_enqueue(prepared, now).await
        }))
        .await
    }

    /// Runs a trigger's store-and-enqueue in a task of its own and waits for it. A store that
    /// commits in a writer keeps a write whose caller went away (a dropped HTTP request, a
    /// timeout around the trigger): the enqueue must go on too, or the stored run would wait
    /// for the next open (one process has no reconciler). A store that writes at once needs no
    /// task: nothing is left half done between its insert and the enqueue.
    ///
    /// The work comes boxed: the task's cell holds a pointer, not the future (kilobytes; tokio
    /// moves the future into the cell at the spawn and writes its stage over when the task
    /// ends), and the caller's future holds no copy of it either (it would be copied again
    /// at each level of the caller's awaits).
    pub(crate) async fn detached<T: Send + 'static>(
        work: Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'static>>,
    ) -> Result<T, EngineError> {
        tokio::spawn(work).await.unwrap_or_else(|e| {
            Err(EngineError::Unavailable(format!(
                "trigger task failed: {e}"
            )))
        })
    }

    /// Stores a prepared run, then enqueues it (in the caller's task).
    ///
    /// A trigger with an idempotency key holds its key's stripe throughout: a refused enqueue
    /// removes the stored run again, so a second trigger with the same key must not find that
    /// run (an idempotency hit on a run about to be removed) but wait for the first to end, then
    /// find its run placed, or store its own. (Triggers in other processes of a distributed
    /// deployment are not held by it.)
    // Not an `async fn`, nor the one below: one moves its arguments into its body, so its
    // future holds the prepared run twice, and every caller's await copies the whole future
    // (kilobytes per trigger). Their blocks use what they capture in place.
    #[allow(clippy::manual_async_fn)] // See the comment above.
    pub(crate) fn store_and_enqueue(
        &self,
        prepared: Prepared,
        now: Timestamp,
    ) -> impl Future<Output = Result<Triggered, EngineError>> + Send + '_ {
        async move {
            let inner = &self.inner;
            let _stripe = match &prepared.claim {
                Some(claim) => Some(inner.key_stripes.lock(&prepared.record, &claim.key).await),
                None => None,
            };
            let inserted = inner
                .store
                .insert(vec![(prepared.record.clone(), prepared.claim.clone())], now)
                .await?;
            if let Some(Inserted::Existing(existing)) = inserted.into_iter().next() {
                inner.counters.idempotent_hit();
                return Ok(Triggered {
                    run: inner.overlay(*existing).await?,
                    idempotent_hit: true,
                });
            }
            self.enqueue_stored(prepared, now, true).await
        }
    }

    /// Enqueues a stored run; a refused enqueue removes it from the store again.
    #[allow(clippy::manual_async_fn)] // See `store_and_enqueue`.
    fn enqueue_stored(
        &self,
        mut prepared: Prepared,
        now: Timestamp,
        may_offer: bool,
    ) -> impl Future<Output = Result<Triggered, EngineError>> + Send + '_ {
        async move {
            let inner = &self.inner;
            // New work: the queue key's `max_queued` applies.
            let why = EnqueueAs::trigger(prepared.sync());
            let record = &prepared.record;
            let handed = Handed {
                task: record.task.clone(),
                payload: record.payload.clone(),
                retry: record.retry,
            };
            // Parked offers lease in this enqueue only while this process is not busy
            // enqueuing (under load, workers' own claims take more runs per call); what a
            // worker needs goes with such a lease.
            let sent = if inner.queue.parks_offers() && inner.queue.claims_on_enqueue_now() {
                Some(handed.encode().unwrap_or_default())
            } else {
                None
            };
            // Kept before the enqueue: a worker of this process may claim the run at once.
            inner.handover.keep(record.id, handed);
            let dispatch = record.dispatch();
            let offer = if may_offer {
                self.offer_for(&dispatch, now)
            } else {
                None
            };
            let answer = match offer {
                // In a task of its own: the leases its call makes reach the workloop even if
                // this trigger goes away mid-call (a dropped HTTP request, a timeout).
                Some(offer) => {
                    let inner = inner.clone();
                    tokio::spawn(enqueue_for_offer(inner, dispatch, why, offer, sent))
                        .await
                        .unwrap_or_else(|e| {
                            Err(QueueError::Unavailable(format!("enqueue task failed: {e}")))
                        })
                }
                None => match enqueue_sending(inner, dispatch, why, now, sent).await {
                    Ok(enqueued) => Ok(settle(
                        inner,
                        &record.lane,
                        record.attempt,
                        enqueued,
                        record.id,
                        &record.env,
                        false,
                    )
                    .await),
                    Err(e) => Err(e),
                },
            };
            match answer {
                Ok((placement, status)) => {
                    prepared.record.status = status;
                    inner.counters.triggered(placement == Placement::Ready);
                    Ok(Triggered {
                        run: prepared.record,
                        idempotent_hit: false,
                    })
                }
                Err(e) => {
                    inner.handover.forget(prepared.record.id);
                    // Boxed: a refusal is rare, and its future would grow every trigger's.
                    Box::pin(withdraw(inner, &prepared.record, now)).await;
                    Err(e.into())
                }
            }
        }
    }

    /// An idle workloop of this process that would claim the run at once (see
    /// [`crate::offer`]): only for a run due now, when the queue would claim in this enqueue.
    fn offer_for(&self, dispatch: &Dispatch, now: Timestamp) -> Option<Offer> {
        if !self.may_claim_on_the_way(dispatch.run_after, now) {
            return None;
        }
        self.inner
            .offers
            .take(&dispatch.env, &dispatch.lane, dispatch.locked_version)
    }

    /// The batch path: validate and resolve all, one store insert, then enqueue each.
    pub(crate) async fn batch(
        &self,
        requests: Vec<TriggerRequest>,
    ) -> Result<Vec<Triggered>, EngineError> {
        let inner = &self.inner;
        if requests.len() > inner.config.batch_max {
            return Err(InvalidInput::new(
                "batch",
                format!(
                    "must hold at most {} items, got {}",
                    inner.config.batch_max,
                    requests.len()
                ),
            )
            .into());
        }
        let now = self.now();
        let mut prepared = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            let p = self
                .prepare(request, now, None)
                .await
                .map_err(|e| EngineError::BatchItem {
                    index,
                    source: Box::new(e),
                })?;
            prepared.push(p);
        }
        if !inner.store.group_commits() {
            return self.store_batch(prepared, now).await;
        }
        let engine = self.clone();
        Self::detached(Box::pin(
            async move { engine.store_batch(prepared, now).await },
        ))
        .await
    }

    /// One store insert for a prepared batch, then its runs enqueued (all or nothing).
    ///
    /// On a queue backend that combines concurrent enqueues (Redis: one script call instead of
    /// a round trip per run) the enqueues are made together, in batch order, except around a
    /// run an idle workloop of this process may claim on the way: the runs before it are
    /// placed first, then it alone, so batch order is placement order. Otherwise one after
    /// another.
    async fn store_batch(
        &self,
        prepared: Vec<Prepared>,
        now: Timestamp,
    ) -> Result<Vec<Triggered>, EngineError> {
        let inner = &self.inner;
        // Held to the last enqueue's answer (or the rollback's end), as a single trigger holds
        // its key's stripe: a trigger with one of these keys waits, instead of being handed a
        // run the rollback then removes.
        let _stripes = inner.key_stripes.lock_all(&prepared).await;
        let rows = prepared
            .iter()
            .map(|p| (p.record.clone(), p.claim.clone()))
            .collect();
        let inserted = inner.store.insert(rows, now).await?;
        let mut placed = Placed {
            out: (0..prepared.len()).map(|_| None).collect(),
            failed: None,
        };
        // Idempotency hits are answered first: a hit that cannot be read leaves nothing
        // enqueued, and the batch's new runs are taken back from the store.
        let mut new_runs = Vec::with_capacity(prepared.len());
        let mut hits = Vec::new();
        for (index, (p, inserted)) in prepared.into_iter().zip(inserted).enumerate() {
            match inserted {
                Inserted::New => new_runs.push((index, p)),
                Inserted::Existing(existing) => hits.push((index, existing)),
            }
        }
        for (index, existing) in hits {
            inner.counters.idempotent_hit();
            match inner.overlay(*existing).await {
                Ok(run) => {
                    placed.out[index] = Some(Triggered {
                        run,
                        idempotent_hit: true,
                    })
                }
                Err(e) => {
                    for (_, p) in new_runs {
                        withdraw(inner, &p.record, now).await;
                    }
                    return Err(e);
                }
            }
        }
        let combines = inner.queue.combines_enqueues();
        let mut together = Vec::new();
        // Stored after the failure, never enqueued: taken back from the store only.
        let mut unsent: Vec<Prepared> = Vec::new();
        for (index, p) in new_runs {
            let alone = !combines || self.may_claim_on_the_way(p.record.run_after, now);
            if alone {
                placed.settle(std::mem::take(&mut together)).await;
            }
            if placed.failed.is_some() {
                unsent.push(p);
                continue;
            }
            // A run made together with others takes no offer: its claim would run in a task
            // of its own, after the others joined the combined call (out of batch order).
            together.push((index, self.enqueue_stored(p, now, alone)));
            if alone {
                placed.settle(std::mem::take(&mut together)).await;
            }
        }
        placed.settle(together).await;
        let Placed { out, failed } = placed;
        let out: Vec<Triggered> = out.into_iter().flatten().collect();
        if let Some((index, e)) = failed {
            // All or nothing: a refused run already took itself back; the runs enqueued (before
            // or beside it) and those never sent are taken back too.
            for p in unsent {
                withdraw(inner, &p.record, now).await;
            }
            self.take_back(&out).await;
            return Err(EngineError::BatchItem {
                index,
                source: Box::new(e),
            });
        }
        Ok(out)
    }

    /// Whether an idle workloop of this process may claim a run due at `run_after` in its
    /// enqueue (a look without taking an offer; [`Engine::offer_for`] then takes one that
    /// covers the run's env and lane).
    fn may_claim_on_the_way(&self, run_after: Timestamp, now: Timestamp) -> bool {
        let inner = &self.inner;
        inner.offers.len() > 0 && run_after <= now && inner.queue.claims_on_enqueue_now()
    }

    /// Best-effort rollback of runs a failed batch already enqueued: a waiting run is removed
    /// from the queue and the store; one a worker already claimed is cancelled instead.
    async fn take_back(&self, triggered: &[Triggered]) {
        let inner = &self.inner;
        for t in triggered.iter().filter(|t| !t.idempotent_hit) {
            let run = t.run.id;
            match inner
                .queue
                .cancel_of(&t.run.dispatch(), inner.config.cancel_grace, self.now())
                .await
            {
                Ok(runlane_core::backend::CancelOutcome::Removed { effects, .. }) => {
                    inner.handover.forget(run);
                    inner.apply(effects, Some(run)).await;
                    withdraw(inner, &t.run, self.now()).await;
                }
                Ok(runlane_core::backend::CancelOutcome::Requested { token, .. }) => {
                    tracing::warn!(%run, "batch rollback: run already executing, cancelled");
                    inner
                        .local
                        .signal(run, token, runlane_core::CancelReason::Cancel, None);
                }
                Ok(runlane_core::backend::CancelOutcome::NotFound) => inner.handover.forget(run),
                Err(e) => tracing::warn!(%run, error = %e, "batch rollback: cancel failed"),
            }
        }
    }

    /// A manual retry: a new run from a finished one.
    pub(crate) async fn manual_retry(&self, run: RunId) -> Result<Triggered, EngineError> {
        let inner = &self.inner;
        let old = inner
            .store
            .get(run)
            .await?
            .ok_or(EngineError::RunNotFound(run))?;
        if !old.status.is_terminal() {
            let old = inner.overlay(old).await?;
            return Err(EngineError::WrongState {
                run,
                status: old.status,
                operation: "retry",
            });
        }
        let request = TriggerRequest {
            env: old.env.clone(),
            task: old.task.clone(),
            payload: old.payload.clone(),
            queue: Some(old.queue.clone()),
            key: (!old.key.is_empty()).then(|| old.key.to_string()),
            lane: None,
            priority: old.priority,
            delay: None,
            run_after: None,
            ttl: None,
            idempotency_key: None,
            idempotency_ttl: None,
            retry: Some(old.retry),
            max_duration: old.max_duration,
            lock_to_version: old.locked.then_some(old.version),
            source: TriggerSource::Manual,
        };
        let now = self.now();
        let prepared = self.prepare(&request, now, Some(run)).await?;
        self.commit(prepared, now).await
    }
}

/// A batch's enqueue outcomes, by batch index, and its first refusal.
struct Placed {
    out: Vec<Option<Triggered>>,
    failed: Option<(usize, EngineError)>,
}

impl Placed {
    /// Awaits enqueues made together (polled first in the order given, so a backend that
    /// combines them sees them in batch order) and records their outcomes.
    async fn settle<F>(&mut self, together: Vec<(usize, F)>)
    where
        F: std::future::Future<Output = Result<Triggered, EngineError>>,
    {
        let (indexes, calls): (Vec<usize>, Vec<F>) = together.into_iter().unzip();
        let answers = match <[F; 1]>::try_from(calls) {
            // One run (a backend that does not combine enqueues, or a run placed alone).
            Ok([call]) => vec![call.await],
            Err(calls) if calls.is_empty() => return,
            Err(calls) => futures_util::future::join_all(calls).await,
        };
        for (index, answer) in indexes.into_iter().zip(answers) {
            match answer {
                Ok(t) => self.out[index] = Some(t),
                Err(e) => {
                    if self.failed.is_none() {
                        self.failed = Some((index, e));
                    }
                }
            }
        }
    }
}

/// Takes back a stored run whose trigger was refused (its enqueue refused, its batch rolled
/// back): removed from the store with its key, unless the store says the key answered another
/// trigger meanwhile (another process's, whose caller now holds the run's id; see
/// [`RunStore::remove_refused`](runlane_core::backend::RunStore::remove_refused)). That run
/// stays, for that trigger: it is enqueued as already accepted (past its key's `max_queued`).
/// Failures are logged: a run left stored and not enqueued is the reconciler's (distributed)
/// or the next open's.
async fn withdraw(inner: &Arc<Inner>, record: &RunRecord, now: Timestamp) {
    let run = record.id;
    match inner.store.remove_refused(run).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(%run, "refused run kept: its idempotency key answered another trigger");
            match inner
                .queue
                .enqueue(record.dispatch(), EnqueueAs::Accepted, now)
                .await
            {
                Ok(enqueued) => {
                    settle(
                        inner,
                        &record.lane,
                        record.attempt,
                        enqueued,
                        run,
                        &record.env,
                        false,
                    )
                    .await;
                }
                Err(e) => tracing::warn!(%run, error = %e, "kept run not enqueued"),
            }
        }
        Err(e) => tracing::warn!(%run, error = %e, "refused run not removed"),
    }
}

/// After an accepted enqueue: publishes the statuses it moved the run through and rings the
/// run's lane when the backend did not (unless `leased`: the enqueue's own claim took the
/// run); answers the placement and the run's status.
async fn settle(
    inner: &Inner,
    lane: &LaneName,
    attempt: u32,
    enqueued: Enqueued,
    run: RunId,
    env: &EnvName,
    leased: bool,
) -> (Placement, RunStatus) {
    let placed = match enqueued.placement {
        Placement::Delayed => RunStatus::Delayed,
        Placement::Queued => RunStatus::Queued,
        Placement::Ready => RunStatus::Ready,
    };
    // A backend that reports the lane it made ready has it rung by `apply`.
    let rung = enqueued.effects.ready_lanes.contains(lane);
    // With the fast path off, the enqueue may admit the run in the same step: queued, then
    // ready.
    let status = inner
        .apply_own(run, env, attempt, placed, enqueued.effects)
        .await;
    if status == RunStatus::Ready && !rung && !leased {
        inner.bells.ring(lane);
    }
    (enqueued.placement, status)
}

/// A trigger's enqueue; with `sent`, parked offers may lease the run in it, with what a worker
/// needs of the run (see [`runlane_core::backend::QueueBackend::enqueue_handing`]).
async fn enqueue_sending(
    inner: &Inner,
    dispatch: Dispatch,
    why: EnqueueAs,
    now: Timestamp,
    sent: Option<Vec<u8>>,
) -> Result<Enqueued, QueueError> {
    match sent {
        Some(sent) => Ok(inner
            .queue
            .enqueue_handing(dispatch, why, now, None, Some(&sent))
            .await?
            .0),
        None => inner.queue.enqueue(dispatch, why, now).await,
    }
}

/// The enqueue of a run that carries an idle workloop's claim (see [`crate::offer`]). The
/// claim's leases start now (not when the trigger began); they are handed to the workloop
/// after the run's statuses are published. A refused or failed call drops the offer: its
/// slots go back and its workloop claims as usual.
async fn enqueue_for_offer(
    inner: Arc<Inner>,
    dispatch: Dispatch,
    why: EnqueueAs,
    offer: Offer,
    sent: Option<Vec<u8>>,
) -> Result<(Placement, RunStatus), QueueError> {
    let now = inner.now();
    let (run, env, lane, attempt) = (
        dispatch.run_id,
        dispatch.env.clone(),
        dispatch.lane.clone(),
        dispatch.attempt,
    );
    let (enqueued, leases) = inner
        .queue
        .enqueue_handing(
            dispatch,
            why,
            now,
            Some((&offer.request, offer.parked)),
            sent.as_deref(),
        )
        .await?;
    let leases = renew_late(
        inner.queue.as_ref(),
        leases,
        offer.request.lease,
        inner.now(),
    )
    .await;
    let leased = leases.iter().any(|l| l.dispatch.run_id == run);
    let settled = settle(&inner, &lane, attempt, enqueued, run, &env, leased).await;
    if !leases.is_empty() {
        inner.claimed(&leases);
        inner.counters.claimed_on_enqueue(leases.len());
    }
    offer.fulfil(leases);
    Ok(settled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<(), InvalidInput>) -> &'static str {
        r.expect_err("invalid").field
    }

    #[test]
    fn request_validation_names_each_field() {
        let config = EngineConfig {
            payload_max_bytes: 16,
            ..EngineConfig::default()
        };
        let base = TriggerRequest::new("send-email").expect("valid");
        assert!(base.validate(&config).is_ok());
        type Case = (&'static str, fn(&mut TriggerRequest));
        let cases: Vec<Case> = vec![
            ("payload", |r| r.payload = Arc::from("{not json")),
            ("payload", |r| {
                r.payload = Arc::from(format!("\"{}\"", "x".repeat(20)))
            }),
            ("ttl", |r| r.ttl = Some(Duration::ZERO)),
            ("priority", |r| r.priority = Duration::from_secs(2_592_001)),
            ("key", |r| r.key = Some("k".repeat(257))),
            ("idempotency_key", |r| {
                r.idempotency_key = Some("i".repeat(257))
            }),
            ("idempotency_key", |r| {
                r.idempotency_key = Some(String::new())
            }),
            ("idempotency_ttl", |r| {
                r.idempotency_ttl = Some(Duration::ZERO)
            }),
            ("max_duration", |r| r.max_duration = Some(Duration::ZERO)),
            ("retry.attempts_max", |r| {
                r.retry = Some(RetryPolicy {
                    attempts_max: 0,
                    ..RetryPolicy::default()
                })
            }),
        ];
        for (want, tweak) in cases {
            let mut r = base.clone();
            tweak(&mut r);
            assert_eq!(field(r.validate(&config)), want);
        }
        assert_eq!(
            TriggerRequest::new("bad task").expect_err("task").field,
            "task"
        );
    }
}
