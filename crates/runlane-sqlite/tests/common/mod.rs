//! Helpers shared by the integration tests: record builders and store openers.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::Path;

use runlane_core::backend::{AttemptRecord, RunRecord};
use runlane_core::{EnvName, RunId, TaskName, Timestamp};
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
    let payload = format!(r#"{{"n":{}}}"#, run.0 & 0xFFFF);
    RunRecord::queued(run, env(env_name), task(task_name), &payload, Timestamp(ms))
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
