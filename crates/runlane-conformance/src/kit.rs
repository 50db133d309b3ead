//! The harness every scenario runs on: a backend factory, an engine opened on a manual clock,
//! an event log of every env the scenario uses, and handler probes the test holds and releases.
//!
//! Scenarios never sleep. They wait on events (the env event log, handler starts) and every wait
//! is bounded by [`WAIT`], which only turns a hang into a failure. Time is virtual: the engine's
//! clock is a [`ManualClock`] that moves only when a scenario moves it, so "on time" and "no
//! polling" are asserted with the timer's recorded wake-ups, never with wall-clock thresholds.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runlane_core::backend::{EnvUsage, LiveRun, QueueBackend, RunFilter, RunRecord, RunStore};
use runlane_core::{CancelReason, EnvSettings, RunId, RunStatus, Timestamp};
use runlane_engine::{
    Clock, Engine, EngineBuilder, EngineConfig, EngineError, HandlerError, ManualClock, RunContext,
    RunEvent, RunEventKind, TriggerBuilder,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Opens fresh, empty backends for one scenario. A backend's test file implements this and
/// expands [`crate::conformance_suite!`] with it.
#[async_trait]
pub trait Backends: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;
    /// A queue backend and a run store holding nothing, not shared with any other scenario.
    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>);
}

/// The instant every scenario starts at (2023-11-14T22:13:20Z).
pub const EPOCH: Timestamp = Timestamp(1_700_000_000_000);

/// The bound of every wait on an event. Only a hang reaches it; it is never a timing assertion.
pub const WAIT: Duration = Duration::from_secs(10);

/// The seed of the engine's rng, so ids and jitter replay exactly.
pub const SEED: u64 = 0x5eed_0001;

/// Awaits `fut`, failing the scenario if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// `EPOCH + d`.
pub fn at(d: Duration) -> Timestamp {
    EPOCH.saturating_add(d)
}

/// Whole seconds.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A deterministic retry policy: `attempts_max` attempts, a fixed backoff, no jitter.
pub fn retry_fixed(attempts_max: u32, backoff: Duration) -> runlane_core::RetryPolicy {
    runlane_core::RetryPolicy {
        attempts_max,
        factor: 1.0,
        min: backoff,
        max: backoff,
        jitter: 0.0,
    }
}

/// Env settings with `limit` and every other default.
pub fn env_limit(limit: u32) -> EnvSettings {
    EnvSettings {
        limit,
        ..EnvSettings::default()
    }
}

/// Every run event the scenario's envs published, in arrival order.
struct EventLog {
    events: Mutex<Vec<RunEvent>>,
    version: watch::Sender<u64>,
}

impl EventLog {
    fn push(&self, event: RunEvent) {
        self.events.lock().expect("event log lock").push(event);
        self.version.send_modify(|v| *v += 1);
    }

    fn snapshot(&self) -> Vec<RunEvent> {
        self.events.lock().expect("event log lock").clone()
    }
}

/// One engine on fresh backends, a manual clock at [`EPOCH`], and the event log.
pub struct Harness {
    /// The engine under test.
    pub engine: Engine,
    /// Its clock; only the scenario moves it.
    pub clock: Arc<ManualClock>,
    /// The queue backend the engine was opened on (for the backend's view).
    pub queue: Arc<dyn QueueBackend>,
    /// The run store the engine was opened on.
    pub store: Arc<dyn RunStore>,
    /// The backend's name.
    pub backend: &'static str,
    log: Arc<EventLog>,
    subscribed: Mutex<HashSet<String>>,
    collectors: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Ok(collectors) = self.collectors.lock() {
            for c in collectors.iter() {
                c.abort();
            }
        }
    }
}

impl Harness {
    /// Opens an engine with the default config (seeded) on fresh backends from `b`.
    pub async fn open(b: &dyn Backends) -> Harness {
        Harness::open_with(b, EngineConfig::default()).await
    }

