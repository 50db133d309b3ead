//! Helpers shared by the integration tests: record builders and store openers.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{AttemptRecord, RunRecord};
use runlane_core::{
    EnvName, LaneName, QueueName, RetryPolicy, RunId, RunStatus, TaskName, Timestamp, TriggerSource,
};
use runlane_sqlite::{SqliteConfig, SqliteStore, Synchronous};

/// A run id minted at `ms` with sequence number `n` (ids order by time, then `n`).
pub fn id(ms: u64, n: u128) -> RunId {
    RunId((u128::from(ms) << 80) | n)
}

pub fn env(name: &str) -> EnvName {
    EnvName::new(name).expect("valid env")
}

pub fn task(name: &str) -> TaskName {
    TaskName::new(name).expect("valid task")
}

/// A plain queued run of `task` in `env`, created at `ms`.
pub fn record(run: RunId, env_name: &str, task_name: &str, ms: u64) -> RunRecord {
    RunRecord {
        id: run,
        env: env(env_name),
        task: task(task_name),
        version: 0,
        locked: false,
        payload: Arc::from(format!(r#"{{"n":{}}}"#, run.0 & 0xFFFF)),
        queue: QueueName::new(task_name).expect("valid queue"),
        key: Arc::from(""),
        lane: LaneName::default_lane(),
        priority: Duration::ZERO,
        run_after: Timestamp(ms),
        ttl: None,
        ttl_deadline: None,
        idempotency_key: None,
        retry: RetryPolicy::default(),
        max_duration: None,
        attempt: 1,
        status: RunStatus::Queued,
        output: None,
        error: None,
        attempts: Vec::new(),
        created_at: Timestamp(ms),
        finished_at: None,
        started_at: None,
        source: TriggerSource::Standard,
        retry_of: None,
    }
}

pub fn attempt(number: u32, outcome: &str, error: Option<&str>, ms: u64) -> AttemptRecord {
    AttemptRecord {
        number,
        outcome: outcome.into(),
        error: error.map(Into::into),
        ended_at: Timestamp(ms),
    }
}

/// Test settings: durable like production, small timeouts so failures are quick.
pub fn config() -> SqliteConfig {
    SqliteConfig {
        synchronous: Synchronous::Full,
        ..SqliteConfig::default()
    }
}

pub fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, config()).expect("open sqlite store")
}

/// A temp dir on the target's disk (real fsyncs, unlike a tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("runlane-sqlite-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir")
}
