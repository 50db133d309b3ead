//! Trigger requests, the builder users chain, and the answers.

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunRecord;
use runlane_core::{
    EnvName, InvalidInput, LaneName, QueueName, RetryPolicy, RunId, RunStatus, TaskName, Timestamp,
    TriggerSource,
};

use crate::engine::Engine;
use crate::error::EngineError;

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
        let _ = task;
        todo!()
    }
}

/// Chains trigger options; the first invalid value is reported by `send`/`wait`/`request`.
pub struct TriggerBuilder {
    _private: (),
}

impl TriggerBuilder {
    /// Starts a trigger of `task` on `engine`.
    pub fn new(engine: Engine, task: &str) -> Self {
        let _ = (engine, task);
        todo!()
    }
    /// The env.
    pub fn env(self, env: &str) -> Self {
        let _ = env;
        todo!()
    }
    /// The payload, serialized to JSON.
    pub fn payload<T: serde::Serialize>(self, payload: &T) -> Self {
        let _ = payload;
        todo!()
    }
    /// The queue.
    pub fn queue(self, queue: &str) -> Self {
        let _ = queue;
        todo!()
    }
    /// The concurrency key.
    pub fn key(self, key: &str) -> Self {
        let _ = key;
        todo!()
    }
    /// An explicit lane.
    pub fn lane(self, lane: &str) -> Self {
        let _ = lane;
        todo!()
    }
    /// The priority.
    pub fn priority(self, priority: Duration) -> Self {
        let _ = priority;
        todo!()
    }
    /// A delay from now.
    pub fn delay(self, delay: Duration) -> Self {
        let _ = delay;
        todo!()
    }
    /// An absolute `run_after`.
    pub fn run_after(self, at: Timestamp) -> Self {
        let _ = at;
        todo!()
    }
    /// The TTL.
    pub fn ttl(self, ttl: Duration) -> Self {
        let _ = ttl;
        todo!()
    }
    /// The idempotency key.
    pub fn idempotency_key(self, key: &str) -> Self {
        let _ = key;
        todo!()
    }
    /// The idempotency key's lifetime.
    pub fn idempotency_ttl(self, ttl: Duration) -> Self {
        let _ = ttl;
        todo!()
    }
    /// The retry policy.
    pub fn retry(self, policy: RetryPolicy) -> Self {
        let _ = policy;
        todo!()
    }
    /// The max duration per attempt.
    pub fn max_duration(self, d: Duration) -> Self {
        let _ = d;
        todo!()
    }
    /// Lock to a version.
    pub fn lock_to_version(self, version: u32) -> Self {
        let _ = version;
        todo!()
    }
    /// The trigger source.
    pub fn source(self, source: TriggerSource) -> Self {
        let _ = source;
        todo!()
    }
    /// The validated request, without sending it.
    pub fn request(self) -> Result<TriggerRequest, EngineError> {
        todo!()
    }
    /// Triggers the run.
    pub async fn send(self) -> Result<Triggered, EngineError> {
        todo!()
    }
    /// Triggers with source `sync` (lane `fast_lane` unless a lane is given) and waits up to
    /// `timeout` for a terminal state.
    pub async fn wait(self, timeout: Duration) -> Result<WaitOutcome, EngineError> {
        let _ = timeout;
        todo!()
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
