//! Errors of opening a data path, and the internal error of one database step.
//!
//! [`SqliteError`] is what [`crate::SqliteStore::open`] returns: every variant names the path,
//! and the ones about the file's identity (foreign, corrupt, newer schema, in use) promise that
//! the file was not changed. Once open, the store speaks [`StoreError`] like every run store;
//! [`DbError`] is the step-level error that is folded into it at the boundary.

use std::path::PathBuf;

use runlane_core::{InvalidInput, StoreError};

/// Why a data path could not be opened. The file is never changed when this is returned for a
/// file that is not ours (foreign, corrupt, newer schema) or that is in use.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] InvalidInput),
    /// Another store (this process or another) holds the data path's lock file.
    #[error("data path {path} is already in use (lock file {lock} is held by another store)")]
    InUse {
        /// The database file.
        path: PathBuf,
        /// The lock file next to it.
        lock: PathBuf,
    },
    /// The file at the path is not a SQLite database; it was left untouched.
    #[error("{path} is not a sqlite database; refusing to touch it")]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file is a SQLite database of another application; it was left untouched.
    #[error(
        "{path} is a sqlite database of another application \
         (application_id {application_id:#010x}, runlane uses {expected:#010x}); refusing to touch it"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The application id found in its header.
        application_id: u32,
        /// The id runlane writes.
        expected: u32,
    },
    /// The database was written by a newer runlane; this build cannot read it safely.
    #[error(
        "{path} has schema version {found}, newer than the {supported} this build knows; \
         upgrade runlane (the file was not changed)"
    )]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// The file looks like a database but cannot be read; it was left untouched.
    #[error("{path} is corrupt or unreadable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite reported.
        reason: String,
    },
    /// A file-system error on the database, its lock file or the writer thread.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused a step of opening or migrating.
    #[error("sqlite error on {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
}

/// The error of one step against the database, before it is reported as a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    /// SQLite failed (I/O, full disk, busy past the timeout, ...).
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The step was refused for a reason callers act on (not found, already finished, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value does not decode (a hand-edited or damaged row).
    #[error("corrupt run store row: {0}")]
    Corrupt(String),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Store(e) => e,
            // The run store has no variant for a damaged row; `Unavailable` is the one callers
            // already treat as "this store cannot answer", and the text names the cause.
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<runlane_core::columns::CorruptValue> for DbError {
    fn from(e: runlane_core::columns::CorruptValue) -> Self {
        DbError::Corrupt(e.0)
    }
}
