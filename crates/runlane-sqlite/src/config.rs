//! Settings of the SQLite run store and of the retention of finished runs.

use std::time::Duration;

use runlane_core::{InvalidInput, RunStatus};

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

/// How long finished runs are kept, per terminal status; `None` keeps them forever.
/// SPEC §7: retention is on by default, 7 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Runs that ended `completed`.
    pub completed: Option<Duration>,
    /// Runs that ended `failed`.
    pub failed: Option<Duration>,
    /// Runs that ended `canceled`.
    pub canceled: Option<Duration>,
    /// Runs that ended `expired`.
    pub expired: Option<Duration>,
    /// Runs that ended `timed_out`.
    pub timed_out: Option<Duration>,
}

impl Retention {
    /// The default keep time of every terminal status.
    pub const DEFAULT_KEEP: Duration = Duration::from_secs(7 * 24 * 60 * 60);

    /// The same keep time for every terminal status.
    pub fn uniform(keep: Duration) -> Self {
        Retention {
            completed: Some(keep),
            failed: Some(keep),
            canceled: Some(keep),
            expired: Some(keep),
            timed_out: Some(keep),
        }
    }

    /// How long runs that ended in `status` are kept (`None` for waiting statuses: they are
    /// never purged).
    pub fn keep(&self, status: RunStatus) -> Option<Duration> {
        match status {
            RunStatus::Completed => self.completed,
            RunStatus::Failed => self.failed,
            RunStatus::Canceled => self.canceled,
            RunStatus::Expired => self.expired,
            RunStatus::TimedOut => self.timed_out,
            RunStatus::Delayed | RunStatus::Queued | RunStatus::Ready | RunStatus::Executing => {
                None
            }
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention::uniform(Self::DEFAULT_KEEP)
    }
}
