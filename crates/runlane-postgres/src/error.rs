//! Errors of opening the store, and the folding of database errors into [`StoreError`].
//!
//! [`PostgresError`] is what [`crate::PostgresStore::open`] returns; every variant names the
//! server address or the schema. Once open, the store speaks [`StoreError`] like every run
//! store: anything the database could not do is `Unavailable`, with the cause in its text.

use runlane_core::{InvalidInput, StoreError};

/// Why the store could not be opened. Nothing was changed in the database when this is
/// returned, except for migrations that fully committed.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// A configuration value is out of range (the URL does not parse, a bad schema name).
    #[error(transparent)]
    Config(#[from] InvalidInput),
    /// No connection could be made to the server.
    #[error("cannot connect to postgresql at {address}: {reason}")]
    Unreachable {
        /// `host:port` (or the socket path) that was tried.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The schema was written by a newer runlane; this build refuses to touch it.
    #[error(
        "schema {schema} has version {found}, newer than the {supported} this build knows; \
         upgrade runlane (nothing was changed)"
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The version found.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// The server refused a step of opening or migrating.
    #[error("postgresql at {address} refused opening schema {schema}: {source}")]
    Postgres {
        /// `host:port`.
        address: String,
        /// The schema.
        schema: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
}

/// Whether an error means the connection (not the statement) failed: the server is down or
/// unreachable, or the pool could not hand out a connection in time.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Whether the statement lost a race with another transaction and may simply be tried again
/// (deadlock detected, serialization failure).
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40P01" | "40001")),
        _ => false,
    }
}

/// Whether the statement failed on a unique index (a row with its id or key is stored).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("23505"),
        _ => false,
    }
}

/// A database error as the run store reports it.
pub(crate) fn unavailable(what: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("postgresql {what}: {e}"))
}

/// The error of one step: a refusal callers act on, or a database failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    /// The database failed.
    #[error("postgresql: {0}")]
    Sql(#[from] sqlx::Error),
    /// A stored value does not decode (a hand-edited or damaged row).
    #[error("corrupt run store row: {0}")]
    Corrupt(String),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Sql(e) => unavailable("error", &e),
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
