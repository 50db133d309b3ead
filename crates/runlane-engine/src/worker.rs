//! In-process workers: handlers, workloops, heartbeats, cancellation, drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::{CancelReason, RunId, TaskName, WorkerId};

use crate::engine::Engine;
use crate::error::EngineError;
use crate::trigger::{TriggerRequest, WaitOutcome};

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
    _private: (),
}

impl CancelToken {
    /// The reason, once fired.
    pub fn reason(&self) -> Option<CancelReason> {
        todo!()
    }
    /// Completes when fired, with the reason.
    pub async fn cancelled(&self) -> CancelReason {
        todo!()
    }
}

/// What a handler receives.
#[derive(Clone)]
pub struct RunContext {
    _private: (),
}

impl RunContext {
    /// The run.
    pub fn run_id(&self) -> RunId {
        todo!()
    }
    /// The task.
    pub fn task(&self) -> &TaskName {
        todo!()
    }
    /// The attempt, 1-based.
    pub fn attempt(&self) -> u32 {
        todo!()
    }
    /// The payload as JSON text.
    pub fn payload_text(&self) -> &str {
        todo!()
    }
    /// The payload deserialized.
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        todo!()
    }
    /// The cancellation token.
    pub fn cancel_token(&self) -> &CancelToken {
        todo!()
    }
    /// Reports progress (kept in memory, published as a run event).
    pub fn progress<T: serde::Serialize>(&self, value: &T) {
        let _ = value;
        todo!()
    }
    /// The engine, to trigger other runs.
    pub fn engine(&self) -> &Engine {
        todo!()
    }
    /// Triggers and waits from inside this handler; refused with `WaitDeadlock` when the child
    /// needs a slot this handler holds in a scope whose limit is 1.
    pub async fn trigger_and_wait(
        &self,
        request: TriggerRequest,
        timeout: Duration,
    ) -> Result<WaitOutcome, EngineError> {
        let _ = (request, timeout);
        todo!()
    }
}

/// The boxed handler future.
pub type HandlerFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<serde_json::Value, HandlerError>> + Send>>;

/// A registered handler.
pub type Handler = Arc<dyn Fn(RunContext) -> HandlerFuture + Send + Sync>;

/// Builds a worker: envs, handlers, workloops.
pub struct WorkerBuilder {
    _private: (),
}

impl WorkerBuilder {
    /// A builder on `engine` serving env `default` with one workloop of 1 slot on `manual>*`.
    pub fn new(engine: Engine) -> Self {
        let _ = engine;
        todo!()
    }
    /// Serve this env at its current version (replaces the default env on first call).
    pub fn env(self, env: &str) -> Self {
        let _ = env;
        todo!()
    }
    /// Serve this env at this version.
    pub fn env_version(self, env: &str, version: u32) -> Self {
        let _ = (env, version);
        todo!()
    }
    /// Registers a plain `async fn` handler for `task`.
    pub fn handler<F, Fut>(self, task: &str, f: F) -> Self
    where
        F: Fn(RunContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'static,
    {
        let _ = (task, f);
        todo!()
    }
    /// The workloops spec, e.g. `fast_lane:1 manual>*:4`.
    pub fn workloops(self, spec: &str) -> Self {
        let _ = spec;
        todo!()
    }
    /// Overrides the lease duration.
    pub fn lease(self, lease: Duration) -> Self {
        let _ = lease;
        todo!()
    }
    /// Overrides the drain timeout.
    pub fn stop_timeout(self, d: Duration) -> Self {
        let _ = d;
        todo!()
    }
    /// Starts the worker.
    pub async fn start(self) -> Result<Worker, EngineError> {
        todo!()
    }
}

/// A running worker.
pub struct Worker {
    _private: (),
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
        todo!()
    }
    /// Runs currently executing on it.
    pub fn in_flight(&self) -> usize {
        todo!()
    }
    /// Stops claiming, waits up to the stop timeout, then cancels the rest with `Shutdown` and
    /// releases them to their queues without counting an attempt.
    pub async fn stop(self) -> DrainReport {
        todo!()
    }
    /// Simulates a crash: stops heartbeating and claiming at once, abandoning its runs (their
    /// leases lapse and are recovered). For tests.
    pub fn crash(self) {
        todo!()
    }
}
