//! The engine handle and its builder.

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{LaneInfo, QueueBackend, QueueInfo, RunFilter, RunRecord, RunStore};
use runlane_core::{EnvSettings, QueueSettings, RunId, Timestamp, VersionDef};

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::event::{EnvEvents, RunEvents};
use crate::trigger::{TriggerBuilder, TriggerRequest, Triggered, WaitOutcome};
use crate::worker::WorkerBuilder;

/// Opens an engine over a queue backend and a run store.
pub struct EngineBuilder {
    _private: (),
}

impl EngineBuilder {
    /// A builder with the default config and the system clock.
    pub fn new() -> Self {
        todo!()
    }
    /// Uses this clock (tests pass a `ManualClock`).
    pub fn clock(self, clock: Arc<dyn Clock>) -> Self {
        let _ = clock;
        todo!()
    }
    /// Uses this config.
    pub fn config(self, config: EngineConfig) -> Self {
        let _ = config;
        todo!()
    }
    /// Opens: creates env `default` if missing, recovers every unfinished run from the store
    /// into the queue backend, starts the timer service.
    pub async fn open(
        self,
        queue: Arc<dyn QueueBackend>,
        store: Arc<dyn RunStore>,
    ) -> Result<Engine, EngineError> {
        let _ = (queue, store);
        todo!()
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
    _private: (),
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }
    /// The engine clock's `now`.
    pub fn now(&self) -> Timestamp {
        todo!()
    }
    /// Starts a trigger.
    pub fn trigger(&self, task: &str) -> TriggerBuilder {
        let _ = task;
        todo!()
    }
    /// Triggers one validated request.
    pub async fn trigger_request(&self, request: TriggerRequest) -> Result<Triggered, EngineError> {
        let _ = request;
        todo!()
    }
    /// Triggers a batch: all valid or nothing stored (`BatchItem` names the bad one);
    /// idempotency duplicates inside the batch collapse.
    pub async fn trigger_batch(
        &self,
        requests: Vec<TriggerRequest>,
    ) -> Result<Vec<Triggered>, EngineError> {
        let _ = requests;
        todo!()
    }
    /// Waits up to `timeout` for a run to finish (at once if it already has).
    pub async fn wait(&self, run: RunId, timeout: Duration) -> Result<WaitOutcome, EngineError> {
        let _ = (run, timeout);
        todo!()
    }
    /// Cancels a run (409-style `AlreadyFinished` for a finished one).
    pub async fn cancel(&self, run: RunId) -> Result<RunRecord, EngineError> {
        let _ = run;
        todo!()
    }
    /// Moves a delayed or queued run to `run_after` (its TTL deadline is recomputed).
    pub async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
    ) -> Result<RunRecord, EngineError> {
        let _ = (run, run_after);
        todo!()
    }
    /// Manual retry of a finished run: a new run (`retry_of`, source `manual`, lane `manual`).
    pub async fn retry_run(&self, run: RunId) -> Result<Triggered, EngineError> {
        let _ = run;
        todo!()
    }
    /// One run with its live status.
    pub async fn get(&self, run: RunId) -> Result<RunRecord, EngineError> {
        let _ = run;
        todo!()
    }
    /// Runs matching the filter (statuses are live).
    pub async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, EngineError> {
        let _ = filter;
        todo!()
    }
    /// Subscribes to a run's events (latest progress first).
    pub async fn subscribe(&self, run: RunId) -> Result<RunEvents, EngineError> {
        let _ = run;
        todo!()
    }
    /// Subscribes to an env's run events.
    pub fn subscribe_env(&self, env: &str) -> Result<EnvEvents, EngineError> {
        let _ = env;
        todo!()
    }
    /// A worker builder.
    pub fn worker(&self) -> WorkerBuilder {
        todo!()
    }
    /// Creates or updates an env (raising limits admits at once).
    pub async fn set_env(&self, env: &str, settings: EnvSettings) -> Result<(), EngineError> {
        let _ = (env, settings);
        todo!()
    }
    /// An env's settings.
    pub async fn env_settings(&self, env: &str) -> Result<EnvSettings, EngineError> {
        let _ = env;
        todo!()
    }
    /// Sets a queue's settings (raising limits or resuming admits at once).
    pub async fn set_queue(
        &self,
        env: &str,
        queue: &str,
        settings: QueueSettings,
    ) -> Result<(), EngineError> {
        let _ = (env, queue, settings);
        todo!()
    }
    /// Pauses a queue.
    pub async fn pause_queue(&self, env: &str, queue: &str) -> Result<(), EngineError> {
        let _ = (env, queue);
        todo!()
    }
    /// Resumes a queue.
    pub async fn resume_queue(&self, env: &str, queue: &str) -> Result<(), EngineError> {
        let _ = (env, queue);
        todo!()
    }
    /// Queues of an env.
    pub async fn queues(&self, env: &str) -> Result<Vec<QueueInfo>, EngineError> {
        let _ = env;
        todo!()
    }
    /// Adds a lane.
    pub async fn add_lane(&self, lane: &str) -> Result<(), EngineError> {
        let _ = lane;
        todo!()
    }
    /// Lanes with depth.
    pub async fn lanes(&self) -> Result<Vec<LaneInfo>, EngineError> {
        todo!()
    }
    /// Registers a version of an env's tasks; returns its number.
    pub async fn register_version(&self, env: &str, def: VersionDef) -> Result<u32, EngineError> {
        let _ = (env, def);
        todo!()
    }
    /// Makes a version current.
    pub async fn promote(&self, env: &str, version: u32) -> Result<(), EngineError> {
        let _ = (env, version);
        todo!()
    }
    /// What the timer service did.
    pub fn timer_stats(&self) -> TimerStats {
        todo!()
    }
    /// Stops the timer service; further calls fail with `ShutDown`.
    pub async fn shutdown(&self) {
        todo!()
    }
}