    /// Opens an engine with `config` (its seed is fixed to [`SEED`]) on fresh backends.
    pub async fn open_with(b: &dyn Backends, config: EngineConfig) -> Harness {
        let (queue, store) = b.open().await;
        let clock = Arc::new(ManualClock::new(EPOCH));
        let engine = within(
            "the engine to open",
            EngineBuilder::new()
                .clock(clock.clone() as Arc<dyn Clock>)
                .config(EngineConfig {
                    seed: Some(SEED),
                    ..config
                })
                .open(queue.clone(), store.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("[{}] the engine does not open: {e}", b.name()));
        let (version, _) = watch::channel(0);
        let h = Harness {
            engine,
            clock,
            queue,
            store,
            backend: b.name(),
            log: Arc::new(EventLog {
                events: Mutex::new(Vec::new()),
                version,
            }),
            subscribed: Mutex::new(HashSet::new()),
            collectors: Mutex::new(Vec::new()),
        };
        h.subscribe("default");
        h
    }

    /// Starts collecting `env`'s run events into the log (once per env).
    fn subscribe(&self, env: &str) {
        if !self
            .subscribed
            .lock()
            .expect("lock")
            .insert(env.to_string())
        {
            return;
        }
        let mut events = self
            .engine
            .subscribe_env(env)
            .unwrap_or_else(|e| panic!("subscribe_env({env}) refused: {e}"));
        let log = self.log.clone();
        let collector = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                log.push(event);
            }
        });
        self.collectors.lock().expect("lock").push(collector);
    }

    /// Creates or updates `env` and collects its events.
    pub async fn set_env(&self, env: &str, settings: EnvSettings) {
        within("set_env", self.engine.set_env(env, settings))
            .await
            .unwrap_or_else(|e| panic!("set_env({env}) refused: {e}"));
        self.subscribe(env);
    }

    /// Sets the default env's limit.
    pub async fn limit(&self, limit: u32) {
        self.set_env("default", env_limit(limit)).await;
    }

    /// Triggers, expecting a new run (not an idempotency hit); returns its record.
    pub async fn trigger(&self, builder: TriggerBuilder) -> RunRecord {
        let t = within("a trigger", builder.send())
            .await
            .unwrap_or_else(|e| panic!("trigger refused: {e}"));
        assert!(
            !t.idempotent_hit,
            "a trigger without an idempotency key hit an existing run"
        );
        t.run
    }

    /// Triggers `task` in env `default` with every default; returns the run id.
    pub async fn run(&self, task: &str) -> RunId {
        self.trigger(self.engine.trigger(task)).await.id
    }

    /// The run with its live status.
    pub async fn get(&self, run: RunId) -> RunRecord {
        within("get", self.engine.get(run))
            .await
            .unwrap_or_else(|e| panic!("get({run}) failed: {e}"))
    }

    /// The run's live status as the engine reports it.
    pub async fn status(&self, run: RunId) -> RunStatus {
        self.get(run).await.status
    }

    /// The run as the queue backend holds it (`None` once it left every structure).
    pub async fn live(&self, run: RunId) -> Option<LiveRun> {
        within("live", self.queue.live(run))
            .await
            .unwrap_or_else(|e| panic!("live({run}) failed: {e}"))
    }

    /// The run's status in the queue backend.
    pub async fn live_status(&self, run: RunId) -> Option<RunStatus> {
        self.live(run).await.map(|l| l.status)
    }

    /// Every run the queue backend holds, with its status.
    pub async fn snapshot(&self) -> Vec<LiveRun> {
        within("snapshot", self.queue.snapshot())
            .await
            .expect("snapshot failed")
    }

    /// How many runs the queue backend holds in `status`.
    pub async fn count_live(&self, status: RunStatus) -> usize {
        self.snapshot()
            .await
            .iter()
            .filter(|l| l.status == status)
            .count()
    }

    /// Slot counters of `env`.
    pub async fn usage(&self, env: &str) -> EnvUsage {
        let env = runlane_core::EnvName::new(env).expect("valid env name");
        within("env_usage", self.queue.env_usage(&env))
            .await
            .expect("env_usage failed")
    }

    /// Every run the engine lists (up to 1,000), in id order.
    pub async fn all_runs(&self) -> Vec<RunRecord> {
        let filter = RunFilter {
            limit: Some(1000),
            ..RunFilter::default()
        };
        let mut runs = within("list", self.engine.list(&filter))
            .await
            .expect("list failed");
        // `started_at` is an advisory mark a worker writes without waiting when a handler
        // starts (a durable store applies it a moment later). It is not state a call changes,
        // so "nothing changed" comparisons leave it out.
        for run in &mut runs {
            run.started_at = None;
        }
        runs
    }

    /// The engine clock's now.
    pub fn now(&self) -> Timestamp {
        self.engine.now()
    }

    /// Moves virtual time to `t`.
    pub fn set_clock(&self, t: Timestamp) {
        self.clock.set(t);
    }

    /// The instants the timer service woke at.
    pub fn wakeups(&self) -> Vec<Timestamp> {
        self.engine.timer_stats().wakeups
    }

    /// Waits until something sleeps on the clock until exactly `at` (the timer armed for that
    /// deadline, a drain waiting for its stop timeout, a wait for its timeout). Moving time to
    /// `at` afterwards wakes that sleeper from its sleep, never from a re-read.
    pub async fn armed_at(&self, at: Timestamp) {
        within(&format!("a sleeper armed at {at}"), async {
            while !self.clock.sleeping_until().contains(&at) {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    /// Runs `fut` to completion; if it parks on the clock until `at` before it completes, moves
    /// time to `at`. For calls whose timeout may be measured on the engine clock
    /// (trigger-and-wait), so the scenario holds whichever clock they use.
    pub async fn drive<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        at: Timestamp,
    ) -> T {
        let mut handle = tokio::spawn(fut);
        let parked = within(&format!("the call to complete or park until {at}"), async {
            loop {
                if handle.is_finished() {
                    return false;
                }
                if self.clock.sleeping_until().contains(&at) {
                    return true;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        if parked {
            self.clock.set(at);
        }
        within("the driven call", &mut handle)
            .await
            .expect("the driven call panicked")
    }

    /// Every event about `run`, in order.
    pub fn events_of(&self, run: RunId) -> Vec<RunEventKind> {
        self.log
            .snapshot()
            .into_iter()
            .filter(|e| e.run == run)
            .map(|e| e.kind)
            .collect()
    }

    /// Every status event about `run`, in order.
    pub fn statuses_of(&self, run: RunId) -> Vec<RunStatus> {
        self.events_of(run)
            .into_iter()
            .filter_map(|k| match k {
                RunEventKind::Status { status, .. } => Some(status),
                RunEventKind::Progress(_) => None,
            })
            .collect()
    }

    /// Waits until the log holds an event for which `pred` holds.
    pub async fn wait_event(&self, what: &str, pred: impl Fn(&RunEvent) -> bool) -> RunEvent {
        let mut version = self.log.version.subscribe();
        within(what, async {
            loop {
                if let Some(e) = self.log.snapshot().into_iter().find(|e| pred(e)) {
                    return e;
                }
                version.changed().await.expect("event log alive");
            }
        })
        .await
    }

    /// Waits until `run` published `status` (in any attempt).
    pub async fn wait_status(&self, run: RunId, status: RunStatus) {
        self.wait_event(&format!("{run} to become {status}"), |e| {
            e.run == run && matches!(e.kind, RunEventKind::Status { status: s, .. } if s == status)
        })
        .await;
    }

    /// Waits until `run` published `status` in `attempt`.
    pub async fn wait_status_attempt(&self, run: RunId, status: RunStatus, attempt: u32) {
        self.wait_event(&format!("{run} to become {status} in attempt {attempt}"), |e| {
            e.run == run
                && matches!(e.kind, RunEventKind::Status { status: s, attempt: a } if s == status && a == attempt)
        })
        .await;
    }

    /// Waits until `run` reached a terminal status; returns its record.
    pub async fn wait_terminal(&self, run: RunId) -> RunRecord {
        self.wait_event(&format!("{run} to finish"), |e| {
            e.run == run
                && matches!(e.kind, RunEventKind::Status { status, .. } if status.is_terminal())
        })
        .await;
        self.get(run).await
    }

    /// Asserts a refused call changed nothing: the engine lists the same runs and the queue
    /// backend holds the same runs before and after `call`. Returns the refusal.
    pub async fn refused<T: std::fmt::Debug>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, EngineError>>,
    ) -> EngineError {
        let runs_before = self.all_runs().await;
        let live_before = self.snapshot().await;
        let answer = within(what, call).await;
        let err = match answer {
            Ok(v) => panic!(
                "[{}] {what}: accepted ({v:?}), want a refusal",
                self.backend
            ),
            Err(e) => e,
        };
        assert_eq!(
            self.all_runs().await,
            runs_before,
            "{what}: the refusal changed the runs"
        );
        assert_eq!(
            self.snapshot().await,
            live_before,
            "{what}: the refusal changed the queue backend"
        );
        err
    }
}

/// Asserts `err` is `InvalidInput` naming `field`.
pub fn assert_invalid(err: &EngineError, field: &str) {
    match err {
        EngineError::Invalid(i) => {
            assert_eq!(i.field, field, "the error names the wrong field: {err}")
        }
        other => panic!("want Invalid {{ field: {field:?} }}, got {other:?}"),
    }
}

/// A handler start reported to the test. Holding it holds the handler; [`Started::complete`]
/// or [`Started::fail`] releases it. Dropping it makes the handler fail.
pub struct Started {
    /// The run.
    pub run: RunId,
    /// The task.
    pub task: String,
    /// The attempt.
    pub attempt: u32,
    /// The payload text.
    pub payload: String,
    /// The handler's context (its cancel token, `trigger_and_wait`).
    pub ctx: RunContext,
    reply: Option<oneshot::Sender<Result<Value, HandlerError>>>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("run", &self.run)
            .field("task", &self.task)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Started {
    /// The handler returns `Ok(output)`. False when the handler was already gone.
    pub fn complete(mut self, output: Value) -> bool {
        self.reply
            .take()
            .is_some_and(|r| r.send(Ok(output)).is_ok())
    }

    /// The handler returns `Err(message)`. False when the handler was already gone.
    pub fn fail(mut self, message: &str) -> bool {
        self.reply
            .take()
            .is_some_and(|r| r.send(Err(HandlerError::new(message))).is_ok())
    }

    /// Waits until the handler's cancel token fires; returns its reason.
    pub async fn cancelled(&self) -> CancelReason {
        within(
            "the handler's cancel token to fire",
            self.ctx.cancel_token().cancelled(),
        )
        .await
    }
}

type BoxedHandler = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;

/// Reports every handler start to the test. A *held* handler waits for the test's answer; it
/// keeps running when cancelled with reason `Cancel` (the scenario decides how it ends, to test
/// the grace period) and returns an error when its token fires for any other reason (shutdown,
/// timeout, lease lost), as a cooperative handler does.
pub struct Probe {
    tx: mpsc::UnboundedSender<Started>,
    rx: mpsc::UnboundedReceiver<Started>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

impl Probe {
    /// A probe with no starts.
    pub fn new() -> Probe {
        let (tx, rx) = mpsc::unbounded_channel();
        Probe { tx, rx }
    }

    /// A handler that reports its start and waits for the test's answer.
    pub fn held(&self) -> impl Fn(RunContext) -> BoxedHandler + Send + Sync + 'static {
        let tx = self.tx.clone();
        move |ctx: RunContext| {
            let tx = tx.clone();
            Box::pin(async move {
                let (reply, answer) = oneshot::channel();
                let token = ctx.cancel_token().clone();
                let started = Started {
                    run: ctx.run_id(),
                    task: ctx.task().as_str().to_string(),
                    attempt: ctx.attempt(),
                    payload: ctx.payload_text().to_string(),
                    ctx,
                    reply: Some(reply),
                };
                if tx.send(started).is_err() {
                    return Err(HandlerError::new("the probe is gone"));
                }
                let stopped = async move {
                    let reason = token.cancelled().await;
                    if reason == CancelReason::Cancel {
                        std::future::pending::<()>().await;
                    }
                    reason
                };
                tokio::select! {
                    answer = answer => answer.unwrap_or_else(|_| Err(HandlerError::new("released by the test"))),
                    reason = stopped => Err(HandlerError::new(format!("stopped: {reason:?}"))),
                }
            }) as BoxedHandler
        }
    }

    /// A handler that reports its start and at once returns `answer(ctx)`.
    pub fn auto(
        &self,
        answer: impl Fn(&RunContext) -> Result<Value, HandlerError> + Send + Sync + 'static,
    ) -> impl Fn(RunContext) -> BoxedHandler + Send + Sync + 'static {
        let tx = self.tx.clone();
        let answer = Arc::new(answer);
        move |ctx: RunContext| {
            let tx = tx.clone();
            let answer = answer.clone();
            Box::pin(async move {
                let out = answer(&ctx);
                let _ = tx.send(Started {
                    run: ctx.run_id(),
                    task: ctx.task().as_str().to_string(),
                    attempt: ctx.attempt(),
                    payload: ctx.payload_text().to_string(),
                    ctx,
                    reply: None,
                });
                out
            }) as BoxedHandler
        }
    }

    /// The next handler start.
    pub async fn next(&mut self) -> Started {
        within("a handler to start", self.rx.recv())
            .await
            .expect("the probe's sender lives as long as the probe")
    }

    /// A handler start already reported, if any.
    pub fn try_next(&mut self) -> Option<Started> {
        self.rx.try_recv().ok()
    }

    /// Asserts no handler start is pending.
    pub fn assert_quiet(&mut self, why: &str) {
        if let Some(s) = self.try_next() {
            panic!("{why}: unexpected handler start {s:?}");
        }
    }
}

impl Harness {
    /// Starts a worker, failing the scenario if it is refused.
    pub async fn start(&self, builder: runlane_engine::WorkerBuilder) -> runlane_engine::Worker {
        within("a worker to start", builder.start())
            .await
            .unwrap_or_else(|e| panic!("[{}] the worker does not start: {e}", self.backend))
    }

    /// A worker on env `default` running `task` with a held handler of `probe`, with
    /// workloops `spec`.
    pub async fn held_worker(
        &self,
        probe: &Probe,
        task: &str,
        spec: &str,
    ) -> runlane_engine::Worker {
        self.start(
            self.engine
                .worker()
                .handler(task, probe.held())
                .workloops(spec),
        )
        .await
    }

    /// Lanes with their depth, by name.
    pub async fn lane_ready(&self, lane: &str) -> u64 {
        let lanes = within("lanes", self.engine.lanes())
            .await
            .expect("lanes failed");
        lanes
            .iter()
            .find(|l| l.name.as_str() == lane)
            .map_or(0, |l| l.ready)
    }

    /// Sets a queue's settings in env `default`.
    pub async fn set_queue(&self, queue: &str, settings: runlane_core::QueueSettings) {
        within(
            "set_queue",
            self.engine.set_queue("default", queue, settings),
        )
        .await
        .unwrap_or_else(|e| panic!("set_queue({queue}) refused: {e}"));
    }

    /// A queue's info in env `default`.
    pub async fn queue_info(&self, queue: &str) -> runlane_core::backend::QueueInfo {
        within("queues", self.engine.queues("default"))
            .await
            .expect("queues failed")
            .into_iter()
            .find(|q| q.name.as_str() == queue)
            .unwrap_or_else(|| panic!("queue {queue} is not listed"))
    }

    /// Cancels, expecting success.
    pub async fn cancel(&self, run: RunId) -> RunRecord {
        within("cancel", self.engine.cancel(run))
            .await
            .unwrap_or_else(|e| panic!("cancel({run}) refused: {e}"))
    }
}

/// The run's output parsed as JSON.
pub fn output(record: &RunRecord) -> Option<Value> {
    record
        .output
        .as_deref()
        .map(|text| serde_json::from_str(text).expect("output is JSON"))
}

/// Awaits an engine call that must succeed (bounded by [`WAIT`]).
pub async fn ok<T, E: std::fmt::Display>(fut: impl Future<Output = Result<T, E>>) -> T {
    within("an engine call", fut)
        .await
        .unwrap_or_else(|e| panic!("the engine refused: {e}"))
}
