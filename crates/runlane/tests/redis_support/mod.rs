//! Shared by the Redis tests: the server address, a unique key prefix per scenario, and the
//! rule that under `CI=true` a missing server fails the test instead of skipping it.

#![allow(dead_code)] // each test file uses a different part of it

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use runlane::RedisConfig;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// `RUNLANE_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn url() -> String {
    std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A prefix no other test (or process) uses: `rl:test:<pid>:<n>`.
pub fn fresh_prefix(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("rl:test:{tag}:{}:{n}", std::process::id())
}

/// A config on the shared server under a fresh prefix.
pub fn fresh_config(tag: &str) -> RedisConfig {
    let mut config = RedisConfig::new(url()).with_prefix(fresh_prefix(tag));
    config.response_timeout = Duration::from_secs(5);
    config
}
