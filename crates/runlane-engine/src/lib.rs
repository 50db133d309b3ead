//! runlane's engine: everything between the public API and the two backend seams.
//!
//! It validates triggers and resolves task defaults, writes the run store first and the queue
//! backend second, runs the one timer service (armed by the earliest deadline, woken early by
//! `Notify`), runs in-process workers (workloops woken directly by lane doorbells, one heartbeat
//! per worker per `lease / 3`, drain on stop) and publishes run events. It holds no dispatch rule
//! of its own: admission, fairness and leases live in the queue backend.

pub mod clock;
pub mod config;
mod doorbell;
pub mod engine;
pub mod error;
pub mod event;
mod local;
mod meta;
pub mod trigger;
pub mod worker;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::EngineConfig;
pub use engine::{Engine, EngineBuilder, TimerStats};
pub use error::EngineError;
pub use event::{EnvEvents, RunEvent, RunEventKind, RunEvents};
pub use trigger::{TriggerBuilder, TriggerRequest, Triggered, WaitOutcome};
pub use worker::{CancelToken, DrainReport, HandlerError, RunContext, Worker, WorkerBuilder};
