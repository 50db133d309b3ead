//! Settings of the PostgreSQL run store, and the durability of each env's writes.

use std::collections::BTreeMap;
use std::time::Duration;

use runlane_core::InvalidInput;

/// How hard a commit waits for the write-ahead log (SPEC §7, issue 5: per-env `durability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// The commit returns once the WAL is flushed to disk (`synchronous_commit = on`): nothing
    /// acknowledged is lost, even on power loss.
    #[default]
    Strict,
    /// The commit returns before the WAL flush (`synchronous_commit = off` for that env's
    /// transactions): a server crash may lose the last few hundred milliseconds of
    /// acknowledged writes, but never corrupts anything. For users who trade that for latency.
    Relaxed,
}

impl Durability {
    /// The `synchronous_commit` value of a transaction with this durability.
    pub fn synchronous_commit(self) -> &'static str {
        match self {
            Durability::Strict => "on",
            Durability::Relaxed => "off",
        }
    }
}

/// Settings of [`crate::PostgresStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection URL (`postgres://user@host:port/db`). No TLS.
    pub url: String,
    /// The schema holding the tables (created if missing); one schema per deployment or test.
    pub schema: String,
    /// Connections in the pool, writers included.
    pub pool_size: u32,
    /// Group-commit writers: each takes what is queued, commits it in one transaction, and
    /// answers each caller; while one commits, the next collects.
    pub writers: usize,
    /// Writes waiting for a writer, at most (the bound of backpressure, SPEC §7).
    pub queue_bound: usize,
    /// A write that finds the queue full waits this long, then fails with `Unavailable`
    /// (zero: fails at once).
    pub enqueue_timeout: Duration,
    /// The most calls one transaction groups.
    pub batch_max: usize,
    /// How long a write transaction may take before its calls fail with `Unavailable`.
    pub commit_timeout: Duration,
    /// How long a call waits for a connection (also bounds connecting at open).
    pub acquire_timeout: Duration,
    /// A noted attempt start is only written if the run is still unfinished this long after
    /// (short runs never cost a third row write).
    pub start_flush_after: Duration,
    /// The durability of envs not named in `env_durability`.
    pub durability: Durability,
    /// Per-env durability, by env name.
    pub env_durability: BTreeMap<String, Durability>,
    /// Runs deleted per retention statement.
    pub purge_batch: u32,
}

impl PostgresConfig {
    /// The defaults, for the server at `url`, in schema `runlane`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: "runlane".into(),
            pool_size: 8,
            writers: 2,
            queue_bound: 10_000,
            enqueue_timeout: Duration::from_secs(1),
            batch_max: 1_000,
            commit_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(3),
            start_flush_after: Duration::from_secs(1),
            durability: Durability::Strict,
            env_durability: BTreeMap::new(),
            purge_batch: 1_000,
        }
    }

    /// Checks the settings; errors name the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(InvalidInput::new(
                "url",
                "must start with postgres:// or postgresql://",
            ));
        }
        validate_schema(&self.schema)?;
        if self.pool_size == 0 {
            return Err(InvalidInput::new("pool_size", "must be at least 1"));
        }
        if self.writers == 0 {
            return Err(InvalidInput::new("writers", "must be at least 1"));
        }
        if self.pool_size < self.writers as u32 + 1 {
            return Err(InvalidInput::new(
                "pool_size",
                format!(
                    "must exceed writers ({}) so reads never wait for a writer",
                    self.writers
                ),
            ));
        }
        if self.queue_bound == 0 {
            return Err(InvalidInput::new("queue_bound", "must be at least 1"));
        }
        if self.batch_max == 0 {
            return Err(InvalidInput::new("batch_max", "must be at least 1"));
        }
        if self.purge_batch == 0 {
            return Err(InvalidInput::new("purge_batch", "must be at least 1"));
        }
        if self.commit_timeout.is_zero() {
            return Err(InvalidInput::new("commit_timeout", "must be positive"));
        }
        Ok(())
    }
}

/// A schema name is an unquoted SQL identifier: `[a-z_][a-z0-9_]*`, at most 63 bytes.
pub(crate) fn validate_schema(schema: &str) -> Result<(), InvalidInput> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || schema.len() > 63 {
        return Err(InvalidInput::new(
            "schema",
            format!("{schema:?} must match [a-z_][a-z0-9_]* and be at most 63 bytes"),
        ));
    }
    Ok(())
}

pub use runlane_core::backend::Retention;

impl From<&str> for PostgresConfig {
    fn from(url: &str) -> Self {
        PostgresConfig::new(url)
    }
}

impl From<String> for PostgresConfig {
    fn from(url: String) -> Self {
        PostgresConfig::new(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["runlane", "_x", "t_123_4"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "Runlane", "a-b", "a;drop", &"a".repeat(64)] {
            assert_eq!(validate_schema(bad).map_err(|e| e.field), Err("schema"));
        }
    }

    #[test]
    fn the_pool_must_leave_room_for_reads() {
        let mut c = PostgresConfig::new("postgres://localhost/test");
        assert!(c.validate().is_ok());
        c.writers = 8;
        assert_eq!(c.validate().map_err(|e| e.field), Err("pool_size"));
    }
}
