//! Settings of the SQLite run store and of the retention of finished runs.

use std::time::Duration;

use runlane_core::InvalidInput;

/// How hard SQLite syncs on commit (`PRAGMA synchronous`). In WAL mode `Full` makes every
/// commit durable before the call returns; `Normal` may lose the last commits on power loss
/// (never on a process crash) but never corrupts the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// No syncs at all: for tests and throwaway data only.
    Off,
    /// Sync at checkpoints only.
    Normal,
    /// Sync the WAL on every commit (the default: durable on commit).
    #[default]
    Full,
    /// Like `Full`, and also sync the directory after a rollback journal is deleted.
    Extra,
}

impl Synchronous {
    /// The pragma value.
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// Settings of [`crate::SqliteStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteConfig {
    /// Durability of a commit (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Writes waiting for the writer thread, at most (the bound of backpressure, SPEC §7).
    pub write_queue: usize,
    /// A write that finds the queue full waits this long, then fails with `Unavailable`.
    pub enqueue_timeout: Duration,
    /// The most calls one transaction (one commit, one fsync) groups.
    pub write_batch_max: usize,
    /// How long a connection waits for a lock held by another connection before failing.
    pub busy_timeout: Duration,
    /// Read connections (reads run concurrently with the writer in WAL mode).
    pub read_connections: usize,
    /// Runs deleted per retention transaction, so the writer is never held for long.
    pub purge_batch: u32,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            synchronous: Synchronous::Full,
            write_queue: 10_000,
            enqueue_timeout: Duration::from_secs(5),
            write_batch_max: 1_000,
            busy_timeout: Duration::from_secs(5),
            read_connections: 2,
            purge_batch: 1_000,
        }
    }
}

impl SqliteConfig {
    /// Checks the settings; errors name the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.write_queue == 0 {
            return Err(InvalidInput::new("write_queue", "must be at least 1"));
        }
        if self.write_batch_max == 0 {
            return Err(InvalidInput::new("write_batch_max", "must be at least 1"));
        }
        if self.read_connections == 0 {
            return Err(InvalidInput::new("read_connections", "must be at least 1"));
        }
        if self.purge_batch == 0 {
            return Err(InvalidInput::new("purge_batch", "must be at least 1"));
        }
        Ok(())
    }
}

pub use runlane_core::backend::Retention;
